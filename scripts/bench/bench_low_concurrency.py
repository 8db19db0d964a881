"""Time per output token at low concurrency (1, 2, 4, 8 streams), base and with an adapter: through the HTTP server
and through the in-process engine, and the HTTP process's share of the machine's cores at each.

    python scripts/bench/bench_low_concurrency.py [--dtype float32] [--cpu-linear auto] [--concurrency 1 2 4 8]
        [--max-tokens 64] [--requests-per-stream 2] [--rounds 2] [--client lean] [--extra-serve-args ...]

Each stream sends --requests-per-stream greedy requests one after another (ignore_eos, --max-tokens tokens); TPOT
is each request's time after its first token over its tokens after the first, averaged. The server is started once
(`loraplex serve`, its engine in a child process); the in-process engine runs the same load with the same engine
arguments (--extra-serve-args included), stepping itself. Rounds alternate which goes first; medians are printed
with the ratio engine TPOT / HTTP TPOT (1.0 = HTTP costs nothing), the CPU the HTTP process used (its own process,
not the engine's) and the CPU the client used (this process, while it streamed), each as a share of every core over
the run's wall time. The client shares the machine's cores with the server: by default it is sse_client.py's lean
one; `--client httpx` measures with httpx's async streaming reader as the script did before.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from prompts import PROMPTS  # noqa: E402
from side_by_side import Served  # noqa: E402
from sse_client import run_concurrently, time_per_token, timed_stream  # noqa: E402


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (its threads included, its children not), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def httpx_stream(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int) -> float:
    body = {"model": model, "stream": True, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
            "stream_options": {"include_usage": True}, "messages": [{"role": "user", "content": prompt}]}
    stamps, tokens = [], None
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                    stamps.append(time.perf_counter())
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    return time_per_token(stamps, tokens)


async def httpx_load(url: str, model: str, prompts: list[list[str]], max_tokens: int) -> list[float]:
    async with httpx.AsyncClient(timeout=600) as client:
        async def stream(texts: list[str]) -> list[float]:
            return [await httpx_stream(client, url, model, t, max_tokens) for t in texts]
        results = await asyncio.gather(*(stream(texts) for texts in prompts))
    return [t for r in results for t in r]


def http_load(url: str, model: str, concurrency: int, per_stream: int, max_tokens: int, client: str) -> list[float]:
    """TPOT of every request: concurrency streams, each sending per_stream requests one after another."""
    prompts = [[f"{PROMPTS[(i * per_stream + j) % len(PROMPTS)]} ({i}.{j})" for j in range(per_stream)]
               for i in range(concurrency)]
    if client == "httpx":
        return asyncio.run(httpx_load(url, model, prompts, max_tokens))

    def stream(texts: list[str]) -> list[float]:
        return [time_per_token(*timed_stream(url, "/v1/chat/completions", {
            "model": model, "stream": True, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
            "stream_options": {"include_usage": True}, "messages": [{"role": "user", "content": t}]})) for t in texts]
    return [t for r in run_concurrently([lambda texts=texts: stream(texts) for texts in prompts]) for t in r]


def engine_load(engine, prompts_of, adapter, concurrency: int, per_stream: int, max_tokens: int) -> list[float]:
    from loraplex.engine.core.sampling_params import SamplingParams
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    queues = {i: [prompts_of(i, j) for j in range(per_stream)] for i in range(concurrency)}
    stamps: dict[str, list[tuple[float, int]]] = {}  # (time, tokens) of each output with tokens
    owner: dict[str, int] = {}

    def submit(i: int) -> None:
        rid = f"lc-{time.monotonic_ns()}-{i}"
        engine.add_request(rid, queues[i].pop(0), params, **({"adapter": adapter} if adapter else {}))
        stamps[rid], owner[rid] = [], i

    for i in range(concurrency):
        submit(i)
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.token_ids:
                stamps[out.request_id].append((time.perf_counter(), len(out.token_ids)))
            if out.finished and queues[owner[out.request_id]]:
                submit(owner[out.request_id])
    # after the first output, over the tokens after it (an output holds several with --num-scheduler-steps)
    return [(s[-1][0] - s[0][0]) / max(1, sum(n for _, n in s[1:])) for s in stamps.values()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--cpu-linear", default="auto", choices=["auto", "stream", "onednn"])
    ap.add_argument("--concurrency", nargs="+", type=int, default=[1, 2, 4, 8])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--requests-per-stream", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--client", default="lean", choices=["lean", "httpx"],
                    help="lean: sse_client.py's blocking sockets on threads (~0.1-0.2 ms of CPU a token); httpx: its "
                         "async streaming reader (~0.5-0.7 ms), as the script measured before")
    ap.add_argument("--extra-serve-args", nargs=argparse.REMAINDER, default=[])
    args = ap.parse_args()

    from loraplex.adapters.runtime import create_lora_runtime
    from loraplex.adapters.synthetic import write_random_peft
    from loraplex.engine.default_model import ensure_default_model
    from loraplex.engine.engine_args import add_engine_args, engine_args_from
    from loraplex.engine.llm_engine import LLMEngine, _read_model_config

    model = args.model or str(ensure_default_model())
    tmp = Path(tempfile.mkdtemp(prefix="bench-lowc-"))
    adapter = write_random_peft(tmp / "a0", _read_model_config(model), r=8, seed=0, std=0.02)
    max_seqs = max(args.concurrency)
    server = Served("loraplex", [sys.executable, "-m", "loraplex.serve.cli", "serve", "--model", model, "--port",
                                 "8141", "--dtype", args.dtype, "--cpu-linear", args.cpu_linear, "--served-model-name",
                                 "m", "--max-num-seqs", str(max_seqs), "--lora-modules", f"a0={adapter}",
                                 "--adapter-dir", str(tmp / "store"), *args.extra_serve_args], 8141, 600)
    # the in-process engine takes the server's engine flags, --extra-serve-args included (the serving-only ones are
    # left to the server)
    flags = argparse.ArgumentParser(add_help=False)
    add_engine_args(flags)
    ns, _ = flags.parse_known_args(["--model", model, "--dtype", args.dtype, "--cpu-linear", args.cpu_linear,
                                    "--max-num-seqs", str(max_seqs), "--enable-lora", *args.extra_serve_args])
    engine = LLMEngine.from_engine_args(dataclasses.replace(engine_args_from(ns), enable_training=False),
                                        hook_factory=create_lora_runtime)
    engine.adapter_hook.register_adapter("a0", 1, 1, str(adapter))
    tok = engine.tokenizer

    def prompts_of(i: int, j: int) -> list[int]:
        text = f"{PROMPTS[(i * args.requests_per_stream + j) % len(PROMPTS)]} ({i}.{j})"
        ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    try:
        http_load(server.url, "m", 1, 1, 8, args.client)  # warm-up both
        engine_load(engine, prompts_of, None, 1, 1, 8)
        rows = []
        for label, http_model, adapter_key in (("base", "m", None), ("adapter", "a0", (1, 1))):
            for c in args.concurrency:
                http_tpot, eng_tpot, shares, client_shares = [], [], [], []
                for r in range(args.rounds):
                    for side in (("http", "engine") if r % 2 == 0 else ("engine", "http")):
                        if side == "http":
                            cpu0, own0, t0 = cpu_seconds(server.proc.pid), time.process_time(), time.perf_counter()
                            http_tpot.append(statistics.mean(http_load(
                                server.url, http_model, c, args.requests_per_stream, args.max_tokens, args.client)))
                            wall = time.perf_counter() - t0
                            shares.append((cpu_seconds(server.proc.pid) - cpu0) / (wall * os.cpu_count()))
                            client_shares.append((time.process_time() - own0) / (wall * os.cpu_count()))
                        else:
                            eng_tpot.append(statistics.mean(engine_load(engine, prompts_of, adapter_key, c,
                                                                        args.requests_per_stream, args.max_tokens)))
                h, e = statistics.median(http_tpot), statistics.median(eng_tpot)
                print(f"{label} x{c}: HTTP TPOT {h * 1e3:.1f} ms, engine {e * 1e3:.1f} ms, engine/HTTP {e / h:.2f}, "
                      f"HTTP process {statistics.median(shares):.1%} of {os.cpu_count()} cores, client "
                      f"{statistics.median(client_shares):.1%}", flush=True)
                rows.append((label, c, h, e, statistics.median(shares), statistics.median(client_shares)))
    finally:
        server.stop()
    print(f"\n| load | streams | TPOT via HTTP | TPOT in-process | in-process / HTTP | HTTP process CPU | client CPU "
          f"({args.client}) |")
    print("|---|---|---|---|---|---|---|")
    for label, c, h, e, share, client_share in rows:
        print(f"| {label} | {c} | {h * 1e3:.1f} ms | {e * 1e3:.1f} ms | {e / h:.2f} | {share:.1%} | "
              f"{client_share:.1%} |")


if __name__ == "__main__":
    main()
