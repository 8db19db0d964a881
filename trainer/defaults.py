"""What a job becomes when the client leaves things out: OpenAI's "auto" hyperparameters picked from the
dataset, and the LoRA defaults chosen by the measured sweep (scripts/bench/sweep_fine_tune_defaults.py,
results in the README's "Fine-tuning defaults" section). One function builds a job from a file and the
client's settings, for the server's trainer (trainer/service.py), `loraplex train` and the sweep alike.

Auto rules:
- n_epochs: OpenAI's documented heuristic (its cookbook's data-preparation notebook): 3 epochs, raised so
  that small sets are seen at least MIN_TARGET_EXAMPLES times in all (at most MAX_AUTO_EPOCHS), lowered so
  that big ones stop near MAX_TARGET_EXAMPLES.
- batch_size: about 0.2% of the examples as OpenAI, but at least MIN_AUTO_BATCH (a step of one short
  example wastes a CPU's matrix units) and at most 256.
- learning_rate_multiplier: AUTO_LR_MULTIPLIER of BASE_LEARNING_RATE (the sweep's pick for the LoRA defaults).
- self_distillation: DEFAULT_SELF_DISTILLATION for supervised jobs on the model's chat template.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .data import (
    DatasetStats,
    PackedSequence,
    load_dataset,
    load_preference_dataset,
    parse_examples,
    split_validation,
)
from .job import EarlyStopping, Hyperparams, TrainingJob
from .lora_layers import LoRASpec, make_spec, spec_field_names
from .objectives import DEFAULT_DPO_BETA, DPO, SFT
from .regularization import choose

AUTO = "auto"
BASE_LEARNING_RATE = 2e-4  # learning_rate_multiplier 1.0 trains LoRA at this rate
TARGET_EPOCHS = 3
MIN_TARGET_EXAMPLES = 100
MAX_TARGET_EXAMPLES = 25_000
MAX_AUTO_EPOCHS = 6  # the sweep: OpenAI's cap of 25 over-trains 10-example sets (12 epochs forget the most)
MIN_AUTO_BATCH, MAX_AUTO_BATCH = 4, 256
DEFAULT_MICRO_BATCH_SIZE = 4
DEFAULT_MAX_LENGTH = 1024
HYPERPARAMETER_NAMES = ("n_epochs", "batch_size", "learning_rate_multiplier")
DPO_HYPERPARAMETER_NAMES = HYPERPARAMETER_NAMES + ("beta",)
METHODS = ("supervised", "dpo")
# trainer settings beside LoRASpec's fields in a job's `lora` (see trainer/job_store.py)
EXTRA_NAMES = ("micro_batch_size", "max_length", "packing", "template", "validation_fraction", "warmup_ratio",
               "eval_every", "checkpoint_every", "early_stopping_patience", "self_distillation",
               "self_distillation_near", "self_distillation_kl")
AUTO_LR_MULTIPLIER = 2.0  # the sweep's pick: 4e-4 with the LoRA defaults (trainer.lora_layers.LoRASpec)
DEFAULT_SELF_DISTILLATION = 2.0  # the sweep's pick; share of the training set added as base-model answers (trainer/regularization.py)
DEFAULT_KL = False  # tokens: the sweep measured no gain from the base's whole distributions (README)
DEFAULT_NEAR = True  # half of them the base answers to the prompts most like the training prompts


def to_jsonl(examples: list[dict]) -> bytes:
    return "".join(json.dumps(e) + "\n" for e in examples).encode()


def auto_n_epochs(num_examples: int) -> int:
    if num_examples * TARGET_EPOCHS < MIN_TARGET_EXAMPLES:
        return min(MAX_AUTO_EPOCHS, math.ceil(MIN_TARGET_EXAMPLES / num_examples))
    if num_examples * TARGET_EPOCHS > MAX_TARGET_EXAMPLES:
        return max(1, MAX_TARGET_EXAMPLES // num_examples)
    return TARGET_EPOCHS


def auto_batch_size(num_examples: int) -> int:
    return max(MIN_AUTO_BATCH, min(MAX_AUTO_BATCH, round(num_examples * 0.002)))


def resolve_hyperparameters(given: dict[str, Any] | None, num_examples: int,
                            method: str = "supervised") -> dict[str, Any]:
    """OpenAI's hyperparameters (DPO: and beta) with every absent or "auto" one picked from the training set
    size (DPO: in preference pairs)."""
    names = DPO_HYPERPARAMETER_NAMES if method == "dpo" else HYPERPARAMETER_NAMES
    given = dict(given or {})
    unknown = set(given) - set(names)
    if unknown:
        raise ValueError(f"unknown hyperparameters {sorted(unknown)} (known: {', '.join(names)})")
    auto = {"n_epochs": auto_n_epochs(num_examples), "batch_size": min(auto_batch_size(num_examples), num_examples),
            "learning_rate_multiplier": AUTO_LR_MULTIPLIER, "beta": DEFAULT_DPO_BETA}
    return {k: auto[k] if given.get(k, AUTO) == AUTO else given[k] for k in names}


def resolve_lora(given: dict[str, Any] | None) -> tuple[LoRASpec, dict[str, Any]]:
    """(LoRASpec, or MixLoRASpec with `type: "mixlora"`, from the given fields, the spec's defaults for the
    rest; the given trainer extras)."""
    given = dict(given or {})
    spec_names = set(spec_field_names(given)) | {"type", "expert_lora"}
    unknown = set(given) - spec_names - set(EXTRA_NAMES)
    if unknown:
        raise ValueError(f"unknown lora settings {sorted(unknown)}")
    return make_spec(given), {k: v for k, v in given.items() if k not in spec_names}


@dataclass(slots=True)
class BuiltJob:
    job: TrainingJob
    valid: list
    eval_every: int
    checkpoint_every: int
    early: EarlyStopping
    stats: DatasetStats
    hyperparameters: dict  # resolved: n_epochs, batch_size, learning_rate_multiplier (DPO: beta)
    started_s: float = 0.0  # when the runtime started it (monotonic)


def self_distillation_share(lora: dict | None) -> float:
    """The job's self-distillation share: as given, else the default for jobs on the model's own chat template
    (the base answers are rendered with it) and 0 for the others."""
    lora = lora or {}
    if "self_distillation" in lora:
        share = float(lora["self_distillation"])
    else:
        share = DEFAULT_SELF_DISTILLATION if lora.get("template", "chat") == "chat" else 0.0
    if not 0 <= share <= 4:
        raise ValueError(f"lora.self_distillation must be between 0 and 4; got {share}")
    return share


def build_job(job_id: str, train_data: bytes, valid_data: bytes | None, tokenizer, model_config, *,
              lora: dict | None, hyperparameters: dict | None, seed: int, device: torch.device | str = "cpu",
              base_answers: list[dict] | None = None, method: str = "supervised", priority: int = 0,
              teacher: Callable[[list[PackedSequence]], list[PackedSequence]] | None = None) -> BuiltJob:
    """Tokenize the files and make the TrainingJob; DataError for bad data, ValueError for bad settings.
    `base_answers`: the self-distillation pool (chat examples of the base model's own answers), needed when
    the job's self_distillation share is above 0; a seeded choice of them joins the training set (never the
    validation set: validation measures the user's data). `method`: "supervised" or "dpo" (preference data).
    `teacher` (MultiJobTrainer.with_base_distributions): gives those answers the base model's next-token
    distributions as targets (self_distillation_kl, the default); without it they train on their tokens."""
    if method not in METHODS:
        raise ValueError(f"unknown fine-tuning method {method!r} (expected {', '.join(METHODS)})")
    spec, extras = resolve_lora(lora)
    kw = dict(template=extras.get("template", "chat"), max_length=int(extras.get("max_length", DEFAULT_MAX_LENGTH)),
              packing=bool(extras.get("packing", False)))
    if method == "dpo":
        if kw.pop("packing"):
            raise ValueError("packing does not apply to DPO (each pair's sequences are separate rows)")
        load = lambda data: load_preference_dataset(data, tokenizer, **kw)  # noqa: E731
    else:
        load = lambda data: load_dataset(data, tokenizer, **kw)  # noqa: E731
    train, stats = load(train_data)
    if valid_data is not None:
        valid, _ = load(valid_data)
    else:
        train, valid = split_validation(train, float(extras.get("validation_fraction", 0.1)), seed=seed)
    resolved = resolve_hyperparameters(hyperparameters, len(train), method)
    objective = DPO(float(resolved["beta"])) if method == "dpo" else SFT()
    share = self_distillation_share(lora) if method != "dpo" else 0.0
    if method == "dpo" and (lora or {}).get("self_distillation"):
        raise ValueError("self_distillation applies to supervised fine-tuning (DPO already holds the adapter "
                         "to the base through its reference)")
    if share > 0:
        if base_answers is None:
            raise ValueError("self-distillation needs the base model's answers (base_answers)")
        prompts = [text for e in parse_examples(train_data) if e.messages
                   for text in [" ".join(m["content"] for m in e.messages if m["role"] == "user")]]
        chosen = choose(base_answers, len(train), share, seed, prompts if extras.get("self_distillation_near",
                                                                                        DEFAULT_NEAR) else None)
        if chosen:
            extra, _ = load_dataset(to_jsonl(chosen), tokenizer, **kw)
            if teacher is not None and extras.get("self_distillation_kl", DEFAULT_KL):
                extra = teacher(extra)
            train = train + extra
    batch_size = int(resolved["batch_size"])
    hp = Hyperparams(n_epochs=int(resolved["n_epochs"]), batch_size=batch_size,
                     micro_batch_size=min(batch_size, int(extras.get("micro_batch_size", DEFAULT_MICRO_BATCH_SIZE))),
                     learning_rate=BASE_LEARNING_RATE * float(resolved["learning_rate_multiplier"]),
                     warmup_ratio=float(extras.get("warmup_ratio", 0.0)), seed=int(seed))
    job = TrainingJob(job_id, spec, hp, train, model_config, device, objective=objective, priority=priority)
    return BuiltJob(job, valid, eval_every=int(extras.get("eval_every", 0)) or job.steps_per_epoch,
                    checkpoint_every=int(extras.get("checkpoint_every", 0)) or job.steps_per_epoch,
                    early=EarlyStopping(int(extras.get("early_stopping_patience", 0))), stats=stats,
                    hyperparameters=resolved)
