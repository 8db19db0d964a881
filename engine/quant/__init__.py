"""Quantized base linears, swapped in for nn.Linear (gpt-fast style): this module is the entry point, one module
per format beside it. Model files never change and LoRA wrappers sit on top of whatever base linear is there.

  nf4 / int8  bnb.py: bitsandbytes Linear4bit (NF4, optional double quantization) and Linear8bitLt
              (LLM.int8 with outlier threshold 6.0), quantized at load time, on CPU and CUDA.
  gptq        gptq.py: GPTQ-format checkpoints, the plain-torch dequantizing reference and the exporter;
              PyTorch's int4 kernel on CPU for 4-bit bf16/fp16 models (int4_cpu.py);
              exllamav2's kernels on CUDA when installed (loraplex[exl2], exllama.py).
  exl2        exl2.py: EXL2 checkpoints, the plain-torch reference and the exporter; exllamav2 on CUDA.
The embeddings and lm_head stay dense (as bitsandbytes' QLoRA recipe and GPTQ exporters do).

The loader asks this module which checkpoint tensors make a quantized linear and which module to build from
them (`checkpoint_tensor_suffixes`, `quantized_linear_builder`); the formats never import the loader. A new
format is a new module here and a branch in those two functions.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from .bnb import bnb_linear, quant_state_bytes, tensor_bytes
from .config import BNB_METHODS, CHECKPOINT_FORMATS, QUANT_METHODS, QuantConfig

__all__ = ["BNB_METHODS", "CHECKPOINT_FORMATS", "QUANT_METHODS", "QuantConfig", "bnb_linear",
           "checkpoint_tensor_suffixes", "module_weight_bytes", "quantize_linears", "quantized_linear_builder",
           "use_quantized_kernels"]

logger = logging.getLogger(__name__)

SKIP_MODULES = ("lm_head",)


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


def module_weight_bytes(model: nn.Module) -> int:
    """Bytes of every distinct parameter and buffer, quantization statistics included (bitsandbytes
    keeps absmax and its nested statistics outside the parameter)."""
    return distinct_tensor_bytes(list(model.parameters()) + list(model.buffers()))


def distinct_tensor_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of the memory the tensors cover, each byte once (tied weights and views of one another count once;
    tensors side by side in one storage, as on huge pages (engine/hugepages.py), each count), plus bitsandbytes'
    statistics per distinct tensor."""
    spans: dict[str, list[tuple[int, int]]] = {}
    seen: set[int] = set()
    total = 0
    for t in tensors:
        if t is None or t.device.type == "meta" or id(t) in seen:
            continue
        seen.add(id(t))
        total += quant_state_bytes(t)
        try:
            start = t.data_ptr()
        except (NotImplementedError, RuntimeError):  # opaque tensors (oneDNN-packed weights) have no storage
            total += tensor_bytes(t)
            continue
        spans.setdefault(str(t.device), []).append((start, start + tensor_bytes(t)))
    for ranges in spans.values():
        end = None
        for lo, hi in sorted(ranges):
            if end is None or lo >= end:
                total += hi - lo
                end = hi
            elif hi > end:
                total += hi - end
                end = hi
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


QuantizedLinearBuilder = Callable[[dict[str, torch.Tensor], nn.Linear], nn.Module]


def checkpoint_tensor_suffixes(method: str) -> tuple[str, ...]:
    """The name suffixes of the tensors that stand for one quantized linear `<prefix>.weight` in a checkpoint."""
    if method == "gptq":
        from .gptq import TENSOR_SUFFIXES
    elif method == "exl2":
        from .exl2 import TENSOR_SUFFIXES
    else:
        raise ValueError(f"no quantized checkpoint format {method!r} (known: {', '.join(CHECKPOINT_FORMATS)})")
    return TENSOR_SUFFIXES


def quantized_linear_builder(method: str, quantization_config: dict) -> QuantizedLinearBuilder:
    """`build(tensors, linear)`: the reference module for one quantized linear of a `method` checkpoint whose
    config.json says `quantization_config`; `tensors` are keyed by suffix, `linear` is the meta nn.Linear it
    replaces (its shape and bias). Raises ValueError for a variant of the format that is not supported."""
    if method == "gptq":
        from .gptq import GPTQLinear
        bits, group_size = int(quantization_config.get("bits", 4)), int(quantization_config.get("group_size", 128))
        if quantization_config.get("checkpoint_format", "gptq") != "gptq":
            raise ValueError(f"GPTQ checkpoint_format {quantization_config['checkpoint_format']!r} is not supported "
                             "(gptq v1 is)")
        return lambda parts, linear: GPTQLinear.from_tensors(parts, bits, group_size, bias=_bias(linear))
    if method == "exl2":
        from .exl2 import EXL2Linear
        return lambda parts, linear: EXL2Linear.from_tensors(parts, linear.in_features, linear.out_features,
                                                             bias=_bias(linear))
    raise ValueError(f"no quantized checkpoint format {method!r} (known: {', '.join(CHECKPOINT_FORMATS)})")


def _bias(linear: nn.Linear) -> torch.Tensor | None:
    return None if linear.bias is None else linear.bias.detach()
