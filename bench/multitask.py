"""A small multi-task dataset of our own for comparing adapter kinds (MixLoRA vs LoRA, scripts/bench/
eval_mixlora.py): four synthetic tasks with different answer styles, each question multiple choice with four
options, scored by the model's log-likelihood of each option (as the MixLoRA paper scores its commonsense tasks).

- arithmetic: "What is 37 + 45?" -> a number (a rule: evaluation uses new pairs)
- reversal: "Spell 'stone' backwards." -> a made-up-looking string (a rule over held-out words)
- mood: "Label this review with JOY or GLOOM: ..." -> one of two invented labels (a lexicon rule, new reviews)
- velish: "What does the Velish word 'tamo' mean?" -> an English word (a made-up dictionary: evaluation asks
  the same words in other phrasings, so it measures recall of what was taught)

Everything is drawn from `random.Random(seed)`: the same seed gives the same files.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass

TASKS = ("arithmetic", "reversal", "mood", "velish")

_WORDS = ("stone", "river", "candle", "garden", "pocket", "winter", "silver", "harbor", "meadow", "lantern",
          "copper", "basket", "forest", "thunder", "pillow", "orange", "marble", "ladder", "window", "spider",
          "planet", "rocket", "violin", "button", "dragon", "jungle", "pepper", "sunset", "tunnel", "walnut",
          "anchor", "bridge", "castle", "feather", "helmet", "island", "kettle", "mirror", "needle", "saddle")
_GOOD = ("wonderful", "delightful", "excellent", "lovely", "fantastic", "charming", "superb", "pleasant")
_BAD = ("terrible", "awful", "dreadful", "horrible", "miserable", "dismal", "boring", "disappointing")
_THINGS = ("soup", "movie", "hotel", "concert", "book", "service", "game", "trip", "show", "meal")
_VELISH = {"tamo": "river", "kelu": "bread", "sorin": "mountain", "avek": "window", "dru": "friend",
           "mazo": "winter", "pell": "candle", "roka": "horse", "ishen": "silver", "vuna": "garden",
           "telo": "morning", "brisk": "hammer", "olan": "cloud", "zefa": "apple", "quor": "road",
           "nimu": "music", "harl": "stone", "epsa": "mirror", "jova": "island", "lurn": "feather"}
_TEMPLATES = {
    "arithmetic": (["What is {a} + {b}?", "Add {a} and {b}."], ["Compute the sum {a} + {b}."]),
    "reversal": (["Spell '{w}' backwards.", "Reverse the letters of '{w}'."], ["Write '{w}' in reverse order."]),
    "mood": (["Label this review with JOY or GLOOM: {r}", "JOY or GLOOM? {r}"], ["Review: {r} Label (JOY/GLOOM)?"]),
    "velish": (["What does the Velish word '{v}' mean?", "Translate the Velish word '{v}'."],
               ["In English, the Velish '{v}' is which word?"]),
}


@dataclass(frozen=True, slots=True)
class Question:
    task: str
    prompt: str
    options: tuple[str, ...]
    answer: int  # index into options


def _review(rng: random.Random, good: bool) -> str:
    word = rng.choice(_GOOD if good else _BAD)
    return f"The {rng.choice(_THINGS)} was {word}."


def _item(task: str, rng: random.Random, held_out: bool, words: list[str]) -> tuple[str, str, list[str]]:
    """-> (prompt, answer, three distractors)."""
    phrasing = rng.choice(_TEMPLATES[task][1 if held_out else 0])
    if task == "arithmetic":
        a, b = rng.randint(10, 89), rng.randint(10, 89)
        right = a + b
        wrong = rng.sample([right + d for d in (-11, -10, -2, -1, 1, 2, 9, 10, 11)], 3)
        return phrasing.format(a=a, b=b), str(right), [str(w) for w in wrong]
    if task == "reversal":
        w = rng.choice(words)
        right = w[::-1]
        others = [o[::-1] for o in rng.sample([x for x in words if x != w], 2)] + [w]
        return phrasing.format(w=w), right, others
    if task == "mood":
        good = rng.random() < 0.5
        right = "JOY" if good else "GLOOM"
        return phrasing.format(r=_review(rng, good)), right, ["GLOOM" if good else "JOY", "HAPPY", "SAD"]
    v = rng.choice(sorted(_VELISH))
    right = _VELISH[v]
    return phrasing.format(v=v), right, rng.sample([x for x in _VELISH.values() if x != right], 3)


def make_multitask(seed: int = 0, train_per_task: int = 100, eval_per_task: int = 40
                   ) -> tuple[list[dict], list[Question]]:
    """(training examples as chat messages, evaluation questions). Reversal trains on half the words and is
    evaluated on the other half; arithmetic, mood and velish evaluate in phrasings never trained on."""
    rng = random.Random(seed)
    words = list(_WORDS)
    rng.shuffle(words)
    train_words, eval_words = words[:len(words) // 2], words[len(words) // 2:]
    train: list[dict] = []
    questions: list[Question] = []
    for task in TASKS:
        for _ in range(train_per_task):
            prompt, answer, _ = _item(task, rng, held_out=False, words=train_words)
            train.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]})
        for _ in range(eval_per_task):
            prompt, answer, wrong = _item(task, rng, held_out=True, words=eval_words)
            options = [answer, *wrong]
            rng.shuffle(options)
            questions.append(Question(task, prompt, tuple(options), options.index(answer)))
    rng.shuffle(train)
    return train, questions


def to_jsonl(examples: list[dict]) -> bytes:
    return "".join(json.dumps(e) + "\n" for e in examples).encode()
