"""RemoteEngine: the AsyncEngine surface the HTTP app uses (add_request -> a stream of RequestOutputs, abort,
control calls, stats), served by a Ray Serve deployment of engine replicas (serve/cluster.py).

An adapter request goes out with the multiplexed model id `name@vN`, so Ray's router sends it to a replica
that already holds that version (and a republished name can never be served stale: the version is part of
the id); base-model requests carry no id and are balanced. Adapters are not pushed anywhere: the replica
that gets `name@vN` first pulls it from the shared store (its multiplexed loader). Training calls go to any
replica; the job store's leases decide which replica trains a job.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from loraplex.engine.async_engine import RequestStream
from loraplex.engine.core.errors import EngineDeadError, ReplicaFailedError
from loraplex.engine.core.outputs import EngineStats
from loraplex.engine.core.request import validate_prompt

logger = logging.getLogger("loraplex.serve")

STATS_STALE_S = 30.0  # a replica not heard of for this long leaves the summed gauges


class RemoteEngine:
    pulls_adapters = True  # replicas fetch adapter files themselves: the HTTP side registers names only

    def __init__(self, handle: Any, tokenizer_path: str, max_queue_len: int = 256, max_replicas: int = 1) -> None:
        self.handle = handle  # DeploymentHandle of serve.cluster.EngineReplica
        self.tokenizer_path = tokenizer_path
        self.max_queue_len = max_queue_len
        self.max_replicas = max_replicas  # the ingress admits what this many replicas batch and queue
        self.tokenizer = None
        self.model_config = None
        self.max_model_len = 0
        self._names: dict[tuple[int, int], str] = {}  # adapter key -> name (register_adapter calls)
        self._tasks: dict[str, asyncio.Task] = {}
        self._stats: dict[str, tuple[float, EngineStats]] = {}  # replica id -> (when, its stats)
        self._started = False

    # ---- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        if self._started:
            return
        info = await self.handle.info.remote()
        self.model_config, self.max_model_len = info["model_config"], info["max_model_len"]
        self._max_in_flight = (info["max_num_seqs"] + self.max_queue_len) * self.max_replicas
        self._stats[info["replica"]] = (time.monotonic(), info["stats"])
        from loraplex.engine.llm_engine import load_tokenizer
        self.tokenizer = await asyncio.to_thread(load_tokenizer, self.tokenizer_path)
        self._started = True

    async def shutdown(self) -> None:
        for task in list(self._tasks.values()):
            task.cancel()

    @property
    def is_running(self) -> bool:
        return self._started

    @property
    def is_healthy(self) -> bool:
        return self._started

    def stats(self) -> EngineStats:
        """The replicas' last reported gauges, summed, and each replica's own (`replicas`): a replica reports
        with its requests' last output, and leaves after STATS_STALE_S without one."""
        now = time.monotonic()
        fresh = [s for when, s in self._stats.values() if now - when < STATS_STALE_S]
        if not fresh:
            return EngineStats(num_running=0, num_waiting=0, num_free_blocks=0, num_total_blocks=0, replicas={})
        return EngineStats(num_running=sum(s.num_running for s in fresh), num_waiting=sum(s.num_waiting for s in fresh),
                           num_free_blocks=sum(s.num_free_blocks for s in fresh),
                           num_total_blocks=sum(s.num_total_blocks for s in fresh),
                           spec_draft_tokens=sum(s.spec_draft_tokens for s in fresh),
                           spec_accepted_tokens=sum(s.spec_accepted_tokens for s in fresh),
                           replicas={replica: s for replica, (when, s) in self._stats.items()
                                     if now - when < STATS_STALE_S})

    # ---- requests ---------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params, adapter: tuple | None = None
                    ) -> RequestStream:
        """`adapter`: (adapter_id, version), or (adapter_id, version, Composition): the replica chosen for the first
        adapter pulls the composition's other parts too (their `name@vN` travel with the request)."""
        from loraplex.engine.core.errors import QueueFullError
        if not self._started:
            raise EngineDeadError("the engine replicas are not reachable yet")
        if request_id in self._tasks:
            raise ValueError(f"duplicate request id {request_id!r}")
        validate_prompt(prompt_token_ids, params, self.max_model_len, self.model_config.vocab_size)
        if len(self._tasks) >= self._max_in_flight:
            raise QueueFullError(self.max_queue_len)
        options: dict[str, Any] = {"stream": True}
        parts: list[str] = []
        if adapter is not None:
            options["multiplexed_model_id"] = self._model_id(tuple(adapter[:2]))
            mix = adapter[2] if len(adapter) > 2 else None
            parts = [] if mix is None else [self._model_id(key) for key in mix.adapter_keys()[1:]]
        stream = RequestStream(request_id)
        response = self.handle.options(**options).generate.remote(request_id, list(prompt_token_ids), params,
                                                                  adapter, parts)
        self._tasks[request_id] = asyncio.get_running_loop().create_task(self._pump(request_id, response, stream))
        return stream

    def _model_id(self, key: tuple[int, int]) -> str:
        return f"{self._names[key]}@v{key[1]}"

    async def _pump(self, request_id: str, response, stream: RequestStream) -> None:
        replica = None
        try:
            async for replica, out, stats in response:
                if stats is not None:
                    self._stats[replica] = (time.monotonic(), stats)
                stream.put(out)
                if out.finished:
                    return
            stream.put(ReplicaFailedError(f"request {request_id}: its engine replica ended it unfinished"))
        except asyncio.CancelledError:
            response.cancel()  # aborts the request on its replica
            raise
        except Exception as e:  # noqa: BLE001 - a replica died mid-stream: the client gets an error, not a hang
            logger.warning("request %s: its engine replica %s failed: %s", request_id, replica or "(unknown)", e)
            self._stats.pop(replica, None)  # its gauges leave /metrics now, not after STATS_STALE_S
            stream.put(e if isinstance(e, (ValueError, EngineDeadError)) else
                       ReplicaFailedError(f"request {request_id}: its engine replica failed ({type(e).__name__})"))
        finally:
            self._tasks.pop(request_id, None)

    def abort(self, request_id: str) -> None:
        task = self._tasks.get(request_id)
        if task is not None:
            task.cancel()

    async def call(self, method: str, *args):
        if method == "register_adapter":  # (name, adapter_id, version, path): the replicas pull it on a miss
            name, adapter_id, version = args[:3]
            self._names[(adapter_id, version)] = name
            return {}
        if method == "unregister_adapter":  # a deleted name is never asked for again; replicas' LRUs drop it
            (adapter_id,) = args
            self._names = {k: v for k, v in self._names.items() if k[0] != adapter_id}
            return 0
        return await self.handle.call.remote(method, *args)
