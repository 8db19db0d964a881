"""Multi-step decoding (--num-scheduler-steps): when every running request decodes by plain greedy argmax and nothing
waits, one scheduled step runs several decode steps, each fed the tokens of the one before. The scheduler's choice
and bookkeeping, the in-place batch against a freshly built one, and the engine's outputs token for token those of
single steps: alone, in mixed batches with adapters and sampled requests beside them, with EOS, stop tokens, stop
strings and aborts (blocks back to the free list)."""
from __future__ import annotations

import contextlib

import pytest
import torch

from loraplex.engine.core.config import SchedulerConfig
from loraplex.engine.core.kv_cache import KVCacheManager
from loraplex.engine.core.request import Request, RequestStatus
from loraplex.engine.core.sampling_params import SamplingParams
from loraplex.engine.core.scheduler import Scheduler
from loraplex.engine.core.spec_decode import SpeculativeConfig
from loraplex.engine.engine_args import EngineArgs
from loraplex.engine.kernels import cpu_kernels
from loraplex.engine.layers.attention import advance_decode_batch, build_forward_batch
from tests.engine.test_spec_decode import alone_and_mixed, two_adapter_engines

GREEDY = SamplingParams(max_tokens=20, temperature=0.0)


def scheduler(steps: int = 4, num_blocks: int = 64, max_model_len: int = 128, speculative=None) -> Scheduler:
    cfg = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=max_model_len,
                          num_scheduler_steps=steps)
    return Scheduler(cfg, KVCacheManager(num_blocks, 4, enable_prefix_caching=True), speculative=speculative)


def prefill(s: Scheduler, *requests: Request) -> None:
    for r in requests:
        s.add_request(r)
    out = s.schedule()
    assert out.num_steps == 1 and {x.request for x in out.scheduled} == set(requests)
    s.update_from_output(out, {r.request_id: 5 for r in requests})


def test_scheduler_takes_multi_steps_only_for_plain_greedy_decodes_with_nothing_waiting():
    s = scheduler()
    a = Request("a", [7, 8, 9, 10, 11], GREEDY, eos_token_ids=(2,))
    prefill(s, a)
    out = s.schedule()
    assert out.num_steps == 4 and len(out.scheduled) == 1 and out.scheduled[0].num_new_tokens == 1
    # blocks for the fed token and the three fed after it: positions 5..8 -> 3 blocks of 4
    assert len(out.scheduled[0].block_ids) == 3 and a.num_computed_tokens == 5
    s.update_from_output(out, {"a": [20, 21, 22, 23]})
    assert a.output_token_ids == [5, 20, 21, 22, 23] and a.num_computed_tokens == 9
    # a sampled request beside it: single steps for both
    s.add_request(Request("b", [1, 2, 3], SamplingParams(max_tokens=20, temperature=0.8, seed=1)))
    out = s.schedule()
    assert out.num_steps == 1 and len(out.scheduled) == 2  # a's decode, b's prefill
    s.update_from_output(out, {"a": 24, "b": 25})
    out = s.schedule()
    assert out.num_steps == 1 and len(out.scheduled) == 2
    s.update_from_output(out, {"a": 26, "b": 27})
    s.finish_requests("b", RequestStatus.FINISHED_ABORTED)
    assert s.schedule().num_steps == 4
    # a waiting request: single steps until it is admitted
    s2 = scheduler()
    c = Request("c", [7, 8, 9], GREEDY)
    prefill(s2, c)
    s2.add_request(Request("d", [4, 4], GREEDY))
    assert s2.schedule().num_steps == 1


def test_steps_stop_at_length_limits_and_the_engine_cap():
    s = scheduler(steps=8)
    a = Request("a", [7, 8, 9], SamplingParams(max_tokens=4, temperature=0.0))
    prefill(s, a)
    out = s.schedule()
    assert out.num_steps == 3  # max_tokens 4, one already out
    s.update_from_output(out, {"a": [1, 1, 1]})
    assert a.status == RequestStatus.FINISHED_LENGTH and a.num_output_tokens == 4
    assert s.kv_cache_manager.num_free_blocks == s.kv_cache_manager.num_total_blocks
    s = scheduler(steps=8, max_model_len=10)
    b = Request("b", [7, 8, 9, 10, 11, 12], SamplingParams(max_tokens=50, temperature=0.0))
    prefill(s, b)
    assert s.schedule().num_steps == 3  # 7 tokens known, 10 at most
    s = scheduler(steps=8)
    s.multi_step_cap = lambda rows: 2
    prefill(s, Request("c", [7, 8], GREEDY))
    assert s.schedule().num_steps == 2
    s.multi_step_cap = lambda rows: 1
    assert s.schedule().num_steps == 1


