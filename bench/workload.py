"""The benchmark's workload: which requests, to which model (base or adapter), arriving when.

The same seed gives the same workload everywhere (`loraplex bench serve`, `loraplex bench offline` and the
transformers + peft baselines in scripts/bench/), so their results compare request for request.
- Arrivals: a Poisson process at `request_rate` requests/s (exponential gaps), or all at t=0 (rate inf).
- Adapter popularity: uniform, or a power law p(i) ~ (i + 1)^-alpha over the listed adapters (S-LoRA's
  skewed workloads); `base_fraction` of the requests go to the base model.
- Lengths: synthetic prompts of about `input_len` words and `output_len` tokens, each drawn uniformly in
  [len * (1 - range_ratio), len * (1 + range_ratio)], or prompts (and optional max_tokens) from a JSONL file.
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

# common one-token English words: a synthetic prompt of n words is about n tokens for BPE vocabularies
WORDS = ("the of and to in is that for it as was with be by on not he this are or his from at which but have "
         "an had they you were their one all we can her has there been if more when will would who so no time "
         "about many then them these some what out other into only new could its also two first may people any "
         "over such our most after year work where well way even because good each just those how both made "
         "city part same world state under long day water").split()


@dataclass(frozen=True, slots=True)
class BenchRequest:
    index: int
    arrival_s: float  # seconds after the start of the run
    model: str  # the base model's name or an adapter's
    prompt: str | None  # completions endpoint
    messages: list[dict] | None  # chat endpoint
    max_tokens: int


@dataclass(frozen=True, slots=True)
class WorkloadSpec:
    model: str
    adapters: tuple[str, ...] = ()
    num_prompts: int = 64
    request_rate: float = math.inf
    adapter_dist: str = "uniform"  # uniform | powerlaw
    powerlaw_alpha: float = 1.0
    base_fraction: float = 0.0
    input_len: int = 64
    output_len: int = 64
    range_ratio: float = 0.0
    dataset: str | None = None  # JSONL: {"prompt": ...} or {"messages": [...]}, optional "max_tokens"
    endpoint: str = "completions"  # completions | chat (a dataset with messages is always chat)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_prompts < 1:
            raise ValueError("--num-prompts must be at least 1")
        if not self.request_rate > 0:
            raise ValueError("--request-rate must be positive (inf: all at once)")
        if self.adapter_dist not in ("uniform", "powerlaw"):
            raise ValueError("--adapter-dist must be uniform or powerlaw")
        if self.powerlaw_alpha < 0:
            raise ValueError("--powerlaw-alpha must be non-negative")
        if not 0.0 <= self.base_fraction <= 1.0:
            raise ValueError("--base-fraction must be in [0, 1]")
        if self.input_len < 1 or self.output_len < 1 or not 0.0 <= self.range_ratio < 1.0:
            raise ValueError("--input-len and --output-len must be positive and --range-ratio in [0, 1)")
        if self.endpoint not in ("completions", "chat"):
            raise ValueError("--endpoint must be completions or chat")


def arrival_times(num: int, rate: float, rng: random.Random) -> list[float]:
    """Poisson arrivals: exponential gaps of mean 1/rate, the first at 0; rate inf: all at 0."""
    if math.isinf(rate):
        return [0.0] * num
    times, t = [], 0.0
    for _ in range(num):
        times.append(t)
        t += rng.expovariate(rate)
    return times


def adapter_weights(num: int, dist: str, alpha: float) -> list[float]:
    """Probabilities of picking adapter i (listed order = popularity order for the power law)."""
    raw = [1.0] * num if dist == "uniform" else [(i + 1) ** -alpha for i in range(num)]
    total = sum(raw)
    return [w / total for w in raw]


def pick_models(spec: WorkloadSpec, rng: random.Random) -> list[str]:
    weights = adapter_weights(len(spec.adapters), spec.adapter_dist, spec.powerlaw_alpha) if spec.adapters else []
    out = []
    for _ in range(spec.num_prompts):
        if not spec.adapters or rng.random() < spec.base_fraction:
            out.append(spec.model)
        else:
            out.append(rng.choices(spec.adapters, weights)[0])
    return out


def _length(mean: int, ratio: float, rng: random.Random) -> int:
    low, high = max(1, int(mean * (1 - ratio))), max(1, int(mean * (1 + ratio)))
    return rng.randint(low, high)


def load_dataset(path: str | Path) -> list[dict]:
    rows = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from None
        if not isinstance(row, dict) or not (isinstance(row.get("prompt"), str) or isinstance(row.get("messages"), list)):
            raise ValueError(f"{path}:{n}: each line needs a \"prompt\" string or a \"messages\" list")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no prompts")
    return rows


def build_workload(spec: WorkloadSpec) -> list[BenchRequest]:
    rng = random.Random(spec.seed)
    arrivals = arrival_times(spec.num_prompts, spec.request_rate, rng)
    models = pick_models(spec, rng)
    rows = load_dataset(spec.dataset) if spec.dataset else None
    out = []
    for i in range(spec.num_prompts):
        max_tokens = _length(spec.output_len, spec.range_ratio, rng)
        if rows is not None:
            row = rows[i % len(rows)]
            max_tokens = int(row.get("max_tokens", max_tokens))
            prompt, messages = row.get("prompt"), row.get("messages")
        else:
            text = " ".join(rng.choice(WORDS) for _ in range(_length(spec.input_len, spec.range_ratio, rng)))
            prompt, messages = text, None
        if messages is None and spec.endpoint == "chat":
            prompt, messages = None, [{"role": "user", "content": prompt}]
        out.append(BenchRequest(i, arrivals[i], models[i], prompt, messages, max_tokens))
    return out
