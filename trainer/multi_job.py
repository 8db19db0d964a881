"""MultiJobTrainer: up to `max_jobs` running jobs train together, one forward and one backward per step
through the shared frozen base; jobs join and leave between steps.

A step runs as a sequence of short slices (a generator: `step_slices`), so the engine loop can serve
decode steps between them: the step's rows are cut into chunks of whole sequences of about `chunk_tokens`
tokens, and each chunk goes forward one decoder layer per slice, through the loss `head_rows` target rows
per slice, and backward one layer per slice (recomputing the layer first with gradient checkpointing).
Between slices the trainer leaves no state on the shared modules, so an inference step in between sees the
plain served model.

Each step every participating job contributes one micro-batch; rows are stacked with the job's rows
contiguous; the loss is the sum over jobs of each job's objective (trainer/objectives.py: SFT's token
cross-entropy over its optimizer step's trained targets, DPO's pair loss with reference rows that run
without any adapter), so each job's gradients equal those of training it alone. The head gives every
target's log-probability; an objective turns its targets' into the loss and the per-target derivative that
scales the head's backward. Jobs whose accumulation closes take their own clipped AdamW step. With more
running jobs than `max_jobs`, stride scheduling by priority picks the step's jobs (`pick_jobs`).
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Generator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .batch import TrainingBatch, build_training_batch, plan_chunks
from .data import PackedSequence, SoftTargets
from .job import TrainingJob
from .lora_layers import TrainSegment, TrainStepState, attach_training
from .mixlora_train import (
    attach_moe_training,
    aux_coefficients,
    aux_term,
    router_totals,
)
from .objectives import ChunkLoss

logger = logging.getLogger(__name__)

DISTILL_TOP_K = 32  # tokens of the base's distribution kept per position for self-distillation


@dataclass(frozen=True, slots=True)
class JobStepReport:
    job_id: str
    loss: float  # this micro-batch's mean loss (SFT: per token; DPO: per pair)
    num_targets: int
    optimizer_step: bool  # an optimizer step closed with this micro-batch
    step: int  # optimizer steps done
    finished: bool


def soft_log_likelihood(logits: torch.Tensor, ids: torch.Tensor, probs: torch.Tensor, tail: torch.Tensor
                        ) -> torch.Tensor:
    """Per row, the expected log-probability of the model's next token under a teacher distribution given as
    its top k (`ids`, `probs` [rows, k]) and the mass outside them (`tail` [rows]): the k + 1 outcomes'
    sum of p log q. Its negative is the cross-entropy, which differs from KL(teacher || model) by the
    teacher's entropy (a constant): its gradient is zero where the model already is the teacher. A one-hot
    row (probability 1 on the label) is the plain token log-likelihood."""
    logq = torch.log_softmax(logits, dim=-1).gather(1, ids)  # [rows, k]
    inside = (probs * logq).sum(dim=1)
    rest = torch.log1p(-logq.exp().sum(dim=1).clamp(max=1 - 1e-6))  # log of the model's mass outside the top k
    return inside + tail * rest


def run_to_end(slices):
    """Run a slice generator to its end; -> its return value."""
    while True:
        try:
            next(slices)
        except StopIteration as stop:
            return stop.value


@dataclass(slots=True)
class _Share:
    """One job's part of a batched pass."""
    job: TrainingJob
    sequences: list[PackedSequence]
    policy: list[bool]  # per sequence: runs with the job's adapter (False: a DPO reference row)
    norm: int
    dropout_seed: int | None
    units: int = 0  # what the loss is a mean over: SFT trained targets, DPO pairs
    loss_sum: float = 0.0
    num_targets: int = 0
    metrics: dict[str, float] = field(default_factory=dict)

    def add(self, part: ChunkLoss, n: int) -> None:
        self.loss_sum += part.loss_sum
        self.num_targets += n
        for k, v in part.metrics.items():
            self.metrics[k] = self.metrics.get(k, 0.0) + v


@dataclass(slots=True)
class LayerRun:
    """A chunk's forward through a range of decoder layers, kept for its backward."""
    layers: range
    cos: torch.Tensor
    sin: torch.Tensor
    saved: list  # per layer: (its input, its output with graph, or None with gradient checkpointing), or None
    router_stats: dict  # the MixLoRA FFNs' records of these layers (TrainStepState.router_stats)
    out: torch.Tensor  # the last layer's output, detached


