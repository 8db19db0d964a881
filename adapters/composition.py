"""What a request asks of its adapters beyond "adapter X at full strength": a strength of its own (`lora_scale`),
or several adapters at once with a merge method, following PEFT's `add_weighted_adapter` (and LoRAX's
`merged_adapters`).

- `linear` is Σ wᵢ·ΔWᵢ, what PEFT's `cat` combination computes. Nothing is materialised: the request's rows read
  every part's pages in the pool, each page's term multiplied by its part's weight (adapters/ops/meta.py's page
  scales), so a combination costs the sum of its parts' ranks and nothing else.
- `ties`, `dare_linear`, `dare_ties`, `magnitude_prune` combine A and B separately (PEFT's
  `_generalized_task_arithmetic_weighted_adapter`: A and B of part i weighted by ±√|wᵢ·sᵢ| and √|wᵢ·sᵢ|, then
  pruned, sign-elected and summed), which needs the merged adapter itself: `merge_lora` builds it once per
  (parts, versions, method, parameters), off the step loop, and the runtime keeps it as a virtual adapter in the
  pool. DARE's random masks come from a generator seeded with `seed`, drawn in PEFT's order (layer by layer,
  q k v o gate up down, A then B, part by part), so the same seed gives PEFT's adapter exactly.

A `Composition` travels with the engine request (engine/core/request.py's adapter_mix, opaque to the engine) and
salts the prefix cache: K/V computed under one combination or strength are never reused for another.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from loraplex.adapters.errors import AdapterError
from loraplex.adapters.peft import LORA_MODULES, LoRAAdapterConfig, LoRAWeights

LINEAR = "linear"
MERGE_METHODS = (LINEAR, "ties", "dare_linear", "dare_ties", "magnitude_prune")
SIGN_METHODS = ("total", "frequency")
_RANDOM = ("dare_linear", "dare_ties")
_DENSITY = ("ties", "dare_linear", "dare_ties", "magnitude_prune")

Part = tuple[int, int, float]  # (adapter_id, version, weight)


@dataclass(frozen=True, slots=True)
class Composition:
    parts: tuple[Part, ...]
    method: str = LINEAR
    density: float = 1.0
    majority_sign_method: str = "total"
    seed: int = 0
    scale: float = 1.0  # the request's lora_scale: multiplies the whole delta, per row

    def __post_init__(self) -> None:
        if not self.parts:
            raise AdapterError("a composition needs at least one adapter")
        if self.method not in MERGE_METHODS:
            raise AdapterError(f"merge method {self.method!r} is not one of {', '.join(MERGE_METHODS)}",
                               param="merge.method")
        if not (0.0 <= self.density <= 1.0) or not math.isfinite(self.density):
            raise AdapterError(f"merge density must be in [0, 1], got {self.density}", param="merge.density")
        if self.majority_sign_method not in SIGN_METHODS:
            raise AdapterError(f"majority_sign_method must be one of {', '.join(SIGN_METHODS)}",
                               param="merge.majority_sign_method")
        if not all(math.isfinite(w) for *_, w in self.parts) or not math.isfinite(self.scale):
            raise AdapterError("adapter weights and lora_scale must be finite numbers")
        if len({(a, v) for a, v, _ in self.parts}) != len(self.parts):
            raise AdapterError("an adapter appears twice in `adapters`", param="adapters")

    @property
    def materialised(self) -> bool:
        """True when the parts are merged into one virtual adapter (every method but linear of 2+ parts: PEFT
        merges a single adapter linearly whatever the method)."""
        return self.method != LINEAR and len(self.parts) > 1

    def adapter_keys(self) -> tuple[tuple[int, int], ...]:
        return tuple((a, v) for a, v, _ in self.parts)

    def without_scale(self) -> Composition:
        """What rows may share one segment: the same pages with the same weights (their lora_scale is per row)."""
        return self if self.scale == 1.0 else Composition(self.parts, self.method, self.density,
                                                          self.majority_sign_method, self.seed)

    def describe(self) -> str:
        names = "+".join(f"{w:g}*{a}v{v}" for a, v, w in self.parts)
        extra = "" if not self.materialised else f" density={self.density:g}"
        return f"{self.method}({names}){extra}" + ("" if self.scale == 1.0 else f" x{self.scale:g}")


@dataclass(frozen=True, slots=True)
class PartInfo:
    """What the checks need of one part: the HTTP side has it from the store, the engine from its registry."""
    name: str
    kind: str  # "lora" or "mixlora"
    rank: int
    num_pages: int | None = None  # pool pages it takes (known to the engine)
    full_modules: bool = False  # has its own embed_tokens / lm_head


def check_parts(mix: Composition, parts: list[PartInfo], pool_pages: int | None = None) -> None:
    """AdapterError (400) for a strength or combination that cannot be served exactly."""
    mixlora = [p.name for p in parts if p.kind == "mixlora"]
    if mixlora and (len(parts) > 1 or mix.scale != 1.0):
        raise AdapterError(f"MixLoRA adapter {mixlora[0]} cannot take a lora_scale or be combined with other "
                           "adapters (its experts' router decides their weights)", param="adapters")
    dora = [p.name for p in parts if p.kind == "dora"]
    if dora and (len(parts) > 1 or mix.scale != 1.0):
        raise AdapterError(f"DoRA adapter {dora[0]} cannot take a lora_scale or be combined with other adapters "
                           "(its magnitudes are normalised by the norm of its own full-strength weights)",
                           param="adapters")
    full = [p.name for p in parts if p.full_modules]
    if full and (len(parts) > 1 or mix.scale != 1.0):
        raise AdapterError(f"adapter {full[0]} has its own embed_tokens / lm_head (modules_to_save or LoRA on them): "
                           "it cannot take a lora_scale or be combined with other adapters", param="adapters")
    ranks = sorted({p.rank for p in parts if p.rank})
    if mix.materialised and len(ranks) > 1:
        raise AdapterError(f"merge method {mix.method} needs adapters of one rank (PEFT's rule); got ranks "
                           f"{ranks}: use linear, which sums adapters of any ranks", param="merge.method")
    if pool_pages is not None:
        pages = parts[0].num_pages if mix.materialised else sum(p.num_pages for p in parts)
        if pages > pool_pages:
            raise AdapterError(f"these adapters need {pages} pool pages at once; this server's LoRA pool has "
                               f"{pool_pages} (--lora-pool-pages / --lora-pool-bytes)", param="adapters")


def merge_lora(parts: list[tuple[LoRAWeights, float]], composition: Composition) -> LoRAWeights:
    """PEFT's add_weighted_adapter(combination_type=method) for ties / dare_* / magnitude_prune: the merged
    adapter's A and B per (layer, module), rank r (the parts' common rank) and scale 1 (lora_alpha = r)."""
    method, density = composition.method, composition.density
    ranks = {w.rank for w, _ in parts}
    if len(ranks) != 1:
        raise AdapterError(f"merge method {method} needs adapters of one rank (PEFT's rule); got ranks "
                           f"{sorted(ranks)}: use linear, which sums adapters of any ranks", param="merge.method")
    gen = torch.Generator().manual_seed(composition.seed)
    keys = sorted({k for w, _ in parts for k in w.tensors}, key=lambda k: (k[0], list(LORA_MODULES).index(k[1])))
    tensors: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    dtype = next(iter(parts[0][0].tensors.values()))[0].dtype
    for layer, module in keys:
        name = f"model.layers.{layer}.{LORA_MODULES[module]}.{module}"
        a_list, b_list, wa, wb = [], [], [], []
        for weights, w in parts:
            pair = weights.tensors.get((layer, module))
            if pair is None:
                continue
            scale = weights.config.scale_of(name)
            a, b = pair[0].float(), pair[1].float() / scale  # B is stored with its scale folded in
            if a_list and a.shape != a_list[0].shape:
                raise AdapterError(f"{name}: the adapters' ranks differ there ({a.shape[0]} vs {a_list[0].shape[0]}); "
                                   f"merge method {method} needs equal ranks", param="merge.method")
            ws = w * scale
            wa.append(math.sqrt(abs(ws)) * (1 if ws >= 0 else -1))  # the sign on A only
            wb.append(math.sqrt(abs(ws)))
            a_list.append(a)
            b_list.append(b)
        merged = [_combine(method, tensors_, torch.tensor(weights_), density, composition.majority_sign_method, gen)
                  for tensors_, weights_ in ((a_list, wa), (b_list, wb))]
        tensors[layer, module] = (merged[0].to(dtype).contiguous(), merged[1].to(dtype).contiguous())
    rank = next(iter(ranks))
    config = LoRAAdapterConfig(r=rank, lora_alpha=float(rank), target_modules=tuple(sorted({m for _, m in keys})))
    return LoRAWeights(config, max(a.shape[0] for a, _ in tensors.values()), tensors)


def _combine(method: str, tensors: list[torch.Tensor], weights: torch.Tensor, density: float, sign_method: str,
             gen: torch.Generator) -> torch.Tensor:
    """peft.utils.merge_utils' ties / dare_linear / dare_ties / magnitude_prune, written from their definitions."""
    if method in _DENSITY and density < 1.0:
        if method in _RANDOM:  # DARE: keep each entry with probability `density`, rescaled by 1 / density
            tensors = [t * torch.bernoulli(torch.full_like(t, density), generator=gen) / density for t in tensors]
        else:  # keep the int(density * numel) largest magnitudes of each tensor
            pruned = []
            for t in tensors:
                keep = torch.zeros(t.numel(), dtype=t.dtype)
                keep[torch.topk(t.abs().reshape(-1), k=int(density * t.numel())).indices] = 1
                pruned.append(t * keep.view_as(t))
            tensors = pruned
    stacked = torch.stack(tensors)
    weighted = stacked * weights.view(-1, *([1] * (stacked.dim() - 1)))
    if method in ("ties", "dare_ties"):  # elect a sign per entry, sum the agreeing parts, average over them
        total = stacked.sum(dim=0) if sign_method == "total" else stacked.sign().sum(dim=0)
        agree = stacked.sign() == torch.where(total >= 0, 1, -1)
        return (weighted * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1.0)
    return weighted.sum(dim=0)
