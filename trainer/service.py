"""TrainingRuntime: the engine process's side of fine-tuning jobs (the engine loop's background work).

It trains on the served model's own modules, between inference steps, within `--train-share`. Jobs come
from the job store (trainer/job_store.py, shared with the HTTP process) by control calls `train_submit` and
`train_cancel`; progress goes back to the store as status changes, events (train_loss, valid_loss) and
checkpoints. When a job finishes, its PEFT folder is written and recorded with `set_output`; the HTTP
process publishes it to the adapter store and marks the job succeeded. On start, queued and running jobs
are resumed, running ones from their latest checkpoint.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from loraplex.engine.paths import default_fine_tuning_dir

from .checkpoint import load_best_weights, load_checkpoint, save_checkpoint, write_adapter
from .data import DataError, load_dataset, split_validation
from .job import EarlyStopping, Hyperparams, TrainingJob
from .job_store import BASE_LEARNING_RATE, JobRecord, JobStore
from .lora_layers import LoRASpec
from .multi_job import MultiJobTrainer

logger = logging.getLogger(__name__)

DEFAULT_MICRO_BATCH_SIZE = 4
DEFAULT_MAX_LENGTH = 1024


@dataclass(slots=True)
class RunningJob:
    job: TrainingJob
    valid: list
    eval_every: int
    checkpoint_every: int
    early: EarlyStopping
    started_s: float = 0.0


class TrainingRuntime:
    def __init__(self, engine: Any, args: Any) -> None:
        self.store = JobStore(Path(args.fine_tuning_dir) if args.fine_tuning_dir else default_fine_tuning_dir())
        self.tokenizer = engine.tokenizer
        self.model_config = engine.model_config
        self.base_model = args.model
        runner = engine.runner
        self.device = runner.device
        # the serving LoRA wrappers keep the last inference step's rows: cleared before each training slice
        self.serving_lora_state = getattr(engine.adapter_hook, "state", None)
        self.trainer = MultiJobTrainer(runner.model, engine.model_config, runner.dtype, runner.device,
                                       max_jobs=args.max_train_jobs,
                                       gradient_checkpointing=args.train_gradient_checkpointing,
                                       chunk_tokens=args.train_chunk_tokens, before_slice=self._clear_serving_lora)
        self.running: dict[str, RunningJob] = {}
        self.num_steps = 0
        self.num_slices = 0
        self._work = None  # the step (and its evaluations) in progress: a generator of slices
        self.resume()

    # ---- control calls -------------------------------------------------------------------------
    def call(self, method: str, args: tuple) -> Any:
        if method == "train_submit":
            return self.submit(*args)
        if method == "train_cancel":
            return self.cancel(*args)
        if method == "train_stats":
            return self.stats()
        raise ValueError(f"unknown training call {method!r}")

    def resume(self) -> None:
        for record in self.store.jobs_in_status("queued", "running"):
            if record.status == "running" and record.output_path:
                continue  # trained already; the HTTP process publishes it
            self.submit(record.id, resumed=True)

    def submit(self, job_id: str, resumed: bool = False) -> str:
        """Start (or resume) a queued or running job. Data problems fail the job, not the call."""
        record = self.store.get_job(job_id)
        if record is None:
            raise ValueError(f"no fine-tuning job {job_id!r}")
        if job_id in self.running or record.status not in ("queued", "running"):
            return record.status
        try:
            running = self._build(record)
        except (DataError, ValueError, OSError) as e:
            self._fail(job_id, "invalid_training_file" if isinstance(e, DataError) else "invalid_job", str(e))
            return "failed"
        checkpoint = self.store.latest_checkpoint(job_id)
        if checkpoint is not None:
            extra = load_checkpoint(Path(checkpoint["path"]), running.job)
            best = extra.get("best_loss")
            running.early.best_loss = math.inf if best is None else float(best)
            running.early.best_step = int(extra.get("best_step", 0))
            running.early.best_weights = load_best_weights(Path(checkpoint["path"]))
            self.store.add_event(job_id, "info", f"Resumed from the checkpoint at step {running.job.step}")
        if record.status == "queued":
            self.store.set_status(job_id, "running")
        running.started_s = time.monotonic()
        self.running[job_id] = running
        self.trainer.add_job(running.job)
        if not (resumed and checkpoint is not None):
            self.store.add_event(job_id, "info", f"Fine-tuning job started: {running.job.total_steps} steps, "
                                 f"{len(running.job.train)} training and {len(running.valid)} validation sequences")
        logger.info("fine-tuning job %s %s (%d steps)", job_id, "resumed" if resumed else "started",
                    running.job.total_steps)
        return "running"

    def cancel(self, job_id: str) -> str:
        self.running.pop(job_id, None)
        self.trainer.remove_job(job_id)
        self._drop_orphaned_step()
        record = self.store.get_job(job_id)
        if record is not None and record.status in ("validating_files", "queued", "running"):
            self.store.set_status(job_id, "cancelled")
            self.store.add_event(job_id, "info", "The job was cancelled")
        return "cancelled"

    def stats(self) -> dict:
        return {"running_jobs": len(self.running), "steps": self.num_steps, "slices": self.num_slices}

    # ---- background work -----------------------------------------------------------------------
    def has_work(self) -> bool:
        return bool(self.running) or self._work is not None

    def run_step(self) -> None:
        """One slice of the training step in progress (a layer of a chunk, a block of loss rows, ...); the
        engine loop runs inference steps in between."""
        if self._work is None:
            self._work = self._step_and_report()
        try:
            next(self._work)
        except StopIteration:
            self._work = None
        except Exception as e:  # noqa: BLE001 - e.g. out of memory: fail the jobs of this step, keep serving
            logger.exception("training step failed")
            self._work = None
            for job_id in self.trainer.in_step or list(self.running)[:self.trainer.max_jobs]:
                self._fail(job_id, "training_error", f"{type(e).__name__}: {e}")
        self.num_slices += 1

    def _drop_orphaned_step(self) -> None:
        """A step in progress whose jobs have all left (cancelled, failed) is not finished for nothing. One
        with a job still running goes on: its other jobs' gradients are already half accumulated. After the
        step (evaluations, events of the other jobs), the work always goes on."""
        in_step = self.trainer.in_step
        if self._work is not None and in_step and not any(j in self.running for j in in_step):
            self._work.close()
            self._work = None
            self.trainer.in_step = []

    def _clear_serving_lora(self) -> None:
        if self.serving_lora_state is not None:
            self.serving_lora_state.metas = {}

    def _step_and_report(self):
        reports = yield from self.trainer.step_slices()
        self.num_steps += 1
        for report in reports:
            running = self.running.get(report.job_id)
            if running is None or not report.optimizer_step:
                continue
            job = running.job
            data = {"step": job.step, "train_loss": job.last_train_loss, "learning_rate": job.scheduler.get_last_lr()[0]}
            stop_early = False
            if running.valid and (job.step % running.eval_every == 0 or job.is_finished):
                data["valid_loss"] = (yield from self.trainer.evaluate_slices([(job, running.valid)]))[0]
                if self.running.get(job.job_id) is not running:
                    continue  # cancelled while it was being evaluated
                stop_early = running.early.update(data["valid_loss"], job)
            self.store.add_event(job.job_id, "info", f"Step {job.step}/{job.total_steps}: training loss="
                                 f"{job.last_train_loss:.4f}" + (f", validation loss={data['valid_loss']:.4f}"
                                                                 if "valid_loss" in data else ""), data)
            if job.is_finished or stop_early:
                self._finish(running, early=stop_early)
            elif job.step % running.checkpoint_every == 0:
                self._checkpoint(running, data)

    # ---- internals -----------------------------------------------------------------------------
    def _build(self, record: JobRecord) -> RunningJob:
        lora = dict(record.lora or {})
        extras = {k: lora.pop(k) for k in list(lora) if k not in {f.name for f in fields(LoRASpec)}}
        if "target_modules" in lora:
            lora["target_modules"] = tuple(lora["target_modules"])
        spec = LoRASpec(**lora)
        hp_in = record.hyperparameters
        batch_size = int(hp_in["batch_size"])
        hp = Hyperparams(n_epochs=int(hp_in["n_epochs"]), batch_size=batch_size,
                         micro_batch_size=min(batch_size, int(extras.get("micro_batch_size", DEFAULT_MICRO_BATCH_SIZE))),
                         learning_rate=BASE_LEARNING_RATE * float(hp_in["learning_rate_multiplier"]),
                         warmup_ratio=float(extras.get("warmup_ratio", 0.0)), seed=int(record.seed))
        kw = dict(template=extras.get("template", "chat"), max_length=int(extras.get("max_length", DEFAULT_MAX_LENGTH)),
                  packing=bool(extras.get("packing", False)))
        train, _ = load_dataset(self.store.file_path(record.training_file).read_bytes(), self.tokenizer, **kw)
        if record.validation_file:
            valid, _ = load_dataset(self.store.file_path(record.validation_file).read_bytes(), self.tokenizer, **kw)
        else:
            train, valid = split_validation(train, float(extras.get("validation_fraction", 0.1)), seed=hp.seed)
        job = TrainingJob(record.id, spec, hp, train, self.model_config, self.device)
        return RunningJob(job, valid, eval_every=int(extras.get("eval_every", 0)) or job.steps_per_epoch,
                          checkpoint_every=int(extras.get("checkpoint_every", 0)) or job.steps_per_epoch,
                          early=EarlyStopping(int(extras.get("early_stopping_patience", 0))))

    def _job_dir(self, job_id: str) -> Path:
        return self.store.root / "checkpoints" / job_id

    def _checkpoint(self, running: RunningJob, metrics: dict) -> None:
        job = running.job
        early = running.early
        folder = save_checkpoint(self._job_dir(job.job_id) / f"step-{job.step}", job, self.base_model,
                                 extra={"best_loss": early.best_loss_or_none, "best_step": early.best_step},
                                 best_weights=early.best_weights)
        self.store.add_checkpoint(job.job_id, job.step, str(folder),
                                  {k: v for k, v in metrics.items() if k in ("step", "train_loss", "valid_loss")})

    def _finish(self, running: RunningJob, early: bool) -> None:
        job = running.job
        self.running.pop(job.job_id, None)
        self.trainer.remove_job(job.job_id)
        folder = self._job_dir(job.job_id) / "final"
        best = running.early.best_weights  # with early stopping on: the adapter of the best validation loss
        write_adapter(folder, job, self.base_model, best)
        if early:
            self.store.add_event(job.job_id, "info", f"Early stopping at step {job.step}: validation loss has not "
                                 f"improved for {running.early.patience} evaluations")
        if best is not None:
            self.store.add_event(job.job_id, "info", f"The published adapter is the one of step "
                                 f"{running.early.best_step} (validation loss {running.early.best_loss:.4f})")
        trained = sum(len(s.input_ids) for s in job.train) * job.hp.n_epochs
        self.store.set_output(job.job_id, str(folder), trained)
        logger.info("fine-tuning job %s finished: %d steps in %.1f s", job.job_id, job.step,
                    time.monotonic() - running.started_s)

    def _fail(self, job_id: str, code: str, message: str) -> None:
        self.running.pop(job_id, None)
        self.trainer.remove_job(job_id)
        self._drop_orphaned_step()
        record = self.store.get_job(job_id)
        if record is not None and record.status in ("validating_files", "queued", "running"):
            self.store.set_status(job_id, "failed", error={"code": code, "message": message, "param": None})
            self.store.add_event(job_id, "error", f"The job failed: {message}")
        logger.warning("fine-tuning job %s failed: %s", job_id, message)


def create_training_runtime(engine: Any, args: Any) -> TrainingRuntime:
    """The engine's background-work factory (a module-level function, so it crosses to the engine process)."""
    return TrainingRuntime(engine, args)
