"""MultiJobTrainer: up to `max_jobs` running jobs train together, one forward and one backward per step
through the shared frozen base; jobs join and leave between steps.

A step runs as a sequence of short slices (a generator: `step_slices`), so the engine loop can serve
decode steps between them: the step's rows are cut into chunks of whole sequences of about `chunk_tokens`
tokens, and each chunk goes forward one decoder layer per slice, through the loss `head_rows` target rows
per slice, and backward one layer per slice (recomputing the layer first with gradient checkpointing).
Between slices the trainer leaves no state on the shared modules, so an inference step in between sees the
plain served model.

Each step every participating job contributes one micro-batch; rows are stacked with the job's rows
contiguous; the loss is sum over jobs of (job's token cross-entropy sum / job's trained-target count in its
whole optimizer step), so each job's gradients equal those of training it alone. Jobs whose accumulation
closes take their own clipped AdamW step. With more running jobs than `max_jobs`, the ones that waited
longest go first (round robin).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Generator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .batch import TrainingBatch, build_training_batch, plan_chunks
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


def run_to_end(slices):
    """Run a slice generator to its end; -> its return value."""
    while True:
        try:
            next(slices)
        except StopIteration as stop:
            return stop.value


class MultiJobTrainer:
    def __init__(self, model: nn.Module, model_config, dtype: torch.dtype, device: torch.device, *,
                 max_jobs: int = 4, gradient_checkpointing: bool = False, chunk_tokens: int = 2048,
                 head_rows: int = 256, before_slice: Callable[[], None] | None = None) -> None:
        if max_jobs < 1:
            raise ValueError("max_jobs must be at least 1")
        if chunk_tokens < 1 or head_rows < 1:
            raise ValueError("chunk_tokens and head_rows must be positive")
        self.model, self.model_config, self.dtype, self.device = model, model_config, dtype, device
        self.max_jobs = max_jobs
        self.gradient_checkpointing = gradient_checkpointing
        self.chunk_tokens, self.head_rows = chunk_tokens, head_rows
        self.before_slice = before_slice  # e.g. clear the serving LoRA's per-step state
        self.state: TrainStepState = attach_training(model, model_config.num_hidden_layers)
        self.jobs: dict[str, TrainingJob] = {}  # insertion order = round-robin order
        self.in_step: list[str] = []  # jobs of the step in progress

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
        """One batched micro-step over up to max_jobs unfinished jobs, all slices at once."""
        return run_to_end(self.step_slices())

    def step_slices(self) -> Generator[None, None, list[JobStepReport]]:
        """One batched micro-step, yielding between slices; returns the per-job reports."""
        running = [j for j in self.jobs.values() if not j.is_finished][:self.max_jobs]
        if not running:
            return []
        for j in running:  # rotate: these go to the back of the queue
            self.jobs[j.job_id] = self.jobs.pop(j.job_id)
        self.in_step = [j.job_id for j in running]  # kept if a slice raises: the caller fails these jobs
        shares = [j.next_micro_batch() for j in running]  # (sequences, normaliser, dropout seed)
        norms = torch.tensor([n for _, n, _ in shares], dtype=torch.float32, device=self.device)
        sums = torch.zeros(len(running), dtype=torch.float32, device=self.device)
        counts = torch.zeros(len(running), dtype=torch.int64, device=self.device)
        for chunk in plan_chunks([s for s, _, _ in shares], self.chunk_tokens):
            tb = build_training_batch([[seq for _, seq in part] for part in chunk], self.model_config,
                                      self.dtype, self.device)
            segments = []
            for (start, end), rows, part, job, (_, _, seed) in zip(tb.segments, tb.sequence_rows, chunk,
                                                                 running, shares):
                if job.spec.dropout > 0:  # a mask per sequence: the same however the step is chunked
                    segments += [TrainSegment(s, e, job.lora, seed * 1_000_033 + k)
                                 for (s, e), (k, _) in zip(rows, part)]
                elif end > start:
                    segments.append(TrainSegment(start, end, job.lora))
            s, c = yield from self._pass(tb, segments, norms)
            sums += s
            counts += c
        self.in_step = []
        reports = []
        for i, j in enumerate(running):
            loss_sum, n = float(sums[i]), int(counts[i])
            stepped = j.after_backward(loss_sum)
            reports.append(JobStepReport(j.job_id, loss_sum / max(1, n), n, stepped, j.step, j.is_finished))
        return reports

    def evaluate(self, jobs_and_data: list[tuple[TrainingJob, list[PackedSequence]]]) -> list[float]:
        return run_to_end(self.evaluate_slices(jobs_and_data))

    def evaluate_slices(self, jobs_and_data: list[tuple[TrainingJob, list[PackedSequence]]]
                        ) -> Generator[None, None, list[float]]:
        """Mean token loss of each job's adapter on its sequences (no dropout), batched across jobs."""
        sums = torch.zeros(len(jobs_and_data), dtype=torch.float32, device=self.device)
        counts = torch.zeros(len(jobs_and_data), dtype=torch.int64, device=self.device)
        for chunk in plan_chunks([data for _, data in jobs_and_data], self.chunk_tokens):
            tb = build_training_batch([[seq for _, seq in part] for part in chunk], self.model_config,
                                      self.dtype, self.device)
            segments = [TrainSegment(s, e, j.lora) for (s, e), (j, _) in zip(tb.segments, jobs_and_data) if e > s]
            s, c = yield from self._pass(tb, segments, None)
            sums += s
            counts += c
        return [float(s) / int(c) if c else float("nan") for s, c in zip(sums, counts)]

    @contextmanager
    def _active(self, segments: list[TrainSegment], grad: bool):
        """One slice: the wrappers see this step's segments only inside it."""
        if self.before_slice is not None:
            self.before_slice()
        self.state.segments = segments
        try:
            with torch.set_grad_enabled(grad):
                yield
        finally:
            self.state.segments = []

    def _pass(self, tb: TrainingBatch, segments: list[TrainSegment], norms: torch.Tensor | None
              ) -> Generator[None, None, tuple[torch.Tensor, torch.Tensor]]:
        """Forward one chunk layer by layer, the loss by blocks of target rows and (with `norms`, training)
        backward layer by layer. -> (token cross-entropy sum per job fp32, targets per job)."""
        train = norms is not None
        num_jobs = len(tb.segments)
        inner = self.model.model
        layers = list(inner.layers)
        keep_graph = train and not self.gradient_checkpointing
        with self._active(segments, False):
            x = inner.embed_tokens(tb.batch.input_ids)  # [num_tokens, hidden]; the base is frozen
            cos, sin = inner.rotary_emb(tb.batch.positions, x.dtype)
        saved: list[tuple[torch.Tensor, torch.Tensor | None] | None] = []
        for i, layer in enumerate(layers):
            with self._active(segments, keep_graph):
                x_in = x.detach().requires_grad_(i > 0 and train)
                x = layer(x_in, cos, sin, tb.kv_caches[i], tb.batch)
            saved.append((x_in, x if keep_graph else None) if train else None)
            yield
        last = x.detach().requires_grad_(train)
        sums = torch.zeros(num_jobs, dtype=torch.float32, device=x.device)
        for start in range(0, tb.targets.numel(), self.head_rows):
            part = slice(start, start + self.head_rows)
            with self._active(segments, train):
                hidden = inner.norm(last.index_select(0, tb.target_rows[part]))  # the norm is per row
                ce = F.cross_entropy(self.model.compute_logits(hidden).float(), tb.targets[part], reduction="none")
                part_sums = torch.zeros(num_jobs, dtype=torch.float32, device=ce.device).index_add(
                    0, tb.target_job[part], ce)
                if train:
                    (part_sums / norms).sum().backward()
            sums += part_sums.detach()
            yield
        counts = torch.bincount(tb.target_job, minlength=num_jobs)
        if not train:
            return sums, counts
        grad = last.grad
        if grad is None:  # no trained target in this chunk (every label masked): nothing to propagate
            return sums, counts
        for i in reversed(range(len(layers))):
            x_in, out = saved[i]
            saved[i] = None
            with self._active(segments, True):
                if out is None:  # gradient checkpointing: recompute this layer (same dropout masks)
                    out = layers[i](x_in, cos, sin, tb.kv_caches[i], tb.batch)
                torch.autograd.backward(out, grad)
            grad = x_in.grad
            yield
        return sums, counts
