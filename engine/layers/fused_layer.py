"""A whole decoder layer in one kernel call for inference on CPU (engine/kernels/csrc/cpu_decoder_layer.cpp), taken
when every piece of the layer is one the kernel computes exactly as the module path would: streaming linears
(engine/quant/stream.py) with q/k/v and gate/up fused, the fused elementwise kernels (in bfloat16, and in float32
when the model's modules take them too: LlamaForCausalLM.use_float32_kernels) and the paged attention kernel over this step's rows. Otherwise, or when a wrapper on a
linear adds something this step (an adapter's rows), the layer runs its modules as usual. Either way the layer's
output is the same, bit for bit (tests/engine/test_fused_layer.py).

Wrappers around a base linear (adapters/lora_linear.py) opt in by defining `fused_lora()`: None when the kernel
cannot reproduce what the wrapper adds this step, else (the base module, None or the 8 tensors of the step's
`loraplex_cpu::lora_apply_` call for it). A wrapper module (MixLoRA's FFN) opts in with `passthrough_base()`: itself
while it computes the plain module's forward, else None. The engine never imports them.
"""
from __future__ import annotations

import weakref

import torch
from torch import nn

from loraplex.engine.kernels import cpu_kernels
from loraplex.engine.quant.stream import SWITCHES, StreamLinear

_DISABLED = {"value": False, "stack": False}
# layers computed by the one-call kernel since start, and steps whose layers all ran in one stack call (tests read them)
STATS = {"fused_calls": 0, "stack_calls": 0}
_ATTENTION_FORWARD = _MLP_FORWARD = None  # LlamaAttention.forward / LlamaMLP.forward, set by the model module


def register_module_forwards(attention_forward, mlp_forward) -> None:
    """engine/models/llama.py names the forwards this kernel reproduces (subclasses that override them opt out)."""
    global _ATTENTION_FORWARD, _MLP_FORWARD
    _ATTENTION_FORWARD, _MLP_FORWARD = attention_forward, mlp_forward


def set_enabled(enabled: bool, stack: bool = True) -> None:
    """Tests compare the fused call against the module path with this, and the whole-stack call against the fused
    layers one by one with `stack` (process-wide, not thread-safe)."""
    _DISABLED["value"], _DISABLED["stack"] = not enabled, not stack


_INELIGIBLE = (None, None)
LORA_ARGS = 8  # per module: a_pool, b_pool and lora_apply_'s six row tensors


def stream_base(module: nn.Module) -> tuple[StreamLinear | None, tuple | None]:
    """(the StreamLinear computing `module`'s base product, the LoRA kernel arguments of its rows this step or None);
    (None, None) when the module is not one the kernel reproduces."""
    if isinstance(module, StreamLinear):
        return module, None
    fused_lora = getattr(module, "fused_lora", None)
    found = fused_lora() if fused_lora is not None else None
    if found is None or not isinstance(found[0], StreamLinear):
        return _INELIGIBLE
    return found


def _group_args(members: list[StreamLinear]) -> tuple[list, int, int] | None:
    """[weight, scales, zeros, bias], kind, group size of siblings fused in one StreamGroup, in order; or of a single
    ungrouped linear. None when they are not laid out as the kernel expects."""
    first = members[0]
    if len(members) == 1:
        if first.group is not None:
            return None
        lin = first
    else:
        group = first.group
        if group is None or any(m.group is not group or m.index != i for i, m in enumerate(members)) \
                or len(group.sizes) != len(members):
            return None
        lin = group.linear
    return [lin.weight, lin.scales, lin.kernel_zeros, lin.bias], lin.kind, lin.group_size


def layer_args(layer: nn.Module) -> tuple[tuple, list] | None:
    """(the static arguments of decoder_layer, this step's LoRA arguments) for a LlamaDecoderLayer whose linears all
    stream, or None."""
    attn, mlp = layer.self_attn, layer.mlp
    if type(attn).forward is not _ATTENTION_FORWARD:
        return None
    if type(mlp).forward is not _MLP_FORWARD:  # a wrapper MLP (MixLoRA): only while it computes the plain FFN
        passthrough = getattr(mlp, "passthrough_base", None)
        if passthrough is None or passthrough() is not mlp:
            return None
    names = [(attn, "q_proj"), (attn, "k_proj"), (attn, "v_proj"), (attn, "o_proj"), (mlp, "gate_proj"),
             (mlp, "up_proj"), (mlp, "down_proj")]
    found = [stream_base(getattr(parent, name, None)) for parent, name in names]
    bases = [b for b, _ in found]
    if any(b is None for b in bases):
        return None
    loras = [lora for _, lora in found]
    lora_args = [] if all(lora is None for lora in loras) else [
        t for lora in loras for t in (lora if lora is not None else (None,) * LORA_ARGS)]
    key = (SWITCHES["count"], *(id(b) for b in bases))  # kinds and zero points change with set_act_int8
    cached = getattr(layer, "_fused_layer_cache", None)
    if cached is not None and cached[0] == key:
        return None if cached[1] is None else (cached[1], lora_args)
    parts = [_group_args(bases[0:3]), _group_args(bases[3:4]), _group_args(bases[4:6]), _group_args(bases[6:7])]
    args = None if any(p is None for p in parts) else tuple(x for p in parts for x in p)
    object.__setattr__(layer, "_fused_layer_cache", (key, args))
    return None if args is None else (args, lora_args)


