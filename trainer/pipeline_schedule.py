"""mLoRA's LoRA-aware pipeline schedule (LoRAPP, shared/research/mixlora-and-mlora.md §4): the order in which every
pipeline stage runs the forwards (F), backwards (B) and optimizer steps (STEP) of a stream of micro-batches that
belong to several independent LoRA jobs.

A job's micro-batches of one optimizer step have no dependency on each other (their gradients add up); its next
optimizer step's micro-batches must wait for that step's weights on each stage. Micro-batches of *different*
jobs never wait on each other, so with as many jobs as stages the pipeline has no bubble: the bubble ratio is
mLoRA's max((D - L) / D, 0) for D stages and L jobs of one micro-batch each.

The schedule is simulated in unit time slots, the same on every rank, so each rank knows its own op list and
the order of every message without asking: a stage runs at most one F or B per slot; F goes in feed order and
needs the previous stage's F of that micro-batch (an earlier slot) and the job's previous optimizer step done;
B needs the next stage's B (the last stage: its own F); backwards go first (1F1B), and a stage keeps at most
D - s forwards waiting for their backward (1F1B's memory bound). A job's STEP comes on every stage right after
the slot in which the last backward of its optimizer step finishes on stage 0: it is a collective (the global
gradient norm for clipping), placed at the same point of every rank's list, so no rank waits on a message that
is sent after it.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Op:
    kind: str  # "F", "B" or "STEP"
    index: int  # the micro-batch (F, B) or the optimizer step group (STEP)
    slot: int  # the simulated time slot


@dataclass(frozen=True, slots=True)
class Schedule:
    stages: list[list[Op]]  # per stage, its ops in order
    num_slots: int

    def busy_slots(self, stage: int) -> int:
        return sum(1 for op in self.stages[stage] if op.kind != "STEP")

    def bubble(self, stage: int) -> float:
        """The fraction of the schedule's slots this stage idles."""
        return 1.0 - self.busy_slots(stage) / self.num_slots if self.num_slots else 0.0


def mlora_bubble(num_stages: int, num_jobs: int, micro_batches: int = 1) -> float:
    """The bubble ratio of mLoRA's paper: max((D - 1 + N - L·N) / (D + N - 1), 0) for D stages and L jobs whose
    mini-batches are split into N micro-batches; with N = 1, max((D - L) / D, 0)."""
    d, n, lj = num_stages, micro_batches, num_jobs
    return max((d - 1 + n - lj * n) / (d + n - 1), 0.0)


def build_schedule(groups: list[int], after: dict[int, int], num_stages: int, train: bool = True) -> Schedule:
    """The per-stage op lists for micro-batches fed in order; `groups[i]` is micro-batch i's optimizer step group
    (one job's one optimizer step), `after[g]` the group that must have stepped before group g's micro-batches
    start (the same job's previous step; absent for a job's first step in the schedule). Without `train` there
    are forwards only (evaluation)."""
    n, d = len(groups), num_stages
    if d < 1:
        raise ValueError("a pipeline needs at least one stage")
    members: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    f_done = [[-1] * n for _ in range(d)]  # the slot in which F of micro-batch i finished on stage s (-1: not yet)
    b_done = [[-1] * n for _ in range(d)]
    step_done: dict[int, int] = {}  # group -> the slot after which it stepped
    next_f = [0] * d
    in_flight = [0] * d
    left_in_group = {g: len(m) for g, m in members.items()}
    ops: list[list[Op]] = [[] for _ in range(d)]
    slot = 0
    total = n * d * (2 if train else 1)
    done = 0
    while done < total:
        progressed = False
        for s in range(d):
            op = None
            if train:  # backward first: the oldest micro-batch whose gradient has arrived
                for i in range(next_f[s]):
                    if b_done[s][i] >= 0:
                        continue
                    ready = f_done[s][i] if s == d - 1 else b_done[s + 1][i]
                    if 0 <= ready < slot:
                        op = Op("B", i, slot)
                        break
            if op is None and next_f[s] < n:
                i = next_f[s]
                prev_ok = s == 0 or 0 <= f_done[s - 1][i] < slot
                g = groups[i]
                dep = after.get(g)
                dep_ok = dep is None or (dep in step_done and step_done[dep] < slot)
                room = not train or in_flight[s] < d - s
                if prev_ok and dep_ok and room:
                    op = Op("F", i, slot)
            if op is None:
                continue
            ops[s].append(op)
            done += 1
            progressed = True
            if op.kind == "F":
                f_done[s][op.index] = slot
                next_f[s] += 1
                in_flight[s] += train
            else:
                b_done[s][op.index] = slot
                in_flight[s] -= 1
        if train:  # groups whose last backward on stage 0 finished in this slot step now, on every stage
            for op in [o for o in ops[0] if o.slot == slot and o.kind == "B"]:
                g = groups[op.index]
                left_in_group[g] -= 1
                if left_in_group[g] == 0:
                    step_done[g] = slot
                    for s in range(d):
                        ops[s].append(Op("STEP", g, slot))
        if not progressed:  # readiness only changes through ops, so nothing ever would
            raise RuntimeError("the pipeline schedule is stuck: a group depends on one that never steps")
        slot += 1
    return Schedule(ops, slot)

