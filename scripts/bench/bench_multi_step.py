"""Multi-step decoding (`--num-scheduler-steps`) in the engine: decode speed with one step per schedule against up to
N, at a few streams, base model and with a rank-8 adapter, the same greedy requests through engines in this process.

    python scripts/bench/bench_multi_step.py [--steps 1 8] [--dtype bfloat16] [--cpu-linear auto]
        [--concurrency 1 4] [--max-tokens 128] [--rounds 3] [--stream-interval-ms 20]
        [--model FOLDER --quantization gptq --kv-cache-dtype bfloat16] [--no-adapter]

Each round runs every engine on the same open-ended prompts (greedy, to EOS or --max-tokens), alternating which
goes first; prints per run output tokens/s and the tokens per engine step, then the medians' ratios against the
first --steps value, and checks that every engine produced the same tokens. The multi-step engines fit their steps
into --stream-interval-ms as a server does (the default window; a larger one lets more steps run per schedule).
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_spec_decode import OPEN_PROMPTS, add_engine_options, build_engines, chat, run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_options(ap, dtype="bfloat16", rounds=3)
    ap.add_argument("--steps", nargs="+", type=int, default=[1, 8], help="--num-scheduler-steps of each engine")
    ap.add_argument("--stream-interval-ms", type=float, default=20.0)
    args = ap.parse_args()
    model, engines = build_engines(args, {steps: {"num_scheduler_steps": steps,
                                                  "stream_interval_ms": args.stream_interval_ms}
                                          for steps in args.steps}, "bench-multi-step-")
    tok = engines[args.steps[0]].tokenizer
    prompts = [chat(tok, p) for p in OPEN_PROMPTS]
    print(f"model={model} dtype={args.dtype} cpu_linear={args.cpu_linear} quantization={args.quantization} "
          f"steps={args.steps} stream_interval_ms={args.stream_interval_ms} max_tokens={args.max_tokens} "
          f"rounds={args.rounds}", flush=True)
    for engine in engines.values():  # untimed warm-up (and a first timed decode step for the window)
        run(engine, prompts[:1], 16, 1, None)
    rows = []
    for adapter_key in [None] + ([] if args.no_adapter else [(1, 1)]):
        for conc in args.concurrency:
            label = f"{'adapter' if adapter_key else 'base'}, {conc} stream{'s' if conc > 1 else ''}"
            results: dict[int, list[dict]] = {s: [] for s in args.steps}
            for r in range(args.rounds):
                order = args.steps[r % len(args.steps):] + args.steps[:r % len(args.steps)]
                for steps in order:
                    res = run(engines[steps], prompts, args.max_tokens, conc, adapter_key)
                    results[steps].append(res)
                    print(f"  {label} [steps {steps}]: {res['tok_s']:.1f} tok/s, {res['tokens']} tokens in "
                          f"{res['steps']} engine steps ({res['tokens'] / res['steps']:.2f} a step)", flush=True)
            first = results[args.steps[0]]
            same = all(res[i]["outputs"] == first[i]["outputs"] for res in results.values() for i in range(args.rounds))
            medians = {s: statistics.median(x["tok_s"] for x in res) for s, res in results.items()}
            rows.append((label, medians, same))
    base = args.steps[0]
    print("\n| load | " + " | ".join(f"steps {s} tok/s" for s in args.steps) + " | "
          + " | ".join(f"{s} / {base}" for s in args.steps[1:]) + " | same tokens |")
    print("|---" * (2 * len(args.steps)) + "|---|")
    for label, medians, same in rows:
        print(f"| {label} | " + " | ".join(f"{medians[s]:.1f}" for s in args.steps) + " | "
              + " | ".join(f"{medians[s] / medians[base]:.3f}x" for s in args.steps[1:]) + f" | {same} |")


if __name__ == "__main__":
    main()
