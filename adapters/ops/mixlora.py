"""MixLoRA's per-layer ops for a mixed batch: routing of the MixLoRA rows on their own adapters' routers, and the
expert LoRA deltas over the paged pool, keyed by (adapter, expert).

The block is computed in the factorised form of shared/research/mixlora-and-mlora.md §2.1, so that every base
GEMM stays one dense call for the whole batch (base, LoRA and MixLoRA rows alike):

    G = W1 X, U = W3 X                                  (dense, every row; plain LoRA rows get their deltas)
    for each chosen (row, expert e) pair p with weight w_p:
        g_p = G[row] + B1_e A1_e x,  u_p = U[row] + B3_e A3_e x,  h_p = w_p · φ(g_p) ⊙ u_p
    H[row] = Σ_p h_p for MixLoRA rows (φ(G) ⊙ U for the others)
    Y = W2 H                                            (dense, every row)
    Y[row] += Σ_p B2_e A2_e h_p

Each pair names its virtual expert `slot * max_experts + e` (the (adapter, expert) key of its pool pages); pairs
stay row by row, a row's in its routing order, so a row's sums never depend on the rest of the batch, and with
top-k routing a row's pairs are a fixed [k] block (sums are a reshape, not a scatter). The existing segmented LoRA
op (engine/kernels/csrc/cpu_lora.cpp) runs them with a segment per pair, reading each pair's pages in place. Router logits are computed one row at a time in float32
(a GEMM's last bits depend on its row count, and one ulp can flip a top-k choice); everything here is torch ops
on device tensors, with no host sync on a GPU except in the dynamic (top-p) routing's compaction.
`route_pairs_ref` and the plain-torch paths are the references the kernels are tested against.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loraplex.adapters.mixlora import mass_before
from loraplex.engine.kernels import cpu_kernels
from loraplex.engine.layers.elementwise import silu_and_mul


@dataclass(frozen=True, slots=True)
class RoutingGroup:
    """Consecutive compact MixLoRA rows [start, end) routed alike (one or more adapters with equal settings)."""
    start: int
    end: int
    strategy: str  # "mixlora" (top-k) or "mixlora-dynamic" (top-p)
    top_k: int
    top_p: float
    temperature: float


@dataclass(slots=True)
class ExpertPairs:
    """One layer's chosen (row, expert) pairs, row by row (a row's pairs in its routing order)."""
    local: torch.Tensor | None  # [P] int64 index into the step's MixLoRA rows (None with top_k: pairs are [n, k])
    rows: torch.Tensor  # [P] int64 batch rows
    weights: torch.Tensor  # [P] float32 routing weights
    pages: torch.Tensor  # [P, max_rank] int64 each pair's expert pages (ZERO_PAGE padded)
    ranks: torch.Tensor  # [P] int64
    top_k: int | None  # every MixLoRA row has exactly top_k pairs (top-k routing throughout): pairs are [n_mix, k]
    logits: torch.Tensor  # [n_mix, max_experts] float32 router logits (masked experts -inf)
    _segments: tuple[torch.Tensor, torch.Tensor] | None = None

    def kernel_segments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, starts) of the segmented op with a segment per pair, built once per layer."""
        if self._segments is None:
            num = self.rows.shape[0]
            self._segments = (torch.arange(num, dtype=torch.int64), torch.arange(num + 1, dtype=torch.int64))
        return self._segments

    def per_row_sum(self, values: torch.Tensor, num_rows: int) -> torch.Tensor:
        """[P, d] -> [n_mix, d]: each MixLoRA row's sum over its pairs, in routing order."""
        if self.top_k is not None:
            return values.view(num_rows, self.top_k, values.shape[1]).sum(1)
        return torch.zeros(num_rows, values.shape[1], dtype=values.dtype, device=values.device).index_add_(
            0, self.local, values)


def _kernel_ok(*tensors: torch.Tensor) -> bool:
    return (all(t.device.type == "cpu" for t in tensors) and not torch.is_grad_enabled() and cpu_kernels.loaded())


def router_logits(x: torch.Tensor, router: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor,
                  max_experts: int) -> torch.Tensor:
    """x [N, hidden] (engine dtype), router [num_slots * max_experts, hidden] float32, rows/slots [n] ->
    [n, max_experts] float32 logits of each row against its own slot's router, row by row."""
    if _kernel_ok(x, router) and x.dtype in (torch.float32, torch.bfloat16) and x.stride(-1) == 1:
        return torch.ops.loraplex_cpu.mixlora_router(x, router, rows, slots, max_experts)
    return router_logits_ref(x, router, rows, slots, max_experts)


