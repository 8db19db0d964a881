"""LLMEngine with the LoRA runtime wired in: greedy batch invariance across adapters, a pool much
smaller than the adapter set, version swaps under running requests, preemption and aborts."""
from __future__ import annotations

import pytest

from loraplex.adapters.runtime import create_lora_runtime
from loraplex.engine.core.sampling_params import SamplingParams
from loraplex.engine.engine_args import EngineArgs
from loraplex.engine.llm_engine import LLMEngine
from tests.adapters.peft_factory import make_tiny_model, write_random_peft

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


def lora_engine(model_dir, **kw) -> LLMEngine:
    args = dict(model=str(model_dir), dtype="float32", max_model_len=256, max_num_seqs=64,
                max_num_batched_tokens=256, num_gpu_blocks_override=512, enable_lora=True, max_lora_rank=16,
                lora_pool_pages=16 * 8 + 1)
    args.update(kw)
    return LLMEngine.from_engine_args(EngineArgs(**args), hook_factory=create_lora_runtime)


def run(engine, requests):
    """requests: {rid: (prompt ids, params, adapter key or None)} -> {rid: output token ids}"""
    for rid, (ids, params, adapter) in requests.items():
        engine.add_request(rid, ids, params, adapter=adapter)
    out = {rid: [] for rid in requests}
    while engine.has_unfinished_requests():
        for o in engine.step():
            out[o.request_id].extend(o.token_ids)
    return out


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, default_model_dir):
    return make_tiny_model(tmp_path_factory.mktemp("tiny"), default_model_dir)


@pytest.fixture(scope="module")
def tiny_config(tiny_dir):
    from loraplex.engine.llm_engine import _read_model_config
    return _read_model_config(str(tiny_dir))


def prompt(i: int) -> list[int]:
    return [(17 * i + 3 * k) % 40000 + 100 for k in range(5 + i % 7)]


def test_greedy_alone_equals_inside_mixed_adapter_batch(tiny_dir, tiny_config, tmp_path):
    engine = lora_engine(tiny_dir)
    hook = engine.adapter_hook
    for i, (r, targets) in enumerate([(4, ("q_proj", "v_proj")), (8, ("q_proj", "k_proj", "v_proj", "o_proj",
                                      "gate_proj", "up_proj", "down_proj")), (16, ("up_proj", "down_proj"))]):
        folder = write_random_peft(tmp_path / f"a{i}", tiny_config, r=r, target_modules=targets, seed=i, std=0.3)
        hook.register_adapter(f"a{i}", i + 1, 1, str(folder))
    keys = [None, (1, 1), (2, 1), (3, 1)]
    alone = {f"{k}-{j}": run(engine, {"x": (prompt(j), GREEDY, k)})["x"] for k in keys for j in range(2)}
    assert len({tuple(v) for v in alone.values()}) > 4  # the adapters really change greedy output
    mixed = run(engine, {f"{k}-{j}": (prompt(j), GREEDY, k) for j in range(2) for k in keys})
    assert mixed == alone
    kv = engine.scheduler.kv_cache_manager
    assert kv.num_free_blocks == kv.num_total_blocks and not hook._pinned


def test_200_adapters_round_robin_through_a_pool_of_32(tiny_dir, tiny_config, tmp_path):
    folders = [write_random_peft(tmp_path / f"ad{i}", tiny_config, r=8, seed=100 + i, std=0.3,
                                 target_modules=("q_proj", "v_proj", "down_proj")) for i in range(200)]
    # reference: every adapter alone in an engine whose pool holds them all
    big = lora_engine(tiny_dir, lora_pool_pages=200 * 8 + 1, max_cpu_loras=200)
    for i, f in enumerate(folders):
        big.adapter_hook.register_adapter(f"ad{i}", i + 1, 1, str(f))
    want = {f"r{i}": run(big, {"x": (prompt(i), GREEDY, (i + 1, 1))})["x"] for i in range(200)}
    assert len({tuple(v) for v in want.values()}) > 100

    engine = lora_engine(tiny_dir, lora_pool_pages=32 * 8 + 1, max_loras=32, max_cpu_loras=16)
    hook = engine.adapter_hook
    for i, f in enumerate(folders):
        hook.register_adapter(f"ad{i}", i + 1, 1, str(f))
    kv = engine.scheduler.kv_cache_manager
    free_blocks, free_pages = kv.num_free_blocks, hook.pool.num_free_pages
    got = run(engine, {f"r{i}": (prompt(i), GREEDY, (i + 1, 1)) for i in range(200)})
    assert got == want
    assert hook.pool.num_evictions >= 200 - 32 and hook.pool.num_loads >= 200
    assert kv.num_free_blocks == free_blocks and not hook._pinned
    assert all(hook.pool.pin_count(k) == 0 for k in hook.pool.resident)
    for i in range(200):
        hook.unregister_adapter(i + 1)
    assert hook.pool.num_free_pages == free_pages and not hook.registry and not hook.host


