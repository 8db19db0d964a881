"""LoRALinear: wraps a base linear (nn.Linear, PackedLinear, a quantized linear) and adds every row's
adapter delta from the paged pool. Swapped in for the target linears of a loaded model; model files
never mention adapters."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from loraplex.adapters.ops.meta import LoRABatchMeta

LoRAApply = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, LoRABatchMeta], None]


class LoRAStepState:
    """The current step's row-to-pages map, shared by all wrappers of one model (an explicit object
    handed to each wrapper, set by the adapter runtime before every forward)."""

    def __init__(self, apply: LoRAApply) -> None:
        self.apply = apply
        self.meta: LoRABatchMeta | None = None


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Module, a_pool: torch.Tensor, b_pool: torch.Tensor, state: LoRAStepState) -> None:
        super().__init__()
        self.base = base
        self.a_pool = a_pool  # [num_pages, in_features], a view shared with LoRAWeightPool (not a parameter)
        self.b_pool = b_pool  # [num_pages, out_features]
        self.state = state

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [num_tokens, in] -> [num_tokens, out]
        y = self.base(x)
        meta = self.state.meta
        if meta is not None:
            self.state.apply(y, x, self.a_pool, self.b_pool, meta)
        return y

    def extra_repr(self) -> str:
        return f"lora_pages={self.a_pool.shape[0]}"
