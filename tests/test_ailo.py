import json
import re

import pytest

from ailo_sim import (
    AILO,
    CRAReply,
    episode_metrics,
    leaks_title,
    load_task_items,
    load_tasks,
    make_scripted_cra,
    max_rouge_l,
    parse_ec,
    parse_persona,
    parse_policy,
    rouge_l,
    run_episodes,
)
from common.catalog import Catalog
from common.formats import Item, Persona, Task, load_demo_tasks
from common.metrics import mentions_title, redact_title
from common.run import Run


def _task(title="Jaws (1975)", activities="Efficiency-seeking user who wants one pick."):
    return Task(
        key=f"t-{title}",
        persona=Persona("u", activities, "sea thrillers", {"Tone": "dry"}),
        target=Item("1", title, {"genre": ["thriller"]}),
    )


def script(policy="respond_to_clarification", response="I want something tense at sea.", rating="4"):
    """A simulator LLM that answers each AILO sub-step in its JSON format. ``{target}`` in ``response`` is
    replaced by the title the prompt hides (a user that leaks its own target)."""

    def respond(prompt):
        target = re.search(r"secretly looking for: ([^;\n]+)", prompt)
        if "Choose how to respond next" in prompt:
            return json.dumps({"reason": "r", "policy": policy})
        if prompt.startswith("You are a user simulator"):
            return json.dumps({"reason": "coherent", "rating": rating})
        return json.dumps({"reason": "r", "response": response.format(target=target.group(1) if target else "")})

    return respond


def echo_cra(text="Have you seen Jaws (1975)?", retrieved=("Jaws (1975)",)):
    return lambda keys, histories: [CRAReply(text, list(retrieved)) for _ in keys]


def play(tasks, cra, simulator, max_turns, batch_size=16):
    """Every episode ``run_episodes`` yields, in the order they finish."""
    return list(run_episodes(tasks, cra=cra, simulator=simulator, max_turns=max_turns, batch_size=batch_size))


def test_title_guard_forms():
    assert leaks_title("I loved JAWS as a kid", "Jaws (1975)")
    assert not leaks_title("jawsome day", "Jaws (1975)")
    assert leaks_title(
        "like the Killer Clown Calamity", "The Killer Clown Calamity (A Charlie Rhodes Cozy Mystery Book 7)"
    )
    assert leaks_title("Jaws! That is the one I mean.", "Jaws (1975)")  # a sentence's first word, for the guard
    assert not leaks_title("I would like it to be scary", "It (2017)")  # was redacted to "like that one to be"
    assert redact_title("I would like it to be scary", "It (2017)") == "I would like it to be scary"
    # a real opening the guard let through on ECPO Book: the name, then its own subtitle cut short (issue 26)
    opening = "I'm excited to introduce you to the world of Witch at Heart: the Jinx Hamilton Series, a magical"
    target = "Witch at Heart: The Jinx Hamilton Series - Book 1"
    assert leaks_title(opening, target)
    assert not leaks_title(redact_title(opening, target), target)


def test_target_title_never_reaches_the_cra(scripted_llm):
    llm = scripted_llm(script(response="Honestly I just want {target}, the one I loved."))
    simulator = AILO(llm, max_leak_tries=2)
    seen = []

    def cra(keys, histories):
        seen.extend(m["content"] for h in histories for m in h if m["role"] == "user")
        return [CRAReply("What do you like?") for _ in keys]

    episodes = play([_task(), _task("The Godfather (1972)")], cra, simulator, max_turns=2)
    utterances = seen + [e["opening"]["user"] for e in episodes] + [u["user"] for e in episodes for u in e["turns"]]
    assert utterances and not any(re.search("jaws|godfather", u, re.IGNORECASE) for u in utterances)
    assert simulator.title_leaks > 0 and simulator.title_redactions == simulator.title_leaks
    # 2 users x 2 content steps (opening, turn 1; nobody replies to the final turn), each asked once and then
    # regenerated max_leak_tries times before the redaction
    assert sum("Never say its name" in p for p in llm.prompts) == 2 * 2 * (1 + 2)


def test_one_batched_call_per_substep(scripted_llm):
    class Counting:
        def __init__(self, inner):
            self.inner, self.batches, self.usage = inner, [], inner.usage

        def chat(self, conversations, **kw):
            self.batches.append(len(conversations))
            return self.inner.chat(conversations, **kw)

    llm = Counting(scripted_llm(script()))
    tasks = [_task(f"Film {i} (2000)") for i in range(5)]
    play(tasks, echo_cra("Tell me more."), AILO(llm), max_turns=2, batch_size=5)
    # opening content, then turn 1: EC + policy + content; turn 2 (final) is neither answered nor rated, as in the
    # paper's released simulator loop
    assert llm.batches == [5, 5, 5, 5]


