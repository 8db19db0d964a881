"""LoRABatchMeta: one step's map from batch rows to adapter pages, built once and shared by every
LoRA-wrapped linear of every layer (the pages of an adapter are the same in all of them).

Pool layout the ops assume, per (layer, module): `a_pool [num_pages, in_features]` holds rank-row p
of A in row p, `b_pool [num_pages, out_features]` holds column p of B (already multiplied by the
adapter's scale) in row p. Page 0 is all zeros and never handed out, so page lists padded with 0
contribute nothing.

Rows of the batch that use an adapter are grouped into segments (one adapter each), S-LoRA / punica
style: `token_rows` lists those rows segment by segment, `seg_starts[s]:seg_starts[s+1]` is segment
s's share of `token_rows`, `seg_pages[s, :seg_ranks[s]]` are its adapter's pages.

Scales (optional, float32): `seg_scales[s, j]` multiplies page j of segment s (several adapters summed in one
segment, each page carrying its adapter's weight) and `row_scales[i]` multiplies every page of lora row i (a
request's own `lora_scale`): h = A·x is multiplied by both before the expand, so rows of one adapter at
different strengths share its pages and its segment.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

ZERO_PAGE = 0


@dataclass(slots=True)
class LoRABatchMeta:
    num_tokens: int  # rows of the whole batch (base-model rows included)
    token_rows: torch.Tensor  # [num_lora_tokens] int64, batch rows grouped by segment
    seg_starts: torch.Tensor  # [num_segments + 1] int64 offsets into token_rows
    seg_pages: torch.Tensor  # [num_segments, max_rank] int64, padded with ZERO_PAGE
    seg_ranks: torch.Tensor  # [num_segments] int64
    seg_starts_list: list[int] = field(default_factory=list)  # the same offsets on the host
    seg_rows_contiguous: list[bool] = field(default_factory=list)  # rows of segment s are a range
    seg_scales: torch.Tensor | None = None  # [num_segments, max_rank] float32; None: every page 1
    row_scales: torch.Tensor | None = None  # [num_lora_tokens] float32 (token_rows order); None: every row 1
    # per-backend layouts derived once per step by the op that uses them (see ops/cpu.py)
    cache: dict = field(default_factory=dict)

    @property
    def num_segments(self) -> int:
        return self.seg_pages.shape[0]

    @property
    def max_rank(self) -> int:
        return self.seg_pages.shape[1]

    @property
    def num_lora_tokens(self) -> int:
        return self.token_rows.shape[0]

    def token_pages(self) -> torch.Tensor:
        """[num_lora_tokens, max_rank]: each row's pages (in token_rows order)."""
        counts = self.seg_starts[1:] - self.seg_starts[:-1]
        return self.seg_pages.repeat_interleave(counts, dim=0)

    @property
    def scaled(self) -> bool:
        return self.seg_scales is not None or self.row_scales is not None

    def h_scales(self) -> torch.Tensor | None:
        """[num_lora_tokens, max_rank] float32: what each row's h = A·x is multiplied by (None: all ones)."""
        if not self.scaled:
            return None
        cached = self.cache.get("h_scales")
        if cached is None:
            n, device = self.num_lora_tokens, self.token_rows.device
            out = torch.ones(n, self.max_rank, dtype=torch.float32, device=device)
            if self.seg_scales is not None:
                out = out * self.seg_scales.repeat_interleave(self.seg_starts[1:] - self.seg_starts[:-1], dim=0)
            if self.row_scales is not None:
                out = out * self.row_scales.unsqueeze(1)
            cached = self.cache["h_scales"] = out
        return cached


def build_lora_meta(num_tokens: int, segments: list[tuple], device: torch.device | str = "cpu") -> LoRABatchMeta | None:
    """`segments`: (batch rows, adapter pages) per group of rows served by one set of pages, or (rows, pages,
    page_scales, row_scales) where page_scales has one float per page and row_scales one per row (None: all 1).
    Base-model rows are simply absent. Returns None when no row uses an adapter (the ops are then skipped)."""
    segments = [tuple(seg) + (None, None) * (len(seg) == 2) for seg in segments if seg[0]]
    if not segments:
        return None
    max_rank = max(len(pages) for _, pages, _, _ in segments)
    token_rows: list[int] = []
    starts = [0]
    padded_pages: list[list[int]] = []
    contiguous: list[bool] = []
    any_page_scale = any(ps is not None for _, _, ps, _ in segments)
    any_row_scale = any(rs is not None for _, _, _, rs in segments)
    seg_scales: list[list[float]] = []
    row_scales: list[float] = []
    for rows, pages, page_scales, scales in segments:
        if not pages:
            raise ValueError("an adapter segment needs at least one page")
        if page_scales is not None and len(page_scales) != len(pages):
            raise ValueError("page_scales needs one value per page")
        if scales is not None and len(scales) != len(rows):
            raise ValueError("row_scales needs one value per row")
        token_rows.extend(rows)
        starts.append(len(token_rows))
        padded_pages.append(list(pages) + [ZERO_PAGE] * (max_rank - len(pages)))
        contiguous.append(rows == list(range(rows[0], rows[0] + len(rows))))
        if any_page_scale:
            seg_scales.append(list(page_scales or [1.0] * len(pages)) + [0.0] * (max_rank - len(pages)))
        if any_row_scale:
            row_scales.extend(scales or [1.0] * len(rows))
    if len(set(token_rows)) != len(token_rows) or min(token_rows) < 0 or max(token_rows) >= num_tokens:
        raise ValueError("adapter segments must cover distinct rows of the batch")

    def as_tensor(data, dtype=torch.int64) -> torch.Tensor:
        return torch.tensor(data, dtype=dtype, device=device)

    return LoRABatchMeta(num_tokens, as_tensor(token_rows), as_tensor(starts), as_tensor(padded_pages),
                         as_tensor([len(p) for _, p, _, _ in segments]), starts, contiguous,
                         as_tensor(seg_scales, torch.float32) if any_page_scale else None,
                         as_tensor(row_scales, torch.float32) if any_row_scale else None)
