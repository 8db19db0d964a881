"""A whole decoder layer in one kernel call for inference on CPU (engine/kernels/csrc/cpu_decoder_layer.cpp), taken
when every piece of the layer is one the kernel computes exactly as the module path would: streaming linears
(engine/quant/stream.py) with q/k/v and gate/up fused, the fused elementwise kernels (in bfloat16, and in float32
when the model's modules take them too: LlamaForCausalLM.use_float32_kernels) and the paged attention kernel over this step's rows. Otherwise, or when a wrapper on a
linear adds something this step (an adapter's rows), the layer runs its modules as usual. Either way the layer's
output is the same, bit for bit (tests/engine/test_fused_layer.py).

When every layer takes that call, the whole stack of layers runs as one (DecoderStack): the same kernels in the
same order, so the same bits again, without the per-layer Python.

Wrappers opt in by saying, once, what they are (`stack_parts()`, see stack_parts below): checks that must hold on a
step for the kernel to stand in for them, their LoRA pools and where a step's kernel rows come from (shared by
every layer's wrapper of a target module), and the StreamLinear under them. A wrapper FFN (MixLoRA's) says with
`stack_checks()` when it computes the plain FFN. Both paths build on that one description, cached per layer or
per stack by the identity of the modules it came from. The engine never imports the wrappers.
"""
from __future__ import annotations

import weakref

import torch
from torch import nn

from loraplex.engine.kernels import cpu_kernels
from loraplex.engine.quant.stream import SWITCHES, StreamLinear

_DISABLED = {"value": False, "stack": False, "lean": False}
# layers computed by the one-call kernel since start, and steps whose layers all ran in one stack call (tests read them)
STATS = {"fused_calls": 0, "stack_calls": 0}
_ATTENTION_FORWARD = _MLP_FORWARD = None  # LlamaAttention.forward / LlamaMLP.forward, set by the model module


def register_module_forwards(attention_forward, mlp_forward) -> None:
    """engine/models/llama.py names the forwards this kernel reproduces (subclasses that override them opt out)."""
    global _ATTENTION_FORWARD, _MLP_FORWARD
    _ATTENTION_FORWARD, _MLP_FORWARD = attention_forward, mlp_forward


def set_enabled(enabled: bool, stack: bool = True, lean: bool = True) -> None:
    """Tests compare the fused call against the module path with this, the whole-stack call against the fused
    layers one by one with `stack`, and the stack's lean path for decode batches against its per-operator one with
    `lean` (process-wide, not thread-safe)."""
    _DISABLED["value"], _DISABLED["stack"], _DISABLED["lean"] = not enabled, not stack, not lean


LORA_ARGS = 8  # per module: a_pool, b_pool and lora_apply_'s six row tensors
LORA_ROWS = LORA_ARGS - 2  # of a module's LoRA arguments, those that change per step (after a_pool, b_pool)
_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


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


def _step_fits(layer: nn.Module, x: torch.Tensor, cos: torch.Tensor, attn) -> bool:
    """Whether this step's rows are ones the kernel computes: inference on CPU in bfloat16 (or float32 with the
    float32 kernels), decode rows or short prefills the paged kernel takes (no long prefill, no packed rows)."""
    return not (_DISABLED["value"] or not (x.dtype == torch.bfloat16 or x.dtype == torch.float32
                                           and layer.float32_kernels)
                or x.device.type != "cpu" or torch.is_grad_enabled() or attn.kernel_lens is None or attn.prefills
                or attn.packed is not None or not cpu_kernels.loaded() or x.dim() != 2 or not x.is_contiguous()
                or cos.dtype != x.dtype)


def stack_parts(module: nn.Module) -> tuple | None:
    """(checks, lora, base) of a module in a layer's linear slot: `checks`, callables that must all return True on a
    step for the kernel to stand in for the module; `lora`, None or (a_pool, b_pool, rows, module name) where
    `rows(name)` gives the step's six row tensors of the LoRA kernel for that name, None when no row adds anything
    there, False when the kernel cannot apply them; `base`, the StreamLinear computing the base product. None for a
    module that does not say (it never runs in the kernel). Wrappers say with `stack_parts()`."""
    if isinstance(module, StreamLinear):
        return (), None, module
    parts = getattr(module, "stack_parts", None)
    return parts() if parts is not None else None


def _check_key(check) -> tuple:  # bound methods of one state object are equal, not identical
    return id(getattr(check, "__self__", check)), getattr(check, "__func__", check)


