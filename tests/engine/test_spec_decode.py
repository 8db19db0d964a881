"""Prompt-lookup speculative decoding (engine/core/spec_decode.py): drafting, acceptance, the scheduler's bookkeeping,
and the engine's outputs token for token those of plain greedy decoding, alone and in mixed batches with adapters,
sampled requests and logprobs beside them."""
from __future__ import annotations

import pytest

from loraplex.engine.core.config import SchedulerConfig
from loraplex.engine.core.kv_cache import KVCacheManager
from loraplex.engine.core.request import Request, RequestStatus
from loraplex.engine.core.sampling_params import SamplingParams
from loraplex.engine.core.scheduler import Scheduler
from loraplex.engine.core.spec_decode import (
    SpeculativeConfig,
    accepted_prefix,
    can_speculate,
    ngram_draft,
)
from loraplex.engine.engine_args import EngineArgs

SPEC = SpeculativeConfig(num_speculative_tokens=4, prompt_lookup_max=3, prompt_lookup_min=1)


def test_ngram_draft_takes_the_latest_longest_match():
    #          0  1  2  3  4  5  6  7  8  9
    tokens = [5, 6, 7, 8, 9, 5, 6, 7, 1, 2, 6, 7]
    # suffix [6, 7] (3-gram [2, 6, 7] never recurs) last occurred at 5..6, followed by 1, 2, 6, 7
    assert ngram_draft(tokens, 3, 3, 1) == [1, 2, 6]
    assert ngram_draft(tokens, 10, 3, 1) == [1, 2, 6, 7]
    assert ngram_draft(tokens, 2, 3, 2) == [1, 2]
    assert ngram_draft([1, 2, 3, 4], 4, 3, 1) == []  # nothing recurs
    assert ngram_draft([3, 3, 3], 4, 3, 1) == [3]  # [3, 3] at 0..1 is followed by one 3
    assert ngram_draft([1, 2, 1], 0, 3, 1) == []
    assert accepted_prefix([4, 5, 6], [4, 5, 9, 1]) == 2
    assert accepted_prefix([4, 5, 6], [7, 5, 6, 1]) == 0
    assert accepted_prefix([4, 5, 6], [4, 5, 6, 1]) == 3


def test_config_parsing_and_eligibility():
    assert SpeculativeConfig.parse(None) is None
    cfg = SpeculativeConfig.parse('{"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 1}')
    assert (cfg.num_speculative_tokens, cfg.prompt_lookup_max, cfg.prompt_lookup_min) == (5, 1, 1)
    for bad in ('{"method": "eagle"}', '{"num_speculative_tokens": 0}', '{"num_speculative_tokens": 4, "k": 1}',
                '{"prompt_lookup_min": 3, "prompt_lookup_max": 2}', "[1]", "{"):
        with pytest.raises(ValueError):
            SpeculativeConfig.parse(bad)
    with pytest.raises(ValueError, match="speculative"):
        EngineArgs(speculative_config='{"method": "medusa"}')
    assert can_speculate(SamplingParams(temperature=0.0))
    for params in (SamplingParams(temperature=0.7), SamplingParams(temperature=0.0, logprobs=2),
                   SamplingParams(temperature=0.0, repetition_penalty=1.2),
                   SamplingParams(temperature=0.0, logit_bias=((5, 1.0),)),
                   SamplingParams(temperature=0.0, min_tokens=2, max_tokens=4)):
        assert not can_speculate(params)


def scheduler(num_blocks: int = 64) -> Scheduler:
    cfg = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=128)
    return Scheduler(cfg, KVCacheManager(num_blocks, 4, enable_prefix_caching=True), speculative=SPEC)


def decode_once(s: Scheduler, req: Request) -> None:
    out = s.schedule()
    assert [x.request for x in out.scheduled] == [req]
    s.update_from_output(out, {req.request_id: 1})


