"""MixLoRA adapters (MoE-PEFT's format): read, validate, convert, write, and the float64 reference of the block.

A MixLoRA adapter is ordinary LoRA on the attention projections plus, in each layer's FFN, a sparse mixture of
E LoRA experts over the frozen FFN and a per-layer router (`W_g`, [E, hidden]). Expert e is the base FFN with
its own LoRA deltas on gate/up/down; a token's FFN output is the router-weighted sum of its chosen experts:

    p = softmax(W_g x);  S = top-k(p) ("mixlora", weights p_e / Σ_S p) or the smallest prefix of p sorted
        descending whose sum reaches top_p ("mixlora-dynamic", weights p_e as they are; with temperature T > 0
        the probabilities are divided by T first, as the reference does)
    E_e(x) = W2 (φ(W1 x + s B1_e A1_e x) ⊙ (W3 x + s B3_e A3_e x)) + s B2_e A2_e h_e
    FFN(x) = Σ_{e∈S} w_e E_e(x)

Files: `adapter_config.json` (`peft_type: "MIXLORA"`, `routing_strategy`, `num_experts`, `top_k` or
`top_p`/`temperature`, `act_fn`, optional `expert_lora` overriding r/alpha for the experts) and weights
`mixlora.layers.{i}.self_attn.{q,k,v,o}_proj.lora_{A,B}.weight`, `mixlora.layers.{i}.mlp.moe_gate.weight`,
`mixlora.layers.{i}.mlp.{gate,up,down}_proj.experts.{e}.lora_{A,B}.weight`, in `adapter_model.safetensors`
(ours) or MoE-PEFT's `adapter_model.bin` (read with `torch.load(weights_only=True)` only). The legacy layout
(`routing_strategy: "mixtral"`, `w1/w2/w3_proj`, `layers.{i}.gate.weight`, `layers.{i}.experts.{e}.*`) is
converted on read. `mixlora-switch` is refused: its reference inference returns the block's input (the notes
in shared/research/mixlora-and-mlora.md §1.5).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loraplex.adapters.errors import AdapterError, UnsupportedAdapterError
from loraplex.adapters.peft import (
    BIN_NAME,
    CONFIG_NAME,
    SAFETENSORS_NAME,
    _read_state_dict,
    module_shapes,
    read_config_json,
)
from loraplex.engine.core.config import ModelConfig

PEFT_TYPE = "MIXLORA"
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
FFN = ("gate_proj", "up_proj", "down_proj")
STRATEGIES = ("mixlora", "mixlora-dynamic")
LEGACY_STRATEGY = "mixtral"
LEGACY_PROJ = {"w1_proj": "gate_proj", "w2_proj": "down_proj", "w3_proj": "up_proj"}
MAX_EXPERTS = 64
BASE_ACT_FN = "silu"  # every architecture the engine runs (Llama, Mistral, Qwen2) has a SiLU-gated FFN
ACT_FNS = ("silu", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu")

_ATTN_KEY = re.compile(r"^mixlora\.layers\.(\d+)\.self_attn\.([a-z]_proj)\.lora_([AB])\.weight$")
_ROUTER_KEY = re.compile(r"^mixlora\.layers\.(\d+)\.mlp\.moe_gate\.weight$")
_EXPERT_KEY = re.compile(r"^mixlora\.layers\.(\d+)\.mlp\.(\w+_proj)\.experts\.(\d+)\.lora_([AB])\.weight$")
_LEGACY_ROUTER_KEY = re.compile(r"^mixlora\.layers\.(\d+)\.gate\.weight$")
_LEGACY_EXPERT_KEY = re.compile(r"^mixlora\.layers\.(\d+)\.experts\.(\d+)\.(\w+_proj)\.lora_([AB])\.weight$")


@dataclass(frozen=True, slots=True)
class MixLoRAConfig:
    r: int
    lora_alpha: float
    target_modules: tuple[str, ...]
    routing_strategy: str
    num_experts: int
    act_fn: str
    top_k: int = 2
    top_p: float = 0.8
    temperature: float = 0.0
    use_rslora: bool = False
    expert_r: int = 0  # 0: r
    expert_alpha: float = 0.0  # 0: lora_alpha
    base_model_name_or_path: str | None = None
    extra: dict = field(default_factory=dict, compare=False)  # the config's other keys, kept when written back

    @property
    def attention_targets(self) -> tuple[str, ...]:
        return tuple(m for m in ATTENTION if m in self.target_modules)

    @property
    def ffn_targets(self) -> tuple[str, ...]:
        return tuple(m for m in FFN if m in self.target_modules)

    def scale(self, expert: bool) -> float:
        r = (self.expert_r or self.r) if expert else self.r
        alpha = (self.expert_alpha or self.lora_alpha) if expert else self.lora_alpha
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def rank(self, expert: bool) -> int:
        return (self.expert_r or self.r) if expert else self.r

    def to_json(self) -> dict:
        """MoE-PEFT's export fields (alpha an int where it is one: their loaders assert it)."""
        def number(v: float):
            return int(v) if float(v).is_integer() else v
        out = {**self.extra, "bias": "none", "peft_type": PEFT_TYPE, "r": self.r, "lora_alpha": number(self.lora_alpha),
               "lora_dropout": self.extra.get("lora_dropout", 0.05), "target_modules": list(self.target_modules),
               "routing_strategy": self.routing_strategy, "num_experts": self.num_experts, "act_fn": self.act_fn,
               "task_type": self.extra.get("task_type", "CAUSAL_LM")}
        if self.use_rslora:
            out["use_rslora"] = True
        if self.expert_r or self.expert_alpha:
            out["expert_lora"] = {"r": self.rank(True), "lora_alpha": number(self.expert_alpha or self.lora_alpha),
                                  "lora_dropout": out["lora_dropout"]}
        if self.routing_strategy == "mixlora":
            out["top_k"] = self.top_k
        else:
            out["top_p"], out["temperature"] = self.top_p, self.temperature
        if self.base_model_name_or_path:
            out["base_model_name_or_path"] = self.base_model_name_or_path
        return out


