"""One fine-tuning job's training state: its LoRA parameters, AdamW, cosine schedule with warmup, data order,
gradient accumulation and counters. Owned by the MultiJobTrainer, which runs many such jobs in one batch."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .data import PackedSequence
from .lora_layers import LoRASpec, make_job_lora
from .objectives import SFT, Objective


@dataclass(frozen=True, slots=True)
class Hyperparams:
    n_epochs: int = 3
    batch_size: int = 8  # sequences per optimizer step
    micro_batch_size: int = 4  # sequences this job puts into one batched step (gradient accumulation above it)
    learning_rate: float = 2e-4
    warmup_ratio: float = 0.0  # of the total optimizer steps, linear from 0
    min_lr_ratio: float = 0.0  # the cosine decays to learning_rate * min_lr_ratio
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # <= 0: no clipping
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [(1 <= self.n_epochs <= 1000, "n_epochs must be between 1 and 1000"),
                  (1 <= self.batch_size <= 4096, "batch_size must be between 1 and 4096"),
                  (1 <= self.micro_batch_size, "micro_batch_size must be at least 1"),
                  (0 < self.learning_rate <= 1 and math.isfinite(self.learning_rate),
                   "learning_rate must be in (0, 1]"),
                  (0 <= self.warmup_ratio < 1, "warmup_ratio must be in [0, 1)"),
                  (0 <= self.min_lr_ratio <= 1, "min_lr_ratio must be in [0, 1]"),
                  (self.weight_decay >= 0, "weight_decay must be >= 0")]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


def cosine_with_warmup(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """LR multiplier for optimizer step `step` (0-based), as transformers' get_cosine_schedule_with_warmup."""
    if step < warmup_steps:
        return step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_ratio + (1 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class TrainingJob:
    def __init__(self, job_id: str, spec: LoRASpec, hp: Hyperparams, train: list, model_config,
                 device: torch.device | str = "cpu", objective: Objective | None = None, priority: int = 0) -> None:
        """`train`: the objective's units (SFT: PackedSequence; DPO: PreferencePair)."""
        if not train:
            raise ValueError("the training set is empty")
        self.job_id, self.spec, self.hp = job_id, spec, hp
        self.objective = objective if objective is not None else SFT()
        self.priority = priority  # a larger number gets a larger share of the batched steps
        self.train = train
        self.lora = make_job_lora(spec, model_config, device, seed=hp.seed)  # JobLoRA or JobMixLoRA
        self.params = list(self.lora.parameters())
        self.optimizer = torch.optim.AdamW(self.params, lr=hp.learning_rate, betas=(0.9, 0.999), eps=1e-8,
                                           weight_decay=hp.weight_decay)
        self.steps_per_epoch = math.ceil(len(train) / hp.batch_size)
        self.total_steps = self.steps_per_epoch * hp.n_epochs
        warmup = int(hp.warmup_ratio * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: cosine_with_warmup(s, self.total_steps, warmup, hp.min_lr_ratio))
        self.step = 0  # optimizer steps done
        self.micro_step = 0  # micro-batches trained (seeds dropout)
        self._pending: list[list[PackedSequence]] = []  # the rest of the current optimizer step's micro-batches
        self.micro_batches_per_step = 1
        self._norm = 0  # the objective's normaliser of the current optimizer step (SFT: trained targets)
        self._loss_sum = 0.0
        self._metric_sums: dict[str, float] = {}
        self._grad_stash: list[torch.Tensor | None] | None = None
        self.last_train_loss: float | None = None
        self.last_metrics: dict[str, float] = {}  # the objective's report of the last optimizer step
        # data parallelism (trainer/distributed.py): this rank's share of every optimizer step's units, as
        # (rank, world size), and what sums the step's gradients and loss over the ranks before it closes
        self.shard: tuple[int, int] | None = None
        self.all_reduce = None  # Callable[[torch.Tensor], None]: in-place sum over the ranks
        # pipeline parallelism: what gives the gradient norm of the whole adapter from this rank's part of it
        self.global_norm = None  # Callable[[list[torch.Tensor]], torch.Tensor]

    @property
    def is_finished(self) -> bool:
        return self.step >= self.total_steps

    @property
    def in_optimizer_step(self) -> bool:
        """Micro-batches of the current optimizer step remain (gradients are partly accumulated)."""
        return bool(self._pending)

    @property
    def epoch(self) -> int:
        return self.step // self.steps_per_epoch

    def optimizer_batch(self, step: int) -> list[PackedSequence]:
        """The sequences of optimizer step `step`: a per-epoch shuffle seeded by (seed, epoch), so resuming
        at any step sees the same data order."""
        epoch, index = divmod(step, self.steps_per_epoch)
        gen = torch.Generator().manual_seed(self.hp.seed * 100_003 + epoch)
        order = torch.randperm(len(self.train), generator=gen).tolist()
        chosen = order[index * self.hp.batch_size:(index + 1) * self.hp.batch_size]
        return [self.train[i] for i in chosen]

    def next_micro_batch(self) -> tuple[list, int, int]:
        """-> (units, loss normaliser, dropout seed) for this job's share of the next batched step."""
        if self.is_finished:
            raise RuntimeError(f"job {self.job_id} has finished")
        if not self._pending:
            units = self.optimizer_batch(self.step)
            self._pending = self.micro_batches(units)
            self.micro_batches_per_step = len(self._pending) * (1 if self.shard is None else self.shard[1])
            self._norm = self.objective.normaliser(units)
            self._loss_sum = 0.0
            self._metric_sums = {}
            self._grad_stash = None
        else:  # mid-accumulation: what to restore if this micro-batch is dropped (pause)
            self._grad_stash = [None if p.grad is None else p.grad.clone() for p in self.params]
        return self._pending[0], self._norm, self.hp.seed * 7_919 + self.micro_step

    def micro_batches(self, units: list) -> list[list]:
        """An optimizer step's units as this job's micro-batches. Sharded over data-parallel ranks, each rank
        takes every world-th unit and splits its share into as many micro-batches as the largest share needs
        (some possibly empty), so every rank closes the step in the same batched step."""
        m = self.hp.micro_batch_size
        if self.shard is None:
            return [units[i:i + m] for i in range(0, len(units), m)]
        rank, world = self.shard
        mine = units[rank::world]
        count = math.ceil(math.ceil(len(units) / world) / m)
        return [mine[i * m:(i + 1) * m] for i in range(count)]

    def drop_micro_batch(self) -> None:
        """Forget the gradients of a micro-batch whose step went on without this job (it was paused during
        it): the next step runs the same micro-batch again, as if it had never started."""
        if self._grad_stash is None:
            self.optimizer.zero_grad(set_to_none=True)
        else:
            for p, g in zip(self.params, self._grad_stash):
                p.grad = g
        self._grad_stash = None

    def after_backward(self, loss_sum: float, metrics: dict[str, float] | None = None) -> bool:
        """Account one micro-batch whose gradients are now accumulated; step the optimizer when it closes the
        optimizer step. Returns True when an optimizer step was taken."""
        self._pending.pop(0)
        self.micro_step += 1
        self._loss_sum += loss_sum
        self._grad_stash = None
        for k, v in (metrics or {}).items():
            self._metric_sums[k] = self._metric_sums.get(k, 0.0) + v
        if self._pending:
            return False
        if self.all_reduce is not None:
            self._reduce_step()
        self._close_step()
        return True

    def _reduce_step(self) -> None:
        """Data parallelism: the step's gradients, loss and metric sums added up over the ranks (one buffer)."""
        # the same keys on every rank, whatever its share held: the objective's, and a MixLoRA's load-balance loss
        keys = list(self.objective.metric_keys) + (["router_aux_loss"] if hasattr(self.spec, "num_experts") else [])
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch.cat([g.reshape(-1).float() for g in grads] + [
            torch.tensor([self._loss_sum] + [self._metric_sums.get(k, 0.0) for k in keys], dtype=torch.float32,
                         device=self.params[0].device)])
        self.all_reduce(flat)
        at = 0
        for p, g in zip(self.params, grads):
            p.grad = flat[at:at + g.numel()].view_as(g).to(p.dtype)
            at += g.numel()
        tail = flat[at:].tolist()
        self._loss_sum = tail[0]
        self._metric_sums = dict(zip(keys, tail[1:]))

    def close_step(self, loss_sum: float, metric_sums: dict[str, float], num_micro_batches: int, norm: int) -> None:
        """Close an optimizer step whose micro-batches' gradients were accumulated outside next_micro_batch /
        after_backward (a pipeline stage runs several of them at once): `loss_sum` and `metric_sums` over the
        step's micro-batches, `norm` the objective's normaliser of its units."""
        self.micro_step += num_micro_batches
        self._loss_sum, self._metric_sums, self._norm = loss_sum, dict(metric_sums), norm
        self._pending, self._grad_stash = [], None
        self._close_step()

    def _close_step(self) -> None:
        """Clip, step the optimizer and the schedule, account the step."""
        if self.hp.max_grad_norm > 0:
            if self.global_norm is None:
                torch.nn.utils.clip_grad_norm_(self.params, self.hp.max_grad_norm)
            else:  # as clip_grad_norm_, with the norm of the whole adapter (other ranks hold the rest)
                grads = [p.grad for p in self.params if p.grad is not None]
                total = self.global_norm(grads)
                coef = torch.clamp(self.hp.max_grad_norm / (total + 1e-6), max=1.0)
                for g in grads:
                    g.mul_(coef.to(g.dtype))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.last_train_loss = self._loss_sum / self._norm
        aux = self._metric_sums.pop("router_aux_loss", None)  # MixLoRA: the step's load-balance loss, reported apart
        self.last_metrics = self.objective.report(self._metric_sums, self._norm)
        if aux is not None:
            self.last_metrics["router_aux_loss"] = aux

    def keep_layers(self, layers: range) -> None:
        """Drop the parameters of every other decoder layer (a pipeline stage trains its layers only) and start
        the optimizer and the schedule over the rest; call before the first step."""
        if self.step or self.micro_step:
            raise RuntimeError("keep_layers must come before training")
        self.lora.keep_layers(layers)
        self.params = list(self.lora.parameters())
        hp = self.hp
        self.optimizer = torch.optim.AdamW(self.params, lr=hp.learning_rate, betas=(0.9, 0.999), eps=1e-8,
                                           weight_decay=hp.weight_decay)
        warmup = int(hp.warmup_ratio * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: cosine_with_warmup(s, self.total_steps, warmup, hp.min_lr_ratio))


@dataclass(slots=True)
class EarlyStopping:
    """Validation-loss bookkeeping for one job: the best loss and its step, and, when early stopping is on
    (patience > 0), a copy of the adapter at that step, which is what gets published if the job stops early
    (the weights after `patience` evaluations without improvement are worse by definition)."""
    patience: int = 0
    best_loss: float = math.inf
    best_step: int = 0
    best_weights: dict[str, torch.Tensor] | None = None  # PEFT-named fp32 CPU copies
    evals_without_improvement: int = 0

    def update(self, loss: float, job: TrainingJob) -> bool:
        """One evaluation of `job`'s adapter; -> whether the job should stop now."""
        if loss < self.best_loss:
            self.best_loss, self.best_step, self.evals_without_improvement = loss, job.step, 0
            if self.patience:
                self.best_weights = job.lora.peft_state_dict()
            return False
        self.evals_without_improvement += 1
        return bool(self.patience) and self.evals_without_improvement >= self.patience

    @property
    def best_loss_or_none(self) -> float | None:
        return self.best_loss if math.isfinite(self.best_loss) else None
