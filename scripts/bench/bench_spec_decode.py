"""Prompt-lookup speculative decoding in the engine: speed-up and acceptance where the output repeats the prompt
(editing, extraction) and where it does not (open-ended writing), base model and with an adapter.

    python scripts/bench/bench_spec_decode.py [--dtype float32] [--cpu-linear auto] [--max-tokens 128]
        [--num-speculative-tokens 4] [--concurrency 1 4] [--rounds 2] [--model FOLDER --quantization gptq]
        [--kv-cache-dtype bfloat16]

For each workload and concurrency, the same greedy requests (stopping at EOS, as a user's would) run through two
engines in this process, one plain and one with `--speculative-config '{"method": "ngram", ...}'`, alternating
which goes first each round. Prints per run: output tokens/s, engine steps, draft tokens and how many the model
accepted; then the medians' ratio (spec / plain), and checks that both engines produced the same tokens.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

EDIT_TEXTS = [
    ("The committee, having considered the submissions received during the consultation period, resolved to defer "
     "its decision on the proposed amendments until the next scheduled meeting, at which the chair will present a "
     "revised draft that incorporates the comments of the regional offices."),
    ("def moving_average(values, window):\n    result = []\n    for i in range(len(values) - window + 1):\n"
     "        total = 0\n        for j in range(window):\n            total += values[i + j]\n"
     "        result.append(total / window)\n    return result\n"),
    ("Order 1182: 3 x blue ceramic mug (SKU MUG-BL-03) at 12.50 each, 1 x walnut serving board (SKU BRD-WN-11) at "
     "48.00, 2 x linen napkin set (SKU NAP-LN-02) at 19.90 each. Ship to: 14 Harbour Road, Leith, EH6 6LQ."),
    ("Photosynthesis converts light energy into chemical energy. In the light reactions, water is split and ATP and "
     "NADPH are made; in the Calvin cycle, carbon dioxide is fixed into sugars using that ATP and NADPH."),
]
EDIT_TASKS = ["Repeat the following text exactly, then stop:\n\n{}",
              "Rewrite the following, keeping every word but fixing any errors:\n\n{}",
              "Copy this out and add a short title line above it:\n\n{}",
              "Extract the text below verbatim inside a code block:\n\n{}"]
OPEN_PROMPTS = ["Write a short story about a lighthouse keeper who finds a message in a bottle.",
                "Explain why the sky is blue to a ten-year-old.",
                "Give me five ideas for a weekend trip in the mountains.",
                "Describe your ideal breakfast in detail."]


def chat(tokenizer, text: str) -> list[int]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def run(engine, prompts: list[list[int]], max_tokens: int, concurrency: int, model: str | None) -> dict:
    from loraplex.engine.core.sampling_params import SamplingParams
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    outputs: dict[int, list[int]] = {}
    pending = list(enumerate(prompts))
    active: dict[str, int] = {}
    steps = 0
    s = engine.scheduler
    draft0, acc0 = s.num_draft_tokens, s.num_accepted_tokens
    t0 = time.perf_counter()
    while pending or engine.has_unfinished_requests():
        while pending and len(active) < concurrency:
            i, p = pending.pop(0)
            rid = f"spec-bench-{time.monotonic_ns()}-{i}"
            engine.add_request(rid, p, params, **({"adapter": model} if model else {}))
            active[rid] = i
            outputs[i] = []
        steps += 1
        for out in engine.step():
            outputs[active[out.request_id]].extend(out.token_ids)
            if out.finished:
                del active[out.request_id]
    seconds = time.perf_counter() - t0
    tokens = sum(len(v) for v in outputs.values())
    return {"tok_s": tokens / seconds, "tokens": tokens, "steps": steps, "outputs": [outputs[i] for i in sorted(outputs)],
            "draft": s.num_draft_tokens - draft0, "accepted": s.num_accepted_tokens - acc0}


def add_engine_options(ap: argparse.ArgumentParser, dtype: str, rounds: int) -> None:
    """The options every engine of build_engines shares (this script's and bench_multi_step.py's)."""
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default=dtype, choices=["float32", "bfloat16"])
    ap.add_argument("--cpu-linear", default="auto", choices=["auto", "stream", "onednn"])
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--concurrency", nargs="+", type=int, default=[1, 4])
    ap.add_argument("--rounds", type=int, default=rounds)
    ap.add_argument("--no-adapter", action="store_true", help="skip the runs with a rank-8 adapter")
    ap.add_argument("--quantization", default="none", help="as `loraplex serve --quantization` (e.g. gptq)")
    ap.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "bfloat16"])


def build_engines(args: argparse.Namespace, variants: dict, prefix: str) -> tuple[str, dict]:
    """(model folder, {name: LLMEngine}): one engine per variant (EngineArgs fields on top of add_engine_options'),
    each with LoRA on and the same random rank-8 q/v adapter registered as (1, 1)."""
    from loraplex.adapters.runtime import create_lora_runtime
    from loraplex.adapters.synthetic import write_random_peft
    from loraplex.engine.default_model import ensure_default_model
    from loraplex.engine.engine_args import EngineArgs
    from loraplex.engine.llm_engine import LLMEngine, _read_model_config

    model = args.model or str(ensure_default_model())
    adapter = write_random_peft(Path(tempfile.mkdtemp(prefix=prefix)) / "a0", _read_model_config(model), r=8, seed=0,
                                std=0.02)
    engines = {}
    for name, fields in variants.items():
        engine = LLMEngine.from_engine_args(
            EngineArgs(model=model, dtype=args.dtype, cpu_linear=args.cpu_linear, max_num_seqs=max(args.concurrency),
                       enable_prefix_caching=False, enable_lora=True, quantization=args.quantization,
                       kv_cache_dtype=args.kv_cache_dtype, **fields),
            hook_factory=create_lora_runtime)
        engine.adapter_hook.register_adapter("a0", 1, 1, str(adapter))
        engines[name] = engine
    return model, engines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_options(ap, dtype="float32", rounds=2)
    ap.add_argument("--num-speculative-tokens", type=int, default=4)
    ap.add_argument("--prompt-lookup-max", type=int, default=4)
    ap.add_argument("--prompt-lookup-min", type=int, default=2)
    args = ap.parse_args()
    spec = json.dumps({"method": "ngram", "num_speculative_tokens": args.num_speculative_tokens,
                       "prompt_lookup_max": args.prompt_lookup_max, "prompt_lookup_min": args.prompt_lookup_min})
    model, engines = build_engines(args, {"plain": {}, "spec": {"speculative_config": spec}}, "bench-spec-")
    tok = engines["plain"].tokenizer
    workloads = {
        "edit/extract": [chat(tok, task.format(text)) for task in EDIT_TASKS for text in EDIT_TEXTS][:8],
        "open-ended": [chat(tok, p) for p in OPEN_PROMPTS],
    }
    print(f"model={model} dtype={args.dtype} cpu_linear={args.cpu_linear} speculative={spec} "
          f"max_tokens={args.max_tokens} rounds={args.rounds}", flush=True)
    for engine in engines.values():  # untimed warm-up
        run(engine, workloads["open-ended"][:1], 8, 1, None)
    summary = []
    for wname, prompts in workloads.items():
        for adapter_key in [None] + ([] if args.no_adapter else [(1, 1)]):
            for conc in args.concurrency:
                label = f"{wname}, {'adapter' if adapter_key else 'base'}, concurrency {conc}"
                results: dict[str, list[dict]] = {"plain": [], "spec": []}
                for r in range(args.rounds):
                    order = ["plain", "spec"] if r % 2 == 0 else ["spec", "plain"]
                    for name in order:
                        res = run(engines[name], prompts, args.max_tokens, conc, adapter_key)
                        results[name].append(res)
                        extra = (f", drafts {res['draft']}, accepted {res['accepted']} "
                                 f"({res['accepted'] / max(1, res['draft']):.0%})" if name == "spec" else "")
                        print(f"  {label} [{name}]: {res['tok_s']:.1f} tok/s, {res['tokens']} tokens in "
                              f"{res['steps']} steps{extra}", flush=True)
                same = all(a["outputs"] == b["outputs"] for a, b in zip(results["plain"], results["spec"]))
                plain = statistics.median(x["tok_s"] for x in results["plain"])
                fast = statistics.median(x["tok_s"] for x in results["spec"])
                draft = sum(x["draft"] for x in results["spec"])
                acc = sum(x["accepted"] for x in results["spec"])
                tokens_per_step = statistics.median(x["tokens"] / x["steps"] for x in results["spec"])
                summary.append((label, plain, fast, acc / max(1, draft), tokens_per_step, same))
    print("\n| workload | plain tok/s | speculative tok/s | speed-up | acceptance | tokens/step | identical |")
    print("|---|---|---|---|---|---|---|")
    for label, plain, fast, rate, tps, same in summary:
        print(f"| {label} | {plain:.1f} | {fast:.1f} | {fast / plain:.2f}x | {rate:.0%} | {tps:.2f} | {same} |")


if __name__ == "__main__":
    main()
