"""The decoder's elementwise pieces: plain-torch references, and their fused CPU kernels for inference.

Every function takes the kernel path only when the kernels are loaded (the runner loads them on CPU),
the tensors are CPU bfloat16 (the serving dtype; float32 is the parity mode), and autograd is off:
training through the base model (the trainer) always runs the references, which are also what the
tests compare the kernels against.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from loraplex.engine.kernels import cpu_kernels


def _use_kernel(x: torch.Tensor, float32: bool = False) -> bool:
    # bfloat16: there the kernels round where the references round and agree almost bit for bit. In float32 their
    # different summation orders drift by ~1e-4 in the logits over 30 layers, and float32 is the parity mode
    # (bit-identical to transformers with the references) unless the model's modules say `float32` (a model whose
    # linears stream: its parity with transformers is gone anyway, and the one-call layer needs the kernels).
    return (x.device.type == "cpu" and (x.dtype == torch.bfloat16 or float32 and x.dtype == torch.float32)
            and not torch.is_grad_enabled() and cpu_kernels.loaded())


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm: normalise in float32, cast back, then scale."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rms_norm_takes_kernel(x: torch.Tensor, weight: torch.Tensor, float32: bool = False) -> bool:
    """Whether rms_norm(x, weight, ...) runs the kernel (else the reference)."""
    return _use_kernel(x, float32) and weight.dtype == x.dtype


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, float32: bool = False) -> torch.Tensor:  # [..., dim]
    if rms_norm_takes_kernel(x, weight, float32):
        return torch.ops.loraplex_cpu.rms_norm(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


def add_rms_norm(x: torch.Tensor, a: torch.Tensor, weight: torch.Tensor, eps: float,
                 float32: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual add and the next RMSNorm in one pass: (x + a, rms_norm(x + a))."""
    if _use_kernel(x, float32) and a.dtype == weight.dtype == x.dtype and a.shape == x.shape:
        return torch.ops.loraplex_cpu.add_rms_norm(x, a, weight, eps)
    s = x + a
    return s, rms_norm_reference(s, weight, eps)


def silu_and_mul_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def silu_and_mul(gate: torch.Tensor, up: torch.Tensor, float32: bool = False) -> torch.Tensor:  # [rows, inter] twice
    if _use_kernel(gate, float32) and gate.dim() == 2 and up.dtype == gate.dtype and gate.stride(1) == up.stride(1) == 1:
        return torch.ops.loraplex_cpu.silu_and_mul(gate, up)
    return silu_and_mul_reference(gate, up)


def apply_rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [num_tokens, heads, head_dim]; rotate-half convention (as HF checkpoints expect)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, float32: bool = False) -> torch.Tensor:
    """Rotary embedding of x [num_tokens, heads, head_dim] with cos/sin [num_tokens, 1, head_dim]. The
    kernel path works in place: x must be a fresh activation nobody else reads (a projection's output)."""
    if (_use_kernel(x, float32) and x.dim() == 3 and x.stride(2) == 1 and x.stride(1) == x.shape[2]
            and cos.dtype == sin.dtype == x.dtype):
        return torch.ops.loraplex_cpu.rotary_(x, cos, sin)
    return apply_rotary_reference(x, cos, sin)
