"""bitsandbytes base linears, quantized at load time: NF4 (Linear4bit, optional double quantization) and LLM.int8
(Linear8bitLt with its outlier threshold), on CPU and CUDA. Needs the `bnb` extra; imported only when asked for."""
from __future__ import annotations

import torch
from torch import nn

from .config import QuantConfig


def require_bitsandbytes():
    try:
        import bitsandbytes
    except ImportError:
        raise ValueError("--quantization nf4/int8 needs bitsandbytes: pip install 'loraplex[bnb]'") from None
    return bitsandbytes


@torch.no_grad()
def bnb_linear(linear: nn.Linear, config: QuantConfig, compute_dtype: torch.dtype,
               device: torch.device) -> nn.Module:
    """A bitsandbytes replacement of `linear`, quantized on `device` (the weight is quantized when
    the Params object moves there)."""
    bnb = require_bitsandbytes()
    bias = linear.bias is not None
    if config.method == "nf4":
        q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias, compute_dtype=compute_dtype,
                              quant_type="nf4", compress_statistics=config.double_quant, device="meta")
        q.weight = bnb.nn.Params4bit(linear.weight.detach().to("cpu", compute_dtype), requires_grad=False,
                                     quant_type="nf4", compress_statistics=config.double_quant)
    else:
        q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False,
                                threshold=config.int8_threshold, device="meta")
        q.weight = bnb.nn.Int8Params(linear.weight.detach().to("cpu", compute_dtype), requires_grad=False,
                                     has_fp16_weights=False)
    if bias:
        q.bias = nn.Parameter(linear.bias.detach().to("cpu", compute_dtype), requires_grad=False)
    return q.to(device)


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def quant_state_bytes(t: torch.Tensor) -> int:
    """Bytes bitsandbytes keeps beside a parameter: the 4-bit statistics (absmax, nested again with double
    quantization) and int8's per-row scales (SCB)."""
    scb = getattr(t, "SCB", None)
    return _state_bytes(getattr(t, "quant_state", None)) + (tensor_bytes(scb) if isinstance(scb, torch.Tensor) else 0)


def _state_bytes(state) -> int:
    if state is None:
        return 0
    parts = [getattr(state, attr, None) for attr in ("absmax", "code", "offset")]
    return sum(tensor_bytes(v) for v in parts if isinstance(v, torch.Tensor)) + _state_bytes(getattr(state, "state2", None))
