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


@dataclass(frozen=True, slots=True)
class LoRASpec:
    # the defaults a job gets when the client leaves them out: the sweep's pick (scripts/bench/
    # sweep_fine_tune_defaults.py; README "Fine-tuning defaults")
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    use_rslora: bool = False

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
                "use_rslora": self.use_rslora, "use_dora": False, "modules_to_save": None,
                "fan_in_fan_out": False, "init_lora_weights": True, "base_model_name_or_path": base_model_name}


class JobLoRA(nn.Module):
    """One job's trainable A [r, in] and B [out, r] for every (layer, target module), fp32 master weights."""

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

    def pair(self, layer: int, module: str) -> tuple[nn.Parameter, nn.Parameter] | None:
        k = key(layer, module)
        return (self.a[k], self.b[k]) if k in self.a else None

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors under PEFT's names (adapter_model.safetensors): fp32 copies on the CPU that later training
        steps leave alone (a snapshot of the best weights relies on that)."""
        out = {}
        for k, a in self.a.items():
            layer, module = k.split("_", 1)
            names = dict(layer=int(layer[1:]), parent=LORA_MODULES[module], module=module)
            out[PEFT_KEY.format(ab="A", **names)] = a.detach().to("cpu", torch.float32, copy=True)
            out[PEFT_KEY.format(ab="B", **names)] = self.b[k].detach().to("cpu", torch.float32, copy=True)
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


def key(layer: int, module: str) -> str:
    return f"L{layer}_{module}"  # ParameterDict keys cannot contain dots


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
    """Shared by every wrapper of one model; set by the trainer around a training forward, empty otherwise."""
    segments: list[TrainSegment] = field(default_factory=list)


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [num_tokens, in] -> [num_tokens, out]
        y = self.inner(x)
        if not self.state.segments:
            return y
        plan, params = [], []
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
            plan.append((seg.start, seg.end, seg.lora.scale, keep))
            params += pair
        if not plan:
            return y
        if y._base is not None or y.requires_grad and y.grad_fn is None:
            y = y.clone()  # a view of a sibling's fused output, or a leaf: take the deltas on a copy
        return SegmentLoRA.apply(y, x, plan, *params)

    def extra_repr(self) -> str:
        return f"layer={self.layer}, module={self.module_name}"


def attach_training(model: nn.Module, num_layers: int, modules: Iterable[str] = LORA_MODULES) -> TrainStepState:
    """Wrap every targetable linear of `model` (whatever module is there now) and return the shared state."""
    state = TrainStepState()
    for layer in range(num_layers):
        for module in modules:
            parent = model.get_submodule(f"model.layers.{layer}.{LORA_MODULES[module]}")
            setattr(parent, module, MultiLoRATrainLinear(getattr(parent, module), layer, module, state))
    return state
