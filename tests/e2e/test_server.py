"""The default model behind a real server, driven by the official openai client and raw HTTP."""
from __future__ import annotations

import asyncio
import json
import re
import sys
from pathlib import Path

import httpx
import openai
import pytest

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)


def test_models_lists_the_served_model(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["smol"]


def test_chat_non_streamed(client):
    r = client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "What is 2+2?"}],
                                       max_tokens=12, temperature=0)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 12 and r.usage.prompt_tokens > 5


def test_chat_streamed_matches_non_streamed(client):
    msgs = [{"role": "user", "content": "Name a colour."}]
    full = client.chat.completions.create(model="smol", messages=msgs, max_tokens=16, temperature=0)
    stream = client.chat.completions.create(model="smol", messages=msgs, max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[-1].choices == []


def test_the_benchmarks_lean_stream_client_reads_what_the_openai_client_reads(server, client):
    """scripts/bench/sse_client.py (the latency benchmarks' client): the same text as the official client's
    non-streamed answer, chunked framing taken apart, the token count from the usage event (an event may carry
    several tokens: --stream-interval-ms); an error status raised, not read as an empty stream."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts" / "bench"))
    from sse_client import HTTPStatusError, run_concurrently, stream_events, time_per_token, timed_stream, token_stamps
    body = {"model": "smol", "prompt": "The capital of France is", "max_tokens": 12, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    full = client.completions.create(model="smol", prompt=body["prompt"], max_tokens=12, temperature=0,
                                     extra_body={"ignore_eos": True})
    events = [json.loads(e) for _, e in stream_events(server.base_url, "/v1/completions", body)]
    assert "".join(c["choices"][0]["text"] for c in events if c["choices"]) == full.choices[0].text
    assert events[-1]["usage"]["completion_tokens"] == 12
    timed = run_concurrently([lambda: timed_stream(server.base_url, "/v1/completions", body)] * 2)
    for stamps, tokens in timed:  # at most one event per token, in order; the count from the usage
        assert tokens == 12 and 2 <= len(stamps) <= 12 and stamps == sorted(stamps)
        assert time_per_token(stamps, tokens) == (stamps[-1] - stamps[0]) / 11 > 0
    chat = token_stamps(server.base_url, "/v1/chat/completions", {
        "model": "smol", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "stream": True,
        "ignore_eos": True, "temperature": 0})
    assert 1 <= len(chat) <= 5
    with pytest.raises(HTTPStatusError, match="HTTP 404"):
        token_stamps(server.base_url, "/v1/completions", {**body, "model": "no-such-model"})


def test_completions_string_list_and_token_ids(client):
    r = client.completions.create(model="smol", prompt="The capital of France is", max_tokens=5, temperature=0)
    assert r.choices[0].text
    r2 = client.completions.create(model="smol", prompt=["One", "Two"], max_tokens=3, temperature=0)
    assert [c.index for c in r2.choices] == [0, 1]
    r3 = client.completions.create(model="smol", prompt=[504, 3575, 282, 4649, 314], max_tokens=3, temperature=0)
    assert r3.usage.prompt_tokens == 5


@pytest.mark.parametrize("body,status", [
    (b"{not json", 400),
    (b'{"model": "smol", "messages": "hello"}', 400),
    (b'{"model": "smol", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -3}', 400),
    (b'{"model": "nope", "messages": [{"role": "user", "content": "hi"}]}', 404),
    (b'{"model": "smol", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}', 400),
])
def test_bad_requests_get_openai_errors(server, client, body, status):
    r = httpx.post(f"{server.base_url}/v1/chat/completions", content=body,
                   headers={"content-type": "application/json"})
    assert r.status_code == status
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"} and err["message"]
    assert client.completions.create(model="smol", prompt="Hi", max_tokens=2).choices  # still serving


def test_over_long_prompt_is_400(server, client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="smol", prompt="hello " * 2000, max_tokens=4)
    assert "context length" in str(e.value)
    assert client.completions.create(model="smol", prompt="Hi", max_tokens=2).choices


def free_blocks(server) -> float:
    text = httpx.get(f"{server.base_url}/metrics").text
    m = re.search(r"^loraplex:kv_cache_free_blocks(?:\{[^}]*\})? ([0-9.e+]+)$", text, re.M)
    assert m, "free-block gauge missing from /metrics"
    return float(m.group(1))


def test_disconnecting_stream_clients_free_their_blocks(server):
    start = free_blocks(server)

    async def disconnect_after_first_tokens(i: int) -> int:
        body = {"model": "smol", "stream": True, "max_tokens": 200, "ignore_eos": True,
                "messages": [{"role": "user", "content": f"Tell me a long story number {i}."}]}
        n = 0
        async with httpx.AsyncClient(timeout=120) as c:
            async with c.stream("POST", f"{server.base_url}/v1/chat/completions", json=body) as resp:
                assert resp.status_code == 200
                async for line in resp.aiter_lines():
                    if line.startswith("data: "):
                        n += 1
                        if n >= 3:
                            break  # leaving the block closes the connection mid-stream
        return n

    async def main():
        return await asyncio.gather(*(disconnect_after_first_tokens(i) for i in range(20)))

    assert all(n >= 3 for n in asyncio.run(main()))
    for _ in range(100):
        if free_blocks(server) == start:
            break
        asyncio.run(asyncio.sleep(0.2))
    assert free_blocks(server) == start


def test_dead_engine_process_gives_503_not_a_hang(default_model_dir):
    import os
    import signal
    import time

    from tests.e2e.conftest import Server
    srv = Server(["--model", str(default_model_dir), "--dtype", "float32", "--max-model-len", "256"])
    try:
        children = [int(p) for p in open(f"/proc/{srv.proc.pid}/task/{srv.proc.pid}/children").read().split()]
        cores = [p for p in children if b"spawn_main" in open(f"/proc/{p}/cmdline", "rb").read()]
        assert len(cores) == 1, "the engine runs in one child process"
        os.kill(cores[0], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while httpx.get(f"{srv.base_url}/health").status_code != 503 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert httpx.get(f"{srv.base_url}/health").status_code == 503
        r = httpx.post(f"{srv.base_url}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
    finally:
        srv.stop()



def test_logit_bias_bans_and_forces_tokens(client, default_model_dir):
    import transformers
    tokenizer = transformers.AutoTokenizer.from_pretrained(default_model_dir)
    kw = dict(model="smol", prompt="The capital of France is", max_tokens=6, temperature=0)
    plain = client.completions.create(**kw).choices[0].text
    banned_ids = set(tokenizer(plain, add_special_tokens=False).input_ids)
    banned = client.completions.create(**kw, logit_bias={str(t): -100 for t in banned_ids}).choices[0].text
    assert banned != plain and not set(tokenizer(banned, add_special_tokens=False).input_ids) & banned_ids
    forced = client.completions.create(**kw, logit_bias={"28": 100}).choices[0].text
    assert forced == tokenizer.decode([28] * 6)
    chat = client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                          temperature=0, logit_bias={"28": 100})
    assert chat.choices[0].message.content == tokenizer.decode([28] * 3)
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(**kw, logit_bias={"9999999": 5})
    assert err.value.body["param"] == "logit_bias"
    assert client.completions.create(**kw).choices[0].text == plain  # and it keeps serving


def test_tokenize_detokenize_version_match_the_model_tokenizer(server, default_model_dir):
    import transformers
    tokenizer = transformers.AutoTokenizer.from_pretrained(default_model_dir)
    url = server.base_url
    r = httpx.post(url + "/tokenize", json={"model": "smol", "prompt": "The capital of France is"}).json()
    assert r["tokens"] == tokenizer("The capital of France is").input_ids and r["max_model_len"] == 512
    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    chat = httpx.post(url + "/tokenize", json={"model": "smol", "messages": messages}).json()
    assert chat["tokens"] == tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    completion = httpx.post(url + "/v1/chat/completions", json={"model": "smol", "messages": messages,
                                                                 "max_tokens": 1}).json()
    assert completion["usage"]["prompt_tokens"] == chat["count"]  # the same prompt the chat endpoint runs
    assert httpx.post(url + "/detokenize", json={"tokens": chat["tokens"]}).json()["prompt"] == \
        tokenizer.decode(chat["tokens"])
    assert httpx.get(url + "/version").json()["version"] == "0.1.0"


def test_bad_words_never_appear(client):
    kw = dict(model="smol", prompt="My favourite fruit is the", max_tokens=12, temperature=0)
    plain = client.completions.create(**kw).choices[0].text
    word = plain.split()[0].strip(".,!?")
    banned = client.completions.create(**kw, extra_body={"bad_words": [word]}).choices[0].text
    assert word in plain and word not in banned.split() and banned != plain
