"""CPU fast path for the base model's linears: oneDNN-prepacked weights, swapped in for nn.Linear.

The plain `nn.Linear` is the reference; `PackedLinear` computes the same product with the weight
reordered once into oneDNN's blocked layout, which skips the per-call reorder and runs the decode
batch shapes 1.1-2x faster on AVX-512 CPUs (bf16 results are bit-identical on the shapes tested).
Like quantization, it is applied by swapping modules, never inside model files.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

MAX_WARM_UP_ROWS = 128  # bounds start-up time when --max-num-seqs is large


def can_prepack(device: torch.device, dtype: torch.dtype) -> bool:
    if device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16):
        return False
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return False
    return dtype != torch.bfloat16 or torch.ops.mkldnn._is_mkldnn_bf16_supported()


# sibling projections that read the same input: packed side by side into one weight (one oneDNN call)
FUSED_SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))

# oneDNN's AMX bf16 GEMMs (Sapphire Rapids and later) round some rows differently depending on how many rows
# share the call (rows_are_batch_invariant below: 1 ulp on a few rows of 37, enough to change greedy tokens); its
# AVX512_CORE_BF16 kernels do not. oneDNN reads this variable once, at its first CPU-ISA query.
ONEDNN_ISA_VARIABLE = "ONEDNN_MAX_CPU_ISA"
BATCH_INVARIANT_ISA = "AVX512_CORE_BF16"


def has_amx() -> bool:
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return False
    return "amx_bf16" in flags.split()


def cap_isa_for_batch_invariance() -> bool:
    """On an AMX CPU, keep oneDNN off AMX (see BATCH_INVARIANT_ISA) so a row's bf16 result never depends on its
    batch. Takes effect only before the process's first oneDNN call: the engine process calls it first thing. A
    user's own ONEDNN_MAX_CPU_ISA is left as it is. Returns whether the cap is (now) set."""
    if not has_amx() or os.environ.get(ONEDNN_ISA_VARIABLE, BATCH_INVARIANT_ISA) != BATCH_INVARIANT_ISA:
        return False
    os.environ[ONEDNN_ISA_VARIABLE] = BATCH_INVARIANT_ISA
    return True


def rows_are_batch_invariant(dtype: torch.dtype = torch.bfloat16, rows: int = 37) -> bool:
    """A quick probe of this process's oneDNN: does each row of a prepacked linear come out the same alone as
    among `rows` rows, bit for bit? (A few milliseconds: one 576x1536 weight, `rows` + 1 calls.)"""
    gen = torch.Generator().manual_seed(0)
    linear = nn.Linear(576, 1536, bias=False).to(dtype)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(linear.weight.shape, generator=gen))
    packed = PackedLinear(linear, batch_size_hint=64)
    x = torch.randn(rows, 576, generator=gen).to(dtype)
    with torch.inference_mode():
        many = packed(x)
        return all(torch.equal(packed(x[i:i + 1])[0], many[i]) for i in range(rows))


def _linear(x: torch.Tensor, packed_weight: torch.Tensor, bias: torch.Tensor | None,
            pad_single_rows: bool = False) -> torch.Tensor:
    if pad_single_rows and x.dim() == 2 and x.shape[0] == 1:
        # oneDNN computes a single row with a GEMV whose summation order differs from the GEMM every
        # M >= 2 shares (measured on bf16 and fp32): two rows keep a request's result independent of its
        # batch (greedy decoding alone == in a batch, exactly), for ~10% of batch-1 decode speed
        return torch.ops.mkldnn._linear_pointwise(x.expand(2, -1), packed_weight, bias, "none", [], "")[:1]
    return torch.ops.mkldnn._linear_pointwise(x, packed_weight, bias, "none", [], "")


class SiblingOutputs:
    """Sibling linears computed as one product: the first member called with an input runs `product(x)` for all of
    them; each member then takes its column slice of it, once (a member called again with that input gets a fresh
    product). Contract, as in the decoder layers: the siblings are called with the very same tensor object, which
    is not modified in place between the calls. (Inference tensors have no version counter to check.)"""

    def __init__(self, sizes: list[int]) -> None:
        self.sizes = sizes
        self._x: torch.Tensor | None = None
        self._outs: list[torch.Tensor] = []
        self._taken: list[bool] = []

    def output(self, x: torch.Tensor, index: int, product) -> torch.Tensor:
        if x is not self._x or self._taken[index]:
            self._outs = list(product(x).split(self.sizes, dim=-1))
            self._x, self._taken = x, [False] * len(self.sizes)
        self._taken[index] = True
        out = self._outs[index]
        if all(self._taken):  # every sibling served: hold no activations between steps
            self._x, self._outs = None, []
        return out


class PackedGroup:
    """Sibling linears that read the same input (q/k/v, gate/up), packed as one [sum(out), in] weight, computed
    once per input (SiblingOutputs)."""

    def __init__(self, linears: list[nn.Linear], batch_size_hint: int, pad_single_rows: bool = True) -> None:
        self.pad_single_rows = pad_single_rows
        self.sizes = [m.out_features for m in linears]
        self.in_features, self.out_features = linears[0].in_features, sum(self.sizes)
        weight = torch.cat([m.weight.detach() for m in linears])  # [sum(out), in]
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight, batch_size_hint)
        self.bias = None if all(m.bias is None for m in linears) else torch.cat([
            m.bias.detach() if m.bias is not None else weight.new_zeros(m.out_features) for m in linears])
        self.siblings = SiblingOutputs(self.sizes)

    def output(self, x: torch.Tensor, index: int) -> torch.Tensor:
        return self.siblings.output(x, index, lambda x: _linear(x, self.packed_weight, self.bias, self.pad_single_rows))


