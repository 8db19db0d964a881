"""AsyncEngine: one background thread runs the step loop; each request gets an asyncio output queue."""
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
    def __init__(self, engine: LLMEngine, max_queue_len: int = 256) -> None:
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
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._error: BaseException | None = None
        self._stats = engine.stats()

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> "AsyncEngine":
        return cls(LLMEngine.from_engine_args(args), max_queue_len=args.max_queue_len)

    # ---- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="loraplex-engine", daemon=True)
        self._thread.start()

    async def shutdown(self) -> None:
        self._stop.set()
        self._wakeup.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)
            self._thread = None

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

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
        assert self._loop is not None
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


def e_output(request_id: str, num_prompt_tokens: int, error: Exception) -> RequestOutput:
    logger.warning("request %s rejected in the loop: %s", request_id, error)
    return RequestOutput(request_id, "", [], True, num_prompt_tokens, 0, finish_reason="abort")
