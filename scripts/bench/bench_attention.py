"""Prefill attention: the fused CPU kernel against the SDPA path, per chunk length (whole prompts).

    python scripts/bench/bench_attention.py [--dtype bfloat16] [--lengths 16,64,256,512,1024] [--training]

The default model's geometry (9 heads, 3 kv heads, head_dim 64), 8 prompts of each length in one step,
one layer. Prints milliseconds per step for both and their ratio; engine/layers/attention.py sends chunks up to
KERNEL_MAX_PREFILL_TOKENS through the kernel and longer ones through SDPA. --training: the trainer's
packed attention instead, forward + backward: the kernels against autograd through SDPA per sequence.
"""
from __future__ import annotations

import argparse
import time

import torch

from loraplex.engine.kernels import cpu_kernels
from loraplex.engine.layers import attention


def time_ms(fn, reps: int = 5) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--lengths", default="16,64,256,512,1024")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--training", action="store_true", help="packed attention, forward + backward")
    args = ap.parse_args()
    if not cpu_kernels.available():
        raise SystemExit(f"CPU kernels unavailable: {cpu_kernels.build_error()}")
    if args.training:
        return training(args)
    attention.KERNEL_MAX_PREFILL_TOKENS = 1 << 30  # let the kernel take every chunk, to compare
    dtype, block = getattr(torch, args.dtype), 16
    for n in (int(v) for v in args.lengths.split(",")):
        blocks = -(-n // block)
        tables = [list(range(i * blocks, (i + 1) * blocks)) for i in range(args.prompts)]
        (cache,) = attention.allocate_kv_caches(1, args.prompts * blocks * block, 3, 64, dtype)
        cache.k.normal_(), cache.v.normal_()
        q = torch.randn(args.prompts * n, 9, 64).to(dtype)
        batch_args = ([0] * (args.prompts * n), [n] * args.prompts, [0] * args.prompts, tables, block)
        sdpa = attention.build_forward_batch(*batch_args, logits_indices=[]).attn
        kernel = attention.build_forward_batch(*batch_args, logits_indices=[], cpu_kernel=True).attn
        t_sdpa = time_ms(lambda: attention.paged_attention(q, cache, sdpa, 0.125))
        t_kernel = time_ms(lambda: attention.paged_attention(q, cache, kernel, 0.125))
        print(f"{args.prompts} x {n:5d} tokens: SDPA {t_sdpa:8.2f} ms, kernel {t_kernel:8.2f} ms, "
              f"kernel/SDPA {t_kernel / t_sdpa:.2f}")


def training(args) -> None:
    dtype = getattr(torch, args.dtype)
    for n in (int(v) for v in args.lengths.split(",")):
        lens = [n] * args.prompts
        packed = attention.build_packed_batch([0] * sum(lens), lens, cpu_kernel=True).attn.packed
        q, grad = (torch.randn(sum(lens), 9, 64).to(dtype) for _ in range(2))
        k, v = (torch.randn(sum(lens), 3, 64).to(dtype) for _ in range(2))

        def step():
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]
            attention.packed_attention(*leaves, packed, None, 0.125).backward(grad)

        t_kernel = time_ms(step)
        with cpu_kernels.suspended():
            t_sdpa = time_ms(step)
        print(f"{args.prompts} x {n:5d} tokens, forward + backward: SDPA {t_sdpa:8.2f} ms, kernel "
              f"{t_kernel:8.2f} ms, SDPA/kernel {t_sdpa / t_kernel:.2f}x")


if __name__ == "__main__":
    main()
