"""Bad requests and engine failures become OpenAI error JSON with the right status; the app keeps serving."""
from __future__ import annotations

import openai
import pytest
from starlette.testclient import TestClient

from loraplex.engine.core.errors import EngineDeadError, QueueFullError
from loraplex.serve.app import build_app
from tests.serve.fake_engine import MODEL_NAME, FakeEngine

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "hi"}]


def _error(r, status: int, param: str | None = "any") -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param != "any":
        assert err["param"] == param, err
    return err


def _still_serving(client) -> None:
    r = client.post(CHAT, json={"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 2})
    assert r.status_code == 200, r.text


def test_malformed_json(client):
    r = client.post(CHAT, content=b'{"model": "fake-model", "messages": [',
                    headers={"content-type": "application/json"})
    err = _error(r, 400, param=None)
    assert err["type"] == "invalid_request_error" and "JSON" in err["message"]
    _error(client.post(CHAT, content=b"[1, 2]"), 400)
    _error(client.post(CHAT, content=b""), 400)
    _still_serving(client)


@pytest.mark.parametrize("patch,param", [
    ({"max_tokens": "lots"}, "max_tokens"),
    ({"max_tokens": -5}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"messages": "hi"}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages[0].content[0].type"),
    ({"n": 100}, "n"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"stop": 5}, "stop"),
    ({"temperature": -1.0}, "temperature"),  # rejected by SamplingParams (ValueError)
    ({"top_p": 0.0}, "top_p"),
    ({"model": None, "messages": None}, "messages"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
    ({"logit_bias": {"999999": 1}}, "logit_bias"),  # past the vocabulary
    ({"prompt_logprobs": 21}, "prompt_logprobs"),
    ({"bad_words": [" "]}, "bad_words"),
])
def test_invalid_fields(client, patch, param):
    body = {"model": MODEL_NAME, "messages": MESSAGES, **patch}
    err = _error(client.post(CHAT, json=body), 400, param=param)
    assert err["type"] == "invalid_request_error"
    _still_serving(client)


def test_missing_messages(client):
    _error(client.post(CHAT, json={"model": MODEL_NAME}), 400, param="messages")


def test_context_too_long(client, engine):
    err = _error(client.post(CHAT, json={"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 10_000}), 400)
    assert "maximum context length is 512 tokens" in err["message"] and err["code"] == "context_length_exceeded"
    err = _error(client.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "x" * 600}), 400, "prompt")
    assert "maximum context length" in err["message"]
    assert engine.requests == {}
    _still_serving(client)


def test_unknown_model(client, oai):
    err = _error(client.post(CHAT, json={"model": "gpt-9", "messages": MESSAGES}), 404, param="model")
    assert err["code"] == "model_not_found" and "gpt-9" in err["message"]
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model="gpt-9", messages=MESSAGES)
    _still_serving(client)


def test_queue_full_is_429_with_retry_after(client, engine, oai):
    engine.add_error = QueueFullError(4, retry_after_s=3)
    r = client.post(CHAT, json={"model": MODEL_NAME, "messages": MESSAGES})
    err = _error(r, 429)
    assert r.headers["retry-after"] == "3" and err["type"] == "rate_limit_error"
    with pytest.raises(openai.RateLimitError):
        oai.completions.create(model=MODEL_NAME, prompt="x")
    engine.add_error = None
    _still_serving(client)


def test_partial_admission_is_rolled_back(client, engine):
    calls = []
    real_add = engine.add_request

    def add_twice_then_full(request_id, prompt, params):
        calls.append(request_id)
        if len(calls) == 3:
            raise QueueFullError(4)
        return real_add(request_id, prompt, params)
    engine.add_request = add_twice_then_full
    _error(client.post(CHAT, json={"model": MODEL_NAME, "messages": MESSAGES, "n": 4}), 429)
    assert sorted(engine.aborted) == sorted(calls[:2])


def test_engine_dead_is_503(client, engine):
    engine.add_error = EngineDeadError("loop died")
    err = _error(client.post(CHAT, json={"model": MODEL_NAME, "messages": MESSAGES}), 503)
    assert err["code"] == "engine_dead"
    engine.healthy = False
    assert client.get("/health").status_code == 503


def test_engine_dies_mid_request(client, engine, oai):
    engine.fail_after_tokens = 3
    body = {"model": MODEL_NAME, "messages": MESSAGES}
    _error(client.post(CHAT, json=body), 503)
    r = client.post(CHAT, json={**body, "stream": True})
    assert r.status_code == 200  # the status line went out with the first chunk
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and '"code":"engine_dead"' in events[-2].replace(" ", "")
    with pytest.raises(openai.APIError):
        list(oai.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, stream=True))
    r = client.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "x", "stream": True, "n": 2})
    assert "engine_dead" in r.text and r.text.rstrip().endswith("data: [DONE]")


