"""Scheduler driven by a fake model: chunked prefill, preemption, aborts, caps, stop conditions."""
import pytest

from loraplex.engine.core.config import SchedulerConfig
from loraplex.engine.core.errors import PromptTooLongError
from loraplex.engine.core.kv_cache import KVCacheManager
from loraplex.engine.core.request import Request, RequestStatus
from loraplex.engine.core.sampling_params import SamplingParams
from loraplex.engine.core.scheduler import Scheduler

BS = 4
EOS = 2


def fake_token(request):
    """A deterministic 'model': the next token depends only on the tokens so far."""
    return 100 + (sum(request.prompt_token_ids) + 7 * request.num_tokens) % 50


def make_scheduler(num_blocks=64, admission_hook=None, enable_prefix_caching=True, **cfg):
    cfg = {"max_num_seqs": 8, "max_num_batched_tokens": 64, "max_model_len": 64, **cfg}
    kv = KVCacheManager(num_blocks, BS, enable_prefix_caching)
    return Scheduler(SchedulerConfig(**cfg), kv, admission_hook)


def make_request(rid, prompt_len=6, first=0, arrival_time=None, adapter_id=0, **params):
    params.setdefault("max_tokens", 4)
    return Request(rid, list(range(first + 10, first + 10 + prompt_len)), SamplingParams(**params),
                   eos_token_ids=(EOS,), arrival_time=arrival_time, adapter_id=adapter_id)


def step(sched, token_fn=fake_token):
    out = sched.schedule()
    cfg = sched.scheduler_config
    assert out.num_batched_tokens == sum(s.num_new_tokens for s in out.scheduled)
    assert out.num_batched_tokens <= cfg.max_num_batched_tokens
    assert len(out.scheduled) <= cfg.max_num_seqs
    decodes = [s.num_new_tokens == 1 for s in out.scheduled]
    assert decodes == sorted(decodes, reverse=True), "decodes must come first"
    for s in out.scheduled:
        assert len(s.block_ids) * BS >= s.start_pos + s.num_new_tokens
        assert s.sample == (s.start_pos + s.num_new_tokens == s.request.num_tokens)
    sampled = {s.request.request_id: token_fn(s.request) for s in out.scheduled if s.sample}
    return out, sched.update_from_output(out, sampled)


def run_to_completion(sched, max_steps=500, token_fn=fake_token):
    outputs = []
    for _ in range(max_steps):
        if not sched.has_unfinished_requests():
            return outputs
        outputs.append(step(sched, token_fn))
    raise AssertionError("scheduler did not finish")


def assert_all_free(sched):
    kv = sched.kv_cache_manager
    assert kv.num_free_blocks == kv.num_total_blocks
    assert all(b.ref_cnt == 0 for b in kv.blocks)
    assert not sched.has_unfinished_requests() and sched.get_num_unfinished_requests() == 0


def reference_output(prompt_len, first, max_tokens):
    sched = make_scheduler()
    req = make_request("ref", prompt_len, first, max_tokens=max_tokens, ignore_eos=True)
    sched.add_request(req)
    run_to_completion(sched)
    return req.output_token_ids


def test_single_request_runs_to_max_tokens():
    sched = make_scheduler()
    req = make_request("a", 6, max_tokens=3)
    sched.add_request(req)
    assert sched.num_waiting == 1
    out, updates = step(sched)
    assert [(s.num_new_tokens, s.start_pos, s.sample) for s in out.scheduled] == [(6, 0, True)]
    assert sched.num_running == 1 and len(updates) == 1 and not updates[0].finished
    out, updates = step(sched)
    assert [(s.num_new_tokens, s.start_pos) for s in out.scheduled] == [(1, 6)]
    out, updates = step(sched)
    assert updates[0].finished and updates[0].new_token_ids == [req.output_token_ids[-1]]
    assert req.status == RequestStatus.FINISHED_LENGTH and req.status.finish_reason == "length"
    assert req.num_output_tokens == 3 and req.first_token_time is not None
    assert_all_free(sched)
    assert sched.schedule().finished_request_ids == ["a"]


