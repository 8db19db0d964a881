"""`loraplex bench serve`: the workload against any OpenAI-compatible server, every request streamed.

Open loop: each request is sent at its arrival time whatever the server's state (a slow server builds a
queue, as real clients would). TTFT is from sending to the first content chunk, end-to-end from sending
to the end of the stream; output tokens come from the stream's usage chunk when the server sends one
(`stream_options.include_usage`), else from the number of content chunks.
"""
from __future__ import annotations

import asyncio
import json
import time

import httpx

from .stats import RequestResult
from .workload import BenchRequest


def request_body(req: BenchRequest, ignore_eos: bool) -> tuple[str, dict]:
    body = {"model": req.model, "stream": True, "max_tokens": req.max_tokens, "temperature": 0.0,
            "stream_options": {"include_usage": True}}
    if ignore_eos:
        body["ignore_eos"] = True  # vLLM's and our extension; other servers may ignore or refuse it
    if req.messages is not None:
        return "/v1/chat/completions", body | {"messages": req.messages}
    return "/v1/completions", body | {"prompt": req.prompt}


async def send(client: httpx.AsyncClient, base_url: str, req: BenchRequest, ignore_eos: bool,
               headers: dict) -> RequestResult:
    path, body = request_body(req, ignore_eos)
    result = RequestResult(req.index, req.model, req.arrival_s)
    t0 = time.perf_counter()
    chunks = 0
    usage = None
    try:
        async with client.stream("POST", base_url + path, json=body, headers=headers) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")[:300]
                result.error = f"HTTP {resp.status_code}: {text}"
                return result
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("error"):
                    result.error = str(chunk["error"])[:300]
                    return result
                for choice in chunk.get("choices") or []:
                    text = choice.get("text") if "text" in choice else (choice.get("delta") or {}).get("content")
                    if text:
                        chunks += 1
                        if result.ttft_s is None:
                            result.ttft_s = time.perf_counter() - t0
                if chunk.get("usage"):
                    usage = chunk["usage"]
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        result.error = f"{type(e).__name__}: {e}"[:300]
        return result
    result.e2e_s = time.perf_counter() - t0
    result.output_tokens = usage["completion_tokens"] if usage else chunks
    result.prompt_tokens = usage["prompt_tokens"] if usage else 0
    if result.ttft_s is None:
        result.ttft_s = result.e2e_s
    return result


async def run_serve(base_url: str, workload: list[BenchRequest], *, ignore_eos: bool = True,
                    api_key: str | None = None, max_concurrency: int | None = None,
                    progress: bool = True) -> tuple[list[RequestResult], float]:
    """-> (results in index order, wall seconds from the first send to the last completion)."""
    base_url = base_url.rstrip("/")
    if base_url.endswith("/v1"):
        base_url = base_url[:-3]
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    done = 0
    limits = httpx.Limits(max_connections=max_concurrency or len(workload), max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=httpx.Timeout(3600, connect=30), limits=limits) as client:
        start = time.perf_counter()

        async def one(req: BenchRequest) -> RequestResult:
            nonlocal done
            delay = req.arrival_s - (time.perf_counter() - start)
            if delay > 0:
                await asyncio.sleep(delay)
            if limit is not None:
                async with limit:
                    r = await send(client, base_url, req, ignore_eos, headers)
            else:
                r = await send(client, base_url, req, ignore_eos, headers)
            done += 1
            if progress and (done % max(1, len(workload) // 10) == 0 or done == len(workload)):
                print(f"  {done}/{len(workload)} requests done ({time.perf_counter() - start:.1f} s)", flush=True)
            return r

        results = await asyncio.gather(*(one(r) for r in workload))
        duration = time.perf_counter() - start
    return list(results), duration