def _step_fits(layer: nn.Module, x: torch.Tensor, cos: torch.Tensor, attn) -> bool:
    """Whether this step's rows are ones the kernel computes: inference on CPU in bfloat16 (or float32 with the
    float32 kernels), decode rows or short prefills the paged kernel takes (no long prefill, no packed rows)."""
    return not (_DISABLED["value"] or not (x.dtype == torch.bfloat16 or x.dtype == torch.float32
                                           and layer.float32_kernels)
                or x.device.type != "cpu" or torch.is_grad_enabled() or attn.kernel_lens is None or attn.prefills
                or attn.packed is not None or not cpu_kernels.loaded() or x.dim() != 2 or not x.is_contiguous()
                or cos.dtype != x.dtype)


def try_fused_layer(layer: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache,
                    batch) -> torch.Tensor | None:
    """The layer's output through the one-call kernel, or None when the module path must run."""
    if not _step_fits(layer, x, cos, batch.attn) or kv_cache is None or kv_cache.k.dtype != x.dtype:
        return None
    attn = batch.attn
    norm1, norm2 = layer.input_layernorm, layer.post_attention_layernorm
    if norm1.weight.dtype != x.dtype or norm2.weight.dtype != x.dtype:
        return None
    found = layer_args(layer)
    if found is None:
        return None
    args, lora = found
    if lora and any(lora[i] is not None and (lora[i].dtype != x.dtype or lora[i + 1].dtype != x.dtype)
                    for i in range(0, len(lora), LORA_ARGS)):
        return None  # pools in another dtype: the wrappers' torch path handles them
    a = layer.self_attn
    STATS["fused_calls"] += 1
    return torch.ops.loraplex_cpu.decoder_layer(
        x, cos, sin, norm1.weight, norm2.weight, norm1.eps, *args, a.num_heads, a.num_kv_heads, a.head_dim,
        a.scale, kv_cache.k, kv_cache.v, attn.kernel_slots, attn.kernel_rows, attn.kernel_lens,
        attn.sliding_window or 0, batch.slot_mapping, lora)


class _Stack:
    """A model's decoder layers as one DecoderStack (csrc/cpu_decoder_layer.cpp) and what it was built from."""

    def __init__(self, fingerprint: list, dtype: torch.dtype, switches: int, stack=None, checks: tuple = (),
                 sources: tuple = ()) -> None:
        self.fingerprint, self.dtype, self.switches = fingerprint, dtype, switches
        self.stack, self.checks, self.sources = stack, checks, sources


_STACKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # the layers' ModuleList -> _Stack
_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_ROWS = LORA_ARGS - 2  # of a module's LoRA arguments, those that change per step (after a_pool, b_pool)


def _fingerprint(layers: nn.ModuleList, kv_caches) -> list:
    """What a stack is built from, by identity: each layer's attention and MLP modules, its seven linears (or the
    wrappers around them) and its caches. A module swapped in anywhere (an adapter or trainer wrapper, MixLoRA's
    FFN, a requantized linear) changes it; so does a cache reallocated."""
    out = []
    for layer, cache in zip(layers, kv_caches):
        if cache is None:
            return []
        attn, mlp = layer._modules["self_attn"], layer._modules["mlp"]
        am, mm = attn._modules, mlp._modules
        out.append((layer, attn, mlp, am.get("q_proj"), am.get("k_proj"), am.get("v_proj"), am.get("o_proj"),
                    mm.get("gate_proj"), mm.get("up_proj"), mm.get("down_proj"), cache.k, cache.v))
    return out


def stack_parts(module: nn.Module) -> tuple | None:
    """(checks, lora, base) of a module in a layer's linear slot, for the whole-stack call: `checks`, callables that
    must all return True on a step for the call to stand in for the module; `lora`, None or (a_pool, b_pool, rows,
    module name) where `rows(name)` gives the step's six row tensors of the LoRA kernel for that name, None when no
    row adds anything there, False when the kernel cannot apply them; `base`, the StreamLinear computing the base
    product. None for a module that does not say (it never stands in a stack). Wrappers say with `stack_parts()`."""
    if isinstance(module, StreamLinear):
        return (), None, module
    parts = getattr(module, "stack_parts", None)
    return parts() if parts is not None else None


def _check_key(check) -> tuple:
    return id(getattr(check, "__self__", check)), getattr(check, "__func__", check)


