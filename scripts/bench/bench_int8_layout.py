"""Decode steps of an 8/4-bit GPTQ model with its codes in channel lanes (kinds 7 and 8, the default) against the
interleaved layout (kinds 5 and 6), in one engine, the layouts switched on the same weights and alternated round by
round (this VM's bandwidth drifts minute to minute: only a same-process, alternating A/B means anything).

    python scripts/bench/bench_int8_layout.py --model <GPTQ folder> [--batch 1 4 16] [--steps 32] [--rounds 3]
        [--kv-cache-dtype bfloat16]

Prints, per batch size, the median step time of each layout and the interleaved / lanes ratio (above 1: lanes
faster). Both layouts give tokens of their own arithmetic (each batch-invariant); that they match their reference
is tests/engine/quant/test_stream.py's business, not this script's.
"""
from __future__ import annotations

import argparse
import statistics

from bench_engine import make_prompts
from profile_decode import decode_steps, finish

LAYOUTS = ("lanes", "interleaved")


def set_layout(linears, layout: str) -> int:
    """Every int8-activation linear that computes (a fused group's, not its members) into `layout`; returns how many."""
    n = 0
    for m in linears:
        if m.weight is not None and m.act_int8:
            m.set_act_int8(True, layout=layout)
            n += 1
    return n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a GPTQ folder (loraplex quantize --format gptq --bits 8|4)")
    p.add_argument("--batch", nargs="+", type=int, default=[1, 4, 16])
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--kv-cache-dtype", default="bfloat16", choices=["auto", "bfloat16"])
    args = p.parse_args()

    from loraplex.engine.engine_args import EngineArgs
    from loraplex.engine.llm_engine import LLMEngine
    from loraplex.engine.quant.stream import StreamLinear

    try:
        engine = LLMEngine.from_engine_args(EngineArgs(model=args.model, dtype="float32", max_num_seqs=max(args.batch),
                                                       enable_prefix_caching=False, cpu_linear="stream",
                                                       quantization="gptq", kv_cache_dtype=args.kv_cache_dtype,
                                                       num_scheduler_steps=1))
    except ValueError as e:  # not a GPTQ checkpoint, ...
        raise SystemExit(f"bench_int8_layout.py: {e}") from None
    linears = [m for m in engine.runner.model.modules() if isinstance(m, StreamLinear)]
    if not any(m.act_int8 for m in linears):
        raise SystemExit(f"{args.model}: no linear takes int8 activations (an 8/4-bit GPTQ model is needed)")
    prompts = make_prompts(engine.tokenizer, max(args.batch))
    ms: dict[tuple[str, int], list[float]] = {}
    for r in range(args.rounds):
        for layout in LAYOUTS:
            count = set_layout(linears, layout)
            for batch in args.batch:
                times = decode_steps(engine, batch, prompts, args.steps)
                finish(engine)
                ms.setdefault((layout, batch), []).append(statistics.median(times) * 1e3)
            print(f"round {r + 1}, {layout} ({count} linears): " + ", ".join(
                f"batch {b} {ms[(layout, b)][-1]:.2f} ms" for b in args.batch), flush=True)
    set_layout(linears, LAYOUTS[0])
    print("\n| batch | lanes ms/step | interleaved ms/step | interleaved / lanes |\n|---|---|---|---|")
    for batch in args.batch:
        lanes, inter = (statistics.median(ms[(layout, batch)]) for layout in LAYOUTS)
        print(f"| {batch} | {lanes:.2f} | {inter:.2f} | {inter / lanes:.2f}x |")


if __name__ == "__main__":
    main()
