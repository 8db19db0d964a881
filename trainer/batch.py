"""One training step's flattened batch: every job's micro-batch stacked (rows of a job contiguous), each
packed example its own causal sequence, and the per-job token-level loss.

The forward runs through the engine's own model and attention code: each example is a whole sequence from
position 0 that attends only to its own rows (engine/layers/attention.py:packed_attention: no KV cache at all, the
served one is never touched), so no second copy of the model or of its attention exists for training.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from loraplex.engine.kernels import cpu_kernels
from loraplex.engine.layers.attention import build_packed_batch
from loraplex.engine.layers.forward_batch import ForwardBatch

from .data import PackedSequence

IGNORE_INDEX = -100


def sub_sequences(seq: PackedSequence) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) of each example packed into `seq`."""
    out, start = [], 0
    for n in seq.seq_lens:
        out.append((seq.input_ids[start:start + n], seq.labels[start:start + n]))
        start += n
    return out


def num_targets(seqs: Sequence[PackedSequence]) -> int:
    """Trained next-token predictions: positions whose next label (inside the same example) is kept."""
    return sum(sum(1 for lab in labels[1:] if lab != IGNORE_INDEX)
               for seq in seqs for _, labels in sub_sequences(seq))


@dataclass(slots=True)
class TrainingBatch:
    batch: ForwardBatch
    kv_caches: list[None]  # one per layer, for model(batch, kv_caches): packed attention reads no cache
    segments: list[tuple[int, int]]  # per job: its rows [start, end)
    sequence_rows: list[list[tuple[int, int]]]  # per job: the rows [start, end) of each of its sequences
    target_rows: torch.Tensor  # [num_targets] rows whose next token is trained
    targets: torch.Tensor  # [num_targets] the next token ids
    target_job: torch.Tensor  # [num_targets] index of the job each target belongs to
    target_seq: torch.Tensor  # [num_targets] index of the target's sequence in its job's list
    # distillation targets, when a sequence of the batch has them (SoftTargets): [num_targets, k] token ids and
    # probabilities, [num_targets] the mass outside them; a plain target is its token with probability 1
    soft: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @property
    def num_tokens(self) -> int:
        return self.batch.num_tokens


def build_training_batch(per_job: Sequence[Sequence[PackedSequence]], model_config, dtype: torch.dtype,
                         device: torch.device) -> TrainingBatch:
    input_ids: list[int] = []
    query_lens: list[int] = []
    segments: list[tuple[int, int]] = []
    sequence_rows: list[list[tuple[int, int]]] = []
    rows: list[int] = []
    targets: list[int] = []
    target_job: list[int] = []
    target_seq: list[int] = []
    for j, seqs in enumerate(per_job):
        start = len(input_ids)
        sequence_rows.append([])
        for k, seq in enumerate(seqs):
            seq_start = len(input_ids)
            for ids, labels in sub_sequences(seq):
                if len(ids) < 2:  # nothing to predict
                    continue
                base = len(input_ids)
                for i in range(len(ids) - 1):
                    if labels[i + 1] != IGNORE_INDEX:
                        rows.append(base + i)
                        targets.append(labels[i + 1])
                        target_job.append(j)
                        target_seq.append(k)
                input_ids += ids
                query_lens.append(len(ids))
            sequence_rows[j].append((seq_start, len(input_ids)))
        segments.append((start, len(input_ids)))
    if not query_lens:
        raise ValueError("the training batch has no sequence with a token to predict")
    kernel = device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and cpu_kernels.available()
    batch = build_packed_batch(input_ids, query_lens, device, model_config.sliding_window, cpu_kernel=kernel)
    kv = [None] * model_config.num_hidden_layers
    as_tensor = lambda v: torch.tensor(v, dtype=torch.int64, device=device)  # noqa: E731
    return TrainingBatch(batch, kv, segments, sequence_rows, as_tensor(rows), as_tensor(targets), as_tensor(target_job),
                         as_tensor(target_seq), _soft_targets(per_job, targets, device))


def _soft_targets(per_job: Sequence[Sequence[PackedSequence]], targets: list[int], device: torch.device):
    """TrainingBatch.soft: every sequence's SoftTargets (or its labels as one-hot rows), in target order."""
    softs = [seq.soft for seqs in per_job for seq in seqs if has_target(seq)]
    if all(s is None for s in softs):
        return None
    k = max(s.ids.shape[1] for s in softs if s is not None)
    ids = torch.tensor(targets, dtype=torch.int64).unsqueeze(1).repeat(1, k)  # [num_targets, k]
    probs = torch.zeros(len(targets), k, dtype=torch.float32)
    probs[:, 0] = 1.0
    tail = torch.zeros(len(targets), dtype=torch.float32)
    at = 0
    for seqs in per_job:
        for seq in seqs:
            if not has_target(seq):
                continue
            n = num_targets([seq])
            if seq.soft is not None:
                if seq.soft.ids.shape[0] != n:
                    raise ValueError(f"a sequence has {n} targets but soft targets for {seq.soft.ids.shape[0]}")
                kk = seq.soft.ids.shape[1]
                ids[at:at + n, :kk] = seq.soft.ids
                probs[at:at + n] = 0.0
                probs[at:at + n, :kk] = seq.soft.probs
                tail[at:at + n] = seq.soft.tail
            at += n
    return ids.to(device), probs.to(device), tail.to(device)


def has_target(seq: PackedSequence) -> bool:
    return any(len(ids) >= 2 for ids, _ in sub_sequences(seq))


def plan_chunks(per_job: Sequence[Sequence[PackedSequence]], max_tokens: int,
                groups: Sequence[int] | None = None) -> list[list[list[tuple[int, PackedSequence]]]]:
    """Split one step's micro-batches into chunks of whole sequences of about `max_tokens` tokens (a longer
    sequence is a chunk of its own), each chunk a list per job of (ordinal in the job's micro-batch,
    sequence); jobs keep their order, so a job's rows stay contiguous in every chunk. `groups[j]`: job j's
    sequences go in runs of that many that share a chunk (a DPO pair's four). Sequences with nothing to
    predict are left out. Gradients summed over the chunks equal those of the whole step."""
    chunks: list[list[list[tuple[int, PackedSequence]]]] = []
    current: list[list[tuple[int, PackedSequence]]] = [[] for _ in per_job]
    tokens = 0
    for j, seqs in enumerate(per_job):
        g = groups[j] if groups is not None else 1
        for start in range(0, len(seqs), g):
            unit = [(k, seq) for k, seq in enumerate(seqs[start:start + g], start) if has_target(seq)]
            size = sum(len(seq.input_ids) for _, seq in unit)
            if not unit:
                continue
            if tokens and tokens + size > max_tokens:
                chunks.append(current)
                current, tokens = [[] for _ in per_job], 0
            current[j] += unit
            tokens += size
    if tokens:
        chunks.append(current)
    return chunks
