"""ForwardBatch: one step's flattened tokens and the attention metadata the model consumes.

Token order: all decode tokens (one per request) first, then each prefill chunk contiguously.
The runner builds it from a SchedulerOutput; models only read it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(slots=True)
class PrefillChunk:
    query_start: int  # row of the chunk's first token in the flattened batch
    query_len: int
    kv_slots: torch.Tensor  # [kv_len] int64: flat KV slots of all tokens of the sequence so far
    # [query_len, kv_len] bool, True where attention is allowed (causal with offset kv_len - query_len)
    mask: torch.Tensor | None = None


@dataclass(slots=True)
class PackedSequences:
    """Training layout: every sequence lies whole in this step's rows, from position 0, and attends only to its
    own earlier rows; no KV cache is read or written (engine/layers/attention.py:packed_attention)."""
    cu_seqlens: torch.Tensor  # [B + 1] int64 on the CPU: sequence b owns rows [cu_seqlens[b], cu_seqlens[b + 1])
    # CPU kernel forward (set when the kernels serve this batch): the paged kernel reads k/v as its "cache"
    kernel_slots: torch.Tensor | None = None  # [B, max_len] int64: row of each position of sequence b
    kernel_rows: torch.Tensor | None = None  # [N] int64: each row's sequence
    kernel_lens: torch.Tensor | None = None  # [N] int64: position + 1


@dataclass(slots=True)
class AttentionMetadata:
    num_decode_tokens: int = 0
    decode_kv_slots: torch.Tensor | None = None  # [num_decodes, max_kv_len] int64, padding -> 0
    decode_mask: torch.Tensor | None = None  # [num_decodes, 1, 1, max_kv_len] bool, True = attend
    decode_kv_lens: torch.Tensor | None = None  # [num_decodes] int64
    # derived once per step by the first layer that needs them (every layer shares the metadata):
    decode_kv_rows: torch.Tensor | None = None  # [num_decodes * kv_heads * max_kv_len] rows of cache.view(-1, head_dim)
    decode_bias: torch.Tensor | None = None  # [num_decodes, 1, 1, max_kv_len] float32: 0 or -inf
    prefills: list[PrefillChunk] = field(default_factory=list)
    sliding_window: int | None = None
    # CPU kernel path (engine/kernels/cpu_kernels.py), set instead of the decode_* fields when the runner uses it:
    # every token row attends to the first kernel_lens[t] slots of kernel_slots[kernel_rows[t]]; rows with
    # kernel_lens 0 belong to the (long) prefill chunks in `prefills`, which keep the SDPA path.
    kernel_slots: torch.Tensor | None = None  # [num_requests, max_kv_len] int64
    kernel_rows: torch.Tensor | None = None  # [num_tokens] int64: each token's request
    kernel_lens: torch.Tensor | None = None  # [num_tokens] int64: kv tokens it sees (position + 1), or 0
    packed: PackedSequences | None = None  # training: self-contained sequences, no KV cache (every other field unset)


@dataclass(slots=True)
class ForwardBatch:
    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64
    slot_mapping: torch.Tensor  # [num_tokens] int64: flat KV slot each token's k/v is written to
    attn: AttentionMetadata
    logits_indices: torch.Tensor  # [num_sampled] int64: rows whose logits are needed
    # LoRA seam: per-token adapter slot in the paged pool (-1 = base model); None when no adapters.
    adapter_slots: torch.Tensor | None = None
    # Opaque per-step metadata prepared by the adapter hook (segment offsets etc.).
    adapter_metadata: object | None = None
    # a multi-step decode's second or later step (advance_decode_batch): the same rows, adapters and modules as the
    # step before, one position further; what the model checked for that step still holds
    continued: bool = False

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]


@dataclass(slots=True)
class KVCache:
    """Per-layer paged cache: flat slots = num_blocks * block_size."""
    k: torch.Tensor  # [num_slots, num_kv_heads, head_dim]
    v: torch.Tensor  # [num_slots, num_kv_heads, head_dim]
