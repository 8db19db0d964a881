"""vLLM's POST /tokenize and /detokenize and GET /version: shapes, the chat template, errors, the API key."""
from __future__ import annotations

from starlette.testclient import TestClient

from loraplex.serve.app import build_app
from tests.serve.fake_engine import MODEL_NAME, FakeEngine


def test_tokenize_prompt_and_back(client, engine):
    r = client.post("/tokenize", json={"model": MODEL_NAME, "prompt": "hello", "return_token_strs": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] == engine.tokenizer.encode("hello") and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == engine.max_model_len
    assert body["token_strs"] == engine.tokenizer.convert_ids_to_tokens(body["tokens"])
    back = client.post("/detokenize", json={"model": MODEL_NAME, "tokens": body["tokens"]})
    assert back.status_code == 200 and back.json() == {"prompt": "hello"}


def test_tokenize_chat_uses_the_chat_template(client, engine):
    messages = [{"role": "user", "content": "hi"}]
    r = client.post("/tokenize", json={"model": MODEL_NAME, "messages": messages})
    text = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert r.status_code == 200 and r.json()["tokens"] == engine.tokenizer.encode(text, add_special_tokens=False)
    assert r.json()["token_strs"] is None
    no_prompt = client.post("/tokenize", json={"messages": messages, "add_generation_prompt": False}).json()
    assert no_prompt["count"] < r.json()["count"]


def test_bad_requests(client):
    assert client.post("/tokenize", json={"model": "nope", "prompt": "x"}).status_code == 404
    r = client.post("/tokenize", json={"prompt": "x", "bogus": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "bogus"
    r = client.post("/tokenize", content=b"{not json")
    assert r.status_code == 400
    r = client.post("/tokenize", json={"messages": [{"role": "user", "content": "x"}], "add_generation_prompt": True,
                                       "continue_final_message": True})
    assert r.status_code == 400
    r = client.post("/detokenize", json={"tokens": [10 ** 9]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens"


def test_version(client):
    r = client.get("/version")
    assert r.status_code == 200 and r.json()["version"]


def test_tokenize_needs_the_api_key_version_does_not():
    with TestClient(build_app(FakeEngine(), [MODEL_NAME], api_key="k")) as c:
        assert c.post("/tokenize", json={"prompt": "x"}).status_code == 401
        assert c.post("/detokenize", json={"tokens": [1]}).status_code == 401
        assert c.post("/tokenize", json={"prompt": "x"}, headers={"Authorization": "Bearer k"}).status_code == 200
        assert c.get("/version").status_code == 200
