"""ecpo.py: the four losses against hand-computed values, the lambda filter, the rewrite and judge parsers,
constrained action decoding, and the data split over ranks."""

import dataclasses
import math
import re

import pytest
import torch

import ecpo
from common.formats import load_demo_tasks
from common.parsing import ParseStats
from common.run import Run
from common.tracking import RecordFile
from tests.conftest import DATA, needs_data


def _sigmoid(x):
    return 1 / (1 + math.exp(-x))


def _leaves(*values):
    return [torch.tensor([v], dtype=torch.float64, requires_grad=True) for v in values]


def test_dpo_is_log2_when_policy_equals_reference():
    logps = torch.tensor([-3.0, -7.5, -0.2])
    loss = ecpo.dpo_loss(logps, logps - 1.0, logps, logps - 1.0, beta=0.1)
    assert torch.allclose(loss, torch.full_like(loss, math.log(2)))


@pytest.fixture
def bf16_accelerate(monkeypatch):
    """accelerate's bf16 mixed precision (autocast on CPU) for the test's Accelerator; accelerate keeps one state per
    process, so it is reset before and after."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize("weights", ["float32", "bfloat16"])
def test_dpo_starts_at_log2_when_the_policy_computes_in_bf16(tmp_path, monkeypatch, tiny_policy, bf16_accelerate,
                                                             weights):  # fmt: skip
    # The reference pi_sft is the policy with its fresh adapter off: before the first update every log-ratio is 0 and
    # the loss log 2, exactly, when both run in the policy's precision (fp32 or bf16 weights, under bf16 autocast as
    # on GPUs) and batch shapes. Here a reference computed outside accelerate's autocast is off by ~4e-4 nats, and one
    # computed in it but at other batch shapes by ~3e-5.
    from transformers import AutoModelForCausalLM

    from common.models import add_lora
    from common.run import Run

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CLEANCRS_DTYPE", weights)
    run_dir = tmp_path / "runs" / "bf16"
    add_lora(AutoModelForCausalLM.from_pretrained(tiny_policy)).save_pretrained(run_dir / "sft_adapter")
    (run_dir / "sft_adapter" / "steps.json").write_text("{}")
    pairs = [
        ("A film about dreams?", "Recommend[Inception (2010)]", "Ask[What genre?]"),
        ("Something funny tonight?", "Ask[Slapstick, or dry and witty?]", "Response[OK.]"),
        ("A scary movie please.", "Search[supernatural horror haunted house]", "Recommend[Heat (1995)]"),
        ("Any space adventures?", "Recommend[Interstellar (2014), through a wormhole.]", "Ask[Why?]"),
    ]
    for k, (prompt, chosen, rejected) in enumerate(pairs):
        pair = {"key": f"t{k}", "prompt": prompt, "chosen": chosen, "rejected": rejected}
        RecordFile(run_dir / "pairs.jsonl").append(pair)
    args = ecpo.Args(run_name="bf16", policy=str(tiny_policy), po_batch_size=4, micro_batch_size=2, po_epochs=1)
    run = Run(args)
    assert run.accelerator.mixed_precision == "bf16"
    ecpo.preference_optimization(run, args)
    (first,) = [row for row in RecordFile(run_dir / "metrics.jsonl").records() if "train/loss" in row]
    assert first["train/rewards/chosen"] == first["train/rewards/rejected"] == 0.0
    assert first["train/loss"] == pytest.approx(math.log(2), abs=1e-7)


def test_dpo_value_and_gradient_signs():
    pc, pr, rc, rr = _leaves(-1.0, -2.0, -1.5, -1.5)
    loss = ecpo.dpo_loss(pc, pr, rc, rr, beta=0.1)
    # logits = 0.1 * ((-1 + 1.5) - (-2 + 1.5)) = 0.1
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-0.1)), abs=1e-12)
    loss.sum().backward()
    assert pc.grad.item() == pytest.approx(-0.1 * _sigmoid(-0.1), abs=1e-12)  # descent raises the rewrite
    assert pr.grad.item() == pytest.approx(0.1 * _sigmoid(-0.1), abs=1e-12)  # and lowers the original
    assert rc.grad.item() == pytest.approx(-pc.grad.item())


def test_simpo_value_and_gradient_signs():
    pc, pr = _leaves(-4.0, -6.0)
    loss = ecpo.simpo_loss(pc, pr, torch.tensor([2.0]), torch.tensor([3.0]), beta=2.0, gamma=1.0)
    # 2 * (-4 / 2) - 2 * (-6 / 3) - 1 = -1
    assert loss.item() == pytest.approx(math.log(1 + math.e), abs=1e-12)
    loss.sum().backward()
    assert pc.grad.item() == pytest.approx(-(2.0 / 2) * _sigmoid(1.0), abs=1e-12)
    assert pr.grad.item() == pytest.approx((2.0 / 3) * _sigmoid(1.0), abs=1e-12)


def test_kto_value_reference_point_and_gradient_signs():
    pc, pr, rc, rr = _leaves(-1.0, -2.0, -1.5, -1.5)
    z_ref = torch.tensor(0.02, dtype=torch.float64)
    loss = ecpo.kto_loss(pc, pr, rc, rr, z_ref, beta=0.1, lambda_w=1.0, lambda_l=2.0)
    chosen = 1 - _sigmoid(0.1 * 0.5 - 0.02)
    rejected = 2.0 * (1 - _sigmoid(0.02 - 0.1 * -0.5))  # the corrected sign: the original is undesirable
    assert loss.item() == pytest.approx((chosen + rejected) / 2, abs=1e-12)
    loss.sum().backward()
    assert pc.grad.item() < 0 < pr.grad.item()

    # z_ref = beta * max(0, weighted mean of log-ratios on mismatched pairs), detached; weight-0 rows excluded
    policy = torch.tensor([-1.0, -2.5, 100.0], requires_grad=True)
    ref = torch.tensor([-2.0, -2.0, 0.0])
    z = ecpo.kto_reference_point(policy, ref, torch.tensor([1.0, 1.0, 0.0]), beta=0.1)
    assert z.item() == pytest.approx(0.1 * (1.0 - 0.5) / 2) and not z.requires_grad
    assert ecpo.kto_reference_point(policy, ref + 5, torch.tensor([1.0, 1.0, 0.0]), beta=0.1).item() == 0.0


# ------------------------------------------------------------------------------------ rewrites and lambda


def _forward_episode(key, ratings):
    turns = []
    for n, rating in enumerate(ratings, 1):
        action = None if rating == "error" else f"Ask[question {n}?]"
        turns.append(
            {
                "turn": n,
                "ec_rating": 0 if rating == "error" else rating,
                "ec_reason": f"flaw {n}",
                "cra": {"state": f"...\nDialogue:\nObservation 1: User: hi\nAction {n}:", "action": action},
            }
        )
    return {"key": key, "turns": turns}


def test_lower_lambda_gives_a_subset_of_the_pairs(tmp_path, monkeypatch, scripted_llm, settings):
    from functools import partial

    monkeypatch.chdir(tmp_path)
    episodes = [_forward_episode("a", [1, 3, 5, "error"]), _forward_episode("b", [2, 4, None, 4])]
    rewriter = scripted_llm(
        lambda prompt: '{"reason": "more concrete", "refinement": "Ask[Historical or contemporary?]"}'
    )
    args, run = ecpo.Args(batch_size=2), Run(settings())
    derive = partial(ecpo.derive_pairs, rewriter=rewriter, domain="movie", args=args, stats=ParseStats())

    pairs = {}
    for lam in (4, 2):
        pairs[lam] = ecpo.select_pairs(run.map("rewrites.jsonl", ecpo.rewritable_turns(episodes, lam), derive), lam)
    keys4, keys2 = {p["key"] for p in pairs[4]}, {p["key"] for p in pairs[2]}
    assert keys4 == {"a#1", "a#2", "b#1", "b#2", "b#4"}  # 5 is above lambda; None and System Error are skipped
    assert keys2 == {"a#1", "b#1"} and keys2 < keys4
    assert all(p["rating"] <= 2 for p in pairs[2])
    assert len(rewriter.prompts) == 5  # lambda 2 reused the rewrites made for lambda 4
    assert pairs[4][0]["chosen"] == "Ask[Historical or contemporary?]" and pairs[4][0]["rejected"] == "Ask[question 1?]"


@pytest.mark.parametrize(
    "text, status",
    [
        ('{"reason": "r", "refinement": "Recommend[Try Heat (1995), a tense crime saga.]"}', "ok"),
        ('Sure! ```json\n{"reason": "r", "refinement": "Ask[Do you prefer older films?]",}\n```', "ok"),
        ('{"reason": "r", "refinement": "Ask[question 1?]"}', "unchanged"),
        ('{"reason": "r", "refinement": "Ask[Do you like [older] films?]"}', "bad_format"),
        ('{"reason": "r", "refinement": "I would ask about the genre."}', "bad_format"),
        ('{"reason": "r", "refinement": "Ask[What genre?] and then Search[genre]"}', "bad_format"),
        ('{"reason": "r", "refinement": ["Ask[What genre?]"]}', "unparsable"),
        ("Refinement: Ask[What genre do you like?]", "unparsable"),
    ],
)
def test_check_refinement_on_real_malformed_outputs(text, status):
    refinement, got = ecpo.check_refinement(text, "Ask[question 1?]")
    assert got == status and (refinement is not None) == (status == "ok")


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            '{"Flexibility": {"Reason": "a", "Score": 1}, "Coherence": {"Reason": "b", "Score": "0"}, '
            '"User Guidance": {"Reason": "c", "Score": -1}, "Final Score": 1}',
            {"flexibility": 1, "coherence": 0, "user_guidance": -1, "final": 1},
        ),
        ('```json\n{"flexibility": {"score": -1}, "Final Score": "-1"}\n```', {"flexibility": -1, "final": -1}),
        ('{"Flexibility": {"Reason": "a", "Score": 1}}', None),  # no final verdict
        ('{"Final Score": "-1 or 1 or 0"}', None),  # the echoed template
        ("A is better overall.", None),
    ],
)
def test_parse_judgement(text, expected):
    assert ecpo.parse_judgement(text) == expected


def test_win_rates_per_dimension():
    judgements = [
        {"label": "eval", "order": "ab", "scores": {"final": 1, "coherence": 0}},
        {"label": "eval", "order": "ba", "scores": {"final": 1, "coherence": 0}},
        {"label": "eval", "order": "ba", "scores": None},
        {"label": "eval_sft", "order": "ab", "scores": {"final": 1}},
    ]
    metrics = ecpo.win_rates(judgements, "eval", "eval")
    assert metrics["eval/wr"] == 0.5 and metrics["eval/wr_coherence"] == 0.5  # a win, and a loss when swapped
    assert metrics["eval/judgements"] == 2 and metrics["eval/judge_failures"] == 1


# ------------------------------------------------------------------------------------ ActCRS


def test_parse_actcrs():
    assert ecpo.parse_actcrs("Action 2: Search[space opera") == "Search[space opera]"  # generation stopped at ]
    assert ecpo.parse_actcrs("Recommend[Inception (2010)]") == "Recommend[Inception (2010)]"
    assert ecpo.parse_actcrs("Action 2: Search[ dream heist thriller ]") == "Search[dream heist thriller]"
    assert ecpo.parse_actcrs("Search[x]", allowed=ecpo.VISIBLE_ACTIONS) is None
    assert ecpo.parse_actcrs("I think you would like Inception.") is None
    assert ecpo.parse_actcrs("Ask[]") is None
    assert ecpo.parse_actcrs("I think you should Watch[Inception]") is None
    assert ecpo.parse_actcrs("Response[nested [brackets]]") is None


def test_win_rate_counts_both_orders():
    # candidate as A: win, tie; swapped (candidate is B): judge says A better (-> loss), B better (-> win)
    assert ecpo.win_rate([1, 0], [1, -1]) == pytest.approx((2 + 0.5) / 4)
    # a system against itself with a position-biased judge (always A) scores exactly 0.5
    assert ecpo.win_rate([1, 1, 1], [1, 1, 1]) == 0.5


def test_constrained_decoding_always_gives_a_well_formed_action(tokenizer, tiny_model):
    from common.llm import HFChat

    llm = HFChat(tiny_model, tokenizer, batch_size=4)
    prompts = [
        ecpo.actcrs_prompt("movie", [f"Observation 1: User: I want a film about {x}."], few_shot=False)
        for x in ("space", "dreams", "cooking")
    ]
    stats = ParseStats()
    actions = ecpo.decode_actions(
        llm, prompts, allowed=ecpo.VISIBLE_ACTIONS, args=ecpo.Args(action_max_tokens=8), stats=stats
    )
    # a random model writes nonsense, but always inside one visible action of the ActCRS format
    assert stats.attempts == 3 and stats.failures == 0
    assert all(ecpo.ACTION_FORMAT.match(action) and not action.startswith("Search") for action in actions)


def test_constrained_decoding_counts_an_empty_argument_as_a_failure():
    class Prefilled:  # a local backend whose argument comes out empty after the forced "Type["
        can_prefill = True

        def choice_probs(self, conversations, choices, prefix=""):
            return [{c: float(c == "Recommend") for c in choices} for _ in conversations]

        def chat(self, conversations, max_tokens, stop, prefix):
            return [["  "] if p.startswith("Ask") else ["Heat (1995)"] for p in prefix]

    stats = ParseStats()
    actions = ecpo.decode_actions(
        Prefilled(), ["s1", "s2"], allowed=ecpo.VISIBLE_ACTIONS, args=ecpo.Args(), stats=stats
    )
    assert actions == ["Recommend[Heat (1995)]", "Recommend[Heat (1995)]"] and stats.failures == 0
    Prefilled.choice_probs = lambda self, conversations, choices, prefix="": [{"Ask": 1.0} for _ in conversations]
    assert ecpo.decode_actions(Prefilled(), ["s1"], allowed=("Ask",), args=ecpo.Args(), stats=stats) == [None]
    assert stats.failures == 1


def test_actcrs_chains_searches_then_answers(scripted_llm):
    from common.catalog import Catalog
    from common.formats import load_demo_catalog

    catalog = Catalog(load_demo_catalog())
    answers = iter(["Search[dream heist]", "Search[nolan]", "Recommend[Try Inception (2010).]"])
    llm = scripted_llm(lambda prompt: next(answers))
    args = ecpo.Args(action_decoding="free", max_searches=3, retriever_top_k=2)
    stats = ParseStats()
    cra = ecpo.make_actcrs(llm, catalog=catalog, domain="movie", args=args, few_shot=True, stats=stats)
    (reply,) = cra(["k"], [[{"role": "user", "content": "A film about dreams?"}]])
    assert reply.text == "Try Inception (2010)." and len(reply.retrieved) >= 2
    calls = reply.record["calls"]
    assert [c["type"] for c in calls] == ["Search", "Search", "Recommend"]
    assert all("Here is an example" not in c["state"] for c in calls)  # D_sft prompts drop the few-shot block
    assert "Here is an example" in llm.prompts[0]
    assert calls[2]["state"].endswith("Action 3:") and "Observation 3: Search results: 1." in calls[2]["state"]

    # past the search budget only a visible action is accepted; a parse failure becomes "Sorry, System Error"
    answers = iter(["Search[a]", "Search[b]"] + ["Search[c]"] * 3)
    args.max_searches = 2
    cra = ecpo.make_actcrs(llm, catalog=catalog, domain="movie", args=args, few_shot=False, stats=stats)
    (reply,) = cra(["k2"], [[{"role": "user", "content": "Hi"}]])
    assert reply.text == ecpo.SYSTEM_ERROR and reply.record["action"] is None and stats.failures == 1


def test_cost_per_pair_counts_resumed_episodes_once(tmp_path):
    from common.formats import load_demo_tasks

    demo = load_demo_tasks()
    tasks = ecpo.Data(sft=demo[:2], pre=demo[2:4], evaluated=[], catalog=None, domain="movie")
    rows = [
        {"stage": "teacher", "llm_calls": 35, "tokens": 900},
        {"stage": "forward", "llm_calls": 34, "tokens": 800},
        {"stage": "teacher", "llm_calls": 0, "tokens": 0},  # a rerun that resumed everything
        {"stage": "forward", "llm_calls": 0, "tokens": 0},
        {"stage": "backward", "llm_calls": 12, "tokens": 400},
    ]
    for name, records in (("costs", rows), ("teacher_episodes", [{"key": t.key} for t in tasks.sft]),
                          ("forward_episodes", [{"key": t.key} for t in tasks.pre + demo[10:11]])):  # fmt: skip
        for record in records:
            RecordFile(tmp_path / f"{name}.jsonl").append(record)
    assert "cost/llm_calls_per_pair" not in ecpo.cost_metrics(tmp_path, tasks)  # no pairs yet
    for k in range(4):
        RecordFile(tmp_path / "pairs.jsonl").append({"key": f"p{k}"})
    metrics = ecpo.cost_metrics(tmp_path, tasks)
    assert metrics["cost/trajectories_per_pair"] == 0.5 and metrics["cost/teacher_trajectories"] == 2
    assert metrics["cost/llm_calls_per_pair"] == (34 + 12) / 4 and metrics["cost/tokens_per_pair"] == 1200 / 4
    assert metrics["cost/llm_calls"] == 81 and metrics["cost/pairs"] == 4


# ------------------------------------------------------------------------------------ the paper's settings


def test_the_paper_preset_names_every_field_and_the_recipe_selects_it():
    from common.presets import check_preset, markdown_table, parse_args
    from tests.conftest import ROOT

    check_preset(ecpo.Args, ecpo.PAPER)
    assert markdown_table(ecpo.PAPER) in (ROOT / "docs" / "ecpo.md").read_text()  # the docs show the preset itself
    args = parse_args(ecpo.Args, ecpo.PRESETS, ["paper", "--dataset", "book", "--loss", "kto"])
    assert (args.lam, args.po_epochs, args.num_pre_tasks, args.leak_guard, args.loss) == (4.0, 3, 500, "drop", "kto")
    demo = parse_args(ecpo.Args, ecpo.PRESETS, [])
    assert demo == ecpo.Args() and demo.lam == 5.0  # no preset: the demo's, whose AILO rates every response 5


def _users(tasks):
    return len({t.persona.user_id for t in tasks})


@needs_data("ecpo/Book")
def test_d_sft_and_d_pre_are_sampled_from_the_whole_train_file():
    # Book's train file is grouped by user: in file order its first 1000 + 500 tasks are 27 and 15 of its 95 users.
    args = ecpo.Args(dataset="book", data_dir=str(DATA), num_sft_tasks=1000, num_pre_tasks=500, stages=("teacher",))
    data = ecpo.load_data(args)
    assert len(data.sft) == 1000 and len(data.pre) == 500 and not {t.key for t in data.sft} & {t.key for t in data.pre}
    assert _users(data.sft) >= 90 and _users(data.pre) >= 85  # 94 and 92 at seed 1
    assert [t.key for t in ecpo.load_data(args).pre] == [t.key for t in data.pre]  # the seed decides
    first = ecpo.load_data(dataclasses.replace(args, train_tasks="first"))  # the released main.py's order
    assert (_users(first.sft), _users(first.pre)) == (27, 15)


def test_the_sample_follows_the_seed_and_more_pre_tasks_extend_d_pre():
    data = {seed: ecpo.load_data(ecpo.Args(seed=seed, num_sft_tasks=5, num_pre_tasks=5)) for seed in (1, 2)}
    ids = {seed: [t.key for t in d.sft + d.pre] for seed, d in data.items()}
    assert len(set(ids[1])) == 10 and ids[1] != ids[2] and ids[1] != [t.key for t in load_demo_tasks()[:10]]
    more = ecpo.load_data(ecpo.Args(seed=1, num_sft_tasks=5, num_pre_tasks=8))
    assert [t.key for t in more.pre[:5]] == ids[1][5:]


def test_each_domain_shows_its_own_example_dialogue():
    from ailo_sim import TASK_DOMAINS

    assert set(ecpo.FEW_SHOT) == set(TASK_DOMAINS.values())
    for domain, example in ecpo.FEW_SHOT.items():
        prompt = ecpo.actcrs_prompt(domain, ["Observation 1: User: hi"], few_shot=True)
        assert example in prompt and all(other not in prompt for other in ecpo.FEW_SHOT.values() if other != example)
        actions = re.findall(r"^Action \d+: (.+)$", example, flags=re.MULTILINE)
        assert actions and all(ecpo.ACTION_FORMAT.match(a) for a in actions)  # the format the agent must write
    assert "The Silent Harbor" not in ecpo.actcrs_prompt("book", [], few_shot=True)  # before: the movie example
    assert "Here is an example" not in ecpo.actcrs_prompt("book", [], few_shot=False)


# ------------------------------------------------------------------------------------ rollouts


class _Run:
    """What a rollout stage asks of common.run.Run, on one rank, without a model or a run folder of its own: its
    resumable work is Run's own (``Run.map``)."""

    map = Run.map

    def __init__(self, folder, llm):
        self.dir, self.llm_of_every_role = folder, llm
        self.mapped = {}  # Run.map's records per file, as Run keeps them

    def llm(self, spec, batch_size):
        return self.llm_of_every_role

    def records(self, name):
        return RecordFile(self.dir / name)

    def shard(self, items):
        return items

    def gather(self, values):  # one rank: its own values are every rank's
        return list(values)

    def count(self, counters):
        pass


