"""MixLoRA jobs in the batched trainer: the FFN of their rows, and the load-balance loss.

`moe_train_forward` is the trainer's path through each layer's FFN wrapper (adapters/mixlora_mlp.py's
MixLoRAMLP) during a training step that has MixLoRA jobs. Every row goes through the shared gate/up/down
GEMMs once (plain LoRA jobs get their deltas there, from the linear wrappers); the rows of each MixLoRA job
then take its router (float32, optional jitter), top-k or top-p choice, and per chosen expert e its LoRA deltas:

    h = Σ_{e∈S} w_e φ(g + Δg_e) ⊙ (u + Δu_e),   y = W2 h + Σ_{e∈S} Δdown_e(w_e φ(...) ⊙ (...))

which is MoE-PEFT's block, factorised as in shared/research/mixlora-and-mlora.md §2.1, in plain autograd ops.
A job's rows depend only on its own weights, so its gradients are the same batched or alone.

Load balance (MoE-PEFT's `_mixtral_load_balancing_loss_func`): aux = c · E · Σ_e f_e P_e over the job's tokens
of every layer, f_e the share of (token, choice) pairs routed to e (no gradient), P_e the mean router
probability. The wrapper records each layer's probability sums and choice counts in `TrainStepState.router_stats`;
once a chunk's forward has run every layer, `aux_backward_terms` turns them into per-layer scalars whose gradients
are exactly aux's (f is then known), added to each layer's backward. A job's micro-batch split over several
chunks gets the chunk-weighted sum of per-chunk losses (exact when it fits one chunk, as MoE-PEFT's micro-batch).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loraplex.adapters.mixlora import mass_before

from .lora_layers import JobMixLoRA, TrainSegment, TrainStepState


def attach_moe_training(model, layers: int | range, state: TrainStepState) -> None:
    """Give every FFN the MixLoRA jobs' path: the serving MixLoRAMLP (put in place here when the model has none)
    calls `moe_train_forward` first."""
    from loraplex.adapters.mixlora_mlp import MixLoRAMLP
    for layer in range(layers) if isinstance(layers, int) else layers:
        decoder = model.get_submodule(f"model.layers.{layer}")
        if not isinstance(decoder.mlp, MixLoRAMLP):
            decoder.mlp = MixLoRAMLP(decoder.mlp, layer)
        decoder.mlp.train_forward = lambda mlp, x, state=state: moe_train_forward(state, mlp, x)
        # whether a training step with MixLoRA rows is running: otherwise the FFN is the plain one (serving steps)
        decoder.mlp.train_active = lambda state=state: any(isinstance(s.lora, JobMixLoRA) for s in state.segments)


def route_with_grad(spec, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [n, E] float32 -> (routing weights [n, E] with gradient, zero where not chosen; chosen mask)."""
    p = torch.softmax(logits, dim=-1)
    if spec.routing_strategy == "mixlora":
        top, idx = torch.topk(p, spec.top_k, dim=-1)
        w = torch.zeros_like(p).scatter(-1, idx, top / top.sum(-1, keepdim=True))
        return w, torch.zeros_like(p, dtype=torch.bool).scatter(-1, idx, True)
    q = p / spec.temperature if spec.temperature > 0 else p
    sorted_q, idx = torch.sort(q, dim=-1, descending=True, stable=True)
    keep = mass_before(sorted_q.detach()) <= spec.top_p
    chosen = torch.zeros_like(p, dtype=torch.bool).scatter(-1, idx, keep)
    return torch.where(chosen, q, torch.zeros_like(q)), chosen


def _keep_mask(seg: TrainSegment, layer: int, module: int, expert: int, shape, p: float, x: torch.Tensor):
    if p <= 0 or seg.dropout_seed is None:
        return None
    gen = torch.Generator(x.device).manual_seed(
        (seg.dropout_seed * 1_000_003 + layer * 16 + 8 + module * 1024 + expert * 7) % 2**63)
    keep = torch.empty(shape, dtype=torch.float32, device=x.device).bernoulli_(1 - p, generator=gen) / (1 - p)
    return keep.to(x.dtype)


