"""The kinds of adapter the server takes, told apart by their adapter_config.json: PEFT LoRA (adapters/peft.py)
and MixLoRA (adapters/mixlora.py, MoE-PEFT's format). Everything that reads an adapter folder to serve or
publish it comes through `load_served_adapter`."""
from __future__ import annotations

from pathlib import Path

import torch

from loraplex.adapters.errors import AdapterError
from loraplex.adapters.mixlora import MixLoRAWeights, is_mixlora_config, load_mixlora
from loraplex.adapters.peft import LoRAWeights, load_adapter, read_config_json
from loraplex.engine.core.config import ModelConfig

ServedWeights = LoRAWeights | MixLoRAWeights


def adapter_kind(folder: Path | str) -> str:
    """"mixlora" or "lora" (anything unreadable is left to the loader, which explains what is wrong)."""
    try:
        raw = read_config_json(Path(folder))
    except AdapterError:
        return "lora"
    return "mixlora" if isinstance(raw, dict) and is_mixlora_config(raw) else "lora"


def load_served_adapter(folder: Path | str, model_config: ModelConfig, max_lora_rank: int, *,
                        dtype: torch.dtype = torch.float32, allow_bin: bool = True) -> ServedWeights:
    """Read and validate an adapter folder of either kind against the base model (AdapterError on anything else)."""
    loader = load_mixlora if adapter_kind(folder) == "mixlora" else load_adapter
    return loader(folder, model_config, max_lora_rank, dtype=dtype, allow_bin=allow_bin)
