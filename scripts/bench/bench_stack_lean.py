"""The whole-stack call's lean path for decode batches against the same stack operator by operator (issue 23), in one
process on one engine, alternating: the paired ratio is what a noisy machine can still measure.

    python scripts/bench/bench_stack_lean.py [--model FOLDER] [--dtype float32] [--batch 1 4] [--rounds 12]
        [--steps 48] [--adapter]

Each round times --steps decode steps with the lean path on and off (the order alternates between rounds) on an
engine with the server's adapter and training wrappers installed (idle, as `loraplex serve` runs); printed: the
median step of each and the median of the per-round ratios per-operator / lean (> 1: the lean path is faster).
--adapter: every request carries a random rank-8 q/v LoRA adapter (its rows applied in the stack).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from profile_decode import decode_steps, finish, make_prompts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a model folder (a GPTQ one streams its codes); default model")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--batch", nargs="+", type=int, default=[1, 4])
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--steps", type=int, default=48)
    p.add_argument("--adapter", action="store_true", help="every request with a random rank-8 q/v adapter")
    args = p.parse_args()

    from loraplex.adapters.runtime import create_lora_runtime
    from loraplex.adapters.synthetic import write_random_peft
    from loraplex.engine.default_model import ensure_default_model
    from loraplex.engine.engine_args import EngineArgs
    from loraplex.engine.layers import fused_layer
    from loraplex.engine.llm_engine import LLMEngine, _read_model_config
    from loraplex.trainer.service import create_training_runtime

    model = args.model or str(ensure_default_model())
    work = tempfile.TemporaryDirectory(prefix="loraplex-lean-")
    for batch in args.batch:
        engine = LLMEngine.from_engine_args(EngineArgs(model=model, dtype=args.dtype, max_num_seqs=batch,
                                                       enable_prefix_caching=False, cpu_linear="stream",
                                                       enable_lora=args.adapter, max_lora_rank=8, num_scheduler_steps=1),
                                            create_lora_runtime, create_training_runtime)
        adapter = None
        if args.adapter:
            folder = write_random_peft(Path(work.name) / "a", _read_model_config(model), r=8, seed=0, std=0.02)
            engine.adapter_hook.register_adapter("a", 1, 1, str(folder))
            adapter = (1, 1)
        prompts = make_prompts(engine.tokenizer, batch)
        decode_steps(engine, batch, prompts, 8, adapter)
        finish(engine)
        steps: dict[bool, list[float]] = {True: [], False: []}
        for r in range(args.rounds):
            for lean in (True, False) if r % 2 == 0 else (False, True):
                fused_layer.set_enabled(True, lean=lean)
                times = decode_steps(engine, batch, prompts, args.steps, adapter)
                finish(engine)
                steps[lean].append(statistics.median(times) * 1e3)
        fused_layer.set_enabled(True)
        ratios = sorted(off / on for on, off in zip(steps[True], steps[False]))
        print(f"{Path(model).name} {args.dtype}{' + adapter' if adapter else ''} batch {batch}: lean {statistics.median(steps[True]):.2f} ms a step, "
              f"per operator {statistics.median(steps[False]):.2f} ms; per-operator / lean, paired: "
              f"{statistics.median(ratios):.3f} (middle half {ratios[len(ratios) // 4]:.3f}.."
              f"{ratios[(3 * len(ratios)) // 4]:.3f})", flush=True)
        del engine


if __name__ == "__main__":
    main()
