"""Self-distillation data: the base model's own greedy answers to general prompts, mixed into a job's training
set so that the adapter learns its new facts without moving the base's behaviour elsewhere (length, style,
what it knew). The base is already loaded and serving: the answers are generated as ordinary base-model rows
(no adapter) in the engine's batches, once per base model, and cached beside the fine-tuning jobs.

The prompts are general questions and small tasks; none is among the general questions that the defaults'
sweep and tests check preservation on (loraplex.bench.fine_tune_quality.GENERAL_QUESTIONS).
"""
from __future__ import annotations

import hashlib
import json
import math
import random
import re
from pathlib import Path

REGULARIZATION_PROMPTS = (
    "What is the capital of Australia?", "How many planets are in the solar system?",
    "What is photosynthesis?", "Who invented the telephone?", "What is the speed of light?",
    "Name three primary colors.", "What is the tallest mountain on Earth?", "How do airplanes fly?",
    "What is the longest river in the world?", "Why do leaves change color in autumn?",
    "What is the capital of Canada?", "How many bones are in the human body?",
    "What does a thermometer measure?", "Who discovered penicillin?", "What is gravity?",
    "What is the square root of 16?", "How many strings does a violin have?", "What is the capital of India?",
    "What do pandas eat?", "What is the main language spoken in Mexico?", "How does the heart pump blood?",
    "What is an atom?", "Who was Albert Einstein?", "What is the largest desert in the world?",
    "Give me a tip for staying focused while studying.", "Write a short poem about the sea.",
    "Explain what a computer program is in one sentence.", "Suggest a name for a pet dog.",
    "Tell me a fun fact about octopuses.", "What should I pack for a day at the beach?",
    "Describe a sunset in two sentences.", "How do I boil an egg?", "What is a haiku?",
    "Write a sentence using the word 'journey'.", "What are the benefits of drinking water?",
    "Explain why exercise is good for health.", "What is the difference between weather and climate?",
    "How many minutes are in two hours?", "What is 15 minus 7?", "What is 3 times 4?",
    "Translate 'good morning' into French.", "What is the plural of 'mouse'?",
    "Tell me a short story about a brave mouse.", "Continue the story: The door creaked open and",
    "What is the capital of Brazil?", "What are clouds made of?", "Who wrote Pride and Prejudice?",
    "What is the freezing point of water in Celsius?",
)
DEFAULT_MAX_TOKENS = 64
CACHE_FORMAT = 1


def cache_path(root: Path, model_key: str, prompts=REGULARIZATION_PROMPTS, max_tokens: int = DEFAULT_MAX_TOKENS) -> Path:
    """Where the base answers of `model_key` (its path, dtype, quantization) are kept."""
    digest = hashlib.sha256(json.dumps([CACHE_FORMAT, model_key, list(prompts), max_tokens]).encode()).hexdigest()
    return Path(root) / "self_distillation" / f"{digest[:24]}.jsonl"


def load_cached(path: Path) -> list[dict] | None:
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        return None
    return [json.loads(line) for line in lines if line.strip()]


def save_cached(path: Path, examples: list[dict]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(e) + "\n" for e in examples))
    tmp.rename(path)


def complete_sentences(text: str, truncated: bool) -> str:
    """An answer cut by max_tokens ends at its last full sentence (trained with an end of turn, a half
    sentence would teach the adapter to stop mid-sentence); empty when it has none."""
    text = text.strip()
    if not truncated:
        return text
    cut = max(text.rfind(c) for c in ".!?\n")
    return text[:cut + 1].strip() if cut > 0 else ""


def as_examples(prompts, answers: list[str]) -> list[dict]:
    """OpenAI chat examples of (prompt, base answer); empty answers are left out."""
    return [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": a}]}
            for p, a in zip(prompts, answers, strict=True) if a.strip()]


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.lower()))


def _prompt(example: dict) -> str:
    return " ".join(m["content"] for m in example.get("messages", ()) if m.get("role") == "user")


def choose(pool: list, num_train: int, fraction: float, seed: int, train_prompts: list[str] | None = None) -> list:
    """ceil(fraction * num_train) of the pool (all of it at most). With `train_prompts` (the user turns of the
    training set), half are the pool prompts most like them (word overlap: "the capital of Veloria" brings
    "the capital of Australia", whose base answer is what an adapter that learned a made-up capital must not
    change) and the rest a seeded random choice; without, all random."""
    k = min(len(pool), math.ceil(fraction * num_train)) if fraction > 0 else 0
    if not k:
        return []
    rng = random.Random(f"selfdistill:{seed}")
    chosen: list = []
    if train_prompts:
        vocab = [_words(p) for p in train_prompts]

        def likeness(example: dict) -> float:
            words = _words(_prompt(example))
            return max((len(words & v) / max(1, len(words | v)) for v in vocab), default=0.0)
        ranked = sorted(range(len(pool)), key=lambda i: (-likeness(pool[i]), i))
        chosen = [pool[i] for i in ranked[:k // 2]]
    rest = [e for e in pool if e not in chosen]
    return chosen + rng.sample(rest, k - len(chosen))
