"""PEFT LoRA folders in: `adapter_config.json` + `adapter_model.safetensors` (or a legacy
`adapter_model.bin`, read only with `torch.load(weights_only=True)`), validated against the base model.

Reference: peft/tuners/lora (LoraConfig, LoraModel._create_and_replace, check_target_module_exists,
get_pattern_key). What PEFT would compute is `y = W x + (alpha / r) · B (A x)` on every targeted linear
(`alpha / √r` with rsLoRA; per-module r and alpha from rank_pattern / alpha_pattern); `load_adapter`
returns exactly those A and B with the scale folded into B.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loraplex.adapters.errors import AdapterError, UnsupportedAdapterError
from loraplex.engine.core.config import ModelConfig

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
MAX_CONFIG_BYTES = 1 << 20

# the linears of a Llama-family layer a LoRA may target, with the sub-module holding each
LORA_MODULES: dict[str, str] = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn",
                                "o_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
_KEY = re.compile(r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])"
                  r"(?:\.[A-Za-z0-9_-]+)?\.weight$")
# config fields that change what is computed and that we do not serve: name -> value meaning "off"
_MAGNITUDE_KEY = re.compile(r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)"
                            r"\.lora_magnitude_vector(?:\.[A-Za-z0-9_-]+)?(?:\.weight)?$")
# the model's input embedding and output head: an adapter may carry its own (PEFT's modules_to_save) or LoRA on them
FULL_MODULES: dict[str, str] = {"embed_tokens": "model.embed_tokens", "lm_head": "lm_head"}
_FULL_KEY = re.compile(r"^(?:base_model\.model\.)?(model\.embed_tokens|lm_head)\.(?:modules_to_save\.[A-Za-z0-9_-]+\.)?"
                       r"(weight|base_layer\.weight|lora_A(?:\.[A-Za-z0-9_-]+)?\.weight|lora_B(?:\.[A-Za-z0-9_-]+)?\.weight"
                       r"|lora_embedding_A(?:\.[A-Za-z0-9_-]+)?|lora_embedding_B(?:\.[A-Za-z0-9_-]+)?)$")
_UNSUPPORTED_FIELDS = {"lora_bias": False, "layer_replication": None,
                       "target_parameters": None, "trainable_token_indices": None,
                       "alora_invocation_tokens": None, "use_qalora": False, "use_bdlora": None,
                       "megatron_config": None}


def module_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each LoRA-targetable linear of one layer."""
    h, inter = config.hidden_size, config.intermediate_size
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}


@dataclass(frozen=True, slots=True)
class LoRAAdapterConfig:
    """The parts of a PEFT LoraConfig that decide what is computed."""
    r: int
    lora_alpha: float
    target_modules: str | tuple[str, ...]
    use_rslora: bool = False
    rank_pattern: tuple[tuple[str, int], ...] = ()
    alpha_pattern: tuple[tuple[str, float], ...] = ()
    layers_to_transform: tuple[int, ...] | None = None
    exclude_modules: str | tuple[str, ...] | None = None
    base_model_name_or_path: str | None = None
    use_dora: bool = False  # DoRA: each targeted linear also carries a magnitude vector (adapters/dora.py)
    modules_to_save: tuple[str, ...] = ()  # of FULL_MODULES: trained whole, saved in full

    def targets(self, module_name: str, layer: int) -> bool:
        """PEFT's check_target_module_exists for `model.layers.{layer}.{parent}.{module}` names."""
        if self.exclude_modules is not None and _matches(self.exclude_modules, module_name):
            return False
        if self.target_modules == "all-linear":
            hit = True
        else:
            hit = _matches(self.target_modules, module_name)
        return hit and (self.layers_to_transform is None or layer in self.layers_to_transform)

    def targets_full(self, name: str) -> bool:
        """Whether LoRA targets FULL_MODULES' `name` (all-linear leaves the output head out, as PEFT does)."""
        if self.exclude_modules is not None and _matches(self.exclude_modules, name):
            return False
        return self.target_modules != "all-linear" and _matches(self.target_modules, name)

    def rank_of(self, module_name: str) -> int:
        return _pattern_value(self.rank_pattern, module_name, self.r)

    def scale_of(self, module_name: str) -> float:
        r, alpha = self.rank_of(module_name), _pattern_value(self.alpha_pattern, module_name, self.lora_alpha)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def _matches(targets: str | tuple[str, ...], name: str) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _pattern_value(patterns, name: str, default):
    for pattern, value in patterns:
        if name == pattern or re.match(rf"(.*\.)?({pattern})$", name):
            return value
    return default


