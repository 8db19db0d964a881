"""`loraplex train CONFIG.yaml`: several LoRA jobs trained together on one base model, no server; each job
writes a PEFT folder (loadable by peft and vLLM unchanged, and by `loraplex serve --lora-modules`).

    model: null                 # a Hugging Face folder or .gguf; null = the default model
    dtype: float32              # float32 | bfloat16
    quantization: none          # none | nf4 | int8 (QLoRA); GPTQ/EXL2 folders are detected
    output_dir: adapters
    max_jobs: 4                 # jobs per batched step
    gradient_checkpointing: false
    jobs:
      - name: pirate
        data: pirate.jsonl      # OpenAI chat JSONL, Alpaca JSON, or raw text
        validation: null        # a file; null = a split of `data` (validation_fraction)
        template: chat          # chat (the model's template) | chatml | alpaca | plain
        max_length: 1024
        packing: false
        eval_every: 0           # optimizer steps between validation runs; 0 = at every epoch's end
        early_stopping_patience: 0   # evaluations without improvement before stopping (the adapter of the
                                     # best validation loss is written); 0 = off: the last one
        method: supervised      # supervised | dpo (data: OpenAI's preference JSONL)
        beta: 0.1               # DPO only
        lora: {r: 8, alpha: 16, dropout: 0.0, target_modules: [q_proj, v_proj], use_rslora: false}
                                # use_dora: true for DoRA; type: mixlora (num_experts, top_k, ...) for a MixLoRA
        hyperparameters: {n_epochs: 3, batch_size: 8, micro_batch_size: 4, learning_rate: 2.0e-4}
    parallel: null              # across processes (trainer/distributed.py): {mode: pipeline | data, stages: N,
                                # balance: auto | [layers per stage], checkpoint_every: 0}
"""
from __future__ import annotations

import logging
import re
import shutil
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from .checkpoint import write_adapter
from .data import load_dataset, load_preference_dataset, split_validation
from .job import EarlyStopping, Hyperparams, TrainingJob
from .lora_layers import LoRASpec, make_spec, spec_field_names
from .multi_job import MultiJobTrainer
from .objectives import DEFAULT_DPO_BETA, DPO

logger = logging.getLogger(__name__)

JOB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
TOP_KEYS = {"model", "dtype", "quantization", "output_dir", "max_jobs", "gradient_checkpointing", "jobs", "device",
            "parallel"}
JOB_KEYS = {"name", "data", "validation", "format", "template", "max_length", "packing", "validation_fraction",
            "eval_every", "early_stopping_patience", "lora", "hyperparameters", "method", "beta"}


@dataclass(slots=True)
class JobPlan:
    job: TrainingJob
    valid: list
    eval_every: int
    early: EarlyStopping
    stopped_early: bool = False
    steps_done: int = 0


def _dataclass_from(cls, values: dict | None, where: str):
    values = dict(values or {})
    known = {f.name for f in fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)} (known: {sorted(known)})")
    if "target_modules" in values:
        values["target_modules"] = tuple(values["target_modules"])
    return cls(**values)


def _lora_spec(given: dict, where: str) -> LoRASpec:
    """A LoRASpec, or a MixLoRASpec with `type: mixlora` (trainer/lora_layers.py make_spec)."""
    known = set(spec_field_names(given)) | {"type", "expert_lora"}
    unknown = set(given) - known
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)} (known: {sorted(known)})")
    return make_spec(given)


def write_peft_folder(folder: Path, job: TrainingJob, base_model: str | None, state: dict | None = None) -> Path:
    """adapter_config.json + adapter_model.safetensors, written to a temp folder and renamed into place."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write_adapter(tmp, job, base_model, state)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def check_config(config: dict[str, Any]) -> list[dict]:
    """The config's jobs, after checking the top-level keys and the job names."""
    unknown = set(config) - TOP_KEYS
    if unknown:
        raise ValueError(f"unknown top-level keys {sorted(unknown)} (known: {sorted(TOP_KEYS)})")
    jobs_cfg = config.get("jobs") or []
    if not jobs_cfg:
        raise ValueError("the config lists no jobs")
    names = [j.get("name") for j in jobs_cfg]
    for name in names:
        if not isinstance(name, str) or not JOB_NAME.match(name):
            raise ValueError(f"job name {name!r} must match {JOB_NAME.pattern}")
    if len(set(names)) != len(names):
        raise ValueError("job names must be unique")
    return jobs_cfg


