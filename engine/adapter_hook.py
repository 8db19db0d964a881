"""AdapterHook: what the engine asks of the adapter layer (implemented by loraplex.adapters.runtime).
The engine imports nothing from adapters/; the server passes a factory that builds the hook."""
from __future__ import annotations

from typing import Any, Callable, Protocol

from loraplex.engine.core.request import Request
from loraplex.engine.layers.forward_batch import ForwardBatch


class AdapterHook(Protocol):
    def add_request(self, request: Request) -> None:
        """A request naming an adapter arrives; raise ValueError if that adapter version is not servable."""

    def admit(self, request: Request) -> bool:
        """Waiting -> running: pin the adapter's weights (may load them); False = not now."""

    def release(self, request: Request, finished: bool) -> None:
        """Running -> preempted (finished=False), or the request ended in any way (finished=True)."""

    def prepare(self, scheduled: list, batch: ForwardBatch) -> None:
        """Before the forward: set the step's per-row adapter metadata (batch.adapter_metadata)."""

    has_pending: bool  # adapters are being prepared off the step loop for waiting requests

    def poll(self, wait_s: float = 0.0) -> list[tuple[str, str]]:
        """Let requests whose adapter is ready be admitted (clears Request.waiting_for_adapter); returns
        (request_id, error) for those whose preparation failed. `wait_s`: block up to that long for one."""

    def call(self, method: str, args: tuple) -> Any:
        """A control call from the server (register/unregister adapters, report residency)."""

    def stats(self) -> dict:
        """Counters for metrics; drained on read where they are per-interval."""


AdapterHookFactory = Callable[[Any, Any], AdapterHook]  # (LLMEngine, EngineArgs) -> hook