class LayerParts:
    """What the kernel needs of one decoder layer, read once from its modules: norms, the four streaming linears'
    [weight, scales, zeros, bias] + kind + group, caches, LoRA pools per slot (None where no adapter wrapper), the
    checks its wrappers rely on and, per slot, where a step's LoRA rows come from: (rows, name) or None."""

    def __init__(self, layer: nn.Module, cache, dtype: torch.dtype) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        n1, n2 = layer.input_layernorm, layer.post_attention_layernorm
        self.ok = False
        # a bfloat16 cache under float32: the kernel's attention runs in bfloat16, as attention.py's casts do
        cache_dtypes = (dtype, torch.bfloat16) if dtype == torch.float32 else (dtype,)
        if type(attn).forward is not _ATTENTION_FORWARD or cache is None or cache.k.dtype not in cache_dtypes \
                or n1.weight.dtype != dtype or n2.weight.dtype != dtype or n1.eps != n2.eps:
            return
        found = [stack_parts(getattr(parent, name, None)) for parent, name in
                 [(attn, n) for n in _LINEARS[:4]] + [(mlp, n) for n in _LINEARS[4:]]]
        if any(f is None for f in found) or not all(isinstance(f[2], StreamLinear) for f in found):
            return
        checks = {_check_key(c): c for f in found for c in f[0]}
        if type(mlp).forward is not _MLP_FORWARD:  # a wrapper FFN (MixLoRA): only while it computes the plain one
            mlp_checks = getattr(mlp, "stack_checks", None)
            if mlp_checks is None:
                return
            checks.update({_check_key(c): c for c in mlp_checks()})
        self.pools, self.sources = [], []
        for _, lora, _ in found:
            if lora is not None and (lora[0].dtype != dtype or lora[1].dtype != dtype):
                return  # pools in another dtype: the wrappers' torch path handles them
            self.pools += [None, None] if lora is None else [lora[0], lora[1]]
            self.sources.append(None if lora is None else (lora[2], lora[3]))
        bases = [f[2] for f in found]
        parts = [_group_args(bases[0:3]), _group_args(bases[3:4]), _group_args(bases[4:6]), _group_args(bases[6:7])]
        if any(p is None for p in parts):
            return
        self.linears = tuple(x for p in parts for x in p)  # decoder_layer's (tensors, kind, group) x 4
        self.norms, self.eps, self.caches = (n1.weight, n2.weight), n1.eps, (cache.k, cache.v)
        self.shapes = (attn.num_heads, attn.num_kv_heads, attn.head_dim, attn.scale)
        self.checks = checks
        self.ok = True


def _fingerprint(layer: nn.Module, cache) -> tuple:
    """What a layer's parts were read from, by identity: its attention and MLP modules, its seven linears (or the
    wrappers around them) and its caches. A module swapped in anywhere (an adapter or trainer wrapper, MixLoRA's
    FFN, a requantized linear) changes it; so does a cache reallocated."""
    attn, mlp = layer._modules["self_attn"], layer._modules["mlp"]
    am, mm = attn._modules, mlp._modules
    return (attn, mlp, am.get("q_proj"), am.get("k_proj"), am.get("v_proj"), am.get("o_proj"), mm.get("gate_proj"),
            mm.get("up_proj"), mm.get("down_proj"), None if cache is None else cache.k,
            None if cache is None else cache.v)


_LAYERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # layer -> (key, LayerParts)


def layer_parts(layer: nn.Module, cache, dtype: torch.dtype) -> LayerParts:
    """The layer's parts, rebuilt when a module or cache they came from changes, or a linear's kernel
    (set_act_int8: stream.SWITCHES)."""
    key = (_fingerprint(layer, cache), dtype, SWITCHES["count"])
    cached = _LAYERS.get(layer)
    if cached is None or cached[0] != key:
        cached = (key, LayerParts(layer, cache, dtype))
        _LAYERS[layer] = cached
    return cached[1]


_NO_ROWS = (None,) * LORA_ROWS


def _step_rows(sources) -> list | None:
    """This step's LoRA row tensors of the 7 slots ([] when no slot has rows), or None when some slot's rows are
    ones the kernel cannot apply."""
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


def try_fused_layer(layer: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache,
                    batch) -> torch.Tensor | None:
    """The layer's output through the one-call kernel, or None when the module path must run."""
    attn = batch.attn
    if not _step_fits(layer, x, cos, attn):
        return None
    parts = layer_parts(layer, kv_cache, x.dtype)
    if not parts.ok or not all(check() for check in parts.checks.values()):
        return None
    rows = _step_rows(parts.sources)
    if rows is None:
        return None
    lora = [] if not rows else [
        t for m in range(len(_LINEARS)) for t in (
            (parts.pools[2 * m], parts.pools[2 * m + 1], *rows[m * LORA_ROWS:(m + 1) * LORA_ROWS])
            if parts.pools[2 * m] is not None and rows[m * LORA_ROWS] is not None else (None,) * LORA_ARGS)]
    STATS["fused_calls"] += 1
    return torch.ops.loraplex_cpu.decoder_layer(
        x, cos, sin, *parts.norms, parts.eps, *parts.linears, *parts.shapes, *parts.caches, attn.kernel_slots,
        attn.kernel_rows, attn.kernel_lens, attn.sliding_window or 0, batch.slot_mapping, lora)


