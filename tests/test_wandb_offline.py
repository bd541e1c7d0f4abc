"""--track under WANDB_MODE=offline: the offline run, read back from its transaction log with W&B's own record schema
(wandb.proto; wandb 0.31 ships no Python reader of the log, so the framing is read here: LevelDB log blocks)."""

import struct

import pytest

from common.run import Run

BLOCK, HEADER = 32768, 7  # the log's block size; each record chunk's header: crc32, length, type


def offline_records(run_dir) -> list:
    from wandb.proto import wandb_internal_pb2

    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    data, records, partial, position = path.read_bytes(), [], b"", 7  # 7: the file's ":W&B" magic and version
    while position + HEADER <= len(data):
        if BLOCK - position % BLOCK < HEADER:  # a block's tail too short for a header is padding
            position += BLOCK - position % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + HEADER])
        partial += data[position + HEADER : position + HEADER + length]
        position += HEADER + length
        if kind in (1, 4):  # a whole record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(partial)
            records.append(record)
            partial = b""
    return records


def test_an_offline_run_holds_the_config_tables_curves_and_step_axes(tmp_path, monkeypatch, settings):
    wandb = pytest.importorskip("wandb")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    wandb.teardown()  # wandb keeps the settings of its first use in the process (another test may have disabled it)
    run = Run(
        settings(
            exp_name="ecpo",
            dataset="demo",
            run_name="tracked",
            track=True,
            wandb_group="table1",
            wandb_tags=("demo", "dpo"),
            lam=4.0,
        )
    )
    run.log_step({"train_critic/loss": 2.0}, 1.0)  # a family no script logs: it gets its own axis all the same
    for loss in (0.69, 0.5, 0.4):
        run.log_step({"train/loss": loss}, 1.0)
    run.log({"eval/sr": 0.25})
    run.table("eval_table", ["policy", "sr"], [["pi_sft", 0.0], ["ecpo", 0.25]])
    run.finish(curves={"loss": ["train/loss"]}, bars={"SR": ["eval/sr"]})

    records = offline_records(tmp_path / "runs" / "tracked")
    (header,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    config = {item.key: item.value_json for item in header.config.update}
    assert config["lam"] == "4.0" and config["dataset"] == '"demo"'  # the whole Args
    assert header.run_group == "table1" and list(header.tags) == ["demo", "dpo"]
    rows = [r.history for r in records if r.WhichOneof("record_type") == "history"]
    history = [{i.key or "/".join(i.nested_key): i.value_json for i in row.item} for row in rows]
    losses = [(float(h["train/loss"]), int(h["train/step"])) for h in history if "train/loss" in h]
    assert losses == [(0.69, 1), (0.5, 2), (0.4, 3)]
    logged = {key.split("/")[0] for h in history for key in h}
    assert {"eval_table", "curves"} <= logged  # the table and the learning-curve image
    axes = {r.metric.glob_name: r.metric.step_metric for r in records if r.WhichOneof("record_type") == "metric"}
    assert axes["train/*"] == "train/step" and axes["train_critic/*"] == "train_critic/step"
    assert (tmp_path / "runs" / "tracked" / "curves.png").exists()