class PackedLinear(nn.Module):
    """y = x @ W^T + b with W prepacked for oneDNN (alone, or as a member of a PackedGroup). The oneDNN op
    has no autograd formula: with `keep_dense` (a trainer is attached) the dense weight stays too and a
    call that needs gradients (training through the frozen base) runs the plain nn.Linear product on it,
    at the cost of a second copy of the weight."""

    def __init__(self, linear: nn.Linear, batch_size_hint: int, keep_dense: bool = False,
                 group: PackedGroup | None = None, index: int = 0, pad_single_rows: bool = True) -> None:
        super().__init__()
        self.pad_single_rows = pad_single_rows
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        self.register_buffer("dense_weight", weight if keep_dense else None, persistent=False)
        # [out_features, in_features] in oneDNN's blocked layout, tuned for ~batch_size_hint rows
        self.register_buffer("packed_weight", None if group is not None else
                             torch.ops.mkldnn._reorder_linear_weight(weight, batch_size_hint), persistent=False)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone(),
                             persistent=False)
        object.__setattr__(self, "group", group)  # shared by the siblings: not a submodule of each
        self.index = index

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in_features] -> [..., out_features]
        if self.dense_weight is not None and torch.is_grad_enabled() and x.requires_grad:
            return F.linear(x, self.dense_weight, self.bias)
        if self.group is not None:
            return self.group.output(x, self.index)
        return _linear(x, self.packed_weight, self.bias, self.pad_single_rows)

    @torch.no_grad()
    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:  # [out, in]
        """W read back from the packed weight: the identity through it, without the bias (exact: each output is
        one weight times 1 plus zeros). What an adapter's DoRA norms are computed against."""
        if self.dense_weight is not None:
            return self.dense_weight.to(dtype)
        packed = self.packed_weight if self.group is None else self.group.packed_weight
        out = _linear(torch.eye(self.in_features, dtype=packed.dtype, device=packed.device), packed, None)
        if self.group is not None:
            out = out.split(self.group.sizes, dim=-1)[self.index]
        return out.t().to(dtype)

    def extra_repr(self) -> str:
        fused = f", fused={self.index + 1}/{len(self.group.sizes)}" if self.group is not None else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}{fused}"


def prepack_linears(model: nn.Module, batch_size_hint: int, keep_dense: bool = False, fuse: bool = True,
                    batch_invariant: bool = True) -> int:
    """Swap every nn.Linear in `model` for a PackedLinear and warm up the decode batch sizes; returns how
    many were swapped. fuse: sibling projections (FUSED_SIBLINGS) share one packed weight and one call.
    keep_dense: they can also backpropagate (see PackedLinear). batch_invariant: a single row is computed
    as two (see _linear), so a row's result never depends on its batch."""
    swaps = [(parent, name, child) for parent in model.modules()
             for name, child in parent.named_children() if type(child) is nn.Linear]
    members: dict[tuple[int, str], tuple[PackedGroup, int]] = {}
    if fuse:
        children = {(id(p), n): c for p, n, c in swaps}
        for parent in {id(p): p for p, _, _ in swaps}.values():
            for names in FUSED_SIBLINGS:
                linears = [children.get((id(parent), n)) for n in names]
                if all(m is not None for m in linears) and len({m.in_features for m in linears}) == 1 \
                        and len({m.weight.dtype for m in linears}) == 1:
                    group = PackedGroup(linears, batch_size_hint, batch_invariant)
                    members.update({(id(parent), n): (group, i) for i, n in enumerate(names)})
    for parent, name, child in swaps:
        group, index = members.get((id(parent), name), (None, 0))
        setattr(parent, name, PackedLinear(child, batch_size_hint, keep_dense, group, index, batch_invariant))
    groups = list({id(g): g for g, _ in members.values()}.values())
    singles = [getattr(p, n) for p, n, _ in swaps if (id(p), n) not in members]
    warm_up(singles + groups, min(batch_size_hint, MAX_WARM_UP_ROWS))
    logger.info("prepacked %d linear layers for oneDNN (%d fused groups)%s", len(swaps), len(groups),
                " (dense weights kept for training)" if keep_dense else "")
    return len(swaps)


@torch.inference_mode()
def warm_up(linears: list[PackedLinear | PackedGroup], max_rows: int) -> None:
    """oneDNN builds a primitive per (weight shape, rows) on first use (~0.7 ms each) and caches it
    by shape: one call per distinct shape and per decode batch size 1..max_rows does it at start-up
    instead of during the first burst of traffic."""
    by_shape = {(m.in_features, m.out_features, m.bias is not None, m.packed_weight.dtype): m for m in linears}
    for m in by_shape.values():
        for rows in range(1, max_rows + 1):
            _linear(torch.zeros(rows, m.in_features, dtype=m.packed_weight.dtype), m.packed_weight, m.bias)
