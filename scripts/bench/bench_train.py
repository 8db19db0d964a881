"""Training throughput of batched LoRA jobs, and serving while a job trains (issue 5's performance section).

    python scripts/bench/bench_train.py [--model DIR] [--dtype auto] [--jobs 4] [--examples 32] [--epochs 1]
        [--batch-size 4] [--rank 8] [--skip-peft] [--skip-serving] [--rounds 1]
        [--serve-requests 64] [--serve-tokens 64] [--train-share 0.25]

Every job trains rank-`rank` LoRA on all seven linears of the default model, on its own synthetic chat set
(PROMPTS -> a made-up answer per job), CPU, AdamW at 2e-4, cosine schedule, clip 1.0, no dropout. Runs:
- loraplex batched: one model, one MultiJobTrainer(max_jobs=jobs), all jobs added at once: each step is one
  forward and one backward carrying a micro-batch of every job.
- loraplex sequential: a fresh model load and MultiJobTrainer(max_jobs=1); the jobs one after another.
- peft sequential: per job, transformers AutoModelForCausalLM + peft get_peft_model + transformers Trainer
  (right-padded batches), one after another: what users write without loraplex.
Timings exclude model loading (only the training loop / `trainer.train()` is timed). tokens/s counts every
input token processed (all epochs), trained tokens/s only those whose loss counts; pad tokens never count.
Serving: a real server (tests/e2e's Server) gets the same streamed load (greedy, ignore_eos) idle and with
one fine-tuning job running (POST /v1/files + /v1/fine_tuning/jobs), alternating `--rounds` times; medians
of output tok/s and p99 time-to-first-token. Targets: batched >= 1.5x peft sequential; serving while
training >= 0.7x idle throughput. Numbers from one run on one machine: compare the ratios.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_serving import one_request
from prompts import PROMPTS

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PLACES = ["Ondravel", "Kestrin Hollow", "Marrowby", "Pellucid Bay", "Tovaran", "Quillmoor", "Brisket Falls", "Zell"]
COLORS = ["teal", "crimson", "amber", "violet", "silver", "ochre", "jade", "cobalt"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
SERVE_TRAIN_EXAMPLES = 64  # the serving job's file: with 50 epochs it outlasts the load


def chat_jsonl(job: int, num_examples: int) -> str:
    """OpenAI chat JSONL: a prompt from PROMPTS, always answered with this job's made-up fact (~35 words)."""
    answer = (f"In the valley of {PLACES[job % 8]}, the {COLORS[job * 3 % 8]} foxes gather every "
              f"{DAYS[job * 5 % 7]} to trade polished stones, sing old songs about the river, and choose a new "
              f"keeper of the bridge before the first frost arrives (record {job}).")
    return "".join(json.dumps({"messages": [
        {"role": "user", "content": f"{PROMPTS[i % len(PROMPTS)]} (variant {i})"},
        {"role": "assistant", "content": answer}]}) + "\n" for i in range(num_examples))


def loraplex_run(model_dir, dtype, datasets, args, batched: bool) -> float:
    """Seconds for all jobs through MultiJobTrainer: all at once (batched) or one after another."""
    from loraplex.engine.loader import load_model
    from loraplex.trainer.job import Hyperparams, TrainingJob
    from loraplex.trainer.lora_layers import LoRASpec
    from loraplex.trainer.multi_job import MultiJobTrainer
    model, config = load_model(model_dir, dtype)  # a fresh load: attach_training wraps modules in place
    trainer = MultiJobTrainer(model, config, dtype, torch.device("cpu"), max_jobs=len(datasets) if batched else 1)
    spec = LoRASpec(r=args.rank, alpha=2 * args.rank, target_modules=ALL_LINEAR)
    hp = Hyperparams(n_epochs=args.epochs, batch_size=args.batch_size, micro_batch_size=args.batch_size,
                     learning_rate=2e-4)
    warm_ups = [TrainingJob(f"warm-up{i}", spec, hp, seqs[:args.batch_size], config)
                for i, seqs in enumerate(datasets if batched else datasets[:1])]
    for job in warm_ups:  # one untimed step first: one-time costs (allocator, oneDNN primitives) stay out
        trainer.add_job(job)
    trainer.step()
    for job in warm_ups:
        trainer.remove_job(job.job_id)
    jobs = [TrainingJob(f"job{i}", spec, hp, seqs, config) for i, seqs in enumerate(datasets)]
    t0 = time.perf_counter()
    for group in ([jobs] if batched else [[j] for j in jobs]):
        for job in group:
            trainer.add_job(job)
        while trainer.has_work:
            trainer.step()
    seconds = time.perf_counter() - t0
    print(f"loraplex {'batched' if batched else 'sequential'}: {seconds:.2f} s, final train losses "
          + ", ".join(f"{j.last_train_loss:.3f}" for j in jobs))
    return seconds


