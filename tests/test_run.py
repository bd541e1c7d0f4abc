"""common/run.py: what a stage leaves behind."""

import copy
import json
import weakref

import torch

from common.run import Run
from common.tracking import RecordFile


def test_a_stage_frees_the_models_it_loaded(tmp_path, monkeypatch, tiny_policy, settings):
    # Two things outlived a stage: the hf: weights its roles shared, and every model (and optimizer) accelerate
    # prepared. The next stage then loaded its own models on top (SMTPO's evaluation on top of GRPO's policy).
    monkeypatch.chdir(tmp_path)
    run = Run(settings())
    models = []

    def stage(run):
        user, judge = run.llm(f"hf:{tiny_policy}"), run.llm(f"hf:{tiny_policy}")
        assert user.model is judge.model  # roles on one model share its weights within the stage
        policy = copy.deepcopy(user.model)
        optimizer = torch.optim.AdamW(policy.parameters())
        policy, optimizer = run.accelerator.prepare(policy, optimizer)
        models.extend(weakref.ref(m) for m in (user.model, policy, optimizer))

    run.stage("load", stage)  # and nothing more: the stage collects what it freed
    assert [model() is None for model in models] == [True, True, True]


def test_exchange_returns_an_earlier_launchs_records_then_this_launchs_in_the_order_written(
    tmp_path, monkeypatch, settings
):
    monkeypatch.chdir(tmp_path)
    run = Run(settings())
    earlier = run.records("episodes.jsonl")
    for key in ("a", "b"):
        earlier.append({"key": key, "launch": 1})
    (run.dir / "episodes.jsonl").open("a").write('{"key": "c", "laun')  # a launch killed mid-write
    records = run.records("episodes.jsonl")  # the next launch: "c" is redone, "b" redone as well
    for key in ("d", "c", "b"):
        records.append({"key": key, "launch": 2})
    exchanged = run.exchange(records)
    assert [(r["key"], r["launch"]) for r in exchanged] == [("a", 1), ("d", 2), ("c", 2), ("b", 2)]


def test_each_metric_family_gets_its_own_step_axis_which_a_rerun_continues(tmp_path, monkeypatch, settings):
    monkeypatch.chdir(tmp_path)
    run = Run(settings())
    run.log_step({"train_sft/loss": 1.0}, 1.0)
    run.log_step({"train_sft/loss": 0.5}, 1.0)
    run.log_step({"train/loss": 0.7, "rollout/return": 2.0}, 1.0)
    rerun = Run(settings())  # the same run name: it resumes
    rerun.log_step({"train/loss": 0.6}, 1.0)
    rows = [json.loads(line) for line in (tmp_path / "runs" / "stages" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r.get("train_sft/step"), r.get("train/step"), r.get("rollout/step")) for r in rows] == [
        (1, 1, None, None),
        (2, 2, None, None),
        (3, None, 1, 1),
        (5, None, 2, None),  # a rerun logs after the last step (W&B), its families count on
    ]


def test_the_default_run_name_is_cleanrls_with_the_dataset(tmp_path, monkeypatch, settings):
    monkeypatch.chdir(tmp_path)
    run = Run(settings(run_name=None, dataset="inspired"))
    method, dataset, seed, stamp = run.dir.name.split("__")
    assert (method, dataset, seed) == ("run", "inspired", "1") and stamp.isdigit()


def test_map_redoes_nothing_finished_and_loses_nothing_to_a_kill(tmp_path, monkeypatch, settings):
    monkeypatch.chdir(tmp_path)
    run = Run(settings())
    items = [{"key": k, "x": x} for k, x in zip("abcd", range(4))]
    seen = []

    def square(todo, fail_after=None):
        for n, item in enumerate(todo):
            if n == fail_after:
                raise KeyboardInterrupt  # a launch killed while it worked on its third item
            seen.append(item["key"])
            yield {"key": item["key"], "y": item["x"] ** 2}

    try:
        run.map("squares.jsonl", items, lambda todo: square(todo, fail_after=2))
    except KeyboardInterrupt:
        pass
    assert seen == ["a", "b"] and run.records("squares.jsonl").done_keys() == {"a", "b"}
    rerun = Run(settings())
    records = rerun.map("squares.jsonl", items[::-1], square)  # asked in another order: the file's order, then new
    assert seen == ["a", "b", "d", "c"]
    assert [(r["key"], r["y"]) for r in records] == [("a", 0), ("b", 1), ("d", 9), ("c", 4)]
    assert [r["key"] for r in rerun.map("squares.jsonl", items[1:2], square)] == ["b"]  # only the items asked for
    assert seen == ["a", "b", "d", "c"]  # nothing left to do: work is not called


def test_log_step_pools_sums_and_ratios_and_prints_its_line(tmp_path, monkeypatch, capsys, settings):
    monkeypatch.chdir(tmp_path)
    run = Run(settings())
    logged = run.log_step({"train/lr": 0.1}, 1.0, sums={"train/loss": 0.5, "train/entropy": (3.0, 4.0)}, show="step 1")
    assert logged == {"train/lr": 0.1, "train/loss": 0.5, "train/entropy": 0.75}
    assert "step 1: lr 0.1  loss 0.5  entropy 0.75" in capsys.readouterr().out
    row = json.loads((tmp_path / "runs" / "stages" / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["train/entropy"] == 0.75 and row["train/step"] == 1


def test_map_every_rank_enters_the_gather_whether_or_not_it_has_work(tmp_path, monkeypatch, settings):
    # every_rank: the ranks agree through a gather whether any has work left; a rank with work of its own that skipped
    # it left the others waiting in it (the collective entered by some ranks only)
    monkeypatch.chdir(tmp_path)
    run, gathered = Run(settings()), []
    run.gather = lambda items: gathered.append(list(items)) or list(items)
    records = run.map("ones.jsonl", [{"key": "a"}], lambda todo: ({"key": i["key"]} for i in todo), every_rank=True)
    run.map("ones.jsonl", [{"key": "a"}], lambda todo: iter(()), every_rank=True)  # nothing left to do: it agrees so
    assert [r["key"] for r in records] == ["a"] and [g for g in gathered if g in ([True], [False])] == [[True], [False]]


def test_map_reads_its_file_once_a_launch_however_many_rounds_it_maps(tmp_path, monkeypatch, settings):
    # GRPO maps one round of episodes at a time into one file that grows all run: reading the whole file back every
    # round (as Run.map did, twice) costs the square of the run's length at the recipe's scale
    monkeypatch.chdir(tmp_path)
    reads = []
    real_records = RecordFile.records
    monkeypatch.setattr(RecordFile, "records", lambda self: reads.append(self.path.name) or real_records(self))
    run = Run(settings())
    run.records("rounds.jsonl").append({"key": "r0", "y": 0})  # an earlier launch's record
    for round_ in range(1, 6):
        records = run.map("rounds.jsonl", [{"key": f"r{round_}"}], lambda todo: ({"key": i["key"]} for i in todo))
        assert [r["key"] for r in records] == [f"r{round_}"]
    assert reads.count("rounds.jsonl") == 1
    assert [r["key"] for r in run.map("rounds.jsonl", [{"key": f"r{k}"} for k in range(6)], iter)] == [
        f"r{k}" for k in range(6)
    ]  # what earlier rounds and launches recorded, in file order, and nothing redone
    assert reads.count("rounds.jsonl") == 1
