"""The engine core: LLMEngine's step loop fed by an inbox of adds and aborts, run in a thread of
this process (ThreadCore) or in the main thread of a process of its own (ProcessCore).

The server uses ProcessCore, as vLLM v1 does: the HTTP process's Python work then never holds the
GIL the step loop needs between torch ops, and the loop runs on a main thread, where PyTorch's
OpenMP parallel regions are several times cheaper to enter than from a secondary thread.
Messages cross an OS pipe between two processes of ours (pickled engine dataclasses; nothing a
client sent is ever unpickled: prompts arrive as token ids and validated SamplingParams).
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import importlib
import itertools
import logging
import multiprocessing
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from loraplex.engine.background import SharePolicy
from loraplex.engine.core.outputs import EngineStats, RequestOutput
from loraplex.engine.core.sampling_params import SamplingParams
from loraplex.engine.engine_args import EngineArgs

if TYPE_CHECKING:  # imported where it runs: the server's process spawns the engine's before it imports torch
    from loraplex.engine.llm_engine import LLMEngine

logger = logging.getLogger(__name__)

Emit = Callable[[list[RequestOutput], "EngineStats | None"], None]  # None: the stats have not changed enough
STATS_INTERVAL_S = 0.1  # while tokens stream, the stats go out with the outputs at most this often
Reply = Callable[[int, bool, Any], None]  # (call id, ok, result or exception)
Adapter = tuple | None  # (adapter_id, version) or (adapter_id, version, mix); None is the base model


class StepLog:
    """Logs throughput every `interval_s` while there is work, as vLLM's engine does."""

    def __init__(self, interval_s: float = 5.0) -> None:
        self.interval_s = interval_s
        self._start = time.monotonic()
        self.num_steps = self.num_generated = 0
        self.busy_s = 0.0
        self.background_s, self.background_max_s, self.num_background = 0.0, 0.0, 0
        self.policy_fraction = 0.0  # the share policy's view after the last slice

    def record_background(self, slice_s: float, policy_fraction: float) -> None:
        """One slice of background work (training), shown on the next line."""
        self.policy_fraction = policy_fraction
        self.num_background += 1
        self.background_s += slice_s
        self.background_max_s = max(self.background_max_s, slice_s)

    def record(self, step_s: float, num_generated: int, stats: Callable[[], EngineStats]) -> None:
        """`stats` is only called when a line is due (it is not free with adapters: pool counters)."""
        self.num_steps += 1
        self.num_generated += num_generated
        self.busy_s += step_s
        elapsed = time.monotonic() - self._start
        if elapsed < self.interval_s:
            return
        now = stats()
        training = "" if not self.num_background else (
            f", training {100 * self.background_s / elapsed:.0f}% of the time ({self.num_background} slices, "
            f"max {1000 * self.background_max_s:.0f} ms, policy {100 * self.policy_fraction:.0f}%)")
        logger.info("generation %.1f tok/s, %d steps (mean %.1f ms), running %d, waiting %d, KV cache %.1f%%%s",
                    self.num_generated / elapsed, self.num_steps, 1000 * self.busy_s / self.num_steps,
                    now.num_running, now.num_waiting, 100 * now.kv_cache_usage, training)
        self.__init__(self.interval_s)


def merge_outputs(older: RequestOutput, newer: RequestOutput) -> RequestOutput:
    """One delta carrying both (same request, `older` first): texts, tokens and their logprobs joined; the counts,
    the finish and its reason the newer's; the prompt's logprobs from whichever has them (only a first output)."""
    logprobs = None if older.logprobs is None and newer.logprobs is None else \
        [*(older.logprobs or ()), *(newer.logprobs or ())]
    return RequestOutput(newer.request_id, older.text + newer.text, older.token_ids + newer.token_ids, newer.finished,
                         newer.num_prompt_tokens, newer.num_output_tokens, logprobs, newer.finish_reason,
                         newer.stop_reason, older.prompt_logprobs if older.prompt_logprobs is not None
                         else newer.prompt_logprobs)


