"""Online throughput: N concurrent streamed chat requests against OpenAI-compatible servers.

    python scripts/bench/bench_serving.py --target ours=http://127.0.0.1:8000 --target vllm=http://127.0.0.1:8001

Each target gets the same requests (greedy, ignore_eos, max_tokens) in the same run; prints output
tokens/s, mean TTFT and TPOT per target, and each target's ratio to the first.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import time

import httpx
from prompts import PROMPTS


async def one_request(client: httpx.AsyncClient, url: str, model: str | tuple[str, dict], i: int,
                      max_tokens: int) -> dict:
    """`model`: a name, or (name, extra body fields): llama.cpp's server picks a request's LoRA set from its body."""
    model, extra = (model, {}) if isinstance(model, str) else model
    body = {"model": model, "stream": True, "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": f"{PROMPTS[i % len(PROMPTS)]} (variant {i})"}], **extra}
    t0 = time.perf_counter()
    ttft = None
    usage = None
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content") and ttft is None:
                ttft = time.perf_counter() - t0
            if chunk.get("usage"):
                usage = chunk["usage"]
    e2e = time.perf_counter() - t0
    n = usage["completion_tokens"] if usage else 0
    return {"ttft": ttft or e2e, "e2e": e2e, "tokens": n}


async def run_target(url: str, num_requests: int, max_tokens: int, models: list | None = None) -> dict:
    """`models`: request i asks for models[i % len(models)] (adapters; an entry may be (name, extra body fields));
    default: the first listed model."""
    async with httpx.AsyncClient(timeout=600) as client:
        models = models or [(await client.get(f"{url}/v1/models")).json()["data"][0]["id"]]
        model = models[0] if isinstance(models[0], str) else models[0][0]
        await asyncio.gather(*(one_request(client, url, m, 0, 4) for m in models))  # warm-up (adapter loads)
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one_request(client, url, models[i % len(models)], i, max_tokens)
                                         for i in range(num_requests)))
        dt = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in results)
    tpot = [(r["e2e"] - r["ttft"]) / max(1, r["tokens"] - 1) for r in results]
    return {"model": model, "tokens": tokens, "seconds": dt, "tok_s": tokens / dt,
            "ttft_ms": 1000 * sum(r["ttft"] for r in results) / len(results),
            "tpot_ms": 1000 * sum(tpot) / len(tpot)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", action="append", required=True, help="NAME=BASE_URL (repeatable)")
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()
    first = None
    for spec in args.target:
        name, url = spec.split("=", 1)
        r = asyncio.run(run_target(url.rstrip("/"), args.num_requests, args.max_tokens))
        first = first or r
        print(f"{name:>8}: {r['tokens']} tokens in {r['seconds']:.2f}s = {r['tok_s']:.1f} tok/s, "
              f"mean TTFT {r['ttft_ms']:.0f} ms, mean TPOT {r['tpot_ms']:.1f} ms, "
              f"ratio to first {r['tok_s'] / first['tok_s']:.2f}x")


if __name__ == "__main__":
    main()
