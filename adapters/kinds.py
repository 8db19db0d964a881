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


def adapter_traits(folder: Path | str) -> tuple[str, bool]:
    """(kind, has its own embed_tokens / lm_head) from adapter_config.json alone: what a request's lora_scale and
    combinations are checked against where the weights are not at hand (the HTTP process)."""
    try:
        raw = read_config_json(Path(folder))
    except AdapterError:
        return "lora", False
    if not isinstance(raw, dict) or is_mixlora_config(raw):
        return "mixlora" if isinstance(raw, dict) else "lora", False
    targets = raw.get("target_modules")
    names = targets if isinstance(targets, list) else [targets] if isinstance(targets, str) else []
    full = bool(raw.get("modules_to_save")) or any(isinstance(t, str) and t != "all-linear" and (
        t.endswith(("embed_tokens", "lm_head")) or "embed_tokens" in t or "lm_head" in t) for t in names)
    return ("dora" if raw.get("use_dora") else "lora"), full


def load_served_adapter(folder: Path | str, model_config: ModelConfig, max_lora_rank: int, *,
                        dtype: torch.dtype = torch.float32, allow_bin: bool = True) -> ServedWeights:
    """Read and validate an adapter folder of either kind against the base model (AdapterError on anything else)."""
    loader = load_mixlora if adapter_kind(folder) == "mixlora" else load_adapter
    return loader(folder, model_config, max_lora_rank, dtype=dtype, allow_bin=allow_bin)