class OutputCoalescer:
    """Streams each request's deltas at most once per `interval_s` (`--stream-interval-ms`): a delta that comes
    sooner after the request's last delivered one is held and merged with the next. A request's first output (its
    time to first token) and its last (finished) go out at once; `due()` releases what has waited its interval even
    when no new delta comes (a request held back by others' prefill). At batch 1 every streamed delta costs the HTTP
    process a wake-up, a pipe message, a JSON chunk and a socket write (~0.3-0.4 ms of CPU here, taken from the
    engine's cores on a small machine); a few tokens per delta cost it the same once. Time per output token and the
    tokens themselves are unchanged; tokens arrive in small groups instead of one by one. 0: every delta at once."""

    def __init__(self, interval_s: float) -> None:
        if interval_s < 0:
            raise ValueError(f"the stream interval must be >= 0; got {interval_s}")
        self.interval_s = interval_s
        self._held: dict[str, RequestOutput] = {}
        self._last: dict[str, float] = {}  # request id -> when its last delta went out (running requests only)

    def __len__(self) -> int:
        return len(self._held)

    def add(self, outputs: list[RequestOutput], now: float) -> list[RequestOutput]:
        """The outputs to deliver now, in order; the rest are held."""
        if self.interval_s <= 0:  # nothing is ever held
            return outputs
        ready = []
        for out in outputs:
            held = self._held.pop(out.request_id, None)
            if held is not None:
                out = merge_outputs(held, out)
            last = self._last.get(out.request_id)
            if out.finished:
                self._last.pop(out.request_id, None)
                ready.append(out)
            elif last is None or now - last >= self.interval_s:
                self._last[out.request_id] = now
                ready.append(out)
            else:
                self._held[out.request_id] = out
        return ready

    def due(self, now: float) -> list[RequestOutput]:
        """Held deltas whose interval has passed."""
        ready = [out for rid, out in self._held.items() if now - self._last[rid] >= self.interval_s]
        for out in ready:
            del self._held[out.request_id]
            self._last[out.request_id] = now
        return ready

    def release_all(self) -> list[RequestOutput]:
        """Everything held (the engine has nothing left to run: nothing would follow them)."""
        ready, self._held = list(self._held.values()), {}
        self._last.clear()
        return ready


