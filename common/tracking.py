"""Run directory, seeding, metrics (local JSONL always, W&B with --track), resumable record files."""

from __future__ import annotations

import json
import netrc
import os
import random
import time
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """The one place a run is seeded: python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def default_run_name(method: str, dataset: str, seed: int) -> str:
    """CleanRL's run name, with the dataset: <method>__<dataset>__<seed>__<unix time>."""
    return f"{method}__{dataset}__{seed}__{int(time.time())}"


def wandb_login_at_hand() -> bool:
    """Whether W&B can log in without asking anyone: WANDB_API_KEY, WANDB_IDENTITY_TOKEN_FILE, or an entry for the W&B
    host (WANDB_BASE_URL's, default api.wandb.ai) in the netrc file ($NETRC or ~/.netrc) that `wandb login` writes."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0].split(":")[0]
    try:
        return netrc.netrc(os.environ.get("NETRC") or None).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_mode() -> str | None:
    """The mode ``--track`` opens W&B in: WANDB_MODE's, or W&B's own (online) where a login is at hand, else offline,
    said once: wandb.init would otherwise ask for an API key (no one answers a launched job) or fail."""
    if os.environ.get("WANDB_MODE") or wandb_login_at_hand():
        return None
    print(
        "W&B: no login here (WANDB_API_KEY, or a `wandb login` entry in ~/.netrc) and WANDB_MODE is unset: logging "
        "offline under runs/<run>/wandb/ (`wandb sync` it where you can log in; WANDB_MODE=online insists)"
    )
    return "offline"


class Tracker:
    """Logs metrics to ``runs/<run_name>/metrics.jsonl`` and, with ``track=True``, to W&B.

    Only the main process (rank 0 under accelerate) writes; other ranks get a silent tracker.
    W&B honours WANDB_MODE; without it and without a login, the run logs offline (``wandb_mode``). Without wandb
    installed, ``track=True`` stops the run at once with a one-line error.
    """

    def __init__(
        self,
        run_dir: str | Path,
        config: Any,
        track: bool = False,
        project: str = "cleancrs",
        entity: str | None = None,
        is_main: bool = True,
        group: str | None = None,
        tags: tuple[str, ...] = (),
    ):
        self.run_dir = Path(run_dir)
        self.is_main = is_main
        self.wandb = None
        self.axes: set[str] = set()  # the metric families given their own step axis in W&B
        if not is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        config = asdict(config) if is_dataclass(config) else dict(config)
        (self.run_dir / "config.json").write_text(json.dumps(config, indent=2, default=str))
        if track:
            try:
                import wandb
            except ImportError:
                raise SystemExit(
                    "error: --track logs to Weights & Biases: `pip install wandb`, or drop --track"
                ) from None

            self.wandb = wandb.init(
                mode=wandb_mode(),
                project=project,
                entity=entity,
                group=group,
                tags=list(tags),
                name=self.run_dir.name,
                config=config,  # the whole Args
                dir=str(self.run_dir),
                resume="allow",
                id=self.run_dir.name.replace("/", "_"),
                save_code=True,
            )

    def log(self, metrics: dict[str, float], step: int) -> None:
        if not self.is_main:
            return
        with (self.run_dir / "metrics.jsonl").open("a") as f:
            f.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")
        if self.wandb is not None:
            # Each metric family that logs its own step (<family>/step, beside it) runs on that axis, so that the
            # curves of two methods overlay in W&B whatever else each run logged before
            for name in metrics:
                family = name.removesuffix("/step")
                if name.endswith("/step") and family not in self.axes:
                    self.axes.add(family)
                    self.wandb.define_metric(name)
                    self.wandb.define_metric(f"{family}/*", step_metric=name)
            self.wandb.log(metrics, step=step)

    def image(self, name: str, path: Path, step: int) -> None:
        if self.wandb is not None:
            import wandb

            self.wandb.log({name: wandb.Image(str(path))}, step=step)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


class RecordFile:
    """Append-only JSON Lines file keyed by ``record[key]``, so that a rerun skips finished work.

    Each record is written with one ``write`` on an O_APPEND descriptor and flushed, so several ranks can
    append to one file, and a run killed mid-way keeps every record it finished. A torn last line (from a
    kill during the write) is ignored on reload and the record is redone; this process's first record starts on a
    new line after it, so it is not glued onto the torn one and lost with it. ``appended`` keeps what this process
    wrote, in order: ranks exchange those (``Run.exchange``), never reading each other's from the file.
    """

    def __init__(self, path: str | Path, key: str = "key"):
        self.path, self.key = Path(path), key
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.appended: list[dict] = []
        self._after_torn_line = None

    def records(self) -> list[dict]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def done_keys(self) -> set:
        return {r[self.key] for r in self.records() if self.key in r}

    def append(self, record: dict) -> None:
        data = (json.dumps(record, ensure_ascii=False, default=str) + "\n").encode("utf-8")
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            if self._after_torn_line is None:  # only a kill in an earlier launch tears a line: look once
                size = os.fstat(fd).st_size
                self._after_torn_line = size > 0 and os.pread(fd, 1, size - 1) != b"\n"
                # another rank may add the same newline: an empty line, which reloading skips
                data = b"\n" + data if self._after_torn_line else data
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        self.appended.append(record)
