"""--stream-interval-ms through the real server: streamed events carry several tokens each, and the text, the
logprobs, their text offsets and the usage are those of the same request not streamed."""
from __future__ import annotations

import json

import httpx
import pytest

from tests.e2e.conftest import smol_server

pytestmark = pytest.mark.e2e
TOKENS = 24


@pytest.fixture(scope="module")
def server(default_model_dir):
    srv = smol_server(default_model_dir, "--max-model-len", "256", "--max-num-seqs", "4", "--stream-interval-ms", "400")
    yield srv
    srv.stop()


def events(server, path: str, body: dict) -> list[dict]:
    out = []
    with httpx.stream("POST", server.base_url + path, json={**body, "stream": True,
                                                             "stream_options": {"include_usage": True}},
                      timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                out.append(json.loads(line[6:]))
    return out


def test_completions_stream_groups_tokens_and_keeps_text_and_logprobs(server):
    body = {"model": "smol", "prompt": "The history of the printing press", "max_tokens": TOKENS, "temperature": 0,
            "ignore_eos": True, "logprobs": 2}
    whole = httpx.post(server.base_url + "/v1/completions", json=body, timeout=120).json()["choices"][0]
    streamed = events(server, "/v1/completions", body)
    parts = [e["choices"][0] for e in streamed if e["choices"] and e["choices"][0]["logprobs"]]
    assert 2 <= len(parts) < TOKENS  # grouped: fewer events than tokens
    assert len(parts[0]["logprobs"]["tokens"]) == 1  # the first token alone, at once
    assert "".join(p["text"] for p in parts) == whole["text"]
    for field in ("tokens", "token_logprobs", "text_offset"):
        assert [v for p in parts for v in p["logprobs"][field]] == whole["logprobs"][field]
    assert streamed[-1]["usage"]["completion_tokens"] == TOKENS


def test_chat_stream_groups_tokens(server):
    body = {"model": "smol", "messages": [{"role": "user", "content": "Describe the sea."}], "max_tokens": TOKENS,
            "temperature": 0, "ignore_eos": True, "logprobs": True}
    whole = httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=120).json()["choices"][0]
    streamed = events(server, "/v1/chat/completions", body)
    parts = [e["choices"][0] for e in streamed if e["choices"] and e["choices"][0].get("logprobs")]
    counts = [len(p["logprobs"]["content"]) for p in parts]
    assert sum(counts) == TOKENS and counts[0] == 1 and len(parts) < TOKENS
    assert "".join(p["delta"].get("content") or "" for p in parts) == whole["message"]["content"]
    assert [t["token"] for p in parts for t in p["logprobs"]["content"]] == \
        [t["token"] for t in whole["logprobs"]["content"]]
