"""The fast plain-torch batched LoRA op (CPU, and CUDA without Triton): segment-padded batched matmuls.

Rows are grouped by adapter (one segment each, see ops/meta.py). Short segments (decodes) go through
one padded `bmm` pair per linear: segments longer than the average are split so padding stays below
2x, and an adapter's pages are gathered once per segment instead of once per token (the reference's
per-token gather reads max_rank x in_features weights for every row). Long contiguous segments
(prefill chunks) are plain matmuls on a view of x. The expand is an `embedding_bag` over the pool:
each row's delta is the h-weighted sum of its pages' B rows, read in place (no gathered copy of B).
Six torch ops per linear, whatever the number of adapters. `scripts/bench/bench_lora_ops.py` compares it with the reference formulation.
When the CPU kernels are loaded (engine/kernels/cpu_kernels.py), the short segments take one C++ call instead
(engine/kernels/csrc/cpu_lora.cpp: each row's h and delta in float32, pages read in place); long ones stay matmuls.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loraplex.adapters.ops.meta import ZERO_PAGE, LoRABatchMeta
from loraplex.engine.kernels import cpu_kernels

LONG_SEGMENT_TOKENS = 128  # contiguous segments longer than this are matmuls of their own (no padding)


@dataclass(slots=True)
class BmmLayout:
    num_segments: int
    seg_len: int  # padded tokens per bmm segment
    x_rows: torch.Tensor  # [num_segments * seg_len] rows of x (padding repeats a real row)
    pages: torch.Tensor  # [num_segments * rank] pages, padded with ZERO_PAGE
    rank: int
    valid: torch.Tensor  # [n] positions in the padded [segments * seg_len] order that are real
    token_rows: torch.Tensor  # [n] the batch rows they belong to
    token_pages: torch.Tensor  # [n, rank] each of those rows' pages (the expand's bags)


@dataclass(slots=True)
class CpuLayout:
    short: list[tuple[list[int], list[int]]]  # (rows, pages) of the short segments
    dense: list[tuple[int, int, torch.Tensor]]  # (first row, end row, pages [rank]) of long segments
    # the short segments for the C++ kernel (engine/kernels/csrc/cpu_lora.cpp): rows, starts, pages, ranks
    kernel: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None
    device: torch.device
    _bmm: BmmLayout | None = None

    def bmm(self) -> BmmLayout | None:
        """The padded batched-matmul layout of the short segments, built on first use (the torch-ops path)."""
        if self._bmm is None and self.short:
            self._bmm = _build_bmm(self.short, self.device)
        return self._bmm


def cpu_layout(meta: LoRABatchMeta) -> CpuLayout:
    layout = meta.cache.get("cpu")
    if layout is None:
        layout = meta.cache["cpu"] = _build_layout(meta)
    return layout


def _t(data: list, device: torch.device) -> torch.Tensor:
    return torch.tensor(data, dtype=torch.int64, device=device)


def _build_layout(meta: LoRABatchMeta) -> CpuLayout:
    rows = meta.token_rows.tolist()
    starts = meta.seg_starts_list
    pages = meta.seg_pages.tolist()
    ranks = meta.seg_ranks.tolist()
    device = meta.token_rows.device
    dense: list[tuple[int, int, torch.Tensor]] = []
    short: list[tuple[list[int], list[int]]] = []
    for s in range(meta.num_segments):
        seg_rows, seg_pages = rows[starts[s]:starts[s + 1]], pages[s][:ranks[s]]
        if len(seg_rows) > LONG_SEGMENT_TOKENS and meta.seg_rows_contiguous[s]:
            dense.append((seg_rows[0], seg_rows[-1] + 1, _t(seg_pages, device)))
        else:
            short.append((seg_rows, seg_pages))
    if not short:
        return CpuLayout(short, dense, None, device)
    kernel_rank = max(len(p) for _, p in short)
    kernel_starts = [0]
    for r, _ in short:
        kernel_starts.append(kernel_starts[-1] + len(r))
    kernel = (_t([row for r, _ in short for row in r], device), _t(kernel_starts, device),
              _t([p + [ZERO_PAGE] * (kernel_rank - len(p)) for _, p in short], device),
              _t([len(p) for _, p in short], device))
    return CpuLayout(short, dense, kernel, device)


def _build_bmm(short: list[tuple[list[int], list[int]]], device: torch.device) -> BmmLayout:
    # split long segments so that no segment is longer than the mean: padding costs < 2x
    num_rows = sum(len(r) for r, _ in short)
    cap = max(1, -(-num_rows // len(short)))
    pieces = [(r[i:i + cap], p) for r, p in short for i in range(0, len(r), cap)]
    seg_len = max(len(r) for r, _ in pieces)
    rank = max(len(p) for _, p in pieces)
    x_rows, flat_pages, valid, token_rows, token_pages = [], [], [], [], []
    for s, (r, p) in enumerate(pieces):
        padded = p + [ZERO_PAGE] * (rank - len(p))
        x_rows.extend(r + [r[0]] * (seg_len - len(r)))
        flat_pages.extend(padded)
        valid.extend(range(s * seg_len, s * seg_len + len(r)))
        token_rows.extend(r)
        token_pages.extend([padded] * len(r))
    return BmmLayout(len(pieces), seg_len, _t(x_rows, device), _t(flat_pages, device), rank, _t(valid, device),
                     _t(token_rows, device), _t(token_pages, device))


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
    elif (bmm := layout.bmm()) is not None:
        s, t, r = bmm.num_segments, bmm.seg_len, bmm.rank
        xs = x.index_select(0, bmm.x_rows).view(s, t, x.shape[1])  # [segments, tokens, in]
        a = a_pool.index_select(0, bmm.pages).view(s, r, a_pool.shape[1])  # [segments, rank, in]
        h = torch.bmm(xs, a.transpose(1, 2)).view(s * t, r).index_select(0, bmm.valid)  # [n, rank]
        # expand without copying B: each row's delta is the h-weighted sum of its pages' B rows
        delta = F.embedding_bag(bmm.token_pages, b_pool, per_sample_weights=h, mode="sum")  # [n, out]
        y.index_add_(0, bmm.token_rows, delta)
    for start, end, pages in layout.dense:
        h = x[start:end] @ a_pool.index_select(0, pages).t()  # [tokens, rank]
        y[start:end].addmm_(h, b_pool.index_select(0, pages))