def _build_stack(layers: nn.ModuleList, kv_caches, dtype: torch.dtype) -> tuple | None:
    """(the DecoderStack, the checks it relies on, the per-step LoRA row sources of its 7 slots), or None when some
    layer would not take the one-call kernel."""
    norms, eps, linears, kinds_groups, caches, pools, checks = [], [], [], [], [], [], {}
    sources: list = [None] * len(_LINEARS)  # per slot, (rows, name) shared by every layer's wrapper there
    shapes = None
    for layer, cache in zip(layers, kv_caches):
        attn, mlp = layer.self_attn, layer.mlp
        n1, n2 = layer.input_layernorm, layer.post_attention_layernorm
        if type(attn).forward is not _ATTENTION_FORWARD or cache is None or cache.k.dtype != dtype \
                or n1.weight.dtype != dtype or n2.weight.dtype != dtype or n1.eps != n2.eps:
            return None
        found = [stack_parts(getattr(parent, name, None)) for parent, name in
                 [(attn, n) for n in _LINEARS[:4]] + [(mlp, n) for n in _LINEARS[4:]]]
        if type(mlp).forward is not _MLP_FORWARD:  # a wrapper FFN (MixLoRA): only while it computes the plain one
            mlp_checks = getattr(mlp, "stack_checks", None)
            if mlp_checks is None:
                return None
            found.append((mlp_checks(), None, None))
        if any(f is None for f in found):
            return None
        for f in found:  # one call per distinct check (bound methods of one state object are equal, not identical)
            checks.update({_check_key(c): c for c in f[0]})
        for slot, (_, lora, _) in enumerate(found[:len(_LINEARS)]):
            if lora is None:
                pools += [None, None]
                continue
            a_pool, b_pool, rows, name = lora
            if sources[slot] is not None and (_check_key(sources[slot][0]) != _check_key(rows)
                                              or sources[slot][1] != name):
                return None
            if a_pool.dtype != dtype or b_pool.dtype != dtype:
                return None
            sources[slot] = (rows, name)
            pools += [a_pool, b_pool]
        bases = [f[2] for f in found[:len(_LINEARS)]]
        if not all(isinstance(b, StreamLinear) for b in bases):
            return None
        parts = [_group_args(bases[0:3]), _group_args(bases[3:4]), _group_args(bases[4:6]), _group_args(bases[6:7])]
        if any(p is None for p in parts):
            return None
        if shapes not in (None, (attn.num_heads, attn.num_kv_heads, attn.head_dim, attn.scale)):
            return None
        shapes = (attn.num_heads, attn.num_kv_heads, attn.head_dim, attn.scale)
        norms += [n1.weight, n2.weight]
        eps.append(n1.eps)
        for tensors, kind, group in parts:
            linears += tensors
            kinds_groups += [kind, group]
        caches += [cache.k, cache.v]
    if shapes is None:
        return None
    if all(src is None for src in sources):
        pools, sources = [], []
    stack = torch.classes.loraplex_cpu.DecoderStack(norms, eps, linears, kinds_groups, caches, pools, *shapes)
    return stack, tuple(checks.values()), tuple(sources)


_NO_ROWS = (None,) * LORA_ROWS


def _step_rows(sources: tuple) -> list | None:
    """This step's LoRA row tensors of the stack's 7 slots ([] when no slot has rows), or None when some slot's rows
    are ones the kernel cannot apply."""
    rows, any_rows = [], False
    for src in sources:
        got = None if src is None else src[0](src[1])
        if got is False:
            return None
        if got is None:
            rows += _NO_ROWS
        else:
            rows += got
            any_rows = True
    return rows if any_rows else []


def try_fused_stack(layers: nn.ModuleList, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_caches,
                    batch) -> torch.Tensor | None:
    """Every layer's output through one DecoderStack call, adapter rows included, when each layer would take the
    one-call kernel this step (every wrapper's checks hold and its rows are ones the LoRA kernel applies); else None
    (the layers run one by one). The stack is rebuilt whenever a module or cache it was built from changes, or a
    linear's kernel (set_act_int8)."""
    attn = batch.attn
    if _DISABLED["stack"] or not layers or not _step_fits(layers[0], x, cos, attn):
        return None
    fingerprint = _fingerprint(layers, kv_caches)
    cached = _STACKS.get(layers)
    if cached is None or cached.fingerprint != fingerprint or cached.dtype != x.dtype \
            or cached.switches != SWITCHES["count"]:
        built = _build_stack(layers, kv_caches, x.dtype) if fingerprint else None
        cached = _Stack(fingerprint, x.dtype, SWITCHES["count"], *(built or ()))
        _STACKS[layers] = cached  # a model that cannot stack is remembered too, until something in it changes
    if cached.stack is None or not all(check() for check in cached.checks):
        return None
    rows = _step_rows(cached.sources)
    if rows is None:
        return None
    STATS["stack_calls"] += 1
    STATS["fused_calls"] += len(layers)
    return cached.stack.forward(x, cos, sin, attn.kernel_slots, attn.kernel_rows, attn.kernel_lens,
                                attn.sliding_window or 0, batch.slot_mapping, rows)
