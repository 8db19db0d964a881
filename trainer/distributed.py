"""Multi-process multi-LoRA training on torch.distributed (gloo on CPU, NCCL on GPU), for the jobs of a
`loraplex train` config with a `parallel` section:

    parallel:
      mode: pipeline        # pipeline (mLoRA's LoRA-aware pipeline) | data
      stages: 2             # pipeline: one stage per process (= --nproc-per-node x nodes)
      balance: auto         # pipeline: decoder layers per stage, e.g. [16, 14]; auto balances compute
      checkpoint_every: 0   # optimizer steps between a job's checkpoints; 0 = at its evaluations (epoch ends)

Launched by `loraplex train CONFIG --nproc-per-node N` (which checks the config, then runs torchrun) or directly
`torchrun --nproc-per-node N -m loraplex.trainer.distributed CONFIG`; inside Ray Train's TorchTrainer (or any
process group already set up) call `run_distributed(config, base_dir)` from the worker loop.

- pipeline: each rank holds a contiguous range of the decoder layers (the first the embedding, the last the norm
  and head) and every job's LoRA parameters of them (trainer/pipeline.py); micro-batches of different jobs fill
  the pipeline (trainer/pipeline_schedule.py). Checkpoints are per rank; the adapters are gathered into one PEFT
  folder per job on rank 0.
- data: every rank holds the whole base and every job; each job's optimizer-step batch is split over the ranks and
  its LoRA gradients (never any base gradient: the base is frozen) are summed before its optimizer step, which
  then is the same on every rank: the same adapters as one process with the same global batch.

Each job checkpoints on its own (trainer/checkpoint.py, no pickle) under OUTPUT_DIR/.checkpoints/JOB/step-N/
rank-R; a restarted run (torchrun --max-restarts, or the same command again) resumes every job from its latest
step that every rank wrote.
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .checkpoint import load_best_weights, load_checkpoint, save_checkpoint
from .job import TrainingJob
from .multi_job import MultiJobTrainer
from .offline import (
    JobPlan,
    build_plans,
    check_config,
    load_base,
    load_config,
    model_path_of,
    progress_bars,
    record_evaluation,
    write_results,
)

logger = logging.getLogger("loraplex.trainer.distributed")

MODES = ("pipeline", "data")
PARALLEL_KEYS = {"mode", "stages", "balance", "checkpoint_every"}
CHECKPOINTS = ".checkpoints"


@dataclass(frozen=True, slots=True)
class ParallelConfig:
    mode: str
    stages: int = 0  # pipeline only
    balance: tuple[int, ...] | None = None  # layers per stage; None: auto
    checkpoint_every: int = 0


def parse_parallel(given: Any) -> ParallelConfig:
    """The config's `parallel` section, checked (ValueError with what is wrong)."""
    if not isinstance(given, dict):  # a config error like the others: ValueError, which the CLI reports
        raise ValueError("parallel must be a mapping: {mode: pipeline | data, stages: N, balance: auto | [...]}")  # noqa: TRY004
    unknown = set(given) - PARALLEL_KEYS
    if unknown:
        raise ValueError(f"parallel: unknown keys {sorted(unknown)} (known: {sorted(PARALLEL_KEYS)})")
    mode = given.get("mode")
    if mode not in MODES:
        raise ValueError(f"parallel.mode must be one of {', '.join(MODES)}; got {mode!r}")
    every = given.get("checkpoint_every", 0)
    if not isinstance(every, int) or every < 0:
        raise ValueError(f"parallel.checkpoint_every must be a whole number >= 0; got {every!r}")
    if mode == "data":
        extra = sorted({"stages", "balance"} & set(given))
        if extra:
            raise ValueError(f"parallel.{extra[0]} applies to mode pipeline")
        return ParallelConfig("data", checkpoint_every=every)
    stages = given.get("stages")
    if not isinstance(stages, int) or stages < 2:
        raise ValueError(f"parallel.stages must be a whole number >= 2 in mode pipeline; got {stages!r}")
    balance = given.get("balance", "auto")
    if balance == "auto":
        balance = None
    elif not (isinstance(balance, list) and all(isinstance(b, int) for b in balance)):
        raise ValueError(f"parallel.balance must be auto or a list of layers per stage; got {balance!r}")
    return ParallelConfig("pipeline", stages, None if balance is None else tuple(balance), every)


