"""Multi-adapter throughput: the same workload on the base model, then spread over 8/32/128 distinct
rank-8 adapters, against the baselines users write with transformers + peft.

    python scripts/bench/bench_lora.py [--num-requests 64] [--max-tokens 64] [--dtype float32]
        [--adapters 8,32,128] [--targets q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]
        [--rounds 3] [--skip-peft]

Greedy, ignore EOS, one LLMEngine in this process. Workloads alternate round by round (the machine is
noisy) and the median of each is reported, with its ratio to base-only. The peft baselines: (a) one
request at a time after `set_adapter` (measured on a subset, reported as tok/s), (b) one batch with
`adapter_names=` (peft's mixed-batch inference). Also reports the time to load a rank-16 adapter into
the pool, from the host tier and from disk.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from bench_engine import make_prompts, run_hf

ALL_LINEAR = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def run_engine(engine, prompts, adapters, max_tokens: int) -> float:
    """tok/s for one pass; request i uses adapters[i % len(adapters)] (None = base model)."""
    from loraplex.engine.core.sampling_params import SamplingParams
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(f"b{time.monotonic_ns()}-{i}", p, params, adapter=adapters[i % len(adapters)])
    generated = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            generated += len(out.token_ids)
    return generated / (time.perf_counter() - t0)


def run_rounds(engine, prompts, workloads: dict[str, list], rounds: int, max_tokens: int) -> dict[str, list[float]]:
    """Each workload (name -> adapters its requests cycle through) once to warm up (oneDNN primitives, pool loads),
    then `rounds` rounds of all of them in turn (the machine is noisy): name -> tok/s per round."""
    for adapters in workloads.values():
        run_engine(engine, prompts, adapters, 4)
    results: dict[str, list[float]] = {name: [] for name in workloads}
    for r in range(rounds):
        for name, adapters in workloads.items():
            results[name].append(run_engine(engine, prompts, adapters, max_tokens))
        print(f"round {r + 1}: " + ", ".join(f"{n} {v[-1]:.1f}" for n, v in results.items()), flush=True)
    return results


def peft_baselines(model_dir, folders, counts, prompts, tokenizer, max_tokens, dtype, subset: int) -> dict:
    """{(baseline, number of adapters): tok/s} for the two ways users serve several adapters with peft."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    model = PeftModel.from_pretrained(base, str(folders[0]), adapter_name="a0")
    for i, f in enumerate(folders[1:max(counts)], 1):
        model.load_adapter(str(f), adapter_name=f"a{i}")
    results = {}
    # (a) one request at a time, switching adapters (the count hardly matters: measured once)
    names = [f"a{i % max(counts)}" for i in range(len(prompts))]
    t0, generated = time.perf_counter(), 0
    for p, name in list(zip(prompts, names))[:subset]:
        model.set_adapter(name)
        _, n = run_hf(model, tokenizer, [p], max_tokens, 1)
        generated += n
    results["one-at-a-time (set_adapter)", None] = generated / (time.perf_counter() - t0)
    # (b) all requests in one batch, each row naming its adapter
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    for count in counts:
        names = [f"a{i % count}" for i in range(len(prompts))]
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens,
                                 min_new_tokens=max_tokens, do_sample=False, pad_token_id=pad, adapter_names=names)
        results["batched (adapter_names=)", count] = (out.shape[1] - width) * len(prompts) / (time.perf_counter() - t0)
    return results


