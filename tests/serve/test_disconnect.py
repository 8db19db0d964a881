"""A client that goes away mid-request gets its engine request aborted (streaming and not)."""
from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from loraplex.serve.app import build_app
from tests.serve.fake_engine import DEFAULT_REPLY, MODEL_NAME, FakeEngine
from tests.serve.live_server import live_server, wait_until

BODY = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 400}


async def _call_then_disconnect(app, body: dict, disconnect_after_chunks: int | None, engine: FakeEngine) -> list:
    """Drive the ASGI app by hand: send the request, then report http.disconnect once
    `disconnect_after_chunks` body chunks arrived (None: as soon as the engine saw the request)."""
    raw = json.dumps(body).encode()
    disconnected = asyncio.Event()
    request_sent = False
    sent: list[dict] = []

    async def receive():
        nonlocal request_sent
        if not request_sent:
            request_sent = True
            return {"type": "http.request", "body": raw, "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)
        chunks = [m for m in sent if m["type"] == "http.response.body" and m.get("body")]
        if disconnect_after_chunks is not None and len(chunks) >= disconnect_after_chunks:
            disconnected.set()

    async def disconnect_when_started():
        while not engine.requests:
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.05)
        disconnected.set()

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
             "query_string": b"", "root_path": "", "headers": [(b"content-type", b"application/json")],
             "client": ("127.0.0.1", 1234), "server": ("testserver", 80), "state": {}}
    await engine.start()
    watcher = asyncio.ensure_future(disconnect_when_started()) if disconnect_after_chunks is None else None
    await asyncio.wait_for(app(scope, receive, send), timeout=10)
    if watcher:
        await watcher
    return sent


def test_streaming_disconnect_aborts_engine_request():
    engine = FakeEngine(endless=True, token_delay_s=0.005)
    app = build_app(engine, [MODEL_NAME])
    asyncio.run(_call_then_disconnect(app, {**BODY, "stream": True}, 4, engine))
    [request_id] = engine.requests
    assert engine.aborted == [request_id]
    assert 'loraplex:request_success_total{finished_reason="abort",model_name="fake-model"} 1.0' in \
        app.state.metrics.render().decode()


def test_non_streaming_disconnect_aborts_engine_request():
    engine = FakeEngine(endless=True, token_delay_s=0.005)
    app = build_app(engine, [MODEL_NAME])
    asyncio.run(_call_then_disconnect(app, BODY, None, engine))
    [request_id] = engine.requests
    assert engine.aborted == [request_id]


def test_finished_requests_are_not_aborted(client, engine):
    client.post("/v1/chat/completions", json={**BODY, "stream": True})
    client.post("/v1/chat/completions", json=BODY)
    assert len(engine.requests) == 2 and engine.aborted == []


def test_real_server_streaming_and_disconnect():
    engine = FakeEngine(endless=True, token_delay_s=0.01)
    with live_server(build_app(engine, [MODEL_NAME])) as url:
        oai = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        reply = oai.chat.completions.create(model=MODEL_NAME, messages=BODY["messages"], max_tokens=7)
        assert reply.choices[0].message.content == (DEFAULT_REPLY * 2)[:7]
        assert engine.aborted == []
        with httpx.Client(base_url=url, timeout=10) as http:
            with http.stream("POST", "/v1/chat/completions", json={**BODY, "stream": True}) as r:
                data = []
                for line in r.iter_lines():
                    data += [line] if line.startswith("data: ") else []
                    if len(data) == 3:
                        break  # leaving the block closes the connection mid-stream
        [streamed] = [rid for rid in engine.requests if rid != reply.id + "-0"]
        assert wait_until(lambda: engine.aborted == [streamed]), "the engine never saw abort()"
        # a non-streaming client that gives up (read timeout) is noticed too
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/chat/completions", json=BODY, timeout=0.3)
        assert wait_until(lambda: len(engine.aborted) == 2), "the engine never saw abort()"
        assert set(engine.requests) == {reply.id + "-0", *engine.aborted}