class EngineLoop:
    """Owns an LLMEngine; `run()` steps it until `stop()`, draining adds, aborts and control calls
    (adapter registration) between steps, so they never race a forward pass."""

    def __init__(self, engine: LLMEngine, reply: Reply | None = None, train_share: float = 0.25,
                 stream_interval_s: float = 0.0) -> None:
        self.engine = engine
        self.reply = reply
        self.policy = SharePolicy(train_share)
        self.coalescer = OutputCoalescer(stream_interval_s)
        self.step_log = StepLog()
        self._inbox: collections.deque = collections.deque()  # ("add", args) | ("abort", id) | ("call", args)
        self._wakeup = threading.Event()
        self._stop = threading.Event()
        self.inference_s = self.training_s = 0.0  # totals for the metrics (the step log's reset every line)
        self._last_emit = self._last_stats = 0.0

    def stats(self) -> EngineStats:
        stats = self.engine.stats()
        stats.inference_seconds, stats.training_seconds = self.inference_s, self.training_s
        return stats

    def add(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, arrival: float,
            adapter: Adapter = None) -> None:
        self._inbox.append(("add", (request_id, prompt_token_ids, params, arrival, adapter)))
        self._wakeup.set()

    def call(self, call_id: int, method: str, args: tuple) -> None:
        self._inbox.append(("call", (call_id, method, args)))
        self._wakeup.set()

    def abort(self, request_id: str) -> None:
        self._inbox.append(("abort", request_id))
        self._wakeup.set()

    def stop(self) -> None:
        self._stop.set()
        self._wakeup.set()

    def _drain_inbox(self) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        aborts: list[str] = []
        while self._inbox:
            kind, payload = self._inbox.popleft()
            if kind == "add":
                request_id, prompt, params, arrival, adapter = payload
                try:
                    self.engine.add_request(request_id, prompt, params, arrival_time=arrival, adapter=adapter)
                except ValueError as e:  # validated at the edge already; never take the loop down
                    logger.warning("request %s rejected in the loop: %s", request_id, e)
                    outputs.append(RequestOutput(request_id, "", [], True, len(prompt), 0, finish_reason="abort"))
            elif kind == "call":
                call_id, method, args = payload
                try:
                    result, ok = self.engine.call(method, args), True
                except Exception as e:  # noqa: BLE001 - the caller gets the error; the loop goes on
                    if not isinstance(e, ValueError):
                        logger.exception("control call %s failed", method)
                    result, ok = e, False
                if self.reply is not None:
                    self.reply(call_id, ok, result)
            else:
                aborts.append(payload)
        if aborts:
            outputs.extend(self.engine.abort_requests(aborts))
        return outputs

    def _background_due(self) -> bool:
        work = self.engine.background
        return work is not None and work.has_work() and self.policy.may_run(self.engine.has_unfinished_requests())

    def run(self, emit: Emit, poll: Callable[[float], None] | None = None) -> None:
        """`poll(timeout_s)` may feed the inbox from outside (a pipe) and returns when it has."""
        while not self._stop.is_set():
            busy = self.engine.has_unfinished_requests() or bool(self._inbox) or self._background_due()
            if poll is not None:
                poll(0.0 if busy else 0.5)
            drained = bool(self._inbox)
            outputs = self._drain_inbox()
            if self.engine.background is not None:
                self.engine.background.tick()
            if self.engine.has_unfinished_requests():
                t0 = time.perf_counter()
                step_outputs = self.engine.step()
                step_s = time.perf_counter() - t0
                self.inference_s += step_s
                self.policy.record(inference_s=step_s)
                self.step_log.record(step_s, sum(len(o.token_ids) for o in step_outputs), self.engine.stats)
                outputs.extend(step_outputs)
            if self._background_due():  # one slice of a training step, within its share of the loop
                under_load = self.engine.has_unfinished_requests()
                t0 = time.perf_counter()
                self.engine.background.run_step()
                slice_s = time.perf_counter() - t0
                self.training_s += slice_s
                if under_load:
                    self.policy.record(background_s=slice_s)
                    self.step_log.record_background(slice_s, self.policy.background_fraction)
            now = time.monotonic()
            outputs = self.coalescer.add(outputs, now)
            if len(self.coalescer):
                outputs.extend(self.coalescer.due(now) if self.engine.has_unfinished_requests()
                               else self.coalescer.release_all())
            if outputs or (self.training_s and now - self._last_emit > 1.0):
                # stats with every output that ends a request (aborts too, so free-block counts are current), every
                # STATS_INTERVAL_S while tokens stream (None between: the receiver keeps the last; building and
                # pickling them was ~0.1 ms of every step), and once a second while only training
                fresh = now - self._last_stats >= STATS_INTERVAL_S or any(o.finished for o in outputs) or drained
                emit(outputs, self.stats() if fresh else None)
                self._last_emit = now
                if fresh:
                    self._last_stats = now
            if poll is None and not self.engine.has_unfinished_requests() and not self._inbox \
                    and not self._background_due():
                self._wakeup.wait(timeout=0.5)
                self._wakeup.clear()


