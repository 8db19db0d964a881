"""Plain-torch reference of the batched LoRA op: gather each row's pages, then two batched matmuls.
Every fast path (ops/cpu.py, ops/triton_ops.py) is tested against this."""
from __future__ import annotations

import torch

from loraplex.adapters.ops.meta import LoRABatchMeta


def lora_shrink_ref(x: torch.Tensor, a_pool: torch.Tensor, meta: LoRABatchMeta) -> torch.Tensor:
    """x [num_tokens, in], a_pool [num_pages, in] -> h [num_lora_tokens, max_rank] float32,
    h[i] = A[pages of token_rows[i]] @ x[token_rows[i]] (rows in token_rows order)."""
    a = a_pool[meta.token_pages()].float()  # [num_lora_tokens, max_rank, in]
    xs = x[meta.token_rows].float()  # [num_lora_tokens, in]
    return torch.bmm(a, xs.unsqueeze(-1)).squeeze(-1)


def lora_expand_ref(y: torch.Tensor, h: torch.Tensor, b_pool: torch.Tensor, meta: LoRABatchMeta) -> None:
    """y [num_tokens, out] += h @ B[pages] for each LoRA row, in place; b_pool [num_pages, out]."""
    b = b_pool[meta.token_pages()].float()  # [num_lora_tokens, max_rank, out]
    delta = torch.bmm(h.unsqueeze(1), b).squeeze(1)  # [num_lora_tokens, out]
    y.index_add_(0, meta.token_rows, delta.to(y.dtype))


def lora_apply_ref(y: torch.Tensor, x: torch.Tensor, a_pool: torch.Tensor, b_pool: torch.Tensor,
                   meta: LoRABatchMeta) -> None:
    """y += scale · B[a] · (A[a] · x) for every row's adapter a (the scale is folded into b_pool), each page's
    term multiplied by the meta's page and row scales where it has them."""
    h = lora_shrink_ref(x, a_pool, meta)
    scales = meta.h_scales()
    lora_expand_ref(y, h if scales is None else h * scales, b_pool, meta)
