"""DoRA (weight-decomposed LoRA; PEFT's `use_dora`) served from the paged pool.

PEFT computes, for a DoRA-adapted linear W (bias b) with magnitude vector m and scaled delta ΔW = s·B·A:

    y = b + (m / ‖W + ΔW‖) ⊙ (W x + ΔW x)        ‖·‖: the L2 norm of each output row, over the inputs

(`DoraLinearLayer.forward` with `base_result`: (m/‖·‖ - 1)·(W x) + (m/‖·‖)·ΔW x added to W x + b). The norm depends
only on the weights, so it is computed once when the adapter is read (`dora_scales`, against the base weights the
engine serves from, dequantized where they are quantized) and the magnitude folded into one per-output-channel
scale. A DoRA row then costs the plain LoRA op plus `apply_dora`: (y - b) · scale + b on its rows, the scale read
from one extra pool page (its B row) the adapter owns beside its rank-rows.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from loraplex.adapters.peft import LoRAWeights


@torch.no_grad()
def dense_weight(linear: nn.Module, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """W [out, in] in float32 of a base linear: its weight, its dequantized weight (GPTQ, EXL2, int4, oneDNN-packed),
    or, for any other module (bitsandbytes), what it computes from the identity matrix minus its bias."""
    if isinstance(linear, nn.Linear):
        return linear.weight.float()
    dequantized = getattr(linear, "dequantized_weight", None)  # quantized and oneDNN-prepacked linears
    if callable(dequantized):
        return dequantized(torch.float32)
    out = linear(torch.eye(linear.in_features, dtype=dtype, device=device)).float()  # [in, out] = (W I + b)ᵀ
    bias = getattr(linear, "bias", None)
    if bias is not None:
        out = out - bias.float()
    return out.t()


@torch.no_grad()
def dora_scales(weights: LoRAWeights, linear_of: Callable[[int, str], nn.Module], dtype: torch.dtype,
                device: torch.device) -> dict[tuple[int, str], torch.Tensor]:
    """Per adapted (layer, module): magnitude / ‖W + B·scale·A‖ over each output row, float32 [out]."""
    out = {}
    for key, (a, b) in weights.tensors.items():
        w = dense_weight(linear_of(*key), dtype, device)
        delta = b.to(w.device, torch.float32) @ a.to(w.device, torch.float32)  # B·scale·A [out, in]
        norm = torch.linalg.vector_norm(w + delta, dim=1)
        out[key] = (weights.magnitudes[key].to(w.device) / norm).cpu()
    return out


def apply_dora(y: torch.Tensor, rows: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> None:
    """y[rows] = (y[rows] - b) · scales + b in place; scales [len(rows), out] (each row's adapter's)."""
    picked = y.index_select(0, rows)
    if bias is None:
        picked = picked * scales
    else:
        picked = (picked - bias) * scales + bias
    y.index_copy_(0, rows, picked.to(y.dtype))
