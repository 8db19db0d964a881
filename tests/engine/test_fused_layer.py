"""The one-call decoder layer (engine/layers/fused_layer.py, csrc/cpu_decoder_layer.cpp) against the module path it
replaces: the same greedy tokens bit for bit, alone and batched, with adapters in the batch (whose steps take the
module path) and without."""
from __future__ import annotations

import time

import pytest
import torch

from loraplex.engine.core.sampling_params import SamplingParams
from loraplex.engine.engine_args import EngineArgs
from loraplex.engine.kernels import cpu_kernels
from loraplex.engine.layers import fused_layer
from loraplex.engine.quant.stream import lane_u8_kind

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="CPU kernels unavailable")
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.fixture
def fused_switch():
    yield fused_layer.set_enabled
    fused_layer.set_enabled(True)


def generate(engine, prompts) -> list[list[int]]:
    out: dict[str, list[int]] = {}
    ids = [f"r{i}-{time.monotonic_ns()}" for i in range(len(prompts))]
    for rid, p in zip(ids, prompts):
        engine.add_request(rid, p, GREEDY)
    while engine.has_unfinished_requests():
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(o.token_ids)
    return [out[rid] for rid in ids]


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_fused_layer_gives_the_module_paths_tokens(default_model_dir, fused_switch, dtype):
    """float32 with streaming linears takes the elementwise kernels in its module path too (use_float32_kernels)."""
    from loraplex.engine.llm_engine import LLMEngine
    engine = LLMEngine.from_engine_args(EngineArgs(model=default_model_dir, dtype=dtype, cpu_linear="stream",
                                                   max_num_seqs=4, kv_cache_memory_bytes=64 << 20))
    assert engine.runner.model.model.layers[0].float32_kernels == (dtype == "float32")
    prompts = [engine.tokenizer.encode(t) for t in ("The capital of France is", "def fibonacci(n):", "Dear Sir,")]
    results = {}
    for mode in ("modules", "layers", "stack"):  # the module path, the one-call layers one by one, all in one call
        fused_switch(mode != "modules", stack=mode == "stack")
        before, stacks = fused_layer.STATS["fused_calls"], fused_layer.STATS["stack_calls"]
        results[mode] = (generate(engine, prompts), [generate(engine, [p])[0] for p in prompts])
        assert (fused_layer.STATS["fused_calls"] > before) == (mode != "modules")
        # every step is one stack call, batched and alone (short prompts: their prefills take the paged kernel too)
        assert fused_layer.STATS["stack_calls"] - stacks == (4 * GREEDY.max_tokens if mode == "stack" else 0)
    assert results["stack"] == results["layers"] == results["modules"]
    assert results["stack"][0] == results["stack"][1]  # batched == alone
    if dtype == "float32":  # per model: another engine in this process keeps float32's parity mode
        parity = LLMEngine.from_engine_args(EngineArgs(model=default_model_dir, dtype=dtype, cpu_linear="onednn",
                                                       max_num_seqs=4, kv_cache_memory_bytes=64 << 20))
        assert not any(getattr(m, "float32_kernels", False) for m in parity.runner.model.modules())



def test_a_bfloat16_cache_under_float32_fuses_and_keeps_the_module_paths_tokens(default_model_dir, fused_switch):
    """--kv-cache-dtype bfloat16 on a float32 model: half the cache bytes (twice the blocks in the same memory),
    attention in bfloat16 on every path (the module path's casts, the one-call layer's, the stack's lean copies),
    the same tokens on all of them, alone and batched, and close to the float32 cache's."""
    from loraplex.engine.llm_engine import LLMEngine

    def engine_with(kv: str):
        return LLMEngine.from_engine_args(EngineArgs(model=default_model_dir, dtype="float32", cpu_linear="stream",
                                                     max_num_seqs=4, kv_cache_memory_bytes=64 << 20,
                                                     kv_cache_dtype=kv))
    engine, plain = engine_with("bfloat16"), engine_with("auto")
    assert engine.runner.kv_caches[0].k.dtype == torch.bfloat16 and plain.runner.kv_caches[0].k.dtype == torch.float32
    assert engine.runner.num_blocks == 2 * plain.runner.num_blocks
    prompts = [engine.tokenizer.encode(t) for t in ("The capital of France is", "def fibonacci(n):", "Dear Sir,")]
    results = {}
    for mode in ("modules", "layers", "stack"):
        fused_switch(mode != "modules", stack=mode == "stack")
        stacks = fused_layer.STATS["stack_calls"]
        results[mode] = (generate(engine, prompts), [generate(engine, [p])[0] for p in prompts])
        assert fused_layer.STATS["stack_calls"] - stacks == (4 * GREEDY.max_tokens if mode == "stack" else 0)
    assert results["stack"] == results["layers"] == results["modules"]
    assert results["stack"][0] == results["stack"][1]
    fused_switch(True)
    reference = generate(plain, prompts)
    same = sum(a == b for got, want in zip(results["stack"][0], reference) for a, b in zip(got, want))
    assert same >= 0.75 * sum(len(r) for r in reference)
    with pytest.raises(ValueError, match="kv-cache-dtype"):
        EngineArgs(kv_cache_dtype="float16")