def parse_adapter_config(raw: dict, max_lora_rank: int) -> LoRAAdapterConfig:
    """Validate a parsed adapter_config.json; refuses what we do not serve with a clear message."""
    if not isinstance(raw, dict):
        raise AdapterError(f"{CONFIG_NAME} must hold a JSON object")
    peft_type = str(raw.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise UnsupportedAdapterError(f"peft_type {peft_type!r} is not served; only LORA adapters are")
    for name, off in _UNSUPPORTED_FIELDS.items():
        if raw.get(name) not in (off, None, [], {}, False):
            raise UnsupportedAdapterError(f"adapter_config.json sets {name}={raw[name]!r}, which is not "
                                          "served yet (plain LoRA on linear layers only)", param=name)
    if raw.get("bias", "none") != "none":
        raise UnsupportedAdapterError(f"bias={raw['bias']!r} (trained biases) is not served; only bias='none'",
                                      param="bias")
    r, alpha = raw.get("r", 8), raw.get("lora_alpha", 8)
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise AdapterError(f"r must be a positive integer, got {r!r}", param="r")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise AdapterError(f"lora_alpha must be a finite number, got {alpha!r}", param="lora_alpha")
    rank_pattern = tuple((str(k), v) for k, v in (raw.get("rank_pattern") or {}).items())
    alpha_pattern = tuple((str(k), float(v)) for k, v in (raw.get("alpha_pattern") or {}).items())
    for k, v in rank_pattern:
        if not isinstance(v, int) or v <= 0:
            raise AdapterError(f"rank_pattern[{k!r}] must be a positive integer", param="rank_pattern")
    max_r = max([r] + [v for _, v in rank_pattern])
    if max_r > max_lora_rank:
        raise UnsupportedAdapterError(f"adapter rank {max_r} exceeds this server's --max-lora-rank "
                                      f"{max_lora_rank}", param="r")
    targets = raw.get("target_modules")
    if isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets):
        targets = tuple(targets)
    elif not (isinstance(targets, str) and targets):
        raise AdapterError("target_modules must be a non-empty list of module names or a regex string",
                           param="target_modules")
    excluded = raw.get("exclude_modules")
    if isinstance(excluded, list):
        excluded = tuple(excluded)
    layers = raw.get("layers_to_transform")
    if isinstance(layers, int):
        layers = (layers,)
    elif layers is not None:
        layers = tuple(int(i) for i in layers)
    return LoRAAdapterConfig(r=r, lora_alpha=float(alpha), target_modules=targets,
                             use_rslora=bool(raw.get("use_rslora", False)), rank_pattern=rank_pattern,
                             alpha_pattern=alpha_pattern, layers_to_transform=layers,
                             exclude_modules=excluded, base_model_name_or_path=raw.get("base_model_name_or_path"),
                             use_dora=bool(raw.get("use_dora", False)),
                             modules_to_save=_modules_to_save(raw.get("modules_to_save")))


def _modules_to_save(value) -> tuple[str, ...]:
    """PEFT's modules_to_save, of which we serve the input embedding and the output head."""
    if value in (None, [], ()):
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise AdapterError("modules_to_save must be a list of module names", param="modules_to_save")
    out = []
    for name in value:
        short = name.rsplit(".", 1)[-1]
        if short not in FULL_MODULES:
            raise UnsupportedAdapterError(f"modules_to_save {name!r} is not served: only the input embedding "
                                          f"(embed_tokens) and the output head (lm_head) are", param="modules_to_save")
        out.append(short)
    return tuple(sorted(set(out)))


