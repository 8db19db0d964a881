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
    token_scales: torch.Tensor | None  # [n, rank] float32 multipliers of h (page x row scales); None: all 1


@dataclass(slots=True)
class CpuLayout:
    short: list[Segment]  # the short segments
    # long segments: first row, end row, pages [rank], h's multipliers [tokens, rank] float32 (None: all 1)
    dense: list[tuple[int, int, torch.Tensor, torch.Tensor | None]]
    # the short segments for the C++ kernel (engine/kernels/csrc/cpu_lora.cpp): rows, starts, pages, ranks,
    # page scales [S, rank] and row scales [rows] (float32; empty: all 1)
    kernel: tuple[torch.Tensor, ...] | None
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
    page_scales = None if meta.seg_scales is None else meta.seg_scales.tolist()
    row_scales = None if meta.row_scales is None else meta.row_scales.tolist()
    device = meta.token_rows.device
    dense: list[tuple[int, int, torch.Tensor, torch.Tensor | None]] = []
    short: list[Segment] = []
    for s in range(meta.num_segments):
        seg = Segment(rows[starts[s]:starts[s + 1]], pages[s][:ranks[s]],
                      None if page_scales is None else page_scales[s][:ranks[s]],
                      None if row_scales is None else row_scales[starts[s]:starts[s + 1]])
        if len(seg.rows) > LONG_SEGMENT_TOKENS and meta.seg_rows_contiguous[s]:
            scales = seg.h_scales()
            dense.append((seg.rows[0], seg.rows[-1] + 1, _t(seg.pages, device),
                          None if scales is None else torch.tensor(scales, dtype=torch.float32, device=device)))
        else:
            short.append(seg)
    if not short:
        return CpuLayout(short, dense, None, device)
    kernel_rank = max(len(seg.pages) for seg in short)
    kernel_starts = [0]
    for seg in short:
        kernel_starts.append(kernel_starts[-1] + len(seg.rows))
    no_scales = torch.empty(0, dtype=torch.float32, device=device)
    kernel = (_t([row for seg in short for row in seg.rows], device), _t(kernel_starts, device),
              _t([seg.pages + [ZERO_PAGE] * (kernel_rank - len(seg.pages)) for seg in short], device),
              _t([len(seg.pages) for seg in short], device),
              no_scales if page_scales is None else torch.tensor(
                  [(seg.page_scales or []) + [0.0] * (kernel_rank - len(seg.pages)) for seg in short],
                  dtype=torch.float32, device=device),
              no_scales if row_scales is None else torch.tensor(
                  [v for seg in short for v in seg.row_scales], dtype=torch.float32, device=device))
    return CpuLayout(short, dense, kernel, device)


@dataclass(slots=True)
class Segment:
    rows: list[int]
    pages: list[int]
    page_scales: list[float] | None = None  # one per page
    row_scales: list[float] | None = None  # one per row

    def h_scales(self, rows: slice = slice(None), rank: int | None = None) -> list[list[float]] | None:
        """Per row (of `rows`), the multipliers of its h, padded with 0 to `rank` (None when all are 1)."""
        if self.page_scales is None and self.row_scales is None:
            return None
        page = self.page_scales or [1.0] * len(self.pages)
        page = page + [0.0] * ((rank or len(page)) - len(page))
        return [[v * s for v in page] for s in (self.row_scales or [1.0] * len(self.rows))[rows]]


def _build_bmm(short: list[Segment], device: torch.device) -> BmmLayout:
    # split long segments so that no segment is longer than the mean: padding costs < 2x
    num_rows = sum(len(seg.rows) for seg in short)
    cap = max(1, -(-num_rows // len(short)))
    pieces = [(seg, slice(i, i + cap)) for seg in short for i in range(0, len(seg.rows), cap)]
    seg_len = max(len(seg.rows[part]) for seg, part in pieces)
    rank = max(len(seg.pages) for seg, _ in pieces)
    scaled = any(seg.page_scales is not None or seg.row_scales is not None for seg in short)
    x_rows, flat_pages, valid, token_rows, token_pages, token_scales = [], [], [], [], [], []
    for s, (seg, part) in enumerate(pieces):
        r = seg.rows[part]
        padded = seg.pages + [ZERO_PAGE] * (rank - len(seg.pages))
        x_rows.extend(r + [r[0]] * (seg_len - len(r)))
        flat_pages.extend(padded)
        valid.extend(range(s * seg_len, s * seg_len + len(r)))
        token_rows.extend(r)
        token_pages.extend([padded] * len(r))
        if scaled:
            token_scales.extend(seg.h_scales(part, rank) or [[1.0] * rank] * len(r))
    return BmmLayout(len(pieces), seg_len, _t(x_rows, device), _t(flat_pages, device), rank, _t(valid, device),
                     _t(token_rows, device), _t(token_pages, device),
                     torch.tensor(token_scales, dtype=torch.float32, device=device) if scaled else None)


def _use_kernel(y: torch.Tensor, x: torch.Tensor, a_pool: torch.Tensor, b_pool: torch.Tensor) -> bool:
    return (y.device.type == "cpu" and y.dtype in (torch.float32, torch.bfloat16)
            and x.dtype == a_pool.dtype == b_pool.dtype == y.dtype and y.stride(-1) == 1 and x.stride(-1) == 1
            and not torch.is_grad_enabled() and cpu_kernels.loaded())


def lora_apply_cpu(y: torch.Tensor, x: torch.Tensor, a_pool: torch.Tensor, b_pool: torch.Tensor,
                   meta: LoRABatchMeta) -> None:
    """y [num_tokens, out] += B[a] · (A[a] · x) for every LoRA row, in place (scale is in b_pool; the meta's page
    and row scales multiply A[a] · x)."""
    layout = cpu_layout(meta)
    if layout.kernel is not None and _use_kernel(y, x, a_pool, b_pool):
        torch.ops.loraplex_cpu.lora_apply_(y, x, a_pool, b_pool, *layout.kernel)
    elif (bmm := layout.bmm()) is not None:
        s, t, r = bmm.num_segments, bmm.seg_len, bmm.rank
        xs = x.index_select(0, bmm.x_rows).view(s, t, x.shape[1])  # [segments, tokens, in]
        a = a_pool.index_select(0, bmm.pages).view(s, r, a_pool.shape[1])  # [segments, rank, in]
        h = torch.bmm(xs, a.transpose(1, 2)).view(s * t, r).index_select(0, bmm.valid)  # [n, rank]
        if bmm.token_scales is not None:
            h = h * bmm.token_scales.to(h.dtype)
        # expand without copying B: each row's delta is the h-weighted sum of its pages' B rows
        delta = F.embedding_bag(bmm.token_pages, b_pool, per_sample_weights=h, mode="sum")  # [n, out]
        y.index_add_(0, bmm.token_rows, delta)
    for start, end, pages, scales in layout.dense:
        h = x[start:end] @ a_pool.index_select(0, pages).t()  # [tokens, rank]
        if scales is not None:
            h = h * scales.to(h.dtype)
        y[start:end].addmm_(h, b_pool.index_select(0, pages))