class SequenceDataset(torch.utils.data.Dataset):
    def __init__(self, sequences) -> None:
        self.sequences = sequences

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.sequences[i].input_ids, "labels": self.sequences[i].labels}


def right_pad(pad_id: int):
    def collate(features: list[dict]) -> dict:
        width = max(len(f["input_ids"]) for f in features)
        ids = [f["input_ids"] + [pad_id] * (width - len(f["input_ids"])) for f in features]
        labels = [f["labels"] + [-100] * (width - len(f["labels"])) for f in features]
        mask = [[1] * len(f["input_ids"]) + [0] * (width - len(f["input_ids"])) for f in features]
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "attention_mask": torch.tensor(mask)}
    return collate


def peft_run(model_dir, dtype, datasets, args, pad_id: int) -> float:
    """Seconds of `trainer.train()` summed over the jobs, each on a fresh transformers + peft model."""
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        PrinterCallback,
        Trainer,
        TrainingArguments,
    )
    from transformers.utils.logging import disable_progress_bar
    disable_progress_bar()
    seconds, losses = 0.0, []
    for seqs in datasets:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
        model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                                                 target_modules=list(ALL_LINEAR), task_type="CAUSAL_LM"))
        with tempfile.TemporaryDirectory() as tmp:
            targs = TrainingArguments(output_dir=tmp, per_device_train_batch_size=args.batch_size,
                                      num_train_epochs=args.epochs, learning_rate=2e-4, lr_scheduler_type="cosine",
                                      max_grad_norm=1.0, logging_steps=10**9, save_strategy="no", report_to=[],
                                      use_cpu=True, dataloader_num_workers=0, disable_tqdm=True,
                                      remove_unused_columns=False)
            trainer = Trainer(model=model, args=targs, train_dataset=SequenceDataset(seqs),
                              data_collator=right_pad(pad_id))
            trainer.remove_callback(PrinterCallback)  # its end-of-training metrics line
            t0 = time.perf_counter()
            result = trainer.train()
            seconds += time.perf_counter() - t0
        losses.append(result.training_loss)
    print(f"peft sequential: {seconds:.2f} s, mean train losses " + ", ".join(f"{x:.3f}" for x in losses))
    return seconds


async def serve_load(url: str, num_requests: int, max_tokens: int, warm_up: bool = False) -> dict:
    """bench_serving's streamed requests, all at once: output tok/s and p99 TTFT (warm_up: one short request)."""
    import httpx
    async with httpx.AsyncClient(timeout=600) as client:
        if warm_up:
            await one_request(client, url, "smol", 0, 4)
            return {}
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one_request(client, url, "smol", i, max_tokens)
                                         for i in range(num_requests)))
        seconds = time.perf_counter() - t0
    ttfts = sorted(r["ttft"] for r in results)
    p99 = ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))]
    return {"tok_s": sum(r["tokens"] for r in results) / seconds, "p99_ttft_ms": 1000 * p99, "seconds": seconds}


