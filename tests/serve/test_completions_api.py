"""/v1/completions and /v1/models against the fake engine."""
from __future__ import annotations

import json

import pytest

from tests.serve.fake_engine import DEFAULT_REPLY, MODEL_NAME


def _complete(client, **body):
    return client.post("/v1/completions", json={"model": MODEL_NAME, **body})


def test_string_prompt(client, engine):
    r = _complete(client, prompt="Once upon", max_tokens=5)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
    assert body["model"] == MODEL_NAME and isinstance(body["created"], int)
    assert body["choices"] == [{"index": 0, "text": DEFAULT_REPLY[:5], "logprobs": None,
                                "finish_reason": "length", "stop_reason": None}]
    [req] = engine.requests.values()
    assert req.prompt_token_ids == engine.tokenizer.encode("Once upon")
    assert body["usage"] == {"prompt_tokens": 9, "completion_tokens": 5, "total_tokens": 14}


def test_list_of_strings_and_n(client, engine):
    r = _complete(client, prompt=["ab", "cde"], n=2, max_tokens=2)
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert sorted(len(req.prompt_token_ids) for req in engine.requests.values()) == [2, 2, 3, 3]
    assert body["usage"]["prompt_tokens"] == 5  # each prompt counted once, not once per sample
    assert body["usage"]["completion_tokens"] == 8


def test_token_id_prompts(client, engine):
    r = _complete(client, prompt=[1, 2, 3], max_tokens=2)
    assert r.status_code == 200, r.text
    assert [req.prompt_token_ids for req in engine.requests.values()] == [[1, 2, 3]]
    r = _complete(client, prompt=[[4, 5], [6]], max_tokens=2)
    assert r.status_code == 200 and len(r.json()["choices"]) == 2
    assert [4, 5] in [req.prompt_token_ids for req in engine.requests.values()]


def test_bad_prompts(client):
    for prompt in ([], "", [[]], [1, 10**6], ["a", 1]):
        r = _complete(client, prompt=prompt)
        assert r.status_code == 400, (prompt, r.text)
        assert r.json()["error"]["param"] == "prompt"


def test_echo(client):
    body = _complete(client, prompt="Say:", echo=True, max_tokens=3).json()
    assert body["choices"][0]["text"] == "Say:" + DEFAULT_REPLY[:3]
    body = _complete(client, prompt=[83, 64], echo=True, max_tokens=1).json()  # token ids echo decoded
    assert body["choices"][0]["text"] == "ta" + DEFAULT_REPLY[:1]


def test_completion_logprobs_shape(client, engine):
    body = _complete(client, prompt="x", logprobs=2, max_tokens=4).json()
    lp = body["choices"][0]["logprobs"]
    assert lp["tokens"] == list(DEFAULT_REPLY[:4])
    assert lp["token_logprobs"] == [-0.5] * 4
    assert lp["text_offset"] == [0, 1, 2, 3]
    assert all(len(top) == 2 and tok in top for tok, top in zip(lp["tokens"], lp["top_logprobs"]))
    assert next(iter(engine.requests.values())).params.logprobs == 2


def test_streaming_completion_logprobs_offsets(client):
    r = _complete(client, prompt="x", logprobs=0, max_tokens=3, stream=True)
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    offsets = [o for c in chunks if c["choices"][0]["logprobs"] for o in c["choices"][0]["logprobs"]["text_offset"]]
    assert offsets == [0, 1, 2]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_streaming_completions_with_openai_client(oai):
    stream = oai.completions.create(model=MODEL_NAME, prompt=["a", "b"], max_tokens=4, stream=True,
                                    stream_options={"include_usage": True})
    chunks = list(stream)
    for index in (0, 1):
        text = "".join(ch.text for c in chunks for ch in c.choices if ch.index == index)
        assert text == DEFAULT_REPLY[:4]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == 2 + 8


def test_completions_with_openai_client(oai):
    resp = oai.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=6, echo=True)
    assert resp.choices[0].text == "Hi" + DEFAULT_REPLY[:6]
    assert resp.usage.prompt_tokens == 2


def test_models(client, engine, oai):
    body = client.get("/v1/models").json()
    assert body["object"] == "list"
    [card] = body["data"]
    assert card["id"] == MODEL_NAME and card["object"] == "model" and card["owned_by"] == "loraplex"
    assert card["max_model_len"] == engine.max_model_len
    assert [m.id for m in oai.models.list()] == [MODEL_NAME]
    assert oai.models.retrieve(MODEL_NAME).id == MODEL_NAME
    assert client.get("/v1/models/nope").status_code == 404


def test_model_field_optional_defaults_to_first_served(client):
    r = client.post("/v1/completions", json={"prompt": "a", "max_tokens": 1})
    assert r.status_code == 200 and r.json()["model"] == MODEL_NAME


@pytest.mark.parametrize("text", ["plain", 'quote " and \\\\ backslash', "line\nbreak\ttab", "ünïcödé ✓ 漢字",
                                  "\x00\x01 control", "\u2028", ""])
def test_per_token_chunks_are_the_models_json(text):
    """Streamed tokens are spliced into a template the models serialized once: the same JSON as the models give."""
    from loraplex.serve.routes import _TextChunks
    from loraplex.serve.schemas import (
        ChatChunkChoice,
        ChatCompletionChunk,
        CompletionChoice,
        CompletionResponse,
        DeltaMessage,
    )

    def chat(index, t):
        return ChatCompletionChunk(id="chatcmpl-1", created=5, model="m", choices=[
            ChatChunkChoice(index=index, delta=DeltaMessage(content=t))]).model_dump_json()

    def completion(index, t):
        return CompletionResponse(id="cmpl-1", created=5, model="m",
                                  choices=[CompletionChoice(index=index, text=t)]).model_dump_json()

    for build in (chat, completion):
        chunks = _TextChunks(build)
        for index in (0, 3):
            assert json.loads(chunks(index, text)) == json.loads(build(index, text))
        assert chunks._parts[0] is not None  # the template path, not the fallback
