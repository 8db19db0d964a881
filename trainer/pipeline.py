"""One rank of mLoRA's LoRA-aware pipeline (trainer/pipeline_schedule.py for the order of its work): it holds a
contiguous range of the base model's decoder layers (the first stage also the embedding, the last the final
norm and head) and every job's LoRA parameters of those layers, and runs micro-batches of several jobs through
them, receiving activations from the stage before and gradients from the stage after over torch.distributed
point-to-point messages (gloo on CPU, NCCL on GPU).

Every rank builds the same micro-batches from the same data (only hidden states and their gradients cross
ranks) and the same schedule, so messages need no header: their shapes and order are known on both sides. The
last stage computes each micro-batch's loss and sends its sums to rank 0, which reports progress. A job's
optimizer step runs on every rank for the parameters it holds, clipped by the norm of the whole adapter (one
all-reduce). A MixLoRA job's load-balance loss needs its router statistics summed over all layers: they travel
forward with the activations and their totals come back with the gradients.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .batch import build_training_batch, num_targets, plan_chunks
from .job import TrainingJob
from .lora_layers import JobMixLoRA
from .mixlora_train import RouterTotals, aux_coefficients, router_totals
from .multi_job import LayerRun, MultiJobTrainer, _Share, run_to_end
from .pipeline_schedule import Schedule, build_schedule

logger = logging.getLogger(__name__)

ACT, GRAD, STATS, ROUTER_FWD, ROUTER_BWD = range(5)  # message kinds, in the tag


@dataclass(slots=True)
class Item:
    """One pipeline micro-batch: a chunk of one job's micro-batch."""
    job: TrainingJob
    group: int  # its optimizer step group (train) or evaluation group
    share: _Share  # the micro-batch (its losses start at zero: this chunk's)
    part: list  # (ordinal in the micro-batch, sequence)
    tokens: int = 0  # the micro-batch's tokens (MixLoRA's load-balance weight)
    micro_batches: int = 1  # of its optimizer step


@dataclass(slots=True)
class GroupPlan:
    job: TrainingJob
    norm: int
    num_micro_batches: int
    loss_sum: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)
    units: int = 0


@dataclass(slots=True)
class InFlight:
    tb: object
    segments: list
    run: LayerRun | None = None
    grad: torch.Tensor | None = None  # the last stage: d(loss)/d(output) from the head
    totals: RouterTotals | None = None  # MixLoRA: router statistics of the layers up to this stage
    aux: dict | None = None


