"""The same server under variants (environment variables, flags), side by side: streamed greedy completions
alternating between them.

    python scripts/bench/bench_server_env.py --variant default= --variant spin30k=GOMP_SPINCOUNT=30000 \
        --variant small-pages=--no-cpu-huge-pages [--model FOLDER] [--rounds 8] [--tokens 128] [--concurrency 1] \
        [-- serve args...]

Each --variant NAME=[KEY=VALUE|--flag[=value]][,...] starts one `loraplex serve` (everything after `--` is passed to
each) with those variables added to its environment and those flags added to its own command line, all at once on
their own ports; then for --rounds, in an order that reverses every round, each gets, at --concurrency 1,
one streamed completion of --tokens tokens (ignore_eos; decode tok/s: tokens after the first over the time after the
first), at higher concurrency that many streamed chat requests of up to --tokens tokens (bench_serving's load, as
latency_vs_llama_cpp's 64 x 64: every stream's tokens over the round's wall time). Prints each variant's median, its
ratio to the first variant's median and the median of its round-by-round ratios to the first variant (the
machine's speed drifts between rounds). Idle servers sleep (their engines poll with a timeout), so only the one being
measured uses the cores. Completions and loads are latency_vs_llama_cpp's and bench_serving's; logs in
/tmp/side-by-side-env-NAME.log.
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_serving import run_target
from latency_vs_llama_cpp import one_completion
from side_by_side import Served


def one_round(url: str, tokens: int, concurrency: int) -> float:
    if concurrency == 1:
        return one_completion(url, "m", tokens)
    return asyncio.run(run_target(url, concurrency, tokens, ["m"]))["tok_s"]


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
    servers: list[Served] = []
    try:
        for i, (name, env, flags) in enumerate(args.variant):
            port = args.port + i
            servers.append(Served(f"env-{name}", [sys.executable, "-m", "loraplex.serve.cli", "serve", *model, "--port",
                                                  str(port), "--served-model-name", "m", *serve_args, *flags],
                                  port, args.startup_timeout_s, env=env))
            one_round(servers[-1].url, 16, 1)  # warm
        speeds: list[list[float]] = [[] for _ in servers]
        for r in range(args.rounds):
            for i in (range(len(servers)) if r % 2 == 0 else reversed(range(len(servers)))):
                speeds[i].append(one_round(servers[i].url, args.tokens, args.concurrency))
        base = statistics.median(speeds[0])
        first = args.variant[0][0]
        print(f"{args.concurrency} x {args.tokens} streamed tokens, {args.rounds} rounds, serve args {serve_args}")
        for (name, env, flags), runs in zip(args.variant, speeds):
            med = statistics.median(runs)
            paired = statistics.median(s / b for s, b in zip(runs, speeds[0]))
            what = " ".join([*(f"{k}={v}" for k, v in env.items()), *flags])
            print(f"  {name:>16} {what}: median {med:7.1f} tok/s ({med / base:.3f}x of {first}'s median, "
                  f"median round-by-round ratio {paired:.3f}); rounds {' '.join(f'{s:.0f}' for s in runs)}",
                  flush=True)
    finally:
        for server in servers:
            server.stop()


if __name__ == "__main__":
    main()
