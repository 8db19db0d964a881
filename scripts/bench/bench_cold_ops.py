"""What one small operator call costs right after a decode step's weight stream, against the same call without it.

    python scripts/bench/bench_cold_ops.py [--stream-mb 80] [--gap-us 300] [--repeats 200]

A batch-1 step streams every weight once (~80 MB for the 4-bit default model, ~270 MB in bfloat16) and then runs
its Python around the stack call: embedding lookup, final norm, head, sampling, batch metadata, detokenizing. This
times three tiny calls (an embedding row, the rms_norm kernel on one row, an in-place add) after: nothing (the
calls alone), a --stream-mb sum over a buffer on huge pages (as the engine keeps its weights) with every thread,
the same with one thread, and a sum of 256 KB; each followed by --gap-us of busy Python, as the step's own Python sits
between its parts. Medians over --repeats, and each case's ratio to the first: how much of the step's "Python" time is
the interpreter and the dispatcher running from cold caches rather than the work itself.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def busy(us: float) -> None:
    t0 = time.perf_counter()
    while (time.perf_counter() - t0) * 1e6 < us:
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stream-mb", type=int, default=80)
    ap.add_argument("--gap-us", type=float, default=300)
    ap.add_argument("--repeats", type=int, default=200)
    args = ap.parse_args()

    from loraplex.engine.hugepages import move_to_huge_pages_tensors
    from loraplex.engine.kernels import cpu_kernels
    if not cpu_kernels.available():
        raise SystemExit(f"the CPU kernels did not build: {cpu_kernels.build_error()}")
    emb, ids = torch.randn(49152, 576), torch.tensor([123])
    x, w = torch.randn(1, 576), torch.ones(576)
    stream, small = torch.randn(args.stream_mb * 2**20 // 4), torch.randn(256 * 2**10 // 4)
    huge = move_to_huge_pages_tensors([stream], "stream buffer") > 0
    threads = torch.get_num_threads()
    calls = {"embedding row": lambda: F.embedding(ids, emb),
             "rms_norm kernel, 1 row": lambda: torch.ops.loraplex_cpu.rms_norm(x, w, 1e-5),
             "add_, 1 row": lambda: x.add_(0)}

    def case(before, num_threads: int) -> dict[str, float]:
        torch.set_num_threads(num_threads)
        times: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(args.repeats):
            before()
            busy(args.gap_us)
            for name, call in calls.items():
                t0 = time.perf_counter()
                call()
                times[name].append((time.perf_counter() - t0) * 1e6)
        torch.set_num_threads(threads)
        return {name: statistics.median(t) for name, t in times.items()}

    for call in calls.values():  # warm
        call()
    rows = [("nothing but the gap", case(lambda: None, threads)),
            (f"after a {args.stream_mb} MB sum ({'huge' if huge else '4 KiB'} pages), {threads} threads",
             case(stream.sum, threads)),
            (f"after a {args.stream_mb} MB sum, 1 thread", case(stream.sum, 1)),
            ("after a 256 KB sum", case(small.sum, threads))]
    base = rows[0][1]
    print(f"| after ({args.gap_us:.0f} us of Python between) | " + " | ".join(calls) + " |")
    print("|---|" + "---|" * len(calls))
    for label, got in rows:
        print(f"| {label} | " + " | ".join(f"{got[n]:.1f} us ({got[n] / base[n]:.1f}x)" for n in calls) + " |")


if __name__ == "__main__":
    main()
