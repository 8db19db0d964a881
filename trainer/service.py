"""TrainingRuntime: the engine process's side of fine-tuning jobs (the engine loop's background work).

It trains on the served model's own modules, between inference steps, within `--train-share`. Jobs come
from the job store (trainer/job_store.py, shared with the HTTP process) by control calls `train_submit` and
`train_cancel`; progress goes back to the store as status changes, events (train_loss, valid_loss) and
checkpoints. When a job finishes, its PEFT folder is written and recorded with `set_output`; the HTTP
process publishes it to the adapter store and marks the job succeeded. On start, queued and running jobs
are resumed, running ones from their latest checkpoint.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from loraplex.engine.core.sampling_params import SamplingParams
from loraplex.engine.paths import default_fine_tuning_dir

from . import regularization
from .checkpoint import (
    load_best_weights,
    load_checkpoint,
    save_checkpoint,
    write_adapter,
)
from .data import DataError
from .defaults import BuiltJob, build_job, resolve_lora, self_distillation_share
from .job_store import JobRecord, JobStore
from .multi_job import MultiJobTrainer

logger = logging.getLogger(__name__)

RunningJob = BuiltJob  # a job the runtime trains: TrainingJob, validation data, cadence, early stopping
SELF_DISTILLATION_ID = "__loraplex-self-distillation-"


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
        self.paused: dict[str, RunningJob] = {}  # paused in this process: their state kept exactly as it was
        self.waiting: list[RunningJob] = []  # built, waiting for memory (admitted by priority, then age)
        self.memory_limit: int | None = getattr(args, "train_memory_bytes", None)
        self.engine = engine
        self.model_key = json.dumps([str(args.model), str(runner.dtype), getattr(args, "quantization", "none")])
        self._base_answers: list[dict] | None = None  # the self-distillation pool, once generated or loaded
        self._generating: dict[int, tuple[str, str | None]] | None = None  # answers arriving, by prompt index
        self._awaiting_answers: list[str] = []  # jobs waiting for the pool
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
        if method == "train_pause":
            return self.pause(*args)
        if method == "train_resume":
            return self.resume_job(*args)
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
        if (job_id in self.running or job_id in self._awaiting_answers or record.status not in ("queued", "running")
                or any(r.job.job_id == job_id for r in self.waiting)):
            return record.status
        try:
            if self._needs_base_answers(record):
                return self._await_base_answers(record)
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
        if any(v == "auto" for v in record.hyperparameters.values()):
            self.store.set_resolved(job_id, running.hyperparameters)
        if not self._fits(running):
            self.waiting.append(running)
            if record.status == "running":
                self.store.set_status(job_id, "queued")
            self.store.add_event(job_id, "info", f"Waiting for memory: the job needs "
                                 f"{job_state_bytes(running.job) / 2**20:.1f} MiB and "
                                 f"{self._free_bytes() / 2**20:.1f} MiB are free for training")
            logger.info("fine-tuning job %s waits for memory", job_id)
            return "queued"
        return self._start(running, resumed=resumed, from_checkpoint=checkpoint is not None)

    def _start(self, running: RunningJob, resumed: bool = False, from_checkpoint: bool = False) -> str:
        job_id = running.job.job_id
        if self.store.get_job(job_id).status == "queued":
            self.store.set_status(job_id, "running")
        running.started_s = time.monotonic()
        self.running[job_id] = running
        self.trainer.add_job(running.job)
        if not (resumed and from_checkpoint):
            hp = running.hyperparameters
            what = "preference pairs" if running.job.objective.name == "dpo" else "sequences"
            self.store.add_event(job_id, "info", f"Fine-tuning job started ({running.job.objective.name}): "
                                 f"{running.job.total_steps} steps, {len(running.job.train)} training and "
                                 f"{len(running.valid)} validation {what}; n_epochs={hp['n_epochs']}, "
                                 f"batch_size={hp['batch_size']}, learning_rate_multiplier="
                                 f"{hp['learning_rate_multiplier']:g}")
        logger.info("fine-tuning job %s %s (%d steps)", job_id, "resumed" if resumed else "started",
                    running.job.total_steps)
        return "running"

    def cancel(self, job_id: str) -> str:
        self.running.pop(job_id, None)
        self.paused.pop(job_id, None)
        self.waiting = [r for r in self.waiting if r.job.job_id != job_id]
        if job_id in self._awaiting_answers:
            self._awaiting_answers.remove(job_id)
        self.trainer.remove_job(job_id)
        self._drop_orphaned_step()
        record = self.store.get_job(job_id)
        if record is not None and record.status in ("validating_files", "queued", "running", "paused"):
            self.store.set_status(job_id, "cancelled")
            self.store.add_event(job_id, "info", "The job was cancelled")
        self._admit_waiting()
        return "cancelled"

    def pause(self, job_id: str) -> str:
        """Stop a queued or running job where it is: no step runs for it until it is resumed. Its state stays in
        memory (a micro-batch of the step in progress is dropped and runs again on resume, so the result is
        that of an unpaused run); at an optimizer-step boundary a checkpoint is also written, from which a
        restarted server resumes it exactly."""
        record = self.store.get_job(job_id)
        if record is None:
            raise ValueError(f"no fine-tuning job {job_id!r}")
        if record.status not in ("queued", "running"):
            raise ValueError(f"fine-tuning job {job_id} is {record.status}; only a queued or running job can be paused")
        running = self.running.pop(job_id, None)
        if running is None:  # waiting for memory: it keeps its built state
            running = next((r for r in self.waiting if r.job.job_id == job_id), None)
            self.waiting = [r for r in self.waiting if r.job.job_id != job_id]
        if job_id in self._awaiting_answers:
            self._awaiting_answers.remove(job_id)
        if running is not None:
            self.paused[job_id] = running  # before the step in progress is dropped: its micro-batch is undone
        self.trainer.remove_job(job_id)
        self._drop_orphaned_step()
        if running is not None:
            if not running.job.in_optimizer_step and job_id not in self.trainer.in_step:
                self._checkpoint(running, {"step": running.job.step})
        self.store.set_status(job_id, "paused")
        step = running.job.step if running is not None else 0
        self.store.add_event(job_id, "info", f"The job was paused at step {step}")
        logger.info("fine-tuning job %s paused at step %d", job_id, step)
        return "paused"

    def resume_job(self, job_id: str) -> str:
        """A paused job goes on exactly where it stopped (from memory, or after a restart from its checkpoint)."""
        record = self.store.get_job(job_id)
        if record is None:
            raise ValueError(f"no fine-tuning job {job_id!r}")
        if record.status != "paused":
            raise ValueError(f"fine-tuning job {job_id} is {record.status}; only a paused job can be resumed")
        self.store.set_status(job_id, "queued")
        self.store.add_event(job_id, "info", "The job was resumed")
        running = self.paused.pop(job_id, None)
        if running is None:  # paused by an earlier server process: from the checkpoint
            return self.submit(job_id, resumed=True)
        if not self._fits(running):
            self.waiting.append(running)
            return "queued"
        self._start(running, resumed=True, from_checkpoint=True)
        logger.info("fine-tuning job %s resumed at step %d", job_id, running.job.step)
        return "running"

    def stats(self) -> dict:
        return {"running_jobs": len(self.running), "paused_jobs": len(self.paused), "waiting_jobs": len(self.waiting),
                "steps": self.num_steps, "slices": self.num_slices}

    # ---- admission: a job starts when its state fits in memory ----------------------------------
    def _used_bytes(self) -> int:
        return sum(job_state_bytes(r.job) for r in (*self.running.values(), *self.paused.values()))

    def _free_bytes(self) -> int:
        if self.memory_limit is not None:
            return self.memory_limit - self._used_bytes()
        return available_memory(self.device) - MEMORY_RESERVE_BYTES  # the running jobs' state is already taken

    def _fits(self, running: RunningJob) -> bool:
        """A job's own state must fit; with nothing else training it always starts (there is nobody to wait for,
        and a job that cannot fit alone fails with the device's own error rather than wait forever)."""
        if not self.running and not self.paused:
            return True
        return job_state_bytes(running.job) <= self._free_bytes()

    def _admit_waiting(self) -> None:
        """After a job leaves: start the waiting ones that fit now, highest priority first, then oldest."""
        for running in sorted(self.waiting, key=lambda r: -r.job.priority):
            if running.job.job_id not in {r.job.job_id for r in self.waiting}:
                continue
            record = self.store.get_job(running.job.job_id)
            if record is None or record.status not in ("queued", "running"):
                self.waiting.remove(running)
                continue
            if self._fits(running):
                self.waiting.remove(running)
                self.store.add_event(running.job.job_id, "info", "Memory is free: the job starts")
                self._start(running)

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
            for job_id in in_step:  # a paused job runs this micro-batch again on resume
                if job_id in self.paused:
                    self.paused[job_id].job.drop_micro_batch()

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
            data = step_metrics(job)
            stop_early = False
            if running.valid and (job.step % running.eval_every == 0 or job.is_finished):
                valid = (yield from self.trainer.evaluate_slices([(job, running.valid)]))[0]
                if self.running.get(job.job_id) is not running:
                    continue  # cancelled or paused while it was being evaluated
                data.update(valid_metrics(job, valid))
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
        method = (record.method or {}).get("type", "supervised")
        return build_job(record.id, self.store.file_path(record.training_file).read_bytes(),
                         self.store.file_path(record.validation_file).read_bytes() if record.validation_file else None,
                         self.tokenizer, self.model_config, lora=record.lora, hyperparameters=record.hyperparameters,
                         seed=record.seed, device=self.device, base_answers=self._base_answers, method=method,
                         priority=record.priority)

    # ---- self-distillation: the base model's own answers, generated in the serving batches ----------
    def _needs_base_answers(self, record: JobRecord) -> bool:
        if (record.method or {}).get("type", "supervised") != "supervised" or self._base_answers is not None:
            return False
        if self_distillation_share(record.lora) <= 0:
            return False
        _, extras = resolve_lora(record.lora)
        if extras.get("template", "chat") != "chat":
            raise ValueError("self_distillation needs the model's own chat template (lora.template 'chat'); set "
                             "lora.self_distillation to 0 for other templates")
        cached = regularization.load_cached(self._answers_path())
        if cached is not None:
            self._base_answers = cached
            return False
        return True

    def _answers_path(self):
        return regularization.cache_path(self.store.root, self.model_key)

    def _await_base_answers(self, record: JobRecord) -> str:
        """Queue the job until the pool exists; start generating it unless that is under way already."""
        self._awaiting_answers.append(record.id)
        if record.status == "queued":
            self.store.set_status(record.id, "running")
        prompts = regularization.REGULARIZATION_PROMPTS
        self.store.add_event(record.id, "info", f"Generating the base model's answers to {len(prompts)} general "
                             "prompts for self-distillation (once per base model)")
        if self._generating is None:
            self._generating = {}
            params = SamplingParams(max_tokens=regularization.DEFAULT_MAX_TOKENS, temperature=0.0)
            for i, prompt in enumerate(prompts):
                text = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                          add_generation_prompt=True)
                ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
                self.engine.add_internal_request(f"{SELF_DISTILLATION_ID}{i}", list(ids), params,
                                                 functools.partial(self._base_answer, i))
            logger.info("generating %d base-model answers for self-distillation", len(prompts))
        return "running"

    def _base_answer(self, index: int, text: str, finish_reason: str | None) -> None:
        assert self._generating is not None
        self._generating[index] = (text, finish_reason)
        prompts = regularization.REGULARIZATION_PROMPTS
        if len(self._generating) < len(prompts):
            return
        answers = [regularization.complete_sentences(text, reason == "length")
                   for text, reason in (self._generating[i] for i in range(len(prompts)))]
        self._base_answers = regularization.as_examples(prompts, answers)
        regularization.save_cached(self._answers_path(), self._base_answers)
        self._generating = None
        logger.info("self-distillation pool ready: %d base-model answers", len(self._base_answers))
        waiting, self._awaiting_answers = self._awaiting_answers, []
        for job_id in waiting:
            self.submit(job_id)

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
        trained = sum(len(s.input_ids) for u in job.train for s in job.objective.expand([u])[0]
                      ) * job.hp.n_epochs
        self.store.set_output(job.job_id, str(folder), trained)
        self._admit_waiting()
        logger.info("fine-tuning job %s finished: %d steps in %.1f s", job.job_id, job.step,
                    time.monotonic() - running.started_s)

    def _fail(self, job_id: str, code: str, message: str) -> None:
        self.running.pop(job_id, None)
        self.trainer.remove_job(job_id)
        self._drop_orphaned_step()
        self.paused.pop(job_id, None)
        if job_id in self._awaiting_answers:
            self._awaiting_answers.remove(job_id)
        record = self.store.get_job(job_id)
        if record is not None and record.status in ("validating_files", "queued", "running", "paused"):
            self.store.set_status(job_id, "failed", error={"code": code, "message": message, "param": None})
            self.store.add_event(job_id, "error", f"The job failed: {message}")
        self.waiting = [r for r in self.waiting if r.job.job_id != job_id]
        self._admit_waiting()
        logger.warning("fine-tuning job %s failed: %s", job_id, message)