class MultiJobTrainer:
    def __init__(self, model: nn.Module, model_config, dtype: torch.dtype, device: torch.device, *,
                 max_jobs: int = 4, gradient_checkpointing: bool = False, chunk_tokens: int = 2048,
                 head_rows: int = 256, before_slice: Callable[[], None] | None = None,
                 layers: range | None = None) -> None:
        """`layers`: the decoder layers this process holds (a pipeline stage's; default all)."""
        if max_jobs < 1:
            raise ValueError("max_jobs must be at least 1")
        if chunk_tokens < 1 or head_rows < 1:
            raise ValueError("chunk_tokens and head_rows must be positive")
        self.model, self.model_config, self.dtype, self.device = model, model_config, dtype, device
        self.max_jobs = max_jobs
        self.gradient_checkpointing = gradient_checkpointing
        self.chunk_tokens, self.head_rows = chunk_tokens, head_rows
        self.before_slice = before_slice  # e.g. clear the serving LoRA's per-step state
        layers = range(model_config.num_hidden_layers) if layers is None else layers
        self.state: TrainStepState = attach_training(model, layers)
        attach_moe_training(model, layers, self.state)
        self.jobs: dict[str, TrainingJob] = {}
        self.in_step: list[str] = []  # jobs of the step in progress
        self._pass_value: dict[str, float] = {}  # stride scheduling's virtual time per job

    def add_job(self, job: TrainingJob) -> None:
        if job.job_id in self.jobs:
            raise ValueError(f"job {job.job_id} is already training")
        self.jobs[job.job_id] = job
        # a newcomer starts at the current minimum, so it neither waits for nor overtakes the others' history
        self._pass_value[job.job_id] = min(self._pass_value.values(), default=0.0)

    def remove_job(self, job_id: str) -> TrainingJob | None:
        self._pass_value.pop(job_id, None)
        return self.jobs.pop(job_id, None)

    @property
    def has_work(self) -> bool:
        return any(not j.is_finished for j in self.jobs.values())

    def step(self) -> list[JobStepReport]:
        """One batched micro-step over up to max_jobs unfinished jobs, all slices at once."""
        return run_to_end(self.step_slices())

    def pick_jobs(self) -> list[TrainingJob]:
        """The jobs of the next step: stride scheduling by priority (ASPEN-style). Each job has a virtual time
        that advances by 1 / (priority + 1) per step it takes part in; the max_jobs unfinished jobs with the
        least go first (ties: higher priority, then the one added first). With no more unfinished jobs than
        max_jobs every job is in every step; beyond that a priority-p job gets p + 1 times the steps of a
        priority-0 one."""
        order = {job_id: i for i, job_id in enumerate(self.jobs)}
        waiting = [j for j in self.jobs.values() if not j.is_finished]
        waiting.sort(key=lambda j: (self._pass_value.get(j.job_id, 0.0), -j.priority, order[j.job_id]))
        return waiting[:self.max_jobs]

    def step_slices(self) -> Generator[None, None, list[JobStepReport]]:
        """One batched micro-step, yielding between slices; returns the per-job reports. A job removed while
        the step runs (paused, cancelled) gets no report: its share of the step is dropped."""
        running = self.pick_jobs()
        if not running:
            return []
        # stride: the order of the step's jobs in the batch is the pick order
        for j in running:
            self._pass_value[j.job_id] = self._pass_value.get(j.job_id, 0.0) + 1.0 / (max(0, j.priority) + 1)
        self.in_step = [j.job_id for j in running]  # kept if a slice raises: the caller fails these jobs
        shares = []
        for j in running:
            units, norm, seed = j.next_micro_batch()
            seqs, policy = j.objective.expand(units)
            random = j.spec.dropout > 0 or getattr(j.spec, "jitter_noise", 0) > 0  # seeded masks or noise
            shares.append(_Share(j, seqs, policy, norm, seed if random else None, units=j.objective.units(units)))
        yield from self._run(shares, train=True)
        self.in_step = []
        reports = []
        for share in shares:
            j = share.job
            if self.jobs.get(j.job_id) is not j:  # left during the step
                j.drop_micro_batch()
                continue
            stepped = j.after_backward(share.loss_sum, share.metrics)
            reports.append(JobStepReport(j.job_id, share.loss_sum / max(1, share.units), share.num_targets, stepped,
                                         j.step, j.is_finished))
        return reports

    def evaluate(self, jobs_and_data: list[tuple[TrainingJob, list]]) -> list[dict[str, float]]:
        return run_to_end(self.evaluate_slices(jobs_and_data))

    def evaluate_slices(self, jobs_and_data: list[tuple[TrainingJob, list]]
                        ) -> Generator[None, None, list[dict[str, float]]]:
        """Each job's adapter on its validation units (no dropout), batched across jobs -> per job
        {"loss": mean loss (SFT: per token; DPO: per pair), "accuracy": (SFT: mean token accuracy; DPO: reward
        accuracy), ...the objective's other metrics}."""
        sums = yield from self.evaluate_sums_slices(jobs_and_data)
        out = []
        for (job, units), (loss_sum, count, metrics) in zip(jobs_and_data, sums):
            report = job.objective.report(metrics, job.objective.normaliser(list(units)))
            out.append({"loss": loss_sum / count if count else float("nan"), **report})
        return out

    def evaluate_sums(self, jobs_and_data: list[tuple[TrainingJob, list]]
                      ) -> list[tuple[float, int, dict[str, float]]]:
        return run_to_end(self.evaluate_sums_slices(jobs_and_data))

    def evaluate_sums_slices(self, jobs_and_data: list[tuple[TrainingJob, list]]
                             ) -> Generator[None, None, list[tuple[float, int, dict[str, float]]]]:
        """Per job, its validation (loss sum, units the loss is a mean over, metric sums): what data-parallel
        ranks add up."""
        shares = []
        for job, units in jobs_and_data:
            seqs, policy = job.objective.expand(list(units))
            shares.append(_Share(job, seqs, policy, job.objective.normaliser(list(units)), None,
                                 units=job.objective.units(list(units))))
        yield from self._run(shares, train=False)
        return [(share.loss_sum, share.units, share.metrics) for share in shares]

    @torch.no_grad()
    def with_base_distributions(self, sequences: list[PackedSequence], k: int = DISTILL_TOP_K
                                ) -> list[PackedSequence]:
        """`sequences` with SoftTargets: the base model's own next-token distribution (no adapter) at each trained
        position, as its top k and the mass outside them (self-distillation towards the base, trainer/
        regularization.py). One forward per chunk of `chunk_tokens`."""
        out = list(sequences)
        inner = self.model.model
        for chunk in plan_chunks([sequences], self.chunk_tokens):
            part = chunk[0]
            tb = build_training_batch([[seq for _, seq in part]], self.model_config, self.dtype, self.device)
            with self._active([], False):  # no segment: every row is the base model
                x = inner.embed_tokens(tb.batch.input_ids)
                cos, sin = inner.rotary_emb(tb.batch.positions, x.dtype)
                for i, layer in enumerate(inner.layers):
                    x = layer(x, cos, sin, tb.kv_caches[i], tb.batch)
                probs, ids = [], []
                for start in range(0, tb.targets.numel(), self.head_rows):
                    hidden = x.index_select(0, tb.target_rows[start:start + self.head_rows])
                    p = torch.softmax(self.model.compute_logits(inner.norm(hidden)).float(), dim=-1)
                    top = p.topk(k, dim=-1)
                    probs.append(top.values)
                    ids.append(top.indices)
            probs_t, ids_t = torch.cat(probs), torch.cat(ids)
            for local, (ordinal, seq) in enumerate(part):
                rows = (tb.target_seq == local).nonzero().squeeze(1)
                p = probs_t[rows].cpu()
                out[ordinal] = dataclasses.replace(seq, soft=SoftTargets(ids_t[rows].cpu(), p,
                                                                         (1.0 - p.sum(dim=1)).clamp(min=0.0)))
        return out

    def _run(self, shares: list[_Share], train: bool) -> Generator[None, None, None]:
        """Forward (and with `train`, backward) every share, chunk by chunk; adds each share's losses, target
        counts and metrics."""
        groups = [s.job.objective.group for s in shares]
        for chunk in plan_chunks([s.sequences for s in shares], self.chunk_tokens, groups):
            tb = build_training_batch([[seq for _, seq in part] for part in chunk], self.model_config,
                                      self.dtype, self.device)
            segments = self.segments(tb, chunk, shares, train)
            ordinals = [torch.tensor([k for k, _ in part], dtype=torch.int64, device=self.device) for part in chunk]
            yield from self._pass(tb, segments, shares, ordinals, train)


    @staticmethod
    def segments(tb: TrainingBatch, chunk: list, shares: list[_Share], train: bool) -> list[TrainSegment]:
        """The LoRA segments of a chunk's rows (`chunk`: per share, its (ordinal, sequence) pairs)."""
        segments = []
        for (start, end), rows, part, share in zip(tb.segments, tb.sequence_rows, chunk, shares):
            lora = share.job.lora
            if share.dropout_seed is not None and train or not all(share.policy[k] for k, _ in part):
                # a segment per sequence: a dropout mask each (the same however the step is chunked), and
                # no adapter at all on a DPO reference row
                seed = share.dropout_seed if train else None
                segments += [TrainSegment(s, e, lora, None if seed is None else seed * 1_000_033 + k)
                             for (s, e), (k, _) in zip(rows, part) if share.policy[k]]
            elif end > start:
                segments.append(TrainSegment(start, end, lora))
        return segments

    @staticmethod
    def _aux_weight(shares: list[_Share]):
        """A MixLoRA job's multiplier of a chunk's load-balance loss: the chunk's share of its micro-batch's
        tokens, over the micro-batches of its optimizer step (MoE-PEFT adds aux / accumulation steps)."""
        tokens = {id(s.job.lora): sum(len(q.input_ids) for q, p in zip(s.sequences, s.policy) if p) for s in shares}
        micro = {id(s.job.lora): s.job.micro_batches_per_step for s in shares}
        return lambda lora, n: n / max(1, tokens.get(id(lora), n)) / max(1, micro.get(id(lora), 1))

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

    def _pass(self, tb: TrainingBatch, segments: list[TrainSegment], shares: list[_Share],
              ordinals: list[torch.Tensor], train: bool) -> Generator[None, None, None]:
        """Forward one chunk layer by layer, the head by blocks of target rows and (training) backward layer
        by layer. The head gives every target's log-probability; each share's objective turns its targets'
        into its loss and, for DPO, the per-target derivatives that scale the head's gradients. The pieces are
        the pipeline stages' too (trainer/pipeline.py), each of which runs a range of the layers."""
        layers = range(len(self.model.model.layers))
        self.state.router_stats.clear()
        x, cos, sin = self.embed(tb, segments)
        run = yield from self.forward_layers(tb, segments, x, cos, sin, layers, train)
        aux = {}
        if train and run.router_stats:  # MixLoRA jobs: the load-balance loss, now that f is known
            aux, values = aux_coefficients(router_totals(run.router_stats), self._aux_weight(shares))
            for share in shares:
                if id(share.job.lora) in values:
                    share.metrics["router_aux_loss"] = share.metrics.get("router_aux_loss", 0.0) + \
                        values[id(share.job.lora)]
        grad = yield from self.head(tb, segments, run.out, shares, ordinals, train)
        if grad is not None:
            yield from self.backward_layers(tb, segments, run, grad, aux)

    def embed(self, tb: TrainingBatch, segments: list[TrainSegment]
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The chunk's input embeddings (the base is frozen: no graph) and its rotary tables."""
        inner = self.model.model
        with self._active(segments, False):
            x = inner.embed_tokens(tb.batch.input_ids)  # [num_tokens, hidden]
        return (x, *self.rotary(tb, x.dtype))

    def rotary(self, tb: TrainingBatch, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.model.rotary_emb(tb.batch.positions, dtype)

    def forward_layers(self, tb: TrainingBatch, segments: list[TrainSegment], x: torch.Tensor, cos: torch.Tensor,
                       sin: torch.Tensor, layers: range, train: bool, grad_input: bool = False
                       ) -> Generator[None, None, LayerRun]:
        """`x` through decoder layers `layers`, one per slice. Training keeps each layer's input (and, without
        gradient checkpointing, its graph) for backward_layers; `grad_input`: the first layer's input gets a
        gradient too (a pipeline stage sends it to the one before)."""
        inner = self.model.model
        keep_graph = train and not self.gradient_checkpointing
        saved: list[tuple[torch.Tensor, torch.Tensor | None] | None] = []
        for i in layers:
            with self._active(segments, keep_graph):
                x_in = x.detach().requires_grad_(train and (i > layers.start or grad_input))
                x = inner.layers[i](x_in, cos, sin, tb.kv_caches[i], tb.batch)
            saved.append((x_in, x if keep_graph else None) if train else None)
            yield
        stats = {k: v for k, v in self.state.router_stats.items() if k[1] in layers}
        return LayerRun(layers, cos, sin, saved, stats, x.detach())

    def head(self, tb: TrainingBatch, segments: list[TrainSegment], last: torch.Tensor, shares: list[_Share],
             ordinals: list[torch.Tensor], train: bool) -> Generator[None, None, torch.Tensor | None]:
        """The final norm and head over the target rows of the last layer's output `last`, by blocks of
        `head_rows`: adds each share's loss, target count and metrics; training returns d(loss)/d(last)
        (None when the chunk has no target)."""
        inner = self.model.model
        n = tb.targets.numel()
        # d(loss)/d(log p) known before the head (SFT: -1/targets of the step) goes into the head's backward;
        # the others (DPO) start at 1 and are scaled below, once the chunk's sums are known
        weights = torch.tensor([1.0 if w is None else w for w in
                                (s.job.objective.upfront_weight(s.norm) for s in shares)],
                               dtype=torch.float32, device=last.device)
        logp = torch.empty(n, dtype=torch.float32, device=last.device)
        correct = torch.empty(n, dtype=torch.bool, device=last.device)
        head_grads = torch.empty((n, last.shape[1]), dtype=last.dtype, device=last.device) if train else None
        for start in range(0, n, self.head_rows):
            part = slice(start, start + self.head_rows)
            with self._active(segments, train):
                hidden = last.index_select(0, tb.target_rows[part]).requires_grad_(train)
                logits = self.model.compute_logits(inner.norm(hidden)).float()  # the norm is per row
                if tb.soft is None:
                    lp = -F.cross_entropy(logits, tb.targets[part], reduction="none")
                else:
                    lp = soft_log_likelihood(logits, *(t[part] for t in tb.soft))
                if train:
                    (head_grads[part],) = torch.autograd.grad(lp, hidden, grad_outputs=weights[tb.target_job[part]])
            logp[part] = lp.detach()
            correct[part] = logits.detach().argmax(dim=-1) == tb.targets[part]
            yield
        scale = None
        for jx, share in enumerate(shares):
            idx = (tb.target_job == jx).nonzero().squeeze(1)
            if idx.numel() == 0:
                continue
            seq = ordinals[jx][tb.target_seq[idx]]  # the target's sequence in the share's list
            result = share.job.objective.chunk_loss(logp[idx], correct[idx], seq, len(share.sequences), share.norm)
            share.add(result, int(idx.numel()))
            if train and result.coefficients is not None:
                scale = torch.ones(n, dtype=torch.float32, device=last.device) if scale is None else scale
                scale[idx] = result.coefficients
        if not train or n == 0:
            return None
        if scale is not None:
            head_grads = (head_grads.float() * scale[:, None]).to(last.dtype)
        return torch.zeros_like(last).index_add_(0, tb.target_rows, head_grads)

    def backward_layers(self, tb: TrainingBatch, segments: list[TrainSegment], run: LayerRun, grad: torch.Tensor,
                        aux: dict) -> Generator[None, None, torch.Tensor | None]:
        """Backward through `run`'s layers, last first, one per slice (recomputing each first with gradient
        checkpointing: the same dropout masks), with the MixLoRA load-balance terms `aux`; returns the gradient
        of the first layer's input (None unless it was run with grad_input)."""
        inner = self.model.model
        for at in reversed(range(len(run.layers))):
            i = run.layers[at]
            x_in, out = run.saved[at]
            run.saved[at] = None
            stats = run.router_stats
            with self._active(segments, True):
                if out is None:  # gradient checkpointing: recompute this layer (same dropout masks)
                    out = inner.layers[i](x_in, run.cos, run.sin, tb.kv_caches[i], tb.batch)
                    stats = self.state.router_stats  # the recomputed router probabilities, with their graph
                term = aux_term(stats, i, aux) if aux else None
                if term is None:
                    torch.autograd.backward(out, grad)
                else:
                    torch.autograd.backward([out, term], [grad, torch.ones_like(term)])
            grad = x_in.grad
            yield
        return grad
