"""The sweep behind the fine-tuning defaults (issue 16, point 1): which LoRA and training choices make a job
created with no hyperparameters learn small fact sets without the base model forgetting what it knew.

    python scripts/bench/sweep_fine_tune_defaults.py [--model DIR] [--dtype auto] [--configs a,b,...]
        [--datasets 10,30,50,200,own30] [--seeds 0] [--out results.json] [--show-failures]

Datasets (loraplex.bench.fine_tune_quality): made-up facts in TRAIN_TEMPLATES phrasings; "10" = one fact x
10 phrasings, "30" = one fact x 10 x 3 (the issue's case), "50" = five facts x 10, "200" = ten facts x 10 x 2.
Each config trains on each dataset through the trainer the server uses (MultiJobTrainer, every config of a
dataset batched into the same steps), the adapters are served by an LLMEngine with LoRA on, and the judge of
fine_tune_quality scores held-out phrasings (learned) and GENERAL_QUESTIONS (kept, leaks) from greedy answers.
Prints one row per (config, dataset) and a summary per config; wall time is the batched training time of the
whole group (the configs share the steps), reported for orientation only.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from loraplex.bench.fine_tune_quality import (
    FACTS,
    GENERAL_MAX_TOKENS,
    GENERAL_QUESTIONS,
    fact_examples,
    held_out_questions,
    judge,
    to_jsonl,
)

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]

# name -> job settings as a client would send them: lora fields and extras, and hyperparameters (absent or
# "auto": resolved by loraplex.trainer.defaults exactly as the server does)
CONFIGS: dict[str, dict] = {
    "old-default": {"lora": {"r": 8, "alpha": 16, "target_modules": ATTENTION},
                    "hyperparameters": {"n_epochs": 3, "batch_size": 4, "learning_rate_multiplier": 1.0}},
    "old-6ep": {"lora": {"r": 8, "alpha": 16, "target_modules": ATTENTION},
                "hyperparameters": {"n_epochs": 6, "batch_size": 4, "learning_rate_multiplier": 1.0}},
    "old-6ep-lr5": {"lora": {"r": 8, "alpha": 16, "target_modules": ATTENTION},
                    "hyperparameters": {"n_epochs": 6, "batch_size": 4, "learning_rate_multiplier": 5.0}},
    "auto": {"lora": {}, "hyperparameters": {}},
    "all-r16-sd.5": {"lora": {"r": 16, "alpha": 32, "target_modules": ALL_LINEAR, "self_distillation": 0.5},
                     "hyperparameters": {}},
    "all-r16-sd1": {"lora": {"r": 16, "alpha": 32, "target_modules": ALL_LINEAR, "self_distillation": 1.0},
                    "hyperparameters": {}},
    "all-r16-lr2-sd1": {"lora": {"r": 16, "alpha": 32, "target_modules": ALL_LINEAR, "self_distillation": 1.0},
                        "hyperparameters": {"learning_rate_multiplier": 2.0}},
    "attn-r16-lr2-sd1": {"lora": {"r": 16, "alpha": 32, "target_modules": ATTENTION, "self_distillation": 1.0},
                         "hyperparameters": {"learning_rate_multiplier": 2.0}},
    "all-r16-sd2": {"lora": {"r": 16, "alpha": 32, "target_modules": ALL_LINEAR, "self_distillation": 2.0},
                    "hyperparameters": {}},
    "all-r16-sd4": {"lora": {"r": 16, "alpha": 32, "target_modules": ALL_LINEAR, "self_distillation": 4.0},
                    "hyperparameters": {}},
    "all-r8-sd2": {"lora": {"r": 8, "alpha": 16, "target_modules": ALL_LINEAR, "self_distillation": 2.0},
                   "hyperparameters": {}},
    "all-r16-sd2-do": {"lora": {"r": 16, "alpha": 32, "target_modules": ALL_LINEAR, "self_distillation": 2.0,
                                "dropout": 0.1}, "hyperparameters": {}},
    "all-r16-sd2-lr2": {"lora": {"r": 16, "alpha": 32, "target_modules": ALL_LINEAR, "self_distillation": 2.0},
                        "hyperparameters": {"learning_rate_multiplier": 2.0}},
    "attn-r16-lr2-sd2": {"lora": {"r": 16, "alpha": 32, "target_modules": ATTENTION, "self_distillation": 2.0},
                         "hyperparameters": {"learning_rate_multiplier": 2.0}},
    "all-r8-sd2-do-lr2": {"lora": {"r": 8, "alpha": 16, "target_modules": ALL_LINEAR, "self_distillation": 2.0,
                                   "dropout": 0.1}, "hyperparameters": {"learning_rate_multiplier": 2.0}},
    "all-r16-sd2-lr2-rand": {"lora": {"r": 16, "alpha": 32, "target_modules": ALL_LINEAR, "self_distillation": 2.0,
                                      "self_distillation_near": False},
                             "hyperparameters": {"learning_rate_multiplier": 2.0}},
    "attn-r16-sd2-lr2": {"lora": {"r": 16, "alpha": 32, "target_modules": ATTENTION, "self_distillation": 2.0},
                         "hyperparameters": {"learning_rate_multiplier": 2.0}},
    "all-r16-sd4-lr2": {"lora": {"r": 16, "alpha": 32, "target_modules": ALL_LINEAR, "self_distillation": 4.0},
                        "hyperparameters": {"learning_rate_multiplier": 2.0}},
    "all-r16-sd2-lr3": {"lora": {"r": 16, "alpha": 32, "target_modules": ALL_LINEAR, "self_distillation": 2.0},
                        "hyperparameters": {"learning_rate_multiplier": 3.0}},
    "all-r16-sd2-lr2-6ep": {"lora": {"r": 16, "alpha": 32, "target_modules": ALL_LINEAR, "self_distillation": 2.0},
                            "hyperparameters": {"learning_rate_multiplier": 2.0, "n_epochs": 6}},
    "all-r16-sd2-8ep": {"lora": {"r": 16, "alpha": 32, "target_modules": ALL_LINEAR, "self_distillation": 2.0},
                        "hyperparameters": {"n_epochs": 8}},
    "attn-r16-sd2-lr2-6ep": {"lora": {"r": 16, "alpha": 32, "target_modules": ATTENTION, "self_distillation": 2.0},
                             "hyperparameters": {"learning_rate_multiplier": 2.0, "n_epochs": 6}},
    "all-r16-sd2-lr3-4ep": {"lora": {"r": 16, "alpha": 32, "target_modules": ALL_LINEAR, "self_distillation": 2.0},
                            "hyperparameters": {"learning_rate_multiplier": 3.0, "n_epochs": 4}},
    "all-r8-sd1": {"lora": {"r": 8, "alpha": 16, "target_modules": ALL_LINEAR, "self_distillation": 1.0},
                   "hyperparameters": {}},
    "all-r16": {"lora": {"r": 16, "alpha": 32, "target_modules": ALL_LINEAR}, "hyperparameters": {}},
    "all-r16-lr2": {"lora": {"r": 16, "alpha": 32, "target_modules": ALL_LINEAR},
                    "hyperparameters": {"learning_rate_multiplier": 2.0}},
    "all-r16-lr.5": {"lora": {"r": 16, "alpha": 32, "target_modules": ALL_LINEAR},
                     "hyperparameters": {"learning_rate_multiplier": 0.5}},
    "attn-r16-lr2": {"lora": {"r": 16, "alpha": 32, "target_modules": ATTENTION},
                     "hyperparameters": {"learning_rate_multiplier": 2.0}},
    # self-distillation on the base answers' tokens (the earlier rows) against their whole distributions
    "auto-sd-tokens": {"lora": {"self_distillation_kl": False}, "hyperparameters": {}},
    "auto-sd4": {"lora": {"self_distillation": 4.0}, "hyperparameters": {}},
}


def dataset(size: int | str, base_pool: list[dict]) -> tuple[list, list[dict]]:
    """-> (facts taught, chat examples). "own30" is the control: no fact at all, 30 of the base model's own
    answers to the self-distillation prompts (none of them a general question of the judge), so whatever a job
    changes in the general answers is what training as such does to them (the floor of `kept`)."""
    if size == "own30":
        return [], [dict(e) for e in base_pool[:30]]
    plans = {10: (1, 1), 30: (1, 3), 50: (5, 1), 100: (5, 2), 200: (10, 2)}
    if size not in plans:
        raise SystemExit(f"--datasets: sizes are {sorted(plans)} and own30")
    num_facts, repeats = plans[size]
    facts = FACTS[:num_facts] if size != 30 else FACTS[1:2]  # 10 and 30 teach different single facts
    return list(facts), fact_examples(facts, repeats)


def generate(engine, prompts: list[tuple[str, tuple | None]], max_tokens: int, truncated: list | None = None) -> list[str]:
    """Greedy chat answers; `truncated` (a list) gets whether each one hit max_tokens."""
    from loraplex.engine.core.sampling_params import SamplingParams
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    tok = engine.tokenizer
    texts, reasons = {}, {}
    for i, (question, adapter) in enumerate(prompts):
        ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                      tokenize=True)
        ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        engine.add_request(str(i), ids, params, adapter=adapter)
        texts[str(i)] = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            texts[out.request_id].extend(out.token_ids)
            if out.finished:
                reasons[out.request_id] = out.finish_reason
    if truncated is not None:
        truncated[:] = [reasons.get(str(i)) == "length" for i in range(len(prompts))]
    return [tok.decode(texts[str(i)], skip_special_tokens=True).strip() for i in range(len(prompts))]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--datasets", default="10,30,50,200")
    p.add_argument("--seeds", default="0")
    p.add_argument("--out", default=None)
    p.add_argument("--show-failures", action="store_true")
    args = p.parse_args()

    from loraplex.adapters.runtime import create_lora_runtime
    from loraplex.engine.default_model import ensure_default_model
    from loraplex.engine.engine_args import EngineArgs
    from loraplex.engine.llm_engine import LLMEngine
    from loraplex.engine.loader import load_model
    from loraplex.trainer.checkpoint import write_adapter
    from loraplex.trainer.defaults import build_job
    from loraplex.trainer.multi_job import MultiJobTrainer

    model_dir = args.model or str(ensure_default_model())
    engine = LLMEngine.from_engine_args(EngineArgs(model=model_dir, dtype=args.dtype, enable_lora=True,
                                                   max_lora_rank=64, max_loras=16, max_num_seqs=128),
                                        hook_factory=create_lora_runtime)
    dtype = engine.runner.dtype
    model, model_config = load_model(model_dir, dtype=dtype)
    trainer = MultiJobTrainer(model, model_config, dtype, torch.device("cpu"), max_jobs=16)
    questions = [q for q, _ in GENERAL_QUESTIONS]
    base_general = generate(engine, [(q, None) for q in questions], GENERAL_MAX_TOKENS)
    from loraplex.trainer import regularization as reg
    cut: list[bool] = []
    reg_answers = generate(engine, [(q, None) for q in reg.REGULARIZATION_PROMPTS], reg.DEFAULT_MAX_TOKENS, cut)
    base_pool = reg.as_examples(reg.REGULARIZATION_PROMPTS,
                                [reg.complete_sentences(a, c) for a, c in zip(reg_answers, cut)])
    print(f"self-distillation pool: {len(base_pool)} base answers ({sum(cut)} cut at their last full sentence)")
    print("base answers:")
    for q, a in zip(questions, base_general):
        print(f"  {q} -> {a!r}")
    sys.stdout.flush()

    names = args.configs.split(",")
    rows = []
    next_id = 1
    with tempfile.TemporaryDirectory() as tmp:
        for size in (int(d) if d.isdigit() else d for d in args.datasets.split(",")):
            facts, examples = dataset(size, base_pool)
            data = to_jsonl(examples)
            for seed in map(int, args.seeds.split(",")):
                jobs = {}
                for name in names:
                    cfg = CONFIGS[name]
                    built = build_job(f"{name}-{size}-{seed}", data, None, engine.tokenizer, model_config,
                                      lora=cfg["lora"], hyperparameters=cfg["hyperparameters"], seed=seed,
                                      base_answers=base_pool, teacher=trainer.with_base_distributions)
                    jobs[name] = built
                    trainer.add_job(built.job)
                t0 = time.perf_counter()
                num_steps = 0
                while trainer.has_work:
                    num_steps += 1
                    if num_steps % 20 == 0:
                        left = {b.job.job_id: b.job.total_steps - b.job.step for b in jobs.values()}
                        print(f"  ... {num_steps} batched steps, {time.perf_counter() - t0:.0f}s, steps left: {left}",
                              flush=True)
                    for report in trainer.step():
                        built = next(b for b in jobs.values() if b.job.job_id == report.job_id)
                        if report.optimizer_step and built.valid and (report.step % built.eval_every == 0
                                                                       or report.finished):
                            loss = trainer.evaluate([(built.job, built.valid)])[0]["loss"]
                            if built.early.update(loss, built.job):
                                built.job.step = built.job.total_steps
                wall = time.perf_counter() - t0
                held = held_out_questions(facts)
                prompts, keys = [], {}
                for name, built in jobs.items():
                    trainer.remove_job(built.job.job_id)
                    folder = Path(tmp) / built.job.job_id
                    write_adapter(folder, built.job, model_dir, built.early.best_weights)
                    engine.adapter_hook.register_adapter(built.job.job_id, next_id, 1, str(folder))
                    keys[name] = (next_id, 1)
                    next_id += 1
                    prompts += [(q, keys[name]) for q, _ in held] + [(q, keys[name]) for q in questions]
                answers = generate(engine, prompts, GENERAL_MAX_TOKENS)
                for k, (name, built) in enumerate(jobs.items()):
                    part = answers[k * (len(held) + len(questions)):(k + 1) * (len(held) + len(questions))]
                    verdict = judge(facts, part[:len(held)], base_general, part[len(held):])
                    hp = built.job.hp
                    row = {"config": name, "dataset": size, "seed": seed, "learned": verdict.learned,
                           "kept": verdict.kept, "leaks": verdict.leaks, "passed": verdict.passed,
                           "epochs": hp.n_epochs, "batch_size": hp.batch_size, "lr": hp.learning_rate,
                           "steps": built.job.step, "r": built.job.spec.r, "wall_s": round(wall, 1),
                           "failures": list(verdict.failures)}
                    rows.append(row)
                    print(f"{name:>16} n={size!s:<5} seed={seed} learned={verdict.learned:5.2f} kept={verdict.kept:5.2f} "
                          f"leaks={verdict.leaks} {'PASS' if verdict.passed else 'fail'}  epochs={hp.n_epochs} "
                          f"bs={hp.batch_size} lr={hp.learning_rate:.1e} steps={built.job.step} ({wall:.0f}s group)")
                    if args.show_failures:
                        for f in verdict.failures[:8]:
                            print("      ", f)
                    sys.stdout.flush()
    print("\nsummary (passed / runs, mean learned, mean kept, leaks):")
    for name in names:
        mine = [r for r in rows if r["config"] == name]
        print(f"  {name:>16}: {sum(r['passed'] for r in mine)}/{len(mine)}  learned "
              f"{sum(r['learned'] for r in mine) / len(mine):.2f}  kept {sum(r['kept'] for r in mine) / len(mine):.2f}"
              f"  leaks {sum(r['leaks'] for r in mine)}")
    if args.out:
        Path(args.out).write_text(json.dumps({"base_general": base_general, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