@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=20, temperature=0.7, seed=3), SamplingParams(max_tokens=20, temperature=0.0, logprobs=1),
    SamplingParams(max_tokens=20, temperature=0.0, repetition_penalty=1.1),
    SamplingParams(max_tokens=20, temperature=0.0, logit_bias=((5, 2.0),)),
    SamplingParams(max_tokens=20, temperature=0.0, bad_words_token_ids=((9,),))])
def test_any_other_sampling_rule_decodes_one_step_at_a_time(params):
    s = scheduler()
    prefill(s, Request("a", [7, 8, 9], params))
    assert s.schedule().num_steps == 1


def test_min_tokens_waits_until_reached_and_eos_mid_group_finishes():
    s = scheduler(steps=4)
    a = Request("a", [7, 8, 9], SamplingParams(max_tokens=20, temperature=0.0, min_tokens=3), eos_token_ids=(2,))
    prefill(s, a)
    for _ in range(2):  # 1 and 2 tokens out: below min_tokens, EOS would be suppressed
        out = s.schedule()
        assert out.num_steps == 1
        s.update_from_output(out, {"a": 6})
    out = s.schedule()
    assert out.num_steps == 4
    updates = s.update_from_output(out, {"a": [30, 2, 31, 32]})  # EOS second: what follows is dropped
    assert a.status == RequestStatus.FINISHED_STOPPED and a.output_token_ids == [5, 6, 6, 30, 2]
    assert updates[0].new_token_ids == [30, 2] and updates[0].finished
    kv = s.kv_cache_manager
    assert kv.num_free_blocks == kv.num_total_blocks


def test_no_preemption_for_extra_steps_and_none_beside_prompt_lookup():
    # 6 blocks of 4: two prompts of 7 and their first tokens take 2 each; 6 more steps would need 2 more each
    s = scheduler(steps=8, num_blocks=6)
    a, b = (Request(rid, [1, 2, 3, 4, 5, 6, 7], SamplingParams(max_tokens=7, temperature=0.0)) for rid in "ab")
    prefill(s, a, b)
    out = s.schedule()
    assert out.num_steps == 5 and not out.preempted_request_ids  # positions 7..11 fit in 3 blocks each
    assert s.kv_cache_manager.num_free_blocks == 0
    # with prompt lookup on, drafts decide: a group of steps would skip the drafts it could make at each token
    spec = SpeculativeConfig(num_speculative_tokens=3, prompt_lookup_max=2, prompt_lookup_min=1)
    s = scheduler(steps=4, speculative=spec)
    s.add_request(Request("c", [7, 8, 9, 3, 4], SamplingParams(max_tokens=30, temperature=0.0)))
    s.update_from_output(s.schedule(), {"c": 5})
    out = s.schedule()
    assert out.num_steps == 1 and out.scheduled[0].draft_token_ids == []  # nothing recurs: a plain step


@pytest.mark.parametrize("kernel", [True, False], ids=["advance_decode_ op", "torch reference"])
def test_an_advanced_batch_equals_one_built_for_the_next_position(kernel):
    if kernel and not cpu_kernels.available():
        pytest.skip("CPU kernels unavailable")
    tables = [[3, 7, 1], [2, 5]]
    first = build_forward_batch([11, 12], [1, 1], [5, 2], tables, 4, cpu_kernel=True, lookahead=3)
    with contextlib.nullcontext() if kernel else cpu_kernels.suspended():
        advance_decode_batch(first, torch.tensor([21, 22]))
        advance_decode_batch(first, torch.tensor([31, 32]))
    fresh = build_forward_batch([31, 32], [1, 1], [7, 4], tables, 4, cpu_kernel=True)
    for name in ("input_ids", "positions", "slot_mapping", "logits_indices"):
        assert torch.equal(getattr(first, name), getattr(fresh, name)), name
    for name in ("kernel_rows", "kernel_lens"):
        assert torch.equal(getattr(first.attn, name), getattr(fresh.attn, name)), name
    width = fresh.attn.kernel_slots.shape[1]
    assert torch.equal(first.attn.kernel_slots[:, :width], fresh.attn.kernel_slots)
    assert first.continued and not fresh.continued
    with pytest.raises(ValueError):  # the tables must hold the lookahead's positions
        build_forward_batch([1], [1], [11], [[3, 7, 1]], 4, cpu_kernel=True, lookahead=2)


