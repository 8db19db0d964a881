"""Training checkpoints without pickle: the adapter as a PEFT folder, AdamW's tensors in safetensors, and
counters, schedule and optimizer hyperparameters in JSON. A resumed job continues exactly where it stopped
(same weights, moments, learning rate, data order and dropout seeds)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .job import TrainingJob

ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"
OPTIMIZER_TENSORS, TRAINER_STATE = "optimizer.safetensors", "trainer_state.json"
BEST_WEIGHTS = "best_adapter_model.safetensors"  # early stopping's best adapter so far, when there is one


def write_adapter(folder: Path, job: TrainingJob, base_model: str | None,
                  tensors: dict[str, torch.Tensor] | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors if tensors is not None else job.lora.peft_state_dict(), str(folder / ADAPTER_WEIGHTS))
    (folder / ADAPTER_CONFIG).write_text(json.dumps(job.spec.peft_config(base_model), indent=2))


def save_checkpoint(folder: Path, job: TrainingJob, base_model: str | None, extra: dict | None = None,
                    best_weights: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the checkpoint to a temporary sibling, fsync, then rename into place (a crash never leaves a
    half-written checkpoint under the final name). `best_weights`: PEFT-named tensors kept beside it."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write_adapter(tmp, job, base_model)
    opt = job.optimizer.state_dict()
    tensors = {f"{idx}.{name}": value.detach().cpu().contiguous() for idx, state in opt["state"].items()
               for name, value in state.items() if isinstance(value, torch.Tensor)}
    save_file(tensors, str(tmp / OPTIMIZER_TENSORS))
    if best_weights is not None:
        save_file(best_weights, str(tmp / BEST_WEIGHTS))
    scheduler = {k: v for k, v in job.scheduler.state_dict().items() if k != "lr_lambdas"}
    state = {"job_id": job.job_id, "step": job.step, "micro_step": job.micro_step,
             "param_groups": opt["param_groups"], "scheduler": scheduler, "extra": extra or {}}
    (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=2))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def load_checkpoint(folder: Path, job: TrainingJob) -> dict:
    """Restore `job` (built with the same spec, hyperparameters and data) from `folder`; returns `extra`."""
    folder = Path(folder)
    state = json.loads((folder / TRAINER_STATE).read_text())
    job.lora.load_peft_state_dict(load_file(str(folder / ADAPTER_WEIGHTS)))
    tensors = load_file(str(folder / OPTIMIZER_TENSORS))
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        idx, key = name.split(".", 1)
        opt_state.setdefault(int(idx), {})[key] = value
    job.optimizer.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
    job.scheduler.load_state_dict(state["scheduler"] | {"lr_lambdas": [None]})
    job.step, job.micro_step = int(state["step"]), int(state["micro_step"])
    return state.get("extra", {})


def load_best_weights(folder: Path) -> dict[str, torch.Tensor] | None:
    path = Path(folder) / BEST_WEIGHTS
    return load_file(str(path)) if path.exists() else None
