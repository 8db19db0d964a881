"""Quantized base linears, chosen at load time and swapped in for nn.Linear (gpt-fast style); model
files never change and LoRA wrappers sit on top of whatever base linear is there.

  nf4 / int8  bitsandbytes Linear4bit (NF4, optional double quantization) and Linear8bitLt
              (LLM.int8 with outlier threshold 6.0), on CPU and CUDA.
  gptq        GPTQ-format checkpoints (engine/gptq.py): the plain-torch dequantizing reference;
              PyTorch's int4 kernel on CPU for 4-bit bf16/fp16 models (engine/int4_cpu.py);
              exllamav2's kernels on CUDA when installed (loraplex[exl2], engine/exllama.py).
  exl2        EXL2 checkpoints (engine/exl2.py): the plain-torch reference; exllamav2 on CUDA.
The embeddings and lm_head stay dense (as bitsandbytes' QLoRA recipe and GPTQ exporters do).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

logger = logging.getLogger(__name__)

QUANT_METHODS = ("none", "nf4", "int8", "gptq", "exl2")
BNB_METHODS = ("nf4", "int8")
SKIP_MODULES = ("lm_head",)


@dataclass(frozen=True, slots=True)
class QuantConfig:
    method: str = "none"
    double_quant: bool = True  # nf4: quantize the absmax statistics too (QLoRA's double quantization)
    int8_threshold: float = 6.0  # LLM.int8: activations above this run through the fp16 outlier path

    def __post_init__(self) -> None:
        if self.method not in QUANT_METHODS:
            raise ValueError(f"--quantization must be one of {', '.join(QUANT_METHODS)}; got {self.method!r}")


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


def quantize_linears(model: nn.Module, config: QuantConfig, compute_dtype: torch.dtype,
                     device: torch.device) -> int:
    """Swap every decoder nn.Linear (not lm_head) for its quantized form; returns how many."""
    if config.method == "none":
        return 0
    if config.method not in BNB_METHODS:
        raise ValueError(f"{config.method} weights come from a {config.method.upper()} checkpoint, not from "
                         "quantizing at load time (make one with `loraplex quantize --format gptq`)")
    swaps = [(parent, name, child) for parent_name, parent in model.named_modules()
             for name, child in parent.named_children()
             if type(child) is nn.Linear and name not in SKIP_MODULES]
    for i, (parent, name, child) in enumerate(swaps):
        setattr(parent, name, bnb_linear(child, config, compute_dtype, device))
        if (i + 1) % 50 == 0 or i + 1 == len(swaps):
            logger.info("quantized %d/%d linears to %s", i + 1, len(swaps), config.method)
    return len(swaps)


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def module_weight_bytes(model: nn.Module) -> int:
    """Bytes of every distinct parameter and buffer, quantization statistics included (bitsandbytes
    keeps absmax and its nested statistics outside the parameter)."""
    seen: set[tuple[str, int]] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.device.type == "meta":
            continue
        try:
            key = (str(t.device), t.untyped_storage().data_ptr())  # tied or detached views share one storage
        except (NotImplementedError, RuntimeError):  # opaque tensors (oneDNN-packed weights) have no storage
            key = ("opaque", id(t))
        if key in seen:
            continue
        seen.add(key)
        total += tensor_bytes(t)
        state = getattr(t, "quant_state", None)
        if state is not None:
            total += _quant_state_bytes(state)
        scb = getattr(t, "SCB", None)
        if isinstance(scb, torch.Tensor):
            total += tensor_bytes(scb)
    return total


def _quant_state_bytes(state) -> int:
    total = 0
    for attr in ("absmax", "code"):
        value = getattr(state, attr, None)
        if isinstance(value, torch.Tensor):
            total += tensor_bytes(value)
    nested = getattr(state, "state2", None)
    if nested is not None:
        total += _quant_state_bytes(nested)
    offset = getattr(state, "offset", None)
    if isinstance(offset, torch.Tensor):
        total += tensor_bytes(offset)
    return total


def use_quantized_kernels(model: nn.Module, device: torch.device, dtype: torch.dtype) -> str | None:
    """Swap the plain-torch GPTQ/EXL2 linears (the references) for a fast kernel where one applies:
    exllamav2 on CUDA (GPTQ 4-bit and EXL2), PyTorch's grouped int4 kernel on CPU (GPTQ 4-bit and EXL2
    whose groups are all 4-bit, bf16/fp16 models). Returns the kernel's name, or None when the references stay."""
    from .exl2 import EXL2Linear
    from .gptq import GPTQLinear
    swaps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if isinstance(child, (GPTQLinear, EXL2Linear))]
    if not swaps:
        return None
    if device.type == "cuda":
        from .exllama import ExllamaLinear, exllama_ext, temp_dq_buffer
        swaps = [s for s in swaps if isinstance(s[2], EXL2Linear) or s[2].bits == 4]
        ext = exllama_ext() if swaps else None
        if ext is None:
            return None
        temp_dq = temp_dq_buffer(device, max(c.in_features * c.out_features for _, _, c in swaps))
        for parent, name, child in swaps:
            tensors = {n: b for n, b in child.named_buffers(recurse=False) if b is not None and n != "bias"}
            setattr(parent, name, ExllamaLinear(ext, tensors, child.in_features, child.out_features, child.bias,
                                                temp_dq))
        kernel = "exllamav2"
    else:
        from .int4_cpu import Int4CPULinear, can_use_cpu_int4
        swaps = [s for s in swaps if can_use_cpu_int4(s[2], dtype)]
        if not swaps:
            return None
        for parent, name, child in swaps:
            setattr(parent, name, Int4CPULinear(child, dtype))
        kernel = "torch int4 (CPU)"
    logger.info("%d quantized linears run on %s kernels", len(swaps), kernel)
    return kernel