def stage_bounds(model_config, stages: int, balance: tuple[int, ...] | None, target_fraction: float = 0.25
                 ) -> list[range]:
    """The decoder layers of each pipeline stage (ValueError when the split is impossible)."""
    n = model_config.num_hidden_layers
    if stages > n:
        raise ValueError(f"parallel.stages {stages} exceeds the model's {n} decoder layers (each stage needs one)")
    if balance is None:
        balance = auto_balance(model_config, stages, target_fraction)
    if len(balance) != stages:
        raise ValueError(f"parallel.balance lists {len(balance)} stages; parallel.stages is {stages}")
    if any(b < 1 for b in balance):
        raise ValueError(f"parallel.balance {list(balance)}: every stage needs at least one layer")
    if sum(balance) != n:
        raise ValueError(f"parallel.balance {list(balance)} sums to {sum(balance)}; the model has {n} decoder layers")
    bounds, at = [], 0
    for b in balance:
        bounds.append(range(at, at + b))
        at += b
    return bounds


def auto_balance(model_config, stages: int, target_fraction: float = 0.25) -> tuple[int, ...]:
    """Layers per stage that minimise the largest stage's cost, counting a decoder layer by its linears' weights
    per token and the head (on the last stage) by vocab x hidden per trained target: the head runs only on the
    rows whose next token is trained, `target_fraction` of the tokens (the jobs' data says how many; a quarter
    when unknown: chat data with its prompts masked)."""
    c = model_config
    head_dim = c.hidden_size // c.num_attention_heads
    layer = c.hidden_size * (2 * c.num_attention_heads * head_dim + 2 * c.num_key_value_heads * head_dim) + \
        3 * c.hidden_size * c.intermediate_size
    head = target_fraction * c.vocab_size * c.hidden_size / layer  # in layers
    n = c.num_hidden_layers
    # best[k][i]: the least max cost of the first i layers in k stages (the last stage adds the head)
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for k in range(1, stages + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):
                cost = (i - j) + (head if k == stages and i == n else 0.0)
                value = max(best[k - 1][j], cost)
                if value < best[k][i]:
                    best[k][i], cut[k][i] = value, j
    sizes, i = [], n
    for k in range(stages, 0, -1):
        j = cut[k][i]
        sizes.append(i - j)
        i = j
    return tuple(reversed(sizes))


def check_parallel(config: dict[str, Any], world_size: int | None = None, model_path: str | None = None
                   ) -> ParallelConfig:
    """Everything that can be checked before any process starts: the parallel section against the model's
    layers (`model_path`, or the config's model when it names one) and the number of processes."""
    from loraplex.engine.llm_engine import _read_model_config
    check_config(config)
    par = parse_parallel(config.get("parallel"))
    if par.mode == "pipeline":
        if world_size is not None and world_size != par.stages:
            raise ValueError(f"parallel.stages is {par.stages} but {world_size} processes run it (one per stage)")
        model = model_path or config.get("model")
        if model is not None:
            stage_bounds(_read_model_config(str(model)), par.stages, par.balance)
    elif world_size is not None and world_size < 1:
        raise ValueError("data parallelism needs at least one process")
    return par


