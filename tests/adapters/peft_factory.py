"""Real PEFT adapters for tests (and write_random_peft re-exported from loraplex.adapters.synthetic): made with `peft` on a transformers model, random non-zero weights,
saved with save_pretrained (the format users upload)."""
from __future__ import annotations

from pathlib import Path

import torch

from loraplex.adapters.synthetic import write_random_peft  # noqa: F401 - re-exported for tests


def add_random_adapter(model, name: str, *, r: int, alpha: float, target_modules, use_rslora: bool = False,
                       seed: int = 0, std: float = 0.05, **extra):
    """Add adapter `name` to `model` (a transformers model or a PeftModel) and give lora_A and lora_B
    random values (PEFT initialises B to zero, which would make every adapter the base model).
    Returns the PeftModel."""
    from peft import LoraConfig, PeftModel, get_peft_model
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=target_modules, use_rslora=use_rslora,
                        lora_dropout=0.0, task_type="CAUSAL_LM", **extra)
    if isinstance(model, PeftModel):
        model.add_adapter(name, config)
    else:
        model = get_peft_model(model, config, adapter_name=name)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param_name, p in model.named_parameters():
            if f".{name}." in param_name and ("lora_A" in param_name or "lora_B" in param_name):
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    model.eval()
    return model


def save_adapter(peft_model, name: str, out_dir: Path) -> Path:
    """Save one adapter as a PEFT folder (adapter_config.json + adapter_model.safetensors)."""
    peft_model.save_pretrained(str(out_dir), selected_adapters=[name])
    folder = Path(out_dir) if name == "default" else Path(out_dir) / name
    assert (folder / "adapter_model.safetensors").is_file(), list(Path(out_dir).rglob("*"))
    return folder


def make_tiny_model(folder: Path, tokenizer_dir: Path, *, num_layers: int = 2, seed: int = 0) -> Path:
    """A tiny random Llama with the default model's tokenizer (vocab 49152), for fast engine tests."""
    import shutil

    import transformers
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=512, tie_word_embeddings=True, eos_token_id=2,
                                      bos_token_id=1)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)  # peaky logits: greedy choices far from ties
    model.save_pretrained(folder)
    for f in Path(tokenizer_dir).iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template")):
            shutil.copy(f, Path(folder) / f.name)
    return Path(folder)
