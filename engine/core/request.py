"""Request: one generation's token state as the scheduler and runner see it (no text, no torch)."""
from __future__ import annotations

import enum
import time
from collections.abc import Hashable

from loraplex.engine.core.errors import PromptTooLongError
from loraplex.engine.core.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3  # eos, stop token id or stop string
    FINISHED_LENGTH = 4  # max_tokens or max_model_len
    FINISHED_ABORTED = 5  # client went away or asked to cancel

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> str | None:
        return {3: "stop", 4: "length", 5: "abort"}.get(int(self))


class Request:
    """Token-level state of one request. `num_computed_tokens` counts tokens whose K/V are in the
    cache; a step schedules `num_tokens - num_computed_tokens` (or a chunk of it)."""

    __slots__ = ("request_id", "prompt_token_ids", "sampling_params", "eos_token_ids",
                 "arrival_time", "adapter_id", "adapter_version", "output_token_ids",
                 "num_computed_tokens", "status", "stop_reason", "num_preemptions",
                 "first_token_time", "prompt_logprobs", "waiting_for_grammar", "adapter_mix", "waiting_for_adapter")

    def __init__(self, request_id: str, prompt_token_ids: list[int], sampling_params: SamplingParams,
                 eos_token_ids: tuple[int, ...] = (), arrival_time: float | None = None,
                 adapter_id: int = 0, adapter_version: int = 0, adapter_mix: Hashable | None = None) -> None:
        if not prompt_token_ids:
            raise ValueError("prompt must contain at least one token")
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.eos_token_ids = tuple(eos_token_ids)
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        # LoRA seam: 0 is the base model. Salts the prefix-cache hash together with the version.
        self.adapter_id = adapter_id
        self.adapter_version = adapter_version
        # anything more the adapter hook needs to know (a strength, several adapters merged): opaque here, part of
        # the cache salt. adapter_id/version then name its first adapter (scheduling and stats count by it).
        self.adapter_mix = adapter_mix
        self.output_token_ids: list[int] = []
        self.num_computed_tokens = 0
        self.status = RequestStatus.WAITING
        self.stop_reason: int | str | None = None
        self.num_preemptions = 0
        self.first_token_time: float | None = None
        # with sampling_params.prompt_logprobs: one entry per prompt token from the second on, filled as its
        # prefill chunks run (the runner's PromptLogprob; plain data here). A recompute after preemption
        # does not add them again.
        self.prompt_logprobs: list | None = [] if sampling_params.prompt_logprobs is not None else None
        # structured output whose grammar is still compiling (off the step loop): not admitted until it is ready
        self.waiting_for_grammar = False
        # its adapter is still being prepared off the step loop (a merged adapter): not admitted until it is ready
        self.waiting_for_adapter = False

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Prompt logprobs still to compute: such a request reads no cached prefix (its rows are needed)."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt_tokens - 1

    @property
    def cache_salt(self) -> tuple:
        """Prefix-cache salt: LoRA on k/v projections changes cached keys and values."""
        if self.adapter_mix is None:
            return (self.adapter_id, self.adapter_version)
        return (self.adapter_id, self.adapter_version, self.adapter_mix)

    @property
    def is_waiting_off_loop(self) -> bool:
        """A grammar or an adapter is being prepared for it: the scheduler passes it over, blocking nobody."""
        return self.waiting_for_grammar or self.waiting_for_adapter

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, status={self.status.name}, prompt={self.num_prompt_tokens}, "
                f"output={self.num_output_tokens}, computed={self.num_computed_tokens})")


def validate_prompt(prompt_token_ids: list[int], params: SamplingParams, max_model_len: int,
                    vocab_size: int) -> None:
    """A prompt the engine can take: not empty, shorter than the context, every id in the vocabulary (checked at
    the edge, where no torch is imported yet, and again by the engine)."""
    n = len(prompt_token_ids)
    if n == 0:
        raise ValueError("the prompt is empty")
    if n >= max_model_len:
        raise PromptTooLongError(n, params.max_tokens, max_model_len)
    if any(t < 0 or t >= vocab_size for t in prompt_token_ids):
        raise ValueError(f"prompt token ids must be in [0, {vocab_size})")