def model_path_of(config: dict[str, Any]) -> str:
    model_path = config.get("model")
    if model_path is None:
        from loraplex.engine.default_model import ensure_default_model
        model_path = str(ensure_default_model(progress=logger.info))
    return str(model_path)


def load_base(config: dict[str, Any], model_path: str, device: torch.device, parts=None):
    """The frozen base the jobs train on (quantized when the config says so); `parts`: a pipeline stage's
    share of it (engine/loader.py ModelParts). -> (model, model config, dtype)."""
    from loraplex.engine.loader import load_model
    from loraplex.engine.quant import (
        BNB_METHODS,
        QuantConfig,
        quantize_linears,
        use_quantized_kernels,
    )
    dtype = getattr(torch, config.get("dtype", "float32"))
    model, model_config = load_model(model_path, dtype=dtype, device=device, parts=parts)
    quant = QuantConfig(config.get("quantization", "none"))
    if quant.method in BNB_METHODS:
        quantize_linears(model, quant, dtype, device)
    use_quantized_kernels(model, device, dtype)
    return model, model_config, dtype


def build_plans(jobs_cfg: list[dict], base_dir: Path, tokenizer, model_config, device: torch.device
                ) -> dict[str, JobPlan]:
    """Every job of the config with its data read, split and tokenized."""
    plans: dict[str, JobPlan] = {}
    for jc in jobs_cfg:
        unknown = set(jc) - JOB_KEYS
        if unknown:
            raise ValueError(f"job {jc['name']}: unknown keys {sorted(unknown)} (known: {sorted(JOB_KEYS)})")
        method = jc.get("method", "supervised")
        if method not in ("supervised", "dpo"):
            raise ValueError(f"job {jc['name']}: method must be supervised or dpo; got {method!r}")
        if "beta" in jc and method != "dpo":
            raise ValueError(f"job {jc['name']}: beta applies to method dpo")
        kw = dict(template=jc.get("template", "chat"), max_length=int(jc.get("max_length", 1024)))
        if method == "dpo":
            load = lambda data: load_preference_dataset(data, tokenizer, **kw)  # noqa: E731
        else:
            kw.update(fmt=jc.get("format", "auto"), packing=bool(jc.get("packing", False)))
            load = lambda data: load_dataset(data, tokenizer, **kw)  # noqa: E731
        train, stats = load((base_dir / jc["data"]).read_bytes())
        hp = _dataclass_from(Hyperparams, jc.get("hyperparameters"), f"job {jc['name']} hyperparameters")
        if jc.get("validation"):
            valid, _ = load((base_dir / jc["validation"]).read_bytes())
        else:
            train, valid = split_validation(train, float(jc.get("validation_fraction", 0.1)), seed=hp.seed)
        spec = _lora_spec(dict(jc.get("lora") or {}), f"job {jc['name']} lora")
        objective = DPO(float(jc.get("beta", DEFAULT_DPO_BETA))) if method == "dpo" else None
        job = TrainingJob(jc["name"], spec, hp, train, model_config, device, objective=objective)
        plans[job.job_id] = JobPlan(job, valid, int(jc.get("eval_every", 0)) or job.steps_per_epoch,
                                    EarlyStopping(int(jc.get("early_stopping_patience", 0))))
        logger.info("job %s: %d training / %d validation sequences (%s, %d trained tokens, %d dropped), "
                    "%d optimizer steps", job.job_id, len(train), len(valid), stats.format,
                    stats.num_trained_tokens, stats.num_dropped, job.total_steps)
    return plans