def _agent_and_user(prompt):
    if prompt.startswith("You are a conversational recommender"):
        return "Ask[Which genre do you like?]"
    if "Choose how to respond next" in prompt:
        return '{"reason": "r", "policy": "respond_to_clarification"}'
    if prompt.startswith("You are a user simulator"):
        return '{"reason": "clear", "rating": "4"}'
    return '{"reason": "r", "response": "Something tense, please."}'


def test_print_conversations_prints_the_evaluation_only(tmp_path, scripted_llm, capsys):
    from common.catalog import Catalog
    from common.formats import load_demo_catalog

    demo = load_demo_tasks()
    data = ecpo.Data(demo[:2], demo[2:4], demo[24:25], Catalog(load_demo_catalog()), "movie")
    args = ecpo.Args(action_decoding="free", judge_scoring="sampled", print_conversations=True, max_turns=2)
    run = _Run(tmp_path, scripted_llm(_agent_and_user))
    ecpo.teacher_rollouts(run, args, data)  # before, every rollout of every stage was printed
    assert "=== " not in capsys.readouterr().out
    ecpo.rollout(run, args, data, cra_llm=run.llm_of_every_role, tasks=data.evaluated, few_shot=True,
                 name="eval_expert.jsonl", show=args.print_conversations)  # fmt: skip
    assert capsys.readouterr().out.count("=== ") == 1


