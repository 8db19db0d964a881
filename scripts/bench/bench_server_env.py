"""The same server under variants (environment variables, flags), side by side: streamed greedy completions
alternating between them.

    python scripts/bench/bench_server_env.py --variant default= --variant spin30k=GOMP_SPINCOUNT=30000 \
        --variant small-pages=--no-cpu-huge-pages [--model FOLDER] [--rounds 8] [--tokens 128] [--concurrency 1] \
        [-- serve args...]

Each --variant NAME=[KEY=VALUE|--flag[=value]][,...] starts one `loraplex serve` (everything after `--` is passed to
each) with those variables added to its environment and those flags added to its own command line, all at once on
their own ports; then for --rounds, in an order that reverses every round, each gets --concurrency streamed
completions of --tokens tokens (ignore_eos). Per round: decode tok/s (tokens after the first over the time after the
first; at concurrency > 1 every stream's tokens over the round's wall time). Prints each variant's median, its
ratio to the first variant's median and the median of its round-by-round ratios to the first variant (the
machine's speed drifts between rounds). Idle servers sleep (their engines poll with a timeout), so only the one being
measured uses the cores.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from side_by_side import wait_ready

PROMPT = "Once upon a time, in a small village by the sea,"


async def stream_one(client: httpx.AsyncClient, url: str, tokens: int) -> list[float]:
    body = {"model": "m", "prompt": PROMPT, "max_tokens": tokens, "temperature": 0.0, "stream": True,
            "ignore_eos": True}
    stamps: list[float] = []
    async with client.stream("POST", f"{url}/v1/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                stamps.append(time.perf_counter())
    return stamps


async def one_round(url: str, tokens: int, concurrency: int) -> float:
    async with httpx.AsyncClient(timeout=600) as client:
        t0 = time.perf_counter()
        runs = await asyncio.gather(*(stream_one(client, url, tokens) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    if concurrency == 1:
        stamps = runs[0]
        return (len(stamps) - 1) / (stamps[-1] - stamps[0])
    return sum(len(s) for s in runs) / wall


def parse_variant(text: str) -> tuple[str, dict[str, str], list[str]]:
    """NAME=[KEY=VALUE | --serve-flag[=value]][,...] -> (name, environment, serve flags)."""
    name, _, items = text.partition("=")
    if not name or not all(c.isalnum() or c in "-_." for c in name):
        raise SystemExit(f"--variant {text!r}: a name of letters, digits, '-', '_' or '.' first")
    env, flags = {}, []
    for item in filter(None, items.split(",")):
        if item.startswith("--"):
            flags.append(item)
            continue
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--variant {text!r}: NAME=KEY=VALUE|--flag[,...] or NAME=")
        env[key] = value
    return name, env, flags


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", action="append", required=True, type=parse_variant)
    ap.add_argument("--model", default=None, help="HF-layout folder (default: the default model)")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--port", type=int, default=8150)
    ap.add_argument("--startup-timeout-s", type=float, default=900)
    ap.add_argument("serve_args", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    serve_args = [a for a in args.serve_args if a != "--"]
    model = ["--model", args.model] if args.model else []
    servers = []
    logs = contextlib.ExitStack()
    try:
        for i, (name, env, flags) in enumerate(args.variant):
            port = args.port + i
            log = logs.enter_context(open(f"/tmp/bench-server-env-{name}.log", "w"))  # noqa: SIM115 - ExitStack
            proc = subprocess.Popen(
                [sys.executable, "-m", "loraplex.serve.cli", "serve", *model, "--port", str(port),
                 "--served-model-name", "m", *serve_args, *flags],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, "HF_HUB_OFFLINE": "1", **env})
            servers.append((name, f"http://127.0.0.1:{port}", proc))
        for name, url, proc in servers:
            wait_ready(url, proc, args.startup_timeout_s)
            asyncio.run(one_round(url, 16, 1))  # warm
        speeds: dict[str, list[float]] = {name: [] for name, _, _ in servers}
        for r in range(args.rounds):
            for name, url, _ in (servers if r % 2 == 0 else servers[::-1]):
                speeds[name].append(asyncio.run(one_round(url, args.tokens, args.concurrency)))
        base = statistics.median(speeds[servers[0][0]])
        print(f"{args.concurrency} x {args.tokens} streamed tokens, {args.rounds} rounds, serve args {serve_args}")
        first = servers[0][0]
        for name, env, flags in args.variant:
            med = statistics.median(speeds[name])
            paired = statistics.median(s / b for s, b in zip(speeds[name], speeds[first]))
            what = " ".join([*(f"{k}={v}" for k, v in env.items()), *flags])
            print(f"  {name:>16} {what}: median {med:7.1f} tok/s ({med / base:.3f}x of {first}'s median, "
                  f"median round-by-round ratio {paired:.3f}); rounds {' '.join(f'{s:.0f}' for s in speeds[name])}",
                  flush=True)
    finally:
        for _, _, proc in servers:
            os.killpg(proc.pid, signal.SIGTERM)
        for _, _, proc in servers:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        logs.close()


if __name__ == "__main__":
    main()
