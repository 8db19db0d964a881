"""What the engine hands back per request and step: plain data for the HTTP layer to format."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class TokenLogprob:
    token_id: int
    token: str  # the token's own decoded text
    logprob: float
    # the most likely alternatives at this position, best first: (token_id, token text, logprob)
    top_logprobs: list[tuple[int, str, float]] = field(default_factory=list)
    rank: int | None = None  # 1 + how many tokens were more likely (prompt logprobs only)


@dataclass(slots=True)
class RequestOutput:
    """One delta for one request. Concatenating every `text` of a request gives its full output."""
    request_id: str
    text: str  # new text since the previous output of this request
    token_ids: list[int]  # new token ids since the previous output
    finished: bool
    num_prompt_tokens: int
    num_output_tokens: int  # total so far
    logprobs: list[TokenLogprob] | None = None  # one per token in `token_ids`, when asked for
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it
    # with SamplingParams.prompt_logprobs, in the request's first output: one per prompt token from the second on
    prompt_logprobs: list[TokenLogprob] | None = None


@dataclass(slots=True)
class EngineStats:
    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_total_blocks: int
    # the adapter hook's counters (pool pages, residency, loads, evictions, load latencies); None without LoRA
    adapters: dict | None = None
    # bytes held on the device by kind: weights (base model, quantized where it is), kv_cache, lora_pool
    memory_bytes: dict[str, int] | None = None
    # seconds the engine loop has spent in forward steps for requests and in training slices, since it started
    inference_seconds: float = 0.0
    training_seconds: float = 0.0
    # speculative decoding, since start: draft tokens proposed, and those the model confirmed
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0
    # a cluster's ingress: each engine replica's own last report, by replica id (these fields are their sums)
    replicas: dict[str, EngineStats] | None = None

    @property
    def kv_cache_usage(self) -> float:
        return 1.0 - self.num_free_blocks / max(1, self.num_total_blocks)
