"""What each adapter kind and composition costs to serve, same run, same engine (README "Adapter strength,
combinations, DoRA and own heads").

    python scripts/bench/bench_adapter_kinds.py [--num-requests 64] [--max-tokens 64] [--rounds 3] [--dtype float32]

64 concurrent greedy requests per workload, workloads alternating round by round (the machine is noisy), the median
of each printed with its ratio to its baseline:
- per-request lora_scale: 8 LoRA r16 adapters, every request at its own scale, vs every request at one scale (0.5),
  vs the adapters at full strength;
- linear combinations: 8 two-adapter combinations (0.5·a + 0.5·b, rank 16 + 16 read per row) vs the 8 adapters alone;
- DoRA: 8 DoRA r16 adapters vs the 8 LoRA r16 ones;
- own head and embedding (modules_to_save lm_head + embed_tokens, with LoRA r16): 2 such adapters vs 2 LoRA r16.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
from bench_engine import make_prompts
from bench_lora import ALL_LINEAR, run_rounds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()

    from safetensors.torch import load_file, save_file

    from loraplex.adapters.composition import Composition
    from loraplex.adapters.runtime import create_lora_runtime
    from loraplex.adapters.synthetic import write_random_peft
    from loraplex.engine.default_model import ensure_default_model
    from loraplex.engine.engine_args import EngineArgs
    from loraplex.engine.llm_engine import LLMEngine

    model = args.model or str(ensure_default_model())
    n = 8
    engine = LLMEngine.from_engine_args(
        EngineArgs(model=model, dtype=args.dtype, max_num_seqs=max(64, args.num_requests), enable_prefix_caching=False,
                   enable_lora=True, max_loras=4 * n, max_lora_rank=16, lora_pool_pages=(2 * n + 2) * 17 + 1,
                   max_cpu_loras=2 * n + 4, max_full_module_adapters=2),
        hook_factory=create_lora_runtime)
    config, hook = engine.model_config, engine.adapter_hook
    targets = tuple(ALL_LINEAR.split(","))
    tmp = Path(tempfile.mkdtemp(prefix="bench-kinds-"))
    for i in range(n):
        hook.register_adapter(f"lora{i}", i + 1, 1, str(write_random_peft(
            tmp / f"l{i}", config, r=16, target_modules=targets, seed=i, std=0.02)))
        hook.register_adapter(f"dora{i}", 100 + i, 1, str(write_random_peft(
            tmp / f"d{i}", config, r=16, target_modules=targets, seed=100 + i, std=0.02, use_dora=True)))
    base = load_file(str(Path(model) / "model.safetensors"))
    embed = base["model.embed_tokens.weight"].float()
    head = base.get("lm_head.weight", base["model.embed_tokens.weight"]).float()
    gen = torch.Generator().manual_seed(0)
    for i in range(2):
        folder = write_random_peft(tmp / f"h{i}", config, r=16, target_modules=targets, seed=200 + i, std=0.02,
                                   extra_config={"modules_to_save": ["lm_head", "embed_tokens"]})
        state = load_file(str(folder / "adapter_model.safetensors"))
        state["base_model.model.lm_head.weight"] = head + 0.01 * torch.randn(head.shape, generator=gen)
        state["base_model.model.model.embed_tokens.weight"] = embed + 0.01 * torch.randn(embed.shape, generator=gen)
        save_file(state, str(folder / "adapter_model.safetensors"))
        hook.register_adapter(f"head{i}", 200 + i, 1, str(folder))

    prompts = make_prompts(engine.tokenizer, args.num_requests)
    loras = [(i + 1, 1) for i in range(n)]

    def scaled(key, scale):
        return (*key, Composition(((*key, 1.0),), scale=scale))
    workloads = {
        "base only": [None],
        "8 LoRA r16": loras,
        "8 LoRA r16, one scale": [scaled(k, 0.5) for k in loras],
        "8 LoRA r16, mixed scales": [scaled(loras[i % n], 0.25 + 1.5 * i / len(prompts)) for i in range(len(prompts))],
        "8 linear pairs r16+r16": [(*loras[i], Composition(((*loras[i], 0.5), (*loras[(i + 1) % n], 0.5))))
                                   for i in range(n)],
        "8 DoRA r16": [(100 + i, 1) for i in range(n)],
        "2 LoRA r16": loras[:2],
        "2 own head+embed + r16": [(200, 1), (201, 1)],
    }
    print(f"adapter kinds: device={engine.runner.device} dtype={args.dtype} requests={len(prompts)} "
          f"max_tokens={args.max_tokens} threads={torch.get_num_threads()}")
    results = run_rounds(engine, prompts, workloads, args.rounds, args.max_tokens)
    tps = {name: statistics.median(values) for name, values in results.items()}
    ratios = [("mixed per-request scales vs one scale", "8 LoRA r16, mixed scales", "8 LoRA r16, one scale"),
              ("one scale vs full strength", "8 LoRA r16, one scale", "8 LoRA r16"),
              ("2-adapter linear combinations vs single adapters", "8 linear pairs r16+r16", "8 LoRA r16"),
              ("DoRA vs LoRA of the same rank", "8 DoRA r16", "8 LoRA r16"),
              ("own head+embedding vs LoRA", "2 own head+embed + r16", "2 LoRA r16")]
    for name, value in tps.items():
        print(f"{name:>28}: {value:7.1f} tok/s  ({value / tps['base only']:.2f}x base-only)")
    for what, a, b in ratios:
        print(f"{what}: {tps[a] / tps[b]:.2f}x")


if __name__ == "__main__":
    main()
