"""Multi-process multi-LoRA training (README "Training across processes"), same run, same data:

    python scripts/bench/bench_distributed_train.py [--jobs 4] [--examples 32] [--max-length 128]

- trained tokens/s of `--jobs` jobs in one process (2 threads), in mLoRA's pipeline mode (2 ranks x 1 thread,
  one stage each) and in data mode (2 ranks x 1 thread), with the ratio of each to the single process;
- the pipeline bubble with 1, 2 and 4 concurrent jobs: each stage's measured idle fraction (the time it waits for
  another stage, for a message or a step's all-reduce, over the wall time) beside mLoRA's formula max((D - L) / D, 0)
  and the simulated schedule's.

On one 2-core machine no speed-up is expected (two ranks share the cores a single process already uses, and
ranks talk over gloo on loopback); the point is the measured bubble. The default model (SmolLM2-135M, 30 layers,
auto balance) and a synthetic chat set with a different answer pattern per job.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def write_config(tmp: Path, model: str, jobs: int, examples: int, max_length: int, parallel: dict | None) -> Path:
    for j in range(jobs):
        rows = [{"messages": [{"role": "user", "content": f"Item {i} of list {j}: what comes next?"},
                              {"role": "assistant", "content": f"After item {i} of list {j} comes item "
                                                               f"{i + j + 1}, then {i + 2 * j + 2}."}]}
                for i in range(examples)]
        (tmp / f"job{j}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    config = {"model": model, "output_dir": str(tmp / "out"), "max_jobs": jobs, "jobs": [
        {"name": f"job{j}", "data": f"job{j}.jsonl", "max_length": max_length, "validation_fraction": 0.0,
         "lora": {"r": 8 * (1 + j % 2), "alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
         "hyperparameters": {"n_epochs": 1, "batch_size": 4, "micro_batch_size": 4, "learning_rate": 2e-4,
                             "seed": j}} for j in range(jobs)]}
    if parallel:
        config["parallel"] = parallel
    path = tmp / f"train-{jobs}-{parallel['mode'] if parallel else 'single'}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run(config: Path, nproc: int) -> dict:
    stats = config.with_suffix(".stats.json")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if nproc == 1:
        code = ("import json, sys; from pathlib import Path; from loraplex.trainer.offline import load_config, "
                "run_config; s = {}; p = Path(sys.argv[1]); run_config(load_config(p), p.parent, False, s); "
                "Path(sys.argv[2]).write_text(json.dumps(s))")
        cmd = [sys.executable, "-c", code, str(config), str(stats)]
        env["OMP_NUM_THREADS"] = "2"
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m",
               "loraplex.trainer.distributed", str(config), "--no-progress", "--stats-json", str(stats)]
        env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, check=False)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(stats.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--jobs", type=int, default=4)
    p.add_argument("--examples", type=int, default=32, help="training examples per job")
    p.add_argument("--max-length", type=int, default=128)
    args = p.parse_args()

    from loraplex.engine.default_model import ensure_default_model
    from loraplex.trainer.pipeline_schedule import build_schedule, mlora_bubble

    model = args.model or str(ensure_default_model())
    print(f"distributed training: {args.jobs} jobs x {args.examples} examples, model {Path(model).name}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-dist-") as tmp:
        tmp = Path(tmp)
        results = {}
        for name, parallel, nproc in [("single process x 2 threads", None, 1),
                                      ("pipeline 2 ranks x 1 thread", {"mode": "pipeline", "stages": 2}, 2),
                                      ("data 2 ranks x 1 thread", {"mode": "data"}, 2)]:
            stats = run(write_config(tmp, model, args.jobs, args.examples, args.max_length, parallel), nproc)
            results[name] = stats
            tps = stats["trained_tokens"] / stats["elapsed_s"]
            base = results["single process x 2 threads"]
            ratio = tps / (base["trained_tokens"] / base["elapsed_s"])
            layers = f", layers per stage {stats['balance']} (auto)" if "balance" in stats else ""
            print(f"  {name:30s} {stats['trained_tokens']:6d} tokens in {stats['elapsed_s']:6.1f} s: {tps:6.1f} "
                  f"tokens/s ({ratio:.2f}x single){layers}", flush=True)
        print("pipeline bubble (2 stages): measured idle fraction per stage vs mLoRA's formula and the schedule",
              flush=True)
        for jobs in (1, 2, 4):
            stats = run(write_config(tmp, model, jobs, args.examples, args.max_length,
                                     {"mode": "pipeline", "stages": 2}), 2)
            measured = [1 - s["busy_s"] / s["wall_s"] for s in stats["stages"]]
            steps = -(-args.examples // 4)
            groups = [t * jobs + j for t in range(steps) for j in range(jobs)]
            after = {g: g - jobs for g in groups if g >= jobs}
            simulated = build_schedule(groups, after, 2).bubble(0)
            print(f"  {jobs} job(s): measured {', '.join(f'stage {i} {100 * m:.0f}%' for i, m in enumerate(measured))}"
                  f"; formula {100 * mlora_bubble(2, jobs):.0f}%; schedule {100 * simulated:.0f}%", flush=True)


if __name__ == "__main__":
    main()