def test_harness_scores_sr_r_and_ratings(scripted_llm):
    llm = scripted_llm(script(policy="end_conversation", rating="5"))
    tasks = [_task("Jaws (1975)"), _task("Alien (1979)")]
    episodes = play(tasks, echo_cra(), AILO(llm), max_turns=3)
    jaws, alien = episodes
    assert jaws["success"] and jaws["recall"] and not alien["success"] and not alien["recall"]
    assert jaws["num_turns"] == 1 and jaws["ended_by_user"]  # the user chose end_conversation
    assert jaws["turns"][0]["ec_rating"] == 5 and jaws["turns"][0]["user_policy"] == "end_conversation"
    metrics = episode_metrics(episodes, 3)
    assert metrics["eval/sr"] == 0.5 and metrics["eval/recall"] == 0.5 and metrics["rollout/ec_rating_turn1"] == 5


def test_unparseable_simulator_output_never_kills_a_run(scripted_llm):
    llm = scripted_llm(lambda prompt: "The user is looking for a movie for tonight.")
    simulator = AILO(llm, max_parse_tries=2)
    episodes = play([_task()], echo_cra("Any genre?", ()), simulator, max_turns=2)
    turns = episodes[0]["turns"]
    assert len(turns) == 2 and turns[0]["ec_rating"] is None and turns[0]["user"]
    assert simulator.stats.failures > 0 and simulator.stats.retries == simulator.stats.failures
    assert episode_metrics(episodes, 2)["rollout/ec_rating_missing"] == 2


def test_resume_skips_finished_episodes(tmp_path, monkeypatch, scripted_llm, settings):
    monkeypatch.chdir(tmp_path)
    run, tasks = Run(settings()), load_demo_tasks()[:3]

    def episodes(tasks, llm):  # the stages' resumable record of the episodes as they finish (common/run.py)
        return run.map("episodes.jsonl", tasks, lambda todo: play(todo, echo_cra(), AILO(llm), max_turns=1))

    first = episodes(tasks[:2], scripted_llm(script()))
    llm = scripted_llm(script())
    second = episodes(tasks, llm)
    assert second[:2] == first and len(second) == 3 and len(run.records("episodes.jsonl").records()) == 3
    assert len(llm.prompts) == 1  # only the third task ran: its opening (the final turn is not rated)


def test_an_episode_is_yielded_as_soon_as_it_finishes(scripted_llm):
    # run.map records each episode as the harness yields it: one that ended is on disk while the others go on
    def respond(prompt):
        ends = "Jaws" in prompt and "Choose how to respond next" in prompt
        return script(policy="end_conversation" if ends else "respond_to_clarification")(prompt)

    turns = []

    def cra(keys, histories):
        turns.append(keys)
        return [CRAReply("What do you like?") for _ in keys]

    episodes = run_episodes([_task("Jaws (1975)"), _task("Alien (1979)")], cra=cra,
                            simulator=AILO(scripted_llm(respond)), max_turns=3)  # fmt: skip
    first = next(episodes)
    assert first["target"] == "Jaws (1975)" and first["ended_by_user"] and len(turns) == 1
    (second,) = list(episodes)
    assert second["target"] == "Alien (1979)" and second["num_turns"] == 3 and len(turns) == 3


def test_parsers_on_simulator_outputs():
    assert parse_policy('{"reason": "asked", "policy": "end_conversation"}') == "end_conversation"
    assert parse_policy("I will respond_to_clarification now") == "respond_to_clarification"
    assert parse_policy("The user is looking for a movie.") is None
    assert parse_ec('{"reason": "<reason for the rating>", "rating": "0"}') is None  # echoed template
    assert parse_ec('{"reason": "Rigid.", "rating": "<Final rating from 0 to 5 >"}') is None
    assert parse_ec('```json\n{"reason": "Good guidance.", "rating": "4"}\n```') == ("Good guidance.", 4)
    persona = parse_persona(
        '{"Activities": "A detail-oriented user who reads reviews.", "Interests": ["mystery", "humor"],'
        ' "Language": {"Tone": "warm"}, "Orientations": "quality"}',
        "u1",
    )
    assert persona.interests == "mystery, humor" and persona.language == {"Tone": "warm"}
    assert parse_persona('{"Activities": "Likes books."}', "u1") is None  # no activity type


def test_rouge_l_hand_computed():
    # LCS("a b c d", "a c d e") = "a c d" -> P = R = 3/4
    assert rouge_l("a b c d".split(), "a c d e".split()) == pytest.approx(0.75)
    assert rouge_l([], ["a"]) == 0.0
    personas = [Persona("1", "a b c d"), Persona("2", "a c d e"), Persona("3", "x y z w")]
    assert max_rouge_l(personas) == pytest.approx([0.75, 0.75, 0.0])


