"""AsyncEngine: the asyncio face of the engine core; each request gets an output queue.

The core (engine/engine_core.py) runs the step loop in a child process (the server's default) or
in a thread of this process. Either way this class validates at the edge, bounds the queue, and
routes each step's outputs to the per-request streams on the event loop.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from loraplex.engine.core.errors import EngineDeadError, QueueFullError
from loraplex.engine.core.outputs import EngineStats, RequestOutput
from loraplex.engine.core.request import validate_prompt
from loraplex.engine.core.sampling_params import SamplingParams
from loraplex.engine.engine_args import EngineArgs
from loraplex.engine.engine_core import ProcessCore, ThreadCore

if TYPE_CHECKING:  # the server's process imports torch only once the engine process is on its way
    from loraplex.engine.adapter_hook import AdapterHookFactory
    from loraplex.engine.background import BackgroundFactory

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
    def __init__(self, core: ThreadCore | ProcessCore, max_queue_len: int = 256) -> None:
        self.core = core
        self.tokenizer = core.tokenizer
        self.model_config = core.model_config
        self.max_model_len = core.max_model_len
        self.max_queue_len = max_queue_len
        self._max_in_flight = core.max_num_seqs + max_queue_len
        self._streams: dict[str, RequestStream] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._error: BaseException | None = None
        self._stats: EngineStats = core.initial_stats

    @classmethod
    def from_engine_args(cls, args: EngineArgs, in_process: bool = False,
                         hook_factory: AdapterHookFactory | None = None,
                         background_factory: BackgroundFactory | None = None) -> "AsyncEngine":
        """in_process: run the loop in a thread here instead of a child process. hook_factory: builds
        the adapter hook next to the model (a module-level function, so it can cross to the child)."""
        if in_process:
            from loraplex.engine.llm_engine import LLMEngine
            core = ThreadCore(LLMEngine.from_engine_args(args, hook_factory, background_factory), args.train_share,
                              args.stream_interval_ms)
        else:
            core = ProcessCore(args, hook_factory, background_factory=background_factory)
        return cls(core, max_queue_len=args.max_queue_len)

    # ---- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        if self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        loop = self._loop

        def emit(outputs: list[RequestOutput], stats: EngineStats | None) -> None:  # core's thread
            if stats is not None:  # None: the core sends them with some steps only (engine_core.STATS_INTERVAL_S)
                self._stats = stats
            loop.call_soon_threadsafe(self._deliver, outputs)

        def on_error(error: BaseException) -> None:  # core's thread
            self._error = error
            loop.call_soon_threadsafe(self._fail_all, error)

        self.core.start(emit, on_error)

    async def shutdown(self) -> None:
        await asyncio.to_thread(self.core.shutdown)

    @property
    def is_running(self) -> bool:
        return self._loop is not None and self.core.is_alive()

    @property
    def is_healthy(self) -> bool:
        return self._error is None and self.is_running

    def stats(self) -> EngineStats:
        return self._stats

    # ---- requests (event-loop thread) -----------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    adapter: tuple | None = None) -> RequestStream:
        """`adapter`: (adapter_id, version) registered with `call("register_adapter", ...)`; None: base."""
        if self._error is not None or (self._loop is not None and not self.core.is_alive()):
            raise EngineDeadError(f"the engine loop died: {self._error or 'its process is gone'}")
        if request_id in self._streams:
            raise ValueError(f"duplicate request id {request_id!r}")
        validate_prompt(prompt_token_ids, params, self.max_model_len, self.model_config.vocab_size)
        if len(self._streams) >= self._max_in_flight:
            raise QueueFullError(self.max_queue_len)
        stream = RequestStream(request_id)
        self._streams[request_id] = stream
        self.core.add(request_id, prompt_token_ids, params, time.monotonic(), adapter)
        return stream

    async def call(self, method: str, *args):
        """A control call run by the engine loop between steps (adapter registration and state)."""
        if self._error is not None:
            raise EngineDeadError(f"the engine loop died: {self._error}")
        return await asyncio.wrap_future(self.core.call(method, args))

    def abort(self, request_id: str) -> None:
        if request_id in self._streams:
            self.core.abort(request_id)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            if out.finished:
                del self._streams[out.request_id]
            stream.put(out)

    def _fail_all(self, error: BaseException) -> None:
        logger.error("engine failed: %s", error)
        for stream in self._streams.values():
            stream.put(EngineDeadError(f"the engine loop died: {error!r}"))
        self._streams.clear()
