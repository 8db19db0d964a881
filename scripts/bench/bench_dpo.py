"""DPO step time against an SFT step on the same rows (issue 16's performance section).

    python scripts/bench/bench_dpo.py [--model DIR] [--dtype auto] [--pairs 8] [--steps 6] [--rounds 3]

Preference pairs: the general questions of loraplex.bench.fine_tune_quality with a short preferred and a
plainer rejected answer. The SFT job trains on the same sequences (each pair's chosen and rejected as two
SFT examples), so the adapter rows are the same; DPO adds the reference rows (the same two sequences with no
adapter) and the pair-wise loss. Both run alone through MultiJobTrainer (the server's trainer), all-linear
rank-16 LoRA, micro-batch = the whole batch. Prints the median step time of each and their ratio; the rounds
alternate SFT and DPO (the machine is noisy).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from loraplex.bench.fine_tune_quality import GENERAL_QUESTIONS

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()

    from loraplex.engine.core.config import ModelConfig  # noqa: F401 - the engine's import order
    from loraplex.engine.default_model import ensure_default_model
    from loraplex.engine.llm_engine import load_tokenizer, resolve_dtype
    from loraplex.engine.loader import load_model
    from loraplex.trainer.data import Example, preference_sequences
    from loraplex.trainer.job import Hyperparams, TrainingJob
    from loraplex.trainer.lora_layers import LoRASpec
    from loraplex.trainer.multi_job import MultiJobTrainer
    from loraplex.trainer.objectives import DPO, PreferencePair

    model_dir = args.model or str(ensure_default_model())
    from loraplex.engine.llm_engine import _read_model_config
    dtype = resolve_dtype(args.dtype, _read_model_config(model_dir), torch.device("cpu"))
    model, config = load_model(model_dir, dtype=dtype)
    tokenizer = load_tokenizer(model_dir)
    pairs = []
    for i in range(args.pairs):
        question, keywords = GENERAL_QUESTIONS[i % len(GENERAL_QUESTIONS)]
        example = Example(kind="preference", messages=({"role": "user", "content": question},),
                          preferred=({"role": "assistant", "content": f"Certainly! The answer is {keywords[0]}."},),
                          non_preferred=({"role": "assistant", "content": f"{keywords[0]}"},))
        pairs.append(PreferencePair(*preference_sequences(example, tokenizer)))
    sft_rows = [s for pair in pairs for s in (pair.chosen, pair.rejected)]
    trainer = MultiJobTrainer(model, config, dtype, torch.device("cpu"), max_jobs=1)
    spec = LoRASpec(r=16, alpha=32, target_modules=ALL_LINEAR)
    tokens = sum(len(s.input_ids) for s in sft_rows)
    print(f"{args.pairs} pairs, {tokens} tokens in the adapter rows per step ({dtype}, {torch.get_num_threads()} "
          "threads)")

    def timed(kind: str) -> float:
        if kind == "dpo":
            job = TrainingJob("dpo", spec, Hyperparams(n_epochs=1000, batch_size=len(pairs),
                                                       micro_batch_size=len(pairs)), pairs, config, objective=DPO())
        else:
            job = TrainingJob("sft", spec, Hyperparams(n_epochs=1000, batch_size=len(sft_rows),
                                                       micro_batch_size=len(sft_rows)), sft_rows, config)
        trainer.add_job(job)
        trainer.step()  # warm-up
        t0 = time.perf_counter()
        for _ in range(args.steps):
            trainer.step()
        trainer.remove_job(job.job_id)
        return (time.perf_counter() - t0) / args.steps

    times = {"sft": [], "dpo": []}
    for _ in range(args.rounds):
        for kind in ("sft", "dpo"):
            times[kind].append(timed(kind))
    sft, dpo = statistics.median(times["sft"]), statistics.median(times["dpo"])
    print(f"SFT step {sft * 1000:.0f} ms, DPO step {dpo * 1000:.0f} ms (medians of {args.rounds} rounds x "
          f"{args.steps} steps): DPO / SFT = {dpo / sft:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
