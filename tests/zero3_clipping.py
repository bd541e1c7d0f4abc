"""Launched by tests/test_distributed.py under `accelerate launch --config_file configs/cpu_zero3.yaml` (2 CPU
ranks): a linear layer sharded by ZeRO-3 takes three steps through ``backward_and_step``, each with another clipping
flag (--flags), on a loss whose gradient is a known vector of norm 5. The optimizer is plain SGD at learning rate 1,
so a step moves the weights by exactly the gradient DeepSpeed applied, after its clipping. Each rank prints, per
step, the flag, the gradient norm ``backward_and_step`` returned (before clipping) and the norm of the weights' move."""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.checkpoints import resume_and_prepare  # noqa: E402
from common.distributed import backward_and_step, configure_batches, make_accelerator  # noqa: E402

GRADIENT = torch.tensor([3.0, 4.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])  # d loss / d w, norm 5


def gathered_weight(engine) -> torch.Tensor:
    import deepspeed

    weight = engine.module.weight
    with deepspeed.zero.GatheredParameters([weight]):
        return weight.detach().clone().flatten()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--flags", type=float, nargs="+", required=True)
    parser.add_argument("--stage-dir", type=Path, required=True)
    args = parser.parse_args()

    accelerator = make_accelerator()
    plugin = accelerator.state.deepspeed_plugin
    assert plugin is not None, "not under DeepSpeed: launch with configs/cpu_zero3.yaml"
    plugin.deepspeed_config["zero_allow_untested_optimizer"] = True  # plain SGD, so that a step is the gradient
    model = torch.nn.Linear(len(GRADIENT), 1, bias=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    configure_batches(accelerator, examples=2, batch_size=2, micro=1)
    engine, optimizer, _ = resume_and_prepare(accelerator, model, optimizer, scheduler, args.stage_dir)
    for flag in args.flags:
        before = gathered_weight(engine)
        with accelerator.accumulate(engine):
            loss = engine(GRADIENT[None]).sum()  # w . GRADIENT on both ranks: the gradient is GRADIENT
            grad_norm = backward_and_step(accelerator, engine, optimizer, loss, flag)
        moved = (before - gathered_weight(engine)).norm().item()
        print(f"rank {accelerator.process_index} clip {flag}: grad norm {grad_norm:.5f}, step norm {moved:.5f}")


if __name__ == "__main__":
    main()
