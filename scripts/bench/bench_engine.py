"""Offline throughput: N concurrent requests through our engine vs. transformers `generate`.

    python scripts/bench/bench_engine.py [--num-requests 64] [--max-tokens 64] [--dtype bfloat16] [--rounds 2]

Greedy, ignore EOS, the same prompts for both. Each side runs the workload once untimed, then
--rounds times; prints every run, and the ratio of the medians, plus batch-1 decode tokens/s for both.
Numbers from one run on one machine: compare ratios.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from prompts import PROMPTS


def make_prompts(tokenizer, n: int, round_: int = 0) -> list[list[int]]:
    out = []
    for i in range(n):
        variant = f"{i}" if round_ == 0 else f"{i}.{round_}"  # each round its own prompts: no prefix-cache replay
        msgs = [{"role": "user", "content": f"{PROMPTS[i % len(PROMPTS)]} (variant {variant})"}]
        ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        out.append(list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids))
    return out


def run_ours(engine, prompts, max_tokens: int) -> tuple[float, int]:
    from loraplex.engine.core.sampling_params import SamplingParams
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(f"bench-{time.monotonic_ns()}-{i}", p, params)
    generated = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            generated += len(out.token_ids)
    return time.perf_counter() - t0, generated


def run_hf(model, tokenizer, prompts, max_tokens: int, batch_size: int) -> tuple[float, int]:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    t0 = time.perf_counter()
    generated = 0
    for b in range(0, len(prompts), batch_size):
        chunk = prompts[b:b + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk])  # left padding
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens,
                                 min_new_tokens=max_tokens, do_sample=False, pad_token_id=pad)
        generated += (out.shape[1] - width) * len(chunk)
    return time.perf_counter() - t0, generated


def measure(label: str, run, rounds: int) -> float:
    """run(r) for r = 0 (untimed) .. rounds; prints each timed run, returns the median tokens/s."""
    run(0)
    rates = []
    for r in range(1, rounds + 1):
        dt, n = run(r)
        rates.append(n / dt)
        print(f"{label}: {n} tokens in {dt:.2f}s = {n / dt:.1f} tok/s")
    return statistics.median(rates)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder (default: the default model)")
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--hf-batch-size", type=int, default=None, help="transformers batch (default: all)")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--no-batch-invariant", action="store_true", help="as loraplex serve --no-batch-invariant")
    ap.add_argument("--rounds", type=int, default=2, help="timed runs per side after one untimed run (median)")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    from loraplex.engine.engine_args import EngineArgs
    from loraplex.engine.llm_engine import LLMEngine

    engine = LLMEngine.from_engine_args(EngineArgs(model=args.model, dtype=args.dtype, device=args.device,
                                                   max_num_seqs=max(64, args.num_requests),
                                                   batch_invariant=not args.no_batch_invariant))
    device = engine.runner.device
    model_dir = args.model
    if model_dir is None:
        from loraplex.engine.default_model import ensure_default_model
        model_dir = str(ensure_default_model())
    rounds = [make_prompts(engine.tokenizer, args.num_requests, r) for r in range(args.rounds + 1)]
    prompts = rounds[0]
    print(f"device={device} dtype={args.dtype} requests={len(prompts)} max_tokens={args.max_tokens} "
          f"threads={torch.get_num_threads()} mean_prompt={sum(map(len, prompts)) / len(prompts):.0f} tokens")

    # Each side first runs the whole workload once untimed (one-time costs: oneDNN primitives per shape,
    # allocator growth; transformers' first full run is ~10% slower than its later ones), then
    # --rounds timed runs; the median is reported.
    ours = measure("loraplex   ", lambda r: run_ours(engine, rounds[r], args.max_tokens), args.rounds)
    ours1 = measure("loraplex   batch-1", lambda r: run_ours(engine, rounds[r][:1], args.max_tokens), args.rounds)
    if args.skip_hf:
        return
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, args.dtype)).to(device).eval()
    batch = args.hf_batch_size or len(prompts)
    theirs = measure("transformers", lambda r: run_hf(hf, engine.tokenizer, rounds[r], args.max_tokens, batch),
                     args.rounds)
    theirs1 = measure("transformers batch-1",
                      lambda r: run_hf(hf, engine.tokenizer, rounds[r][:1], args.max_tokens, 1), args.rounds)
    print(f"ratio loraplex/transformers: {ours / theirs:.2f}x at {len(prompts)} concurrent, "
          f"{ours1 / theirs1:.2f}x at batch 1")


if __name__ == "__main__":
    main()
