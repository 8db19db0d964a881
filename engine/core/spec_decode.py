"""Prompt-lookup (n-gram) speculative decoding: the drafting and the acceptance rule, pure Python.

A decoding request whose last n tokens (n from `prompt_lookup_max` down to `prompt_lookup_min`) occurred earlier in
its prompt or output proposes the tokens that followed that earlier occurrence (up to `num_speculative_tokens`).
The step feeds the last token and the draft as one chunk; every row's logits are scored by greedy argmax, and the
draft is accepted up to its first disagreement, plus the model's own token after it (the correction, or a bonus
token when all were accepted). Rows are computed exactly as single decode rows are (the engine's batch
invariance), so the output is token for token the one plain greedy decoding gives, only fewer steps.

Only requests for which greedy argmax is the whole sampling rule speculate (see `can_speculate`); the rest of a
batch decodes as usual beside them. vLLM's `--speculative-config '{"method": "ngram", ...}'` spelling.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from loraplex.engine.core.sampling_params import SamplingParams

MAX_SPECULATIVE_TOKENS = 16
MAX_LOOKUP = 16
DEFAULT_LOOKUP_MIN = 2


@dataclass(frozen=True, slots=True)
class SpeculativeConfig:
    method: str = "ngram"
    num_speculative_tokens: int = 4
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = DEFAULT_LOOKUP_MIN
    disable_by_batch_size: int | None = None  # no drafts while this many requests (or more) are running

    def __post_init__(self) -> None:
        if self.method != "ngram":
            raise ValueError(f"speculative method {self.method!r} is not supported (ngram is: prompt lookup)")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (
                self.num_speculative_tokens, self.prompt_lookup_max, self.prompt_lookup_min)):
            raise ValueError("num_speculative_tokens, prompt_lookup_max and prompt_lookup_min must be integers")
        if not 1 <= self.num_speculative_tokens <= MAX_SPECULATIVE_TOKENS:
            raise ValueError(f"num_speculative_tokens must be in [1, {MAX_SPECULATIVE_TOKENS}]")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max <= MAX_LOOKUP:
            raise ValueError(f"need 1 <= prompt_lookup_min <= prompt_lookup_max <= {MAX_LOOKUP}")
        if self.disable_by_batch_size is not None and (not isinstance(self.disable_by_batch_size, int)
                                                       or self.disable_by_batch_size < 1):
            raise ValueError("disable_by_batch_size must be a positive integer")

    @classmethod
    def parse(cls, value: str | dict | None) -> SpeculativeConfig | None:
        """From vLLM's JSON (or a dict): {"method": "ngram", "num_speculative_tokens": K, "prompt_lookup_max": N,
        "prompt_lookup_min": M, "disable_by_batch_size": B}; None or "" -> None (off). Unknown keys are an error,
        not ignored."""
        if value is None or value == "" or value == {}:
            return None
        data = json.loads(value) if isinstance(value, str) else dict(value)
        if not isinstance(data, dict):
            raise ValueError("the speculative config must be a JSON object")
        unknown = set(data) - {"method", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min",
                               "disable_by_batch_size"}
        if unknown:
            raise ValueError(f"unknown speculative config keys: {sorted(unknown)}")
        if "prompt_lookup_max" in data and "prompt_lookup_min" not in data:
            lookup_max = data["prompt_lookup_max"]
            data["prompt_lookup_min"] = min(DEFAULT_LOOKUP_MIN, lookup_max) if isinstance(lookup_max, int) else lookup_max
        return cls(**data)


def argmax_decides(params: SamplingParams) -> bool:
    """Greedy argmax of the raw logits is the whole sampling rule: no sampling, penalties, biases, banned words,
    grammar or logprobs to report per position (a minimum length is the callers' to judge)."""
    return (params.is_greedy and params.logprobs is None and params.repetition_penalty == 1.0
            and params.presence_penalty == 0.0 and params.frequency_penalty == 0.0 and not params.logit_bias
            and not params.bad_words_token_ids and params.structured_output is None)


def can_speculate(params: SamplingParams) -> bool:
    """Greedy argmax decides every token (`argmax_decides`) and no minimum length suppresses stop tokens."""
    return argmax_decides(params) and params.min_tokens == 0


def can_multi_step(request) -> bool:
    """Greedy argmax decides the request's next tokens, whatever they are: `argmax_decides`, and a minimum length,
    if any, already reached (it suppresses nothing any more)."""
    return argmax_decides(request.sampling_params) and request.num_output_tokens >= request.sampling_params.min_tokens


def ngram_draft(tokens: list[int], max_tokens: int, lookup_max: int, lookup_min: int) -> list[int]:
    """Up to `max_tokens` tokens that followed the latest earlier occurrence of the longest suffix of `tokens`
    (lookup_max down to lookup_min tokens long); [] when no suffix recurs."""
    n_tokens = len(tokens)
    if max_tokens <= 0:
        return []
    for n in range(min(lookup_max, n_tokens - 1), lookup_min - 1, -1):
        suffix = tokens[n_tokens - n:]
        first = suffix[0]
        # latest start i < n_tokens - n with tokens[i:i + n] == suffix, scanning backwards
        i = n_tokens - n - 1
        while i >= 0:
            if tokens[i] == first and tokens[i:i + n] == suffix:
                return tokens[i + n:i + n + max_tokens]
            i -= 1
    return []


MAX_BACKOFF = 16


class Backoff:
    """Per request: after a draft the model rejected outright, skip drafting for 1, 2, 4 ... MAX_BACKOFF decode
    steps; any accepted token resets it. Text that does not repeat its context then costs almost no extra rows,
    text that does keeps drafting every step."""

    __slots__ = ("skip", "length")

    def __init__(self) -> None:
        self.skip = 0
        self.length = 0

    def ready(self) -> bool:
        if self.skip > 0:
            self.skip -= 1
            return False
        return True

    def record(self, accepted: int) -> None:
        if accepted:
            self.length = 0
        else:
            self.length = min(MAX_BACKOFF, max(1, 2 * self.length))
            self.skip = self.length


def accepted_prefix(draft: list[int], greedy: list[int]) -> int:
    """How many draft tokens the model's greedy tokens confirm: greedy[j] is its token after draft[:j]."""
    a = 0
    while a < len(draft) and greedy[a] == draft[a]:
        a += 1
    return a
