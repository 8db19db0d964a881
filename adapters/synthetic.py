"""Random LoRA adapters in PEFT's on-disk layout, for tests and benchmarks (hundreds in seconds)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from loraplex.adapters.peft import LORA_MODULES, module_shapes

PEFT_KEY = "base_model.model.model.layers.{layer}.{parent}.{module}.lora_{ab}.weight"


def write_random_peft(folder: Path, model_config, *, r: int, alpha: float = 16.0,
                      target_modules=("q_proj", "v_proj"), seed: int = 0, std: float = 0.05,
                      extra_config: dict | None = None, dtype=torch.float32, use_dora: bool = False) -> Path:
    """A PEFT folder written directly (same layout save_pretrained writes), fast enough for hundreds. `use_dora`:
    with random positive DoRA magnitudes (scale about 1 against a base whose rows have norm about 1)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shapes = module_shapes(model_config)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(model_config.num_hidden_layers):
        for module in target_modules:
            in_f, out_f = shapes[module]
            kw = dict(layer=layer, parent=LORA_MODULES[module], module=module)
            tensors[PEFT_KEY.format(ab="A", **kw)] = (torch.randn(r, in_f, generator=gen) * std).to(dtype)
            tensors[PEFT_KEY.format(ab="B", **kw)] = (torch.randn(out_f, r, generator=gen) * std).to(dtype)
            if use_dora:
                magnitude = PEFT_KEY.format(ab="A", **kw).replace("lora_A.weight", "lora_magnitude_vector")
                tensors[magnitude] = (0.5 + torch.rand(out_f, generator=gen)).to(dtype)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": list(target_modules),
              "bias": "none", "task_type": "CAUSAL_LM", "use_rslora": False, "use_dora": use_dora,
              "modules_to_save": None, "lora_dropout": 0.0, **(extra_config or {})}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def random_mixlora_state(model_config, config, *, seed: int = 0, std: float = 0.05) -> dict:
    """Unscaled random MixLoRA tensors under today's MoE-PEFT key names (every layer has experts)."""
    from loraplex.adapters.mixlora import ATTENTION
    shapes = module_shapes(model_config)
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for layer in range(model_config.num_hidden_layers):
        for module in config.attention_targets:
            in_f, out_f = shapes[module]
            state[f"mixlora.layers.{layer}.self_attn.{module}.lora_A.weight"] = torch.randn(config.r, in_f, generator=gen) * std
            state[f"mixlora.layers.{layer}.self_attn.{module}.lora_B.weight"] = torch.randn(out_f, config.r, generator=gen) * std
        state[f"mixlora.layers.{layer}.mlp.moe_gate.weight"] = torch.randn(
            config.num_experts, model_config.hidden_size, generator=gen)
        for module in config.ffn_targets:
            in_f, out_f = shapes[module]
            r = config.rank(True)
            for e in range(config.num_experts):
                key = f"mixlora.layers.{layer}.mlp.{module}.experts.{e}"
                state[f"{key}.lora_A.weight"] = torch.randn(r, in_f, generator=gen) * std
                state[f"{key}.lora_B.weight"] = torch.randn(out_f, r, generator=gen) * std
    assert set(config.attention_targets) <= set(ATTENTION)
    return state


def write_random_mixlora(folder: Path, model_config, *, r: int = 8, alpha: float = 16.0, num_experts: int = 4,
                         top_k: int = 2, routing_strategy: str = "mixlora",
                         target_modules=("q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"), seed: int = 0,
                         std: float = 0.05, extra_config: dict | None = None, write_bin: bool = False) -> Path:
    """A MixLoRA folder (MoE-PEFT's layout, safetensors; the .bin too with write_bin) with random weights."""
    from loraplex.adapters.mixlora import parse_mixlora_config, write_mixlora
    raw = {"peft_type": "MIXLORA", "r": r, "lora_alpha": alpha, "lora_dropout": 0.05,
           "target_modules": list(target_modules), "routing_strategy": routing_strategy,
           "num_experts": num_experts, "act_fn": "silu", **({"top_k": top_k} if routing_strategy == "mixlora" else {}),
           **(extra_config or {})}
    config = parse_mixlora_config(raw, max_lora_rank=256)
    return write_mixlora(folder, config, random_mixlora_state(model_config, config, seed=seed, std=std),
                         write_bin=write_bin)
