"""Prompt logprobs over HTTP, as eval harnesses ask for them: /v1/completions with echo + logprobs (max_tokens 0
and more), vLLM's prompt_logprobs on both endpoints, for the base model and an adapter, alone and inside a busy
mixed batch, with prefix caching on; against a float32 transformers + peft log-softmax."""
from __future__ import annotations

import concurrent.futures
import json

import httpx
import peft
import pytest
import torch
import transformers

from tests.e2e.conftest import smol_server
from tests.engine.test_models import ATOL, DEFAULT_MODEL_ATOL

pytestmark = pytest.mark.e2e
TEXTS = ["Question: What is the boiling point of water at sea level? Answer: 100 degrees Celsius.",
         "The quick brown fox jumps over the lazy dog, and then it runs into the forest to hide."]


@pytest.fixture(scope="module")
def server(default_model_dir, quill_adapter):
    srv = smol_server(default_model_dir, "--max-model-len", "512", "--max-num-seqs", "16",
                      "--lora-modules", f"quill={quill_adapter}")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def reference(default_model_dir, quill_adapter):
    """model name -> ids -> [len(ids), vocab] float32 log-softmax (row p scores token p + 1); and the tokenizer."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(default_model_dir)
    base = transformers.AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    with_adapter = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32), quill_adapter).eval()

    def logprobs(model: str, ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            logits = (base if model == "smol" else with_adapter)(torch.tensor([ids])).logits[0]
        return torch.log_softmax(logits.float(), dim=-1)

    return logprobs, tokenizer


def complete(server, **body) -> httpx.Response:
    return httpx.post(server.base_url + "/v1/completions", json=body, timeout=120)


def assert_echo_matches(reference, model: str, ids: list[int], choice: dict, num_top: int, atol: float) -> None:
    ref, tokenizer = reference
    lp = choice["logprobs"]
    want = ref(model, ids)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    got = torch.tensor(lp["token_logprobs"][1:len(ids)])
    torch.testing.assert_close(got, want[torch.arange(len(ids) - 1), torch.tensor(ids[1:])], atol=atol, rtol=0)
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
    for p in range(1, len(ids)):
        top = lp["top_logprobs"][p]
        assert len(top) in (num_top, num_top + 1)  # the prompt token itself is always listed
        best = max(top.values())
        assert abs(best - float(want[p - 1].max())) <= atol


@pytest.mark.parametrize("model", ["smol", "quill"])
def test_echo_with_max_tokens_zero_scores_the_prompt(server, reference, model):
    ids = reference[1](TEXTS[0]).input_ids
    r = complete(server, model=model, prompt=ids, echo=True, logprobs=3, max_tokens=0, temperature=0)
    assert r.status_code == 200, r.text
    body = r.json()
    choice = body["choices"][0]
    assert len(choice["logprobs"]["tokens"]) == len(ids)  # the prompt only
    assert choice["text"] == reference[1].decode(ids) and choice["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}
    assert_echo_matches(reference, model, ids, choice, 3, ATOL)  # one prefill chunk: transformers' row count


def test_echo_with_a_completion_and_prompt_logprobs_field(server, reference):
    ids = reference[1](TEXTS[1]).input_ids
    r = complete(server, model="quill", prompt=ids, echo=True, logprobs=1, max_tokens=3, temperature=0,
                 prompt_logprobs=2)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(ids) + 3 and r.json()["usage"]["completion_tokens"] == 3
    assert choice["text"].startswith(reference[1].decode(ids)) and "".join(lp["tokens"][len(ids):]) in choice["text"]
    assert all(v is not None for v in lp["token_logprobs"][len(ids):])
    assert_echo_matches(reference, "quill", ids, choice, 1, ATOL)
    # vLLM's prompt_logprobs: None first, then {token id: logprob, rank, decoded_token} with the token itself
    plp = choice["prompt_logprobs"]
    assert len(plp) == len(ids) and plp[0] is None
    for p in range(1, len(ids)):
        entry = plp[p][str(ids[p])]
        assert entry["logprob"] == pytest.approx(lp["token_logprobs"][p], abs=1e-6) and entry["rank"] >= 1
        assert len(plp[p]) in (2, 3) and any(e["rank"] == 1 for e in plp[p].values())


def test_chat_prompt_logprobs(server, reference):
    r = httpx.post(server.base_url + "/v1/chat/completions", timeout=120, json={
        "model": "smol", "messages": [{"role": "user", "content": "Hi there"}], "max_tokens": 2, "prompt_logprobs": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    plp = body["prompt_logprobs"]
    assert len(plp) == body["usage"]["prompt_tokens"] and plp[0] is None and all(len(e) == 1 for e in plp[1:])
    plain = httpx.post(server.base_url + "/v1/chat/completions", timeout=120, json={
        "model": "smol", "messages": [{"role": "user", "content": "Hi there"}], "max_tokens": 2}).json()
    assert "prompt_logprobs" not in plain and "prompt_logprobs" not in plain["choices"][0]


def test_busy_mixed_batch_and_prefix_cache(server, reference):
    """Scoring requests for the base model and the adapter while streams of both generate; each prompt twice, the
    second time with its blocks cached (a scoring request reads no cached prefix: the same logprobs)."""
    tokenizer = reference[1]
    jobs = []
    for i in range(6):
        jobs.append(dict(model=["smol", "quill"][i % 2], prompt=f"Story {i}: once upon a time", max_tokens=24,
                         temperature=0.7, seed=i))
    scoring = [(model, tokenizer(text).input_ids) for model in ("smol", "quill") for text in TEXTS]
    for model, ids in scoring:
        jobs.append(dict(model=model, prompt=ids, echo=True, logprobs=2, max_tokens=0))
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        first = list(pool.map(lambda body: complete(server, **body), jobs))
    assert all(r.status_code == 200 for r in first), [r.text for r in first if r.status_code != 200]
    for (model, ids), r in zip(scoring, first[6:]):
        assert_echo_matches(reference, model, ids, r.json()["choices"][0], 2, DEFAULT_MODEL_ATOL)
    again = [complete(server, **body) for body in jobs[6:]]
    for r1, r2 in zip(first[6:], again):
        assert r2.json()["choices"][0]["logprobs"]["tokens"] == r1.json()["choices"][0]["logprobs"]["tokens"]
        torch.testing.assert_close(torch.tensor(r2.json()["choices"][0]["logprobs"]["token_logprobs"][1:]),
                                   torch.tensor(r1.json()["choices"][0]["logprobs"]["token_logprobs"][1:]),
                                   atol=DEFAULT_MODEL_ATOL, rtol=0)


def test_streamed_echo_with_logprobs(server, reference):
    ids = reference[1](TEXTS[0]).input_ids
    with httpx.stream("POST", server.base_url + "/v1/completions", timeout=120, json={
            "model": "smol", "prompt": ids, "echo": True, "logprobs": 1, "max_tokens": 2, "temperature": 0,
            "ignore_eos": True, "stream": True}) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    chunks = [json.loads(e) for e in events[:-1]]
    assert events[-1] == "[DONE]"
    first = chunks[0]["choices"][0]
    assert first["text"] == reference[1].decode(ids) and len(first["logprobs"]["tokens"]) == len(ids)
    assert first["logprobs"]["token_logprobs"][0] is None
    assert sum(len(c["choices"][0]["logprobs"]["tokens"]) for c in chunks[1:] if c["choices"][0]["logprobs"]) == 2


def test_bad_scoring_requests_are_400(server):
    r = complete(server, model="smol", prompt="hi", max_tokens=0)
    assert r.status_code == 400 and "max_tokens" in r.json()["error"]["message"]
    r = complete(server, model="smol", prompt="hi", max_tokens=2, prompt_logprobs=1, stream=True)
    assert r.status_code == 400 and "prompt_logprobs" in r.json()["error"]["message"]
    r = complete(server, model="smol", prompt="hi", max_tokens=2, prompt_logprobs=21)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_logprobs"
    assert complete(server, model="smol", prompt="hi", max_tokens=2).status_code == 200
