import json

import pytest
import torch

from common.tracking import RecordFile, Tracker, seed_everything, wandb_login_at_hand, wandb_mode


def test_record_file_appends_resumes_and_ignores_a_torn_line(tmp_path):
    records = RecordFile(tmp_path / "r.jsonl")
    records.append({"key": "a", "x": 1})
    records.append({"key": "b", "x": 2})
    with open(tmp_path / "r.jsonl", "a") as f:
        f.write('{"key": "c", "x"')  # a run killed mid-write
    again = RecordFile(tmp_path / "r.jsonl")
    assert again.done_keys() == {"a", "b"}
    # the resumed run redoes "c"; its record, and the next, must survive the next reload
    again.append({"key": "c", "x": 3})
    again.append({"key": "d", "x": 4})
    assert RecordFile(tmp_path / "r.jsonl").done_keys() == {"a", "b", "c", "d"}
    assert RecordFile(tmp_path / "r.jsonl").records()[2] == {"key": "c", "x": 3}


def test_tracker_writes_config_and_metrics_on_main_only(tmp_path):
    tracker = Tracker(tmp_path / "run", {"lr": 0.1})
    tracker.log({"train/loss": 1.5}, step=3)
    assert json.loads((tmp_path / "run" / "config.json").read_text()) == {"lr": 0.1}
    line = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert line["step"] == 3 and line["train/loss"] == 1.5
    Tracker(tmp_path / "other", {"lr": 0.1}, is_main=False).log({"train/loss": 1.0}, step=0)
    assert not (tmp_path / "other").exists()


def test_seeding_is_reproducible():
    seed_everything(7)
    a = torch.rand(3)
    seed_everything(7)
    assert torch.equal(a, torch.rand(3))


def test_wandb_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    tracker = Tracker(tmp_path / "run", {"lr": 0.1}, track=True, project="cleancrs-test")
    tracker.log({"eval/sr": 0.5}, step=1)
    tracker.close()
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text())["eval/sr"] == 0.5


def test_track_without_a_login_logs_offline_instead_of_asking(tmp_path, monkeypatch, capsys):
    """Issue 37: the recipes pass --track; where nobody logged in (no key, no netrc) and WANDB_MODE is unset,
    wandb.init asked for a key (or failed on a launched job). The run logs offline, and says so once."""
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    tracker = Tracker(tmp_path / "run", {"lr": 0.1}, track=True, project="cleancrs-test")
    tracker.log({"eval/sr": 0.5}, step=1)
    tracker.close()
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert "W&B: no login here" in capsys.readouterr().out
    (tmp_path / "netrc").write_text("machine api.wandb.ai login user password " + "k" * 40 + "\n")
    (tmp_path / "netrc").chmod(0o600)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert wandb_login_at_hand() and wandb_mode() is None  # a login: W&B's own mode


def test_track_without_wandb_is_a_one_line_error(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed (the stock PyTorch images have none)
    with pytest.raises(SystemExit, match="--track logs to Weights & Biases: `pip install wandb`, or drop --track"):
        Tracker(tmp_path / "run", {"lr": 0.1}, track=True)
