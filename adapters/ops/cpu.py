"""The fast plain-torch batched LoRA op (CPU, and CUDA without Triton): segment-padded batched matmuls.

Rows are grouped by adapter (one segment each, see ops/meta.py). Short segments (decodes) go through
one padded `bmm` pair per linear: segments longer than the average are split so padding stays below
2x, and an adapter's pages are gathered once per segment instead of once per token (the reference's
per-token gather reads max_rank x in_features weights for every row). Long contiguous segments
(prefill chunks) are plain matmuls on a view of x. The expand is an `embedding_bag` over the pool:
each row's delta is the h-weighted sum of its pages' B rows, read in place (no gathered copy of B).
Six torch ops per linear, whatever the number of adapters. `benchmarks/bench_lora_ops.py` compares it with the reference formulation.
When the CPU kernels are loaded (engine/cpu_kernels.py), the short segments take one C++ call instead
(engine/csrc/cpu_lora.cpp: each row's h and delta in float32, pages read in place); long ones stay matmuls.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loraplex.adapters.ops.meta import ZERO_PAGE, LoRABatchMeta
from loraplex.engine import cpu_kernels

LONG_SEGMENT_TOKENS = 128  # contiguous segments longer than this are matmuls of their own (no padding)


@dataclass(slots=True)
class CpuLayout:
    num_bmm_segments: int
    bmm_len: int  # padded tokens per bmm segment
    bmm_x_rows: torch.Tensor | None  # [num_bmm_segments * bmm_len] rows of x (padding repeats a real row)
    bmm_pages: torch.Tensor | None  # [num_bmm_segments * rank] pages, padded with ZERO_PAGE
    bmm_rank: int
    bmm_valid: torch.Tensor | None  # [n] positions in the padded [segments * bmm_len] order that are real
    bmm_token_rows: torch.Tensor | None  # [n] the batch rows they belong to
    bmm_token_pages: torch.Tensor | None  # [n, rank] each of those rows' pages (the expand's bags)
    dense: list[tuple[int, int, torch.Tensor]]  # (first row, end row, pages [rank]) of long segments
    # the short segments unsplit, for the C++ kernel (engine/csrc/cpu_lora.cpp): rows, starts, pages, ranks
    kernel: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None


def cpu_layout(meta: LoRABatchMeta) -> CpuLayout:
    layout = meta.cache.get("cpu")
    if layout is None:
        layout = meta.cache["cpu"] = _build_layout(meta)
    return layout


def _build_layout(meta: LoRABatchMeta) -> CpuLayout:
    rows = meta.token_rows.tolist()
    starts = meta.seg_starts_list
    pages = meta.seg_pages.tolist()
    ranks = meta.seg_ranks.tolist()
    device = meta.token_rows.device
    dense: list[tuple[int, int, torch.Tensor]] = []
    short: list[tuple[list[int], list[int]]] = []  # (rows, pages) of bmm segments
    for s in range(meta.num_segments):
        seg_rows, seg_pages = rows[starts[s]:starts[s + 1]], pages[s][:ranks[s]]
        if len(seg_rows) > LONG_SEGMENT_TOKENS and meta.seg_rows_contiguous[s]:
            dense.append((seg_rows[0], seg_rows[-1] + 1, torch.tensor(seg_pages, dtype=torch.int64, device=device)))
        else:
            short.append((seg_rows, seg_pages))
    if not short:
        return CpuLayout(0, 0, None, None, 0, None, None, None, dense)
    kernel_rank = max(len(p) for _, p in short)
    kernel_starts = [0]
    for r, _ in short:
        kernel_starts.append(kernel_starts[-1] + len(r))
    kernel = tuple(torch.tensor(data, dtype=torch.int64, device=device) for data in (
        [row for r, _ in short for row in r], kernel_starts,
        [p + [ZERO_PAGE] * (kernel_rank - len(p)) for _, p in short], [len(p) for _, p in short]))
    # split long segments so that no segment is longer than the mean: padding costs < 2x
    num_rows = sum(len(r) for r, _ in short)
    cap = max(1, -(-num_rows // len(short)))
    pieces = [(r[i:i + cap], p) for r, p in short for i in range(0, len(r), cap)]
    bmm_len = max(len(r) for r, _ in pieces)
    rank = max(len(p) for _, p in pieces)
    x_rows, flat_pages, valid, token_rows, token_pages = [], [], [], [], []
    for s, (r, p) in enumerate(pieces):
        padded = p + [ZERO_PAGE] * (rank - len(p))
        x_rows.extend(r + [r[0]] * (bmm_len - len(r)))
        flat_pages.extend(padded)
        valid.extend(range(s * bmm_len, s * bmm_len + len(r)))
        token_rows.extend(r)
        token_pages.extend([padded] * len(r))

    def t(data: list[int]) -> torch.Tensor:
        return torch.tensor(data, dtype=torch.int64, device=device)

    return CpuLayout(len(pieces), bmm_len, t(x_rows), t(flat_pages), rank, t(valid), t(token_rows),
                     t(token_pages), dense, kernel)


def _use_kernel(y: torch.Tensor, x: torch.Tensor, a_pool: torch.Tensor, b_pool: torch.Tensor) -> bool:
    return (y.device.type == "cpu" and y.dtype in (torch.float32, torch.bfloat16)
            and x.dtype == a_pool.dtype == b_pool.dtype == y.dtype and y.stride(-1) == 1 and x.stride(-1) == 1
            and not torch.is_grad_enabled() and cpu_kernels.loaded())


def lora_apply_cpu(y: torch.Tensor, x: torch.Tensor, a_pool: torch.Tensor, b_pool: torch.Tensor,
                   meta: LoRABatchMeta) -> None:
    """y [num_tokens, out] += B[a] · (A[a] · x) for every LoRA row, in place (scale is in b_pool)."""
    layout = cpu_layout(meta)
    if layout.kernel is not None and _use_kernel(y, x, a_pool, b_pool):
        torch.ops.loraplex_cpu.lora_apply_(y, x, a_pool, b_pool, *layout.kernel)
    elif layout.num_bmm_segments:
        s, t, r = layout.num_bmm_segments, layout.bmm_len, layout.bmm_rank
        xs = x.index_select(0, layout.bmm_x_rows).view(s, t, x.shape[1])  # [segments, tokens, in]
        a = a_pool.index_select(0, layout.bmm_pages).view(s, r, a_pool.shape[1])  # [segments, rank, in]
        h = torch.bmm(xs, a.transpose(1, 2)).view(s * t, r).index_select(0, layout.bmm_valid)  # [n, rank]
        # expand without copying B: each row's delta is the h-weighted sum of its pages' B rows
        delta = F.embedding_bag(layout.bmm_token_pages, b_pool, per_sample_weights=h, mode="sum")  # [n, out]
        y.index_add_(0, layout.bmm_token_rows, delta)
    for start, end, pages in layout.dense:
        h = x[start:end] @ a_pool.index_select(0, pages).t()  # [tokens, rank]
        y[start:end].addmm_(h, b_pool.index_select(0, pages))
