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
                      extra_config: dict | None = None, dtype=torch.float32) -> Path:
    """A PEFT folder written directly (same layout save_pretrained writes), fast enough for hundreds."""
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
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": list(target_modules),
              "bias": "none", "task_type": "CAUSAL_LM", "use_rslora": False, "use_dora": False,
              "modules_to_save": None, "lora_dropout": 0.0, **(extra_config or {})}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder
