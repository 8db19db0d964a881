"""Trainable LoRA for several jobs in one forward pass (mLoRA / ASPEN design): each job owns its A/B
parameters; a wrapper around every targetable linear adds each job's delta to that job's rows only.

The wrappers sit around whatever is already there (the serving LoRALinear, a quantized or dense base),
so training runs through the very modules and frozen weights the engine serves from. Outside a
training step (no segments set, e.g. every inference step) a wrapper is a pass-through.
References: PEFT `tuners/lora/layer.py` (init: A kaiming-uniform a=sqrt(5), B zeros; scale alpha/r or
alpha/sqrt(r) with rsLoRA; dropout on the LoRA input only), mLoRA (multi-LoRA batch fusion).
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from loraplex.adapters.peft import LORA_MODULES, module_shapes

PEFT_KEY = "base_model.model.model.layers.{layer}.{parent}.{module}.lora_{ab}.weight"
MAX_TRAIN_RANK = 256
ALL_LINEAR = tuple(LORA_MODULES)


@dataclass(frozen=True, slots=True)
class LoRASpec:
    # the defaults a job gets when the client leaves them out: the sweep's pick (scripts/bench/
    # sweep_fine_tune_defaults.py; README "Fine-tuning defaults")
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    use_rslora: bool = False
    use_dora: bool = False  # DoRA (PEFT's use_dora): a trained magnitude per output channel beside A and B

    def __post_init__(self) -> None:
        if not 1 <= self.r <= MAX_TRAIN_RANK:
            raise ValueError(f"LoRA rank must be between 1 and {MAX_TRAIN_RANK}; got {self.r}")
        if not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise ValueError(f"lora_alpha must be a positive number; got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1); got {self.dropout}")
        unknown = [m for m in self.target_modules if m not in LORA_MODULES]
        if unknown or not self.target_modules:
            raise ValueError(f"target_modules must be a non-empty subset of {', '.join(LORA_MODULES)}; "
                             f"got {list(self.target_modules)}")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def peft_config(self, base_model_name: str | None = None) -> dict:
        """adapter_config.json as PEFT writes it (loadable by peft and vLLM unchanged)."""
        return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": self.r, "lora_alpha": self.alpha,
                "lora_dropout": self.dropout, "target_modules": list(self.target_modules), "bias": "none",
                "use_rslora": self.use_rslora, "use_dora": self.use_dora, "modules_to_save": None,
                "fan_in_fan_out": False, "init_lora_weights": True, "base_model_name_or_path": base_model_name}


class JobLoRA(nn.Module):
    """One job's trainable A [r, in] and B [out, r] for every (layer, target module), fp32 master weights; with
    DoRA also the magnitude m [out], set to the row norms of the base weight (PEFT's init: ‖W + s·B·A‖ with B = 0)
    by the first forward through each linear, which has the weight at hand."""

    def __init__(self, spec: LoRASpec, model_config, device: torch.device | str = "cpu", seed: int = 0) -> None:
        super().__init__()
        self.spec = spec
        self.scale = spec.scale
        shapes = module_shapes(model_config)
        gen = torch.Generator().manual_seed(seed)
        self.a, self.b = nn.ParameterDict(), nn.ParameterDict()
        for layer in range(model_config.num_hidden_layers):
            for module in spec.target_modules:
                in_f, out_f = shapes[module]
                a = torch.empty(spec.r, in_f)
                bound = 1.0 / math.sqrt(in_f)  # kaiming_uniform_(a=sqrt(5)) on [r, in], as nn.Linear and PEFT
                a.uniform_(-bound, bound, generator=gen)
                self.a[key(layer, module)] = nn.Parameter(a.to(device))
                self.b[key(layer, module)] = nn.Parameter(torch.zeros(out_f, spec.r, device=device))
        self.m = nn.ParameterDict({k: nn.Parameter(torch.zeros(self.b[k].shape[0], device=device))
                                   for k in self.a} if spec.use_dora else {})
        self.magnitude_ready: set[str] = set()

    def pair(self, layer: int, module: str) -> tuple[nn.Parameter, nn.Parameter] | None:
        k = key(layer, module)
        return (self.a[k], self.b[k]) if k in self.a else None

    def keep_layers(self, layers: range) -> None:
        keep_layers(self, layers)

    def magnitude(self, layer: int, module: str, base_weight) -> nn.Parameter | None:
        """DoRA's magnitude of this linear (None without DoRA); `base_weight()` gives W [out, in] for its init."""
        k = key(layer, module)
        m = self.m[k] if k in self.m else None
        if m is not None and k not in self.magnitude_ready:
            with torch.no_grad():
                m.copy_(torch.linalg.vector_norm(base_weight(), dim=1))
            self.magnitude_ready.add(k)
        return m

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors under PEFT's names (adapter_model.safetensors): fp32 copies on the CPU that later training
        steps leave alone (a snapshot of the best weights relies on that)."""
        out = {}
        for k, a in self.a.items():
            layer, module = k.split("_", 1)
            names = dict(layer=int(layer[1:]), parent=LORA_MODULES[module], module=module)
            out[PEFT_KEY.format(ab="A", **names)] = a.detach().to("cpu", torch.float32, copy=True)
            out[PEFT_KEY.format(ab="B", **names)] = self.b[k].detach().to("cpu", torch.float32, copy=True)
            if k in self.m:
                out[magnitude_key(**names)] = self.m[k].detach().to("cpu", torch.float32, copy=True)
        return out

    def load_peft_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, t in self.peft_state_dict().items():
                if name not in tensors or tensors[name].shape != t.shape:
                    raise ValueError(f"checkpoint lacks {name} of shape {tuple(t.shape)}")
            for k, a in self.a.items():
                layer, module = k.split("_", 1)
                names = dict(layer=int(layer[1:]), parent=LORA_MODULES[module], module=module)
                a.copy_(tensors[PEFT_KEY.format(ab="A", **names)])
                self.b[k].copy_(tensors[PEFT_KEY.format(ab="B", **names)])
                if k in self.m:
                    self.m[k].copy_(tensors[magnitude_key(**names)])
                    self.magnitude_ready.add(k)


def keep_layers(lora: nn.Module, layers: range) -> None:
    """Drop a job's parameters of the decoder layers outside `layers` (a pipeline stage holds its own only): every
    ParameterDict of a JobLoRA / JobMixLoRA is keyed L{layer}[_{module}]."""
    for params in lora.children():
        if isinstance(params, nn.ParameterDict):
            for k in [k for k in params if int(k.split("_", 1)[0][1:]) not in layers]:
                del params[k]


def magnitude_key(layer: int, parent: str, module: str) -> str:
    """PEFT's saved name of a DoRA magnitude (its state dict drops the module's `.weight`)."""
    return PEFT_KEY.format(layer=layer, parent=parent, module=module, ab="A").replace("lora_A.weight",
                                                                                   "lora_magnitude_vector")


def key(layer: int, module: str) -> str:
    return f"L{layer}_{module}"  # ParameterDict keys cannot contain dots


@dataclass(frozen=True, slots=True)
class MixLoRASpec(LoRASpec):
    """A MixLoRA job (MoE-PEFT's MixLoRA): LoRA on the attention targets, and in every FFN `num_experts` LoRA
    experts over the frozen FFN on the FFN targets, a router per layer and the load-balance loss
    (shared/research/mixlora-and-mlora.md §1). Defaults are MoE-PEFT's template (r 16, alpha 32, every linear,
    8 experts, top-2) except `router_aux_loss_coef`: 0.01 as the paper and the MixLoRA README (MoE-PEFT's code
    falls back to 0.001 when a config leaves it out)."""
    target_modules: tuple[str, ...] = ALL_LINEAR
    num_experts: int = 8
    top_k: int = 2
    routing_strategy: str = "mixlora"  # or "mixlora-dynamic" (top-p)
    top_p: float = 0.8
    temperature: float = 0.0
    router_aux_loss_coef: float = 0.01
    router_init_range: float = 0.02
    jitter_noise: float = 0.0
    expert_r: int = 0  # 0: r
    expert_alpha: float = 0.0  # 0: alpha

    def __post_init__(self) -> None:
        LoRASpec.__post_init__(self)
        from loraplex.adapters.mixlora import FFN, MAX_EXPERTS, STRATEGIES
        checks = [(self.routing_strategy in STRATEGIES, (f"routing_strategy must be one of {', '.join(STRATEGIES)}"
                                                          " (mixlora-switch is not trained: its reference inference "
                                                          "skips the experts)")),
                  (1 <= self.num_experts <= MAX_EXPERTS, f"num_experts must be between 1 and {MAX_EXPERTS}"),
                  (self.routing_strategy != "mixlora" or 1 <= self.top_k <= self.num_experts,
                   "top_k must be between 1 and num_experts"),
                  (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
                  (0 <= self.temperature <= 100, "temperature must be in [0, 100]"),
                  (0 <= self.router_aux_loss_coef <= 10, "router_aux_loss_coef must be in [0, 10]"),
                  (0 < self.router_init_range <= 10, "router_init_range must be in (0, 10]"),
                  (0 <= self.jitter_noise < 1, "jitter_noise must be in [0, 1)"),
                  (0 <= self.expert_r <= MAX_TRAIN_RANK, f"expert r must be between 1 and {MAX_TRAIN_RANK}"),
                  (self.expert_alpha >= 0 and math.isfinite(self.expert_alpha), "expert lora_alpha must be positive"),
                  (not self.use_dora, "use_dora applies to type lora (a MixLoRA with DoRA experts is not served)"),
                  (bool(set(self.target_modules) & set(FFN)),
                   "a MixLoRA needs experts: target_modules must include gate_proj, up_proj or down_proj")]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def expert_rank(self) -> int:
        return self.expert_r or self.r

    @property
    def expert_scale(self) -> float:
        alpha = self.expert_alpha or self.alpha
        return alpha / (math.sqrt(self.expert_rank) if self.use_rslora else self.expert_rank)

    def mixlora_config(self, base_model_name: str | None = None):
        from loraplex.adapters.mixlora import MixLoRAConfig
        # MoE-PEFT's and the mixlora package's loaders assert lora_dropout > 0; inference never applies it
        return MixLoRAConfig(r=self.r, lora_alpha=self.alpha, target_modules=self.target_modules,
                             routing_strategy=self.routing_strategy, num_experts=self.num_experts, act_fn="silu",
                             top_k=self.top_k, top_p=self.top_p, temperature=self.temperature,
                             use_rslora=self.use_rslora, expert_r=self.expert_r, expert_alpha=self.expert_alpha,
                             base_model_name_or_path=base_model_name,
                             extra={"lora_dropout": self.dropout if self.dropout > 0 else 0.05})

    def peft_config(self, base_model_name: str | None = None) -> dict:
        """adapter_config.json as MoE-PEFT exports it (loadable by MoE-PEFT, the mixlora package and loraplex)."""
        return self.mixlora_config(base_model_name).to_json()


LORA_TYPES = ("lora", "mixlora")
MIXLORA_ONLY = {"num_experts", "top_k", "routing_strategy", "top_p", "temperature", "router_aux_loss_coef",
                "router_init_range", "jitter_noise", "expert_r", "expert_alpha"}


def spec_type(given: dict) -> type[LoRASpec]:
    """The spec class a job's `lora` settings name with `type` ("lora", the default, or "mixlora")."""
    kind = given.get("type", "lora")
    if kind not in LORA_TYPES:
        raise ValueError(f"lora.type must be one of {', '.join(LORA_TYPES)}; got {kind!r}")
    return MixLoRASpec if kind == "mixlora" else LoRASpec


def spec_field_names(given: dict) -> list[str]:
    from dataclasses import fields
    return [f.name for f in fields(spec_type(given))]


def make_spec(given: dict) -> LoRASpec:
    """A LoRASpec or MixLoRASpec from a job's `lora` settings (its spec fields; `type`, and MixLoRA's
    `expert_lora` {r, lora_alpha} as MoE-PEFT spells the expert overrides)."""
    cls = spec_type(given)
    misplaced = sorted(set(given) & (MIXLORA_ONLY | {"expert_lora"})) if cls is LoRASpec else []
    if misplaced:
        raise ValueError(f"{', '.join(misplaced)} apply to type mixlora (this job's lora.type is lora)")
    args = {k: v for k, v in given.items() if k in spec_field_names(given)}
    if "target_modules" in args:
        args["target_modules"] = tuple(args["target_modules"])
    expert = given.get("expert_lora")
    if expert is not None:
        if cls is not MixLoRASpec or not isinstance(expert, dict) or set(expert) - {"r", "lora_alpha"}:
            raise ValueError("expert_lora takes {r, lora_alpha} and applies to type mixlora")
        args.setdefault("expert_r", int(expert.get("r", 0)))
        args.setdefault("expert_alpha", float(expert.get("lora_alpha", 0.0)))
    return cls(**args)


class JobMixLoRA(nn.Module):
    """One MixLoRA job's trainable weights, fp32 masters: attention A/B as JobLoRA (`pair` serves them to the
    linear wrappers, and nothing for the FFN linears: the experts run in the FFN wrapper), per layer the router
    W_g [E, hidden] ~ N(0, router_init_range²), and per (layer, FFN target) experts A [E, r_e, in]
    (kaiming-uniform each) and B [E, out, r_e] (zeros): at step 0 every expert is the base FFN."""

    def __init__(self, spec: MixLoRASpec, model_config, device: torch.device | str = "cpu", seed: int = 0) -> None:
        super().__init__()
        from loraplex.adapters.mixlora import ATTENTION, FFN
        self.spec = spec
        self.scale, self.expert_scale = spec.scale, spec.expert_scale
        self.attention_targets = tuple(m for m in spec.target_modules if m in ATTENTION)
        self.ffn_targets = tuple(m for m in spec.target_modules if m in FFN)
        shapes = module_shapes(model_config)
        gen = torch.Generator().manual_seed(seed)
        self.a, self.b = nn.ParameterDict(), nn.ParameterDict()
        self.router = nn.ParameterDict()
        self.ea, self.eb = nn.ParameterDict(), nn.ParameterDict()
        num_experts, r_e = spec.num_experts, spec.expert_rank
        for layer in range(model_config.num_hidden_layers):
            for module in self.attention_targets:
                in_f, out_f = shapes[module]
                bound = 1.0 / math.sqrt(in_f)
                self.a[key(layer, module)] = nn.Parameter(torch.empty(spec.r, in_f).uniform_(
                    -bound, bound, generator=gen).to(device))
                self.b[key(layer, module)] = nn.Parameter(torch.zeros(out_f, spec.r, device=device))
            self.router[f"L{layer}"] = nn.Parameter(torch.empty(num_experts, model_config.hidden_size).normal_(
                0, spec.router_init_range, generator=gen).to(device))
            for module in self.ffn_targets:
                in_f, out_f = shapes[module]
                bound = 1.0 / math.sqrt(in_f)
                self.ea[key(layer, module)] = nn.Parameter(torch.empty(num_experts, r_e, in_f).uniform_(
                    -bound, bound, generator=gen).to(device))
                self.eb[key(layer, module)] = nn.Parameter(torch.zeros(num_experts, out_f, r_e, device=device))

    def pair(self, layer: int, module: str) -> tuple[nn.Parameter, nn.Parameter] | None:
        k = key(layer, module)
        return (self.a[k], self.b[k]) if k in self.a else None

    def experts(self, layer: int, module: str) -> tuple[nn.Parameter, nn.Parameter] | None:
        k = key(layer, module)
        return (self.ea[k], self.eb[k]) if k in self.ea else None

    def keep_layers(self, layers: range) -> None:
        keep_layers(self, layers)

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors under MoE-PEFT's MixLoRA names: fp32 CPU copies."""
        def copy(t: torch.Tensor) -> torch.Tensor:
            return t.detach().to("cpu", torch.float32, copy=True)
        out = {}
        for k, a in self.a.items():
            layer, module = k.split("_", 1)
            prefix = f"mixlora.layers.{layer[1:]}.self_attn.{module}"
            out[f"{prefix}.lora_A.weight"], out[f"{prefix}.lora_B.weight"] = copy(a), copy(self.b[k])
        for k, w in self.router.items():
            out[f"mixlora.layers.{k[1:]}.mlp.moe_gate.weight"] = copy(w)
        for k, a in self.ea.items():
            layer, module = k.split("_", 1)
            for e in range(a.shape[0]):
                prefix = f"mixlora.layers.{layer[1:]}.mlp.{module}.experts.{e}"
                out[f"{prefix}.lora_A.weight"], out[f"{prefix}.lora_B.weight"] = copy(a[e]), copy(self.eb[k][e])
        return out

    def load_peft_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        mine = self.peft_state_dict()
        for name, t in mine.items():
            if name not in tensors or tensors[name].shape != t.shape:
                raise ValueError(f"checkpoint lacks {name} of shape {tuple(t.shape)}")
        with torch.no_grad():
            for k, a in self.a.items():
                layer, module = k.split("_", 1)
                prefix = f"mixlora.layers.{layer[1:]}.self_attn.{module}"
                a.copy_(tensors[f"{prefix}.lora_A.weight"])
                self.b[k].copy_(tensors[f"{prefix}.lora_B.weight"])
            for k, w in self.router.items():
                w.copy_(tensors[f"mixlora.layers.{k[1:]}.mlp.moe_gate.weight"])
            for k, a in self.ea.items():
                layer, module = k.split("_", 1)
                for e in range(a.shape[0]):
                    prefix = f"mixlora.layers.{layer[1:]}.mlp.{module}.experts.{e}"
                    a[e].copy_(tensors[f"{prefix}.lora_A.weight"])
                    self.eb[k][e].copy_(tensors[f"{prefix}.lora_B.weight"])