class _Recording:
    """A local backend stand-in that records the conversations and pre-fills of each call."""

    can_prefill = True

    def __init__(self, tokenizer):
        self.tokenizer, self.usage, self.calls = tokenizer, None, []

    def chat(self, conversations, n=1, temperature=0.0, max_tokens=256, stop=None, prefix=""):
        self.calls.append((conversations, prefix, n, max_tokens))
        prefixes = [prefix] * len(conversations) if isinstance(prefix, str) else prefix
        return [[f"{c[-1]['content'][:12]}|{p}"] * n for c, p in zip(conversations, prefixes)]

    def choice_probs(self, conversations, choices, prefix=""):
        self.calls.append((conversations, prefix, 1, 0))
        return [{c: float(len(conv[-1]["content"]) % 2) for c in choices} for conv in conversations]


def test_the_policy_generates_in_batches_within_the_token_budget(tokenizer):
    from common.llm import prompt_ids

    conversations = [[{"role": "user", "content": "hello " * words}] for words in (5, 300, 40, 900, 12, 120)]
    prefixes = [f"Ask{k}[" for k in range(6)]
    inner = _Recording(tokenizer)
    whole = inner.chat(conversations, max_tokens=64, prefix=prefixes)
    policy = ecpo.TokenBudget(inner, budget=2000)
    assert policy.chat(conversations, max_tokens=64, prefix=prefixes) == whole  # each answer in its place
    assert policy.choice_probs(conversations, ("Ask", "Search")) == inner.choice_probs(conversations, ("Ask", "Search"))
    for batch, prefix, n, new_tokens in inner.calls[1:-1]:
        longest = max(map(len, prompt_ids(tokenizer, batch, prefix)))
        assert len(batch) * n * (longest + new_tokens) <= 2000 or len(batch) == 1  # a prompt over it goes alone
    assert len(inner.calls) > 4 and policy.split_calls == 2
    # shortest first: [10, 20] pads to 2 x (20 + 10) = 60 tokens; adding 40 would make 3 x 50 = 150
    assert ecpo.token_batches([10, 50, 20, 40], new_tokens=10, budget=100) == [[0, 2], [3], [1]]
    assert ecpo.token_batches([10, 50, 20, 40], new_tokens=10, budget=100, rows_per_prompt=2) == [[0], [2], [3], [1]]
    assert ecpo.token_batches([10, 50, 20, 40], new_tokens=10, budget=0) == [[0, 2, 3, 1]]