def is_mixlora_config(raw: dict) -> bool:
    strategy = raw.get("routing_strategy")
    return raw.get("peft_type") == PEFT_TYPE or (isinstance(strategy, str) and
                                                 (strategy.startswith("mixlora") or strategy == LEGACY_STRATEGY))


def _int(raw: dict, key: str, low: int, high: int, default: int | None = None) -> int:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise AdapterError(f"MixLoRA `{key}` must be an integer in [{low}, {high}], got {value!r}", param=key)
    return value


def _float(raw: dict, key: str, low: float, high: float, default: float) -> float:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (low <= value <= high):
        raise AdapterError(f"MixLoRA `{key}` must be a number in [{low}, {high}], got {value!r}", param=key)
    return float(value)


def parse_mixlora_config(raw: dict, max_lora_rank: int) -> MixLoRAConfig:
    if not isinstance(raw, dict):
        raise AdapterError(f"{CONFIG_NAME} must be a JSON object")
    strategy = raw.get("routing_strategy")
    if strategy == "mixlora-switch":
        raise UnsupportedAdapterError("MixLoRA routing_strategy 'mixlora-switch' is not served: its reference "
                                      "inference returns the FFN's input (the experts never run), so there is no "
                                      "correct output to reproduce; train with 'mixlora' or 'mixlora-dynamic'",
                                      param="routing_strategy")
    if strategy == LEGACY_STRATEGY:
        strategy = "mixlora"
    if strategy not in STRATEGIES:
        raise AdapterError(f"MixLoRA routing_strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}",
                           param="routing_strategy")
    if raw.get("use_dora"):
        raise UnsupportedAdapterError("MixDoRA (use_dora) is not served: MoE-PEFT saves no DoRA magnitudes",
                                      param="use_dora")
    targets = raw.get("target_modules")
    if isinstance(targets, dict):  # MoE-PEFT also takes {name: bool}
        targets = [k for k, v in targets.items() if v]
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise AdapterError("MixLoRA target_modules must be a non-empty list of module names", param="target_modules")
    targets = [LEGACY_PROJ.get(t, t) for t in targets]
    unknown = sorted(set(targets) - set(ATTENTION) - set(FFN))
    if unknown:
        raise AdapterError(f"MixLoRA target_modules {unknown} are not Llama-family linears "
                           f"({', '.join(ATTENTION + FFN)})", param="target_modules")
    if not set(targets) & set(FFN):
        raise AdapterError("a MixLoRA adapter needs experts: target_modules must include gate_proj, up_proj or "
                           "down_proj", param="target_modules")
    num_experts = _int(raw, "num_experts", 1, MAX_EXPERTS)
    top_k = _int(raw, "top_k", 1, num_experts, 2 if num_experts >= 2 else 1) if strategy == "mixlora" else 0
    act_fn = raw.get("act_fn") or "silu"
    if act_fn not in ACT_FNS:
        raise AdapterError(f"MixLoRA act_fn {act_fn!r} is not one of {', '.join(ACT_FNS)}", param="act_fn")
    expert = raw.get("expert_lora") or {}
    if not isinstance(expert, dict):
        raise AdapterError("MixLoRA expert_lora must be an object of LoRA settings", param="expert_lora")
    r = _int(raw, "r", 1, max_lora_rank)
    alpha = _float(raw, "lora_alpha", 1e-6, 1e6, r)
    known = {"peft_type", "routing_strategy", "target_modules", "num_experts", "top_k", "top_p", "temperature",
             "act_fn", "expert_lora", "r", "lora_alpha", "use_rslora", "use_dora", "base_model_name_or_path"}
    return MixLoRAConfig(
        r=r, lora_alpha=alpha, target_modules=tuple(dict.fromkeys(targets)), routing_strategy=strategy,
        num_experts=num_experts, act_fn=act_fn, top_k=top_k,
        top_p=_float(raw, "top_p", 1e-6, 1.0, 0.8) if strategy == "mixlora-dynamic" else 0.8,
        temperature=_float(raw, "temperature", 0.0, 100.0, 0.0) if strategy == "mixlora-dynamic" else 0.0,
        use_rslora=bool(raw.get("use_rslora", False)),
        expert_r=_int(expert, "r", 1, max_lora_rank) if "r" in expert else 0,
        expert_alpha=_float(expert, "lora_alpha", 1e-6, 1e6, 0.0) if "lora_alpha" in expert else 0.0,
        base_model_name_or_path=raw.get("base_model_name_or_path"),
        extra={k: v for k, v in raw.items() if k not in known})


@dataclass
class MixLoRAWeights:
    """A validated MixLoRA adapter, scales folded into B: attention[(layer, module)] = (A [r, in], B [out, r]);
    router[layer] = W_g [E, hidden]; experts[(layer, module)] = (A [E, r_e, in], B [E, out, r_e])."""
    config: MixLoRAConfig
    attention: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
    router: dict[int, torch.Tensor]
    experts: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]

    @property
    def num_bytes(self) -> int:
        tensors = [*self.router.values()] + [t for pair in (*self.attention.values(), *self.experts.values())
                                             for t in pair]
        return sum(t.numel() * t.element_size() for t in tensors)

    @property
    def rank(self) -> int:
        return self.config.r

    @property
    def target_modules(self) -> tuple[str, ...]:
        present = {m for _, m in self.attention} | {m for _, m in self.experts}
        return tuple(m for m in ATTENTION + FFN if m in present)

    # ---- the paged pool's layout: the attention LoRA shares its pages with expert 0 ----------------------------
    @property
    def expert_offsets(self) -> list[int]:
        """First page (index into the adapter's page list) of each expert; expert e spans `rank(True)` pages."""
        r_e = self.config.rank(True)
        first = max(self.config.r if self.attention else 0, r_e)
        return [0] + [first + (e - 1) * r_e for e in range(1, self.config.num_experts)]

    @property
    def num_pages(self) -> int:
        r_e = self.config.rank(True)
        return max(self.config.r if self.attention else 0, r_e) + (self.config.num_experts - 1) * r_e

    @property
    def kind(self) -> str:
        return "mixlora"

    def pool_tensors(self) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
        """Per (layer, module) the A rows [num_pages, in] and B columns [out, num_pages] to write into the
        adapter's pages (LoRAWeightPool.write): attention in the first r pages, each expert's A/B at its offset."""
        n, offsets, r_e = self.num_pages, self.expert_offsets, self.config.rank(True)
        out = {}
        for (layer, module), (a, b) in self.attention.items():
            a_full = a.new_zeros(n, a.shape[1])
            b_full = b.new_zeros(b.shape[0], n)
            a_full[:a.shape[0]], b_full[:, :b.shape[1]] = a, b
            out[layer, module] = (a_full, b_full)
        for (layer, module), (a, b) in self.experts.items():  # a [E, r_e, in], b [E, out, r_e]
            a_full = a.new_zeros(n, a.shape[2])
            b_full = b.new_zeros(b.shape[1], n)
            for e, start in enumerate(offsets):
                a_full[start:start + r_e], b_full[:, start:start + r_e] = a[e], b[e]
            out[layer, module] = (a_full, b_full)
        return out


def read_mixlora_config(folder: Path, max_lora_rank: int) -> MixLoRAConfig:
    return parse_mixlora_config(read_config_json(folder), max_lora_rank)


def convert_legacy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The pre-August-2024 key layout (`layers.{i}.gate.weight`, `layers.{i}.experts.{e}.w1_proj...`) in
    today's names; other keys unchanged."""
    out = {}
    for key, tensor in state.items():
        if m := _LEGACY_ROUTER_KEY.match(key):
            key = f"mixlora.layers.{m[1]}.mlp.moe_gate.weight"
        elif m := _LEGACY_EXPERT_KEY.match(key):
            key = f"mixlora.layers.{m[1]}.mlp.{LEGACY_PROJ.get(m[3], m[3])}.experts.{m[2]}.lora_{m[4]}.weight"
        if key in out:
            raise AdapterError(f"weight {key!r} appears twice (legacy and current names)")
        out[key] = tensor
    return out


def _checked(name: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    if tuple(tensor.shape) != shape:
        raise AdapterError(f"{name}: shape {tuple(tensor.shape)} does not fit the base model (expected {shape})")
    if not tensor.is_floating_point():
        raise AdapterError(f"{name}: weights must be floating point")
    tensor = tensor.float()
    if not torch.isfinite(tensor).all():
        raise AdapterError(f"{name}: weights contain NaN or Inf")
    return tensor


def load_mixlora(folder: Path | str, model_config: ModelConfig, max_lora_rank: int, *,
                 dtype: torch.dtype = torch.float32, allow_bin: bool = True) -> MixLoRAWeights:
    """Read and validate a MixLoRA folder against the base model; AdapterError (4xx) on anything that is not
    exactly a MixLoRA of this model (nothing is half-accepted)."""
    folder = Path(folder)
    config = read_mixlora_config(folder, max_lora_rank)
    state = convert_legacy(_read_state_dict(folder, allow_bin))
    num_layers, hidden, num_experts = model_config.num_hidden_layers, model_config.hidden_size, config.num_experts
    shapes = module_shapes(model_config)
    attention: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    router: dict[int, torch.Tensor] = {}
    experts: dict[tuple[int, str], dict[tuple[int, str], torch.Tensor]] = {}
    for key, tensor in state.items():
        if m := _ATTN_KEY.match(key):
            layer, module, which = int(m[1]), m[2], m[3]
            if module not in config.attention_targets:
                raise AdapterError(f"weight {key!r}: {module} is not an attention target of this adapter")
            attention.setdefault((layer, module), {})[which] = tensor
        elif m := _ROUTER_KEY.match(key):
            router[int(m[1])] = tensor
        elif m := _EXPERT_KEY.match(key):
            layer, module, expert, which = int(m[1]), m[2], int(m[3]), m[4]
            if module not in config.ffn_targets:
                raise AdapterError(f"weight {key!r}: {module} is not an expert target of this adapter")
            if expert >= num_experts:
                raise AdapterError(f"weight {key!r}: expert {expert} but num_experts is {num_experts}")
            experts.setdefault((layer, module), {})[expert, which] = tensor
        else:
            raise UnsupportedAdapterError(f"weight {key!r} is not a MixLoRA tensor (attention LoRA, "
                                          "mlp.moe_gate or mlp.*_proj.experts.N)")
        if int(m[1]) >= num_layers:
            raise AdapterError(f"weight {key!r} is for layer {m[1]}; the base model has {num_layers} layers")
    if config.act_fn != BASE_ACT_FN:
        raise UnsupportedAdapterError(f"MixLoRA act_fn {config.act_fn!r} differs from the base model's FFN "
                                      f"activation ({BASE_ACT_FN}): the experts share that FFN", param="act_fn")
    expert_layers = {layer for layer, _ in experts}
    if expert_layers and expert_layers != set(range(num_layers)):
        raise AdapterError(f"a MixLoRA adapter has experts and a router in every layer; layers "
                           f"{sorted(set(range(num_layers)) - expert_layers)} have none")
    if set(router) != expert_layers or not router:
        missing = sorted(expert_layers - set(router))
        extra = sorted(set(router) - expert_layers)
        raise AdapterError(f"every layer with experts needs its router (mlp.moe_gate) and only those: "
                           f"routers missing for layers {missing}, routers without experts in layers {extra}"
                           if missing or extra else "the adapter holds no experts")
    out_router = {layer: _checked(f"layer {layer} router", w, (num_experts, hidden)).contiguous()  # float32 always
                  for layer, w in sorted(router.items())}
    out_attention = {}
    for (layer, module), ab in sorted(attention.items()):
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"layer {layer} {module}: lora_{''.join(ab)} without its partner")
        in_f, out_f = shapes[module]
        a = _checked(f"layer {layer} {module} lora_A", ab["A"], (config.r, in_f))
        b = _checked(f"layer {layer} {module} lora_B", ab["B"], (out_f, config.r))
        out_attention[layer, module] = (a.to(dtype).contiguous(), (b * config.scale(False)).to(dtype).contiguous())
    out_experts = {}
    r_e = config.rank(True)
    for layer in sorted(expert_layers):
        for module in config.ffn_targets:
            parts = experts.get((layer, module), {})
            want = {(e, w) for e in range(num_experts) for w in "AB"}
            if set(parts) != want:
                raise AdapterError(f"layer {layer} {module}: expected lora_A and lora_B for experts 0..{num_experts - 1}"
                                   f", got {len(parts)} tensors")
            in_f, out_f = shapes[module]
            a = torch.stack([_checked(f"layer {layer} {module} expert {e} lora_A", parts[e, "A"], (r_e, in_f))
                             for e in range(num_experts)])
            b = torch.stack([_checked(f"layer {layer} {module} expert {e} lora_B", parts[e, "B"], (out_f, r_e))
                             for e in range(num_experts)])
            out_experts[layer, module] = (a.to(dtype).contiguous(), (b * config.scale(True)).to(dtype).contiguous())
    return MixLoRAWeights(config, out_attention, out_router, out_experts)


