"""`loraplex export`: an adapter merged into its base model, as a Hugging Face folder or a GGUF file that
llama.cpp loads; or the adapter alone as a GGUF LoRA for llama.cpp's `--lora`.

Merging: W' = W + B·A·scale for every targeted linear (scale = alpha/r, alpha/sqrt(r) with rsLoRA, per-module
ranks and alphas as PEFT reads them: adapters/peft.py), computed in float32 and cast to the output dtype.
The base must be a Hugging Face folder of float weights: GPTQ/EXL2/AWQ checkpoints are refused (their packed
integer weights cannot take a dense delta without dequantizing, which would silently change the base; as
llm_finetuning does, we ask for the float checkpoint instead). A bitsandbytes nf4/int8 base is quantized
at load time by loraplex, so its folder holds float weights and merges like any other.

GGUF follows llama.cpp's convert_hf_to_gguf.py layout for the `llama` architecture (the default model's and
most Llama-family checkpoints'): tensor names blk.N.attn_q ..., Q and K rows permuted for its interleaved
rope, the tokenizer as `gpt2` BPE (tokens, types, merges, special ids, chat template). Types: f32, bf16 (as
llama.cpp writes bf16: f32 for 1-D tensors) and q8_0 (2-D weights whose rows divide into 32-blocks).
"""
from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from .errors import AdapterError
from .peft import LORA_MODULES, load_adapter

logger = logging.getLogger("loraplex.export")

FORMATS = ("hf", "gguf")
GGUF_TYPES = ("f32", "bf16", "q8_0")
_QUANTIZED_METHODS = ("gptq", "exl2", "awq", "marlin", "fp8", "compressed-tensors")
_WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
MAX_SHARD_BYTES = 5 << 30


class ExportError(ValueError):
    """An export that cannot be done, worded for the person who asked."""


def resolve_adapter_folder(name_or_path: str, adapter_dir: Path | None, version: int | None = None, *,
                           database: str | None = None, blob_store: str | None = None) -> Path:
    """A PEFT folder on disk, or the name of an adapter in loraplex's store (newest version unless given; a
    shared store's files are fetched into the local folder's cache)."""
    path = Path(name_or_path)
    if path.is_dir():
        if version is not None:
            raise ExportError("--version applies to adapters named in the store, not to a folder")
        return path
    from .store import AdapterStore
    if database is None and (adapter_dir is None or not Path(adapter_dir).is_dir()):
        raise ExportError(f"{name_or_path!r} is not a folder, and there is no adapter store at {adapter_dir}")
    with AdapterStore(Path(adapter_dir), database=database, blobs=blob_store) as store:
        try:
            record = store.versions(name_or_path)[-1] if version is None else store.get_version(name_or_path, version)
        except AdapterError as e:
            raise ExportError(f"no adapter {name_or_path!r} in {adapter_dir} and no such folder ({e})") from None
        return store.fetch(record)


def base_config(base: Path) -> dict:
    base = Path(base)
    if base.is_file() and base.suffix == ".gguf":
        raise ExportError("merging needs the base model as a Hugging Face folder (safetensors), not a GGUF file")
    config_path = base / "config.json"
    if not config_path.is_file():
        raise ExportError(f"{base} is not a Hugging Face model folder (no config.json)")
    config = json.loads(config_path.read_text())
    method = str((config.get("quantization_config") or {}).get("quant_method", "")).lower()
    if method in _QUANTIZED_METHODS:
        raise ExportError(f"the base model is a {method.upper()} checkpoint: its packed integer weights cannot take "
                          "the adapter without dequantizing, which would change the base silently; merge into "
                          "the model's float (bf16/fp16/fp32) checkpoint instead")
    return config


def _load(adapter: Path, model_config):
    try:
        weights = load_adapter(adapter, model_config, max_lora_rank=1 << 16, allow_bin=False)
    except AdapterError as e:
        raise ExportError(f"the adapter does not fit the base model: {e}") from None
    if weights.full:
        raise ExportError(f"the adapter has its own {' and '.join(weights.full_modules)} (modules_to_save or LoRA "
                          "on them): exporting those is not supported yet; serve it instead")
    return weights


def adapter_deltas(adapter: Path, base: Path) -> dict[str, torch.Tensor]:
    """{HF weight name: B·A·scale in float32} of every module the adapter targets."""
    from loraplex.engine.core.config import ModelConfig
    weights = _load(adapter, ModelConfig.from_hf_dict(base_config(base)))
    return {_hf_name(layer, module): b.float() @ a.float()
            for (layer, module), (a, b) in weights.tensors.items()}  # B comes scaled already


def _hf_name(layer: int, module: str) -> str:
    return f"model.layers.{layer}.{LORA_MODULES[module]}.{module}.weight"


def adapter_magnitudes(adapter: Path, base: Path) -> dict[str, torch.Tensor]:
    """{HF weight name: DoRA magnitude [out]} of a DoRA adapter (empty for plain LoRA)."""
    from loraplex.engine.core.config import ModelConfig
    weights = _load(adapter, ModelConfig.from_hf_dict(base_config(base)))
    return {_hf_name(layer, module): m for (layer, module), m in (weights.magnitudes or {}).items()}


