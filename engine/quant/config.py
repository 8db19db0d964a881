"""QuantConfig: which quantization the base linears get (`--quantization`). Plain data, no torch."""
from __future__ import annotations

from dataclasses import dataclass

QUANT_METHODS = ("none", "nf4", "int8", "gptq", "exl2")
BNB_METHODS = ("nf4", "int8")  # quantized at load time
CHECKPOINT_FORMATS = ("gptq", "exl2")  # read already quantized from a checkpoint


@dataclass(frozen=True, slots=True)
class QuantConfig:
    method: str = "none"
    double_quant: bool = True  # nf4: quantize the absmax statistics too (QLoRA's double quantization)
    int8_threshold: float = 6.0  # LLM.int8: activations above this run through the fp16 outlier path

    def __post_init__(self) -> None:
        if self.method not in QUANT_METHODS:
            raise ValueError(f"--quantization must be one of {', '.join(QUANT_METHODS)}; got {self.method!r}")
