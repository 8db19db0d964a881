"""What the CPU can compute against what memory can deliver (issue 23): for each linear of a model's decode step at
batch 1, the weight-streaming kernel's time per call with its weights in cache (the same call repeated: the
compute ceiling of these cores; a call larger than the last-level cache, such as a dense output head, reads memory
either way) and from memory (every layer's calls in model order, so each call's weights come
from DRAM as in a real step), beside the bandwidth bound (its bytes over the read bandwidth measured here).

    python scripts/bench/bench_linear_ceiling.py [--model FOLDER --quantization gptq] [--dtype float32]
        [--kv-cache-dtype bfloat16] [--activation-quant int8] [--passes 5]

Per phase (qkv, o, gate_up, down, the head when it streams, or its 8-bit screening copy where plain-greedy steps
take one: lm_head_screen), summed over the layers a step calls it: MB its calls read (`StreamLinear.kernel_bytes`), the
bandwidth bound in ms, the from-memory time and the in-cache time (each with its GB/s), and the floor of one call
(the same operator on a 16 x 64 weight: dispatch and the threads' fork and join). A call from memory takes at least
the larger of its bound and its in-cache time (reading and arithmetic fully overlapped) and at most about their sum
(one after the other): where it sits says whether the bytes, the arithmetic or their overlap limits it. Times are
the operator's own (torch.profiler), not Python's; the engine's whole-stack call runs the same kernel without the
operator dispatch.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from profile_decode import LINEAR_PHASES, read_bandwidth_gbs

OP = "loraplex_cpu::stream_linear"
TIMED = "timed phase"


def op_us(calls, passes: int) -> float:
    """Median over `passes` of the operator's own time per call, each pass running every call of `calls` once."""
    from loraplex.engine.quant.stream import stream_product
    times = []
    for _ in range(passes):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for x, linear in calls:
                stream_product(x, linear)
        event = next(e for e in prof.key_averages() if e.key == OP)
        times.append(event.cpu_time_total / event.count)
    return statistics.median(times)


def stream_linears(model: torch.nn.Module) -> list[tuple[str, object]]:
    """(phase, the StreamLinear that computes) for every streamed linear in model order, a group (q/k/v, gate/up)
    once under its first member's phase."""
    from loraplex.engine.quant.stream import StreamLinear
    seen: set[int] = set()
    found = []
    for name, m in model.named_modules():
        if not isinstance(m, StreamLinear):
            continue
        computing = m if m.group is None else m.group.linear
        if id(computing) in seen or computing.weight is None:
            continue
        seen.add(id(computing))
        leaf = name.rsplit(".", 1)[-1]
        phase = next((p for p, mods in LINEAR_PHASES.items() if leaf in mods), leaf)
        found.append((phase, computing))
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF-layout or GPTQ folder (default: the default model)")
    ap.add_argument("--quantization", default="none", help="none (the folder's dense weights) or gptq")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "bfloat16"])
    ap.add_argument("--activation-quant", default="int8", choices=["int8", "none"])
    ap.add_argument("--passes", type=int, default=5)
    args = ap.parse_args()
    from loraplex.engine.engine_args import EngineArgs
    from loraplex.engine.llm_engine import LLMEngine
    from loraplex.engine.quant.stream import StreamLinear, stream_product
    model = args.model
    if model is None:
        from loraplex.engine.default_model import ensure_default_model
        model = str(ensure_default_model())
    engine = LLMEngine.from_engine_args(EngineArgs(model=model, dtype=args.dtype, max_num_seqs=1,
                                                   cpu_linear="stream", quantization=args.quantization,
                                                   kv_cache_dtype=args.kv_cache_dtype,
                                                   activation_quant=args.activation_quant))
    dtype = getattr(torch, args.dtype)
    linears = stream_linears(engine.runner.model)
    if engine.runner.greedy_head is not None:  # plain-greedy steps read the head's 8-bit screening copy instead
        linears = [(p, lin) for p, lin in linears if lin is not engine.runner.greedy_head.head]
        linears.append(("lm_head_screen", engine.runner.greedy_head.screen))
    if not linears:
        sys.exit("no streamed linears in this model (dense float32 with --cpu-linear auto/onednn?)")
    torch.manual_seed(0)
    calls = [(phase, torch.randn(1, lin.in_features).to(dtype), lin) for phase, lin in linears]
    bandwidth = read_bandwidth_gbs()
    tiny = StreamLinear(64, 16, 32 if dtype == torch.float32 else 16, torch.randn(16, 64).to(dtype))
    floor = op_us([(torch.randn(1, 64).to(dtype), tiny)] * 200, args.passes)
    op_us([(x, lin) for _, x, lin in calls], 1)  # warm-up
    print(f"linear ceiling: {model}, {args.dtype}{' ' + args.quantization if args.quantization != 'none' else ''}, "
          f"threads={torch.get_num_threads()}, measured read bandwidth {bandwidth:.1f} GB/s, one call's floor "
          f"{floor:.1f} us (16 x 64 weight: dispatch, fork and join)", flush=True)
    memory = {}  # phase -> us per call from memory: every call in model order, this phase's calls timed
    for phase in dict.fromkeys(p for p, _, _ in calls):
        per_pass = []
        for _ in range(args.passes):
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                for p, x, lin in calls:
                    with torch.profiler.record_function(TIMED if p == phase else "other"):
                        stream_product(x, lin)
            ops = [e for e in prof.events() if e.name == OP and e.cpu_parent is not None and e.cpu_parent.name == TIMED]
            per_pass.append(statistics.mean(e.cpu_time_total for e in ops))
        memory[phase] = statistics.median(per_pass)
    rows = []
    for phase, memory_us in memory.items():
        members = [(x, lin) for p, x, lin in calls if p == phase]
        nbytes = sum(lin.kernel_bytes for _, lin in members)
        cache_us = op_us([members[0]] * 100, args.passes)
        rows.append((phase, len(members), nbytes, memory_us * len(members), cache_us * len(members)))
    print("| phase | calls | MB | bound ms | from memory ms (GB/s) | in cache ms (GB/s) |\n|---|---|---|---|---|---|")
    for phase, n, nbytes, mem_us, cache_us in rows:
        print(f"| {phase} | {n} | {nbytes / 1e6:.1f} | {nbytes / bandwidth / 1e6:.3f} | {mem_us / 1e3:.3f} "
              f"({nbytes / mem_us / 1e3:.1f}) | {cache_us / 1e3:.3f} ({nbytes / cache_us / 1e3:.1f}) |")
    total_bytes = sum(r[2] for r in rows)
    mem_ms, cache_ms = (sum(r[i] for r in rows) / 1e3 for i in (3, 4))
    bound_ms = total_bytes / bandwidth / 1e6
    print(f"all linears: {total_bytes / 1e6:.1f} MB; bound {bound_ms:.3f} ms, in cache {cache_ms:.3f} ms "
          f"({total_bytes / cache_ms / 1e6:.1f} GB/s), from memory {mem_ms:.3f} ms = {100 * bound_ms / mem_ms:.0f}% of "
          f"the bound, between the larger of the two ({max(bound_ms, cache_ms):.3f} ms: reading and computing "
          f"overlapped) and their sum ({bound_ms + cache_ms:.3f} ms: one after the other)")


if __name__ == "__main__":
    main()
