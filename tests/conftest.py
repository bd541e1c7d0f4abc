"""The tests, and what each file checks. Fixtures and helpers shared by all of them follow this map.

Common code, one file per module of common/ (fast, in process, on the tiny random Llama below or on hand values):
  test_catalog        catalog.py: item cards, fuzzy title matching, dense retrieval
  test_checkpoints    checkpoints.py: a saved checkpoint resumes the trained adapter, AdamW's moments and the schedule;
                      pruning; a resume that cannot load ZeRO-3 partitions says so (under ranks: test_distributed)
  test_compare        compare.py: the table of final metrics, the curves shown by default
  test_conversations  conversations.py: a dataset's turns as chat roles, a history as prompts write it
  test_data           data.py: the assembly of a CRS dataset (no evaluated conversation trained on), and the three
                      scripts that read it agreeing on it (real data)
  test_distributed    distributed.py: global batches, each rank's micro-batches, the accumulation each stage restarts;
                      SLOW parts launch 2 CPU ranks: the collective timeout and Run.finish leaving the process group,
                      ZeRO-3 generation with unequal work, ZeRO-3 LoRA checkpoints resumed, the clipping flag
                      reaching DeepSpeed
  test_fetch_data     fetch_data.py: the table of sources against the mirrored files, fetching from the mirror
  test_formats        formats.py: each reader on the real files and the demo data; malformed rows name file:line
  test_judging        judging.py and its judges: expected scores from the judge's distribution (some on the
                      embedded SmolLM2: the slowest in-process tests, up to minutes)
  test_llm            llm.py: the hf backend's batching, sampling and choice probabilities; openai and vLLM (stand-in)
  test_prefix_cache   llm.py's PrefixCache: exact logits and samples with and without the cache
  test_metrics        metrics.py: recall / ndcg / mrr by hand, SR's title mentions, the paired bootstrap interval
  test_models         models.py: model specs checked before loading, the dtype a model loads in, LoRA
  test_parsing        parsing.py: real malformed LLM outputs parsed or retried, counted
  test_plots          plots.py: a run's curves.png
  test_presets        presets.py: a preset's values, flags over them, a field left unclassified refused
  test_run            run.py: Run.map (resume, kill, ranks), log_step, stages freeing their models, run names
  test_datasets       run.py's save_dataset: ECPO's D_pre as a Hugging Face dataset that TRL trains one DPO step on
  test_wandb_offline  tracking.py under --track: the offline W&B run's config, tables, curves and step axes
  test_sft            sft.py: the masked NLL by hand, the SFT loop lowering it
  test_tokens         tokens.py: chat -> ids with a completion mask, prompts fitted to a budget, sequence log-probs
  test_tracking       tracking.py: record files (a torn line), metrics.jsonl, seeding, W&B login and mode

The methods, one file per script (losses against hand values, parsers on real outputs, a known case each update
must learn at the paper's settings): test_ailo, test_ecpo, test_grsu, test_smtpo, test_rso.

SLOW, end-to-end (subprocesses; minutes each on 2 CPU cores; the bulk of CI's time):
  test_scripts        every script run whole on the embedded model, killed and resumed, bad input refused
  test_rso_scripts    rso.py killed in the middle of RL and resumed; bad input
  test_ecpo_ranks, test_rso_ranks, test_smtpo_ranks
                      each update on 1 and on 2 CPU ranks (DDP, ZeRO-3) agreeing
  test_recipes        benchmark/*.sh's commands through each script's dry run, at 1, 4 and 8 processes
  test_effects        benchmark/'s effects runs: the paired table, what each reads of its run's records against the
                      script's own metrics, each command through its script's dry run on the real data
  test_serve          the openai backend against a real `transformers serve` on loopback
  test_gpu_first_look benchmark/gpu_first_look.sh's steps in their CPU mode
  zero3_*.py          not tests: the scripts test_distributed launches under 2 ZeRO-3 ranks

test_gpu_path (fast) checks the GPU path's bookkeeping a CPU can: a resume maps every load to the CPU, and an
in-process vLLM engine (a stand-in) leaves the global random generators alone.

Tests that read the real data (../shared/data, or $CLEANCRS_DATA) are marked ``needs_data("<file or folder>", ...)``
and skip without it, the summary (pytest -rs) naming each file missing.
"""

import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass, make_dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DATA = Path(os.environ.get("CLEANCRS_DATA", ROOT.parent / "shared" / "data"))

if os.environ.get("PYTEST_XDIST_WORKER"):  # under `make test`'s workers: one thread per worker, and for the
    os.environ["OMP_NUM_THREADS"] = "1"  # scripts they start, rather than every worker contending for every core
    torch.set_num_threads(1)


def needs_data(*paths: str):
    """Skip a test whose real data files (or dataset folders), given relative to DATA, are not all there; the skip's
    reason, printed in the summary (pytest -rs, pyproject.toml), names each one missing."""
    missing = [str(DATA / path) for path in paths if not (DATA / path).exists()]
    return pytest.mark.skipif(
        bool(missing), reason=f"real data missing: {', '.join(missing)} (make data fetches it; CLEANCRS_DATA moves it)"
    )