class PipelineStage:
    def __init__(self, trainer: MultiJobTrainer, stage: int, bounds: list[range], device: torch.device) -> None:
        self.trainer, self.stage, self.bounds = trainer, stage, bounds
        self.layers = bounds[stage]
        self.num_stages = len(bounds)
        self.first, self.last = stage == 0, stage == len(bounds) - 1
        self.device = device
        self.hidden = trainer.model_config.hidden_size
        self._sends: list = []
        # the last run's wall time and the part of it this rank was not waiting for another (a message or a step's
        # all-reduce): busy = wall - waiting, so 1 - busy / wall is the stage's bubble
        self.busy_s = 0.0
        self.wall_s = 0.0
        self._wait_s = 0.0
        self.trained_tokens = 0  # trained targets of the micro-batches planned so far (every rank counts them all)

    # ---- planning (the same on every rank) ----------------------------------------------------------
    def plan_training(self, jobs: list[TrainingJob], steps: dict[str, int]) -> tuple[list[Item], dict, dict]:
        """Items of `steps[job]` optimizer steps of each job, fed round-robin by step (job A's step t, job B's
        step t, ..., then step t + 1), each step's micro-batches cut into chunks; -> (items, group -> GroupPlan,
        group -> the group it waits for)."""
        items: list[Item] = []
        groups: dict[int, GroupPlan] = {}
        after: dict[int, int] = {}
        micro_at = {j.job_id: j.micro_step for j in jobs}
        last_group: dict[str, int] = {}
        for t in range(max(steps.values(), default=0)):
            for job in jobs:
                if t >= steps.get(job.job_id, 0):
                    continue
                g = len(groups)
                units = job.optimizer_batch(job.step + t)
                micro = job.micro_batches(units)
                groups[g] = GroupPlan(job, job.objective.normaliser(units), len(micro))
                if job.job_id in last_group:
                    after[g] = last_group[job.job_id]
                last_group[job.job_id] = g
                seqs, policy = job.objective.expand(units)
                self.trained_tokens += num_targets([q for q, p in zip(seqs, policy) if p])
                for mb in micro:
                    seed = job.hp.seed * 7_919 + micro_at[job.job_id]
                    micro_at[job.job_id] += 1
                    seqs, policy = job.objective.expand(mb)
                    random = job.spec.dropout > 0 or getattr(job.spec, "jitter_noise", 0) > 0
                    tokens = sum(len(q.input_ids) for q, p in zip(seqs, policy) if p)
                    for chunk in plan_chunks([seqs], self.trainer.chunk_tokens, [job.objective.group]):
                        share = _Share(job, seqs, policy, groups[g].norm, seed if random else None,
                                       units=job.objective.units(mb))
                        items.append(Item(job, g, share, chunk[0], tokens, len(micro)))
        return items, groups, after

    def plan_evaluation(self, jobs_and_units: list[tuple[TrainingJob, list]]) -> tuple[list[Item], dict]:
        items: list[Item] = []
        groups: dict[int, GroupPlan] = {}
        for g, (job, units) in enumerate(jobs_and_units):
            seqs, policy = job.objective.expand(list(units))
            groups[g] = GroupPlan(job, job.objective.normaliser(list(units)), 1, units=job.objective.units(list(units)))
            for chunk in plan_chunks([seqs], self.trainer.chunk_tokens, [job.objective.group]):
                items.append(Item(job, g, _Share(job, seqs, policy, groups[g].norm, None), chunk[0]))
        return items, groups

    # ---- running ------------------------------------------------------------------------------------
    def train(self, jobs: list[TrainingJob], steps: dict[str, int],
              on_step: Callable[[TrainingJob], None] | None = None) -> Schedule:
        """Run `steps[job]` optimizer steps of every job through the pipeline; `on_step(job)` after each of
        them (rank 0 has its loss)."""
        items, groups, after = self.plan_training(jobs, steps)
        schedule = build_schedule([it.group for it in items], after, self.num_stages, train=True)
        self._execute(schedule, items, groups, True, on_step)
        return schedule

    def evaluate(self, jobs_and_units: list[tuple[TrainingJob, list]]) -> list[dict[str, float]] | None:
        """Every job's validation loss and metrics (rank 0; None elsewhere), forwards only."""
        items, groups = self.plan_evaluation(jobs_and_units)
        schedule = build_schedule([it.group for it in items], {}, self.num_stages, train=False)
        self._execute(schedule, items, groups, False, None)
        if not self.first:
            return None
        out = []
        for g in range(len(groups)):
            plan = groups[g]
            report = plan.job.objective.report(plan.metrics, plan.norm)
            out.append({"loss": plan.loss_sum / plan.units if plan.units else float("nan"), **report})
        return out

    def _execute(self, schedule: Schedule, items: list[Item], groups: dict[int, GroupPlan], train: bool,
                 on_step) -> None:
        t0 = time.perf_counter()
        self._wait_s = 0.0
        flight: dict[int, InFlight] = {}
        done_in_group = {g: 0 for g in groups}
        for op in schedule.stages[self.stage]:
            if op.kind == "F":
                flight[op.index] = self._forward(op.index, items[op.index], train)
                if not train:
                    flight.pop(op.index)
            elif op.kind == "B":
                self._backward(op.index, items[op.index], flight.pop(op.index))
                if self.first:
                    self._take_stats(op.index, items[op.index], groups)
                done_in_group[items[op.index].group] += 1
            else:  # STEP
                plan = groups[op.index]
                t_step = time.perf_counter()
                plan.job.close_step(plan.loss_sum, plan.metrics, plan.num_micro_batches, plan.norm)
                if plan.job.global_norm is not None and plan.job.hp.max_grad_norm > 0:
                    self._wait_s += time.perf_counter() - t_step  # mostly the all-reduce's wait for the other stages
                if on_step is not None:
                    on_step(plan.job)
        if not train and self.first:
            for i, item in enumerate(items):
                self._take_stats(i, item, groups)
        t_end = time.perf_counter()
        self._wait_sends()
        self._wait_s += time.perf_counter() - t_end
        self.wall_s = time.perf_counter() - t0
        self.busy_s = self.wall_s - self._wait_s

    def _forward(self, index: int, item: Item, train: bool) -> InFlight:
        trainer = self.trainer
        tb = build_training_batch([[seq for _, seq in item.part]], trainer.model_config, trainer.dtype, self.device)
        segments = trainer.segments(tb, [item.part], [item.share], train)
        state = InFlight(tb, segments)
        mix = isinstance(item.job.lora, JobMixLoRA)
        if self.first:
            x, cos, sin = trainer.embed(tb, segments)
        else:
            x = self._recv((tb.num_tokens, self.hidden), trainer.dtype, self.stage - 1, index, ACT)
            cos, sin = trainer.rotary(tb, x.dtype)
            carried = self._recv((2 * item.job.spec.num_experts + 2,), torch.float64, self.stage - 1, index,
                                 ROUTER_FWD) if mix and train else None
        trainer.state.router_stats.clear()
        trainer.state.jitter = train
        run = run_to_end(trainer.forward_layers(tb, segments, x, cos, sin, self.layers, train,
                                                grad_input=not self.first))
        state.run = run
        if mix and train:
            state.totals = router_totals(run.router_stats).get(id(item.job.lora)) or _no_routing(item.job, self.device)
            if not self.first:
                state.totals.add_packed(carried)
        if self.last:
            shares = [item.share]
            aux_value = 0.0
            if state.totals is not None and state.totals.entries:
                state.aux, values = aux_coefficients({id(item.job.lora): state.totals}, self._aux_weight(item))
                aux_value = values.get(id(item.job.lora), 0.0)
            ordinals = [torch.tensor([k for k, _ in item.part], dtype=torch.int64, device=self.device)]
            state.grad = run_to_end(trainer.head(tb, segments, run.out, shares, ordinals, train))
            if state.grad is None and train:  # no target in this chunk: nothing flows back
                state.grad = torch.zeros_like(run.out)
            self._send(self._stats(item, aux_value), 0, index, STATS)
        else:
            self._send(run.out, self.stage + 1, index, ACT)
            if state.totals is not None:
                self._send(state.totals.pack(), self.stage + 1, index, ROUTER_FWD)
        return state

    def _backward(self, index: int, item: Item, state: InFlight) -> None:
        if self.last:
            grad, aux = state.grad, state.aux
        else:
            grad = self._recv(tuple(state.run.out.shape), state.run.out.dtype, self.stage + 1, index, GRAD)
            aux = None
            if state.totals is not None:
                totals = self._recv((state.totals.counts.numel() * 2 + 2,), torch.float64, self.stage + 1, index,
                                    ROUTER_BWD)
                e = state.totals.counts.numel()
                state.totals.counts, state.totals.p_sum = totals[:e].clone(), totals[e:2 * e].clone()
                state.totals.entries = int(totals[2 * e + 1])
                aux, _ = aux_coefficients({id(item.job.lora): state.totals}, self._aux_weight(item))
        g_in = run_to_end(self.trainer.backward_layers(state.tb, state.segments, state.run, grad, aux or {}))
        if not self.first:
            self._send(g_in, self.stage - 1, index, GRAD)
            if state.totals is not None:
                self._send(state.totals.pack(), self.stage - 1, index, ROUTER_BWD)

    @staticmethod
    def _aux_weight(item: Item):
        """MixLoRA: a chunk's share of its micro-batch's tokens over the micro-batches of its optimizer step."""
        return lambda lora, n: n / max(1, item.tokens) / max(1, item.micro_batches)

    # ---- loss reports: the last stage -> rank 0 -------------------------------------------------------
    def _stats(self, item: Item, aux_value: float) -> torch.Tensor:
        share = item.share
        values = [share.loss_sum, aux_value] + [share.metrics.get(k, 0.0) for k in item.job.objective.metric_keys]
        return torch.tensor(values, dtype=torch.float64, device=self.device)

    def _take_stats(self, index: int, item: Item, groups: dict[int, GroupPlan]) -> None:
        keys = item.job.objective.metric_keys
        values = self._recv((2 + len(keys),), torch.float64, self.num_stages - 1, index, STATS).tolist()
        plan = groups[item.group]
        plan.loss_sum += values[0]
        if isinstance(item.job.lora, JobMixLoRA):
            plan.metrics["router_aux_loss"] = plan.metrics.get("router_aux_loss", 0.0) + values[1]
        for k, v in zip(keys, values[2:]):
            plan.metrics[k] = plan.metrics.get(k, 0.0) + v

    # ---- messages -----------------------------------------------------------------------------------
    def _send(self, tensor: torch.Tensor, dst: int, index: int, kind: int) -> None:
        tensor = tensor.detach().contiguous()
        self._sends.append((dist.isend(tensor, dst, tag=index * 8 + kind), tensor))
        if len(self._sends) > 64:
            self._sends = [(w, t) for w, t in self._sends if not w.is_completed()]

    def _recv(self, shape: tuple, dtype: torch.dtype, src: int, index: int, kind: int) -> torch.Tensor:
        buf = torch.empty(shape, dtype=dtype, device=self.device)
        t0 = time.perf_counter()
        dist.recv(buf, src, tag=index * 8 + kind)
        self._wait_s += time.perf_counter() - t0
        return buf

    def _wait_sends(self) -> None:
        for work, _ in self._sends:
            work.wait()
        self._sends = []


def _no_routing(job: TrainingJob, device: torch.device) -> RouterTotals:
    """A MixLoRA job's router totals before any of its layers ran (nothing recorded yet)."""
    e = job.spec.num_experts
    z = torch.zeros(e, dtype=torch.float64, device=device)
    return RouterTotals(job.lora, z, z.clone(), 0, 0)
