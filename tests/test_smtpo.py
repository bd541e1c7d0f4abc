"""smtpo.py: the five rewards on hand-written outputs, the GRPO loss against hand computations and gradient signs,
LightGCN, BPR and InfoNCE by hand, the simulator's lists, and a GRPO update that moves a known case."""

import math
from dataclasses import dataclass

import pytest
import torch

import smtpo
from common.catalog import Catalog
from common.data import load_demo_catalog

CANDIDATES = [
    "Inception (2010)",
    "Crouching Tiger, Hidden Dragon (2000)",
    "Alien (1979)",
    "Aliens (1986)",
    "Up [3D] (2009)",
    "The Matrix (1999)",
]


def output(steps: int, answer: str = "RANK LIST: [Inception (2010), Alien (1979)]") -> str:
    return "<think>\n" + "".join(f"Step {k}: something.\n" for k in range(1, steps + 1)) + "</think>\n" + answer


# ------------------------------------------------------------------------------------ rewards (Eq. 15-19)


@pytest.mark.parametrize("steps, reward", [(0, 0.0), (1, 0.2), (4, 0.8), (5, 1.0), (6, 0.8), (7, 0.6), (8, 0.0)])
def test_process_format_reward_counts_the_step_headers(steps, reward):
    assert smtpo.process_format_reward(output(steps)) == pytest.approx(reward)


def test_process_format_reward_counts_only_inside_think():
    assert smtpo.process_format_reward("Step 1: a\nStep 2: b\nStep 3: c\nStep 4: d\nStep 5: e\nRANK LIST: [x]") == 0
    assert smtpo.process_format_reward("<think>Step 1: a Step 2. b step3: c STEP 4: d Step 5 : e</think>") == 1.0


@pytest.mark.parametrize(
    "text, ranked",
    [
        (output(5), ["Inception (2010)", "Alien (1979)"]),
        # titles with commas and brackets, a near-miss spelling, a title outside the candidates, a repeat
        (
            output(5, "RANK LIST: [Aliens (1986), crouching tiger, hidden dragon (2000), The Matrx (1999), "
                   "Up [3D] (2009), Not A Candidate (1990), Alien (1979), Alien (1979)]"),
            ["Aliens (1986)", "Crouching Tiger, Hidden Dragon (2000)", "The Matrix (1999)", "Up [3D] (2009)",
             "Alien (1979)"],
        ),
        # malformed answers: no brackets, no colon, the list inside <think>, no </think>
        (output(5, "RANK LIST: Inception (2010), Alien (1979)"), None),
        (output(5, "RANK LIST [Inception (2010)]"), None),
        ("<think>Step 1: a RANK LIST: [Inception (2010)]</think>\nI recommend Inception.", None),
        ("<think>Step 1: a\nRANK LIST: [Inception (2010)]", None),
    ],
)  # fmt: skip
def test_rank_list_parsing_on_real_shapes_of_output(text, ranked):
    assert smtpo.parse_rank_list(text, CANDIDATES) == ranked
    assert smtpo.answer_format_reward(text) == float(ranked is not None)


def test_hit_rank_and_preference_rewards():
    ranked = ["Inception (2010)", "Alien (1979)", "The Matrix (1999)", "Aliens (1986)"]
    assert smtpo.hit_reward(ranked, "Alien (1979)") == 1.0 and smtpo.hit_reward(ranked, "Up [3D] (2009)") == 0.0
    assert smtpo.rank_reward(ranked, "Inception (2010)") == 1.0  # position 1 of 4
    assert smtpo.rank_reward(ranked, "Alien (1979)") == pytest.approx(0.75)  # 1 - (2 - 1) / 4
    assert smtpo.rank_reward(ranked, "Up [3D] (2009)") == 0.0
    assert smtpo.preference_reward(torch.tensor([0.6, 0.8]).numpy(), torch.tensor([1.0, 0.0]).numpy()) == pytest.approx(
        0.6
    )
    assert smtpo.preference_reward(None, torch.tensor([1.0, 0.0]).numpy()) == 0.0