@dataclass(slots=True)
class LoRAWeights:
    """One adapter's weights for the pool: per (layer, module) A [r_m, in] and B·scale [out, r_m]; a DoRA adapter
    also its magnitude vectors [out] (float32) and, once the runtime computed them against the base weights, the
    per-output-channel scales magnitude / ‖W + B·scale·A‖ (adapters/dora.py) it serves with."""
    config: LoRAAdapterConfig
    rank: int  # rank-rows of A it needs: the largest r_m
    tensors: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
    magnitudes: dict[tuple[int, str], torch.Tensor] | None = None
    dora_scales: dict[tuple[int, str], torch.Tensor] | None = None
    # its own embed_tokens / lm_head (adapters/full_modules.py): per module a full [vocab, hidden] weight (saved
    # with modules_to_save, or the base copy PEFT saves beside LoRA on it; None: the base model's) and LoRA on it
    # as (left [vocab, r], right [r, hidden]), scale folded in: the module's weight is full + left @ right
    full: dict[str, tuple[torch.Tensor | None, tuple[torch.Tensor, torch.Tensor] | None]] = field(default_factory=dict)
    full_weights: dict[str, torch.Tensor] | None = None  # those, materialised by the runtime against the base

    @property
    def full_modules(self) -> tuple[str, ...]:
        return tuple(sorted(self.full))

    @property
    def kind(self) -> str:
        return "lora" if self.magnitudes is None else "dora"

    @property
    def target_modules(self) -> tuple[str, ...]:
        return tuple(sorted({m for _, m in self.tensors}, key=list(LORA_MODULES).index))

    @property
    def num_bytes(self) -> int:
        full = [t for w, lora in self.full.values() for t in ([w] if w is not None else []) + list(lora or ())]
        return (sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.tensors.values())
                + sum(t.numel() * t.element_size() for t in full))

    @property
    def num_pages(self) -> int:
        """Pool pages: its rank-rows, and for DoRA one more page whose B row holds each module's scales."""
        return self.rank + (self.magnitudes is not None)

    def pool_tensors(self) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
        """What LoRAWeightPool.write takes for its `num_pages` pages: DoRA's scales as a last rank-row whose A row is
        zero (so the LoRA op, which never reads that page anyway, would add nothing) and whose B column is them."""
        if self.magnitudes is None:
            return self.tensors
        assert self.dora_scales is not None, "DoRA scales are computed against the base model before serving"
        out = {}
        for k, (a, b) in self.tensors.items():
            pad = self.rank - a.shape[0]
            a = torch.cat([a, a.new_zeros(pad + 1, a.shape[1])])
            b = torch.cat([b, b.new_zeros(b.shape[0], pad), self.dora_scales[k].to(b.dtype).unsqueeze(1)], dim=1)
            out[k] = (a, b)
        return out


def read_adapter_config(folder: Path, max_lora_rank: int) -> LoRAAdapterConfig:
    return parse_adapter_config(read_config_json(folder), max_lora_rank)


