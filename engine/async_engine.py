"""AsyncEngine: one loop thread runs the steps; each request gets an asyncio output queue.

The loop runs in its own thread (`start()`), or in the caller's thread (`run_loop()`): the CLI gives
it the main thread and serves HTTP from a second one, because PyTorch's OpenMP parallel regions
are several times slower to enter from a non-main thread (small CPU ops pay it on every call).
"""
from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time

from loraplex.engine.engine_args import EngineArgs
from loraplex.engine.errors import EngineDeadError, QueueFullError
from loraplex.engine.llm_engine import LLMEngine
from loraplex.engine.outputs import EngineStats, RequestOutput
from loraplex.engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class RequestStream:
    """Async iterator of one request's RequestOutput deltas; ends after the finished one."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self.finished = False

    def put(self, item: RequestOutput | BaseException) -> None:
        self._queue.put_nowait(item)

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        if item.finished:
            self.finished = True
        return item


class AsyncEngine:
    def __init__(self, engine: LLMEngine, max_queue_len: int = 256, own_thread: bool = True) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.model_config = engine.model_config
        self.max_model_len = engine.max_model_len
        self.max_queue_len = max_queue_len
        self._max_in_flight = engine.scheduler.scheduler_config.max_num_seqs + max_queue_len
        self._streams: dict[str, RequestStream] = {}
        self._inbox: collections.deque = collections.deque()  # ("add", args) | ("abort", id)
        self._wakeup = threading.Event()
        self._stop = threading.Event()
        self.own_thread = own_thread
        self._thread: threading.Thread | None = None
        self._running = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_known = threading.Event()
        self._error: BaseException | None = None
        self._stats = engine.stats()

    @classmethod
    def from_engine_args(cls, args: EngineArgs, own_thread: bool = True) -> "AsyncEngine":
        return cls(LLMEngine.from_engine_args(args), max_queue_len=args.max_queue_len, own_thread=own_thread)

    # ---- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        """Bind to the running event loop; with own_thread, also start the loop thread."""
        if self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._loop_known.set()
        if self.own_thread:
            self._thread = threading.Thread(target=self._run, name="loraplex-engine", daemon=True)
            self._thread.start()
            while not self._running and self._error is None:
                await asyncio.sleep(0.001)

    def run_loop(self) -> None:
        """Run the step loop in the calling thread until shutdown(); waits for start() first."""
        while not self._loop_known.wait(timeout=0.1):
            if self._stop.is_set():
                return
        self._run()

    def request_stop(self) -> None:
        self._stop.set()
        self._wakeup.set()
        self._loop_known.set()

    async def shutdown(self) -> None:
        self.request_stop()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)
            self._thread = None

    @property
    def is_running(self) -> bool:
        return self._running

    @property
    def is_healthy(self) -> bool:
        return self._error is None and self.is_running

    def stats(self) -> EngineStats:
        return self._stats

    # ---- requests (event-loop thread) -----------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> RequestStream:
        if self._error is not None:
            raise EngineDeadError(f"the engine loop died: {self._error!r}")
        if request_id in self._streams:
            raise ValueError(f"duplicate request id {request_id!r}")
        self.engine.validate_prompt(prompt_token_ids, params)
        if len(self._streams) >= self._max_in_flight:
            raise QueueFullError(self.max_queue_len)
        stream = RequestStream(request_id)
        self._streams[request_id] = stream
        self._inbox.append(("add", (request_id, prompt_token_ids, params, time.monotonic())))
        self._wakeup.set()
        return stream

    def abort(self, request_id: str) -> None:
        if request_id in self._streams:
            self._inbox.append(("abort", request_id))
            self._wakeup.set()

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            if out.finished:
                del self._streams[out.request_id]
            stream.put(out)

    def _fail_all(self, error: BaseException) -> None:
        for stream in self._streams.values():
            stream.put(EngineDeadError(f"the engine loop died: {error!r}"))
        self._streams.clear()

    # ---- the loop (engine thread) ---------------------------------------------------------
    def _drain_inbox(self) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        aborts: list[str] = []
        while self._inbox:
            kind, payload = self._inbox.popleft()
            if kind == "add":
                request_id, prompt, params, arrival = payload
                try:
                    self.engine.add_request(request_id, prompt, params, arrival_time=arrival)
                except ValueError as e:  # validated already; belt and braces
                    outputs.append(e_output(request_id, len(prompt), e))
            else:
                aborts.append(payload)
        if aborts:
            outputs.extend(self.engine.abort_requests(aborts))
        return outputs

    def _run(self) -> None:
        if self._loop is None:  # stopped before start()
            return
        self._running = True
        try:
            while not self._stop.is_set():
                outputs = self._drain_inbox()
                if self.engine.has_unfinished_requests():
                    outputs.extend(self.engine.step())
                self._stats = self.engine.stats()
                if outputs:
                    self._loop.call_soon_threadsafe(self._deliver, outputs)
                if not self.engine.has_unfinished_requests() and not self._inbox:
                    self._wakeup.wait(timeout=0.5)
                    self._wakeup.clear()
        except BaseException as e:  # noqa: BLE001 - the loop must report, not vanish
            logger.exception("engine loop died")
            self._error = e
            self._loop.call_soon_threadsafe(self._fail_all, e)
        finally:
            self._running = False


def e_output(request_id: str, num_prompt_tokens: int, error: Exception) -> RequestOutput:
    logger.warning("request %s rejected in the loop: %s", request_id, error)
    return RequestOutput(request_id, "", [], True, num_prompt_tokens, 0, finish_reason="abort")
