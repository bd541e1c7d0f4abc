"""The training data a run produces, saved as Hugging Face datasets in TRL's columns: TRL trains on D_pre as is."""

import pytest
from datasets import load_from_disk

from common.run import Run, sft_row
from ecpo import preference_row


def test_a_saved_d_pre_loads_back_and_trains_one_trl_dpo_step(tmp_path, monkeypatch, tiny_policy, settings):
    trl = pytest.importorskip("trl")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.chdir(tmp_path)
    run = Run(settings())
    pairs = [
        (f"Observation 1: User: a film like Alien, please ({k}).", "Recommend[Aliens (1986)]", "Ask[Why?]")
        for k in range(4)
    ]
    run.save_dataset("d_pre", [preference_row(*pair) for pair in pairs])
    run.save_dataset("d_sft", [sft_row(prompt, chosen) for prompt, chosen, _ in pairs])
    d_pre = load_from_disk(str(run.dir / "datasets" / "d_pre"))
    assert d_pre.column_names == ["prompt", "chosen", "rejected"] and len(d_pre) == 4
    assert d_pre[0]["chosen"] == [{"role": "assistant", "content": "Recommend[Aliens (1986)]"}]
    assert load_from_disk(str(run.dir / "datasets" / "d_sft")).column_names == ["messages"]

    model = AutoModelForCausalLM.from_pretrained(tiny_policy)
    tokenizer = AutoTokenizer.from_pretrained(tiny_policy)
    config = trl.DPOConfig(
        output_dir=str(tmp_path / "trl"), max_steps=1, per_device_train_batch_size=2, report_to=[], use_cpu=True,
        logging_steps=1, save_strategy="no",
    )  # fmt: skip
    trainer = trl.DPOTrainer(model=model, args=config, train_dataset=d_pre, processing_class=tokenizer)
    trainer.train()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    assert len(losses) == 1 and losses[0] == pytest.approx(0.6931, abs=1e-3)  # log 2: the policy is the reference
