"""/v1/chat/completions against the fake engine: shapes, streaming, logprobs, sampling parameters."""
from __future__ import annotations

import json

from tests.serve.fake_engine import DEFAULT_REPLY, MODEL_NAME

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]


def _chat(client, **body):
    return client.post("/v1/chat/completions", json={"model": MODEL_NAME, "messages": MESSAGES, **body})


def _sse_events(text: str) -> list[str]:
    return [line.removeprefix("data: ") for line in text.splitlines() if line.startswith("data: ")]


def test_chat_non_streaming_shape(client, engine):
    r = _chat(client)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("chatcmpl-")
    assert body["object"] == "chat.completion"
    assert isinstance(body["created"], int) and body["model"] == MODEL_NAME
    [choice] = body["choices"]
    assert choice == {"index": 0, "message": {"role": "assistant", "content": DEFAULT_REPLY},
                      "logprobs": None, "finish_reason": "stop", "stop_reason": None}
    [req] = engine.requests.values()
    template = engine.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert req.prompt_token_ids == engine.tokenizer.encode(template, add_special_tokens=False)
    assert template.endswith("<|im_start|>assistant\n")
    n_prompt, n_out = len(req.prompt_token_ids), len(engine.reply_ids) + 1  # + EOS
    assert body["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}
    # max_tokens left out: the rest of the context, like vLLM
    assert req.params.max_tokens == engine.max_model_len - n_prompt


def test_chat_content_parts_and_max_tokens(client, engine):
    parts = [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]
    r = client.post("/v1/chat/completions", json={"model": MODEL_NAME, "max_tokens": 3,
                                                  "messages": [{"role": "user", "content": parts}]})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["message"]["content"] == DEFAULT_REPLY[:3] and choice["finish_reason"] == "length"
    [req] = engine.requests.values()
    assert "Hi\nthere" in engine.tokenizer.decode(req.prompt_token_ids)
    assert r.json()["usage"]["completion_tokens"] == 3


def test_max_completion_tokens_wins(client, engine):
    r = _chat(client, max_tokens=10, max_completion_tokens=4)
    assert r.status_code == 200
    [req] = engine.requests.values()
    assert req.params.max_tokens == 4


def test_sampling_params_conversion(client, engine):
    r = _chat(client, temperature=0.5, top_p=0.9, presence_penalty=0.1, frequency_penalty=0.2, seed=7,
              stop="zz", max_tokens=20, top_k=5, min_p=0.05, repetition_penalty=1.1, stop_token_ids=[3],
              ignore_eos=True, min_tokens=2, include_stop_str_in_output=True, skip_special_tokens=False,
              some_unknown_field={"ignored": True})
    assert r.status_code == 200, r.text
    [req] = engine.requests.values()
    p = req.params
    assert (p.temperature, p.top_p, p.presence_penalty, p.frequency_penalty, p.seed) == (0.5, 0.9, 0.1, 0.2, 7)
    assert (p.stop, p.top_k, p.min_p, p.repetition_penalty, p.stop_token_ids) == (("zz",), 5, 0.05, 1.1, (3,))
    assert p.ignore_eos and p.min_tokens == 2 and p.include_stop_str_in_output and not p.skip_special_tokens
    assert p.logprobs is None and p.max_tokens == 20


def test_stop_string(client):
    r = _chat(client, stop=["am"])
    choice = r.json()["choices"][0]
    assert choice["message"]["content"] == "Hello! I " and choice["finish_reason"] == "stop"
    assert choice["stop_reason"] == "am"


def test_n_with_seed_gives_distinct_seeds(client, engine):
    r = _chat(client, n=3, seed=11, max_tokens=5)
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert sorted(req.params.seed for req in engine.requests.values()) == [11, 12, 13]
    assert len(set(engine.requests)) == 3
    assert body["usage"]["completion_tokens"] == 15
    assert body["usage"]["prompt_tokens"] == len(next(iter(engine.requests.values())).prompt_token_ids)


def test_chat_logprobs_shape(client, engine):
    r = _chat(client, logprobs=True, top_logprobs=2, max_tokens=4)
    assert r.status_code == 200, r.text
    [req] = engine.requests.values()
    assert req.params.logprobs == 2
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert [e["token"] for e in content] == list(DEFAULT_REPLY[:4])
    for entry in content:
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
        assert entry["bytes"] == list(entry["token"].encode()) and entry["logprob"] == -0.5
        assert len(entry["top_logprobs"]) == 2
        assert set(entry["top_logprobs"][0]) == {"token", "logprob", "bytes"}


def test_chat_logprobs_without_top(client, engine):
    r = _chat(client, logprobs=True, max_tokens=2)
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert len(content) == 2 and all(e["top_logprobs"] == [] for e in content)
    assert next(iter(engine.requests.values())).params.logprobs == 0


def test_chat_streaming_raw_sse(client):
    with client.stream("POST", "/v1/chat/completions",
                       json={"model": MODEL_NAME, "messages": MESSAGES, "stream": True,
                             "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = _sse_events(r.read().decode())
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert content == DEFAULT_REPLY
    finish = chunks[-2]["choices"][0]
    assert finish["delta"] == {} and finish["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == len(DEFAULT_REPLY) + 1
    assert all(c["usage"] is None for c in chunks[:-1])


def test_chat_streaming_with_openai_client(oai):
    stream = oai.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, stream=True,
                                         stream_options={"include_usage": True}, logprobs=True, top_logprobs=1)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == DEFAULT_REPLY
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == len(DEFAULT_REPLY) + 1
    tokens = [lp.token for c in chunks if c.choices and c.choices[0].logprobs
              for lp in c.choices[0].logprobs.content]
    assert "".join(tokens) == DEFAULT_REPLY + "<|im_end|>"


def test_chat_with_openai_client(oai):
    resp = oai.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=5, n=2)
    assert resp.object == "chat.completion"
    assert [c.message.content for c in resp.choices] == [DEFAULT_REPLY[:5]] * 2
    assert resp.usage.completion_tokens == 10


def test_streaming_n2_interleaves_and_finishes_both(client):
    r = _chat(client, stream=True, n=2, max_tokens=3)
    chunks = [json.loads(e) for e in _sse_events(r.text)[:-1]]
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert mine[0]["delta"]["role"] == "assistant"
        assert "".join(c["delta"].get("content", "") for c in mine) == DEFAULT_REPLY[:3]
        assert mine[-1]["finish_reason"] == "length"