def read_config_json(folder: Path):
    """adapter_config.json parsed, bounded in size; AdapterError when missing, too large or not JSON."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise AdapterError(f"{CONFIG_NAME} is missing from the adapter folder")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise AdapterError(f"{CONFIG_NAME} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(f"{CONFIG_NAME} is not valid JSON: {e}") from None
    return raw


def _read_state_dict(folder: Path, allow_bin: bool) -> dict[str, torch.Tensor]:
    st, binf = folder / SAFETENSORS_NAME, folder / BIN_NAME
    if st.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(st))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise AdapterError(f"{SAFETENSORS_NAME} is not a valid safetensors file: {e}") from None
    if binf.is_file():
        if not allow_bin:
            raise AdapterError(f"{BIN_NAME} (a pickle) is not accepted here; send {SAFETENSORS_NAME}")
        try:  # never a full unpickle: tensors and plain containers only
            state = torch.load(str(binf), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any failure of the restricted unpickler is the file's fault
            raise AdapterError(f"{BIN_NAME} could not be read as plain tensors: {e}") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise AdapterError(f"{BIN_NAME} must hold a flat dict of tensors")
        return state
    raise AdapterError(f"the adapter folder has no {SAFETENSORS_NAME}")


def load_adapter(folder: Path | str, model_config: ModelConfig, max_lora_rank: int, *,
                 dtype: torch.dtype = torch.float32, allow_bin: bool = True) -> LoRAWeights:
    """Read and validate a PEFT LoRA folder against the base model; raise AdapterError (4xx) on
    anything we would not compute exactly as PEFT does."""
    folder = Path(folder)
    config = read_adapter_config(folder, max_lora_rank)
    _check_targets_exist(config, model_config)
    state = _read_state_dict(folder, allow_bin)
    shapes = module_shapes(model_config)
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    magnitudes: dict[tuple[int, str], torch.Tensor] = {}
    full_parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        full = _FULL_KEY.match(key)
        if full is not None:
            module, part = full.group(1).rsplit(".", 1)[-1], full.group(2).split(".")[0]
            if part in full_parts.get(module, {}):
                raise AdapterError(f"weight {key!r} appears twice")
            full_parts.setdefault(module, {})[part] = tensor
            continue
        m = _KEY.match(key)
        mag = _MAGNITUDE_KEY.match(key) if m is None and config.use_dora else None
        if mag is not None:
            layer, parent, module = int(mag.group(1)), mag.group(2), mag.group(3)
            if LORA_MODULES.get(module) != parent or layer >= model_config.num_hidden_layers:
                raise AdapterError(f"weight {key!r} targets a module the base model does not have")
            magnitudes[layer, module] = tensor
            continue
        if m is None:
            what = ("DoRA magnitudes of an adapter without use_dora" if "lora_magnitude_vector" in key else
                    "modules_to_save" if "modules_to_save" in key else
                    "LoRA biases" if key.endswith(".bias") else "an unknown tensor")
            raise UnsupportedAdapterError(f"weight {key!r} ({what}) is not served; only lora_A/lora_B weights "
                                          "of the base model's linear layers are")
        layer, parent, module, which = int(m.group(1)), m.group(2), m.group(3), m.group(4)
        if LORA_MODULES.get(module) != parent or layer >= model_config.num_hidden_layers:
            raise AdapterError(f"weight {key!r} targets a module the base model does not have "
                               f"({model_config.num_hidden_layers} layers; linears {', '.join(LORA_MODULES)})")
        if (layer, module) in pairs and which in pairs[layer, module]:
            raise AdapterError(f"weight {key!r} appears twice")
        pairs.setdefault((layer, module), {})[which] = tensor
    full = _full_modules(config, full_parts, model_config)
    if not pairs and not full:
        raise AdapterError("the adapter holds no lora_A/lora_B weights")

    tensors: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    for (layer, module), ab in sorted(pairs.items()):
        name = f"model.layers.{layer}.{LORA_MODULES[module]}.{module}"
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"{name} has lora_{''.join(ab)} but not its partner")
        if not config.targets(name, layer):
            raise AdapterError(f"{name} has LoRA weights but target_modules does not select it")
        a, b = ab["A"], ab["B"]
        in_f, out_f = shapes[module]
        r = config.rank_of(name)
        if tuple(a.shape) != (r, in_f) or tuple(b.shape) != (out_f, r):
            raise AdapterError(f"{name}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit the base "
                               f"model (expected ({r}, {in_f}) / ({out_f}, {r}))")
        if not (a.is_floating_point() and b.is_floating_point()):
            raise AdapterError(f"{name}: LoRA weights must be floating point")
        a, b = a.float(), b.float()
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise AdapterError(f"{name}: LoRA weights contain NaN or Inf")
        tensors[layer, module] = (a.to(dtype).contiguous(), (b * config.scale_of(name)).to(dtype).contiguous())
    rank = max((a.shape[0] for a, _ in tensors.values()), default=1)  # an adapter of full modules only: one page
    full = {m: (None if w is None else w.to(dtype), None if lora is None else (lora[0].to(dtype), lora[1].to(dtype)))
            for m, (w, lora) in full.items()}
    if not config.use_dora:
        return LoRAWeights(config, rank, tensors, full=full)
    return LoRAWeights(config, rank, tensors, _check_magnitudes(magnitudes, tensors, shapes), full=full)


def _full_modules(config: LoRAAdapterConfig, parts: dict[str, dict[str, torch.Tensor]], model_config: ModelConfig
                  ) -> dict[str, tuple[torch.Tensor | None, tuple[torch.Tensor, torch.Tensor] | None]]:
    """The adapter's own embed_tokens / lm_head: checked against the config and the base model's shapes."""
    vocab, hidden = model_config.vocab_size, model_config.hidden_size
    out = {}
    for module in sorted(set(parts) | set(config.modules_to_save)):
        name = FULL_MODULES[module]
        got = parts.get(module, {})
        saved = module in config.modules_to_save
        lora_targeted = config.targets_full(name)
        a_name, b_name = ("lora_embedding_A", "lora_embedding_B") if module == "embed_tokens" else ("lora_A", "lora_B")
        lora_parts = {k for k in got if k.startswith("lora_")}
        if saved and "weight" not in got:
            raise AdapterError(f"modules_to_save lists {module} but the adapter has no {name}.weight",
                               param="modules_to_save")
        if "weight" in got and not saved:
            raise AdapterError(f"{name}.weight is in the file but modules_to_save does not list {module}",
                               param="modules_to_save")
        if lora_parts and not lora_targeted:
            raise AdapterError(f"{name} has LoRA weights but target_modules does not select it", param="target_modules")
        if lora_parts and lora_parts != {a_name, b_name}:
            raise AdapterError(f"{name}: LoRA on it needs {a_name} and {b_name}, got {sorted(lora_parts)}")
        for part in ("weight", "base_layer"):
            w = got.get(part)
            if w is None:
                continue
            if w.dim() == 2 and w.shape[1] == hidden and w.shape[0] > vocab:
                raise UnsupportedAdapterError(f"{name} has {w.shape[0]} rows, {w.shape[0] - vocab} beyond the base "
                                              f"vocabulary of {vocab}: added tokens are not served", param=module)
            if tuple(w.shape) != (vocab, hidden) or not w.is_floating_point() or not torch.isfinite(w).all():
                raise AdapterError(f"{name}: {part} is {tuple(w.shape)} {w.dtype}; the base model needs finite "
                                   f"({vocab}, {hidden}) floating point", param=module)
        lora = None
        if lora_parts:
            r = config.rank_of(name)
            a, b = got[a_name].float(), got[b_name].float()
            scale = config.scale_of(name)
            if module == "embed_tokens":  # A [r, vocab], B [hidden, r]: the delta of row t is (B · A[:, t])ᵀ
                want = ((r, vocab), (hidden, r))
                lora = (a.t().contiguous(), (b * scale).t().contiguous())
            else:  # A [r, hidden], B [vocab, r]
                want = ((r, hidden), (vocab, r))
                lora = ((b * scale).contiguous(), a.contiguous())
            if (tuple(a.shape), tuple(b.shape)) != want:
                raise AdapterError(f"{name}: {a_name} {tuple(a.shape)} / {b_name} {tuple(b.shape)} do not fit the base "
                                   f"model (expected {want[0]} / {want[1]})")
            if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
                raise AdapterError(f"{name}: LoRA weights contain NaN or Inf")
        full_weight = got.get("weight", got.get("base_layer"))
        if full_weight is None and lora is None:
            continue
        out[module] = (None if full_weight is None else full_weight.float().contiguous(), lora)
    return out


def _check_magnitudes(magnitudes: dict[tuple[int, str], torch.Tensor],
                      tensors: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]],
                      shapes: dict[str, tuple[int, int]]) -> dict[tuple[int, str], torch.Tensor]:
    """A DoRA adapter carries one magnitude per output channel of every linear it adapts, and nothing else."""
    for (layer, module) in tensors:
        name = f"model.layers.{layer}.{LORA_MODULES[module]}.{module}"
        m = magnitudes.get((layer, module))
        if m is None:
            raise AdapterError(f"{name}: use_dora is set but its lora_magnitude_vector is missing",
                               param="lora_magnitude_vector")
        out_f = shapes[module][1]
        if tuple(m.shape) != (out_f,) or not m.is_floating_point():
            raise AdapterError(f"{name}: lora_magnitude_vector is {tuple(m.shape)} {m.dtype}; the base model needs "
                               f"({out_f},) floating point (one magnitude per output channel)",
                               param="lora_magnitude_vector")
        if not torch.isfinite(m).all():
            raise AdapterError(f"{name}: lora_magnitude_vector contains NaN or Inf", param="lora_magnitude_vector")
    extra = sorted(set(magnitudes) - set(tensors))
    if extra:
        layer, module = extra[0]
        raise AdapterError(f"model.layers.{layer}.{LORA_MODULES[module]}.{module} has a lora_magnitude_vector but "
                           "no lora_A/lora_B", param="lora_magnitude_vector")
    return {k: magnitudes[k].float().contiguous() for k in tensors}


def _check_targets_exist(config: LoRAAdapterConfig, model_config: ModelConfig) -> None:
    """PEFT refuses a config whose targets match nothing in the base model; so do we (a typo there
    would otherwise serve the base model under the adapter's name)."""
    for layer in range(model_config.num_hidden_layers):
        for module, parent in LORA_MODULES.items():
            if config.targets(f"model.layers.{layer}.{parent}.{module}", layer):
                return
    if config.modules_to_save or any(config.targets_full(name) for name in FULL_MODULES.values()):
        return
    raise AdapterError(f"target_modules {config.target_modules!r} match no linear layer of the base model "
                       f"(targetable: {', '.join(LORA_MODULES)})", param="target_modules")