def make_job_lora(spec: LoRASpec, model_config, device: torch.device | str = "cpu", seed: int = 0) -> nn.Module:
    if isinstance(spec, MixLoRASpec):
        return JobMixLoRA(spec, model_config, device, seed)
    return JobLoRA(spec, model_config, device, seed)


@dataclass(slots=True)
class TrainSegment:
    """Rows [start, end) of the flattened training batch belong to one job."""
    start: int
    end: int
    lora: JobLoRA
    # seeds this segment's dropout masks with (layer, module): the same masks whether the job trains alone or
    # batched, and again when gradient checkpointing recomputes a layer; None: no dropout (evaluation)
    dropout_seed: int | None = None


@dataclass(slots=True)
class TrainStepState:
    """Shared by every wrapper of one model; set by the trainer around a training forward, empty otherwise.
    `router_stats[(id(job lora), layer)]` = (job lora, probability sums [E] (with their graph), choices per
    expert [E], tokens): what the MixLoRA FFN wrapper saw in the last forward of that layer, for the
    load-balance loss (trainer/mixlora_train.py)."""
    segments: list[TrainSegment] = field(default_factory=list)
    router_stats: dict = field(default_factory=dict)
    jitter: bool = False  # training forward: MixLoRA jobs' jitter noise applies (never in evaluation)

    def idle(self) -> bool:
        """No training step's rows are set: every wrapper passes through."""
        return not self.segments


