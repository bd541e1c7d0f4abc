"""A run: its folder ``runs/<run_name>/``, its ranks, and the bookkeeping that every stage of every method shares,
so that a method's stages can be plain functions that read like the paper.

    run = Run(args)                                   # accelerator, seeding, run folder, metrics.jsonl (+ W&B)
    run.stage("forward", forward, args, tasks)        # forward(run, args, tasks), skipped unless "forward" is in
                                                      # args.stages; timed; its LLM calls and tokens, summed over
                                                      # ranks, appended to costs.jsonl
    ...inside a stage...
    done = run.map("forward.jsonl", tasks, play)      # resumable, sharded work: play(todo) yields a record per
                                                      # task as it finishes, appended at once; a rerun skips what
                                                      # is recorded; every rank's records, on every rank
    records = run.records("forward.jsonl")            # the record file itself: append-only, keyed
    mine = run.shard(tasks)                           # this rank's share
    everything = run.exchange(records)                # every rank's records, on every rank (gather_object)
    llm = run.llm(args.user_llm)                      # a backend whose usage the stage's cost row counts; roles
                                                      # on one hf: model share it until the stage ends
    if run.finished("sft_adapter"): return            # a stage whose result is a folder is done once it is saved
    run.save_dataset("d_pre", rows)                   # training data as a Hugging Face dataset, TRL's columns
    run.log({...})                                    # at run.step
    run.log_step({...}, seconds, sums={...}, show="sft step 3/8")  # a training step's curve point, each family
                                                      # on its own axis; sums pooled over ranks; rank 0 prints it
    run.count({...})                                  # counters, summed over ranks by run.finish
    run.log(run.costs())                              # cost/llm_calls, cost/tokens over every stage so far
    run.finish(print_table, CURVES, BARS)             # one summary row with everything, printed; curves.png

Every stage logs ``perf/<stage>_seconds``, ``perf/<stage>_tokens_per_s`` (generated tokens, all ranks) and
``perf/<stage>_peak_memory_gb`` (the largest rank); a stage whose roles ran on the hf backend also what it computed:
``perf/<stage>_prefill_tokens`` (prompt tokens run), ``_decode_tokens`` (tokens generated), ``_prefix_cached_tokens``
(prompt tokens read from the prefix cache instead) and ``_prefix_hit_rate`` (their share of the prompt tokens). The
summary row (the last line of metrics.jsonl) holds every metric the run logged outside the training curves, so one
line describes the run.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import torch
from tqdm import tqdm

from common.distributed import make_accelerator
from common.llm import make_llm, release_models
from common.plots import draw_run
from common.tracking import RecordFile, Tracker, default_run_name, seed_everything


def reset_peak_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    else:
        try:  # "5" resets the process's peak resident set size (Linux)
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass


def peak_memory_gb() -> float:
    """Peak GPU memory allocated by torch, or on CPU the peak resident set size, since the last reset."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    try:
        return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 2**20
    except (OSError, AttributeError):
        return float("nan")


def sft_row(prompt: str, completion: str) -> dict:
    """An SFT example in TRL's conversational ``messages`` column."""
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]}


def item_key(item) -> str:
    """An item's key for ``Run.map``: its ``key`` attribute, or its "key" entry."""
    return item["key"] if isinstance(item, dict) else item.key