def test_scheduler_feeds_the_draft_and_keeps_only_confirmed_tokens():
    s = scheduler()
    req = Request("a", [7, 8, 9, 7, 8, 9, 7], SamplingParams(max_tokens=20, temperature=0.0), eos_token_ids=(2,))
    s.add_request(req)
    out = s.schedule()  # the prefill
    s.update_from_output(out, {"a": 8})  # 7 8 9 7 8 9 7 8: suffix [9, 7, 8] recurs at 2..4, then come 9, 7, 8
    out = s.schedule()
    (entry,) = out.scheduled
    assert entry.draft_token_ids == [9, 7, 8] and entry.num_new_tokens == 4 and entry.sample
    assert entry.start_pos == req.num_computed_tokens == 7
    # the model agrees with 9, 7 then says 5: two accepted, 5 is its own token
    updates = s.update_from_output(out, {"a": [9, 7, 5, 1]})
    assert updates[0].new_token_ids == [9, 7, 5]
    assert req.output_token_ids == [8, 9, 7, 5] and req.num_computed_tokens == 7 + 1 + 2
    assert (s.num_draft_tokens, s.num_accepted_tokens) == (3, 2)
    kv = s.kv_cache_manager
    s.finish_requests("a", RequestStatus.FINISHED_ABORTED)
    assert kv.num_free_blocks == kv.num_total_blocks
    # a stop token inside the confirmed run ends the request at it
    req = Request("b", [7, 8, 9, 7, 8, 9, 7], SamplingParams(max_tokens=20, temperature=0.0), eos_token_ids=(2,))
    s.add_request(req)
    s.update_from_output(s.schedule(), {"b": 8})
    out = s.schedule()
    assert out.scheduled[0].draft_token_ids == [9, 7, 8]
    updates = s.update_from_output(out, {"b": [9, 2, 8, 9]})  # 9 confirmed, then the model's eos
    assert updates[0].new_token_ids == [9, 2] and req.status == RequestStatus.FINISHED_STOPPED
    assert req.output_token_ids == [8, 9, 2] and kv.num_free_blocks == kv.num_total_blocks


def test_drafts_respect_max_tokens_sampling_and_the_cache():
    s = scheduler()
    req = Request("a", [1, 2, 1, 2, 1], SamplingParams(max_tokens=3, temperature=0.0))
    s.add_request(req)
    s.update_from_output(s.schedule(), {"a": 2})
    out = s.schedule()
    # two outputs may still come: at most one draft token (+ the model's own)
    assert out.scheduled[0].draft_token_ids == [1]
    sampled = Request("b", [1, 2, 1, 2, 1], SamplingParams(max_tokens=8, temperature=0.9, seed=1))
    s2 = scheduler()
    s2.add_request(sampled)
    s2.update_from_output(s2.schedule(), {"b": 2})
    assert s2.schedule().scheduled[0].draft_token_ids == []  # only greedy requests speculate
    # no free block for the draft: a plain decode, nobody preempted for a guess
    tight = scheduler(num_blocks=2)
    r = Request("c", [1, 2, 1, 2, 1, 2, 1], SamplingParams(max_tokens=1 + 1, temperature=0.0))
    tight.add_request(r)
    tight.update_from_output(tight.schedule(), {"c": 2})
    out = tight.schedule()
    assert out.scheduled[0].num_new_tokens == 1 and not out.preempted_request_ids


# ---- the engine -------------------------------------------------------------------------------------------------
def repetitive_prompt(i: int) -> list[int]:
    base = [(31 * i + 7 * k) % 30000 + 200 for k in range(6 + i % 3)]
    return base * 3 + base[:2 + i % 4]


def two_adapter_engines(tiny_dir, tmp_path, dtype: str, variants: dict) -> dict:
    """{name: an engine with LoRA (tests/adapters/test_lora_engine.py's lora_engine) and `variants[name]`'s engine
    arguments}, each with the same two random rank-8 adapters: (1, 1) on q/v, (2, 1) on the MLP and o."""
    from loraplex.engine.llm_engine import _read_model_config
    from tests.adapters.peft_factory import write_random_peft
    from tests.adapters.test_lora_engine import lora_engine

    config = _read_model_config(str(tiny_dir))
    engines = {}
    for name, fields in variants.items():
        engine = lora_engine(tiny_dir, dtype=dtype, **fields)
        for i, targets in enumerate([("q_proj", "v_proj"), ("gate_proj", "up_proj", "down_proj", "o_proj")]):
            folder = write_random_peft(tmp_path / f"{name}-{i}", config, r=8, target_modules=targets, seed=i, std=0.3)
            engine.adapter_hook.register_adapter(f"a{i}", i + 1, 1, str(folder))
        engines[name] = engine
    return engines