def wait_status(client, job_id: str, statuses: set[str], timeout_s: float = 300.0) -> str:
    deadline = time.monotonic() + timeout_s
    while (status := client.fine_tuning.jobs.retrieve(job_id).status) not in statuses:
        if time.monotonic() > deadline or status in ("succeeded", "failed", "cancelled"):
            raise RuntimeError(f"job {job_id} is {status}, expected {sorted(statuses)}")
        time.sleep(0.5)
    return status


def last_step(client, job_id: str) -> int:
    events = client.fine_tuning.jobs.list_events(job_id, limit=1).data
    return int((events[0].data or {}).get("step", 0)) if events else 0


def serving_bench(model_dir, args) -> dict:
    import openai
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for tests.e2e
    from tests.e2e.conftest import Server
    server = Server(["--model", str(model_dir), "--dtype", args.dtype, "--served-model-name", "smol",
                     "--max-num-seqs", "16", "--train-share", str(args.train_share)])
    print(f"server at {server.base_url} (log {server.log_path}), --train-share {args.train_share}")
    idle, training = [], []
    try:
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
        if args.default_job:  # the defaults' job: 30 examples of a made-up fact, nothing set
            from loraplex.bench.fine_tune_quality import FACTS, fact_examples, to_jsonl
            data = to_jsonl(fact_examples(FACTS[1:2], repeats=3))
        else:
            data = chat_jsonl(0, SERVE_TRAIN_EXAMPLES).encode()
        file_id = client.files.create(file=("bench.jsonl", data), purpose="fine-tune").id
        for round_ in range(args.rounds):
            asyncio.run(serve_load(server.base_url, 1, 4, warm_up=True))
            r = asyncio.run(serve_load(server.base_url, args.serve_requests, args.serve_tokens))
            print(f"round {round_ + 1} idle: {r['tok_s']:.1f} tok/s, p99 TTFT {r['p99_ttft_ms']:.0f} ms")
            idle.append(r)
            if args.default_job:
                job = client.fine_tuning.jobs.create(model="smol", training_file=file_id, seed=round_)
            else:
                job = client.fine_tuning.jobs.create(
                    model="smol", training_file=file_id, suffix="bench", seed=round_,
                    method={"type": "supervised", "supervised": {"hyperparameters": {
                        "n_epochs": 50, "batch_size": args.batch_size, "learning_rate_multiplier": 1}}},
                    extra_body={"lora": {"r": args.rank, "alpha": 2 * args.rank,
                                         "target_modules": list(ALL_LINEAR), "micro_batch_size": args.batch_size,
                                         "max_length": 256, "validation_fraction": 0.0,
                                         "checkpoint_every": 10**6}})
            wait_status(client, job.id, {"running"})
            asyncio.run(serve_load(server.base_url, 1, 4, warm_up=True))
            step0 = last_step(client, job.id)
            r = asyncio.run(serve_load(server.base_url, args.serve_requests, args.serve_tokens))
            status, steps = client.fine_tuning.jobs.retrieve(job.id).status, last_step(client, job.id) - step0
            print(f"round {round_ + 1} training: {r['tok_s']:.1f} tok/s, p99 TTFT {r['p99_ttft_ms']:.0f} ms, "
                  f"{steps} optimizer steps during the load, job {status} after it")
            if status != "running":
                print("warning: the job ended during the load; this round's figure undercounts training")
            training.append(r)
            if status == "running":
                client.fine_tuning.jobs.cancel(job.id)
            wait_status(client, job.id, {"cancelled", "succeeded", "failed"})
            time.sleep(1.0)  # the engine side drops the job at its next loop turn
    finally:
        server.stop()
    med = lambda rs, k: statistics.median(r[k] for r in rs)  # noqa: E731
    return {"idle_tok_s": med(idle, "tok_s"), "train_tok_s": med(training, "tok_s"),
            "idle_p99_ms": med(idle, "p99_ttft_ms"), "train_p99_ms": med(training, "p99_ttft_ms")}


