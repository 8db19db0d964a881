"""Build a model on the meta device and fill it straight from safetensors folders or GGUF files."""
from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from torch import nn

from .config import ModelConfig
from .models import get_model_class

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

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


def resolve_dtype(dtype: torch.dtype | str, config: ModelConfig | None = None) -> torch.dtype:
    """torch dtype from a dtype or a name; "auto" takes the checkpoint's torch_dtype (float32 if unknown)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return DTYPES.get(config.torch_dtype if config else "", torch.float32)
    if dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; use one of {', '.join(DTYPES)} or auto")
    return DTYPES[dtype]


def load_model(path: str | Path, dtype: torch.dtype | str = "auto",
               device: torch.device | str = "cpu") -> tuple[nn.Module, ModelConfig]:
    """A model folder (config.json + *.safetensors) or a .gguf file -> (model in eval mode, config)."""
    path = Path(path)
    if path.is_file():
        hf_config, weights = read_gguf(path)
    elif (path / "config.json").is_file():
        hf_config, weights = json.loads((path / "config.json").read_text()), iter_safetensors(path)
    else:
        raise FileNotFoundError(f"{path} is neither a GGUF file nor a folder with config.json")
    config = ModelConfig.from_hf_dict(hf_config)
    quant = hf_config.get("quantization_config") or {}
    method = quant.get("quant_method")
    if method not in (None, "gptq", "exl2"):
        raise ValueError(f"{path}: quantization_config.quant_method {method!r} is not supported (gptq and exl2 are)")
    with torch.device("meta"):
        model = get_model_class(config.architecture)(config)
    # linear's checkpoint prefix -> its quantized tensors; EXL2's names are unambiguous, so they are also
    # recognised in a folder without quantization_config
    quantized: dict[str, dict[str, dict[str, torch.Tensor]]] = {"gptq": {}, "exl2": {}}

    def dense(weights: Iterator[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in weights:
            prefix, _, suffix = name.rpartition(".")
            if method == "gptq" and suffix in GPTQ_SUFFIXES:
                quantized["gptq"].setdefault(prefix, {})[suffix] = tensor
            elif suffix in EXL2_SUFFIXES:
                quantized["exl2"].setdefault(prefix, {})[suffix] = tensor
            else:
                yield name, tensor

    device = torch.device(device)
    load_weights(model, dense(weights), resolve_dtype(dtype, config), device,
                 not_dense=lambda: {model.map_checkpoint_name(p + ".weight") for q in quantized.values() for p in q})
    if quantized["exl2"]:
        if method == "gptq":
            raise ValueError(f"{path}: quant_method is gptq but the checkpoint holds EXL2 tensors (*.q_weight)")
        method = "exl2"
    elif method == "exl2":
        raise ValueError(f"{path}: quant_method is exl2 but the checkpoint holds no EXL2 tensors (*.q_weight)")
    if method == "gptq":
        _swap_in_quantized(model, quantized["gptq"], device, _gptq_builder(quant))
    elif method == "exl2":
        from .exl2 import EXL2Linear
        _swap_in_quantized(model, quantized["exl2"], device, lambda parts, linear: EXL2Linear.from_tensors(
            parts, linear.in_features, linear.out_features, bias=_bias(linear)))
    model.quant_method = method or "none"
    return model.eval(), config


GPTQ_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")
EXL2_SUFFIXES = ("q_weight", "q_groups", "q_scale", "q_scale_max", "q_invperm", "q_perm")


def _bias(linear: nn.Linear) -> torch.Tensor | None:
    return None if linear.bias is None else linear.bias.detach()


def _gptq_builder(quant: dict) -> Callable[[dict[str, torch.Tensor], nn.Linear], nn.Module]:
    from .gptq import GPTQLinear
    bits, group_size = int(quant.get("bits", 4)), int(quant.get("group_size", 128))
    if quant.get("checkpoint_format", "gptq") != "gptq":
        raise ValueError(f"GPTQ checkpoint_format {quant['checkpoint_format']!r} is not supported (gptq v1 is)")
    return lambda parts, linear: GPTQLinear.from_tensors(parts, bits, group_size, bias=_bias(linear))


def _swap_in_quantized(model: nn.Module, tensors: dict[str, dict[str, torch.Tensor]], device: torch.device,
                       build: Callable[[dict[str, torch.Tensor], nn.Linear], nn.Module]) -> None:
    """Replace each quantized linear (still an nn.Linear with a meta weight; lm_head included) by
    `build(its tensors on device, the linear)`."""
    for prefix, parts in tensors.items():
        module_name = model.map_checkpoint_name(prefix + ".weight").rpartition(".")[0]
        parent_name, _, attr = module_name.rpartition(".")
        linear = model.get_submodule(module_name)
        try:
            q = build({k: v.to(device) for k, v in parts.items()}, linear)
        except ValueError as exc:
            raise ValueError(f"{prefix}: {exc}") from None
        if (q.in_features, q.out_features) != (linear.in_features, linear.out_features):
            raise ValueError(f"{prefix}: quantized shape {(q.in_features, q.out_features)} does not fit the model "
                             f"{(linear.in_features, linear.out_features)}")
        setattr(model.get_submodule(parent_name), attr, q.to(device))


def load_weights(model: nn.Module, weights: Iterator[tuple[str, torch.Tensor]], dtype: torch.dtype,
                 device: torch.device, not_dense=lambda: set()) -> None:
    """Replace each meta parameter by its checkpoint tensor (cast once, no init); move buffers.
    `not_dense()` (asked after reading) names weights that come quantized instead (left on meta)."""
    params = dict(model.named_parameters())  # tied lm_head.weight is listed once, as the embedding
    loaded: set[str] = set()
    for ckpt_name, tensor in weights:
        name = model.map_checkpoint_name(ckpt_name)
        if name is None or (name not in params and name == "lm_head.weight" and model.config.tie_word_embeddings):
            continue
        if name not in params:
            raise ValueError(f"checkpoint weight {ckpt_name!r} has no parameter in the model")
        if tuple(tensor.shape) != tuple(params[name].shape):
            raise ValueError(f"{ckpt_name}: checkpoint shape {tuple(tensor.shape)} "
                             f"!= model {tuple(params[name].shape)}")
        module_name, _, attr = name.rpartition(".")
        data = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
        model.get_submodule(module_name)._parameters[attr] = nn.Parameter(data, requires_grad=False)
        loaded.add(name)
    missing = sorted(set(params) - loaded - not_dense())
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} weights, e.g. {missing[:3]}")
    model.tie_weights()
    for module in model.modules():  # buffers (rope inv_freq) keep their dtype: they are built in fp32
        for key, buf in module._buffers.items():
            if buf is not None:
                module._buffers[key] = buf.to(device)


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
