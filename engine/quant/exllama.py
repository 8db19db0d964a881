"""CUDA fast path for GPTQ (4-bit) and EXL2 linears: exllamav2's kernels (`loraplex[exl2]`, exllamav2 0.3.2).

The plain-torch modules are the references: `GPTQLinear` (engine/quant/gptq.py) and `EXL2Linear` (engine/quant/exl2.py).
`ExllamaLinear` hands the same checkpoint tensors to exllamav2's `make_q_matrix` (which reorders q_weight in
place on the device, so it gets its own copies) and multiplies with `gemm_half_q_half` (fp16 in and out;
a bf16 model's activations are cast around the call). The C++ handle points into this module's buffers:
the module must not be moved after construction. Gradients w.r.t. the input (QLoRA through a quantized
base) use the weight rebuilt by exllamav2's `reconstruct`. exllamav2 compiles its extension on first
import (minutes, needs nvcc); if that fails the references stay in place and the log says why.
References: exllamav2 `exllamav2/ext.py` (make_q_matrix, none_tensor), `exllamav2/linear.py` (temp_dq
sizing, forward), `exllamav2_ext/cuda/q_matrix.cu` (GPTQ is 4-bit only; group size a power of two).
"""
from __future__ import annotations

import logging
from types import ModuleType

import torch
from torch import nn

logger = logging.getLogger(__name__)

MAX_DQ_ELEMENTS = 512 * 1024**2  # exllamav2's default max_dq_size: largest matrix dequantized at once


def exllama_ext() -> ModuleType | None:
    """exllamav2's `ext` module (building its CUDA extension on first use), or None where it cannot load."""
    if not torch.cuda.is_available():
        return None
    try:
        from exllamav2 import ext
    except Exception as exc:  # not installed, or the JIT build failed: the reference path is used
        logger.warning("exllamav2 kernels unavailable (%s: %s); using the plain-torch quantized linears",
                       type(exc).__name__, exc)
        return None
    return ext


class _ExllamaMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: ExllamaLinear) -> torch.Tensor:  # x [rows, in] fp16
        ctx.layer = layer
        out = torch.empty((x.shape[0], layer.padded_out_features), dtype=torch.float16, device=x.device)
        layer.ext.ext_c.gemm_half_q_half(x, layer.q_handle, out, False)
        return out[:, :layer.out_features]

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # [rows, out] -> [rows, in]
        return grad_out.to(torch.float16) @ ctx.layer.dequantized_weight(torch.float16), None


class ExllamaLinear(nn.Module):
    """y = x @ W^T + b through exllamav2's quantized GEMM. `tensors` are one linear's checkpoint tensors:
    GPTQ (qweight, qzeros, scales, g_idx) or EXL2 (q_weight, q_invperm, q_scale, q_scale_max, q_groups)."""

    def __init__(self, ext: ModuleType, tensors: dict[str, torch.Tensor], in_features: int, out_features: int,
                 bias: torch.Tensor | None, temp_dq: torch.Tensor) -> None:
        super().__init__()
        self.ext, self.in_features, self.out_features = ext, in_features, out_features
        device = temp_dq.device
        w = {k: v.detach().to(device).clone() for k, v in tensors.items()}
        # EXL2 pads the output columns to a multiple of 32; the kernel writes (and checks the bias at) that width
        self.padded_out_features = w["q_weight"].shape[1] if "q_weight" in w else out_features
        if "q_weight" in w:  # EXL2: exllamav2 keys its permutation tensors as int16
            self.format = "exl2"
            w["q_invperm"] = w["q_invperm"].short()
            w.setdefault("q_perm", torch.argsort(w["q_invperm"].long()).short())
            w["q_scale_max"] = w["q_scale_max"].half()
        else:
            self.format = "gptq"
            w["scales"] = w["scales"].half()
            w["g_idx"] = w["g_idx"].int()
        if bias is not None:
            w["bias"] = torch.zeros(self.padded_out_features, dtype=torch.float16, device=device)
            w["bias"][:out_features] = bias.detach()[:out_features]
        self.q_handle = ext.make_q_matrix(w, temp_dq, max_dq_rows=MAX_DQ_ELEMENTS // out_features)
        for name, t in w.items():  # keep every tensor the handle points into alive, under this module
            self.register_buffer(name, t, persistent=False)
        self.temp_dq = temp_dq  # shared scratch, not a buffer: not this layer's weight, never moved
        self.has_bias = bias is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in_features] -> [..., out_features]
        x2 = x.reshape(-1, self.in_features).to(torch.float16).contiguous()  # [rows, in]
        y = _ExllamaMatmul.apply(x2, self)  # bias is applied inside the kernel
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    @torch.no_grad()
    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:  # [out, in]
        w_t = torch.empty((self.in_features, self.padded_out_features), dtype=torch.float16,
                          device=self.temp_dq.device)
        self.ext.ext_c.reconstruct(self.q_handle, w_t)  # [in, padded out]
        return w_t[:, :self.out_features].t().to(dtype)

    @property
    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for name, t in self.named_buffers() if name != "bias")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}"


def temp_dq_buffer(device: torch.device, max_in_out: int) -> torch.Tensor:
    """One scratch buffer shared by every layer (the kernel uses it for large row counts, one layer at a
    time, as exllamav2's device context does)."""
    return torch.empty((min(max_in_out, MAX_DQ_ELEMENTS),), dtype=torch.float16, device=device)
