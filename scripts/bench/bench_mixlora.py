"""MixLoRA serving and training cost against plain LoRA, same run, same engine.

    python scripts/bench/bench_mixlora.py [--num-requests 64] [--max-tokens 64] [--rounds 3] [--dtype float32]
        [--skip-training]

Serving: 64 concurrent greedy requests spread over 8 MixLoRA adapters (8 experts, top-2, rank 8 on every linear:
2 experts x rank 8 active on the FFN), over 8 LoRA adapters of rank 16 on every linear (about the same active
LoRA compute), and on the base model; workloads alternate round by round (the machine is noisy) and the median
of each is printed with its ratio to LoRA and to base-only. Training: the time of one batched step of a MixLoRA
job, of a LoRA job, and of both in one step, on the same sequences.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from bench_engine import make_prompts
from bench_lora import ALL_LINEAR, run_rounds


def serving(args) -> None:
    from loraplex.adapters.runtime import create_lora_runtime
    from loraplex.adapters.synthetic import write_random_mixlora, write_random_peft
    from loraplex.engine.engine_args import EngineArgs
    from loraplex.engine.llm_engine import LLMEngine

    n = args.adapters
    pages = n * (8 * 8) + n * 16 + 17
    engine = LLMEngine.from_engine_args(
        EngineArgs(model=args.model, dtype=args.dtype, max_num_seqs=max(64, args.num_requests),
                   enable_prefix_caching=False, enable_lora=True, max_loras=2 * n, max_lora_rank=16,
                   lora_pool_pages=pages, max_cpu_loras=2 * n + 1, max_mixlora_adapters=n, max_mixlora_experts=8),
        hook_factory=create_lora_runtime)
    targets = tuple(ALL_LINEAR.split(","))
    tmp = Path(tempfile.mkdtemp(prefix="bench-mixlora-"))
    hook = engine.adapter_hook
    for i in range(n):
        hook.register_adapter(f"lora{i}", i + 1, 1, str(write_random_peft(
            tmp / f"l{i}", engine.model_config, r=16, target_modules=targets, seed=i, std=0.02)))
        hook.register_adapter(f"mix{i}", 100 + i, 1, str(write_random_mixlora(
            tmp / f"m{i}", engine.model_config, r=8, alpha=16, num_experts=8, top_k=2, target_modules=targets,
            seed=100 + i, std=0.02)))
    prompts = make_prompts(engine.tokenizer, args.num_requests)
    print(f"serving: device={engine.runner.device} dtype={args.dtype} requests={len(prompts)} "
          f"max_tokens={args.max_tokens} threads={torch.get_num_threads()} adapters={n} of each kind")
    workloads = {"base only": [None], f"{n} LoRA r16": [(i + 1, 1) for i in range(n)],
                 f"{n} MixLoRA 8x top-2 r8": [(100 + i, 1) for i in range(n)]}
    results = run_rounds(engine, prompts, workloads, args.rounds, args.max_tokens)
    base = statistics.median(results["base only"])
    lora = statistics.median(results[f"{n} LoRA r16"])
    for name, values in results.items():
        tps = statistics.median(values)
        print(f"{name:>24}: {tps:7.1f} tok/s  ({tps / base:.2f}x base-only, {tps / lora:.2f}x LoRA r16)")


def training(args) -> None:
    from loraplex.engine.loader import load_model
    from loraplex.trainer.data import PackedSequence
    from loraplex.trainer.job import Hyperparams, TrainingJob
    from loraplex.trainer.lora_layers import LoRASpec, MixLoRASpec
    from loraplex.trainer.multi_job import MultiJobTrainer

    model_dir = args.model
    if model_dir is None:
        from loraplex.engine.default_model import ensure_default_model
        model_dir = str(ensure_default_model())
    dtype = getattr(torch, args.dtype)
    model, config = load_model(model_dir, dtype)
    gen = torch.Generator().manual_seed(0)
    seqs = []
    for _ in range(args.train_sequences):
        ids = torch.randint(100, config.vocab_size, (args.train_tokens,), generator=gen).tolist()
        seqs.append(PackedSequence(input_ids=ids, labels=[-100] * 16 + ids[16:], seq_lens=[len(ids)]))
    targets = tuple(ALL_LINEAR.split(","))
    specs = {"LoRA r16": LoRASpec(r=16, alpha=32, target_modules=targets),
             "MixLoRA 8x top-2 r8": MixLoRASpec(r=8, alpha=16, num_experts=8, top_k=2, target_modules=targets)}
    hp = Hyperparams(n_epochs=1000, batch_size=len(seqs), micro_batch_size=len(seqs))
    print(f"training: {len(seqs)} sequences x {args.train_tokens} tokens per step, dtype={args.dtype}")
    times: dict[str, list[float]] = {}
    cases = {name: [name] for name in specs} | {"both in one step": list(specs)}
    trainer = MultiJobTrainer(model, config, dtype, torch.device("cpu"), max_jobs=2)
    for r in range(args.rounds + 1):
        for case, names in cases.items():
            jobs = [TrainingJob(f"{name}-{r}", specs[name], hp, seqs, config) for name in names]
            for job in jobs:
                trainer.add_job(job)
            t0 = time.perf_counter()
            trainer.step()
            if r:  # round 0 warms up
                times.setdefault(case, []).append(time.perf_counter() - t0)
            for job in jobs:
                trainer.remove_job(job.job_id)
    lora = statistics.median(times["LoRA r16"])
    for case, values in times.items():
        t = statistics.median(values)
        print(f"{case:>24}: {t:6.2f} s/step ({t / lora:.2f}x LoRA r16)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--train-sequences", type=int, default=8)
    ap.add_argument("--train-tokens", type=int, default=128)
    ap.add_argument("--skip-serving", action="store_true")
    ap.add_argument("--skip-training", action="store_true")
    args = ap.parse_args()
    if not args.skip_serving:
        serving(args)
    if not args.skip_training:
        training(args)


if __name__ == "__main__":
    main()