def router_logits_ref(x: torch.Tensor, router: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor,
                      max_experts: int) -> torch.Tensor:
    w = router.view(-1, max_experts, router.shape[-1]).index_select(0, slots)  # [n, E, hidden]
    return torch.bmm(w, x.index_select(0, rows).float().unsqueeze(-1)).squeeze(-1)


def _route_group(logits: torch.Tensor, g: RoutingGroup) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (local row, expert, weight) of every chosen pair of the group's rows."""
    p = torch.softmax(logits, dim=-1)
    n = p.shape[0]
    if g.strategy == "mixlora":
        top, idx = torch.topk(p, g.top_k, dim=-1)
        w = top / top.sum(-1, keepdim=True)
        local = torch.arange(n, device=p.device).repeat_interleave(g.top_k)
        return local, idx.reshape(-1), w.reshape(-1)
    if g.temperature > 0:
        p = p / g.temperature  # MoE-PEFT divides the probabilities, not the logits (a quirk kept as is)
    sorted_p, idx = torch.sort(p, dim=-1, descending=True, stable=True)
    keep = (mass_before(sorted_p) <= g.top_p) & (sorted_p > 0)  # up to the first past top_p; masked experts never
    local, pos = keep.nonzero(as_tuple=True)
    return local, idx[local, pos], sorted_p[local, pos]


def route_pairs(x: torch.Tensor, router: torch.Tensor, mix_rows: torch.Tensor, row_slots: torch.Tensor,
                expert_mask: torch.Tensor, groups: list[RoutingGroup], max_experts: int,
                vid_pages: torch.Tensor, vid_ranks: torch.Tensor,
                expert_counts: torch.Tensor | None = None) -> ExpertPairs:
    """Route the step's MixLoRA rows (`mix_rows`, grouped by adapter; `row_slots` their router slots,
    `expert_mask` [n_mix, max_experts] which experts exist, `expert_counts` how many) and lay out the pairs for
    the expert ops. `vid_pages` [num_slots * max_experts, max_rank] / `vid_ranks` are the pool pages of every
    virtual expert (adapter slot * max_experts + expert). Top-k throughout, on CPU with the kernels: one call."""
    ks = {g.top_k if g.strategy == "mixlora" else None for g in groups}
    top_k = ks.pop() if len(ks) == 1 else None
    if (top_k is not None and expert_counts is not None and _kernel_ok(x, router)
            and x.dtype in (torch.float32, torch.bfloat16) and x.stride(-1) == 1):
        logits, weights, pages, ranks, rows = torch.ops.loraplex_cpu.mixlora_route_topk(
            x, router, mix_rows, row_slots, expert_counts, max_experts, top_k, vid_pages, vid_ranks)
        return ExpertPairs(local=None, rows=rows, weights=weights, pages=pages, ranks=ranks, top_k=top_k,
                           logits=logits)
    logits = router_logits(x, router, mix_rows, row_slots, max_experts).masked_fill(~expert_mask, float("-inf"))
    parts = [_route_group(logits[g.start:g.end], g) for g in groups]
    if len(parts) == 1:
        local, experts, weights = parts[0]
        local = local + groups[0].start
    else:
        local = torch.cat([loc + g.start for (loc, _, _), g in zip(parts, groups)])
        experts = torch.cat([e for _, e, _ in parts])
        weights = torch.cat([w for _, _, w in parts])
    vid = row_slots.index_select(0, local) * max_experts + experts
    return ExpertPairs(local=local, rows=mix_rows.index_select(0, local), weights=weights,
                       pages=vid_pages.index_select(0, vid), ranks=vid_ranks.index_select(0, vid), top_k=top_k,
                       logits=logits)