class ThreadCore:
    """The loop in a background thread of this process (tests, embedding, notebooks)."""

    def __init__(self, engine: LLMEngine, train_share: float = 0.25, stream_interval_ms: float = 0.0) -> None:
        self.loop = EngineLoop(engine, reply=self._reply, train_share=train_share,
                               stream_interval_s=stream_interval_ms / 1000)
        self._calls = _PendingCalls()
        self.tokenizer = engine.tokenizer
        self.model_config = engine.model_config
        self.max_model_len = engine.max_model_len
        self.max_num_seqs = engine.scheduler.scheduler_config.max_num_seqs
        self.initial_stats = engine.stats()
        self._thread: threading.Thread | None = None

    def start(self, emit: Emit, on_error: Callable[[BaseException], None]) -> None:
        def main() -> None:
            try:
                self.loop.run(emit)
            except BaseException as e:  # noqa: BLE001 - report, never vanish
                logger.exception("engine loop died")
                on_error(e)
        self._thread = threading.Thread(target=main, name="loraplex-engine", daemon=True)
        self._thread.start()

    def add(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, arrival: float,
            adapter: Adapter = None) -> None:
        self.loop.add(request_id, prompt_token_ids, params, arrival, adapter)

    def abort(self, request_id: str) -> None:
        self.loop.abort(request_id)

    def call(self, method: str, args: tuple) -> concurrent.futures.Future:
        call_id, future = self._calls.new()
        self.loop.call(call_id, method, args)
        return future

    def _reply(self, call_id: int, ok: bool, result: Any) -> None:
        self._calls.resolve(call_id, ok, result)

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def shutdown(self, timeout_s: float = 10.0) -> None:
        self.loop.stop()
        if self._thread is not None:
            self._thread.join(timeout_s)


class _PendingCalls:
    """Futures of control calls in flight, by id."""

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self._futures: dict[int, concurrent.futures.Future] = {}
        self._lock = threading.Lock()

    def new(self) -> tuple[int, concurrent.futures.Future]:
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            call_id = next(self._ids)
            self._futures[call_id] = future
        return call_id, future

    def resolve(self, call_id: int, ok: bool, result: Any) -> None:
        with self._lock:
            future = self._futures.pop(call_id, None)
        if future is None:
            return
        if ok:
            future.set_result(result)
        else:
            future.set_exception(result)

    def fail_all(self, error: BaseException) -> None:
        with self._lock:
            futures, self._futures = list(self._futures.values()), {}
        for future in futures:
            future.set_exception(error)


def _process_main(args: EngineArgs, inbox: Any, outbox: Any, log_level: int, hook_factory: Any = None,
                  background_factory: Any = None) -> None:
    """Entry point of the engine process."""
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s [core]: %(message)s")
    try:
        from loraplex.engine.llm_engine import LLMEngine
        engine = LLMEngine.from_engine_args(args, hook_factory, background_factory)
    except BaseException as e:  # noqa: BLE001 - the parent turns this into a clear start-up error
        outbox.send(("error", f"{type(e).__name__}: {e}"))
        return
    outbox.send(("ready", {"model_config": engine.model_config, "max_model_len": engine.max_model_len,
                           "max_num_seqs": engine.scheduler.scheduler_config.max_num_seqs,
                           "stats": engine.stats()}))
    loop = EngineLoop(engine, reply=lambda call_id, ok, result: outbox.send(("reply", call_id, ok, result)),
                      train_share=args.train_share, stream_interval_s=args.stream_interval_ms / 1000)

    def poll(timeout_s: float) -> None:
        while inbox.poll(timeout_s):
            timeout_s = 0.0
            kind, *payload = inbox.recv()
            if kind == "add":
                loop.add(*payload)
            elif kind == "abort":
                loop.abort(payload[0])
            elif kind == "call":
                loop.call(*payload)
            else:
                loop.stop()

    try:
        loop.run(lambda outputs, stats: outbox.send(("outputs", outputs, stats)), poll)
    except (EOFError, KeyboardInterrupt):  # the server went away, or ^C reached the whole group
        pass
    except BaseException as e:  # noqa: BLE001
        logger.exception("engine loop died")
        try:
            outbox.send(("died", f"{type(e).__name__}: {e}"))
        except OSError:
            pass