def test_the_token_budget_changes_no_record_at_the_demo_defaults(tiny_model, tokenizer, scripted_llm):
    # The demo's batches fit the default budget, so each call goes through whole and every record is the same; a
    # budget that splits them still plays every conversation to the end.
    from ailo_sim import AILO, run_episodes
    from common.catalog import Catalog
    from common.formats import load_demo_catalog
    from common.llm import HFChat

    catalog, tasks, args = Catalog(load_demo_catalog()), load_demo_tasks()[:4], ecpo.Args(action_max_tokens=8)

    def play(budget):
        llm = HFChat(tiny_model, tokenizer, args.batch_size)
        policy = llm if budget is None else ecpo.TokenBudget(llm, budget)
        cra = ecpo.make_actcrs(policy, catalog=catalog, domain="movie", args=args, few_shot=False, stats=ParseStats())
        user = AILO(scripted_llm(_agent_and_user), max_tokens=16)
        episodes = run_episodes(tasks, cra=cra, simulator=user, max_turns=args.max_turns, batch_size=args.batch_size)
        return list(episodes), getattr(policy, "split_calls", 0)

    before, _ = play(None)
    assert play(args.rollout_batch_tokens) == (before, 0)
    split, calls_split = play(400)
    assert calls_split > 0 and [len(t["turns"]) for t in split] == [len(t["turns"]) for t in before]


