"""The screened greedy head (engine/layers/greedy_head.py) against the plain one: how many vocabulary rows the 8-bit
screening leaves, the head alone per call, and whole greedy decoding with it on and off.

    python scripts/bench/bench_greedy_head.py [--dtype bfloat16] [--rows 1 2 4 8 16 32] [--concurrency 1 4]
        [--max-tokens 64] [--rounds 3] [--model FOLDER]

1. Head inputs: the final hidden states of greedy decoding over a few prompts (a hook on the plain head).
2. Candidates: per single row, how many vocabulary rows the screening hands to the exact pass (median, p90, max).
3. Head calls: `greedy(head(x))` vs `ScreenedGreedyHead.greedy(x)` for x of each --rows count (rows drawn from the
   captured ones), alternating per round, median ms per call and the ratio; the tokens are checked equal.
4. Decoding: two engines in this process, --screened-greedy-head on and off (same arguments otherwise), the same greedy
   requests at each --concurrency (ignore_eos, --max-tokens), alternating which goes first; median output tok/s and
   the ratio, and a check that both produced the same tokens.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_spec_decode import chat  # noqa: E402
from prompts import PROMPTS  # noqa: E402


def decode(engine, prompts: list[list[int]], max_tokens: int, concurrency: int) -> tuple[float, list[list[int]]]:
    """Greedy requests, `concurrency` at a time -> (output tok/s, each request's tokens)."""
    from loraplex.engine.core.sampling_params import SamplingParams
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    outputs: dict[int, list[int]] = {}
    pending, active = list(enumerate(prompts)), {}
    t0 = time.perf_counter()
    while pending or engine.has_unfinished_requests():
        while pending and len(active) < concurrency:
            i, p = pending.pop(0)
            rid = f"head-bench-{time.monotonic_ns()}-{i}"
            engine.add_request(rid, p, params)
            active[rid], outputs[i] = i, []
        for out in engine.step():
            outputs[active[out.request_id]].extend(out.token_ids)
            if out.finished:
                del active[out.request_id]
    seconds = time.perf_counter() - t0
    return sum(map(len, outputs.values())) / seconds, [outputs[i] for i in sorted(outputs)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--calls", type=int, default=100, help="head calls per timing round")
    args = ap.parse_args()

    import torch

    from loraplex.engine.engine_args import EngineArgs
    from loraplex.engine.layers.greedy_head import ScreenedGreedyHead
    from loraplex.engine.layers.sampler import greedy
    from loraplex.engine.llm_engine import LLMEngine

    def engine(screened: bool) -> LLMEngine:
        return LLMEngine.from_engine_args(EngineArgs(
            model=args.model, dtype=args.dtype, cpu_linear="stream", enable_lora=False, screened_greedy_head=screened,
            max_num_seqs=max(max(args.concurrency), 8)))

    engines = {True: engine(True), False: engine(False)}
    plain = engines[False]
    head = plain.runner.model.lm_head
    if not ScreenedGreedyHead.supports(head):
        sys.exit(f"the model's head cannot be screened: {head!r}")
    screen = engines[True].runner.greedy_head
    prompts = [chat(plain.tokenizer, p) for p in PROMPTS[:8]]

    captured: list[torch.Tensor] = []
    hook = head.register_forward_pre_hook(lambda m, a: captured.append(a[0].detach().clone()))
    decode(plain, prompts[:4], args.max_tokens, 4)
    hook.remove()
    positions = torch.cat(captured)  # [P, hidden]
    counts = sorted(int(screen.candidates(positions[i:i + 1]).numel()) for i in range(positions.shape[0]))
    print(f"{args.dtype}, head {tuple(head.weight.shape)}: candidates per row over {len(counts)} decode positions: "
          f"median {statistics.median(counts)}, p90 {counts[int(0.9 * len(counts))]}, max {counts[-1]} "
          f"(of {head.out_features})")

    print(f"\nhead call (ms, median of {args.rounds} rounds x {args.calls} calls):")
    print(f"{'rows':>5} {'plain':>8} {'screened':>9} {'ratio':>6}")
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for m in args.rows:
            xs = [positions[torch.randint(positions.shape[0], (m,), generator=gen)] for _ in range(args.calls)]
            for x in xs[:10]:
                assert torch.equal(screen.greedy(x), greedy(head(x))), "screened tokens differ from the plain head's"
            times: dict[str, list[float]] = {"plain": [], "screened": []}
            for r in range(args.rounds):
                order = [("plain", lambda x: greedy(head(x))), ("screened", screen.greedy)]
                for name, fn in (order if r % 2 == 0 else order[::-1]):
                    t = time.perf_counter()
                    for x in xs:
                        fn(x)
                    times[name].append((time.perf_counter() - t) / len(xs) * 1e3)
            p, s = statistics.median(times["plain"]), statistics.median(times["screened"])
            print(f"{m:>5} {p:>8.3f} {s:>9.3f} {p / s:>5.2f}x")

    print(f"\ngreedy decoding (output tok/s, {len(prompts)} requests x {args.max_tokens} tokens, median of "
          f"{args.rounds} rounds):")
    print(f"{'concurrency':>11} {'plain':>8} {'screened':>9} {'ratio':>6}  same tokens")
    for c in args.concurrency:
        rates: dict[bool, list[float]] = {True: [], False: []}
        tokens: dict[bool, list[list[int]]] = {}
        for r in range(args.rounds):
            for on in ((True, False) if r % 2 == 0 else (False, True)):
                rate, tokens[on] = decode(engines[on], prompts, args.max_tokens, c)
                rates[on].append(rate)
        p, s = statistics.median(rates[False]), statistics.median(rates[True])
        print(f"{c:>11} {p:>8.1f} {s:>9.1f} {s / p:>5.2f}x  {tokens[True] == tokens[False]}")


if __name__ == "__main__":
    main()