@pytest.mark.parametrize("bits", [8, 4])
def test_gptq_layers_with_int8_activations_fuse_and_keep_their_tokens(tmp_path, default_model_dir, fused_switch,
                                                                      bits):
    from loraplex.engine.llm_engine import LLMEngine
    from loraplex.engine.quant.gptq import export_gptq
    from loraplex.engine.quant.stream import StreamLinear
    from tests.adapters.peft_factory import make_tiny_model

    folder = export_gptq(make_tiny_model(tmp_path / "tiny", default_model_dir), tmp_path / "q", bits=bits,
                         group_size=64)
    engine = LLMEngine.from_engine_args(EngineArgs(model=str(folder), dtype="float32", quantization="gptq",
                                                   max_num_seqs=4, kv_cache_memory_bytes=16 << 20))
    streamed = [m for m in engine.runner.model.modules() if isinstance(m, StreamLinear) and m.bits == bits]
    assert streamed and all(m.act_int8 for m in streamed)  # the default: int8 activations
    computing = {id(m.group.linear if m.group is not None else m): m.group.linear if m.group is not None else m
                 for m in streamed}.values()
    assert all(lin.kernel_zeros.numel() == 1 for lin in computing)  # symmetric: one zero point per linear
    prompts = [[(17 * j + 3 * k) % 40000 + 100 for k in range(5 + 2 * j)] for j in range(3)]
    results = {}
    for enabled in (False, True):
        fused_switch(enabled)
        before = fused_layer.STATS["fused_calls"]
        results[enabled] = (generate(engine, prompts), [generate(engine, [p])[0] for p in prompts])
        assert (fused_layer.STATS["fused_calls"] > before) == enabled
    assert results[True] == results[False]
    assert results[True][0] == results[True][1]  # batched == alone
    layer = engine.runner.model.model.layers[0]
    cache = engine.runner.kv_caches[0]
    kinds = lambda: {fused_layer.layer_parts(layer, cache, torch.float32).linears[3 * i + 1] for i in range(4)}
    assert kinds() == {lane_u8_kind() if bits == 8 else 8}  # int8 activations, codes in channel lanes (7 or 9)
    for m in streamed:  # back to exact weight-only products: the cached kernel arguments follow
        m.set_act_int8(False)
    assert kinds() == {1 if bits == 8 else 2}
    fused_switch(True)
    assert generate(engine, prompts[:1]) == [generate(engine, [p])[0] for p in prompts[:1]]


def _stacks():
    return [st.stack for st in fused_layer._STACKS.values() if st.stack is not None]