def write_mixlora(folder: Path | str, config: MixLoRAConfig, state: dict[str, torch.Tensor], *,
                  write_bin: bool = False) -> Path:
    """A MixLoRA folder from unscaled tensors under today's key names: safetensors (ours), and MoE-PEFT's
    `adapter_model.bin` too when asked (their loaders read only that)."""
    from safetensors.torch import save_file
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().float().contiguous() for k, v in state.items()}
    save_file(tensors, str(folder / SAFETENSORS_NAME))
    if write_bin:
        torch.save(tensors, str(folder / BIN_NAME))
    (folder / CONFIG_NAME).write_text(json.dumps(config.to_json(), indent=2))
    return folder


# ---- the float64-capable reference of the block and of the aux loss ---------------------------------------------

_ACT = {"silu": torch.nn.functional.silu, "relu": torch.relu, "gelu": torch.nn.functional.gelu,
        "gelu_new": lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
        "gelu_pytorch_tanh": lambda x: torch.nn.functional.gelu(x, approximate="tanh")}


def mass_before(sorted_p: torch.Tensor) -> torch.Tensor:
    """[.., E] probabilities sorted descending -> each one's mass of the experts ranked above it (an exclusive
    cumulative sum). MoE-PEFT keeps every expert whose cumulative mass is at most top_p and the first one past it:
    exactly those whose mass before is at most top_p (all of them when the total stays below top_p)."""
    total = sorted_p.cumsum(-1)
    return torch.cat([torch.zeros_like(total[..., :1]), total[..., :-1]], dim=-1)


