"""One training step's flattened batch: every job's micro-batch stacked (rows of a job contiguous), each
packed example its own causal sequence, and the per-job token-level loss.

The forward runs through the engine's own model and attention code: each example is a "prefill" from
position 0 over a scratch KV cache that exists only for this step (the served KV cache is never touched),
so no second copy of the model or of its attention exists for training.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from loraplex.engine.attention import allocate_kv_caches, build_forward_batch
from loraplex.engine.forward_batch import ForwardBatch, KVCache

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
    kv_caches: list[KVCache]  # scratch, one per layer, exactly num_tokens slots
    segments: list[tuple[int, int]]  # per job: its rows [start, end)
    target_rows: torch.Tensor  # [num_targets] rows whose next token is trained
    targets: torch.Tensor  # [num_targets] the next token ids
    target_job: torch.Tensor  # [num_targets] index of the job each target belongs to

    @property
    def num_tokens(self) -> int:
        return self.batch.num_tokens


def build_training_batch(per_job: Sequence[Sequence[PackedSequence]], model_config, dtype: torch.dtype,
                         device: torch.device) -> TrainingBatch:
    input_ids: list[int] = []
    query_lens: list[int] = []
    tables: list[range] = []
    segments: list[tuple[int, int]] = []
    rows: list[int] = []
    targets: list[int] = []
    target_job: list[int] = []
    for j, seqs in enumerate(per_job):
        start = len(input_ids)
        for seq in seqs:
            for ids, labels in sub_sequences(seq):
                if len(ids) < 2:  # nothing to predict
                    continue
                base = len(input_ids)
                for i in range(len(ids) - 1):
                    if labels[i + 1] != IGNORE_INDEX:
                        rows.append(base + i)
                        targets.append(labels[i + 1])
                        target_job.append(j)
                input_ids += ids
                query_lens.append(len(ids))
                tables.append(range(base, base + len(ids)))  # block_size 1: slot = row
        segments.append((start, len(input_ids)))
    if not query_lens:
        raise ValueError("the training batch has no sequence with a token to predict")
    batch = build_forward_batch(input_ids, query_lens, [0] * len(query_lens), tables, block_size=1, device=device,
                                logits_indices=[0], sliding_window=model_config.sliding_window)
    kv = allocate_kv_caches(model_config.num_hidden_layers, len(input_ids), model_config.num_key_value_heads,
                            model_config.head_dim, dtype, device)
    as_tensor = lambda v: torch.tensor(v, dtype=torch.int64, device=device)  # noqa: E731
    return TrainingBatch(batch, kv, segments, as_tensor(rows), as_tensor(targets), as_tensor(target_job))


def per_job_loss_sums(model: nn.Module, tb: TrainingBatch, num_jobs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward the batch; -> (sum of token cross-entropies per job [num_jobs] fp32, targets per job [num_jobs]).
    Logits are computed only for trained rows."""
    hidden = model(tb.batch, tb.kv_caches)  # [num_tokens, hidden]
    logits = model.compute_logits(hidden.index_select(0, tb.target_rows)).float()  # [num_targets, vocab]
    ce = F.cross_entropy(logits, tb.targets, reduction="none")  # [num_targets]
    sums = torch.zeros(num_jobs, dtype=torch.float32, device=ce.device).index_add(0, tb.target_job, ce)
    counts = torch.bincount(tb.target_job, minlength=num_jobs)
    return sums, counts