def test_chunked_prefill_is_split_and_co_scheduled_with_decodes():
    sched = make_scheduler(max_num_batched_tokens=16, max_num_seqs=4)
    short = make_request("short", 3, max_tokens=10)
    sched.add_request(short)
    step(sched)  # short prefilled, now decoding
    long = make_request("long", 40, first=100, max_tokens=2)
    sched.add_request(long)
    chunks = []
    while long.num_output_tokens == 0:
        out, _ = step(sched)
        assert out.scheduled[0].request is short and out.scheduled[0].num_new_tokens == 1
        chunk = out.scheduled[1]
        assert chunk.request is long and chunk.start_pos == sum(chunks)
        chunks.append(chunk.num_new_tokens)
        assert chunk.sample == (sum(chunks) == 40)
    assert chunks == [15, 15, 10]
    run_to_completion(sched)
    assert long.output_token_ids == reference_output(40, 100, 2)
    assert_all_free(sched)


def test_without_chunked_prefill_a_long_prompt_waits_for_budget():
    sched = make_scheduler(max_num_batched_tokens=64, max_model_len=64, enable_chunked_prefill=False)
    a = make_request("a", 4, max_tokens=3)
    sched.add_request(a)
    step(sched)
    b = make_request("b", 64, first=100, max_tokens=1)
    sched.add_request(b)
    out, _ = step(sched)  # a's decode takes 1 token: 63 left < 64
    assert [s.request for s in out.scheduled] == [a]
    run_to_completion(sched)
    assert b.status == RequestStatus.FINISHED_LENGTH and b.num_output_tokens == 1
    assert_all_free(sched)


def test_max_num_seqs_cap():
    sched = make_scheduler(max_num_seqs=2, max_num_batched_tokens=64)
    reqs = [make_request(f"r{i}", 4, first=10 * i, max_tokens=3) for i in range(5)]
    for r in reqs:
        sched.add_request(r)
    out, _ = step(sched)
    assert [s.request for s in out.scheduled] == reqs[:2]
    assert sched.num_running == 2 and sched.num_waiting == 3
    for _ in range(200):
        if not sched.has_unfinished_requests():
            break
        step(sched)
        assert sched.num_running <= 2
    assert all(r.num_output_tokens == 3 for r in reqs)
    assert_all_free(sched)


def test_preemption_of_newest_and_resume_with_outputs_kept():
    # 6 blocks of 4 tokens; each request grows to 4 + 12 = 16 tokens = 4 blocks: both can't fit
    sched = make_scheduler(num_blocks=6, max_num_seqs=4)
    old = make_request("old", 4, first=0, max_tokens=12, ignore_eos=True, arrival_time=1.0)
    new = make_request("new", 4, first=50, max_tokens=12, ignore_eos=True, arrival_time=2.0)
    sched.add_request(old)
    sched.add_request(new)
    preempted = []
    for out, _ in run_to_completion(sched):
        preempted += out.preempted_request_ids
    assert preempted and set(preempted) == {"new"}
    assert new.num_preemptions >= 1 and old.num_preemptions == 0
    assert old.output_token_ids == reference_output(4, 0, 12)
    assert new.output_token_ids == reference_output(4, 50, 12)
    assert_all_free(sched)


def test_preempted_request_goes_to_front_of_waiting_and_skips_admission_that_step():
    sched = make_scheduler(num_blocks=4, max_num_seqs=4)
    old = make_request("old", 4, max_tokens=8, ignore_eos=True, arrival_time=1.0)
    new = make_request("new", 4, first=50, max_tokens=8, ignore_eos=True, arrival_time=2.0)
    sched.add_request(old)
    sched.add_request(new)
    for _ in range(5):
        step(sched)  # both end up with 2 full blocks (8 tokens of KV); the next decodes need a third
    late = make_request("late", 2, first=80, max_tokens=1, arrival_time=3.0)
    sched.add_request(late)
    out, _ = step(sched)
    assert out.preempted_request_ids == ["new"]
    assert list(sched.waiting) == [new, late] and new.status == RequestStatus.PREEMPTED
    assert new.num_computed_tokens == 0 and new.num_output_tokens == 5
    run_to_completion(sched)
    assert new.output_token_ids == reference_output(4, 50, 8)
    assert_all_free(sched)