def expert_apply(y: torch.Tensor, x: torch.Tensor, a_pool: torch.Tensor, b_pool: torch.Tensor,
                 pairs: ExpertPairs) -> None:
    """y [P, out] += B_e · (A_e · x) for every pair row (both in pair order), in place; scale is in b_pool."""
    if pairs.rows.numel() == 0:
        return
    if (_kernel_ok(y, x, a_pool) and y.dtype in (torch.float32, torch.bfloat16)
            and x.dtype == a_pool.dtype == b_pool.dtype == y.dtype and y.is_contiguous() and x.is_contiguous()):
        rows, starts = pairs.kernel_segments()  # a segment per pair: the kernel reads each pair's pages in place
        no_scales = torch.empty(0, dtype=torch.float32)
        torch.ops.loraplex_cpu.lora_apply_(y, x, a_pool, b_pool, rows, starts, pairs.pages, pairs.ranks, no_scales,
                                           no_scales)
        return
    expert_apply_ref(y, x, a_pool, b_pool, pairs.pages)


def expert_apply_ref(y: torch.Tensor, x: torch.Tensor, a_pool: torch.Tensor, b_pool: torch.Tensor,
                     pages: torch.Tensor) -> None:
    """Each pair row gathers its own expert's pages (Punica's BGMV); padding pages are the all-zero page."""
    a = a_pool.index_select(0, pages.reshape(-1)).view(*pages.shape, a_pool.shape[1])  # [P, R, in]
    h = torch.bmm(a, x.to(a.dtype).unsqueeze(-1)).squeeze(-1)  # [P, R]
    y += F.embedding_bag(pages, b_pool, per_sample_weights=h.to(b_pool.dtype), mode="sum").to(y.dtype)


FFN_MODULES = ("gate_proj", "up_proj", "down_proj")


def ffn_pairs(g: torch.Tensor, u: torch.Tensor, x: torch.Tensor, mix_rows: torch.Tensor, pairs: ExpertPairs,
              pools: dict[str, tuple[torch.Tensor, torch.Tensor]], modules: frozenset[str]
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The MixLoRA rows' FFN around the dense GEMMs: -> (H rows [n_mix, inter] = Σ_p w_p φ(g_p) ⊙ u_p, the down
    deltas [n_mix, hidden] = Σ_p B2_e A2_e h_p, or None when no adapter of the step has down experts). `g`, `u`
    [N, inter] are W1 X and W3 X of the whole batch, `pools[module]` the (A, B) pools of this layer. Top-k pairs on
    CPU: one C++ call, row by row, nothing materialised per pair; otherwise `ffn_pairs_ref`."""
    down = "down_proj" in modules
    if (pairs.top_k is not None and _kernel_ok(x, g, u) and x.dtype in (torch.float32, torch.bfloat16)
            and g.dtype == u.dtype == x.dtype and all(pools[m][0].dtype == x.dtype for m in modules)
            and x.stride(-1) == g.stride(-1) == u.stride(-1) == 1):
        args = [t for m in FFN_MODULES for t in (pools[m] if m in modules else (None, None))]
        h_mix, y_delta = torch.ops.loraplex_cpu.mixlora_ffn(g, u, x, mix_rows, pairs.top_k, pairs.weights, pairs.pages,
                                                            pairs.ranks, *args)
        return h_mix, (y_delta if down else None)
    return ffn_pairs_ref(g, u, x, mix_rows, pairs, pools, modules)


def ffn_pairs_ref(g: torch.Tensor, u: torch.Tensor, x: torch.Tensor, mix_rows: torch.Tensor, pairs: ExpertPairs,
                  pools: dict[str, tuple[torch.Tensor, torch.Tensor]], modules: frozenset[str]
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`ffn_pairs` in torch ops: each pair's gate/up rows gathered, its expert deltas added (`expert_apply`)."""
    n_mix = mix_rows.shape[0]
    xp = x.index_select(0, pairs.rows)  # [P, hidden], one row per chosen (row, expert)
    gp, up = g.index_select(0, pairs.rows), u.index_select(0, pairs.rows)
    for module, target in (("gate_proj", gp), ("up_proj", up)):
        if module in modules:
            expert_apply(target, xp, *pools[module], pairs)
    up.mul_(pairs.weights.to(up.dtype).unsqueeze(1))
    hp = silu_and_mul(gp, up)  # w_p φ(g_p) ⊙ u_p
    h_mix = pairs.per_row_sum(hp, n_mix)
    if "down_proj" not in modules:
        return h_mix, None
    yp = torch.zeros(hp.shape[0], x.shape[1], dtype=x.dtype, device=x.device)
    expert_apply(yp, hp, *pools["down_proj"], pairs)
    return h_mix, pairs.per_row_sum(yp, n_mix)
