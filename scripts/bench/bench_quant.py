"""Decode speed and memory per quantized base, with and without 8 mixed adapters.

    python scripts/bench/bench_quant.py [--backends none,int8,nf4,gptq,exl2] [--dtype float32]
        [--num-requests 16] [--max-tokens 32] [--rounds 2]

Each backend runs in its own child process (so peak memory is that backend's alone): the default model
(or --model) loaded with `--quantization B` (gptq: a 4-bit g64 asymmetric RTN export, exl2: a 4-bit g32
export, each made once as `loraplex quantize` makes them), then, alternating for --rounds: one request alone (batch-1 decode tok/s),
--num-requests concurrent requests on the base model, and the same requests spread over 8 rank-8
all-linear adapters. Greedy, ignore EOS. Prints a Markdown table: tok/s, the 8-adapter ratio to base,
weight bytes as counted by the engine (embeddings included) and the process's peak RSS (CPU; it
includes the load, where a float copy of each layer exists before it is quantized) or peak CUDA memory.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from bench_engine import make_prompts
from bench_lora import ALL_LINEAR, run_engine


def measure(args: argparse.Namespace) -> dict:
    from loraplex.adapters.runtime import create_lora_runtime
    from loraplex.adapters.synthetic import write_random_peft
    from loraplex.engine.engine_args import EngineArgs
    from loraplex.engine.llm_engine import LLMEngine

    quant = args.one
    model = args.checkpoint_dir or args.model
    engine = LLMEngine.from_engine_args(
        EngineArgs(model=model, dtype=args.dtype, device=args.device, max_num_seqs=max(16, args.num_requests),
                   quantization=quant, enable_lora=True, max_loras=8,
                   max_cpu_loras=9, lora_pool_pages=8 * 8 + 1),
        hook_factory=create_lora_runtime)
    tmp = Path(tempfile.mkdtemp(prefix="bench-quant-"))
    for i in range(8):
        folder = write_random_peft(tmp / f"a{i}", engine.model_config, r=8, target_modules=tuple(ALL_LINEAR.split(",")),
                                   seed=i, std=0.02)
        engine.adapter_hook.register_adapter(f"a{i}", i + 1, 1, str(folder))
    prompts = make_prompts(engine.tokenizer, args.num_requests)
    workloads = {"batch-1": (prompts[:1], [None]), "base": (prompts, [None]),
                 "8 adapters": (prompts, [(i + 1, 1) for i in range(8)])}
    for p, a in workloads.values():  # warm-up
        run_engine(engine, p, a, 4)
    results: dict[str, list[float]] = {k: [] for k in workloads}
    for _ in range(args.rounds):
        for name, (p, a) in workloads.items():
            results[name].append(run_engine(engine, p, a, args.max_tokens))
    out = {name: statistics.median(v) for name, v in results.items()}
    out["weights_mib"] = engine.memory_bytes["weights"] / 2**20
    q_proj = engine.runner.model.model.layers[0].self_attn.q_proj
    out["linear"] = type(getattr(q_proj, "base", q_proj)).__name__  # under the LoRA wrapper
    if engine.runner.device.type == "cuda":
        out["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        out["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--backends", default="none,int8,nf4,gptq,exl2")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--num-requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child mode: measure this backend
    ap.add_argument("--checkpoint-dir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(measure(args)), flush=True)
        return

    if args.model is None:
        from loraplex.engine.default_model import ensure_default_model
        args.model = str(ensure_default_model())
    backends = [b for b in args.backends.split(",") if b]
    checkpoints = {}
    if "gptq" in backends:
        from loraplex.engine.quant.gptq import export_gptq
        checkpoints["gptq"] = export_gptq(args.model, Path(tempfile.mkdtemp(prefix="bench-gptq-")), bits=4,
                                          group_size=64, sym=False)
    if "exl2" in backends:
        from loraplex.engine.quant.exl2 import export_exl2
        checkpoints["exl2"] = export_exl2(args.model, Path(tempfile.mkdtemp(prefix="bench-exl2-")), bits=4,
                                          group_size=32)
    rows = []
    for b in backends:
        cmd = [sys.executable, __file__, "--one", b, "--model", args.model, "--dtype", args.dtype, "--device",
               args.device, "--num-requests", str(args.num_requests), "--max-tokens", str(args.max_tokens),
               "--rounds", str(args.rounds)] + (["--checkpoint-dir", str(checkpoints[b])] if b in checkpoints else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            print(f"{b}: failed (exit {proc.returncode})\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        r = json.loads(line[len("RESULT "):])
        rows.append((b, r))
        print(f"{b}: {r}", flush=True)
    print(f"\n{args.dtype}, {args.num_requests} concurrent requests x {args.max_tokens} tokens, "
          f"threads={torch.get_num_threads()}\n")
    print("| base | linear | batch-1 tok/s | base tok/s | 8 adapters tok/s | 8 adapters / base | weights MiB | peak MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for b, r in rows:
        print(f"| {b} | {r['linear']} | {r['batch-1']:.1f} | {r['base']:.1f} | {r['8 adapters']:.1f} | "
              f"{r['8 adapters'] / r['base']:.2f}x | {r['weights_mib']:.0f} | {r['peak_mib']:.0f} |")


if __name__ == "__main__":
    main()