def test_request_preempts_itself_when_it_is_the_newest():
    sched = make_scheduler(num_blocks=3, max_num_seqs=4)
    old = make_request("old", 5, max_tokens=3, ignore_eos=True, arrival_time=1.0)
    new = make_request("new", 4, first=50, max_tokens=3, ignore_eos=True, arrival_time=2.0)
    sched.add_request(old)
    sched.add_request(new)
    out, _ = step(sched)  # old: 2 blocks, new: 1 block; all 3 used
    assert len(out.scheduled) == 2 and sched.kv_cache_manager.num_free_blocks == 0
    out, _ = step(sched)  # old fits in its blocks; new needs a second block and is the newest
    assert out.preempted_request_ids == ["new"]
    assert [s.request for s in out.scheduled] == [old]
    run_to_completion(sched)
    assert old.num_preemptions == 0 and new.num_preemptions == 1
    assert new.output_token_ids == reference_output(4, 50, 3)
    assert_all_free(sched)


def test_abort_waiting_and_running():
    sched = make_scheduler(max_num_seqs=1)
    a, b = make_request("a", 6, max_tokens=10), make_request("b", 6, first=40, max_tokens=10)
    sched.add_request(a)
    sched.add_request(b)
    step(sched)
    assert a.status == RequestStatus.RUNNING and b.status == RequestStatus.WAITING
    sched.finish_requests(["b", "unknown"], RequestStatus.FINISHED_ABORTED)
    assert b.status == RequestStatus.FINISHED_ABORTED and sched.num_waiting == 0
    sched.finish_requests("a", RequestStatus.FINISHED_ABORTED)
    sched.finish_requests("a", RequestStatus.FINISHED_ABORTED)  # idempotent
    assert a.status.finish_reason == "abort"
    assert_all_free(sched)
    assert sorted(sched.schedule().finished_request_ids) == ["a", "b"]


def test_abort_during_a_step_is_skipped_by_update():
    sched = make_scheduler()
    a, b = make_request("a", 5, max_tokens=5), make_request("b", 5, first=40, max_tokens=5)
    sched.add_request(a)
    sched.add_request(b)
    out = sched.schedule()
    sched.finish_requests("a", RequestStatus.FINISHED_ABORTED)
    updates = sched.update_from_output(out, {"a": 101, "b": 102})
    assert [u.request for u in updates] == [b] and a.num_output_tokens == 0
    run_to_completion(sched)
    assert_all_free(sched)


def test_stop_on_eos_and_ignore_eos():
    def eos_model(req):
        return EOS if req.num_output_tokens == 1 else 101

    sched = make_scheduler()
    stops = make_request("stops", 4, max_tokens=5)
    ignores = make_request("ignores", 4, first=30, max_tokens=5, ignore_eos=True)
    sched.add_request(stops)
    sched.add_request(ignores)
    run_to_completion(sched, token_fn=eos_model)
    assert stops.output_token_ids == [101, EOS] and stops.status == RequestStatus.FINISHED_STOPPED
    assert stops.stop_reason is None
    assert ignores.num_output_tokens == 5 and ignores.status == RequestStatus.FINISHED_LENGTH
    assert_all_free(sched)


def test_stop_token_ids_and_min_tokens():
    def model(req):
        return 7 if req.num_output_tokens % 2 else EOS

    sched = make_scheduler()
    stop_tok = make_request("stop_tok", 4, max_tokens=6, ignore_eos=True, stop_token_ids=(7,))
    min_tok = make_request("min_tok", 4, first=30, max_tokens=6, min_tokens=3)
    sched.add_request(stop_tok)
    sched.add_request(min_tok)
    run_to_completion(sched, token_fn=model)
    assert stop_tok.output_token_ids == [EOS, 7] and stop_tok.stop_reason == 7
    assert stop_tok.status == RequestStatus.FINISHED_STOPPED
    # EOS at outputs 1 and 3; only the second counts (min_tokens=3)
    assert min_tok.output_token_ids == [EOS, 7, EOS] and min_tok.status == RequestStatus.FINISHED_STOPPED
    assert_all_free(sched)


def test_stop_at_max_model_len():
    sched = make_scheduler(max_model_len=16, max_num_batched_tokens=16)
    req = make_request("a", 12, max_tokens=10, ignore_eos=True)
    sched.add_request(req)
    run_to_completion(sched)
    assert req.num_tokens == 16 and req.status == RequestStatus.FINISHED_LENGTH
    assert_all_free(sched)