@dataclasses.dataclass(frozen=True)
class ImportedFactory:
    """A module-level factory named by its import path ("package.module:function") and imported where it is called:
    the server hands the adapter hook's and the trainer's factories to the engine process without importing them
    (and torch with them) first, so the engine process starts while the server's imports run."""
    path: str

    def resolve(self) -> Callable:
        module, _, name = self.path.partition(":")
        return getattr(importlib.import_module(module), name)

    def __call__(self, *args: Any) -> Any:
        return self.resolve()(*args)


class ProcessCore:
    """The loop in the main thread of a child process; a reader thread here relays its outputs."""

    def __init__(self, args: EngineArgs, hook_factory: Any = None, startup_timeout_s: float = 1800.0,
                 background_factory: Any = None) -> None:
        """`hook_factory` / `background_factory`: picklable factories (module-level functions) of the adapter
        hook and the background work (the trainer), built in the child."""
        model_path = args.model
        if model_path is None:  # fetched here (once, with progress) before the engine process looks for it
            from loraplex.engine.default_model import ensure_default_model
            model_path = str(ensure_default_model(progress=logger.info))
        ctx = multiprocessing.get_context("spawn")
        self._calls = _PendingCalls()
        self._to_core_recv, self._to_core = ctx.Pipe(duplex=False)
        self._from_core, self._from_core_send = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(target=_process_main, name="loraplex-engine-core", daemon=True,
                                 args=(args, self._to_core_recv, self._from_core_send,
                                       logging.getLogger().getEffectiveLevel(), hook_factory, background_factory))
        self._proc.start()
        self._send_lock = threading.Lock()
        from loraplex.engine.llm_engine import load_tokenizer
        try:  # read while the engine process starts
            self.tokenizer = load_tokenizer(model_path)
        except Exception:  # noqa: BLE001 - the engine process's verdict on the model comes first; read again after
            self.tokenizer = None
        deadline = time.monotonic() + startup_timeout_s
        while not self._from_core.poll(1.0):
            if not self._proc.is_alive():
                raise RuntimeError(f"the engine process exited during start-up (code {self._proc.exitcode})")
            if time.monotonic() > deadline:
                self._proc.kill()
                raise RuntimeError("the engine process did not start in time")
        kind, info = self._from_core.recv()
        if kind == "error":
            self._proc.join(10)
            raise ValueError(info)
        self.model_config = info["model_config"]
        self.max_model_len = info["max_model_len"]
        self.max_num_seqs = info["max_num_seqs"]
        self.initial_stats = info["stats"]
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(model_path)
        self._reader: threading.Thread | None = None

    def start(self, emit: Emit, on_error: Callable[[BaseException], None]) -> None:
        def read() -> None:
            try:
                while True:
                    kind, *payload = self._from_core.recv()
                    if kind == "outputs":
                        emit(*payload)
                    elif kind == "reply":
                        self._calls.resolve(*payload)
                    elif kind == "died":
                        raise RuntimeError(payload[0])
            except EOFError:
                self._calls.fail_all(RuntimeError("the engine process exited"))
                if self._proc.is_alive() or self._proc.exitcode not in (0, None):
                    on_error(RuntimeError(f"the engine process exited (code {self._proc.exitcode})"))
            except BaseException as e:  # noqa: BLE001
                self._calls.fail_all(e)
                on_error(e)
        self._reader = threading.Thread(target=read, name="loraplex-core-reader", daemon=True)
        self._reader.start()

    def _send(self, message: tuple) -> None:
        with self._send_lock:
            self._to_core.send(message)

    def add(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, arrival: float,
            adapter: Adapter = None) -> None:
        self._send(("add", request_id, prompt_token_ids, params, arrival, adapter))

    def call(self, method: str, args: tuple) -> concurrent.futures.Future:
        call_id, future = self._calls.new()
        self._send(("call", call_id, method, args))
        return future

    def abort(self, request_id: str) -> None:
        self._send(("abort", request_id))

    def is_alive(self) -> bool:
        return self._proc.is_alive()

    def shutdown(self, timeout_s: float = 10.0) -> None:
        try:
            self._send(("stop",))
        except OSError:
            pass
        self._proc.join(timeout_s)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)