def run_config(config: dict[str, Any], base_dir: Path = Path("."), progress: bool = True,
               stats: dict | None = None) -> dict[str, dict]:
    """Train every job of a parsed config in this process; returns {job name: summary}. `stats` gets the run's
    elapsed seconds and trained tokens."""
    from loraplex.engine.llm_engine import load_tokenizer, resolve_device

    jobs_cfg = check_config(config)
    if config.get("parallel"):
        raise ValueError("the config has a parallel section: run it with `loraplex train CONFIG --nproc-per-node N` "
                         "or torchrun ... -m loraplex.trainer.distributed CONFIG")
    model_path = model_path_of(config)
    device = resolve_device(config.get("device", "auto"))
    model, model_config, dtype = load_base(config, model_path, device)
    tokenizer = load_tokenizer(model_path)
    trainer = MultiJobTrainer(model, model_config, dtype, device, max_jobs=int(config.get("max_jobs", 4)),
                              gradient_checkpointing=bool(config.get("gradient_checkpointing", False)))
    out_dir = base_dir / config.get("output_dir", "adapters")
    plans = build_plans(jobs_cfg, base_dir, tokenizer, model_config, device)
    for plan in plans.values():
        trainer.add_job(plan.job)

    bars = progress_bars(plans) if progress else {}
    t0, tokens = time.perf_counter(), 0
    while trainer.has_work:
        for report in trainer.step():
            tokens += report.num_targets
            plan = plans[report.job_id]
            if not report.optimizer_step:
                continue
            if report.job_id in bars:
                bars[report.job_id].update(1)
                bars[report.job_id].set_postfix(loss=f"{plan.job.last_train_loss:.3f}")
            if plan.valid and (report.step % plan.eval_every == 0 or report.finished):
                record_evaluation(plan, trainer.evaluate([(plan.job, plan.valid)])[0]["loss"])
    for bar in bars.values():
        bar.close()
    elapsed = time.perf_counter() - t0
    summary = write_results(plans, out_dir, model_path)
    logger.info("trained %d jobs in %.1f s (%.0f trained tokens/s)", len(plans), elapsed, tokens / max(elapsed, 1e-9))
    if stats is not None:
        stats.update({"mode": "single", "world": 1, "elapsed_s": elapsed, "trained_tokens": tokens})
    return summary


def write_results(plans: dict[str, JobPlan], out_dir: Path, model_path: str,
                  weights: dict[str, dict[str, torch.Tensor]] | None = None) -> dict[str, dict]:
    """Each job's PEFT folder (early stopping's best adapter when it stopped early) and summary; `weights`: the
    tensors to write per job instead of its own (a pipeline gathers them from every stage)."""
    summary = {}
    for name, plan in plans.items():
        best = plan.early.best_weights  # with early stopping on: the adapter of the best validation loss
        tensors = weights[name] if weights is not None else best
        folder = write_peft_folder(out_dir / name, plan.job, model_path, tensors)
        summary[name] = {"path": str(folder), "steps": plan.steps_done or plan.job.step,
                         "train_loss": plan.job.last_train_loss, "valid_loss": plan.early.best_loss_or_none,
                         "stopped_early": plan.stopped_early,
                         "published_step": plan.early.best_step if best is not None else plan.steps_done or plan.job.step}
        logger.info("job %s: %s", name, summary[name])
    return summary


def record_evaluation(plan: JobPlan, loss: float, log: bool = True) -> None:
    """A validation loss of the job's adapter: logged (unless `log` is off: data-parallel ranks other than 0), and
    early stopping's bookkeeping."""
    if log:
        logger.info("job %s step %d: train_loss %.4f valid_loss %.4f", plan.job.job_id, plan.job.step,
                    plan.job.last_train_loss, loss)
    if plan.early.update(loss, plan.job):
        plan.stopped_early, plan.steps_done = True, plan.job.step
        plan.job.step = plan.job.total_steps  # finished: it leaves the batch
        if log:
            logger.info("job %s: early stop at step %d; the adapter of step %d (best valid_loss %.4f) is written",
                        plan.job.job_id, plan.steps_done, plan.early.best_step, plan.early.best_loss)


def progress_bars(plans: dict[str, JobPlan]) -> dict:
    from tqdm.auto import tqdm
    return {name: tqdm(total=p.job.total_steps, desc=name, position=i, unit="step")
            for i, (name, p) in enumerate(plans.items())}


def load_config(path: Path) -> dict:
    import yaml
    config = yaml.safe_load(Path(path).read_text())
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    return config