def route(config: MixLoRAConfig, logits: torch.Tensor) -> torch.Tensor:
    """Router logits [T, E] -> per-token expert weights [T, E] (zero for experts not chosen)."""
    p = torch.softmax(logits, dim=-1)
    if config.routing_strategy == "mixlora":
        top, idx = torch.topk(p, config.top_k, dim=-1)
        return torch.zeros_like(p).scatter(-1, idx, top / top.sum(-1, keepdim=True))
    if config.temperature > 0:
        p = p / config.temperature
    sorted_p, idx = torch.sort(p, dim=-1, descending=True)
    keep = mass_before(sorted_p) <= config.top_p  # MoE-PEFT's _dynamic_top_p: up to the first past top_p
    return torch.zeros_like(p).scatter(-1, idx, torch.where(keep, sorted_p, torch.zeros_like(sorted_p)))


def ffn_reference(weights: MixLoRAWeights, layer: int, x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                  w_down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The MixLoRA FFN of `layer` for tokens x [T, hidden] over base weights (PyTorch [out, in] layout), token
    by token and expert by expert, in x's dtype (float64 for tests). -> (output [T, hidden], router logits)."""
    config = weights.config
    act = _ACT[config.act_fn]
    cast = {"dtype": x.dtype}
    logits = x @ weights.router[layer].to(**cast).T
    gates = route(config, logits)

    def delta(module: str, e: int, inp: torch.Tensor) -> torch.Tensor:
        if (layer, module) not in weights.experts:
            return torch.zeros(())
        a, b = weights.experts[layer, module]
        return inp @ a[e].to(**cast).T @ b[e].to(**cast).T
    out = torch.zeros_like(x)
    for e in range(config.num_experts):
        chosen = gates[:, e] != 0
        if not chosen.any():
            continue
        xe = x[chosen]
        h = act(xe @ w_gate.to(**cast).T + delta("gate_proj", e, xe)) * (xe @ w_up.to(**cast).T + delta("up_proj", e, xe))
        y = h @ w_down.to(**cast).T + delta("down_proj", e, h)
        out[chosen] += gates[chosen, e:e + 1] * y
    return out, logits


def aux_loss_reference(config: MixLoRAConfig, router_logits: torch.Tensor, coef: float) -> torch.Tensor:
    """MoE-PEFT's load-balance loss for one adapter: router logits of all layers' tokens stacked [N, E];
    coef · E · Σ_e f_e P_e with f_e the share of (token, slot) choices of expert e and P_e its mean
    probability (only P carries gradient)."""
    p = torch.softmax(router_logits, dim=-1)
    chosen = (route(config, router_logits) != 0).to(p.dtype)
    f = chosen.mean(0)
    return coef * config.num_experts * (f.detach() * p.mean(0)).sum()
