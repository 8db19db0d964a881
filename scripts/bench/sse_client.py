"""A lean client for streamed completions, for the latency benchmarks.

On a 2-core machine the benchmark's client shares the cores with the server it measures, and whatever CPU it
spends per streamed token comes out of the engine's OpenMP threads at batch 1. httpx's streaming reader
(`aiter_lines` over its transport layers, on asyncio) took 0.5-0.7 ms of CPU per token here; a plain asyncio stream
reader ~0.3 ms; this blocking socket ~0.1-0.14 ms (process CPU time over 200-token streams, scratch runs against
the 4-bit model). It speaks just enough HTTP/1.1 to POST a JSON body and read the server-sent events back
(chunked or until close); concurrent streams are threads (the GIL is released while a socket waits). Every server
measured with it (loraplex, llama.cpp's llama-server) gets the same client.
"""
from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit


class HTTPStatusError(RuntimeError):
    pass


def stream_events(url: str, path: str, body: dict, timeout: float = 600.0) -> Iterator[tuple[float, bytes]]:
    """POST body as JSON to url+path; yield (perf_counter at receipt, event data) for each `data:` event until
    `[DONE]` or the end of the response. timeout bounds the connect and every wait for bytes."""
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port or 80), timeout=timeout)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        payload = json.dumps(body).encode()
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
                     f"Accept: text/event-stream\r\nContent-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
                     .encode() + payload)
        raw = b""
        while b"\r\n\r\n" not in raw:
            data = sock.recv(65536)
            if not data:
                raise HTTPStatusError(f"{url}{path}: connection closed before the response headers")
            raw += data
        head, raw = raw.split(b"\r\n\r\n", 1)
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        status = int(status_line.split()[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines if h)}
        if status != 200:
            raise HTTPStatusError(f"{url}{path}: HTTP {status}: {raw[:300]!r}")
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        text = b""  # de-chunked bytes not yet split into lines
        ended = False  # the body's end seen (the last chunk, or the connection closed): what is buffered still counts
        now = time.perf_counter()
        while True:
            if chunked:
                while not ended:  # take apart every complete chunk in raw
                    eol = raw.find(b"\r\n")
                    if eol < 0:
                        break
                    size = int(raw[:eol].split(b";")[0], 16)
                    if size == 0:
                        ended = True
                    elif len(raw) < eol + 2 + size + 2:
                        break
                    else:
                        text += raw[eol + 2:eol + 2 + size]
                        raw = raw[eol + 4 + size:]
            else:
                text, raw = text + raw, b""
            *lines, text = text.split(b"\n")
            if ended:
                lines.append(text)
            for line in lines:
                if line.startswith(b"data:"):
                    event = line[5:].strip()
                    if event == b"[DONE]":
                        return
                    yield now, event
            if ended:
                return
            data = sock.recv(65536)
            if not data:
                ended = True
            else:
                now = time.perf_counter()
                raw += data
    finally:
        sock.close()


def token_stamps(url: str, path: str, body: dict, timeout: float = 600.0) -> list[float]:
    """Receipt times of the streamed events whose first choice carries text ("text" on /v1/completions, "content"
    inside "delta" on /v1/chat/completions)."""
    return timed_stream(url, path, body, timeout)[0]


def timed_stream(url: str, path: str, body: dict, timeout: float = 600.0) -> tuple[list[float], int | None]:
    """token_stamps' receipt times, and the completion's token count from the usage the server sent, if it did (ask
    with `"stream_options": {"include_usage": true}`): an event may carry several tokens (`--stream-interval-ms`)."""
    stamps: list[float] = []
    tokens = None
    for now, event in stream_events(url, path, body, timeout):
        parsed = json.loads(event)
        choices = parsed.get("choices")
        if choices and (choices[0].get("text") or (choices[0].get("delta") or {}).get("content")):
            stamps.append(now)
        if parsed.get("usage"):
            tokens = parsed["usage"].get("completion_tokens", tokens)
    return stamps, tokens


def time_per_token(stamps: list[float], tokens: int | None) -> float:
    """Seconds per output token after the first: the time from the first text event to the last over the tokens
    after the first (the first event carries one token: the prefill's), or over the events after the first when
    the server sent no token count."""
    after_first = (tokens if tokens is not None else len(stamps)) - 1
    return (stamps[-1] - stamps[0]) / max(1, after_first)


def run_concurrently(calls: list, workers: int | None = None) -> list:
    """Run zero-argument callables on threads at once; their results in order (the first error is raised)."""
    with ThreadPoolExecutor(max_workers=workers or max(1, len(calls))) as pool:
        return [f.result() for f in [pool.submit(c) for c in calls]]
