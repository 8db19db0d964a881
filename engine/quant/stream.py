"""Weight-streaming CPU linears for decode latency: dense float32 / bfloat16 weights and 8-bit / 4-bit weight-only
codes, multiplied by `loraplex_cpu::stream_linear` (engine/kernels/csrc/cpu_stream_linear.cpp).

A decode step at small batch is bound by the bytes of weights it reads, and oneDNN's small-M kernels move them at
roughly half this machine's DRAM bandwidth; the streaming kernel decodes each block of output channels once per
call and dots it with every row of x, so a step reads its weights once, as 1, 2 or 4 bytes per weight (+ a scale
and a zero per group for the codes). Every output is one float32 dot product in a fixed order, whatever the batch:
a row's result is the same alone and in any batch (the engine's batch invariance).

Formats (bits = 16 or 32 means dense):
    dense   weight [out, in] float32 or bfloat16
    8-bit   codes uint8 [out, in],           W = (q - z) * s per group of `group_size` input channels
    4-bit   codes uint8 [out, in / 2],       each 16-channel chunk is 8 bytes: byte i = channel i (low nibble),
                                             channel i + 8 (high nibble)
    scales float32 [out, in / group_size], zeros int32 [out, in / group_size]

A bfloat16 x against dense bfloat16 weights is multiplied in bfloat16 pairs (AVX-512 BF16's vdpbf16ps, or the same
arithmetic in fused multiply-adds: every product exact, one rounding per pair), the reference F.linear in bfloat16.

With `act_int8`, 8- and 4-bit linears also quantize x to int8 per block of 32 input channels (d = max|x| / 127,
a = round(x / d), as llama.cpp's Q8_0 activations) and multiply with integer dot products: the reference is then
F.linear(a * d, W), the same weights on the rounded activations (`quantize_activations`). Both need in_features and
the group size to be multiples of 64 (`can_act_int8`). The kernel then reads the codes in one of two layouts made
from the row-order ones when int8 activations are switched on: channel lanes (`channel_lanes`, kinds 7 and 8, when
out_features is a multiple of 16: each 32-bit lane of a vector one output channel, so one integer dot-product
instruction advances 16 channels, 2-2.4x fewer instructions per weight than kinds 5/6; 1.25-1.4x faster decode steps
at batch 4-64, 1.0-1.1x at batch 1, where the bytes set the pace), else every IL_ROWS channels interleaved
(`interleave_rows`, kinds 5 and 6). An AVX2 build multiplies 8-bit codes as signed bytes; for it the 8-bit lanes are
stored as q ^ 0x80 (kind 9, `lane_u8_kind`), which every build reads. `codes()` and `row_params()` give the row-order
codes, scales and zeros back.

The 8- and 4-bit forms come from GPTQ checkpoints (`loraplex quantize --format gptq --bits 8|4`, symmetric or not,
without act-order) by repacking, so their float32 weights equal the GPTQ reference's dequantized weights exactly.
`StreamLinear.reference` (plain torch: F.linear on `dequantized_weight`) is what the tests compare against; it is
also the path whenever autograd is on (training through the frozen base) or the kernels are not loaded.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from loraplex.engine.kernels import cpu_kernels
from loraplex.engine.kernels.cpu_linear import SiblingOutputs

logger = logging.getLogger(__name__)

KIND = {32: 0, 16: 0, 8: 1, 4: 2}  # the kernel's weight kinds: dense, 8-bit codes, 4-bit codes
KIND_ACT_INT8 = {8: 3, 4: 4}  # the same codes, with int8 activations and integer dot products
KIND_ACT_INT8_IL = {8: 5, 4: 6}  # the same, codes of IL_ROWS channels interleaved per 64-channel chunk
KIND_ACT_INT8_CL = {8: 7, 4: 8}  # the same, codes in channel lanes (channel_lanes)
KIND_U8_CL_SIGNED = 9  # kind 7 with each code stored as q ^ 0x80, where the loaded kernels read those faster (AVX2)
IL_ROWS = 4
LANES = 16  # output channels per lane group of the channel-lane layout: out_features a multiple of it
CHUNK = 16  # input channels per decoded chunk: in_features and group sizes are multiples of it
ACT_BLOCK = 32  # input channels per activation scale (int8 activations)
ACT_CHUNK = 64  # in_features and group sizes are multiples of it for int8 activations
SWITCHES = {"count": 0}  # set_act_int8 calls so far: engine/layers/fused_layer.py's argument cache keys on it


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] (K a multiple of 32) -> (a int8 [..., K], d float32 [..., K / 32]): per block of 32 channels
    d = max|x| / 127 and a = round-half-even(x * (1 / d)), bit for bit what the kernel computes."""
    xb = x.float().reshape(*x.shape[:-1], x.shape[-1] // ACT_BLOCK, ACT_BLOCK)
    d = xb.abs().amax(dim=-1) / 127.0
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    a = torch.round(xb * inv.unsqueeze(-1)).clamp(-127, 127)
    return a.to(torch.int8).reshape(x.shape), d


def dequantize_activations(x: torch.Tensor) -> torch.Tensor:
    """x with each value replaced by its int8 rounding a * d (float32): what the kernel's integer products see.
    Under autograd the rounding passes gradients straight through."""
    a, d = quantize_activations(x.detach())
    rounded = (a.float().reshape(*d.shape, ACT_BLOCK) * d.unsqueeze(-1)).reshape(x.shape)
    if x.requires_grad:
        return x.float() + (rounded - x.float()).detach()
    return rounded


def interleave_rows(codes: torch.Tensor, chunks: int) -> torch.Tensor:
    """Codes [N, B] of `chunks` 64-channel chunks a row (N a multiple of IL_ROWS) -> the same bytes with each IL_ROWS
    rows' chunks interleaved: [N / IL_ROWS, chunks, IL_ROWS, chunk bytes] flattened to [N, B]. A batch-1 tile of
    IL_ROWS channels then reads one sequential stream (the kernel's kinds 5 and 6)."""
    n, b = codes.shape
    return codes.view(n // IL_ROWS, IL_ROWS, chunks, b // chunks).transpose(1, 2).reshape(n, b).contiguous()


def deinterleave_rows(codes: torch.Tensor, chunks: int) -> torch.Tensor:
    """interleave_rows' inverse."""
    n, b = codes.shape
    return codes.view(n // IL_ROWS, chunks, IL_ROWS, b // chunks).transpose(1, 2).reshape(n, b).contiguous()


def channel_lanes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Unpacked codes [N, K] (N a multiple of 16, K of 8) -> the kernel's channel-lane layout (kinds 7 and 8), each 16
    output channels' codes as 64-byte vectors whose 4-byte lane c is channel c's: [N / 16, K / 4, 16, 4] for 8 bits;
    for 4 bits [N / 16, K / 8, 16, 4] bytes, byte t of lane c holding input k + t in its low nibble and k + 4 + t in
    its high one. Returned as [N, K] or [N, K / 2] uint8, the shape of the row-order codes."""
    n, k = q.shape
    q = q.to(torch.uint8)
    if bits == 8:
        lanes = q.view(n // LANES, LANES, k // 4, 4).transpose(1, 2)
    else:
        steps = q.view(n // LANES, LANES, k // 8, 2, 4)  # [groups, lane, step, low/high, t]
        lanes = (steps[:, :, :, 0] | (steps[:, :, :, 1] << 4)).transpose(1, 2)
    return _pair_groups(lanes.reshape(n // LANES, -1, 64)).reshape(n, -1)


def _pair_groups(v: torch.Tensor) -> torch.Tensor:
    """[groups, vectors, 64] -> every two lane groups' vectors alternating ([pairs, vectors, 2, 64]; a last odd group
    as it is): a one-row tile of 32 channels reads one sequential stream."""
    pairs = v.shape[0] // 2
    head = v[:2 * pairs].view(pairs, 2, v.shape[1], 64).transpose(1, 2).reshape(2 * pairs, v.shape[1], 64)
    return torch.cat([head, v[2 * pairs:]]).contiguous()


def _unpair_groups(v: torch.Tensor) -> torch.Tensor:
    pairs = v.shape[0] // 2
    head = v[:2 * pairs].reshape(pairs, v.shape[1], 2, 64).transpose(1, 2).reshape(2 * pairs, v.shape[1], 64)
    return torch.cat([head, v[2 * pairs:]]).contiguous()


def lane_u8_kind() -> int:
    """The 8-bit channel-lane kind the loaded kernels read fastest: 9 (codes stored as q ^ 0x80) where they multiply
    codes as signed bytes (AVX2), else 7. Either kind runs correctly on every build: the kind says how the bytes are
    stored, whichever build is loaded when they are read."""
    if not cpu_kernels.available():
        return KIND_ACT_INT8_CL[8]
    return int(torch.ops.loraplex_cpu.channel_lane_u8_kind())


def from_channel_lanes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """channel_lanes' inverse: -> unpacked codes [N, K] uint8."""
    n = codes.shape[0]
    k = codes.shape[1] * (1 if bits == 8 else 2)
    codes = _unpair_groups(codes.reshape(n // LANES, -1, 64))
    if bits == 8:
        return codes.view(n // LANES, k // 4, LANES, 4).transpose(1, 2).reshape(n, k).contiguous()
    packed = codes.view(n // LANES, k // 8, LANES, 4).transpose(1, 2)  # [groups, lane, step, t]
    return torch.stack([packed & 15, packed >> 4], dim=3).reshape(n, k).contiguous()


def lane_params(t: torch.Tensor) -> torch.Tensor:
    """Scales or zeros [N, groups] -> [N / 16, groups, 16] (flattened to [N, groups]): the channel-lane kernels read
    16 channels' scale of a group as one vector."""
    n, g = t.shape
    return t.view(n // LANES, LANES, g).transpose(1, 2).reshape(n, g).contiguous()


def from_lane_params(t: torch.Tensor | None) -> torch.Tensor | None:
    """lane_params' inverse."""
    if t is None:
        return None
    n, g = t.shape
    return t.view(n // LANES, g, LANES).transpose(1, 2).reshape(n, g).contiguous()


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """4-bit codes [out, in] (values 0..15) -> [out, in / 2] uint8 in the kernel's chunk layout."""
    out, k = q.shape
    chunks = q.to(torch.uint8).reshape(out, k // CHUNK, 2, CHUNK // 2)  # [out, chunks, low/high half, 8]
    return (chunks[:, :, 0] | (chunks[:, :, 1] << 4)).reshape(out, k // 2).contiguous()


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_nibbles: [out, in / 2] uint8 -> [out, in] uint8 codes."""
    out, half = packed.shape
    chunks = packed.reshape(out, half * 2 // CHUNK, CHUNK // 2)
    return torch.stack([chunks & 15, chunks >> 4], dim=2).reshape(out, half * 2)


def dequantize_codes(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """codes [out, in] (unpacked), scales/zeros [out, groups] -> float32 [out, in]: (q - z) * s, as GPTQ's reference."""
    z = zeros.repeat_interleave(group_size, dim=1)
    s = scales.float().repeat_interleave(group_size, dim=1)
    return (q.to(torch.int32) - z).float() * s


class StreamLinear(nn.Module):
    """y = x @ W^T + b through the streaming kernel, W dense or 8/4-bit codes (see the module doc). Members of a
    StreamGroup (fused q/k/v or gate/up) hold no weight of their own: the group computes all of them in one call."""

    def __init__(self, in_features: int, out_features: int, bits: int, weight: torch.Tensor | None,
                 scales: torch.Tensor | None = None, zeros: torch.Tensor | None = None, group_size: int = 0,
                 bias: torch.Tensor | None = None, group: StreamGroup | None = None, index: int = 0) -> None:
        super().__init__()
        if bits not in KIND:
            raise ValueError(f"stream linear: {bits}-bit weights are not supported (32, 16, 8, 4 are)")
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        self.register_buffer("weight", weight, persistent=False)  # dense weight or codes; None in a group member
        self.register_buffer("scales", scales, persistent=False)
        self.register_buffer("zeros", zeros, persistent=False)
        self.register_buffer("bias", bias, persistent=False)
        object.__setattr__(self, "group", group)  # shared by the siblings: not a submodule of each
        self.index = index
        self.act_int8 = False  # int8 activations: set_act_int8
        # weight holds codes in row order, interleave_rows' or channel_lanes' (set_act_int8); with channel lanes the
        # scales and zeros are in lane_params' order (row_params gives them in row order)
        self.layout = "rows"
        self.kind = KIND[bits]  # the kernel's weight kind (engine/kernels/csrc/cpu_stream_linear.cpp)
        self.register_buffer("zero_point", None, persistent=False)

    def set_act_int8(self, on: bool, layout: str | None = None) -> None:
        """Multiply with int8 activations (integer dot products) or exact weight-only. Symmetric codes have one zero
        point (2^(bits-1)): with int8 activations the kernel then takes it alone (`kernel_zeros`) and computes the zero
        term once per row instead of once per output channel. With int8 activations the codes are laid out in channel
        lanes (`channel_lanes`, kinds 7 and 8) when out_features is a multiple of 16, else with every IL_ROWS output
        channels interleaved (`interleave_rows`, kinds 5 and 6) when it is a multiple of IL_ROWS; `layout` ("lanes",
        "interleaved" or "rows") picks one of those the shape allows instead (benchmarks compare them). A group member
        switches its group's computation."""
        if on and not can_act_int8(self):
            raise ValueError(f"stream linear ({self.extra_repr()}): int8 activations need 8/4-bit codes and input "
                             "widths and group sizes that are multiples of 64")
        possible = ["rows"]
        if on and self.weight is not None:
            possible = [name for name, width in (("lanes", LANES), ("interleaved", IL_ROWS))
                        if self.out_features % width == 0] + possible
        if layout is not None and layout not in possible:
            raise ValueError(f"stream linear ({self.extra_repr()}): layout {layout!r} is not one of {possible}")
        layout = layout or possible[0]
        self.act_int8 = on
        SWITCHES["count"] += 1
        signed = self.signed_lanes  # kept unless the codes are laid out again
        if self.weight is not None and layout != self.layout:
            plain, scales, zeros = self.codes(), *self.row_params()
            if layout == "interleaved":
                self.weight = interleave_rows(plain, self.in_features // ACT_CHUNK)
            elif layout == "lanes":
                self.weight = channel_lanes(plain if self.bits == 8 else unpack_nibbles(plain), self.bits)
            else:
                self.weight = plain
            signed = layout == "lanes" and self.bits == 8 and lane_u8_kind() == KIND_U8_CL_SIGNED
            if signed:
                self.weight = self.weight ^ 0x80
            lanes = layout == "lanes"
            self.scales, self.zeros = (lane_params(scales), lane_params(zeros)) if lanes else (scales, zeros)
        self.layout = layout
        kinds = {"rows": KIND_ACT_INT8, "interleaved": KIND_ACT_INT8_IL, "lanes": KIND_ACT_INT8_CL}[layout]
        self.kind = kinds[self.bits] if on else KIND[self.bits]
        if on and signed:
            self.kind = KIND_U8_CL_SIGNED
        zeros = self.zeros
        one = on and zeros is not None and bool((zeros == zeros.reshape(-1)[0]).all())
        self.zero_point = zeros.reshape(-1)[:1].clone() if one else None
        if self.group is not None and self.group.linear is not self and self.group.linear.act_int8 != on:
            self.group.linear.set_act_int8(on)

    @property
    def signed_lanes(self) -> bool:
        """8-bit channel lanes stored as q ^ 0x80 (kind 9: lane_u8_kind)."""
        return self.kind == KIND_U8_CL_SIGNED

    @property
    def interleaved(self) -> bool:
        return self.layout == "interleaved"

    def codes(self) -> torch.Tensor | None:
        """The weight or codes in plain row order (the kernel may hold them interleaved or in channel lanes)."""
        if self.layout == "interleaved":
            return deinterleave_rows(self.weight, self.in_features // ACT_CHUNK)
        if self.layout == "lanes":
            q = self.unpacked_codes()
            return q if self.bits == 8 else pack_nibbles(q)
        return self.weight

    def row_params(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(scales, zeros) [out, groups] in row order (the kernel's may be in lane_params' order)."""
        if self.layout != "lanes":
            return self.scales, self.zeros
        return from_lane_params(self.scales), from_lane_params(self.zeros)

    @property
    def kernel_zeros(self) -> torch.Tensor | None:
        """The zero points the kernel takes: [out, groups] (in lane_params' order with channel lanes), or [1] when they
        are all one with int8 activations."""
        return self.zeros if self.zero_point is None else self.zero_point

    # ---- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_linear(cls, linear: nn.Linear) -> StreamLinear:
        w = linear.weight.detach()
        bits = 32 if w.dtype == torch.float32 else 16
        return cls(linear.in_features, linear.out_features, bits, w.contiguous(),
                   bias=None if linear.bias is None else linear.bias.detach().clone())

    @classmethod
    def from_gptq(cls, ref: nn.Module, dtype: torch.dtype) -> StreamLinear:
        """Repack a GPTQLinear (4- or 8-bit, input channels in group order) without changing a weight."""
        from .gptq import unpack_int
        if not can_stream_gptq(ref):
            raise ValueError(f"GPTQ linear ({ref.extra_repr()}) cannot be streamed")
        q = unpack_int(ref.qweight, ref.bits, dim=0).t().contiguous()  # [out, in] codes
        zeros = (unpack_int(ref.qzeros, ref.bits, dim=1) + 1).t().contiguous().to(torch.int32)  # v1 stores zero - 1
        scales = ref.scales.float().t().contiguous()  # [out, groups]
        codes = q.to(torch.uint8) if ref.bits == 8 else pack_nibbles(q)
        return cls(ref.in_features, ref.out_features, ref.bits, codes, scales, zeros, ref.group_size,
                   None if ref.bias is None else ref.bias.to(dtype))

    # ---- reference and weight read-back -------------------------------------------------------------------------
    def _own(self, t: torch.Tensor | None) -> torch.Tensor | None:
        """t, a tensor of this linear's group ([sum(out), ...]), sliced to this member's rows; t itself when alone."""
        if self.group is None or t is None:
            return t
        lo = sum(self.group.sizes[:self.index])
        return t[lo:lo + self.out_features]

    def _computing(self) -> StreamLinear:
        """The linear holding the weights: the group's when this is a member."""
        return self if self.group is None else self.group.linear

    def unpacked_codes(self) -> torch.Tensor | None:
        """The codes in row order, one per byte ([out, in] uint8), straight from whichever layout holds them."""
        if self.layout == "lanes":
            q = from_channel_lanes(self.weight, self.bits)
            return q ^ 0x80 if self.signed_lanes else q
        codes = self.codes()
        return codes if codes is None or self.bits == 8 else unpack_nibbles(codes)

    @torch.no_grad()
    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:  # [out, in]
        src = self._computing()
        if self.bits >= 16:
            return self._own(src.codes()).to(dtype)
        scales, zeros = src.row_params()
        q = self._own(src.unpacked_codes())
        return dequantize_codes(q, self._own(scales), self._own(zeros), self.group_size).to(dtype)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        bias = self._own(self._computing().bias)
        if self.act_int8:  # float32 throughout on the rounded activations, then x's dtype (as the kernel)
            y = F.linear(dequantize_activations(x), self.dequantized_weight(torch.float32),
                         None if bias is None else bias.float())
            return y.to(x.dtype)
        w = self.dequantized_weight(torch.float32 if self.bits != 16 else x.dtype).to(x.dtype)
        return F.linear(x, w, None if bias is None else bias.to(x.dtype))

    # ---- forward -------------------------------------------------------------------------------------------------
    def uses_kernel(self, x: torch.Tensor) -> bool:
        return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and cpu_kernels.loaded()
                and not (torch.is_grad_enabled() and x.requires_grad))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in_features] -> [..., out_features]
        if not self.uses_kernel(x):
            return self.reference(x)
        if self.group is not None:
            return self.group.output(x, self.index)
        return stream_product(x, self)

    @property
    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.weight, self.scales, self.zeros) if t is not None)

    @property
    def kernel_bytes(self) -> int:
        """Bytes one kernel call reads of this linear: the weight or codes, the scales, the zero points it takes (one
        where they are all one: `kernel_zeros`) and the bias. weight_bytes counts what it holds."""
        tensors = (self.weight, self.scales, self.kernel_zeros, self.bias)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def extra_repr(self) -> str:
        fused = f", fused={self.index + 1}/{len(self.group.sizes)}" if self.group is not None else ""
        fmt = f"bits={self.bits}" + (f", group_size={self.group_size}" if self.bits < 16 else "")
        fmt += ", act_int8" if self.act_int8 else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, {fmt}, bias={self.bias is not None}{fused}"


def stream_product(x: torch.Tensor, linear: StreamLinear) -> torch.Tensor:
    x2 = x.reshape(-1, linear.in_features)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    bias = linear.bias
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    y = torch.ops.loraplex_cpu.stream_linear(x2, linear.weight, linear.scales, linear.kernel_zeros, linear.kind,
                                             linear.group_size, bias)
    return y.reshape(*x.shape[:-1], y.shape[-1])


class StreamGroup:
    """Siblings that read the same input (q/k/v, gate/up) as one [sum(out), in] weight, computed in one kernel call
    per input (engine/kernels/cpu_linear.py SiblingOutputs)."""

    def __init__(self, members: list[StreamLinear]) -> None:
        self.sizes = [m.out_features for m in members]
        first = members[0]
        cat = (lambda name: None if getattr(first, name) is None else torch.cat([getattr(m, name) for m in members]))
        bias = None
        if any(m.bias is not None for m in members):
            dtype = next(m.bias.dtype for m in members if m.bias is not None)
            bias = torch.cat([m.bias if m.bias is not None else torch.zeros(m.out_features, dtype=dtype)
                              for m in members])
        self.linear = StreamLinear(first.in_features, sum(self.sizes), first.bits, cat("weight"), cat("scales"),
                                   cat("zeros"), first.group_size, bias)
        self.linear.set_act_int8(first.act_int8)
        self.siblings = SiblingOutputs(self.sizes)

    def output(self, x: torch.Tensor, index: int) -> torch.Tensor:
        return self.siblings.output(x, index, lambda x: stream_product(x, self.linear))


def named_weights(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every parameter and buffer of the model, those of its StreamGroups included (a group's fused weights live on
    the group, not on a submodule), each group once."""
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    groups: set[int] = set()
    for name, m in model.named_modules():
        linear = getattr(getattr(m, "group", None), "linear", None)
        if isinstance(linear, nn.Module) and id(linear) not in groups:
            groups.add(id(linear))
            tensors += [(f"{name}.group.{n}", t) for n, t in linear.named_buffers()]
    return tensors


def can_stream_gptq(linear: nn.Module) -> bool:
    """A GPTQ linear the kernel takes: 4 or 8 bits, groups of a multiple of 16 channels in order (no act-order)."""
    from .gptq import GPTQLinear, default_g_idx
    if not isinstance(linear, GPTQLinear) or linear.bits not in (4, 8) or linear.qweight.device.type != "cpu":
        return False
    g = linear.group_size
    if g <= 0 or g % CHUNK or linear.in_features % g:
        return False
    return bool(torch.equal(linear.g_idx.long(), default_g_idx(linear.in_features, g).long()))


def can_act_int8(linear: StreamLinear) -> bool:
    """8- or 4-bit codes whose input width and group size the integer kernel takes (multiples of 64)."""
    return linear.bits in KIND_ACT_INT8 and linear.in_features % ACT_CHUNK == 0 and linear.group_size % ACT_CHUNK == 0


FUSED_SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def use_stream_linears(model: nn.Module, dtype: torch.dtype, dense: bool = True, fuse: bool = True,
                       act_int8: bool = False) -> int:
    """Swap the base linears for StreamLinears: GPTQ 8/4-bit linears the kernel takes, and (with `dense`) plain
    float32/bfloat16 nn.Linears, the output head included. Siblings of one input are fused. With `act_int8`, the 8/4-bit
    ones that can (can_act_int8) take int8 activations. Returns the count."""
    from .gptq import GPTQLinear
    swaps: list[tuple[nn.Module, str, StreamLinear]] = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, GPTQLinear) and can_stream_gptq(child):
                lin = StreamLinear.from_gptq(child, dtype)
                lin.act_int8 = act_int8 and can_act_int8(lin)  # switched on below, once grouped
                swaps.append((parent, name, lin))
            elif dense and type(child) is nn.Linear and child.weight.dtype in (torch.float32, torch.bfloat16) \
                    and child.in_features % CHUNK == 0 and child.weight.device.type == "cpu":
                swaps.append((parent, name, StreamLinear.from_linear(child)))
    groups = 0
    if fuse:
        by_parent: dict[int, dict[str, StreamLinear]] = {}
        for parent, name, lin in swaps:
            by_parent.setdefault(id(parent), {})[name] = lin
        for members in by_parent.values():
            for names in FUSED_SIBLINGS:
                ms = [members.get(n) for n in names]
                if all(m is not None for m in ms) \
                        and len({(m.in_features, m.bits, m.group_size, m.act_int8) for m in ms}) == 1:
                    group = StreamGroup(ms)
                    for i, m in enumerate(ms):
                        m.weight = m.scales = m.zeros = m.bias = None  # the group holds them
                        object.__setattr__(m, "group", group)
                        m.index = i
                    groups += 1
    for parent, name, lin in swaps:
        if lin.act_int8:
            lin.set_act_int8(True)  # a group member's zero points are its group's, switched on with it
        setattr(parent, name, lin)
    if swaps:
        bits = sorted({lin.bits for _, _, lin in swaps}, reverse=True)
        int8 = sum(lin.act_int8 for _, _, lin in swaps)
        logger.info("%d linears stream their weights (%s-bit; %d fused groups; %d with int8 activations) through the "
                    "CPU streaming kernel", len(swaps), "/".join(map(str, bits)), groups, int8)
    return len(swaps)
