"""MixLoRA in the serving forward: the router pool, one step's MixLoRA rows, and the FFN wrapper that runs them
beside base and plain-LoRA rows (the maths and the pair layout are in adapters/ops/mixlora.py).

The wrapper replaces each decoder layer's `mlp` and keeps its gate/up/down linears (the LoRA-wrapped ones), so
plain LoRA rows get their deltas as before and every base GEMM is one call for the whole batch. A step without
MixLoRA rows computes exactly what LlamaMLP does.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from loraplex.adapters.ops.meta import ZERO_PAGE
from loraplex.adapters.ops.mixlora import RoutingGroup, ffn_pairs, route_pairs
from loraplex.engine.layers.elementwise import silu_and_mul


class MixLoRATables:
    """Router weights of the resident MixLoRA adapters (`routers[layer]` [num_slots * max_experts, hidden] float32,
    a slot per adapter) and each virtual expert's pool pages (`vid_pages` [num_slots * max_experts, max_rank],
    `vid_ranks`). Allocated on the first MixLoRA adapter: a server that never sees one pays nothing."""

    def __init__(self, num_layers: int, hidden: int, num_slots: int, max_experts: int, max_rank: int,
                 device: torch.device) -> None:
        self.num_layers, self.hidden, self.num_slots = num_layers, hidden, num_slots
        self.max_experts, self.max_rank, self.device = max_experts, max_rank, device
        self.routers: list[torch.Tensor] = []
        self.vid_pages = self.vid_ranks = None

    @property
    def allocated(self) -> bool:
        return bool(self.routers)

    @property
    def num_bytes(self) -> int:
        return self.num_layers * self.num_slots * self.max_experts * self.hidden * 4

    def _allocate(self) -> None:
        n = self.num_slots * self.max_experts
        self.routers = [torch.zeros(n, self.hidden, dtype=torch.float32, device=self.device)
                        for _ in range(self.num_layers)]
        self.vid_pages = torch.full((n, self.max_rank), ZERO_PAGE, dtype=torch.int64, device=self.device)
        self.vid_ranks = torch.zeros(n, dtype=torch.int64, device=self.device)

    @torch.no_grad()
    def write(self, slot: int, router: dict[int, torch.Tensor], pages: list[int], offsets: list[int],
              expert_rank: int) -> None:
        """Slot `slot` gets the adapter's routers ([E, hidden] per layer) and its experts' pages."""
        if not self.allocated:
            self._allocate()
        lo, num_experts = slot * self.max_experts, len(offsets)
        for layer, w in enumerate(self.routers):
            w[lo:lo + self.max_experts].zero_()
            w[lo:lo + num_experts].copy_(router[layer].to(self.device, torch.float32))
        table = torch.full((self.max_experts, self.max_rank), ZERO_PAGE, dtype=torch.int64)
        for e, start in enumerate(offsets):
            table[e, :expert_rank] = torch.tensor(pages[start:start + expert_rank])
        self.vid_pages[lo:lo + self.max_experts] = table.to(self.device)
        self.vid_ranks[lo:lo + self.max_experts] = torch.tensor(
            [expert_rank] * num_experts + [0] * (self.max_experts - num_experts)).to(self.device)


@dataclass(slots=True)
class MixLoRAStep:
    """One step's MixLoRA rows: batch rows grouped by adapter, each row's router slot and existing experts, the
    routing groups, and the FFN modules any of them targets."""
    tables: MixLoRATables
    rows: torch.Tensor  # [n_mix] int64
    row_slots: torch.Tensor  # [n_mix] int64
    expert_mask: torch.Tensor  # [n_mix, max_experts] bool
    expert_counts: torch.Tensor  # [n_mix] int64
    groups: list[RoutingGroup]
    modules: frozenset[str]


class MixLoRAMLP(nn.Module):
    """Takes the place of a decoder layer's FFN: the same gate/up/down children (whoever wraps them, LoRA or the
    trainer, wraps them here), LlamaMLP's forward for steps without MixLoRA rows."""

    float32_kernels = False

    def __init__(self, mlp: nn.Module, layer: int, pools: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
                 state=None) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        self.float32_kernels = getattr(mlp, "float32_kernels", False)  # as the FFN it replaces (engine/models/llama.py)
        self.layer = layer
        self.pools = pools  # module -> (a_pool, b_pool) of this layer (views shared with LoRAWeightPool)
        self.state = state  # LoRAStepState: .mix is this step's MixLoRAStep or None (None: no serving runtime)
        # the trainer's path for MixLoRA jobs' rows (trainer/mixlora_train.py): (self, x) -> output, or None
        # when its step has no MixLoRA job (or no step is running)
        self.train_forward = None
        self.train_active = None  # () -> bool: whether train_forward has rows now (None: whenever it is set)

    def stack_checks(self) -> tuple:
        """For the engine's one-call layer and stack (engine/layers/fused_layer.py): true while this step has no
        MixLoRA rows (then it computes exactly LlamaMLP's forward)."""
        return (self._computes_plain_ffn,)

    def _computes_plain_ffn(self) -> bool:
        training = self.train_forward is not None and (self.train_active is None or self.train_active())
        return not training and (self.state is None or self.state.mix is None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [num_tokens, hidden]
        if self.train_forward is not None:
            out = self.train_forward(self, x)
            if out is not None:
                return out
        step: MixLoRAStep | None = None if self.state is None else self.state.mix
        g, u = self.gate_proj(x), self.up_proj(x)  # [n, inter], base rows and plain LoRA rows complete
        if step is None:
            return self.down_proj(silu_and_mul(g, u, self.float32_kernels))
        tables = step.tables
        pairs = route_pairs(x, tables.routers[self.layer], step.rows, step.row_slots, step.expert_mask, step.groups,
                            tables.max_experts, tables.vid_pages, tables.vid_ranks, step.expert_counts)
        h_mix, y_delta = ffn_pairs(g, u, x, step.rows, pairs, self.pools, step.modules)
        if step.rows.shape[0] == x.shape[0]:  # every row is a MixLoRA row: the plain φ(G) ⊙ U is never needed
            h = torch.empty_like(g)
        else:
            h = silu_and_mul(g, u, self.float32_kernels)
        h.index_copy_(0, step.rows, h_mix)  # H[row] = Σ_p h_p
        y = self.down_proj(h)
        if y_delta is not None:
            y.index_add_(0, step.rows, y_delta)
        return y
