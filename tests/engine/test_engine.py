"""LLMEngine end to end on the default model: batch invariance of greedy decoding, seeded
reproducibility, stop strings, aborts and preemption returning every KV block."""
from __future__ import annotations

import pytest

from loraplex.engine.core.sampling_params import SamplingParams
from loraplex.engine.engine_args import EngineArgs
from loraplex.engine.llm_engine import LLMEngine

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
           "List three colours:", "Water boils at", "The meaning of life is"]


@pytest.fixture(scope="module")
def engine(default_model_dir):
    return LLMEngine.from_engine_args(EngineArgs(model=str(default_model_dir), dtype="float32",
                                                 max_model_len=512, max_num_seqs=16,
                                                 max_num_batched_tokens=64, num_gpu_blocks_override=256))


def run_all(engine, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, list[int]]:
    for rid, (ids, params) in requests.items():
        engine.add_request(rid, ids, params)
    tokens: dict[str, list[int]] = {rid: [] for rid in requests}
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens[out.request_id].extend(out.token_ids)
    return tokens


def encode(engine, text: str) -> list[int]:
    return engine.tokenizer(text)["input_ids"]


def record_preemptions(engine) -> list[str]:
    """From now on, the ids of the requests each step preempts are appended to the returned list."""
    preempted: list[str] = []
    schedule = engine.scheduler.schedule

    def recording_schedule():
        out = schedule()
        preempted.extend(out.preempted_request_ids)
        return out
    engine.scheduler.schedule = recording_schedule
    return preempted


def test_greedy_alone_equals_greedy_in_busy_mixed_batch(engine):
    greedy = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    target = encode(engine, PROMPTS[0])
    alone = run_all(engine, {"alone": (target, greedy)})["alone"]
    # the same request among sampled neighbours with long prompts, so its decode steps share
    # batches with prefill chunks (max_num_batched_tokens=64 forces chunking)
    busy = {f"n{i}": (encode(engine, p * 4), SamplingParams(max_tokens=30, temperature=0.9, seed=i))
            for i, p in enumerate(PROMPTS[1:])}
    busy["target"] = (target, greedy)
    assert run_all(engine, busy)["target"] == alone
    assert len(alone) == 24


def test_seeded_sampling_is_reproducible(engine):
    params = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.95, seed=1234, ignore_eos=True)
    ids = encode(engine, PROMPTS[2])
    first = run_all(engine, {"s1": (ids, params)})["s1"]
    others = {f"o{i}": (encode(engine, p), SamplingParams(max_tokens=20, temperature=1.0)) for i, p in enumerate(PROMPTS)}
    second = run_all(engine, {**others, "s2": (ids, params)})["s2"]
    assert first == second
    third = run_all(engine, {"s3": (ids, SamplingParams(max_tokens=20, temperature=1.0, top_p=0.95, seed=4321,
                                                         ignore_eos=True))})["s3"]
    assert third != first


def test_stop_string_truncates_text(engine):
    ids = encode(engine, "Count: 1, 2, 3, 4,")
    greedy = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    engine.add_request("full", ids, greedy)
    text = ""
    while engine.has_unfinished_requests():
        text += "".join(o.text for o in engine.step())
    assert len(text) > 4
    stop = text[2:5]
    engine.add_request("stopped", ids, SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True, stop=(stop,)))
    outs = []
    while engine.has_unfinished_requests():
        outs.extend(engine.step())
    assert "".join(o.text for o in outs) == text[:text.index(stop)]
    assert outs[-1].finish_reason == "stop" and outs[-1].stop_reason == stop


def test_abort_and_preemption_return_all_blocks(default_model_dir):
    # a tiny KV cache forces preemption by recompute while requests are aborted mid-flight
    eng = LLMEngine.from_engine_args(EngineArgs(model=str(default_model_dir), dtype="float32", max_model_len=256,
                                                max_num_seqs=8, max_num_batched_tokens=128,
                                                num_gpu_blocks_override=16, block_size=16))
    kv = eng.scheduler.kv_cache_manager
    start = kv.num_free_blocks
    greedy = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    ref = run_all(eng, {"ref": (encode(eng, PROMPTS[3]), greedy)})["ref"]
    for i, p in enumerate(PROMPTS):
        eng.add_request(f"r{i}", encode(eng, p * 3), greedy)
    eng.add_request("ref2", encode(eng, PROMPTS[3]), greedy)
    preempted = record_preemptions(eng)
    got: dict[str, list[int]] = {}
    steps = 0
    while eng.has_unfinished_requests():
        for out in eng.step():
            got.setdefault(out.request_id, []).extend(out.token_ids)
        steps += 1
        if steps == 30:
            eng.abort_requests(["r0", "r4"])
    assert preempted, "the tiny cache should have forced a preemption"
    assert got["ref2"] == ref  # recompute after preemption gives the same greedy tokens
    assert kv.num_free_blocks == start


def test_cpu_attention_kernel_and_torch_path_decode_the_same_tokens(engine):
    """float32: the fused CPU attention kernel and the plain-torch path agree token for token."""
    if not engine.runner.cpu_attention_kernel:
        pytest.skip("CPU kernels not built (no C++ compiler)")
    greedy = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    requests = {f"r{i}": (encode(engine, p), greedy) for i, p in enumerate(PROMPTS[:4])}
    with_kernel = run_all(engine, requests)
    engine.runner.cpu_attention_kernel = False
    try:
        without = run_all(engine, {rid: r for rid, r in requests.items()})
    finally:
        engine.runner.cpu_attention_kernel = True
    assert with_kernel == without


def test_bfloat16_greedy_alone_equals_greedy_in_busy_batch(default_model_dir):
    """The serving dtype, with every CPU kernel on where they are built: still batch invariant."""
    eng = LLMEngine.from_engine_args(EngineArgs(model=str(default_model_dir), dtype="bfloat16", max_model_len=512,
                                                max_num_seqs=16, max_num_batched_tokens=64,
                                                num_gpu_blocks_override=256))
    start = eng.scheduler.kv_cache_manager.num_free_blocks
    greedy = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    target = encode(eng, PROMPTS[3])
    alone = run_all(eng, {"alone": (target, greedy)})["alone"]
    busy = {f"n{i}": (encode(eng, p * 3), SamplingParams(max_tokens=24, temperature=0.8, seed=i))
            for i, p in enumerate(PROMPTS[:3] + PROMPTS[4:])}
    busy["target"] = (target, greedy)
    assert run_all(eng, busy)["target"] == alone
    assert eng.scheduler.kv_cache_manager.num_free_blocks == start