def moe_train_forward(state: TrainStepState, mlp, x: torch.Tensor) -> torch.Tensor | None:
    segments = [s for s in state.segments if isinstance(s.lora, JobMixLoRA)]
    if not segments:
        return None
    layer = mlp.layer
    g, u = mlp.gate_proj(x), mlp.up_proj(x)  # [n, inter]
    h = F.silu(g) * u
    rows, h_mix, y_mix = [], [], []
    stats: dict = {}  # this forward's, replacing the layer's last (a checkpointed layer runs twice)
    for seg in segments:
        lora: JobMixLoRA = seg.lora
        spec = lora.spec
        xs = x[seg.start:seg.end]
        xr = xs.float()
        if spec.jitter_noise > 0 and state.jitter and seg.dropout_seed is not None:
            gen = torch.Generator(x.device).manual_seed((seg.dropout_seed * 1_000_003 + layer * 16 + 15) % 2**63)
            noise = torch.empty_like(xr).uniform_(1 - spec.jitter_noise, 1 + spec.jitter_noise, generator=gen)
            xr = xr * noise  # MoE-PEFT jitters the block's input in training; the router sees it (as theirs)
        logits = xr @ lora.router[f"L{layer}"].t()  # [n, E] float32
        weights, chosen = route_with_grad(spec, logits)
        probs = torch.softmax(logits, dim=-1)
        key = (id(lora), layer)
        if key in stats:  # the job's next sequence (a segment per sequence when it has dropout)
            _, p_sum, counts, n = stats[key]
            stats[key] = (lora, p_sum + probs.sum(0), counts + chosen.sum(0).float(), n + xs.shape[0])
        else:
            stats[key] = (lora, probs.sum(0), chosen.sum(0).float(), xs.shape[0])
        gs, us = g[seg.start:seg.end], u[seg.start:seg.end]
        hbar = torch.zeros_like(gs)
        ydown = None
        for e in range(spec.num_experts):
            idx = chosen[:, e].nonzero().squeeze(1)
            if idx.numel() == 0:
                continue
            xe = xs.index_select(0, idx)
            ge, ue = gs.index_select(0, idx), us.index_select(0, idx)
            for m, module in ((1, "gate_proj"), (2, "up_proj")):
                ab = lora.experts(layer, module)
                if ab is None:
                    continue
                keep = _keep_mask(seg, layer, m, e, xe.shape, spec.dropout, x)
                inp = xe if keep is None else xe * keep
                delta = (inp @ ab[0][e].to(x.dtype).t()) @ ab[1][e].to(x.dtype).t() * lora.expert_scale
                if module == "gate_proj":
                    ge = ge + delta
                else:
                    ue = ue + delta
            he = weights.index_select(0, idx)[:, e:e + 1].to(x.dtype) * (F.silu(ge) * ue)
            hbar = hbar.index_add(0, idx, he)
            ab = lora.experts(layer, "down_proj")
            if ab is not None:
                keep = _keep_mask(seg, layer, 3, e, he.shape, spec.dropout, x)
                inp = he if keep is None else he * keep
                delta = (inp @ ab[0][e].to(x.dtype).t()) @ ab[1][e].to(x.dtype).t() * lora.expert_scale
                ydown = (torch.zeros(xs.shape[0], delta.shape[1], dtype=delta.dtype, device=delta.device)
                         if ydown is None else ydown).index_add(0, idx, delta)
        rows.append(torch.arange(seg.start, seg.end, device=x.device))
        h_mix.append(hbar)
        y_mix.append(ydown)
    for k in [k for k in state.router_stats if k[1] == layer]:
        del state.router_stats[k]
    state.router_stats.update(stats)
    all_rows = torch.cat(rows)
    h = h.index_copy(0, all_rows, torch.cat(h_mix))
    y = mlp.down_proj(h)
    for r, yd in zip(rows, y_mix):
        if yd is not None:
            y = y.index_add(0, r, yd)
    return y


def router_totals(router_stats: dict) -> dict[int, RouterTotals]:
    """Per job (id of its lora), what the load-balance loss needs from the layers in `router_stats`
    (TrainStepState.router_stats): their choices per expert and probability sums added up, without graph."""
    out: dict[int, RouterTotals] = {}
    for (job, _), (lora, p_sum, counts, n) in router_stats.items():
        t = out.get(job)
        if t is None:
            out[job] = RouterTotals(lora, counts.detach().double().clone(), p_sum.detach().double().clone(), n, 1)
        else:
            t.counts += counts.detach().double()
            t.p_sum += p_sum.detach().double()
            t.entries += 1
    return out


@dataclass(slots=True)
class RouterTotals:
    """One MixLoRA job's router records summed over layers: choices per expert [E], probability sums [E], the
    job's tokens in a layer and how many layers were added (a pipeline stage adds the ones before it)."""
    lora: object
    counts: torch.Tensor
    p_sum: torch.Tensor
    tokens: int
    entries: int

    def pack(self) -> torch.Tensor:
        """As one float64 tensor [2E + 2] (a pipeline stage passes it on with the activations)."""
        extra = torch.tensor([self.tokens, self.entries], dtype=torch.float64, device=self.counts.device)
        return torch.cat([self.counts, self.p_sum, extra])

    def add_packed(self, packed: torch.Tensor) -> None:
        e = self.counts.numel()
        packed = packed.to(self.counts.device)
        self.counts += packed[:e]
        self.p_sum += packed[e:2 * e]
        self.entries += int(packed[2 * e + 1])


def aux_coefficients(totals: dict[int, RouterTotals], weight_of) -> tuple[dict[int, torch.Tensor], dict[int, float]]:
    """After a chunk's forward (every layer recorded, router_totals): per job (id of its lora), the vector c_e
    with d(aux)/d(probability sum of expert e in any layer) = c_e, and the loss value. `weight_of(lora, tokens)`
    is the job's multiplier of this chunk's loss (its share of the micro-batch's tokens over the micro-batches
    of its optimizer step)."""
    coefficients: dict[int, torch.Tensor] = {}
    values: dict[int, float] = {}
    for job, t in totals.items():
        spec = t.lora.spec
        if spec.router_aux_loss_coef == 0:
            continue
        tokens = t.tokens * t.entries  # N: the job's tokens, counted in every layer
        f = t.counts / tokens  # [E]: no gradient
        p = t.p_sum / tokens
        scale = weight_of(t.lora, t.tokens) * spec.router_aux_loss_coef * spec.num_experts
        coefficients[job] = (scale * f / tokens).float()
        values[job] = float(scale * (f * p).sum())
    return coefficients, values


def aux_term(router_stats: dict, layer: int, coefficients: dict[int, torch.Tensor]) -> torch.Tensor | None:
    """The scalar to add to `layer`'s backward: Σ_jobs c · (probability sums this layer recorded, with graph)."""
    term = None
    for (job, at), (_, p_sum, _, _) in router_stats.items():
        if at == layer and job in coefficients and p_sum.requires_grad:
            part = (coefficients[job].to(p_sum.dtype) * p_sum).sum()
            term = part if term is None else term + part
    return term