def test_ec_falls_back_to_the_expected_rating_on_a_local_backend(scripted_llm):
    from ailo_sim import AILO, SimUser
    from common.formats import Item, Persona, Task

    class PrefillLLM(scripted_llm):
        can_prefill = True

        def chat(self, conversations, n=1, temperature=0.0, max_tokens=256, stop=None, prefix=""):
            if prefix:  # the constrained reason
                return [["coherent, but it gives no guidance"] for _ in conversations]
            return super().chat(conversations, n, temperature, max_tokens, stop)

        def choice_probs(self, conversations, choices=("Yes", "No"), prefix=""):
            assert len(prefix) == len(conversations)
            assert all(p.endswith('"rating": "') and "no guidance" in p for p in prefix)
            return [{"0": 0.0, "1": 0.0, "2": 0.0, "3": 0.2, "4": 0.0, "5": 0.3}] * len(conversations)

    llm = PrefillLLM(lambda prompt: "I think the system did fine.")  # never JSON
    simulator = AILO(llm, max_parse_tries=1)
    user = SimUser(
        Task("t", Persona("u", "Efficiency-seeking user.", "films", {}, ""), Item("1", "Heat (1995)", {})),
        history=[{"role": "user", "content": "hi"}],
    )
    user.history.append({"role": "assistant", "content": "What genre?"})
    (ec,) = simulator.expectation_confirmation([user])
    assert ec.reason == "coherent, but it gives no guidance"
    assert ec.rating == 5 and ec.expected == pytest.approx(4.2)  # the rating it writes, not floor((3*.2 + 5*.3)/.5)
    assert simulator.metrics()["rollout/ec_constrained"] == 1 and simulator.stats.failures == 1


@pytest.mark.parametrize("target_note", [False, True])
def test_the_target_note_is_off_unless_asked_for(scripted_llm, target_note):
    llm = scripted_llm(script())
    play([_task()], echo_cra(), AILO(llm, target_note=target_note), max_turns=2)
    notes = [p for p in llm.prompts if "recommend your target" in p]
    assert bool(notes) == target_note  # by default the user is never told what SR measures
    assert all("DID recommend your target" in p for p in notes)  # the CRA named Jaws (1975) each turn


def test_the_leak_audit_finds_a_planted_leak_and_strict_exits_non_zero(tmp_path):
    from ailo_sim import audit_leaks
    from tests.conftest import run_script

    run_dir = tmp_path / "runs" / "planted"
    run_dir.mkdir(parents=True)
    episodes = [
        {"key": "a", "target": "The Godfather (1972)", "opening": {"user": "A crime saga, please."},
         "turns": [{"user": "I'm particularly interested in the Godfather trilogy, ...", "user_guard": "clean"},
                   {"user": "Something with that one's family drama.", "user_guard": "redacted"}]},
        {"key": "b", "target": "It (2017)", "opening": {"user": "I would like it to be scary"}, "turns": []},
    ]  # fmt: skip
    lines = [json.dumps(e) for e in episodes] + ['{"key": "c", "tar']  # and a torn last line
    (run_dir / "forward_episodes.jsonl").write_text("\n".join(lines) + "\n")
    (run_dir / "metrics.jsonl").write_text('{"step": 0}\n')  # no target: not an episode file's record
    smtpo_eval = {"key": "d", "target": "Jaws (1975)", "turns": [{"turn": 1, "feedback": ""},
                  {"turn": 2, "feedback": "Closer. Something like Jaws, with a shark."}]}  # fmt: skip
    (run_dir / "eval_smtpo.jsonl").write_text(json.dumps(smtpo_eval) + "\n")  # SMTPO's simulator feedback
    metrics, leaks = audit_leaks(run_dir)
    assert metrics == {"rollout/user_turns_audited": 5, "rollout/title_leaks": 2, "rollout/title_redacted_turns": 1,
                       "rollout/episodes_dropped": 0}  # fmt: skip
    assert [(leak["file"], leak["line"], leak["target"]) for leak in leaks] == [
        ("eval_smtpo.jsonl", 1, "Jaws (1975)"),
        ("forward_episodes.jsonl", 1, "The Godfather (1972)"),
    ]
    (run_dir / "eval_smtpo.jsonl").unlink()
    lenient = run_script("ailo_sim.py", "--audit", str(run_dir), cwd=tmp_path, check=False)
    strict = run_script("ailo_sim.py", "--audit", str(run_dir), "--strict", cwd=tmp_path, check=False)
    assert lenient.returncode == 0 and strict.returncode == 1
    assert "4 simulated user turns, 1 name their target, 1 redacted" in strict.stdout
    assert "forward_episodes.jsonl:1 (target The Godfather (1972))" in strict.stdout


