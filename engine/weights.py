"""Checkpoint readers: a Hugging Face safetensors folder or a GGUF file as (HF checkpoint name, tensor) streams,
and a GGUF file's metadata as a Hugging Face config dict. No model is built here (that is loader.py)."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

# GGUF tensor name -> Hugging Face checkpoint name ("{i}" = layer index)
GGUF_TENSOR_NAMES: dict[str, str] = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_q.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_k.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_v.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}
# GGUF general.architecture -> (HF architecture, model_type, whether llama.cpp permuted Q/K for its rope)
GGUF_ARCHITECTURES = {"llama": ("LlamaForCausalLM", "llama", True), "qwen2": ("Qwen2ForCausalLM", "qwen2", False)}


def iter_safetensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {folder}")
    for file in files:
        with safe_open(folder / file, framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


# ---------------------------------------------------------------- GGUF


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _f32(x: float) -> float:
    """GGUF stores floats as float32: give back the shortest decimal (1e-05, not 9.99999974e-06)."""
    return float(repr(np.float32(x)).removeprefix("np.float32(").removesuffix(")"))


def gguf_to_hf_config(reader) -> dict:
    """GGUF metadata -> a Hugging Face config.json dict."""
    arch = _field(reader, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(f"unsupported GGUF architecture {arch!r}; supported: {', '.join(GGUF_ARCHITECTURES)}")
    hf_arch, model_type, _ = GGUF_ARCHITECTURES[arch]
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise ValueError("GGUF with rope_freqs (llama3 rope scaling) is not supported; use the HF folder")
    hidden, heads = _field(reader, f"{arch}.embedding_length"), _field(reader, f"{arch}.attention.head_count")
    head_dim = _field(reader, f"{arch}.attention.key_length", hidden // heads)
    if _field(reader, f"{arch}.rope.dimension_count", head_dim) != head_dim:
        raise ValueError("partial rotary embeddings are not supported")
    vocab = _field(reader, f"{arch}.vocab_size")
    if vocab is None:
        vocab = int(next(t.shape[1] for t in reader.tensors if t.name == "token_embd.weight"))
    cfg = {
        "architectures": [hf_arch],
        "model_type": model_type,
        "vocab_size": int(vocab),
        "hidden_size": int(hidden),
        "intermediate_size": int(_field(reader, f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, f"{arch}.block_count")),
        "num_attention_heads": int(heads),
        "num_key_value_heads": int(_field(reader, f"{arch}.attention.head_count_kv", heads)),
        "head_dim": int(head_dim),
        "max_position_embeddings": int(_field(reader, f"{arch}.context_length", 2048)),
        "rms_norm_eps": _f32(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": _f32(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "hidden_act": "silu",
        "torch_dtype": "float32",
    }
    if _field(reader, f"{arch}.rope.scaling.type") == "linear":
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": _f32(_field(reader, f"{arch}.rope.scaling.factor"))}
    for key in ("bos", "eos"):
        token_id = _field(reader, f"tokenizer.ggml.{key}_token_id")
        if token_id is not None:
            cfg[f"{key}_token_id"] = int(token_id)
    return cfg


def gguf_hf_config(path: str | Path) -> dict:
    """The HF config dict of a GGUF file (metadata only; tensors stay on disk)."""
    import gguf

    return gguf_to_hf_config(gguf.GGUFReader(path))


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's convert_hf_to_gguf permute (interleaved rope -> rotate-half), as transformers does."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def read_gguf(path: Path) -> tuple[dict, Iterator[tuple[str, torch.Tensor]]]:
    """-> (HF config dict, lazy iterator of (HF checkpoint name, float32 tensor)), dequantizing per tensor."""
    import gguf

    reader = gguf.GGUFReader(path)
    cfg = gguf_to_hf_config(reader)
    permuted = GGUF_ARCHITECTURES[_field(reader, "general.architecture")][2]
    heads = {"q_proj": cfg["num_attention_heads"], "k_proj": cfg["num_key_value_heads"]}

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for t in reader.tensors:
            parts = t.name.split(".")
            key = ".".join(["blk", "{i}", *parts[2:]]) if parts[0] == "blk" else t.name
            if key not in GGUF_TENSOR_NAMES:
                raise ValueError(f"unexpected GGUF tensor {t.name!r}")
            name = GGUF_TENSOR_NAMES[key].replace("{i}", parts[1]) if parts[0] == "blk" else GGUF_TENSOR_NAMES[key]
            w = gguf.quants.dequantize(t.data, t.tensor_type)  # float32, numpy shape = reversed GGUF shape
            proj = name.split(".")[-2]
            if permuted and proj in heads:
                w = unpermute_qk(w, heads[proj])
            if not (w.flags.owndata and w.flags.writeable):  # a view into the memory-mapped file
                w = np.array(w)
            yield name, torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32))

    return cfg, tensors()