# ---- the run --------------------------------------------------------------------------------------------
def run_distributed(config: dict[str, Any], base_dir: Path = Path("."), progress: bool = True,
                    stats: dict | None = None) -> dict[str, dict]:
    """Train the config's jobs across the processes of the default process group (set up here from torchrun's
    environment unless it already is); -> {job name: summary} on rank 0, {} elsewhere. `stats` (rank 0) gets
    the run's figures: mode, world size, elapsed seconds, trained tokens, and per pipeline stage its busy and
    wall seconds in the training windows."""
    from loraplex.engine.llm_engine import (
        _read_model_config,
        load_tokenizer,
        resolve_device,
    )
    device = resolve_device(config.get("device", "auto"))
    own_group = not dist.is_initialized()
    if own_group:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=30))
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        par = check_parallel(config, world)
        jobs_cfg = check_config(config)
        if rank == 0:  # the default model is fetched once, not by every rank at the same time
            model_path = model_path_of(config)
        dist.barrier()
        if rank != 0:
            model_path = model_path_of(config)
        model_config = _read_model_config(model_path)
        tokenizer = load_tokenizer(model_path)
        plans = build_plans(jobs_cfg, base_dir, tokenizer, model_config, device)  # data first: auto balance uses it
        bounds = parts = None
        if par.mode == "pipeline":
            from loraplex.engine.loader import ModelParts
            bounds = stage_bounds(model_config, par.stages, par.balance, target_fraction(plans))
            parts = ModelParts(bounds[rank], rank == 0, rank == world - 1)
            logger.info("rank %d: pipeline stage %d of %d, decoder layers %d-%d%s%s", rank, rank, world,
                        bounds[rank].start, bounds[rank].stop - 1, " + embedding" if parts.embedding else "",
                        " + norm and head" if parts.head else "")
        model, model_config, dtype = load_base(config, model_path, device, parts)
        trainer = MultiJobTrainer(model, model_config, dtype, device, max_jobs=int(config.get("max_jobs", 4)),
                                  gradient_checkpointing=bool(config.get("gradient_checkpointing", False)),
                                  layers=None if bounds is None else bounds[rank])
        run = DistributedRun(config, par, trainer, plans, bounds, base_dir / config.get("output_dir", "adapters"),
                             model_path, device, progress and rank == 0)
        summary = run.run()
        if stats is not None and rank == 0:
            stats.update(run.stats)
        return summary
    finally:
        if own_group:
            dist.destroy_process_group()


def target_fraction(plans: dict[str, JobPlan]) -> float:
    """The share of the jobs' training tokens whose next token is trained (what the head runs on)."""
    from .batch import num_targets
    tokens = targets = 0
    for plan in plans.values():
        seqs = [q for unit in plan.job.train for q in plan.job.objective.expand([unit])[0]]
        tokens += sum(len(q.input_ids) for q in seqs)
        targets += num_targets(seqs)
    return targets / tokens if tokens else 0.25