def merged_tensors(base: Path, adapter: Path, dtype: torch.dtype | None) -> Iterator[tuple[str, torch.Tensor]]:
    """The base's checkpoint tensors with the adapter merged in (dtype None: each tensor's own). DoRA merges as PEFT
    does: W' = (m / ‖W + ΔW‖) · (W + ΔW), the norm over each output row."""
    from loraplex.engine.weights import iter_safetensors
    deltas = adapter_deltas(adapter, base)
    magnitudes = adapter_magnitudes(adapter, base)
    seen = set()
    for name, tensor in iter_safetensors(Path(base)):
        out_dtype = dtype or tensor.dtype
        if name in deltas:
            if tuple(tensor.shape) != tuple(deltas[name].shape):
                raise ExportError(f"{name}: base {tuple(tensor.shape)} but the adapter's delta is "
                                  f"{tuple(deltas[name].shape)}")
            tensor = tensor.float() + deltas[name]
            if name in magnitudes:
                tensor = tensor * (magnitudes[name] / torch.linalg.vector_norm(tensor, dim=1)).unsqueeze(1)
            seen.add(name)
        yield name, tensor.to(out_dtype).contiguous()
    missing = set(deltas) - seen
    if missing:
        raise ExportError(f"the base checkpoint lacks {sorted(missing)[0]} (and {len(missing) - 1} more)")