def load_latency(engine, folder: Path, repeats: int = 10) -> tuple[float, float]:
    """Median ms to load a rank-16 adapter into pool pages: from the host tier, and from disk."""
    hook = engine.adapter_hook
    hook.register_adapter("load-test", 999_999, 1, str(folder))
    key = (999_999, 1)
    from_host, from_disk = [], []
    for i in range(repeats):
        for source, times in (("host", from_host), ("disk", from_disk)):
            if source == "disk":
                hook.host.pop(key, None)
            pages = hook.pool.allocator.allocate(16)
            t0 = time.perf_counter()
            hook._load_into(key, pages)
            times.append(1000 * (time.perf_counter() - t0))
            hook.pool.allocator.free(pages)
    hook.unregister_adapter(999_999)
    return statistics.median(from_host), statistics.median(from_disk)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--quantization", default="none", choices=["none", "nf4", "int8", "gptq"])
    ap.add_argument("--adapters", default="8,32,128", help="numbers of distinct adapters to spread over")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--targets", default=ALL_LINEAR, help="comma-separated target modules of the adapters")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-prefix-caching", action="store_true",
                    help="base-only requests share the chat template's cached prefix, adapter requests cannot "
                         "(the cache is salted per adapter); this isolates the LoRA compute cost")
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument("--peft-subset", type=int, default=4, help="requests for the one-at-a-time peft baseline")
    ap.add_argument("--peft-max-adapters", type=int, default=32, help="largest count the peft baselines load")
    args = ap.parse_args()

    from loraplex.adapters.runtime import create_lora_runtime
    from loraplex.adapters.synthetic import write_random_peft
    from loraplex.engine.engine_args import EngineArgs
    from loraplex.engine.llm_engine import LLMEngine

    counts = [int(c) for c in args.adapters.split(",") if c]
    max_adapters = max(counts)
    engine = LLMEngine.from_engine_args(
        EngineArgs(model=args.model, dtype=args.dtype, device=args.device, max_num_seqs=max(64, args.num_requests),
                   enable_prefix_caching=not args.no_prefix_caching, quantization=args.quantization,
                   enable_lora=True, max_loras=min(max_adapters, args.num_requests), max_lora_rank=max(16, args.rank),
                   lora_pool_pages=max_adapters * args.rank + 17, max_cpu_loras=max_adapters + 1),
        hook_factory=create_lora_runtime)
    model_dir = args.model
    if model_dir is None:
        from loraplex.engine.default_model import ensure_default_model
        model_dir = str(ensure_default_model())
    targets = tuple(args.targets.split(","))
    tmp = Path(tempfile.mkdtemp(prefix="bench-lora-"))
    folders = [write_random_peft(tmp / f"a{i}", engine.model_config, r=args.rank, target_modules=targets, seed=i,
                                 std=0.02) for i in range(max_adapters)]
    for i, f in enumerate(folders):
        engine.adapter_hook.register_adapter(f"a{i}", i + 1, 1, str(f))
    prompts = make_prompts(engine.tokenizer, args.num_requests)
    print(f"device={engine.runner.device} dtype={args.dtype} requests={len(prompts)} max_tokens={args.max_tokens} "
          f"rank={args.rank} targets={','.join(targets)} threads={torch.get_num_threads()} "
          f"prefix_caching={not args.no_prefix_caching} quantization={args.quantization} "
          f"weights={engine.memory_bytes['weights'] / 2**20:.0f}MiB")

    workloads = {"base only": [None]} | {f"{c} adapters": [(i + 1, 1) for i in range(c)] for c in counts}
    results = run_rounds(engine, prompts, workloads, args.rounds, args.max_tokens)
    base = statistics.median(results["base only"])
    for name, values in results.items():
        tps = statistics.median(values)
        print(f"{name:>14}: {tps:7.1f} tok/s  ({tps / base:.2f}x base-only)")

    rank16 = write_random_peft(tmp / "r16", engine.model_config, r=16, target_modules=targets, seed=7)
    host_ms, disk_ms = load_latency(engine, rank16)
    print(f"adapter load, rank 16 ({len(targets)} modules x {engine.model_config.num_hidden_layers} layers): "
          f"{host_ms:.1f} ms from the host tier, {disk_ms:.1f} ms from disk")

    if not args.skip_peft:
        peft_counts = [c for c in counts if c <= args.peft_max_adapters]
        peft = peft_baselines(model_dir, folders, peft_counts, prompts, engine.tokenizer, args.max_tokens,
                              getattr(torch, args.dtype), args.peft_subset)
        for (name, count), tps in peft.items():
            for c in ([count] if count else peft_counts):
                ours = statistics.median(results[f"{c} adapters"])
                print(f"peft {name:>28} {c:3d} adapters: {tps:7.1f} tok/s; loraplex {ours:.1f} tok/s = "
                      f"{ours / tps:.1f}x")


if __name__ == "__main__":
    main()