class Run:
    def __init__(self, args):
        from accelerate.utils import broadcast_object_list

        self.accelerator = make_accelerator()
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        self.main, self.device = self.accelerator.is_main_process, self.accelerator.device
        names = [args.run_name or default_run_name(args.exp_name, getattr(args, "dataset", "demo"), args.seed)]
        if self.world > 1:  # the default name holds a time stamp: every rank takes rank 0's
            broadcast_object_list(names)
        args.run_name = names[0]
        self.dir = Path("runs") / args.run_name
        self.stages = tuple(getattr(args, "stages", ()))
        self.seed = args.seed
        seed_everything(args.seed + self.rank)
        self.tracker = Tracker(
            self.dir,
            args,
            track=args.track,
            project=args.wandb_project,
            entity=args.wandb_entity,
            is_main=self.main,
            group=getattr(args, "wandb_group", None),
            tags=getattr(args, "wandb_tags", ()),
        )
        self.summary: dict[str, float] = {}
        self.mapped: dict[str, list[dict]] = {}  # Run.map's records per file, read from the file once a launch
        self.counters: dict[str, float] = {}
        self.usages: list = []
        # W&B needs steps that only grow, and a resumed W&B run starts after its last step: a rerun logs from there.
        rows = RecordFile(self.dir / "metrics.jsonl").records() if self.main else []
        self.step = max((r.get("step", 0) + 1 for r in rows), default=0)
        self.family_steps = {
            name.removesuffix("/step"): value for r in rows for name, value in r.items() if name.endswith("/step")
        }

    # ----------------------------------------------------------------------------------- files and ranks
    def records(self, name: str, key: str = "key") -> RecordFile:
        return RecordFile(self.dir / name, key=key)

    def finished(self, folder: str) -> bool:
        """Whether the stage whose result is ``runs/<run>/<folder>/`` saved it (``save_final`` writes steps.json
        last)."""
        return (self.dir / folder / "steps.json").exists()

    def shard(self, items: list) -> list:
        return items[self.rank :: self.world]

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def gather(self, items: list) -> list:
        """Every rank's ``items``, concatenated in rank order, on every rank."""
        from accelerate.utils import gather_object

        return gather_object(list(items)) if self.world > 1 else list(items)

    def map(self, name: str, items: list, work, *, key=None, desc: str | None = None, every_rank: bool = False):
        """Resumable, sharded work over keyed ``items``: the records of ``items`` in ``runs/<run>/<name>``, the same
        list on every rank.

            episodes = run.map("episodes.jsonl", tasks, lambda todo: play(todo, ...), desc="conversations")

        The items an earlier launch recorded are not redone. This rank's share of the others goes to ``work(todo)``,
        an iterable that yields one record per item (its "key" the item's ``key``) as each finishes; each record is
        appended to the file at once, so a kill loses nothing finished. With ``every_rank``, every rank calls ``work``
        (with its share, perhaps empty) whenever any rank has work left: for work that holds collectives (ZeRO-3's
        gathered weights, vLLM engines the ranks build together). Returns the records of ``items``: those an earlier
        launch stored, in file order, then this launch's, in rank order (``exchange``). A collective: every rank
        calls it, with the same items. ``key`` gives an item's key (default: its ``key`` attribute or item)."""
        key = key or item_key
        records = self.records(name)
        # the file is read once a launch and then kept up to date from the exchanges: GRPO maps one round at a time
        # into a file that grows all run, and reading it whole every round would cost the square of the run's length
        if name not in self.mapped:
            self.mapped[name] = records.records()
        stored = {r.get("key") for r in self.mapped[name]}
        todo = [item for item in self.shard(items) if key(item) not in stored]
        # every_rank: a rank with work of its own must enter the gather too, or the ranks without any wait for it
        if any(self.gather([bool(todo)])) if every_rank else todo:
            with tqdm(total=len(todo), desc=desc or name.removesuffix(".jsonl"), disable=not todo) as progress:
                for record in work(todo):
                    records.append(record)
                    progress.update(1)
        new = self.gather(records.appended)
        fresh = {r.get("key") for r in new}
        self.mapped[name] = [r for r in self.mapped[name] if r.get("key") not in fresh] + new
        wanted = {key(item) for item in items}
        return [r for r in self.mapped[name] if r.get("key") in wanted]

    def exchange(self, records: RecordFile) -> list[dict]:
        """Every rank's records of a stage, the same list on every rank: those an earlier launch stored (the file is
        read for them alone: it is there for resuming) in file order, then what each rank appended in this launch,
        in rank order, exchanged by gather_object. One rank gets exactly the file's order back; several ranks get an
        order that does not depend on which rank wrote first. A collective: every rank calls it."""
        new = self.gather(records.appended)
        fresh = {r[records.key] for r in new}
        return [r for r in records.records() if r.get(records.key) not in fresh] + new

    # ----------------------------------------------------------------------------------- LLMs and costs
    def llm(self, spec: str, batch_size: int = 16):
        return self.count_costs(make_llm(spec, batch_size=batch_size, device=self.device, seed=self.seed))

    def count_costs(self, llm):
        """Count ``llm``'s calls and tokens in the cost rows of the stages it is used in."""
        self.usages.append(llm.usage)
        return llm

    def _usage(self) -> tuple[int, int, int, int, int]:
        """(calls, tokens billed, tokens generated, prompt tokens computed, prompt tokens read from a prefix cache)
        over every backend so far; the last two are the hf backend's (``Usage``)."""
        return (
            sum(u.calls for u in self.usages),
            sum(u.prompt_tokens + u.completion_tokens for u in self.usages),
            sum(u.completion_tokens for u in self.usages),
            sum(getattr(u, "prefill_tokens", 0) for u in self.usages),
            sum(getattr(u, "cached_tokens", 0) for u in self.usages),
        )

    def costs(self) -> dict[str, int]:
        """The run's LLM calls and tokens: every row of costs.jsonl, the stage invocations of earlier (resumed)
        launches included."""
        rows = self.records("costs.jsonl", key="stage").records()
        return {"cost/llm_calls": sum(r["llm_calls"] for r in rows), "cost/tokens": sum(r["tokens"] for r in rows)}

    def stage(self, name: str, function, *args, **kwargs):
        """Run ``function(run, *args, **kwargs)`` as stage ``name`` if it was asked for; it may return metrics.
        Appends {stage, llm_calls, tokens} (this invocation's, all ranks) to costs.jsonl. The models the stage loaded
        are freed when it returns."""
        if self.stages and name not in self.stages:
            return None
        start, before = time.time(), self._usage()
        reset_peak_memory()
        metrics = function(self, *args, **kwargs) or {}
        # Before the next stage loads its models, this one's must go, or they add up (an evaluation's models on top
        # of the trained policy and its roles). Two things outlive a stage's function: make_llm's shared hf: weights,
        # and every model accelerate prepared (with its DeepSpeed engine); free_memory also collects them and empties
        # the cache.
        release_models()
        self.accelerator.free_memory()
        self.barrier()
        spent = self.gather([[now - then for now, then in zip(self._usage(), before)]])
        peaks = self.gather([peak_memory_gb()])
        calls, tokens, generated, prefilled, cached = (sum(column) for column in zip(*spent))
        seconds = time.time() - start
        if self.main:
            self.records("costs.jsonl", key="stage").append({"stage": name, "llm_calls": calls, "tokens": tokens})
        computed = {}
        if prefilled or cached:  # what the hf backend ran: prompt tokens (prefill), generated ones (decode)
            computed = {
                f"perf/{name}_prefill_tokens": prefilled,
                f"perf/{name}_decode_tokens": generated,
                f"perf/{name}_prefix_cached_tokens": cached,
                f"perf/{name}_prefix_hit_rate": cached / (cached + prefilled),
            }
        self.log(
            {
                **metrics,
                f"perf/{name}_seconds": seconds,
                f"perf/{name}_tokens_per_s": generated / seconds,
                f"perf/{name}_peak_memory_gb": max(peaks),
                **computed,
            }
        )
        return metrics

    # ----------------------------------------------------------------------------------- metrics
    def log(self, metrics: dict[str, float]) -> None:
        self.summary |= metrics
        self.tracker.log(metrics, step=self.step)

    def log_step(self, metrics: dict[str, float], seconds: float, *, sums: dict | None = None, show: str = ""):
        """One optimizer step's metrics at the next run.step, with its steps per second (it took ``seconds``) and
        this rank's peak memory so far in the stage. ``sums`` holds this rank's share of metrics of the whole global
        batch: a number (summed over ranks) or a (numerator, denominator) pair (their sums' ratio: a per-token mean);
        with them, every rank must call it. ``show`` labels the step's line that rank 0 prints. Returns the metrics
        logged (the sums over ranks included)."""
        if sums:
            # a number is a sum: its denominator is 1 over all ranks (rank 0's), not 1 on each (a mean over ranks)
            parts = {
                name: value if isinstance(value, tuple) else (value, float(self.main)) for name, value in sums.items()
            }
            flat = {f"{name}|{k}": part for name, pair in parts.items() for k, part in enumerate(pair)}
            totals = self.sum_over_ranks(flat)
            pooled = {name: totals[f"{name}|0"] / max(totals[f"{name}|1"], 1e-12) for name in parts}
            metrics = {**metrics, **pooled}
        if show and self.main:
            tqdm.write(
                f"{show}: " + "  ".join(f"{name.split('/', 1)[-1]} {value:.4g}" for name, value in metrics.items())
            )
        self.step += 1
        families = sorted({name.split("/")[0] for name in metrics if "/" in name})
        for family in families:  # <family>/step: the curve's own axis, on which methods overlay (W&B, compare)
            self.family_steps[family] = self.family_steps.get(family, 0) + 1
        axes = {f"{family}/step": self.family_steps[family] for family in families}
        perf = {"perf/steps_per_s": 1 / max(seconds, 1e-9), "perf/peak_memory_gb": peak_memory_gb()}
        self.tracker.log(metrics | axes | perf, step=self.step)  # a curve, not part of the run's summary
        return metrics

    def steps_logged(self, family: str, start: int, what: str) -> int:
        """The steps of ``family`` that earlier launches logged (rank 0 reads them from metrics.jsonl; every rank gets
        the count, so that all ranks skip the same steps' ``log_step``, a collective). A killed launch may have logged
        steps after its last checkpoint, ``start``: the rerun redoes them, says so here, and must not log them again
        (its curve would count them twice)."""
        logged = max(self.gather([self.family_steps.get(family, 0)]))
        if self.main and logged > start:
            span = f"{start + 1}" if logged == start + 1 else f"{start + 1}-{logged}"
            print(
                f"{what} {span}, logged before the run was stopped after its last checkpoint: redone, not logged again"
            )
        return logged

    def sum_over_ranks(self, values: dict[str, float]) -> dict[str, float]:
        """``values`` summed over ranks (every rank must call it, with the same keys)."""
        totals = self.accelerator.reduce(torch.tensor(list(values.values()), device=self.device), reduction="sum")
        return dict(zip(values, totals.tolist()))

    def table(self, name: str, columns: list[str], rows: list[list]) -> None:
        """A table of results: ``runs/<run>/<name>.json`` and, with --track, a W&B table."""
        if not self.main:
            return
        (self.dir / f"{name}.json").write_text(json.dumps({"columns": columns, "rows": rows}, indent=1))
        if self.tracker.wandb is not None:
            import wandb

            self.tracker.wandb.log({name: wandb.Table(columns=columns, data=rows)}, step=self.step)

    def save_dataset(self, name: str, rows: list[dict]) -> None:
        """``rows`` as a Hugging Face dataset in ``runs/<run>/datasets/<name>/`` (``save_to_disk``), for TRL or a hub
        as it is: build them in TRL's conversational columns (``sft_row``; a script's preference rows alike). Rank 0
        writes."""
        if not self.main or not rows:
            return
        from datasets import Dataset

        Dataset.from_list(rows).save_to_disk(str(self.dir / "datasets" / name))

    def count(self, counters: dict[str, float]) -> None:
        for key, value in counters.items():
            self.counters[key] = self.counters.get(key, 0) + value

    def finish(self, print_table=None, curves: dict | None = None, bars: dict | None = None) -> dict:
        """Sum the counters over ranks, log one summary row with every metric of the run, print it, and draw
        ``runs/<run>/curves.png``: the ``curves`` (panel title -> metrics per step: what the update moves) beside
        the ``bars`` (panel title -> summary metrics: the evaluation beside its baselines)."""
        gathered = self.gather([self.counters])
        if self.main:
            self.summary |= {key: sum(c.get(key, 0) for c in gathered) for c in gathered for key in c}
            self.tracker.log(self.summary, step=self.step)
            print("\n" + json.dumps(self.summary, indent=2))
            if print_table is not None:
                print_table(self.summary)
            # what the run's picture shows is its headline: common/compare.py leads a comparison with it
            (self.dir / "panels.json").write_text(json.dumps({"curves": curves or {}, "bars": bars or {}}, indent=1))
            picture = draw_run(self.dir, curves or {}, bars or {})
            if picture is not None:
                self.tracker.image("curves", picture, step=self.step)
                print(f"learning curves: {picture}")
            print(f"outputs in {self.dir}/")
        self.tracker.close()
        # Each rank leaves the process group before it exits: a rank that exits inside it can abort as gloo's threads
        # outlive the interpreter ("terminate called without an active exception", SIGABRT, seen once in CI).
        self.barrier()
        self.accelerator.end_training()
        return self.summary