MEMORY_RESERVE_BYTES = 1 << 30  # left to serving (KV growth, activations) when no --train-memory is set
ADAM_STATE_BYTES_PER_PARAM = 4 + 4 + 8  # fp32 weight, its gradient, AdamW's two moments


def job_state_bytes(job) -> int:
    """A job's own memory: its LoRA weights, gradients and AdamW moments (fp32), and early stopping's copy of
    the best weights. Activations are not per job: a step runs chunk by chunk (--train-chunk-tokens), so their
    peak is one chunk's whatever the number of jobs."""
    return sum(p.numel() for p in job.params) * ADAM_STATE_BYTES_PER_PARAM


def available_memory(device) -> int:
    """Free memory of the training device: CUDA's free bytes, or the host's MemAvailable."""
    import torch
    if getattr(device, "type", str(device)) == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62  # unknown: no limit


def step_metrics(job) -> dict:
    """An optimizer step's event data: OpenAI's metric names (train_accuracy: token accuracy; for DPO the
    reward accuracy, with the mean margin and rewards beside)."""
    data = {"step": job.step, "train_loss": job.last_train_loss, "learning_rate": job.scheduler.get_last_lr()[0]}
    metrics = job.last_metrics
    if "accuracy" in metrics:
        data["train_accuracy"] = metrics["accuracy"]
    for k in ("margin", "chosen_reward", "rejected_reward"):
        if k in metrics:
            data[f"train_{k}"] = metrics[k]
    return data


def valid_metrics(job, valid: dict) -> dict:
    data = {"valid_loss": valid["loss"]}
    if "accuracy" in valid:
        data["valid_mean_token_accuracy" if job.objective.name == "supervised" else "valid_accuracy"] = valid["accuracy"]
    if "margin" in valid:
        data["valid_margin"] = valid["margin"]
    return data


def create_training_runtime(engine: Any, args: Any) -> TrainingRuntime:
    """The engine's background-work factory (a module-level function, so it crosses to the engine process)."""
    return TrainingRuntime(engine, args)
