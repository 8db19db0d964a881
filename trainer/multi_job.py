"""MultiJobTrainer: up to `max_jobs` running jobs train together, one forward and one backward per step
through the shared frozen base; jobs join and leave between steps.

Each step every participating job contributes one micro-batch; rows are stacked with the job's rows
contiguous; the loss is sum over jobs of (job's token cross-entropy sum / job's trained-target count in its
whole optimizer step), so each job's gradients equal those of training it alone. Jobs whose accumulation
closes take their own clipped AdamW step. With more running jobs than `max_jobs`, the ones that waited
longest go first (round robin).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .batch import build_training_batch, per_job_loss_sums
from .data import PackedSequence
from .job import TrainingJob
from .lora_layers import TrainSegment, TrainStepState, attach_training

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class JobStepReport:
    job_id: str
    loss: float  # this micro-batch's mean token loss
    num_targets: int
    optimizer_step: bool  # an optimizer step closed with this micro-batch
    step: int  # optimizer steps done
    finished: bool


class CheckpointedLayer(nn.Module):
    """Recomputes its layer's activations in backward (gradient checkpointing) when grad is enabled; a plain
    call otherwise (inference steps)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, *args):
        if torch.is_grad_enabled():
            return checkpoint(self.layer, *args, use_reentrant=False)
        return self.layer(*args)


class MultiJobTrainer:
    def __init__(self, model: nn.Module, model_config, dtype: torch.dtype, device: torch.device, *,
                 max_jobs: int = 4, gradient_checkpointing: bool = False) -> None:
        if max_jobs < 1:
            raise ValueError("max_jobs must be at least 1")
        self.model, self.model_config, self.dtype, self.device = model, model_config, dtype, device
        self.max_jobs = max_jobs
        self.state: TrainStepState = attach_training(model, model_config.num_hidden_layers)
        if gradient_checkpointing:
            layers = model.model.layers
            for i in range(len(layers)):
                layers[i] = CheckpointedLayer(layers[i])
        self.jobs: dict[str, TrainingJob] = {}  # insertion order = round-robin order

    def add_job(self, job: TrainingJob) -> None:
        if job.job_id in self.jobs:
            raise ValueError(f"job {job.job_id} is already training")
        self.jobs[job.job_id] = job

    def remove_job(self, job_id: str) -> TrainingJob | None:
        return self.jobs.pop(job_id, None)

    @property
    def has_work(self) -> bool:
        return any(not j.is_finished for j in self.jobs.values())

    def step(self) -> list[JobStepReport]:
        """One batched micro-step over up to max_jobs unfinished jobs."""
        running = [j for j in self.jobs.values() if not j.is_finished][:self.max_jobs]
        if not running:
            return []
        for j in running:  # rotate: these go to the back of the queue
            self.jobs[j.job_id] = self.jobs.pop(j.job_id)
        shares = [j.next_micro_batch() for j in running]  # (sequences, normaliser, dropout seed)
        tb = build_training_batch([s for s, _, _ in shares], self.model_config, self.dtype, self.device)
        self.state.segments = [TrainSegment(start, end, j.lora, seed)
                               for (start, end), j, (_, _, seed) in zip(tb.segments, running, shares)]
        try:
            with torch.enable_grad():
                sums, counts = per_job_loss_sums(self.model, tb, len(running))
                norms = torch.tensor([n for _, n, _ in shares], dtype=torch.float32, device=sums.device)
                (sums / norms).sum().backward()
        finally:
            self.state.segments = []
        reports = []
        for i, j in enumerate(running):
            loss_sum, n = float(sums[i].detach()), int(counts[i])
            stepped = j.after_backward(loss_sum)
            reports.append(JobStepReport(j.job_id, loss_sum / max(1, n), n, stepped, j.step, j.is_finished))
        return reports

    @torch.no_grad()
    def evaluate(self, jobs_and_data: list[tuple[TrainingJob, list[PackedSequence]]], batch_size: int = 8) -> list[float]:
        """Mean token loss of each job's adapter on its sequences (no dropout), batched across jobs."""
        sums = [0.0] * len(jobs_and_data)
        counts = [0] * len(jobs_and_data)
        longest = max(len(data) for _, data in jobs_and_data)
        for start in range(0, longest, batch_size):
            part = [(i, j, data[start:start + batch_size]) for i, (j, data) in enumerate(jobs_and_data)
                    if data[start:start + batch_size]]
            tb = build_training_batch([seqs for _, _, seqs in part], self.model_config, self.dtype, self.device)
            self.state.segments = [TrainSegment(s, e, j.lora) for (s, e), (_, j, _) in zip(tb.segments, part)]
            try:
                s, c = per_job_loss_sums(self.model, tb, len(part))
            finally:
                self.state.segments = []
            for k, (i, _, _) in enumerate(part):
                sums[i] += float(s[k])
                counts[i] += int(c[k])
        return [s / c if c else float("nan") for s, c in zip(sums, counts)]