def test_add_request_rejects_what_can_never_fit():
    sched = make_scheduler(num_blocks=4, max_model_len=32, max_num_batched_tokens=32)
    with pytest.raises(PromptTooLongError):
        sched.add_request(make_request("long", 33))
    with pytest.raises(ValueError, match="KV cache"):
        sched.add_request(make_request("big", 16, max_tokens=8))  # 23 tokens of KV > 16
    sched.add_request(make_request("ok", 16, max_tokens=1))  # 16 tokens of KV: fits exactly
    with pytest.raises(ValueError, match="duplicate"):
        sched.add_request(make_request("ok", 4))
    run_to_completion(sched)
    assert_all_free(sched)


def test_prefix_cache_hit_at_admission():
    sched = make_scheduler()
    a = make_request("a", 10, max_tokens=2)
    sched.add_request(a)
    run_to_completion(sched)
    b = make_request("b", 10, max_tokens=2)  # same prompt
    sched.add_request(b)
    out, _ = step(sched)
    (s,) = out.scheduled
    assert (s.start_pos, s.num_new_tokens) == (8, 2)
    run_to_completion(sched)
    assert b.output_token_ids == a.output_token_ids
    assert sched.kv_cache_manager.prefix_cache_stats.hits == 8
    assert_all_free(sched)


def test_max_loras_cap_is_fair():
    sched = make_scheduler(max_loras=1)
    a = make_request("a", 4, adapter_id=1, max_tokens=3, ignore_eos=True, arrival_time=1.0)
    sched.add_request(a)
    step(sched)
    x = make_request("x", 4, first=20, adapter_id=2, max_tokens=2, arrival_time=2.0)
    y = make_request("y", 4, first=40, adapter_id=1, max_tokens=2, arrival_time=3.0)
    z = make_request("z", 4, first=60, adapter_id=0, max_tokens=2, arrival_time=4.0)
    for r in (x, y, z):
        sched.add_request(r)
    out, _ = step(sched)
    # x is over the cap; y (adapter 1, in use) must not jump ahead of x; base-model z passes
    assert {s.request.request_id for s in out.scheduled} == {"a", "z"}
    assert list(sched.waiting) == [x, y]
    admitted_order = []
    for out, _ in run_to_completion(sched):
        loras = {s.request.adapter_id for s in out.scheduled} - {0}
        assert len(loras) <= 1
        admitted_order += [s.request.request_id for s in out.scheduled if s.start_pos == 0]
    assert admitted_order == ["x", "y"]
    assert_all_free(sched)


def test_admission_hook_skips_without_blocking_base_requests():
    allowed = set()
    calls = []

    def hook(req):
        calls.append(req.request_id)
        return req.adapter_id == 0 or req.adapter_id in allowed

    sched = make_scheduler(admission_hook=hook)
    x = make_request("x", 4, adapter_id=3, max_tokens=2)
    z = make_request("z", 4, first=30, max_tokens=2)
    sched.add_request(x)
    sched.add_request(z)
    out, _ = step(sched)
    assert [s.request for s in out.scheduled] == [z]
    assert x.status == RequestStatus.WAITING and sched.kv_cache_manager.get_block_ids("x") == []
    allowed.add(3)
    out, _ = step(sched)
    assert x in [s.request for s in out.scheduled]
    assert calls.count("z") == 1 and calls.count("x") == 2
    run_to_completion(sched)
    assert_all_free(sched)


def test_mixed_workload_returns_every_block():
    sched = make_scheduler(num_blocks=12, max_num_seqs=3, max_num_batched_tokens=16, max_model_len=32)
    reqs = [make_request(f"r{i}", 3 + (5 * i) % 17, first=(i % 3) * 5, max_tokens=1 + i % 9,
                         adapter_id=i % 3, arrival_time=float(i)) for i in range(12)]
    for r in reqs:
        sched.add_request(r)
    for n in range(300):
        if not sched.has_unfinished_requests():
            break
        step(sched)
        if n == 3:
            sched.finish_requests(["r5", "r11"], RequestStatus.FINISHED_ABORTED)
    assert all(r.is_finished for r in reqs)
    assert_all_free(sched)
