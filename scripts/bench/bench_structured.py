"""What structured output and prompt logprobs cost, in-process (no HTTP), on the default model.

    python scripts/bench/bench_structured.py [--dtype bfloat16] [--rounds 3]

1. 64 concurrent requests of 64 output tokens (sampled, ignore_eos), half of them constrained by a JSON schema,
   against the same 64 unconstrained: output tokens/s and the ratio (issue 15's target: >= 0.85x).
2. 64 prompts of 256 tokens, prefill only (max_tokens 1), with prompt_logprobs=1 against without: seconds and ratio.
Rounds alternate the two sides; medians are printed. Numbers from one noisy machine: read the ratios.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

from prompts import PROMPTS

from loraplex.engine.core.sampling_params import SamplingParams, StructuredOutput
from loraplex.engine.engine_args import EngineArgs
from loraplex.engine.llm_engine import LLMEngine

SCHEMA = json.dumps({"type": "object", "properties": {
    "title": {"type": "string", "maxLength": 40},
    "items": {"type": "array", "items": {"type": "string", "maxLength": 24}, "minItems": 6, "maxItems": 6},
    "score": {"type": "integer", "minimum": 0, "maximum": 100}}, "required": ["title", "items", "score"],
    "additionalProperties": False})


def run(engine: LLMEngine, requests: list[tuple[list[int], SamplingParams]]) -> tuple[int, float]:
    """(output tokens, seconds) for all requests at once."""
    t0 = time.perf_counter()
    for i, (ids, params) in enumerate(requests):
        engine.add_request(f"r{time.perf_counter_ns()}-{i}", ids, params)
    tokens = 0
    while engine.has_unfinished_requests():
        tokens += sum(len(o.token_ids) for o in engine.step())
    return tokens, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()
    engine = LLMEngine.from_engine_args(EngineArgs(dtype=args.dtype, max_num_seqs=args.num_requests,
                                                   max_model_len=1024, enable_prefix_caching=False))
    tok = engine.tokenizer
    prompts = [tok.apply_chat_template([{"role": "user", "content": f"{PROMPTS[i % len(PROMPTS)]} (as JSON, {i})"}],
                                       add_generation_prompt=True, return_dict=False)
               for i in range(args.num_requests)]
    free = SamplingParams(max_tokens=args.max_tokens, temperature=0.8, seed=0, ignore_eos=True)
    constrained = SamplingParams(max_tokens=args.max_tokens, temperature=0.8, seed=0, ignore_eos=True,
                                 structured_output=StructuredOutput("json_schema", SCHEMA))
    plain = [(list(p), free) for p in prompts]
    mixed = [(list(p), constrained if i % 2 else free) for i, p in enumerate(prompts)]
    run(engine, mixed[:4])  # warm-up: compiles the grammar once (cached), oneDNN primitives
    run(engine, plain[:4])
    rates = {"free": [], "half constrained": []}
    for _ in range(args.rounds):
        for name, reqs in (("free", plain), ("half constrained", mixed)):
            tokens, seconds = run(engine, reqs)
            rates[name].append(tokens / seconds)
            print(f"{name:>17}: {tokens} tokens in {seconds:.2f} s = {tokens / seconds:.1f} tok/s", flush=True)
    free_rate, mixed_rate = (statistics.median(rates[k]) for k in ("free", "half constrained"))
    print(f"structured output: half constrained / free = {mixed_rate / free_rate:.3f}x "
          f"(median {mixed_rate:.1f} vs {free_rate:.1f} tok/s)")

    long_prompts = []
    for i in range(args.num_requests):
        ids = tok(" ".join(PROMPTS[(i + j) % len(PROMPTS)] for j in range(60))).input_ids
        long_prompts.append(ids[:255] + [i + 100])  # 256 tokens, distinct
    score = SamplingParams(max_tokens=1, prompt_logprobs=1)
    no_score = SamplingParams(max_tokens=1)
    run(engine, [(p, score) for p in long_prompts[:2]])
    times = {"prefill": [], "prefill + prompt logprobs": []}
    for _ in range(args.rounds):
        for name, params in (("prefill", no_score), ("prefill + prompt logprobs", score)):
            _, seconds = run(engine, [(p, params) for p in long_prompts])
            times[name].append(seconds)
            print(f"{name:>26}: {args.num_requests} x 256 tokens in {seconds:.2f} s", flush=True)
    base, scored = (statistics.median(times[k]) for k in ("prefill", "prefill + prompt logprobs"))
    print(f"prompt logprobs: {scored / base:.3f}x the time of plain prefill (median {scored:.2f} vs {base:.2f} s)")


if __name__ == "__main__":
    main()