class _Stack:
    """A model's decoder layers as one DecoderStack (csrc/cpu_decoder_layer.cpp), what it relies on each step and
    what it was built from."""

    def __init__(self, key: tuple, stack=None, checks: tuple = (), sources: tuple = ()) -> None:
        self.key, self.stack, self.checks, self.sources = key, stack, checks, sources
        self.last: tuple | None = None  # (attention metadata, rows, norm weight) of the last step it ran


_STACKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # the layers' ModuleList -> _Stack


def _build_stack(layers: nn.ModuleList, kv_caches, dtype: torch.dtype) -> tuple:
    """(the DecoderStack, the checks it relies on, the per-step LoRA row sources of its 7 slots), or () when some
    layer would not take the one-call kernel, or the layers differ in shapes or in where their rows come from."""
    all_parts = [layer_parts(layer, cache, dtype) for layer, cache in zip(layers, kv_caches)]
    if not all_parts or not all(p.ok for p in all_parts) or len({p.shapes for p in all_parts}) != 1:
        return ()
    sources: list = [None] * len(_LINEARS)  # per slot, (rows, name) shared by every layer's wrapper there
    for parts in all_parts:
        for slot, src in enumerate(parts.sources):
            if src is None:
                continue
            if sources[slot] is not None and (_check_key(sources[slot][0]), sources[slot][1]) != \
                    (_check_key(src[0]), src[1]):
                return ()
            sources[slot] = src
    has_lora = any(src is not None for src in sources)
    stack = torch.classes.loraplex_cpu.DecoderStack(
        [n for p in all_parts for n in p.norms], [p.eps for p in all_parts],
        [t for p in all_parts for i in range(4) for t in p.linears[3 * i]],
        [v for p in all_parts for i in range(4) for v in p.linears[3 * i + 1:3 * i + 3]],
        [c for p in all_parts for c in p.caches], [t for p in all_parts for t in p.pools] if has_lora else [],
        *all_parts[0].shapes)
    checks = {k: c for p in all_parts for k, c in p.checks.items()}
    return stack, tuple(checks.values()), tuple(sources) if has_lora else ()


def try_fused_stack(layers: nn.ModuleList, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_caches,
                    batch, norm: nn.Module | None = None) -> torch.Tensor | None:
    """Every layer's output through one DecoderStack call, adapter rows included, when each layer would take the
    one-call kernel this step (every wrapper's checks hold and its rows are ones the LoRA kernel applies); else None
    (the layers run one by one). The stack is rebuilt whenever a module or cache it was built from changes, or a
    linear's kernel (set_act_int8). `norm`: the model's final norm, applied to the output: inside the call where its
    `kernel_weight(x)` says its forward would be the rms_norm kernel with that weight (the same bits, and one call
    fewer after the weight stream, where each small call runs from cold caches: scripts/bench/bench_cold_ops.py),
    else by calling it."""
    attn = batch.attn
    if batch.continued:  # a multi-step decode's later step: what held for the step before holds (same rows)
        cached = _STACKS.get(layers)
        if cached is not None and cached.last is not None and cached.last[0] is attn:
            _, rows, weight = cached.last
            return _run_stack(cached, layers, x, cos, sin, batch, rows, norm, weight)
    if _DISABLED["stack"] or not layers or not _step_fits(layers[0], x, cos, attn):
        return None
    key = (tuple(_fingerprint(layer, cache) for layer, cache in zip(layers, kv_caches)), x.dtype, SWITCHES["count"])
    cached = _STACKS.get(layers)
    if cached is None or cached.key != key:
        cached = _Stack(key, *_build_stack(layers, kv_caches, x.dtype))
        _STACKS[layers] = cached  # a model that cannot stack is remembered too, until something in it changes
    if cached.stack is None or not all(check() for check in cached.checks):
        return None
    rows = _step_rows(cached.sources)
    if rows is None:
        return None
    kernel_weight = getattr(norm, "kernel_weight", None)  # a norm without it: called after the stack
    weight = None if kernel_weight is None else kernel_weight(x)
    cached.last = (attn, rows, weight)
    return _run_stack(cached, layers, x, cos, sin, batch, rows, norm, weight)


def _run_stack(cached: _Stack, layers: nn.ModuleList, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch,
               rows: list, norm: nn.Module | None, weight: torch.Tensor | None) -> torch.Tensor:
    attn = batch.attn
    STATS["stack_calls"] += 1
    STATS["fused_calls"] += len(layers)
    out = cached.stack.forward(x, cos, sin, attn.kernel_slots, attn.kernel_rows, attn.kernel_lens,
                               attn.sliding_window or 0, batch.slot_mapping, rows, not _DISABLED["lean"],
                               weight, 0.0 if weight is None else norm.eps)
    return out if weight is not None or norm is None else norm(out)
