"""The batched LoRA op on this CPU: formulations of y += B[a]·(A[a]·x) for a decode batch.

    python scripts/bench/bench_lora_ops.py [--tokens 64] [--rank 8] [--dtype float32]

For 1, 8, 32 and 64 distinct adapters (tokens spread evenly), prints microseconds per call for:
  reference      per-token gather of A and B pages + batched matmuls (vLLM's CPU "bgmv" shape)
  segment-loop   one pair of matmuls per adapter on views of x (no gathers, many ops)
  ours           segment-padded bmm shrink + embedding_bag expand (adapters/ops/cpu.py)
next to the base 576x576 linear the op rides on, as a ratio.
"""
from __future__ import annotations

import argparse
import random
import time

import torch

from loraplex.adapters.ops.cpu import lora_apply_cpu
from loraplex.adapters.ops.meta import build_lora_meta
from loraplex.adapters.ops.reference import lora_apply_ref


def segment_loop(y, x, a_pool, b_pool, segments):
    for rows, pages in segments:
        r = torch.tensor(rows)
        p = torch.tensor(pages)
        y.index_add_(0, r, (x[r] @ a_pool[p].t()) @ b_pool[p])


def time_us(fn, repeats: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return 1e6 * (time.perf_counter() - t0) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=300)
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    n, h, r = args.tokens, args.hidden, args.rank
    x, y = torch.randn(n, h, dtype=dtype), torch.randn(n, h, dtype=dtype)
    weight = torch.randn(h, h, dtype=dtype)
    base = time_us(lambda: torch.nn.functional.linear(x, weight), args.repeats)
    print(f"tokens={n} rank={r} {h}x{h} {args.dtype} threads={torch.get_num_threads()}: "
          f"base linear {base:.0f} us")
    for num_adapters in (1, 8, 32, 64):
        pages_total = num_adapters * r + 1
        a_pool, b_pool = torch.randn(pages_total, h, dtype=dtype), torch.randn(pages_total, h, dtype=dtype)
        a_pool[0] = b_pool[0] = 0
        rows = list(range(n))
        random.Random(0).shuffle(rows)
        segments = [(sorted(rows[i::num_adapters]), list(range(1 + i * r, 1 + (i + 1) * r)))
                    for i in range(num_adapters)]
        meta = build_lora_meta(n, segments)
        results = {
            "reference": time_us(lambda: lora_apply_ref(y, x, a_pool, b_pool, meta), args.repeats),
            "segment-loop": time_us(lambda: segment_loop(y, x, a_pool, b_pool, segments), args.repeats),
            "ours": time_us(lambda: lora_apply_cpu(y, x, a_pool, b_pool, meta), args.repeats),
        }
        print(f"{num_adapters:3d} adapters: " + ", ".join(
            f"{k} {v:.0f} us ({v / base:.2f}x base)" for k, v in results.items()))


if __name__ == "__main__":
    main()
