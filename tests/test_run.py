"""common/run.py: what a stage leaves behind."""

import copy
import weakref
from dataclasses import dataclass

import torch

from common.run import Run


@dataclass
class Settings:  # the fields of Args that Run reads
    exp_name: str = "run"
    seed: int = 1
    run_name: str | None = "stages"
    track: bool = False
    wandb_project: str = "cleancrs"
    wandb_entity: str | None = None


def test_a_stage_frees_the_models_it_loaded(tmp_path, monkeypatch, tiny_policy):
    # Two things outlived a stage: the hf: weights its roles shared, and every model (and optimizer) accelerate
    # prepared. The next stage then loaded its own models on top (SMTPO's evaluation on top of GRPO's policy).
    monkeypatch.chdir(tmp_path)
    run = Run(Settings())
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