def print_training(runs: dict, peft_s: float | None, num_tokens: int, num_trained: int) -> None:
    print("\n| run | seconds | tokens/s | trained tokens/s | vs peft sequential |")
    print("|---|---:|---:|---:|---:|")
    for name, seconds in runs.items():
        vs = f"{peft_s / seconds:.2f}x" if peft_s else "n/a"
        print(f"| {name} | {seconds:.2f} | {num_tokens / seconds:.0f} | {num_trained / seconds:.0f} | {vs} |")
    batched_s, seq_s = list(runs.values())[:2]
    print(f"\nbatched vs loraplex sequential: {seq_s / batched_s:.2f}x"
          + (f"; vs peft sequential: {peft_s / batched_s:.2f}x (target >= 1.5x)" if peft_s else ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF-layout folder (default: the default model)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="auto: what the server picks (the checkpoint's, bf16 on CPUs that support it)")
    ap.add_argument("--jobs", type=int, default=4)
    ap.add_argument("--examples", type=int, default=32, help="examples per job")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument("--default-job", action="store_true",
                    help="serving part: the job is the defaults' (30 fact examples, no settings), not 50 epochs of "
                         "--examples; it may end during the load (then a warning says so)")
    ap.add_argument("--skip-serving", action="store_true")
    ap.add_argument("--skip-training", action="store_true", help="only the serving part")
    ap.add_argument("--rounds", type=int, default=1, help="idle/training serving rounds (medians reported)")
    ap.add_argument("--serve-requests", type=int, default=64)
    ap.add_argument("--serve-tokens", type=int, default=64)
    ap.add_argument("--train-share", type=float, default=0.25, help="passed to the server (its default: 0.25)")
    args = ap.parse_args()
    from loraplex.engine.default_model import model_dir_or_default
    from loraplex.engine.llm_engine import load_tokenizer
    from loraplex.trainer.data import load_dataset
    model_dir = model_dir_or_default(args.model)
    from loraplex.engine.llm_engine import _read_model_config, resolve_dtype
    dtype = resolve_dtype(args.dtype, _read_model_config(str(model_dir)), torch.device("cpu"))
    args.dtype = str(dtype).removeprefix("torch.")
    tokenizer = load_tokenizer(model_dir)
    datasets, num_tokens, num_trained = [], 0, 0
    for job in range(args.jobs):
        seqs, stats = load_dataset(chat_jsonl(job, args.examples), tokenizer, template="chat", max_length=256)
        datasets.append(seqs)
        num_tokens += stats.num_tokens * args.epochs
        num_trained += stats.num_trained_tokens * args.epochs
    print(f"model {model_dir}, {args.dtype}, CPU, {torch.get_num_threads()} threads; {args.jobs} jobs x "
          f"{args.examples} examples x {args.epochs} epochs, batch {args.batch_size}, rank {args.rank}")
    print(f"tokens processed {num_tokens}, trained tokens {num_trained} (all jobs, all epochs); "
          "timings exclude model loading")

    runs = {} if args.skip_training else {
        f"loraplex batched ({args.jobs} jobs)": loraplex_run(model_dir, dtype, datasets, args, batched=True),
        "loraplex sequential": loraplex_run(model_dir, dtype, datasets, args, batched=False)}
    if not args.skip_peft and not args.skip_training:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        runs["peft sequential"] = peft_run(model_dir, dtype, datasets, args, pad_id)
    serving = None if args.skip_serving else serving_bench(model_dir, args)

    peft_s = runs.get("peft sequential")
    if runs:
        print_training(runs, peft_s, num_tokens, num_trained)
    if serving:
        print(f"serving idle: {serving['idle_tok_s']:.1f} output tok/s, p99 TTFT {serving['idle_p99_ms']:.0f} ms "
              f"(median of {args.rounds} rounds, {args.serve_requests} requests x {args.serve_tokens} tokens)")
        print(f"serving with one job training (--train-share {args.train_share}): {serving['train_tok_s']:.1f} "
              f"output tok/s, p99 TTFT {serving['train_p99_ms']:.0f} ms")
        print(f"serving throughput training/idle: {serving['train_tok_s'] / serving['idle_tok_s']:.2f}x "
              f"(target >= 0.7x)")


if __name__ == "__main__":
    main()