def alone_and_mixed(engine, requests: dict) -> tuple[dict, dict]:
    """(the greedy requests, ids "g...", each run alone; every request run together), each request's tokens; after
    both, every KV block is free again and no adapter pinned."""
    from tests.adapters.test_lora_engine import run

    alone = {rid: run(engine, {"x": req})["x"] for rid, req in requests.items() if rid.startswith("g")}
    mixed = run(engine, requests)
    kv = engine.scheduler.kv_cache_manager
    assert kv.num_free_blocks == kv.num_total_blocks and not engine.adapter_hook._pinned
    return alone, mixed


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_speculative_outputs_equal_plain_greedy_alone_and_in_mixed_adapter_batches(tiny_dir, tmp_path, dtype):
    spec = '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 1}'
    engines = two_adapter_engines(tiny_dir, tmp_path, dtype, {"plain": {}, "spec": {"speculative_config": spec}})
    greedy = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    keys = [None, (1, 1), (2, 1)]
    requests = {f"g{j}-{k}": (repetitive_prompt(j), greedy, k) for j in range(3) for k in keys}
    # beside them: a seeded sampled request and a greedy one with logprobs (neither speculates)
    requests["sampled"] = (repetitive_prompt(5), SamplingParams(max_tokens=12, temperature=0.8, seed=3), (1, 1))
    requests["logprobs"] = (repetitive_prompt(6), SamplingParams(max_tokens=12, temperature=0.0, logprobs=2), None)
    out = {name: alone_and_mixed(engine, requests) for name, engine in engines.items()}
    assert out["spec"] == out["plain"]
    stats = engines["spec"].stats()
    assert stats.spec_draft_tokens > 0 and 0 < stats.spec_accepted_tokens <= stats.spec_draft_tokens
    assert engines["plain"].stats().spec_draft_tokens == 0


def test_stop_strings_end_a_speculative_run_at_their_own_token(default_model_dir):
    from loraplex.engine.llm_engine import LLMEngine

    outs = {}
    for spec in (None, '{"method": "ngram", "num_speculative_tokens": 6, "prompt_lookup_min": 1}'):
        engine = LLMEngine.from_engine_args(EngineArgs(model=default_model_dir, dtype="float32", max_num_seqs=4,
                                                       kv_cache_memory_bytes=64 << 20, speculative_config=spec))
        tok = engine.tokenizer
        prompt = tok.apply_chat_template([{"role": "user", "content": "Repeat exactly: one two three four five six "
                                           "seven eight nine ten. one two three four five six seven eight."}],
                                         add_generation_prompt=True, tokenize=False)
        ids = tok.encode(prompt)
        engine.add_request("r", ids, SamplingParams(max_tokens=40, temperature=0.0, stop=("seven",)))
        text, tokens, final = "", [], None
        while engine.has_unfinished_requests():
            for o in engine.step():
                text += o.text
                tokens += o.token_ids
                final = o
        outs[spec] = (text, tokens, final.num_output_tokens, final.finish_reason, final.stop_reason)
    plain, spec = outs.values()
    assert plain == spec and plain[3] == "stop" and plain[4] == "seven"


def test_a_rejected_draft_backs_off_and_a_busy_batch_stops_drafting():
    from loraplex.engine.core.spec_decode import Backoff
    b = Backoff()
    pattern = []
    for accepted in (0, 0, 0, 2):
        assert b.ready()
        b.record(accepted)
        skipped = 0
        while not b.ready():
            skipped += 1
        pattern.append(skipped)
    assert pattern == [1, 2, 4, 0]  # 1, 2, 4 steps after each rejection; reset on success
    # in the scheduler: a draft the model rejects outright is not proposed again on the next step
    s = scheduler()
    req = Request("a", [7, 8, 9, 7, 8, 9, 7], SamplingParams(max_tokens=20, temperature=0.0))
    s.add_request(req)
    s.update_from_output(s.schedule(), {"a": 8})
    out = s.schedule()
    assert out.scheduled[0].draft_token_ids
    s.update_from_output(out, {"a": [1] * out.scheduled[0].num_new_tokens})
    out = s.schedule()
    assert out.scheduled[0].draft_token_ids == [] and out.scheduled[0].num_new_tokens == 1
    # disable_by_batch_size: with that many requests running nobody drafts
    busy = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=128),
                     KVCacheManager(64, 4, enable_prefix_caching=True),
                     speculative=SpeculativeConfig(num_speculative_tokens=4, prompt_lookup_min=1,
                                                   disable_by_batch_size=2))
    for rid in ("x", "y"):
        busy.add_request(Request(rid, [7, 8, 9, 7, 8, 9, 7], SamplingParams(max_tokens=20, temperature=0.0)))
    busy.update_from_output(busy.schedule(), {"x": 8, "y": 8})
    assert all(not e.draft_token_ids for e in busy.schedule().scheduled)
