"""CPU fast path for 4-bit GPTQ linears: PyTorch's grouped int4 weight-only matmul (the gpt-fast kernel).

`GPTQLinear` (engine/gptq.py) is the reference: it unpacks and dequantizes on every call. `Int4CPULinear`
repacks the same weights once into `aten._convert_weight_to_int4pack_for_cpu`'s layout and multiplies with
`aten._weight_int4pack_mm_for_cpu`, which dequantizes inside the kernel as (q - 8) * scale + zero per
group. A GPTQ weight (q - z) * s maps onto it exactly with zero = (8 - z) * s. Act-order checkpoints
(g_idx not sorted) are handled by sorting the input channels by group once and gathering x's columns in
that order on every call. The kernel runs bf16 and fp16 activations (fp32 has only a slow fallback), has no
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


def can_use_cpu_int4(linear: GPTQLinear, dtype: torch.dtype) -> bool:
    """The kernel needs 4-bit weights on CPU, a supported group size, bf16/fp16 activations, and groups of
    exactly group_size input channels (true of every GPTQ export, act-order or not), out_features a
    multiple of 16."""
    if (linear.qweight.device.type != "cpu" or linear.bits != 4 or linear.group_size not in CPU_INT4_GROUP_SIZES
            or dtype not in CPU_INT4_DTYPES or not has_cpu_int4_kernel()):
        return False
    if linear.in_features % linear.group_size or linear.out_features % 16:  # the packing's own constraints
        return False
    counts = torch.bincount(linear.g_idx.long(), minlength=linear.scales.shape[0])
    return bool((counts == linear.group_size).all())


class Int4CPULinear(nn.Module):
    """y = x @ W^T + b for a GPTQ 4-bit weight, through PyTorch's CPU int4 kernel. Built from a GPTQLinear."""

    def __init__(self, ref: GPTQLinear, dtype: torch.dtype) -> None:
        super().__init__()
        if not can_use_cpu_int4(ref, dtype):
            raise ValueError(f"{ref.extra_repr()} cannot use the CPU int4 kernel in {dtype}")
        self.in_features, self.out_features, self.group_size = ref.in_features, ref.out_features, ref.group_size
        g_idx = ref.g_idx.long()
        perm = torch.argsort(g_idx, stable=True)  # input channels sorted by group
        is_sequential = bool(torch.equal(perm, torch.arange(self.in_features)))
        q = unpack_int(ref.qweight, 4, dim=0)[perm]  # [in (sorted by group), out] values 0..15
        zeros = unpack_int(ref.qzeros, 4, dim=1) + 1  # [groups, out]; v1 stores zero - 1
        scales = ref.scales.float()  # [groups, out]
        # [out, in / 2] uint8, the kernel's own layout; inner_k_tiles=1 is the only value the CPU op takes
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.t().contiguous(), 1))
        # [groups, out, 2]: scale and zero with W = (q - 8) * scale + zero = (q - z) * s
        self.register_buffer("scales_and_zeros", torch.stack([scales, (8 - zeros) * scales], dim=-1).to(dtype)
                             .contiguous())
        self.register_buffer("perm", None if is_sequential else perm)
        self.register_buffer("inv_perm", None if is_sequential else torch.argsort(perm))
        self.register_buffer("bias", None if ref.bias is None else ref.bias.to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in_features] -> [..., out_features]
        if torch.is_grad_enabled() and x.requires_grad:  # training through a frozen base: reference path
            return F.linear(x, self.dequantized_weight(x.dtype), self.bias)
        x2 = x.reshape(-1, self.in_features)  # [rows, in]
        if self.perm is not None:
            x2 = x2.index_select(1, self.perm)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(self.scales_and_zeros.dtype).contiguous(),
                                                       self.packed, self.group_size, self.scales_and_zeros)
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
        return w_sorted.t().to(dtype)

    @property
    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scales_and_zeros, self.perm)
                   if t is not None)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits=4, "
                f"group_size={self.group_size}, act_order={self.perm is not None}, bias={self.bias is not None}")
