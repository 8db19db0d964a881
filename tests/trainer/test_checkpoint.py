"""Checkpoints: a job restored from one continues exactly as the uninterrupted job (no pickle involved)."""
from __future__ import annotations

import json

import torch

from loraplex.engine.loader import load_model
from loraplex.trainer.checkpoint import load_checkpoint, save_checkpoint
from loraplex.trainer.job import Hyperparams, TrainingJob
from loraplex.trainer.lora_layers import LoRASpec
from loraplex.trainer.multi_job import MultiJobTrainer
from tests.trainer.test_multi_job import random_sequences, tiny_dir  # noqa: F401 - fixture


def new_job(config, data):
    return TrainingJob("j", LoRASpec(r=4, alpha=8, dropout=0.1, target_modules=("q_proj", "down_proj")),
                       Hyperparams(n_epochs=2, batch_size=2, micro_batch_size=1, learning_rate=1e-2, warmup_ratio=0.3,
                                   seed=5), data, config)


def run(trainer, job, optimizer_steps):
    done = 0
    while done < optimizer_steps:
        done += sum(r.optimizer_step for r in trainer.step())


def test_resume_from_a_checkpoint_continues_exactly(tiny_dir, tmp_path):  # noqa: F811
    model, config = load_model(tiny_dir, torch.float32)
    trainer = MultiJobTrainer(model, config, torch.float32, torch.device("cpu"))
    data = random_sequences(6, seed=9)
    job = new_job(config, data)
    trainer.add_job(job)
    run(trainer, job, 2)
    folder = save_checkpoint(tmp_path / "step-2", job, "tiny", extra={"best_loss": 1.5})
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                        "optimizer.safetensors", "trainer_state.json"]
    assert json.loads((folder / "trainer_state.json").read_text())["step"] == 2
    run(trainer, job, 2)
    want = {k: v.detach().clone() for k, v in job.lora.named_parameters()}
    want_lr = job.optimizer.param_groups[0]["lr"]

    trainer.remove_job("j")
    resumed = new_job(config, data)
    assert load_checkpoint(folder, resumed) == {"best_loss": 1.5}
    assert resumed.step == 2 and resumed.micro_step == job.micro_step - 4
    trainer.add_job(resumed)
    run(trainer, resumed, 2)
    for k, v in resumed.lora.named_parameters():
        torch.testing.assert_close(v, want[k], atol=0, rtol=0)
    assert resumed.optimizer.param_groups[0]["lr"] == want_lr
