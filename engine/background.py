"""Background work the engine loop interleaves with inference steps (the trainer, implemented in
loraplex.trainer.service), and the share policy that keeps it from starving live traffic.

The engine imports nothing from trainer/: the server passes a factory (LLMEngine, EngineArgs) -> work.
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable, Protocol


class BackgroundWork(Protocol):
    def has_work(self) -> bool:
        """True while there is a unit to run (e.g. a training job is running)."""

    def run_step(self) -> None:
        """Run one short unit (one slice of a batched training step: a decoder layer of a chunk); never
        raises for a single job's failure. Units should take about as long as an inference step or less:
        the share policy admits them one at a time."""

    def call(self, method: str, args: tuple) -> Any:
        """A control call from the server (methods named train_*)."""

    def stats(self) -> dict:
        """Counters for logs and metrics."""

    def tick(self) -> None:
        """Called on every pass of the engine loop, busy or idle (at least every 0.5 s): cheap unless the work
        has something due (the trainer renews its job leases and claims queued jobs from a shared store)."""


BackgroundFactory = Callable[[Any, Any], BackgroundWork]  # (LLMEngine, EngineArgs) -> work


class SharePolicy:
    """While requests are running or waiting, background work may take at most `share` of the loop's busy
    time (measured over an exponentially decaying window of `window_s`); with no requests, all of it, and
    that idle time is not held against it (the caller records only background time spent under load).
    The window is short (3 s) so that the share holds within seconds of a burst of requests: with 10 s, the
    serving history from before a quiet spell let training take ~30% of the next 15 s of load."""

    def __init__(self, share: float, window_s: float = 3.0, clock: Callable[[], float] = time.monotonic) -> None:
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"--train-share must be in [0, 1]; got {share}")
        self.share, self.window_s, self.clock = share, window_s, clock
        self._inference_s = self._background_s = 0.0
        self._last = clock()

    def _decay(self) -> None:
        now = self.clock()
        factor = math.exp(-(now - self._last) / self.window_s)
        self._inference_s *= factor
        self._background_s *= factor
        self._last = now

    def record(self, inference_s: float = 0.0, background_s: float = 0.0) -> None:
        self._decay()
        self._inference_s += inference_s
        self._background_s += background_s

    def may_run(self, has_requests: bool) -> bool:
        if not has_requests:
            return True
        if self.share <= 0.0:
            return False
        self._decay()
        busy = self._inference_s + self._background_s
        return busy == 0.0 or self._background_s / busy < self.share

    @property
    def background_fraction(self) -> float:
        busy = self._inference_s + self._background_s
        return self._background_s / busy if busy else 0.0
