"""CPU fast path for 4-bit GPTQ and EXL2 linears: PyTorch's grouped int4 weight-only matmul (the gpt-fast kernel).

`GPTQLinear` (engine/quant/gptq.py) and `EXL2Linear` (engine/quant/exl2.py, when every group is 4-bit) are the references: it unpacks and dequantizes on every call. `Int4CPULinear`
repacks the same weights once into `aten._convert_weight_to_int4pack_for_cpu`'s layout and multiplies with
`aten._weight_int4pack_mm_for_cpu`, which dequantizes inside the kernel as (q - 8) * scale + zero per
group. A GPTQ weight (q - z) * s maps onto it exactly with zero = (8 - z) * s, an EXL2 4-bit weight
(q - 8) * s with zero = 0. Act-order checkpoints (g_idx not sorted) and EXL2's row permutation are handled
by gathering x's columns once per call in the quantized row order. The kernel runs bf16 and fp16 activations (fp32 has only a slow fallback), has no
autograd formula, and its packed layout is opaque, so: the module is swapped in only for bf16/fp16 models,
and a call that needs gradients (QLoRA training) takes the reference path on a weight rebuilt from the
packed form (an identity matrix multiplied through the kernel).
The reference's qweight is dropped, so weight memory stays at one 4-bit copy.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .gptq import GPTQLinear, unpack_int

CPU_INT4_GROUP_SIZES = (32, 64, 128, 256)
CPU_INT4_DTYPES = (torch.bfloat16, torch.float16)


def has_cpu_int4_kernel() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
        torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")


def _groups_ok(num_groups_rows: list[int], group_size: int, in_features: int, out_features: int) -> bool:
    return (group_size in CPU_INT4_GROUP_SIZES and in_features % group_size == 0 and out_features % 16 == 0
            and all(r == group_size for r in num_groups_rows))


def can_use_cpu_int4(linear: nn.Module, dtype: torch.dtype) -> bool:
    """The kernel needs 4-bit weights on CPU, bf16/fp16 activations, groups of exactly `group_size` input
    channels (a size the kernel takes) and out_features a multiple of 16. GPTQ exports meet the group rule
    act-order or not; EXL2 matrices qualify when every group is 4-bit."""
    from .exl2 import EXL2Linear
    if dtype not in CPU_INT4_DTYPES or not has_cpu_int4_kernel():
        return False
    if isinstance(linear, GPTQLinear):
        if linear.qweight.device.type != "cpu" or linear.bits != 4:
            return False
        counts = torch.bincount(linear.g_idx.long(), minlength=linear.scales.shape[0]).tolist()
        return _groups_ok(counts, linear.group_size, linear.in_features, linear.out_features)
    if isinstance(linear, EXL2Linear):
        if linear.q_weight.device.type != "cpu" or set(linear.group_bits) != {4}:
            return False
        return _groups_ok(list(linear.group_rows), linear.group_rows[0], linear.in_features,
                          linear.q_weight.shape[1])
    return False


class Int4CPULinear(nn.Module):
    """y = x @ W^T + b for a 4-bit GPTQ or EXL2 weight, through PyTorch's CPU int4 kernel (see the module doc)."""

    def __init__(self, ref: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        if not can_use_cpu_int4(ref, dtype):
            raise ValueError(f"{ref.extra_repr()} cannot use the CPU int4 kernel in {dtype}")
        self.in_features, self.out_features = ref.in_features, ref.out_features
        if isinstance(ref, GPTQLinear):
            perm = torch.argsort(ref.g_idx.long(), stable=True)  # input channels sorted by group
            q = unpack_int(ref.qweight, 4, dim=0)[perm]  # [in (sorted by group), out] values 0..15
            zeros = unpack_int(ref.qzeros, 4, dim=1) + 1  # [groups, out]; v1 stores zero - 1
            scales = ref.scales.float()  # [groups, out]
            offsets = (8 - zeros) * scales  # W = (q - 8) * s + (8 - z) * s = (q - z) * s
            self.group_size = ref.group_size
        else:  # EXL2, every group 4-bit: W^T = Qd[invperm], Qd = (q - 8) * scale in permuted row order
            from .exl2 import _scales, unpack_exl2_rows
            perm = torch.argsort(ref.q_invperm.long())  # x[:, perm] meets Qd's rows in order
            q = unpack_exl2_rows(ref.q_weight, 4, ref.in_features)  # [in (permuted), out padded to 32]
            scales = _scales(ref.q_scale, ref.q_scale_max)  # [groups, out padded]
            offsets = torch.zeros_like(scales)
            self.group_size = ref.group_rows[0]
        self.padded_out_features = q.shape[1]
        is_identity = bool(torch.equal(perm, torch.arange(self.in_features)))
        # [out, in / 2] uint8, the kernel's own layout; inner_k_tiles=1 is the only value the CPU op takes
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.t().contiguous(), 1))
        # [groups, out, 2]: W = (q - 8) * scale + offset
        self.register_buffer("scales_and_zeros", torch.stack([scales, offsets], dim=-1).to(dtype).contiguous())
        self.register_buffer("perm", None if is_identity else perm)
        self.register_buffer("inv_perm", None if is_identity else torch.argsort(perm))
        self.register_buffer("bias", None if ref.bias is None else ref.bias.to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in_features] -> [..., out_features]
        if torch.is_grad_enabled() and x.requires_grad:  # training through a frozen base: reference path
            return F.linear(x, self.dequantized_weight(x.dtype), self.bias)
        x2 = x.reshape(-1, self.in_features)  # [rows, in]
        if self.perm is not None:
            x2 = x2.index_select(1, self.perm)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(self.scales_and_zeros.dtype).contiguous(),
                                                       self.packed, self.group_size, self.scales_and_zeros)
        if self.padded_out_features != self.out_features:
            y = y[:, :self.out_features]
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    @torch.no_grad()
    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:  # [out, in]
        """W as the kernel sees it (scales and zeros rounded to the activation dtype), in input order."""
        eye = torch.eye(self.in_features, dtype=self.scales_and_zeros.dtype)
        w_sorted = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.packed, self.group_size,
                                                              self.scales_and_zeros)  # [in (sorted), out]
        if self.inv_perm is not None:
            w_sorted = w_sorted.index_select(0, self.inv_perm)
        return w_sorted[:, :self.out_features].t().to(dtype)

    @property
    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scales_and_zeros, self.perm)
                   if t is not None)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits=4, "
                f"group_size={self.group_size}, act_order={self.perm is not None}, bias={self.bias is not None}")