def test_the_guard_lets_the_user_name_its_target_once_the_system_has(scripted_llm):
    # The released loop checks the user's input only while the CRA has not named the target (`not is_correct`):
    # "Yes, Jaws is the one" answers a success. Before, it was regenerated twice and then redacted.
    llm = scripted_llm(script(response="Yes, {target} is exactly the one I wanted!"))
    simulator = AILO(llm, max_leak_tries=2)
    episodes = play([_task()], echo_cra("Have you seen Jaws (1975)?"), simulator, max_turns=2)
    opening, (first, _) = episodes[0]["opening"], episodes[0]["turns"]
    assert opening["user_guard"] == "redacted" and not leaks_title(opening["user"], "Jaws (1975)")  # still guarded
    assert first["user"] == "Yes, Jaws (1975) is exactly the one I wanted!" and first["user_guard"] == "clean"
    assert simulator.title_leaks == 1  # the opening only


def test_drop_leaves_out_a_conversation_whose_user_named_its_target(tmp_path, monkeypatch, scripted_llm, settings):
    # --leak-guard drop, the released main.py's: the conversation whose user names its target before the system has
    # ends there and is not counted, the utterance never reaches the CRA, and a rerun does not play it again.
    from ailo_sim import audit_leaks, kept

    def respond(prompt):  # the user hunting Jaws gives its target away when asked to clarify; the other never does
        leaky = "Jaws" in prompt and "Answer the system's question" in prompt
        return script(response="I want {target}." if leaky else "Something tense.")(prompt)

    seen = []

    def cra(keys, histories):
        seen.extend(m["content"] for h in histories for m in h if m["role"] == "user")
        return [CRAReply("Do you want it set at sea?") for _ in keys]

    monkeypatch.chdir(tmp_path)
    run, tasks = Run(settings()), [_task("Jaws (1975)"), _task("Alien (1979)")]

    def episodes(llm):
        return kept(run.map("episodes.jsonl", tasks, lambda todo: play(todo, cra, AILO(llm, leak_guard="drop"), 3)))

    returned = episodes(scripted_llm(respond))
    assert [e["target"] for e in returned] == ["Alien (1979)"] and not any("Jaws" in u for u in seen)
    records = run.records("episodes.jsonl")
    (jaws,) = [r for r in records.records() if r["target"] == "Jaws (1975)"]
    assert jaws["dropped"] == {"turn": 1, "user": "I want Jaws (1975)."} and jaws["turns"][0]["user"] == ""
    assert jaws["turns"][0]["user_guard"] == "dropped" and len(jaws["turns"]) == 1
    assert kept(records.records()) == returned and episode_metrics(returned, 3)["rollout/episodes"] == 1
    metrics, leaks = audit_leaks(run.dir)
    assert metrics["rollout/episodes_dropped"] == 1 and metrics["rollout/title_leaks"] == 0 and not leaks
    again = scripted_llm(respond)
    assert episodes(again) == returned
    assert again.prompts == []  # both finished: the dropped one is not played again


def test_the_audit_counts_no_leak_after_the_system_named_the_target(tmp_path):
    from ailo_sim import audit_leaks

    record = {"key": "a", "target": "Jaws (1975)", "opening": {"user": "A film set at sea?"},
              "turns": [{"system": "Ask[Sharks?]", "user": "Jaws! I mean, yes, sharks."},
                        {"system": "Recommend[Jaws (1975)]", "user": "Jaws it is, thanks!"}]}  # fmt: skip
    (tmp_path / "forward_episodes.jsonl").write_text(json.dumps(record) + "\n")
    metrics, leaks = audit_leaks(tmp_path)
    assert metrics["rollout/user_turns_audited"] == 3  # the last turn's "Jaws it is" answers the recommendation
    assert [leak["user"] for leak in leaks] == ["Jaws! I mean, yes, sharks."]


def test_the_scripted_cras_name_the_target_every_turn_or_never():
    tasks = load_tasks("demo", "", "train")
    catalog = Catalog(load_task_items("demo", "", tasks))
    keys = [t.key for t in tasks]
    turns = [[{"role": "user", "content": "hi"}] + [{"role": "assistant", "content": "x"}] * n for n in range(3)]
    for names_target in (True, False):
        cra = make_scripted_cra(tasks, catalog=catalog, names_target=names_target, seed=1)
        for history in turns:
            replies = cra(keys, [history] * len(keys))
            for task, reply in zip(tasks, replies):
                assert mentions_title(reply.text, task.target.title) == names_target, reply.text
                assert reply.retrieved[0] in reply.text and reply.retrieved[0] in catalog.by_title
    never = make_scripted_cra(tasks, catalog=catalog, names_target=False, seed=1)
    first, second = (never(keys, [h] * len(keys)) for h in turns[:2])
    assert [r.text for r in first] == [r.text for r in never(keys, [turns[0]] * len(keys))]  # the same draw again
    assert [r.text for r in first] != [r.text for r in second]  # another item the next turn
