"""GPU-path bookkeeping that a CPU can check (issue 37): a resumed checkpoint loads on the CPU, whatever device saved
it, and building an in-process vLLM engine leaves the process's global random generators as they were."""

import random
import sys
import types

import numpy as np
import pytest
import torch

from common import checkpoints
from common.checkpoints import save_checkpoint
from common.llm import release_models, vllm_engine


def test_every_resume_load_maps_to_the_cpu(tmp_path, tiny_model, monkeypatch):
    """torch.load without map_location puts each tensor back on the device that saved it: every rank's resumed
    optimizer state on GPU 0, whichever GPU the rank trains on."""
    import copy

    from common.models import add_lora

    model = add_lora(copy.deepcopy(tiny_model), rank=2, alpha=4)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model(input_ids=torch.tensor([[1, 2, 3]])).logits.sum().backward()
    optimizer.step()
    checkpoint = save_checkpoint(tmp_path, 3, model, optimizer, scheduler)
    torch.save({}, checkpoint / "training_state_rank0.pt")
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(k.get("map_location")) or real_load(*a, **k))
    assert checkpoints.resume(model, optimizer, scheduler, tmp_path) == 3

    class Accelerator:  # one rank without DeepSpeed: the partitions do not match, the whole state was loaded
        num_processes, process_index, is_main_process = 1, 0, True
        state = types.SimpleNamespace(deepspeed_plugin=None)

    checkpoints.resume_optimizer_partition(Accelerator(), model, tmp_path, 3)
    assert loads and all(location == "cpu" for location in loads), loads


class _SeedingEngine:
    """``vllm.LLM``'s stand-in that does what vLLM's worker does when it is built in this process: it seeds the
    process's global generators with the engine's seed."""

    def __init__(self, seed=0, **kwargs):
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)


def test_building_a_vllm_engine_leaves_the_global_random_generators_alone(tiny_policy, monkeypatch):
    module = types.ModuleType("vllm")
    module.LLM = _SeedingEngine
    monkeypatch.setitem(sys.modules, "vllm", module)
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    release_models()

    def draws():
        return random.random(), float(np.random.rand()), torch.rand(1).item()

    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    draws()
    expected = draws()
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    draws()
    vllm_engine(str(tiny_policy), seed=0)  # between two draws of the run
    assert draws() == pytest.approx(expected)
    release_models()
