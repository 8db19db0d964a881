"""LoRABatchMeta: one step's map from batch rows to adapter pages, built once and shared by every
LoRA-wrapped linear of every layer (the pages of an adapter are the same in all of them).

Pool layout the ops assume, per (layer, module): `a_pool [num_pages, in_features]` holds rank-row p
of A in row p, `b_pool [num_pages, out_features]` holds column p of B (already multiplied by the
adapter's scale) in row p. Page 0 is all zeros and never handed out, so page lists padded with 0
contribute nothing.

Rows of the batch that use an adapter are grouped into segments (one adapter each), S-LoRA / punica
style: `token_rows` lists those rows segment by segment, `seg_starts[s]:seg_starts[s+1]` is segment
s's share of `token_rows`, `seg_pages[s, :seg_ranks[s]]` are its adapter's pages.
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


def build_lora_meta(num_tokens: int, segments: list[tuple[list[int], list[int]]],
                    device: torch.device | str = "cpu") -> LoRABatchMeta | None:
    """`segments`: (batch rows, adapter pages) per group of rows served by one adapter; base-model
    rows are simply absent. Returns None when no row uses an adapter (the ops are then skipped)."""
    segments = [(rows, pages) for rows, pages in segments if rows]
    if not segments:
        return None
    max_rank = max(len(pages) for _, pages in segments)
    token_rows: list[int] = []
    starts = [0]
    padded_pages: list[list[int]] = []
    contiguous: list[bool] = []
    for rows, pages in segments:
        if not pages:
            raise ValueError("an adapter segment needs at least one page")
        token_rows.extend(rows)
        starts.append(len(token_rows))
        padded_pages.append(list(pages) + [ZERO_PAGE] * (max_rank - len(pages)))
        contiguous.append(rows == list(range(rows[0], rows[0] + len(rows))))
    if len(set(token_rows)) != len(token_rows) or min(token_rows) < 0 or max(token_rows) >= num_tokens:
        raise ValueError("adapter segments must cover distinct rows of the batch")

    def as_tensor(data) -> torch.Tensor:
        return torch.tensor(data, dtype=torch.int64, device=device)

    return LoRABatchMeta(num_tokens, as_tensor(token_rows), as_tensor(starts), as_tensor(padded_pages),
                         as_tensor([len(p) for _, p in segments]), starts, contiguous)