def test_new_version_spares_running_requests(tiny_dir, tiny_config, tmp_path):
    engine = lora_engine(tiny_dir)
    hook = engine.adapter_hook
    v1 = write_random_peft(tmp_path / "v1", tiny_config, r=8, seed=1, std=0.3)
    v2 = write_random_peft(tmp_path / "v2", tiny_config, r=8, seed=2, std=0.3)
    long = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    hook.register_adapter("m", 7, 1, str(v1))
    want_v1 = run(engine, {"x": (prompt(3), long, (7, 1))})["x"]
    hook.register_adapter("m", 7, 2, str(v2))
    want_v2 = run(engine, {"x": (prompt(3), long, (7, 2))})["x"]
    assert want_v1 != want_v2 and (7, 1) not in hook.registry  # v1 retired at once: nothing used it

    hook.register_adapter("m", 7, 3, str(v1))  # v3 has v1's weights
    engine.add_request("old", prompt(3), long, adapter=(7, 3))
    got = {"old": [], "new": []}
    while len(got["old"]) < 5:
        for o in engine.step():
            got[o.request_id].extend(o.token_ids)
    assert len(got["old"]) < 30
    hook.register_adapter("m", 7, 4, str(v2))  # published while "old" is mid-stream
    assert hook.registry[(7, 3)].retired and hook.pool.is_resident((7, 3))
    with pytest.raises(ValueError):
        engine.add_request("late", prompt(3), long, adapter=(7, 3))  # retired: no new requests
    engine.add_request("new", prompt(3), long, adapter=(7, 4))
    while engine.has_unfinished_requests():
        for o in engine.step():
            got[o.request_id].extend(o.token_ids)
    assert got == {"old": want_v1, "new": want_v2}
    assert (7, 3) not in hook.registry and not hook.pool.is_resident((7, 3))  # drained, then freed


def test_unknown_adapter_is_refused_and_changes_nothing(tiny_dir):
    engine = lora_engine(tiny_dir)
    with pytest.raises(ValueError, match="not loaded"):
        engine.add_request("x", prompt(1), GREEDY, adapter=(99, 1))
    assert not engine.has_unfinished_requests()
    plain = LLMEngine.from_engine_args(EngineArgs(model=str(tiny_dir), dtype="float32", max_model_len=64,
                                                  num_gpu_blocks_override=16))
    with pytest.raises(ValueError, match="no adapters"):
        plain.add_request("x", prompt(1), GREEDY, adapter=(1, 1))


def test_preemption_and_aborts_release_pins_and_blocks(tiny_dir, tiny_config, tmp_path):
    # few KV blocks: long requests preempt each other; some are aborted mid-way
    engine = lora_engine(tiny_dir, num_gpu_blocks_override=24, max_num_seqs=8, block_size=16)
    hook = engine.adapter_hook
    for i in range(4):
        hook.register_adapter(f"p{i}", i + 1, 1, str(write_random_peft(tmp_path / f"p{i}", tiny_config, r=8, seed=i)))
    params = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
    for j in range(8):
        engine.add_request(f"q{j}", prompt(j) * 4, params, adapter=None if j % 5 == 0 else (j % 4 + 1, 1))
    preempted = 0
    for step in range(400):
        if not engine.has_unfinished_requests():
            break
        engine.step()
        preempted = max(preempted, sum(r.num_preemptions for r in engine.scheduler.requests.values()))
        if step == 20:
            engine.abort_requests(["q1", "q2"])
    assert preempted > 0
    kv = engine.scheduler.kv_cache_manager
    assert kv.num_free_blocks == kv.num_total_blocks and not hook._pinned
    assert all(hook.pool.pin_count(k) == 0 for k in hook.pool.resident)
    assert all(e.num_requests == 0 for e in hook.registry.values())


def test_a_steady_decode_batch_reuses_its_row_maps(tiny_dir, tiny_config, tmp_path):
    """prepare keeps the step's row maps by value: while a decode batch keeps its requests and pages, each step gets
    the same map (and the CPU layout cached on it); a request joining gets a new one; the memo stays bounded."""
    from loraplex.adapters.runtime import META_MEMO_SIZE
    engine = lora_engine(tiny_dir)
    hook = engine.adapter_hook
    for i in range(2):
        hook.register_adapter(f"ad{i}", i + 1, 1, str(write_random_peft(tmp_path / f"ad{i}", tiny_config, r=8,
                                                                          seed=i, std=0.3)))
    seen = []
    engine.add_request("a", prompt(0), SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True), adapter=(1, 1))
    for _ in range(4):  # the prefill, then decodes of "a" alone
        engine.step()
        seen.append(hook.state.metas["q_proj"])
    assert seen[1] is seen[2] is seen[3] and seen[0] is not seen[1]
    engine.add_request("b", prompt(1), SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True), adapter=(2, 1))
    engine.step()
    assert hook.state.metas["q_proj"] is not seen[3]
    while engine.has_unfinished_requests():
        engine.step()
    assert 0 < len(hook._metas_by_value) <= META_MEMO_SIZE