def export_hf(base: Path, adapter: Path, output: Path, dtype: torch.dtype | None = None) -> Path:
    """A Hugging Face folder: merged safetensors (sharded above 5 GiB, with an index) beside the base's config,
    tokenizer, chat template and generation config."""
    from safetensors.torch import save_file
    base, output = Path(base), Path(output)
    config = base_config(base)
    output.mkdir(parents=True, exist_ok=True)
    for src in base.iterdir():
        if src.is_file() and not src.name.endswith(_WEIGHT_FILES) and not src.name.endswith(".index.json"):
            shutil.copy(src, output / src.name)
    config.pop("quantization_config", None)
    if dtype is not None:
        config["torch_dtype"] = str(dtype).removeprefix("torch.")
    (output / "config.json").write_text(json.dumps(config, indent=2))
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in merged_tensors(base, adapter, dtype):
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > MAX_SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(output / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            file_name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(output / file_name), metadata={"format": "pt"})
            weight_map.update({name: file_name for name in shard})
        total = sum(t.numel() * t.element_size() for shard in shards for t in shard.values())
        (output / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    logger.info("wrote the merged model to %s", output)
    return output


# ---- GGUF ------------------------------------------------------------------------------------------

_HF_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER_TO_GGUF = {
    "input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_name(hf_name: str) -> str:
    if hf_name in _HF_TO_GGUF:
        return _HF_TO_GGUF[hf_name]
    parts = hf_name.split(".", 3)
    if parts[:2] == ["model", "layers"] and len(parts) == 4 and parts[3] in _LAYER_TO_GGUF:
        return f"blk.{parts[2]}.{_LAYER_TO_GGUF[parts[3]]}"
    raise ExportError(f"no GGUF name for {hf_name!r} (only the llama architecture's tensors are exported)")


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permute: rotate-half rope rows -> interleaved pairs (the inverse of
    engine/weights.py's unpermute_qk)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _check_llama(config: dict) -> None:
    if config.get("model_type") != "llama" or (config.get("architectures") or ["LlamaForCausalLM"])[0] != \
            "LlamaForCausalLM":
        raise ExportError(f"GGUF export supports the llama architecture; this base is {config.get('model_type')!r} "
                          "(export --format hf and convert that folder with llama.cpp's convert_hf_to_gguf.py)")
    if config.get("rope_scaling"):
        raise ExportError("GGUF export of a base with rope scaling is not supported; export --format hf instead")


def _write_metadata(writer, config: dict, base: Path, name: str) -> None:
    import gguf
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    writer.add_name(name)
    writer.add_context_length(config.get("max_position_embeddings", 2048))
    writer.add_embedding_length(hidden)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads", heads))
    writer.add_rope_freq_base(float(config.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    head_dim = config.get("head_dim") or hidden // heads
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    _write_tokenizer(writer, base, config)


def _write_tokenizer(writer, base: Path, config: dict) -> None:
    """The tokenizer as llama.cpp's converter writes a byte-level BPE one (its `gpt2` model)."""
    import gguf
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    data = json.loads((base / "tokenizer.json").read_text()) if (base / "tokenizer.json").is_file() else None
    if data is None or (data.get("model") or {}).get("type") != "BPE":
        raise ExportError("GGUF export needs a byte-level BPE tokenizer.json (as the default model's)")
    vocab_size = config["vocab_size"]
    reverse = {i: tok for tok, i in tokenizer.get_vocab().items()}
    added = {t.content: t for t in tokenizer.added_tokens_decoder.values()}
    tokens, types = [], []
    for i in range(vocab_size):
        tok = reverse.get(i)
        if tok is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif tok in added:
            tokens.append(tok)
            types.append(gguf.TokenType.CONTROL if added[tok].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(tok)
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(base))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    merges = data["model"].get("merges") or []
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    for key, token in (("bos", tokenizer.bos_token), ("eos", tokenizer.eos_token), ("unk", tokenizer.unk_token),
                       ("pad", tokenizer.pad_token)):
        if token is not None and token in tokenizer.get_vocab():
            getattr(writer, f"add_{key}_token_id")(tokenizer.get_vocab()[token])
    writer.add_add_bos_token(False)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        writer.add_chat_template(template)


def _pre_tokenizer(base: Path) -> str:
    """llama.cpp's name for the pre-tokenizer: it identifies BPE pre-tokenizers by model family. SmolLM's
    (the default model's) is "smollm"; others get "default" (llama.cpp then warns that it guesses)."""
    config = json.loads((base / "tokenizer_config.json").read_text()) if (base / "tokenizer_config.json").is_file() \
        else {}
    text = json.dumps(config).lower() + str(base).lower()
    return "smollm" if "smollm" in text else "default"


def _to_gguf_array(name: str, w: torch.Tensor, out_type: str):
    """-> (numpy data, GGML type) as llama.cpp writes it: 1-D tensors stay f32."""
    import gguf
    data = w.float().numpy()
    if data.ndim == 1 or out_type == "f32":
        return data.astype(np.float32), gguf.GGMLQuantizationType.F32
    if out_type == "bf16":
        return gguf.quants.quantize(data, gguf.GGMLQuantizationType.BF16), gguf.GGMLQuantizationType.BF16
    if data.shape[-1] % 32:
        return data.astype(np.float32), gguf.GGMLQuantizationType.F32
    return gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0


def export_gguf(base: Path, adapter: Path, output: Path, out_type: str = "bf16") -> Path:
    """The merged model as one GGUF file (llama architecture)."""
    import gguf
    if out_type not in GGUF_TYPES:
        raise ExportError(f"--gguf-type must be one of {', '.join(GGUF_TYPES)}; got {out_type!r}")
    base, output = Path(base), Path(output)
    config = base_config(base)
    _check_llama(config)
    heads = {"attn_q": config["num_attention_heads"],
             "attn_k": config.get("num_key_value_heads", config["num_attention_heads"])}
    output.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(output), "llama")
    _write_metadata(writer, config, base, f"{base.name}+{Path(adapter).name}")
    for hf, tensor in merged_tensors(base, adapter, torch.float32):
        name = gguf_name(hf)
        w = tensor.numpy()
        kind = name.split(".")[-2] if name.startswith("blk.") else ""
        if kind in heads:
            w = permute_qk(w, heads[kind])
        data, qtype = _to_gguf_array(name, torch.from_numpy(np.ascontiguousarray(w)), out_type)
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    logger.info("wrote the merged model to %s (%s)", output, out_type)
    return output


def export_gguf_lora(base: Path, adapter: Path, output: Path, out_type: str = "f32") -> Path:
    """The adapter alone as llama.cpp's GGUF LoRA (general.type adapter, adapter.lora.alpha; tensors
    blk.N.<linear>.weight.lora_a [r, in] and .lora_b [out, r]); the scale is folded into B (alpha written as r,
    so llama.cpp's alpha/r is 1), and attn_q/attn_k B rows get the same permute as the base's weights."""
    import gguf

    from loraplex.engine.core.config import ModelConfig
    if out_type not in ("f32", "bf16"):
        raise ExportError("a GGUF LoRA is written as f32 or bf16")
    base, output = Path(base), Path(output)
    config = base_config(base)
    _check_llama(config)
    weights = _load(adapter, ModelConfig.from_hf_dict(config))
    if weights.magnitudes is not None:
        raise ExportError("llama.cpp's GGUF LoRA has no DoRA magnitudes: merge this DoRA adapter instead (--merge)")
    ranks = {a.shape[0] for a, _ in weights.tensors.values()}
    if len(ranks) != 1:
        raise ExportError("llama.cpp's GGUF LoRA has one alpha for all modules; this adapter mixes ranks "
                          f"{sorted(ranks)}: merge it instead (--merge)")
    rank = ranks.pop()
    heads = {"attn_q": config["num_attention_heads"],
             "attn_k": config.get("num_key_value_heads", config["num_attention_heads"])}
    output.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(output), "llama")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(rank))
    writer.add_name(Path(adapter).name)
    for (layer, module), (a, b) in sorted(weights.tensors.items()):
        name = gguf_name(f"model.layers.{layer}.{LORA_MODULES[module]}.{module}.weight")
        b = b.float().numpy()
        kind = name.split(".")[-2]
        if kind in heads:
            b = permute_qk(b, heads[kind])
        for suffix, w in (("lora_a", a.float().numpy()), ("lora_b", np.ascontiguousarray(b))):
            data, qtype = _to_gguf_array(name, torch.from_numpy(w), out_type)
            writer.add_tensor(f"{name}.{suffix}", data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    logger.info("wrote the GGUF LoRA to %s", output)
    return output