def test_a_dropped_conversation_is_in_no_stage_of_ecpo(tmp_path, scripted_llm):
    # --leak-guard drop (the paper preset's): the conversation whose user named its target is recorded, played once,
    # and left out of what the rollout and the later stages read.
    from common.catalog import Catalog
    from common.formats import load_demo_catalog

    demo = load_demo_tasks()
    data = ecpo.Data(demo[:2], demo[2:4], [], Catalog(load_demo_catalog()), "movie")
    leaky = demo[0].target.title

    def respond(prompt):
        if leaky in prompt and "Open the conversation" in prompt:
            return '{"reason": "r", "response": "I want ' + leaky + '."}'
        return _agent_and_user(prompt)

    args = ecpo.Args(action_decoding="free", judge_scoring="sampled", max_turns=2, leak_guard="drop")
    run = _Run(tmp_path, scripted_llm(respond))
    assert ecpo.teacher_rollouts(run, args, data)["rollout/teacher_sr"] == 0.0
    records = RecordFile(tmp_path / "teacher_episodes.jsonl").records()
    assert [r["key"] for r in records if r.get("dropped")] == [demo[0].key] and len(records) == 2
    recorded = ecpo.recorded_episodes(run, "teacher_episodes.jsonl", data.sft, "teacher")
    assert [r["key"] for r in recorded] == [demo[1].key]
