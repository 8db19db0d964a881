"""LoRALinear: wraps a base linear (nn.Linear, PackedLinear, a quantized linear) and adds every row's
adapter delta from the paged pool. Swapped in for the target linears of a loaded model; model files
never mention adapters."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from loraplex.adapters.dora import apply_dora
from loraplex.adapters.ops.cpu import cpu_layout, lora_apply_cpu
from loraplex.adapters.ops.meta import LoRABatchMeta

LoRAApply = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, LoRABatchMeta], None]


class LoRAStepState:
    """The current step's row-to-pages maps, one per target module name (absent: no row of the step
    uses an adapter targeting that module, and its wrappers skip LoRA entirely). Shared by all wrappers
    of one model (an explicit object handed to each), set by the adapter runtime before every forward."""

    def __init__(self, apply: LoRAApply) -> None:
        self.apply = apply
        self.metas: dict[str, LoRABatchMeta] = {}
        self.mix = None  # the step's MixLoRA rows (adapters/mixlora_mlp.py's MixLoRAStep), None without any
        # per target module, the step's DoRA rows and each one's scale page (adapters/dora.py); absent: none
        self.dora: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.full = None  # rows with their adapter's own embedding / head (adapters/full_modules.py's FullModuleStep)

    def kernel_rows(self, module_name: str) -> tuple[torch.Tensor, ...] | None | bool:
        """This step's rows of one target module as the C++ LoRA kernel takes them (its six row tensors), None when
        no row adds anything there, False when its rows need the wrappers' torch path (DoRA rows, long prefill
        segments, another backend). Shared by every layer's wrapper of that module; forward applies the same rows."""
        if module_name in self.dora:
            return False
        meta = self.metas.get(module_name)
        if meta is None:
            return None
        if self.apply is not lora_apply_cpu:
            return False
        layout = cpu_layout(meta)
        if layout.kernel is None or layout.dense:
            return False
        return layout.kernel

    def clear(self) -> None:
        """No serving rows: every wrapper passes through (a training forward, which has its own rows)."""
        self.metas, self.mix, self.dora, self.full = {}, None, {}, None


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Module, module_name: str, a_pool: torch.Tensor, b_pool: torch.Tensor,
                 state: LoRAStepState) -> None:
        super().__init__()
        self.base = base
        self.module_name = module_name  # q_proj, ..., down_proj: picks this step's rows for it
        self.a_pool = a_pool  # [num_pages, in_features], a view shared with LoRAWeightPool (not a parameter)
        self.b_pool = b_pool  # [num_pages, out_features]
        self.state = state

    def stack_parts(self) -> tuple:
        """For the engine's one-call layer and stack (engine/layers/fused_layer.py's stack_parts): no checks of its
        own, its pools and where each step's rows come from (the state, shared by every layer's wrapper), its base."""
        return (), (self.a_pool, self.b_pool, self.state.kernel_rows, self.module_name), self.base

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [num_tokens, in] -> [num_tokens, out]
        y = self.base(x)
        meta = self.state.metas.get(self.module_name)
        if meta is not None:
            self.state.apply(y, x, self.a_pool, self.b_pool, meta)
        dora = self.state.dora.get(self.module_name)
        if dora is not None:
            rows, pages = dora
            apply_dora(y, rows, self.b_pool.index_select(0, pages), getattr(self.base, "bias", None))
        return y

    def extra_repr(self) -> str:
        return f"lora_pages={self.a_pool.shape[0]}"