def run_script(*args, cwd, timeout=900, check=True):
    """``python <script> <flags>`` in ``cwd``; with ``check``, it must succeed."""
    result = subprocess.run(
        [sys.executable, str(ROOT / args[0]), *args[1:]], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0 or not check, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def fails_cleanly(*args, cwd) -> str:
    """``python <script> <flags>`` must fail with a one-line error and no traceback; returns its stderr."""
    result = run_script(*args, cwd=cwd, timeout=300, check=False)
    assert result.returncode != 0 and "error: " in result.stderr and "Traceback" not in result.stderr, result.stderr
    return result.stderr


def accelerate_launch(config: str) -> tuple[str, ...]:
    """The command that starts a script under ``accelerate launch`` with ``configs/<config>.yaml`` (CPU ranks)."""
    config_file = str(ROOT / "configs" / f"{config}.yaml")
    # a port of its own: under `make test` two workers may each launch two ranks at once
    port = ("--main_process_port", str(free_port()))
    return (sys.executable, "-m", "accelerate.commands.launch", "--config_file", config_file, *port)


def free_port() -> int:
    """A loopback port no one listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Settings:
    """The fields of a script's ``Args`` that ``Run`` reads, at their defaults: the stand-in for Args in tests of
    common code (``Run(settings())``)."""

    exp_name: str = "run"
    seed: int = 1
    run_name: str | None = "stages"
    track: bool = False
    wandb_project: str = "cleancrs"
    wandb_entity: str | None = None


@pytest.fixture
def settings():
    """Makes a ``Settings``: ``settings(run_name="sft", micro_batch_size=2)``; a field beyond Run's (what the helper
    under test reads from Args) is added to it, so Run writes every one into config.json as it does a script's."""

    def make(**values):
        extra = [
            (name, type(value), value) for name, value in values.items() if name not in Settings.__dataclass_fields__
        ]
        cls = make_dataclass("Settings", extra, bases=(Settings,)) if extra else Settings
        return cls(**values)

    return make


def write_run(folder: Path, steps: list[dict], summary: dict) -> Path:
    """A run folder with a hand-written metrics.jsonl: one row per training step, then the summary row."""
    folder.mkdir(parents=True)
    rows = [{"step": k + 1, **row} for k, row in enumerate(steps)] + [{"step": len(steps), **summary}]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.fixture
def two_runs(tmp_path):
    """Two runs of different methods: a curve they share (train/loss), one's own (rollout/return), their summaries."""
    a = write_run(tmp_path / "ecpo__demo__1__1", [{"train/loss": 0.69}, {"train/loss": 0.5}], {"eval/sr": 0.25})
    b = write_run(
        tmp_path / "rso__demo__1__2",
        [{"train/loss": 1.0, "rollout/return": 2.0}, {"train/loss": 0.8, "rollout/return": 2.5}],
        {"eval/sr": 0.5, "eval/wi": 3.0, "eval/turn1/sr": 0.1},
    )
    return a, b


@pytest.fixture(scope="session")
def tokenizer():
    """The embedded SmolLM2 tokenizer (real vocabulary and chat template)."""
    from common.models import load_tokenizer

    return load_tokenizer("smollm2-135m")


def tiny_llama(tokenizer, hidden_size: int = 32, max_positions: int = 512):
    """A 2-layer random Llama over the real vocabulary: fast, deterministic, shaped like the real thing."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config)


@pytest.fixture(scope="session")
def tiny_model(tokenizer):
    return tiny_llama(tokenizer).eval()


@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory, tiny_model, tokenizer):
    """``tiny_model`` saved as a model folder, for the scripts' --policy flags in subprocess tests."""
    folder = tmp_path_factory.mktemp("tiny_policy")
    tiny_model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


class ScriptedLLM:
    """A backend stand-in that answers each prompt with ``respond(prompt_text)``; counts like the real ones."""

    def __init__(self, respond):
        from common.llm import Usage

        self.respond, self.usage, self.prompts = respond, Usage(), []

    def chat(self, conversations, n=1, temperature=0.0, max_tokens=256, stop=None):
        out = []
        for conv in conversations:
            text = conv[-1]["content"]
            self.prompts.append(text)
            self.usage.add(n, len(text.split()), 1)
            out.append([self.respond(text) for _ in range(n)])
        return out


@pytest.fixture
def scripted_llm():
    return ScriptedLLM


# Chat templates of two shapes that the embedded model's does not have, written for these tests: DeepSeek-R1-Distill's
# (it writes the BOS, and its generation header opens the reasoning with "<think>\n") and Llama-3's (it writes the BOS,
# which vLLM, tokenizing a rendered text, would add a second time).
R1_DISTILL_LIKE_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}{{ '<｜User｜>' + m['content'] }}"
    "{% else %}{{ '<｜Assistant｜>' + m['content'] + '<｜end▁of▁sentence｜>' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\n' }}{% endif %}"
)
LLAMA3_LIKE_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\n\n' + m['content'] + '<|im_end|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n\n' }}{% endif %}"
)


def templated(tokenizer, template: str):
    """A copy of the embedded tokenizer with ``template`` as its chat template and a BOS of its own (SmolLM2's BOS is
    its turn marker, which would hide a doubled BOS among the turns)."""
    import copy

    copied = copy.deepcopy(tokenizer)
    copied.chat_template, copied.bos_token = template, "<|endoftext|>"
    return copied


@pytest.fixture(scope="session")
def r1_distill_tokenizer(tokenizer):
    return templated(tokenizer, R1_DISTILL_LIKE_TEMPLATE)


@pytest.fixture(scope="session")
def llama3_tokenizer(tokenizer):
    return templated(tokenizer, LLAMA3_LIKE_TEMPLATE)
