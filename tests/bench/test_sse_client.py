"""scripts/bench/sse_client.py (the latency benchmarks' stream reader) against a real socket server that sends a
whole response in one write: the events before the body's end count however the bytes arrive."""
from __future__ import annotations

import socket
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts" / "bench"))
from sse_client import HTTPStatusError, stream_events

EVENTS = [b'{"choices":[{"text":" Par"}]}', b'{"choices":[{"text":"is"}]}', b'{"choices":[{"text":"1"}]}']


def serve_once(response: bytes) -> str:
    """A listening socket that answers one request with `response` in a single send; its base URL."""
    listener = socket.create_server(("127.0.0.1", 0))

    def run() -> None:
        conn, _ = listener.accept()
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            head, body = data.split(b"\r\n\r\n", 1)
            length = int(next(h.split(b":")[1] for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")))
            while len(body) < length:
                body += conn.recv(65536)
            conn.sendall(response)
        listener.close()
    threading.Thread(target=run, daemon=True).start()
    return f"http://127.0.0.1:{listener.getsockname()[1]}"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


@pytest.mark.parametrize("done", [True, False])
def test_chunked_events_arriving_with_the_last_chunk_all_count(done):
    frames = [b"data: " + e + b"\n\n" for e in EVENTS] + ([b"data: [DONE]\n\n"] if done else [])
    body = b"".join(chunk(f) for f in frames) + b"0\r\n\r\n"
    url = serve_once(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n" + body)
    assert [e for _, e in stream_events(url, "/v1/completions", {"x": 1})] == EVENTS


def test_a_body_read_until_close_keeps_its_last_unterminated_line():
    body = b"".join(b"data: " + e + b"\n\n" for e in EVENTS[:-1]) + b"data: " + EVENTS[-1]
    url = serve_once(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n" + body)
    assert [e for _, e in stream_events(url, "/v1/completions", {"x": 1})] == EVENTS


def test_an_error_status_is_raised_with_its_body():
    url = serve_once(b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\nConnection: close\r\n\r\nno model!")
    with pytest.raises(HTTPStatusError, match="HTTP 404.*no model"):
        list(stream_events(url, "/v1/completions", {"x": 1}))