@pytest.mark.parametrize("model", ["bfloat16", "float32", "gptq-4bit"])
def test_the_stacks_lean_path_gives_the_per_operator_paths_bits(tmp_path, default_model_dir, fused_switch, model,
                                                                monkeypatch):
    """A decode batch without adapter rows runs every layer on the stack's own buffers, calling the kernels on raw
    pointers (cpu_layer_parts.h); its logprobs are the per-operator stack's to the last bit, batched and alone
    (beside a 40-token prompt, whose prefill runs the modules). The model's final norm, folded into the stack call,
    gives the bits of the norm module called after it."""
    from loraplex.engine.llm_engine import LLMEngine
    from loraplex.engine.models.llama import RMSNorm
    from loraplex.engine.quant.gptq import export_gptq
    from tests.adapters.peft_factory import make_tiny_model

    path, dtype, extra = default_model_dir, model, {}
    if model == "gptq-4bit":
        path = str(export_gptq(make_tiny_model(tmp_path / "tiny", default_model_dir), tmp_path / "q", bits=4,
                               group_size=64))
        dtype, extra = "float32", {"quantization": "gptq"}
    engine = LLMEngine.from_engine_args(EngineArgs(model=path, dtype=dtype, cpu_linear="stream", max_num_seqs=4,
                                                   kv_cache_memory_bytes=32 << 20, **extra))
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=3)
    prompts = [[(17 * j + 3 * k) % 40000 + 100 for k in range(5 + 2 * j)] for j in range(3)] + [list(range(100, 140))]

    def run(batch):
        out: dict[str, list] = {}
        ids = [f"r{i}-{time.monotonic_ns()}" for i in range(len(batch))]
        for rid, p in zip(ids, batch):
            engine.add_request(rid, p, params)
        while engine.has_unfinished_requests():
            for o in engine.step():
                out.setdefault(o.request_id, []).append((o.token_ids, [repr(lp) for lp in o.logprobs or ()]))
        return [out[rid] for rid in ids]

    run(prompts[:1])  # builds the stack
    results, taken = {}, {}
    for lean in (True, False):
        fused_switch(True, lean=lean)
        before = sum(stack.lean_calls() for stack in _stacks())
        results[lean] = (run(prompts), [run([p])[0] for p in prompts])
        taken[lean] = sum(stack.lean_calls() for stack in _stacks()) - before
    assert taken[False] == 0 and taken[True] >= 4 * params.max_tokens  # every decode step, batched and alone
    assert results[True] == results[False]
    assert [r[0] for r in results[True][0]] == [r[0] for r in results[True][1]]  # tokens: batched == alone

    # the phase clock (profile_decode.py --phases) changes nothing and times every phase a base step has
    fused_switch(True, lean=True)
    stack = _stacks()[-1]
    stack.set_profiling(True)
    try:
        assert (run(prompts), [run([p])[0] for p in prompts]) == results[True]
        ns = dict(zip(stack.phase_names(), stack.phase_ns()))
    finally:
        stack.set_profiling(False)
    assert set(ns) == {"norms", "qkv", "lora", "elementwise", "attention", "o", "gate_up", "down"}
    assert all(ns[k] > 0 for k in ("norms", "qkv", "elementwise", "attention", "o", "gate_up", "down")), ns
    assert stack.phase_ns() == [0] * 8  # set_profiling starts the totals again

    folded = []
    kernel_weight = RMSNorm.kernel_weight
    monkeypatch.setattr(RMSNorm, "kernel_weight", lambda self, x: folded.append(kernel_weight(self, x)))  # -> None
    fused_switch(True, lean=True)
    assert (run(prompts), [run([p])[0] for p in prompts]) == results[True]  # the norm module after the stack
    assert folded and all(w is not None for w in folded)  # where the stack folded it in


def test_gptq_float32_takes_the_one_call_layer_under_the_default_cpu_linear(tmp_path, default_model_dir):
    """--cpu-linear auto with a wide batch keeps oneDNN for dense weights, but GPTQ linears stream regardless: the
    float32 fast kernels and the one-call layer come with them."""
    from loraplex.engine.llm_engine import LLMEngine
    from loraplex.engine.quant.gptq import export_gptq
    from tests.adapters.peft_factory import make_tiny_model

    folder = export_gptq(make_tiny_model(tmp_path / "tiny", default_model_dir), tmp_path / "q", bits=4, group_size=64)
    engine = LLMEngine.from_engine_args(EngineArgs(model=str(folder), dtype="float32", quantization="gptq",
                                                   max_num_seqs=32, kv_cache_memory_bytes=16 << 20))
    assert engine.runner.model.model.layers[0].float32_kernels
    before = fused_layer.STATS["fused_calls"]
    generate(engine, [[101, 102, 103]])
    assert fused_layer.STATS["fused_calls"] > before


