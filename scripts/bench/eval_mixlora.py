"""MixLoRA vs LoRA at an equal trainable-parameter budget on a multi-task set of our own (bench/multitask.py):
both jobs train together in one batched trainer for the same steps, then every task's held-out multiple-choice
questions are scored by option log-likelihood through the engine's prompt-logprob path (base model too).

    python scripts/bench/eval_mixlora.py [--epochs 2] [--experts 4] [--top-k 2] [--rank 8] [--expert-rank 4]
        [--train-per-task 100] [--eval-per-task 40] [--seed 0]

The LoRA's rank (every linear) is picked so its trainable parameters come closest to the MixLoRA's (attention
LoRA + experts + routers). Prints per-task accuracy, the trainable parameters and the training time of each.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def option_logprob(engine, prompt_ids: list[list[int]], options: list[list[int]], adapter) -> list[float]:
    """Sum of each option's token logprobs after its prompt (one prefill each, max_tokens 1): lm-eval's `acc`
    criterion (`acc_norm` divides by the option's length, printed too)."""
    from loraplex.engine.core.sampling_params import SamplingParams
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    for i, (p, o) in enumerate(zip(prompt_ids, options)):
        engine.add_request(f"q{time.monotonic_ns()}-{i}", p + o, params, adapter=adapter)
    got: dict[str, list] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.prompt_logprobs is not None:
                got[out.request_id] = out.prompt_logprobs
    ordered = [got[k] for k in sorted(got, key=lambda k: int(k.rsplit("-", 1)[1]))]
    return [sum(t.logprob for t in lp[-len(o):]) for lp, o in zip(ordered, options)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr-multiplier", type=float, default=2.0, help="of 2e-4 (2.0: the server's auto default)")
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--rank", type=int, default=8, help="MixLoRA's attention LoRA rank")
    ap.add_argument("--expert-rank", type=int, default=4)
    ap.add_argument("--train-per-task", type=int, default=100)
    ap.add_argument("--eval-per-task", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import transformers

    from loraplex.adapters.runtime import create_lora_runtime
    from loraplex.bench.multitask import TASKS, make_multitask, to_jsonl
    from loraplex.engine.engine_args import EngineArgs
    from loraplex.engine.llm_engine import LLMEngine
    from loraplex.engine.loader import load_model
    from loraplex.trainer.checkpoint import write_adapter
    from loraplex.trainer.defaults import build_job
    from loraplex.trainer.multi_job import MultiJobTrainer

    model_dir = args.model
    if model_dir is None:
        from loraplex.engine.default_model import ensure_default_model
        model_dir = str(ensure_default_model())
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    train, questions = make_multitask(args.seed, args.train_per_task, args.eval_per_task)
    model, config = load_model(model_dir, torch.float32)
    hp = {"n_epochs": args.epochs, "batch_size": args.batch_size, "learning_rate_multiplier": args.lr_multiplier}
    mix_lora = {"type": "mixlora", "r": args.rank, "alpha": 2 * args.rank, "num_experts": args.experts,
                "top_k": args.top_k, "expert_lora": {"r": args.expert_rank, "lora_alpha": 2 * args.expert_rank},
                "self_distillation": 0, "validation_fraction": 0}
    data = to_jsonl(train)
    mix = build_job("mixlora", data, None, tokenizer, config, lora=mix_lora, hyperparameters=hp, seed=args.seed).job
    budget = sum(p.numel() for p in mix.params)
    per_rank = sum(p.numel() for p in build_job("probe", data, None, tokenizer, config, hyperparameters=hp,
                                                lora={"r": 1, "target_modules": ALL_LINEAR, "self_distillation": 0,
                                                      "validation_fraction": 0}, seed=0).job.params)
    rank = max(1, round(budget / per_rank))
    lora = build_job("lora", data, None, tokenizer, config, hyperparameters=hp, seed=args.seed,
                     lora={"r": rank, "alpha": 2 * rank, "target_modules": ALL_LINEAR, "self_distillation": 0,
                           "validation_fraction": 0}).job
    jobs = {"MixLoRA": mix, "LoRA": lora}
    print(f"tasks {', '.join(TASKS)}: {len(train)} training examples, {len(questions)} held-out questions")
    print(f"MixLoRA {args.experts} experts top-{args.top_k}, attention r{args.rank}, experts r{args.expert_rank}: "
          f"{budget:,} trainable parameters; LoRA r{rank} on every linear: "
          f"{sum(p.numel() for p in lora.params):,}")
    trainer = MultiJobTrainer(model, config, torch.float32, torch.device("cpu"), max_jobs=2)
    for job in jobs.values():
        trainer.add_job(job)
    t0 = time.perf_counter()
    steps = 0
    while trainer.has_work:
        reports = trainer.step()
        steps += 1
        if steps % 10 == 0 or not trainer.has_work:
            print(f"step {steps}: " + ", ".join(f"{r.job_id} loss {r.loss:.3f}" for r in reports)
                  + (f", router_aux_loss {mix.last_metrics.get('router_aux_loss', 0):.4f}"), flush=True)
    print(f"trained both jobs in one batched trainer: {steps} steps, {time.perf_counter() - t0:.0f} s")

    tmp = Path(tempfile.mkdtemp(prefix="eval-mixlora-"))
    engine = LLMEngine.from_engine_args(
        EngineArgs(model=model_dir, dtype="float32", max_num_seqs=64, enable_lora=True, max_lora_rank=max(16, rank),
                   lora_pool_pages=2048, max_mixlora_adapters=2, max_mixlora_experts=max(8, args.experts)),
        hook_factory=create_lora_runtime)
    adapters = {"base": None}
    for i, (name, job) in enumerate(jobs.items(), 1):
        write_adapter(tmp / name, job, model_dir)
        engine.adapter_hook.register_adapter(name, i, 1, str(tmp / name))
        adapters[name] = (i, 1)
    prompts, options, owners = [], [], []
    for qi, q in enumerate(questions):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": q.prompt}], add_generation_prompt=True,
                                            tokenize=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        for option in q.options:
            prompts.append(ids)
            options.append(tokenizer(option, add_special_tokens=False)["input_ids"])
            owners.append(qi)
    print(f"{'':>16} " + " ".join(f"{t:>10}" for t in TASKS) + f" {'all':>8}")
    for name, adapter in adapters.items():
        scores = option_logprob(engine, prompts, options, adapter)
        for criterion, norm in (("acc", False), ("acc_norm", True)):
            right = {t: 0 for t in TASKS}
            for qi, q in enumerate(questions):
                mine = [s / (len(o) if norm else 1) for s, o, w in zip(scores, options, owners) if w == qi]
                right[q.task] += int(max(range(len(mine)), key=mine.__getitem__) == q.answer)
            per_task = {t: right[t] / args.eval_per_task for t in TASKS}
            print(f"{name + ' ' + criterion:>16} " + " ".join(f"{per_task[t]:10.3f}" for t in TASKS)
                  + f" {sum(right.values()) / len(questions):8.3f}", flush=True)


if __name__ == "__main__":
    main()