def test_output_rewards_sum_the_five_and_read_the_step_one_preference():
    text = output(5).replace("Step 1: something.", "Step 1: Preference Inference: dreamy sci-fi heists.")
    assert smtpo.preference_text(text) == "dreamy sci-fi heists."
    rewards = smtpo.output_rewards(text, CANDIDATES, "Alien (1979)", None, None, n=10)
    assert rewards == {"think": 1.0, "answer": 1.0, "hit": 1.0, "rank": 0.5, "pref": 0.0, "total": 3.5}
    assert smtpo.output_rewards(output(5), CANDIDATES, "Alien (1979)", None, None, n=1)["hit"] == 0.0  # top-1 only


# ------------------------------------------------------------------------------------ the GRPO loss (Eq. 14)


def test_group_advantages_normalize_within_the_group():
    advantages = smtpo.group_advantages(torch.tensor([1.0, 2.0, 3.0, 2.0]))
    assert advantages.tolist() == pytest.approx([-1.2247, 0.0, 1.2247, 0.0], abs=1e-4)
    assert smtpo.group_advantages(torch.tensor([2.0, 2.0])).tolist() == [0.0, 0.0]  # no signal, no step


def test_zero_advantage_leaves_only_the_kl():
    policy = torch.tensor([[-1.0, -2.0, 0.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0, -3.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])  # the third position is not the output's
    loss = smtpo.grpo_loss(policy, policy.detach(), ref, torch.tensor([0.0]), mask, 0.2, 0.04)
    kl = [math.exp(-0.5) + 0.5 - 1, math.exp(1.0) - 1.0 - 1]  # exp(r - p) - (r - p) - 1 per token
    assert loss.item() == pytest.approx(0.04 * sum(kl) / 2, rel=1e-6)
    loss.sum().backward()
    assert policy.grad[0, 2] == 0  # masked off


def test_clipping_acts_on_both_sides():
    old = torch.zeros(1, 1)
    mask = torch.ones(1, 1)
    for log_ratio, advantage, moves in ((0.5, 1.0, False), (-0.5, -1.0, False), (0.5, -1.0, True), (0.1, 1.0, True)):
        policy = torch.full((1, 1), log_ratio, requires_grad=True)
        loss = smtpo.grpo_loss(policy, old, policy.detach(), torch.tensor([advantage]), mask, 0.2, 0.0)
        loss.sum().backward()
        # ratio e^0.5 = 1.65 > 1.2 with A > 0, and e^-0.5 = 0.61 < 0.8 with A < 0: clipped, no gradient; the
        # pessimistic side (A < 0 with a ratio above 1) and a ratio inside the range keep theirs
        assert (policy.grad.abs().item() > 0) is moves, (log_ratio, advantage)
        if moves:
            assert policy.grad.item() == pytest.approx(-advantage * math.exp(log_ratio))


def test_a_positive_advantage_raises_the_outputs_log_probs():
    policy = torch.tensor([[-2.0, -1.0], [-3.0, -0.5]], requires_grad=True)
    loss = smtpo.grpo_loss(
        policy, policy.detach(), policy.detach(), torch.tensor([1.0, -1.0]), torch.ones(2, 2), 0.2, 0.04
    )
    loss.sum().backward()
    assert (policy.grad[0] < 0).all() and (policy.grad[1] > 0).all()  # descent raises the first, lowers the second


# ------------------------------------------------------------------------------------ the retriever (Sec. 3.3)


def test_lightgcn_propagation_on_a_three_node_graph():
    edges = torch.tensor([[0, 0], [1, 2]])  # item 0 linked to entities 1 and 2
    adjacency = smtpo.normalized_adjacency(3, edges).to_dense()
    s = 1 / math.sqrt(2)  # 1 / sqrt(deg 2 * deg 1)
    assert torch.allclose(adjacency, torch.tensor([[0, s, s], [s, 0, 0], [s, 0, 0]]))
    e0 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    one_layer = torch.tensor([[s * 1, s * 2], [s, 0.0], [s, 0.0]])
    assert torch.allclose(smtpo.lightgcn(e0, adjacency.to_sparse(), 1), (e0 + one_layer) / 2)
    two_layers = adjacency @ one_layer
    assert torch.allclose(smtpo.lightgcn(e0, adjacency.to_sparse(), 2), (e0 + one_layer + two_layers) / 3)


def test_bpr_and_info_nce_by_hand():
    anchor, positive, negative = torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    assert smtpo.bpr_loss(anchor, positive, negative).item() == pytest.approx(-math.log(1 / (1 + math.exp(1.0))))
    scores = torch.tensor([[2.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    expected = (-math.log(math.exp(2) / (math.exp(2) + 1 + math.e)) + math.log(3)) / 2
    assert smtpo.info_nce_loss(scores).item() == pytest.approx(expected)


def test_fusion_head_views():
    torch.manual_seed(0)
    texts, text_mask = torch.randn(2, 3, 8), torch.tensor([[True, True, False], [True, False, False]])
    entities, entity_mask = torch.randn(2, 4, 6), torch.tensor([[True, True, False, False], [True] * 4])
    both = smtpo.FusionHead(8, 6)
    e = both(texts, text_mask, entities, entity_mask)
    assert e.shape == (2, 12) and both.items(torch.randn(5, 6), torch.randn(5, 8)).shape == (5, 12)
    graph_only = smtpo.FusionHead(8, 6, "graph")
    graph_only.load_state_dict(both.state_dict())
    g = graph_only(texts, text_mask, entities, entity_mask)
    assert torch.equal(g[:, :6], e[:, :6]) and not g[:, 6:].any()
    # a masked entity changes nothing
    entities2 = entities.clone()
    entities2[0, 3] = 100.0
    assert torch.allclose(both(texts, text_mask, entities2, entity_mask), e)


# ------------------------------------------------------------------------------------ the simulator's data


def test_simulator_lists_by_attribute_overlap_and_seeded():
    import random

    catalog = Catalog(load_demo_catalog())
    sample = smtpo.Sample("k", [{"role": "user", "content": "x"}], ["Jaws (1975)"], "Alien (1979)")
    lists = smtpo.simulator_lists(sample, catalog, 5, random.Random(0))
    assert sample.target in lists["H+"] and sample.target in lists["S+"]
    assert sample.target not in lists["H-"] + lists["S-"] and "Jaws (1975)" not in sum(lists.values(), [])
    wanted = smtpo.attributes_of(catalog, sample.target)

    def overlap(items):
        return min(len(wanted & smtpo.attributes_of(catalog, t)) for t in items)

    assert overlap(lists["H-"]) >= max(len(wanted & smtpo.attributes_of(catalog, t)) for t in lists["S-"])
    assert lists == smtpo.simulator_lists(sample, catalog, 5, random.Random(0))


def test_simulator_jobs_show_the_target_to_the_teacher_only_and_draw_lists_per_turn():
    catalog = Catalog(load_demo_catalog())
    sample = smtpo.Sample("k", [{"role": "user", "content": "A scary space film?"}], [], "Alien (1979)")
    jobs, examples = smtpo.simulator_jobs(sample, catalog, smtpo.Args(simulator_lists=4, simulator_predictions=3))
    assert sorted(j["list"] for j in jobs) == ["H+", "H-", "S+", "S-"]
    one, _ = smtpo.simulator_jobs(sample, catalog, smtpo.Args(simulator_lists=1))
    assert len(one) == 1 and one == smtpo.simulator_jobs(sample, catalog, smtpo.Args(simulator_lists=1))[0]
    assert all("Alien (1979)" in j["teacher_prompt"] and "really want is" not in j["prompt"] for j in jobs)
    tasks = [(e["task"], e["completion"]) for e in examples]
    assert tasks[0][0] == "alignment" and tasks[0][1].startswith("Alien (1979); ")
    assert [t for t in tasks[1:]] == [("prediction", "Yes"), ("prediction", "No"), ("prediction", "No")]


# ------------------------------------------------------------------------------------ a GRPO update, learning


@dataclass
class Settings:  # the fields of Args that Run and grpo_update read
    exp_name: str = "grpo"
    seed: int = 1
    run_name: str = "grpo"
    track: bool = False
    wandb_project: str = "cleancrs"
    wandb_entity: str | None = None
    micro_batch_size: int = 1
    max_grad_norm: float = 1.0
    epsilon: float = 0.2
    kl_beta: float = 0.04


def test_grpo_updates_move_probability_to_the_rewarded_output(tmp_path, monkeypatch, tokenizer, tiny_model):
    import copy

    from transformers import get_constant_schedule

    from common.distributed import start_training
    from common.models import add_lora
    from common.run import Run
    from common.tokens import collate, sequence_logprobs

    monkeypatch.chdir(tmp_path)
    args = Settings()
    run = Run(args)
    torch.manual_seed(0)
    model = add_lora(copy.deepcopy(tiny_model))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    model, optimizer, _ = start_training(run.accelerator, model, optimizer, get_constant_schedule(optimizer), tmp_path)
    prompt, outputs = "Rank the films.", ["RANK LIST: [Alien (1979)]", "I do not know."]
    rewards = torch.tensor([1.0, 0.0])  # a known answer: the first output is the better one

    def log_ratio():
        rows = [smtpo.encode_example(tokenizer, prompt, o, 512) for o in outputs]
        batch = collate([(r["input_ids"], r["completion_mask"]) for r in rows], tokenizer.pad_token_id)
        with torch.no_grad():
            logps, _, _ = sequence_logprobs(model, **batch)
        return (logps[0] - logps[1]).item()

    before = log_ratio()
    for _ in range(5):
        examples = [
            smtpo.encode_example(tokenizer, prompt, o, 512) | {"advantage": a}
            for o, a in zip(outputs, smtpo.group_advantages(rewards).tolist())
        ]
        stats = smtpo.grpo_update(run, args, model, optimizer, tokenizer, examples)
    assert log_ratio() > before + 0.5  # log pi(rewarded) - log pi(unrewarded) rose
    assert stats["kl"] > 0  # and the policy moved away from the reference


def test_the_prefilled_think_tag_is_prompt_for_training_and_output_for_the_rewards(tokenizer):
    from common.tokens import encode_prompt_completion

    prefix = smtpo.output_prefix(smtpo.Args())
    text = prefix + "Step 1: Preference Inference: sci-fi.\n</think>\nRANK LIST: [Alien (1979)]"
    assert smtpo.process_format_reward(text) == pytest.approx(0.2) and smtpo.answer_format_reward(text) == 1.0
    example = smtpo.encode_example(tokenizer, "Rank the films.", text, 512, prefix)
    messages = [{"role": "user", "content": "Rank the films."}]
    ids, mask = encode_prompt_completion(tokenizer, messages, text[len(prefix) :], 512, prefix)
    assert (example["input_ids"], example["completion_mask"]) == (ids, mask)
    start = mask.index(1)
    assert tokenizer.decode(ids[:start]).endswith(prefix) and not tokenizer.decode(ids[start:]).startswith("<think>")
    plain = smtpo.encode_example(tokenizer, "Rank the films.", text, 512)  # no prefill: the tag is trained
    assert tokenizer.decode(plain["input_ids"][plain["completion_mask"].index(1) :]).startswith("<think>")


def test_reward_curve_compares_the_first_and_second_half_of_the_steps():
    rollouts = [
        {
            "key": f"{step}|d{k}",
            "turns": [{"rewards": [{"total": step, "think": 0.2 * step, "answer": 1.0, "pref": 0}]}],
        }
        for step in range(5)
        for k in range(2)
    ]
    curve = smtpo.reward_curve(rollouts, 5)
    assert curve["rollout/reward_total_first_half"] == 0.5  # steps 0 and 1
    assert curve["rollout/reward_total_second_half"] == 3.0  # steps 2, 3 and 4
    assert curve["rollout/reward_think_second_half"] == pytest.approx(0.6)
    assert smtpo.reward_curve([], 5) == {}