def test_unexpected_error_is_500_without_traceback(client, engine):
    engine.add_error = RuntimeError("secret internals at /home/x.py line 3")
    err = _error(client.post(CHAT, json={"model": MODEL_NAME, "messages": MESSAGES}), 500)
    assert "secret" not in err["message"] and "Traceback" not in err["message"]
    engine.add_error = None
    _still_serving(client)


def test_unknown_route_and_method(client):
    _error(client.get("/v1/nothing"), 404)
    _error(client.get(CHAT), 405)


def test_health_and_ready(engine):
    app = build_app(engine, [MODEL_NAME])
    plain = TestClient(app)  # no `with`: the lifespan has not run, the engine is not started
    assert plain.get("/ready").status_code == 503
    with TestClient(app) as client:
        assert engine.started
        assert client.get("/health").status_code == 200
        assert client.get("/ready").status_code == 200
    assert not engine.started  # the lifespan shut it down


def test_api_key():
    engine = FakeEngine()
    with TestClient(build_app(engine, [MODEL_NAME], api_key="s3cret")) as client:
        body = {"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 1}
        err = _error(client.post(CHAT, json=body), 401)
        assert err["code"] == "invalid_api_key"
        _error(client.post(CHAT, json=body, headers={"Authorization": "Bearer wrong"}), 401)
        _error(client.get("/v1/models"), 401)
        assert client.post(CHAT, json=body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        for path in ("/health", "/ready", "/metrics"):
            assert client.get(path).status_code == 200, path
        good = openai.OpenAI(base_url="http://testserver/v1", api_key="s3cret", http_client=client, max_retries=0)
        assert good.models.list().data[0].id == MODEL_NAME
        bad = openai.OpenAI(base_url="http://testserver/v1", api_key="nope", http_client=client, max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()


@pytest.mark.parametrize("field,value", [
    ("audio", {"voice": "alloy", "format": "wav"}),
    ("modalities", ["text", "audio"]),
    ("prediction", {"type": "content", "content": "x"}),
    ("web_search_options", {}),
    ("reasoning_effort", "high"),
    ("store", True),
    ("service_tier", "flex"),
    ("guided_decoding_backend", "outlines"),
])
def test_unimplemented_fields_are_refused_not_ignored(client, field, value):
    err = _error(client.post(CHAT, json={"model": MODEL_NAME, "messages": MESSAGES, field: value}), 400, param=field)
    assert "not supported" in err["message"]
    _still_serving(client)


@pytest.mark.parametrize("field,value", [("response_format", {"type": "text"}), ("tools", []), ("tool_choice", "none"),
                                         ("store", False), ("service_tier", "auto"), ("modalities", ["text"]),
                                         ("metadata", {"k": "v"}), ("some_vendor_field", 1)])
def test_fields_that_change_nothing_are_accepted(client, field, value):
    r = client.post(CHAT, json={"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 2, field: value})
    assert r.status_code == 200, r.text


def test_completions_refuse_suffix_and_best_of(client):
    for field, value in (("suffix", "tail"), ("best_of", 3)):
        r = client.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "x", field: value})
        _error(r, 400, param=field)