@pytest.mark.skipif(not cpu_kernels.available(), reason="CPU kernels unavailable")
def test_advancing_past_the_slot_table_raises_and_leaves_the_batch_as_it_was():
    batch = build_forward_batch([11, 12], [1, 1], [5, 2], [[3, 7], [2, 5]], 4, cpu_kernel=True, lookahead=2)
    advance_decode_batch(batch, torch.tensor([21, 22]))  # position 6: the last the table was built for
    before = [t.clone() for t in (batch.input_ids, batch.positions, batch.slot_mapping, batch.attn.kernel_lens)]
    with pytest.raises(RuntimeError, match="past the slot table"):
        advance_decode_batch(batch, torch.tensor([31, 32]))
    after = (batch.input_ids, batch.positions, batch.slot_mapping, batch.attn.kernel_lens)
    assert all(torch.equal(a, b) for a, b in zip(before, after))


# ---- the engine -------------------------------------------------------------------------------------------------
def counting(engine) -> list[int]:
    """The num_steps of every step the engine's scheduler hands out, from now on."""
    seen = []
    schedule = engine.scheduler.schedule

    def wrapped():
        out = schedule()
        if out.scheduled:
            seen.append(out.num_steps)
        return out
    engine.scheduler.schedule = wrapped
    return seen


def prompt(i: int) -> list[int]:
    return [(37 * i + 11 * k) % 30000 + 300 for k in range(4 + i % 5)]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_outputs_equal_single_steps_alone_and_in_mixed_adapter_batches(tiny_dir, tmp_path, dtype):
    engines = two_adapter_engines(tiny_dir, tmp_path, dtype, {steps: {"num_scheduler_steps": steps,
                                                                      "stream_interval_ms": 1000} for steps in (1, 8)})
    seen = {steps: counting(engine) for steps, engine in engines.items()}
    greedy = SamplingParams(max_tokens=21, temperature=0.0, ignore_eos=True)
    keys = [None, (1, 1), (2, 1)]
    requests = {f"g{j}-{k}": (prompt(j), greedy, k) for j in range(3) for k in keys}
    # beside them, finishing earlier: a seeded sampled request and a greedy one with logprobs (one step at a time
    # while they run, multi-steps after)
    requests["sampled"] = (prompt(5), SamplingParams(max_tokens=6, temperature=0.8, seed=3), (1, 1))
    requests["logprobs"] = (prompt(6), SamplingParams(max_tokens=5, temperature=0.0, logprobs=2), None)
    out = {steps: alone_and_mixed(engine, requests) for steps, engine in engines.items()}
    assert out[8] == out[1]
    assert all(len(t) == 21 for t in out[8][1].values() if len(t) > 6)
    assert set(seen[1]) == {1} and max(seen[8]) == 8 and 1 in seen[8]