class SegmentLoRA(torch.autograd.Function):
    """y[rows of segment i] += (keep_i * x[rows]) @ A_i^T * scale_i @ B_i^T, in place; other rows unchanged.

    One autograd node per module call for all of a step's jobs, with a hand-written backward of plain
    matmuls. y (the base layer's fresh output, which no base op saves; autograd would refuse the backward if
    one did) takes the deltas in place through addmm_, and y's gradient passes through unchanged: no delta
    tensor, zero fill or full-size add per module (slicing rows out of y and concatenating them back cost
    ~15% of a step on CPU, the separate delta and add another ~5%). A and B are cast to the compute dtype
    once per call, and the backward reuses those casts."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, x: torch.Tensor, plan: list, *params: torch.Tensor) -> torch.Tensor:
        # plan: per segment (start, end, scale, keep mask [rows, in] or None); params: A_0, B_0, A_1, B_1, ...
        hs, cast = [], []
        for i, (start, end, scale, keep) in enumerate(plan):
            a, b = params[2 * i].to(x.dtype), params[2 * i + 1].to(x.dtype)
            xs = x[start:end] if keep is None else x[start:end] * keep
            h = (xs @ a.t()).mul_(scale)  # [rows, r]
            y[start:end].addmm_(h, b.t())
            hs.append(h)
            cast += [a, b]
        ctx.mark_dirty(y)
        ctx.plan = plan
        ctx.param_dtypes = [p.dtype for p in params]
        ctx.save_for_backward(x, *hs, *cast)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        plan = ctx.plan
        x, *rest = ctx.saved_tensors
        hs, cast = rest[:len(plan)], rest[len(plan):]
        grad_x = None
        if ctx.needs_input_grad[1]:
            grad_x = torch.empty_like(x)
            covered = 0
        grads = []
        for i, (start, end, scale, keep) in enumerate(plan):
            a, b = cast[2 * i], cast[2 * i + 1]
            g = grad[start:end]  # [rows, out]
            grad_b = g.t() @ hs[i]  # [out, r]
            gh = (g @ b).mul_(scale)  # [rows, r]
            xs = x[start:end] if keep is None else x[start:end] * keep
            grad_a = gh.t() @ xs  # [r, in]
            if grad_x is not None:
                if start > covered:
                    grad_x[covered:start].zero_()
                torch.mm(gh, a, out=grad_x[start:end])
                if keep is not None:
                    grad_x[start:end].mul_(keep)
                covered = end
            grads += [grad_a.to(ctx.param_dtypes[2 * i]), grad_b.to(ctx.param_dtypes[2 * i + 1])]
        if grad_x is not None and covered < x.shape[0]:
            grad_x[covered:].zero_()
        return (grad, grad_x, None, *grads)


class MultiLoRATrainLinear(nn.Module):
    def __init__(self, inner: nn.Module, layer: int, module_name: str, state: TrainStepState) -> None:
        super().__init__()
        self.inner = inner
        self.layer, self.module_name = layer, module_name
        self.module_index = list(LORA_MODULES).index(module_name)
        self.state = state

    def stack_parts(self) -> tuple | None:
        """For the engine's one-call layer and stack (engine/layers/fused_layer.py's stack_parts): what the wrapped
        module says, with this wrapper's own check (no training step's rows set); None when it cannot say."""
        inner = getattr(self.inner, "stack_parts", None)
        if inner is not None:
            parts = inner()
        else:
            parts = ((), None, self.inner) if self.inner.__class__.__name__ == "StreamLinear" else None
        return None if parts is None else ((self.state.idle, *parts[0]), parts[1], parts[2])

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [num_tokens, in] -> [num_tokens, out]
        y = self.inner(x)
        if not self.state.segments:
            return y
        plan, params, dora = [], [], []
        for seg in self.state.segments:
            pair = seg.lora.pair(self.layer, self.module_name)
            if pair is None:
                continue
            keep, p = None, seg.lora.spec.dropout
            if p > 0 and seg.dropout_seed is not None:
                gen = torch.Generator(x.device).manual_seed(
                    (seg.dropout_seed * 1_000_003 + self.layer * 16 + self.module_index) % 2**63)
                keep = torch.empty((seg.end - seg.start, x.shape[1]), dtype=torch.float32, device=x.device)
                keep = (keep.bernoulli_(1 - p, generator=gen) / (1 - p)).to(x.dtype)
            if seg.lora.spec.use_dora:
                dora.append((seg, pair, keep))
                continue
            plan.append((seg.start, seg.end, seg.lora.scale, keep))
            params += pair
        if not plan and not dora:
            return y
        if y._base is not None or y.requires_grad and y.grad_fn is None:
            y = y.clone()  # a view of a sibling's fused output, or a leaf: take the deltas on a copy
        if plan:
            y = SegmentLoRA.apply(y, x, plan, *params)
        return self._dora(y, x, dora) if dora else y

    def _dora(self, y: torch.Tensor, x: torch.Tensor, segments: list) -> torch.Tensor:
        """DoRA jobs' rows, as PEFT's DoraLinearLayer computes them in training: with W the base weight, b its bias
        and the norm detached, y + (m / ‖W + s·B·A‖ - 1) · W·x' + (m / ‖W + s·B·A‖) · s·B·A·x' where x' is the
        dropped-out input (W·x' is y - b without dropout). Plain autograd ops, rows reassembled out of place."""
        from loraplex.adapters.dora import dense_weight
        base = getattr(self.inner, "base", self.inner)  # the serving LoRALinear's base, or the base itself
        bias = getattr(base, "bias", None)
        weight: list[torch.Tensor] = []

        def base_weight() -> torch.Tensor:  # W [out, in] float32, read once per call
            if not weight:
                weight.append(dense_weight(base, x.dtype, x.device))
            return weight[0]

        pieces, at = [], 0
        for seg, (a, b), keep in sorted(segments, key=lambda item: item[0].start):
            m = seg.lora.magnitude(self.layer, self.module_name, base_weight)
            s = seg.lora.scale
            with torch.no_grad():
                norm = torch.linalg.vector_norm(base_weight() + s * (b.float() @ a.float()), dim=1)
            mns = (m / norm).to(x.dtype)
            rows = y[seg.start:seg.end]
            xs = x[seg.start:seg.end] if keep is None else x[seg.start:seg.end] * keep
            if keep is None:
                base_rows = rows if bias is None else rows - bias
            else:
                base_rows = xs @ base_weight().to(x.dtype).t()
            lora = (xs @ a.to(x.dtype).t()) @ b.to(x.dtype).t() * s
            pieces += [y[at:seg.start], rows + (mns - 1) * base_rows + mns * lora]
            at = seg.end
        pieces.append(y[at:])
        return torch.cat(pieces)

    def extra_repr(self) -> str:
        return f"layer={self.layer}, module={self.module_name}"


def attach_training(model: nn.Module, layers: int | Iterable[int], modules: Iterable[str] = LORA_MODULES
                    ) -> TrainStepState:
    """Wrap every targetable linear of `model`'s decoder layers (all `layers` of them, or those listed: a
    pipeline stage's), whatever module is there now, and return the shared state (MixLoRA jobs also need
    trainer/mixlora_train.py's attach_moe_training)."""
    state = TrainStepState()
    for layer in range(layers) if isinstance(layers, int) else layers:
        for module in modules:
            parent = model.get_submodule(f"model.layers.{layer}.{LORA_MODULES[module]}")
            setattr(parent, module, MultiLoRATrainLinear(getattr(parent, module), layer, module, state))
    return state