def test_adapter_rows_fuse_too_and_nothing_changes(tmp_path, default_model_dir, fused_switch):
    from loraplex.engine.llm_engine import _read_model_config
    from tests.adapters.peft_factory import make_tiny_model, write_random_peft
    from tests.adapters.test_lora_engine import lora_engine, run

    tiny = make_tiny_model(tmp_path / "tiny", default_model_dir)
    config = _read_model_config(str(tiny))
    engine = lora_engine(tiny, dtype="bfloat16", cpu_linear="stream")
    folder = write_random_peft(tmp_path / "a1", config, r=8, target_modules=("q_proj", "v_proj", "down_proj"),
                               seed=1, std=0.3)
    engine.adapter_hook.register_adapter("a1", 1, 1, str(folder))
    prompts = {f"p{j}": [(13 * j + 5 * k) % 40000 + 100 for k in range(6 + j)] for j in range(3)}
    outputs = {}
    for mode in ("modules", "layers", "stack per operator", "stack"):  # "stack": decode steps on its lean path
        fused_switch(mode != "modules", stack=mode.startswith("stack"), lean=mode == "stack")
        alone = {f"{rid}-{key}": run(engine, {"x": (p, GREEDY, key)})["x"]
                 for rid, p in prompts.items() for key in (None, (1, 1))}
        mixed = run(engine, {f"{rid}-{key}": (p, GREEDY, key) for rid, p in prompts.items() for key in (None, (1, 1))})
        outputs[mode] = (alone, mixed)
        assert mixed == alone
        if mode != "modules":  # base and plain LoRA rows fuse, every layer of every step (short prefills too)
            for key in (None, (1, 1)):
                before, stacks = fused_layer.STATS["fused_calls"], fused_layer.STATS["stack_calls"]
                lean = sum(stack.lean_calls() for stack in _stacks())
                run(engine, {"x": (prompts["p0"], GREEDY, key)})
                assert fused_layer.STATS["fused_calls"] - before == GREEDY.max_tokens * config.num_hidden_layers
                # and every step is one whole-stack call, with the adapter's rows or without
                stacked = GREEDY.max_tokens if mode.startswith("stack") else 0
                assert fused_layer.STATS["stack_calls"] - stacks == stacked
                # the lean path takes them all (up to 16 rows: the short prefill too), adapter rows included
                assert sum(stack.lean_calls() for stack in _stacks()) - lean == (stacked if mode == "stack" else 0)
    assert outputs["stack"] == outputs["stack per operator"] == outputs["layers"] == outputs["modules"]
    assert len({tuple(v) for v in outputs["stack"][0].values()}) > 3  # the adapter really changes outputs


class _Nudge(torch.nn.Module):
    """A wrapper the engine knows nothing about (no stack_parts): it negates its base's output."""

    def __init__(self, base: torch.nn.Module) -> None:
        super().__init__()
        self.base = base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -self.base(x)


def test_the_stack_follows_modules_swapped_in_and_the_trainers_wrappers(default_model_dir, fused_switch):
    """A module swapped in after the stack was built (here an unknown wrapper) sends steps back to the layers, with
    that module's output; swapping it out again brings the stack back. The trainer's wrappers, idle between
    training steps, keep it."""
    from loraplex.engine.llm_engine import LLMEngine
    from loraplex.trainer.multi_job import MultiJobTrainer
    engine = LLMEngine.from_engine_args(EngineArgs(model=default_model_dir, dtype="bfloat16", cpu_linear="stream",
                                                   max_num_seqs=4, kv_cache_memory_bytes=64 << 20))
    prompts = [engine.tokenizer.encode("The capital of France is")]

    def stacked_run() -> tuple[list[list[int]], int]:
        stacks = fused_layer.STATS["stack_calls"]
        return generate(engine, prompts), fused_layer.STATS["stack_calls"] - stacks

    plain, stacks = stacked_run()
    assert stacks == GREEDY.max_tokens
    attn = engine.runner.model.model.layers[3].self_attn
    original = attn.o_proj
    attn.o_proj = _Nudge(original)
    nudged, stacks = stacked_run()
    assert stacks == 0 and nudged != plain
    fused_switch(False)  # the module path agrees on what the nudged model says
    assert generate(engine, prompts) == nudged
    fused_switch(True)
    attn.o_proj = original
    assert stacked_run() == (plain, GREEDY.max_tokens)
    runner = engine.runner
    MultiJobTrainer(runner.model, engine.model_config, runner.dtype, runner.device)  # wraps every target linear
    assert type(attn.o_proj).__name__ == "MultiLoRATrainLinear"
    assert stacked_run() == (plain, GREEDY.max_tokens)