def test_eos_stop_tokens_stop_strings_and_aborts(default_model_dir):
    from loraplex.engine.llm_engine import LLMEngine

    outs, stops = {}, None
    for steps in (1, 8):
        engine = LLMEngine.from_engine_args(EngineArgs(model=default_model_dir, dtype="float32", max_num_seqs=4,
                                                       kv_cache_memory_bytes=64 << 20, num_scheduler_steps=steps,
                                                       stream_interval_ms=1000))
        seen = counting(engine)
        tok = engine.tokenizer

        def chat(text, tok=tok):
            return tok.encode(tok.apply_chat_template([{"role": "user", "content": text}],
                                                      add_generation_prompt=True, tokenize=False))
        count = chat("Count from one to twenty in words, separated by spaces.")
        if stops is None:  # a stop string and a stop token from what the model writes: its 9th to 12th tokens
            engine.add_request("probe", count, SamplingParams(max_tokens=12, temperature=0.0))
            probe = []
            while engine.has_unfinished_requests():
                probe += [t for o in engine.step() for t in o.token_ids]
            stops = (tok.decode(probe[:12])[-4:], probe[8])
            seen.clear()
        engine.add_request("eos", chat("Say hi."), SamplingParams(max_tokens=60, temperature=0.0))
        engine.add_request("stop-str", count, SamplingParams(max_tokens=60, temperature=0.0, stop=(stops[0],)))
        engine.add_request("stop-tok", count, SamplingParams(max_tokens=60, temperature=0.0,
                                                             stop_token_ids=(stops[1],)))
        engine.add_request("aborted", count, SamplingParams(max_tokens=60, temperature=0.0))
        got = {}
        while engine.has_unfinished_requests():
            for o in engine.step():
                text, tokens, _ = got.get(o.request_id, ("", [], None))
                got[o.request_id] = (text + o.text, tokens + o.token_ids, (o.finish_reason, o.stop_reason)
                                     if o.finished else None)
            if len(got.get("aborted", ("", []))[1]) >= 9 and "aborted" in engine.scheduler.requests:
                engine.abort_requests(["aborted"])
        kv = engine.scheduler.kv_cache_manager
        assert kv.num_free_blocks == kv.num_total_blocks
        outs[steps] = {rid: v for rid, v in got.items() if rid != "aborted"}
        outs[steps]["aborted-at-least"] = len(got["aborted"][1]) >= 9
        if steps > 1:
            assert max(seen) > 1
    assert outs[8] == outs[1]
    single = outs[1]
    assert single["eos"][2] == ("stop", None) and len(single["eos"][1]) < 60  # ended by EOS
    assert single["stop-str"][2] == ("stop", stops[0]) and stops[0] not in single["stop-str"][0]
    assert single["stop-tok"][2] == ("stop", stops[1]) and len(single["stop-tok"][1]) <= 9


def test_a_zero_stream_interval_or_one_step_keeps_single_steps(default_model_dir):
    from loraplex.engine.llm_engine import LLMEngine

    for kw in ({"stream_interval_ms": 0}, {"num_scheduler_steps": 1}):
        engine = LLMEngine.from_engine_args(EngineArgs(model=default_model_dir, dtype="float32", max_num_seqs=2,
                                                       kv_cache_memory_bytes=32 << 20, **kw))
        seen = counting(engine)
        engine.add_request("r", [1, 2, 3, 4], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
        while engine.has_unfinished_requests():
            engine.step()
        assert set(seen) == {1}
    with pytest.raises(ValueError, match="num-scheduler-steps"):
        EngineArgs(num_scheduler_steps=0)


def test_the_rebuilt_batch_path_gives_the_same_tokens(tiny_dir):
    """Off the CPU kernel path (plain-torch attention, as on a GPU) each step builds its batch anew."""
    from tests.adapters.test_lora_engine import lora_engine, run

    requests = {f"r{i}": (prompt(i), SamplingParams(max_tokens=17, temperature=0.0, ignore_eos=True), None)
                for i in range(3)}
    got = {}
    for steps in (1, 8):
        engine = lora_engine(tiny_dir, num_scheduler_steps=steps, stream_interval_ms=1000)
        engine.runner.cpu_attention_kernel = False
        seen = counting(engine)
        got[steps] = run(engine, requests)
        assert max(seen) == steps
    assert got[8] == got[1]


def test_groups_fit_the_stream_interval_per_batch_size(default_model_dir):
    from loraplex.engine.llm_engine import LLMEngine

    engine = LLMEngine.from_engine_args(EngineArgs(model=default_model_dir, dtype="float32", max_num_seqs=4,
                                                   kv_cache_memory_bytes=32 << 20, stream_interval_ms=1000))
    seen = counting(engine)
    engine.add_request("r", [1, 2, 3, 4], SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    per_step = engine.decode_step_s[1]
    assert set(engine.decode_step_s) == {1} and per_step > 0
    assert engine._multi_step_cap(1) == max(1, int(1.0 / per_step)) and engine._multi_step_cap(3) == 1
    assert seen[:2] == [1, 1] and max(seen) > 1  # the prefill, one timed decode step, then groups
