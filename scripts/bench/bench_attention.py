"""Prefill attention: the fused CPU kernel against the SDPA path, per chunk length (whole prompts).

    python scripts/bench/bench_attention.py [--dtype bfloat16] [--lengths 16,64,256,512,1024] [--training]
    python scripts/bench/bench_attention.py --decode [--rows 1] [--lengths 128,512,1024,2048]

The default model's geometry (9 heads, 3 kv heads, head_dim 64), 8 prompts of each length in one step,
one layer. Prints milliseconds per step for both and their ratio; engine/layers/attention.py sends chunks up to
KERNEL_MAX_PREFILL_TOKENS through the kernel and longer ones through SDPA. --training: the trainer's
packed attention instead, forward + backward: the kernels against autograd through SDPA per sequence.

--decode: a decode step's attention, `--rows` rows each `length` keys long, in every one of the default model's 30
layers (each its own cache, on huge pages as the engine keeps them), through the kernel's operator: ms per step from
memory (an 80 MiB read between steps evicts the caches, as a step's weights do) and in cache (the same step again),
against the SDPA path from memory, and the keys and values a step reads over the read bandwidth measured here (the
bound).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

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
    ap.add_argument("--lengths", default=None, help="tokens per prompt (default 16,64,256,512,1024) or, with "
                    "--decode, keys per row (default 128,512,1024,2048)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--training", action="store_true", help="packed attention, forward + backward")
    ap.add_argument("--decode", action="store_true", help="a decode step's attention in 30 layers")
    ap.add_argument("--rows", type=int, default=1, help="--decode: rows in the step")
    args = ap.parse_args()
    if not cpu_kernels.available():
        raise SystemExit(f"CPU kernels unavailable: {cpu_kernels.build_error()}")
    if args.training:
        return training(args)
    if args.decode:
        return decode(args)
    attention.KERNEL_MAX_PREFILL_TOKENS = 1 << 30  # let the kernel take every chunk, to compare
    dtype, block = getattr(torch, args.dtype), 16
    for n in (int(v) for v in (args.lengths or "16,64,256,512,1024").split(",")):
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


def decode_step_ms(q, caches, attn, through_kernel: bool, evict: torch.Tensor | None, reps: int = 7) -> float:
    """The best of `reps` decode steps' attention over every layer's cache, ms; `evict` (when given) is read before
    each step. through_kernel: the kernel's operator itself, as the engine's one-call layers reach it; else the module
    path (attention.paged_attention)."""
    times = []
    for _ in range(reps):
        if evict is not None:
            evict.sum()
        t0 = time.perf_counter()
        for cache in caches:
            if through_kernel:
                cpu_kernels.paged_attention(q, cache.k, cache.v, attn.kernel_slots, attn.kernel_rows, attn.kernel_lens,
                                            None, 0.125)
            else:
                attention.paged_attention(q, cache, attn, 0.125)
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3


def decode(args, layers: int = 30, block: int = 16) -> None:
    from loraplex.engine.hugepages import move_to_huge_pages_tensors
    sys.path.insert(0, str(Path(__file__).parent))
    from profile_decode import read_bandwidth_gbs
    dtype = getattr(torch, args.dtype)
    lengths = [int(v) for v in (args.lengths or "128,512,1024,2048").split(",")]
    blocks = -(-max(lengths) // block)
    caches = attention.allocate_kv_caches(layers, args.rows * blocks * block, 3, 64, dtype)
    tensors = [t for c in caches for t in (c.k, c.v)]
    move_to_huge_pages_tensors(tensors, "benchmark KV caches")
    for t in tensors:
        t.normal_()
    evict = torch.ones(80 << 18)  # 80 MiB of float32
    bandwidth = read_bandwidth_gbs()
    print(f"decode attention, {layers} layers, {args.rows} row(s), {args.dtype}; read bandwidth {bandwidth:.1f} GB/s",
          flush=True)
    print("| keys | KV MB a step | bound ms | kernel from memory ms (GB/s) | kernel in cache ms | SDPA from memory ms "
          "| SDPA / kernel |\n|---|---|---|---|---|---|---|")
    for n in lengths:
        tables = [list(range(i * blocks, i * blocks + -(-n // block))) for i in range(args.rows)]
        batch_args = ([0] * args.rows, [1] * args.rows, [n - 1] * args.rows, tables, block)
        q = torch.randn(args.rows, 9, 64).to(dtype)
        kernel = attention.build_forward_batch(*batch_args, cpu_kernel=True).attn
        sdpa = attention.build_forward_batch(*batch_args).attn

        mb = 2 * layers * args.rows * n * 3 * 64 * dtype.itemsize / 1e6
        cold, warm = (decode_step_ms(q, caches, kernel, True, evict if c else None) for c in (True, False))
        t_sdpa = decode_step_ms(q, caches, sdpa, False, evict)
        print(f"| {n} | {mb:.1f} | {mb / bandwidth:.3f} | {cold:.3f} ({mb / cold:.1f}) | {warm:.3f} | {t_sdpa:.3f} "
              f"| {t_sdpa / cold:.2f}x |", flush=True)


def training(args) -> None:
    dtype = getattr(torch, args.dtype)
    for n in (int(v) for v in (args.lengths or "16,64,256,512,1024").split(",")):
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
