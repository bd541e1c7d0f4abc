"""benchmark/'s effects runs: the paired table every one prints, what each reads from its run's records (checked
against the script's own metric on the same records), and each command accepted by its script on the real data
(a dry run: flags, batch divisions and data files, no model)."""

import importlib
import json
import subprocess
import sys

import pytest

from tests.conftest import DATA, ROOT, needs_data

sys.path.insert(0, str(ROOT / "benchmark"))
from effects import paired_table  # noqa: E402

EFFECTS = ["ailo_ec_separation", "smtpo_effects", "ecpo_effects", "rso_effects", "grsu_effects"]


def test_the_paired_table_compares_the_units_both_systems_have():
    found = {
        "a": {"u1": {"sr": 1.0}, "u2": {"sr": 1.0}, "u3": {"sr": 0.0}, "only_a": {"sr": 1.0}},
        "b": {"u1": {"sr": 0.0}, "u2": {"sr": 1.0}, "u3": {"sr": 0.0}},
    }
    table = paired_table(found, [("a", "b")], "dialogue")
    assert table.splitlines()[0] == "3 dialogues measured for all of: a, b"
    row = table.splitlines()[-1]
    # a: 2/3, b: 1/3; the differences (1, 0, 0): every resample's mean lies in [0, 1]
    assert row.startswith("| sr | 0.667 | 0.333 | +0.333 [+0.000, +")
    with pytest.raises(SystemExit, match="no dialogue was measured for all of a, b"):
        paired_table({"a": {"u1": {"sr": 1.0}}, "b": {"u2": {"sr": 0.0}}}, [("a", "b")], "dialogue")


def test_ecpos_per_task_win_rate_is_the_scripts_win_rate(tmp_path):
    import ecpo

    judgements = [
        {"key": "eval|t1|ab", "label": "eval", "order": "ab", "scores": {"final": 0.5}},
        {"key": "eval|t1|ba", "label": "eval", "order": "ba", "scores": {"final": -0.2}},
        {"key": "eval|t2|ab", "label": "eval", "order": "ab", "scores": {"final": -1.0}},
        {"key": "eval|t2|ba", "label": "eval", "order": "ba", "scores": {}},  # a failed judgement
        {"key": "eval_sft|t1|ab", "label": "eval_sft", "order": "ab", "scores": {"final": 1.0}},
    ]
    (tmp_path / "judgements.jsonl").write_text("".join(json.dumps(j) + "\n" for j in judgements))
    episodes = [{"key": k, "success": k == "t1", "recall": True} for k in ("t1", "t2")]
    (tmp_path / "eval_ecpo.jsonl").write_text("".join(json.dumps(e) + "\n" for e in episodes))
    found = importlib.import_module("ecpo_effects").per_task(tmp_path, "eval", "eval_ecpo.jsonl")
    assert found["t1"] == {"SR": 1.0, "R": 1.0, "win rate": pytest.approx(ecpo.win_rate([0.5], [-0.2]))}
    assert found["t2"]["win rate"] == pytest.approx(ecpo.win_rate([-1.0], []))


def test_smtpo_and_grsu_per_dialogue_values_average_the_scripts_own_metrics(tmp_path):
    import grsu
    import smtpo

    catalog = [f"Film {k}" for k in range(12)]
    records = [  # two contexts of dialogue d1, one of d2: the target at rank 3, at rank 11 (outside the top 10), absent
        {"key": "d1:2", "target": "Film 2", "turns": [{"ranked": catalog, "candidates": catalog, "fallback": False}]},
        {"key": "d1:4", "target": "Film 11", "turns": [{"ranked": catalog, "candidates": catalog, "fallback": True}]},
        {"key": "d2:3", "target": "Film 99", "turns": [{"ranked": catalog, "candidates": catalog, "fallback": False}]},
    ]
    (tmp_path / "eval_sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    found = importlib.import_module("smtpo_effects").per_dialogue(tmp_path / "eval_sft.jsonl", 1)
    by_context = [smtpo.turn_scores([r], 1)["recall@10"] for r in records]
    assert by_context == [1.0, 0.0, 0.0]
    assert found["d1"]["turn1/recall@10"] == 0.5 and found["d2"]["turn1/recall@10"] == 0.0
    assert found["d1"]["names_a_candidate"] == 0.5

    searched = [{"key": "d1:2", "labels": ["Film 2", "Film 11"], "mentioned": [], "ranked": catalog, "zero_shot": []}]
    (tmp_path / "search_beam.jsonl").write_text(json.dumps(searched[0]) + "\n")
    found = importlib.import_module("grsu_effects").per_dialogue(tmp_path / "search_beam.jsonl", "ranked")
    expected = grsu.ranking_metrics(searched, "ranked", ks=(10, 50), prefix="eval")
    assert (
        found["d1"]
        == {"recall@10": expected["eval/recall@10"], "recall@50": expected["eval/recall@50"]}
        == {
            "recall@10": 0.5,
            "recall@50": 1.0,
        }
    )


@needs_data("inspired", "ecpo/Book")
@pytest.mark.parametrize("name", EFFECTS)
def test_each_effects_command_is_accepted_by_its_script_on_the_real_data(name, tmp_path):
    module = importlib.import_module(name)
    args = module.Args(data_dir=str(DATA))
    command = [sys.executable, str(ROOT / module.SCRIPT), *module.flags(args), "--dry-run", "1"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "dry run of" in result.stdout
