"""Typed engine errors; serve/errors.py maps each to an HTTP status and OpenAI error JSON."""


class EngineError(Exception):
    """Base class of errors the engine raises at a request's edge."""


class PromptTooLongError(EngineError, ValueError):
    def __init__(self, num_prompt_tokens: int, max_tokens: int, max_model_len: int) -> None:
        super().__init__(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the prompt, {max_tokens} "
            f"for the completion). Please reduce the length of the prompt or max_tokens.")
        self.num_prompt_tokens = num_prompt_tokens
        self.max_model_len = max_model_len


class QueueFullError(EngineError):
    def __init__(self, max_queue_len: int, retry_after_s: int = 1) -> None:
        super().__init__(f"the server's request queue is full ({max_queue_len} waiting); retry later")
        self.retry_after_s = retry_after_s


class EngineDeadError(EngineError):
    """The background loop died; the server must report unhealthy."""


class ReplicaFailedError(EngineDeadError):
    """A cluster's engine replica died under a request (serve/remote_engine.py): that request fails, the
    service stays healthy (other replicas serve, Ray starts a new one), and a retry is worth it."""

    message = "The engine replica serving this request failed; retry it (the other replicas keep serving)."
