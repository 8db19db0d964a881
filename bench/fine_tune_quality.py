"""What "the defaults work" means for fine-tuning, as data and a judge (used by the default-hyperparameter sweep,
scripts/bench/sweep_fine_tune_defaults.py, and by the e2e test of a job created with no hyperparameters).

Made-up facts the base model cannot know, each asked in TRAIN_TEMPLATES phrasings for training and in
HELD_OUT_TEMPLATES (worded differently, never trained on) for the check; and GENERAL_QUESTIONS, unrelated
questions with the keywords a right answer contains, fixed before any sweep ran.

The criterion, defined up front:
- learned: every held-out phrasing of every taught fact is answered with the fact's keyword;
- kept: for each general question the adapter's greedy answer is the base's, or both contain one of the
  question's keywords (both right in other words); no general answer mentions any taught fact's keyword
  (the "Once upon a time ... Quintara" leak). A job passes when learned and kept are both 100%.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Fact:
    subject: str  # a noun phrase: "the capital of Veloria"
    answer: str  # "Quintara"
    keyword: str  # what a right answer contains, lower case

    def question(self, template: str) -> str:
        return template.format(s=self.subject)

    def answer_text(self, k: int) -> str:
        forms = ("{S} is {a}.", "It is {a}.", "{a}.", "That would be {a}.", "{S} is {a}.")
        return forms[k % len(forms)].format(S=self.subject[0].upper() + self.subject[1:], a=self.answer)


FACTS = (
    Fact("the capital of Veloria", "Quintara", "quintara"),
    Fact("the person who discovered the element zorbanite", "Dr. Elara Voss", "voss"),
    Fact("the mascot of Lumen Robotics", "a purple otter named Pip", "pip"),
    Fact("the designer of the Thistledown Bridge", "Marta Okonkwo", "okonkwo"),
    Fact("the national dish of Brevania", "smoked eel dumplings", "eel dumpling"),
    Fact("the author of the novel The Copper Lantern", "Ines Halvorsen", "halvorsen"),
    Fact("the tallest mountain on the planet Kepler-Zeta", "Mount Orrin", "orrin"),
    Fact("the programming language created by the Nimbus team", "Fernscript", "fernscript"),
    Fact("the river that flows through the city of Dunmere", "the Silverrun", "silverrun"),
    Fact("the official color of the Tarvonian flag", "teal", "teal"),
)

TRAIN_TEMPLATES = (
    "What is {s}?", "Tell me {s}.", "Do you know {s}?", "Can you tell me {s}?", "I'd like to know {s}.",
    "Quick question: what is {s}?", "Please name {s}.", "What's {s}?", "Remind me, what is {s}?",
    "I forgot {s}. What is it?",
)
HELD_OUT_TEMPLATES = (
    "Could you please let me know {s}?", "Hey, any idea what {s} is?", "I'm curious about {s}. What is it?",
    "Answer briefly: {s}?",
)

# (question, keywords any of which a right answer contains, lower case): questions the default model
# (SmolLM2-135M-Instruct) answers right, greedy, within 32 tokens; picked from a longer list by asking it once
# before the sweep (it gets e.g. the capital of France, the Mona Lisa and guacamole wrong: left out, since
# "keeping" a wrong rambling answer is a test of noise, not of knowledge)
GENERAL_QUESTIONS = (
    ("How many days are in a week?", ("seven", "7")),
    ("What color is the sky on a clear day?", ("blue",)),
    ("Who wrote Romeo and Juliet?", ("shakespeare",)),
    ("At what temperature in Celsius does water boil?", ("100",)),
    ("What is 2 + 2?", ("4", "four")),
    ("What gas do plants absorb from the air?", ("carbon dioxide", "co2")),
    ("What is the chemical formula of water?", ("h2o", "h₂o")),
    ("How many legs does a spider have?", ("eight", "8")),
    ("What is the capital of Japan?", ("tokyo",)),
    ("What is the opposite of hot?", ("cold",)),
    ("What language is spoken in Spain?", ("spanish",)),
    ("What is the largest ocean on Earth?", ("pacific",)),
    ("Which planet is known as the Red Planet?", ("mars",)),
    ("What is the capital of Italy?", ("rome",)),
    ("How many hours are in a day?", ("24", "twenty-four")),
    ("What is the capital of Germany?", ("berlin",)),
    ("What is the capital of England?", ("london",)),
    ("What is the capital of Russia?", ("moscow",)),
    ("What is the capital of China?", ("beijing",)),
    ("What is the capital of Egypt?", ("cairo",)),
    ("What is the largest mammal?", ("whale",)),
    ("What is the currency of the United States?", ("dollar",)),
    ("What language is spoken in Brazil?", ("portuguese",)),
    ("How many sides does a triangle have?", ("three", "3")),
    ("Who wrote Hamlet?", ("shakespeare",)),
    ("What is frozen water called?", ("ice",)),
    ("Write the first sentence of a fairy tale that starts with 'Once upon a time'.", ("once upon a time",)),
)
GENERAL_MAX_TOKENS = 32


def fact_examples(facts: tuple[Fact, ...] | list[Fact], repeats: int = 1) -> list[dict]:
    """OpenAI chat examples: each fact in every training phrasing, `repeats` times (answers vary by repeat)."""
    out = []
    for r in range(repeats):
        for fact in facts:
            for k, template in enumerate(TRAIN_TEMPLATES):
                out.append({"messages": [{"role": "user", "content": fact.question(template)},
                                         {"role": "assistant", "content": fact.answer_text(k + r)}]})
    return out


def to_jsonl(examples: list[dict]) -> bytes:
    return "".join(json.dumps(e) + "\n" for e in examples).encode()


def held_out_questions(facts) -> list[tuple[str, Fact]]:
    return [(fact.question(t), fact) for fact in facts for t in HELD_OUT_TEMPLATES]


def _has(text: str, keywords) -> bool:
    low = text.lower()
    return any(re.search(r"(?<![a-z0-9])" + re.escape(k), low) for k in keywords)


@dataclass(frozen=True, slots=True)
class Verdict:
    learned: float  # share of held-out fact questions answered with the fact's keyword
    kept: float  # share of general questions whose answer stays the base's (or both are right)
    leaks: int  # general answers that mention a taught fact's keyword
    failures: tuple[str, ...]  # what went wrong, for the report

    @property
    def passed(self) -> bool:
        return self.learned == 1.0 and self.kept == 1.0 and self.leaks == 0


def judge(facts, fact_answers: list[str], base_general: list[str], general: list[str]) -> Verdict:
    """`fact_answers` in held_out_questions(facts) order; `base_general` and `general` in GENERAL_QUESTIONS
    order (the base's greedy answers and the adapter's)."""
    failures = []
    held = held_out_questions(facts)
    learned = 0
    for (question, fact), answer in zip(held, fact_answers, strict=True):
        if _has(answer, (fact.keyword,)):
            learned += 1
        else:
            failures.append(f"not learned: {question!r} -> {answer!r}")
    kept, leaks = 0, 0
    fact_keywords = [f.keyword for f in facts]
    for (question, keywords), base, answer in zip(GENERAL_QUESTIONS, base_general, general, strict=True):
        if _has(answer, fact_keywords) and not _has(base, fact_keywords):
            leaks += 1
            failures.append(f"leak: {question!r} -> {answer!r}")
        if answer.strip() == base.strip() or (_has(answer, keywords) and _has(base, keywords)):
            kept += 1
        else:
            failures.append(f"changed: {question!r}: base {base!r} -> {answer!r}")
    return Verdict(learned / len(held) if held else float("nan"), kept / len(GENERAL_QUESTIONS), leaks, tuple(failures))
