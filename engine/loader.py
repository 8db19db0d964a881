"""Build a model on the meta device and fill it straight from safetensors folders or GGUF files (read by
weights.py). Quantized checkpoints: `quant` says which tensors belong to a quantized linear and which module
replaces it."""
from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from loraplex.engine.core.config import ModelConfig
from loraplex.engine.models import get_model_class
from loraplex.engine.quant import (
    CHECKPOINT_FORMATS,
    checkpoint_tensor_suffixes,
    quantized_linear_builder,
)
from loraplex.engine.weights import iter_safetensors, read_gguf

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: torch.dtype | str, config: ModelConfig | None = None) -> torch.dtype:
    """torch dtype from a dtype or a name; "auto" takes the checkpoint's torch_dtype (float32 if unknown)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return DTYPES.get(config.torch_dtype if config else "", torch.float32)
    if dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; use one of {', '.join(DTYPES)} or auto")
    return DTYPES[dtype]


@dataclass(frozen=True, slots=True)
class ModelParts:
    """The part of a model one pipeline stage holds: its decoder layers, and the embedding (the first stage) or
    the final norm and head (the last). The rest is never read from the checkpoint (engine/models Dropped)."""
    layers: range
    embedding: bool
    head: bool

    def keeps(self, name: str, tied: bool) -> bool:
        """Whether model parameter / module `name` belongs to this part (a tied head needs the embedding)."""
        if name.startswith("model.layers."):
            return int(name.split(".")[2]) in self.layers
        if name.startswith("model.embed_tokens"):
            return self.embedding or (self.head and tied)
        if name.startswith(("model.norm", "lm_head")):
            return self.head
        return True


def load_model(path: str | Path, dtype: torch.dtype | str = "auto",
               device: torch.device | str = "cpu", parts: ModelParts | None = None) -> tuple[nn.Module, ModelConfig]:
    """A model folder (config.json + *.safetensors) or a .gguf file -> (model in eval mode, config). With `parts`,
    only that part is built and read (a pipeline stage)."""
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
    if method is not None and method not in CHECKPOINT_FORMATS:
        raise ValueError(f"{path}: quantization_config.quant_method {method!r} is not supported "
                         f"({' and '.join(CHECKPOINT_FORMATS)} are)")
    with torch.device("meta"):
        model = get_model_class(config.architecture)(config)
    if parts is not None:
        _drop_others(model, parts, config.tie_word_embeddings)
    # linear's checkpoint prefix -> its quantized tensors; EXL2's names are unambiguous, so they are also
    # recognised in a folder without quantization_config
    quantized: dict[str, dict[str, dict[str, torch.Tensor]]] = {"gptq": {}, "exl2": {}}
    gptq_suffixes, exl2_suffixes = checkpoint_tensor_suffixes("gptq"), checkpoint_tensor_suffixes("exl2")

    def dense(weights: Iterator[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in weights:
            mapped = model.map_checkpoint_name(name) if parts is not None else None
            if mapped is not None and not parts.keeps(mapped, config.tie_word_embeddings):
                continue  # another stage's
            prefix, _, suffix = name.rpartition(".")
            if method == "gptq" and suffix in gptq_suffixes:
                quantized["gptq"].setdefault(prefix, {})[suffix] = tensor
            elif suffix in exl2_suffixes:
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
    if method is not None:
        _swap_in_quantized(model, quantized[method], device, quantized_linear_builder(method, quant))
    model.quant_method = method or "none"
    return model.eval(), config


def _drop_others(model: nn.Module, parts: ModelParts, tied: bool) -> None:
    from loraplex.engine.models.llama import Dropped
    for i in range(len(model.model.layers)):
        if i not in parts.layers:
            model.model.layers[i] = Dropped(f"model.layers.{i}")
    for name in ("model.embed_tokens", "model.norm", "lm_head"):
        if not parts.keeps(name, tied):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, Dropped(name))


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