class DistributedRun:
    def __init__(self, config: dict, par: ParallelConfig, trainer: MultiJobTrainer, plans: dict[str, JobPlan],
                 bounds: list[range] | None, out_dir: Path, model_path: str, device: torch.device,
                 progress: bool) -> None:
        self.config, self.par, self.trainer, self.plans = config, par, trainer, plans
        self.bounds, self.out_dir, self.model_path, self.device = bounds, out_dir, model_path, device
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.progress = progress
        self.bars: dict = {}
        self.tokens = 0
        self.stage = None
        if par.mode == "pipeline":
            from .pipeline import PipelineStage
            self.stage = PipelineStage(trainer, self.rank, bounds, device)
        for plan in plans.values():
            job = plan.job
            if par.mode == "pipeline":
                job.keep_layers(bounds[self.rank])
                job.global_norm = self._global_norm
            else:
                job.shard = (self.rank, self.world)
                job.all_reduce = dist.all_reduce
        self.stage_times: list[tuple[float, float]] = []  # pipeline: per window, (busy s, wall s) on this rank
        self.trained_tokens = 0  # data mode: this rank's
        self.stats: dict = {}

    @staticmethod
    def _global_norm(grads: list[torch.Tensor]) -> torch.Tensor:
        device = grads[0].device if grads else torch.device("cpu")
        total = torch.zeros((), dtype=torch.float64, device=device)
        for g in grads:
            total += g.double().pow(2).sum()
        dist.all_reduce(total)
        return total.sqrt().float()

    # ---- checkpoints ------------------------------------------------------------------------------------
    def _checkpoint_dir(self, job: TrainingJob) -> Path:
        return self.out_dir / CHECKPOINTS / job.job_id

    def _writes_checkpoints(self) -> bool:
        return self.par.mode == "pipeline" or self.rank == 0  # data mode: every rank holds the same state

    def _save(self, plan: JobPlan) -> None:
        job = plan.job
        if not self._writes_checkpoints():
            return
        folder = self._checkpoint_dir(job) / f"step-{job.step}" / f"rank-{self.rank if self.stage else 0}"
        folder.parent.mkdir(parents=True, exist_ok=True)
        early = plan.early
        extra = {"best_loss": early.best_loss if early.best_loss != float("inf") else None,
                 "best_step": early.best_step, "evals_without_improvement": early.evals_without_improvement,
                 "stopped_early": plan.stopped_early, "steps_done": plan.steps_done, "total_steps": job.total_steps,
                 "world": self.world, "mode": self.par.mode,
                 "layers": [self.bounds[self.rank].start, self.bounds[self.rank].stop] if self.bounds else None}
        save_checkpoint(folder, job, self.model_path, extra, early.best_weights)
        self._prune_checkpoints(job)

    def _prune_checkpoints(self, job: TrainingJob) -> None:
        """Keep each job's two latest complete steps (rank 0 removes the older ones)."""
        if self.rank != 0:
            return
        complete = self._complete_steps(job)
        for step in complete[:-2]:
            shutil.rmtree(self._checkpoint_dir(job) / f"step-{step}", ignore_errors=True)

    def _complete_steps(self, job: TrainingJob) -> list[int]:
        folder = self._checkpoint_dir(job)
        ranks = self.world if self.stage else 1
        steps = []
        for d in folder.glob("step-*") if folder.is_dir() else ():
            if all((d / f"rank-{r}" / "trainer_state.json").is_file() for r in range(ranks)):
                steps.append(int(d.name.split("-", 1)[1]))
        return sorted(steps)

    def _resume(self) -> None:
        """Every job from its latest step that every rank checkpointed (the same choice on every rank)."""
        for plan in self.plans.values():
            job = plan.job
            steps = self._complete_steps(job)
            step = torch.tensor([steps[-1] if steps else -1], device=self.device)
            dist.broadcast(step, 0)  # rank 0 decides: a rank may see a step whose last file lands after it looked
            if int(step) < 0:
                continue
            folder = self._checkpoint_dir(job) / f"step-{int(step)}" / f"rank-{self.rank if self.stage else 0}"
            extra = load_checkpoint(folder, job)
            if extra.get("world") != self.world or extra.get("mode") != self.par.mode or (
                    self.bounds and extra.get("layers") != [self.bounds[self.rank].start, self.bounds[self.rank].stop]):
                raise ValueError(f"the checkpoint {folder} was written by a different layout ({extra.get('mode')}, "
                                 f"{extra.get('world')} ranks, layers {extra.get('layers')}); move "
                                 f"{self.out_dir / CHECKPOINTS} away to start over")
            early = plan.early
            early.best_loss = extra["best_loss"] if extra.get("best_loss") is not None else float("inf")
            early.best_step, early.evals_without_improvement = extra["best_step"], extra["evals_without_improvement"]
            early.best_weights = load_best_weights(folder)
            plan.stopped_early, plan.steps_done = extra["stopped_early"], extra["steps_done"]
            if plan.stopped_early:
                job.step = job.total_steps
            if self.rank == 0:
                logger.info("job %s: resumed from its checkpoint of step %d of %d", job.job_id, job.step,
                            job.total_steps)

    def _checkpoint_due(self, plan: JobPlan) -> bool:
        """At every checkpoint_every-th step (default: its evaluations), and when it finishes (a resumed run
        does not train it again)."""
        job = plan.job
        every = self.par.checkpoint_every or plan.eval_every
        return job.is_finished or job.step % every == 0

    # ---- the loop ---------------------------------------------------------------------------------------
    def run(self) -> dict[str, dict]:
        self._resume()
        if self.progress:
            self.bars = progress_bars(self.plans)
            for name, bar in self.bars.items():
                bar.update(self.plans[name].job.step)
        t0 = time.perf_counter()
        if self.stage is None:
            self._run_data()
        else:
            self._run_pipeline()
        for bar in self.bars.values():
            bar.close()
        elapsed = time.perf_counter() - t0
        if self.stage is not None:
            tokens = self.stage.trained_tokens
        else:
            total = torch.tensor([self.trained_tokens], dtype=torch.float64, device=self.device)
            dist.all_reduce(total)
            tokens = int(total)
        weights = self._gather_weights() if self.stage is not None else None
        summary = {}
        if self.rank == 0:
            summary = write_results(self.plans, self.out_dir, self.model_path, weights)
            shutil.rmtree(self.out_dir / CHECKPOINTS, ignore_errors=True)
            logger.info("trained %d jobs in %.1f s on %d ranks (%s): %.0f trained tokens/s", len(self.plans), elapsed,
                        self.world, self.par.mode, tokens / max(elapsed, 1e-9))
        self.stats = {"mode": self.par.mode, "world": self.world, "elapsed_s": elapsed, "trained_tokens": tokens}
        if self.stage is not None:
            self.stats["stages"] = self._log_bubble()
            self.stats["balance"] = [len(b) for b in self.bounds]
        dist.barrier()
        return summary

    def _after_step(self, plan: JobPlan) -> None:
        job = plan.job
        if job.job_id in self.bars:
            self.bars[job.job_id].update(1)
            self.bars[job.job_id].set_postfix(loss=f"{job.last_train_loss:.3f}")

    def _run_data(self) -> None:
        trainer = self.trainer
        for plan in self.plans.values():
            trainer.add_job(plan.job)
        while trainer.has_work:
            for report in trainer.step():
                plan = self.plans[report.job_id]
                self.trained_tokens += report.num_targets
                if not report.optimizer_step:
                    continue
                self._after_step(plan)
                if plan.valid and (report.step % plan.eval_every == 0 or report.finished):
                    self._evaluate_data(plan)
                if self._checkpoint_due(plan):
                    self._save(plan)

    def _evaluate_data(self, plan: JobPlan) -> None:
        """The validation loss over every rank's share of the validation set (the same value on every rank)."""
        job = plan.job
        mine = plan.valid[self.rank::self.world]
        loss_sum, units = self.trainer.evaluate_sums([(job, mine)])[0][:2]
        total = torch.tensor([loss_sum, units], dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        loss = float(total[0] / total[1]) if total[1] else float("nan")
        record_evaluation(plan, loss, log=self.rank == 0)

    def _run_pipeline(self) -> None:
        """Windows of optimizer steps: each running job goes up to its next evaluation (or checkpoint, or end);
        then the due evaluations run through the pipeline (forwards only) and rank 0's early-stopping verdicts
        reach every rank."""
        max_jobs = int(self.config.get("max_jobs", 4))
        while True:
            running = [p for p in self.plans.values() if not p.job.is_finished][:max_jobs]
            if not running:
                return
            steps = {p.job.job_id: self._steps_to_stop(p) for p in running}
            by_job = {p.job.job_id: p for p in running}
            schedule = self.stage.train([p.job for p in running], steps,
                                        on_step=lambda job, by_job=by_job: self._pipeline_step(by_job[job.job_id]))
            self.stage_times.append((self.stage.busy_s, self.stage.wall_s))
            logger.debug("rank %d: window of %d slots, %.2f s busy of %.2f s", self.rank, schedule.num_slots,
                         self.stage.busy_s, self.stage.wall_s)
            due = [p for p in running if p.valid and (p.job.step % p.eval_every == 0 or p.job.is_finished)]
            if due:
                results = self.stage.evaluate([(p.job, p.valid) for p in due])
                verdict = [None]
                if self.rank == 0:
                    for p, r in zip(due, results):
                        record_evaluation(p, r["loss"])
                    verdict = [[(p.early.best_loss, p.early.best_step, p.early.evals_without_improvement,
                                 p.stopped_early, p.steps_done) for p in due]]
                dist.broadcast_object_list(verdict, 0)
                for p, (best_loss, best_step, evals, stopped, done) in zip(due, verdict[0]):
                    if self.rank != 0:
                        improved = best_step == p.job.step and best_loss < p.early.best_loss
                        p.early.best_loss, p.early.best_step, p.early.evals_without_improvement = best_loss, best_step, evals
                        if improved and p.early.patience:
                            p.early.best_weights = p.job.lora.peft_state_dict()  # this rank's part
                        if stopped:
                            p.stopped_early, p.steps_done = True, done
                            p.job.step = p.job.total_steps
                for p in due:
                    if self._checkpoint_due(p):
                        self._save(p)

    def _steps_to_stop(self, plan: JobPlan) -> int:
        job = plan.job
        stops = [job.total_steps]
        for every in (plan.eval_every if plan.valid else 0, self.par.checkpoint_every):
            if every:
                stops.append((job.step // every + 1) * every)
        return min(stops) - job.step

    def _pipeline_step(self, plan: JobPlan) -> None:
        self._after_step(plan)
        job = plan.job
        due_eval = plan.valid and (job.step % plan.eval_every == 0 or job.is_finished)
        if self._checkpoint_due(plan) and not due_eval:  # with an evaluation: saved after it (early stopping)
            self._save(plan)

    def _gather_weights(self) -> dict[str, dict[str, torch.Tensor]] | None:
        """Each job's adapter (early stopping's best when it stopped early) from every stage, on rank 0."""
        out: dict[str, dict[str, torch.Tensor]] = {}
        for name, plan in self.plans.items():
            mine = plan.early.best_weights if plan.early.best_weights is not None else plan.job.lora.peft_state_dict()
            parts = [None] * self.world if self.rank == 0 else None
            dist.gather_object(mine, parts, dst=0)
            if self.rank == 0:
                merged: dict[str, torch.Tensor] = {}
                for part in parts:
                    merged.update(part)
                out[name] = merged
        return out if self.rank == 0 else None

    def _log_bubble(self) -> list[dict] | None:
        """Every stage's busy and wall time in the training windows, logged and returned on rank 0."""
        busy = sum(b for b, _ in self.stage_times)
        wall = sum(w for _, w in self.stage_times)
        times = [None] * self.world if self.rank == 0 else None
        dist.gather_object((busy, wall), times, dst=0)
        if self.rank != 0:
            return None
        for r, (b, w) in enumerate(times):
            logger.info("stage %d: busy %.1f s of %.1f s in training windows, the rest waiting for another stage (bubble %.0f%%)", r, b, w,
                        100 * (1 - b / w) if w else 0.0)
        return [{"busy_s": b, "wall_s": w} for b, w in times]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loraplex.trainer.distributed",
                                description="one rank of a multi-process `loraplex train` run (start it with torchrun)")
    p.add_argument("config")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--stats-json", default=None, help="rank 0 writes the run's figures here (elapsed, trained "
                   "tokens, per pipeline stage its busy and wall seconds)")
    args = p.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    # rank 0 tells the story; the others say where they stand and what goes wrong
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)
    path = Path(args.config)
    stats: dict = {}
    summary = run_distributed(load_config(path), base_dir=path.parent, progress=not args.no_progress, stats=stats)
    if args.stats_json and stats:
        Path(args.stats_json).write_text(json.dumps(stats, indent=2))
    for name, result in summary.items():
        print(f"{name}: {result['path']} (steps {result['steps']}, train_loss {result['train_loss']:.4f})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
