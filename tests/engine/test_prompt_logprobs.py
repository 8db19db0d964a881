"""Prompt logprobs (SamplingParams.prompt_logprobs): each prompt token's logprob given the tokens before it,
computed from the prefill rows of the generating forward, against a float32 transformers log-softmax."""
from __future__ import annotations

import pytest
import torch
import transformers

from loraplex.engine.core.sampling_params import SamplingParams
from loraplex.engine.engine_args import EngineArgs
from loraplex.engine.llm_engine import LLMEngine
from tests.engine.test_engine import PROMPTS, encode, record_preemptions
from tests.engine.test_models import ATOL, DEFAULT_MODEL_ATOL

TEXT = ("The history of the bicycle begins in the early nineteenth century, when inventors in Germany and France "
        "built wooden machines that riders pushed along with their feet.")


@pytest.fixture(scope="module")
def hf_model(default_model_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()


def make_engine(default_model_dir, **kw) -> LLMEngine:
    args = dict(model=str(default_model_dir), dtype="float32", max_model_len=512, max_num_seqs=16,
                max_num_batched_tokens=256, num_gpu_blocks_override=256)
    return LLMEngine.from_engine_args(EngineArgs(**(args | kw)))


def hf_prompt_logprobs(hf_model, ids: list[int]) -> torch.Tensor:
    """[len(ids), vocab] float32 log-softmax: row p scores token p + 1."""
    with torch.no_grad():
        return torch.log_softmax(hf_model(torch.tensor([ids])).logits[0].float(), dim=-1)


def run(engine, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, list]:
    """request id -> its prompt logprobs (from its first output); also checks the blocks come back."""
    start = engine.scheduler.kv_cache_manager.num_free_blocks
    for rid, (ids, params) in requests.items():
        engine.add_request(rid, ids, params)
    got: dict[str, list] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.prompt_logprobs is not None:
                assert out.request_id not in got, "prompt logprobs come once, in the first output"
                got[out.request_id] = out.prompt_logprobs
    assert engine.scheduler.kv_cache_manager.num_free_blocks == start
    return got


def check(hf_model, ids: list[int], scored, num_top: int, atol: float) -> None:
    ref = hf_prompt_logprobs(hf_model, ids)
    assert [s.token_id for s in scored] == ids[1:]
    want = ref[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    torch.testing.assert_close(torch.tensor([s.logprob for s in scored]), want, atol=atol, rtol=0)
    for p, s in enumerate(scored):
        assert len(s.top_logprobs) == num_top
        assert [lp for _, _, lp in s.top_logprobs] == sorted((lp for _, _, lp in s.top_logprobs), reverse=True)
        if num_top:
            top_ids = ref[p].topk(num_top).indices.tolist()
            # ties aside, the same alternatives as transformers (float noise may swap near-equal neighbours)
            assert len(set(top_ids) & {t for t, _, _ in s.top_logprobs}) >= num_top - 1
            assert s.rank == 1 or s.logprob <= s.top_logprobs[0][2] + atol
        target = ref[p, ids[p + 1]]
        near = int(((ref[p] - target).abs() <= atol).sum())  # tokens within noise of the target: either order
        assert abs(s.rank - 1 - int((ref[p] > target).sum())) < near


def test_prompt_logprobs_match_transformers(default_model_dir, hf_model):
    engine = make_engine(default_model_dir)
    ids = encode(engine, TEXT)
    got = run(engine, {"a": (ids, SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=5))})
    check(hf_model, ids, got["a"], 5, ATOL)  # one prefill chunk: the same rows per call as transformers


def test_chunked_prefill_busy_batch_and_prefix_cache(default_model_dir, hf_model):
    """Prompt chunks of 16 tokens beside decodes of other requests; then the same prompt again, whose blocks
    are cached by then: still scored in full (a request that wants prompt logprobs reads no cached prefix)."""
    engine = make_engine(default_model_dir, max_num_batched_tokens=16)
    ids = encode(engine, TEXT)
    busy = {f"b{i}": (encode(engine, p), SamplingParams(max_tokens=12, temperature=0.8, seed=i))
            for i, p in enumerate(PROMPTS)}
    first = run(engine, busy | {"a": (ids, SamplingParams(max_tokens=4, prompt_logprobs=2))})
    assert set(first) == {"a"}  # the others asked for none
    check(hf_model, ids, first["a"], 2, DEFAULT_MODEL_ATOL)
    hits = engine.scheduler.kv_cache_manager.prefix_cache_stats.hits
    again = run(engine, {"a2": (ids, SamplingParams(max_tokens=1, prompt_logprobs=0)),
                         "plain": (ids, SamplingParams(max_tokens=1))})
    check(hf_model, ids, again["a2"], 0, DEFAULT_MODEL_ATOL)
    assert engine.scheduler.kv_cache_manager.prefix_cache_stats.hits > hits  # "plain" still used the cache


def test_one_token_prompt_has_no_prompt_logprobs(default_model_dir):
    engine = make_engine(default_model_dir)
    got = run(engine, {"a": ([504], SamplingParams(max_tokens=2, prompt_logprobs=3))})
    assert got["a"] == []


def test_bad_prompt_logprobs_value():
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=21)


def test_preemption_does_not_score_a_prompt_twice(default_model_dir):
    """A KV cache too small for everyone: requests are preempted and recomputed mid-prompt or later; each still
    gets every prompt token scored once, as when it runs alone, and every block comes back."""
    engine = make_engine(default_model_dir, num_gpu_blocks_override=10, max_num_batched_tokens=32)
    prompts = {f"r{i}": encode(engine, TEXT + f" Chapter {i}.") for i in range(4)}
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, prompt_logprobs=1)
    alone = {rid: run(engine, {rid: (ids, params)})[rid] for rid, ids in prompts.items()}
    preempted = record_preemptions(engine)
    together = run(engine, {rid: (ids, params) for rid, ids in prompts.items()})
    assert preempted, "the cache was meant to be too small"
    for rid, ids in prompts.items():
        assert [s.token_id for s in together[rid]] == ids[1:]
        torch.testing.assert_close(torch.tensor([s.logprob for s in together[rid]]),
                                   torch.tensor([s.logprob for s in alone[rid]]), atol=DEFAULT_MODEL_ATOL, rtol=0)
