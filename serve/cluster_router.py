"""The cluster's request router (a Ray Serve `RequestRouter`): which engine replica gets a request.

How it decides, per request (`rank_replicas`, a pure function; the Ray class only gathers what it sees):

* An adapter request (`multiplexed_model_id = "name@vN"`) goes to a replica that **holds** that version: Ray's
  multiplexed ids, the residency each replica reports through `record_routing_stats`, or a replica this router
  sent the same id to in the last `sticky_s` seconds (Ray's view of who holds what trails by ~0.1 s, and
  without this two first requests for an adapter load it on two replicas).
* Among holders, the least loaded (Ray's live count of ongoing requests) wins, as long as one has a free batch
  slot (`load < spread_at`, by default the replica's `--max-num-seqs`).
* **Hot-adapter spreading**: when every holder's batch is full (`load >= spread_at`), a new request would wait
  for a whole generation there, while paging the adapter in on another replica costs milliseconds (host
  tier) to a pull from the store. So replicas that do not hold it and still have a free batch slot join the
  first rank, and the least loaded of all wins: the adapter gains a replica exactly when its queue grows
  past what its holders can batch, and never before (no copies made for an adapter its holders keep up with).
* A version nobody holds goes to a replica with free LoRA pool pages (loading it evicts nothing running),
  the one with fewer adapters resident first, then the least loaded.
* Base-model requests go to the least loaded replica, those with free KV blocks first.

Full replicas (Ray's `max_ongoing_requests`) are skipped by Ray itself and the next rank is tried.
"""
from __future__ import annotations

import functools
import logging
import time
import zlib
from dataclasses import dataclass
from typing import Any

DEFAULT_STICKY_S = 5.0


@dataclass(frozen=True)
class ReplicaView:
    """What the router knows of one replica when it routes a request."""
    id: Any
    load: int | None  # ongoing requests (Ray's cache; None: unknown)
    holds: bool  # holds the requested adapter version
    num_adapters: int  # adapter versions it holds
    lora_pages_free: int | None  # from record_routing_stats (None: not reported yet)
    kv_free_blocks: int | None


def rank_replicas(adapter: str | None, replicas: list[ReplicaView], spread_at: int) -> list[list[Any]]:
    """Replica ids in ranks, most preferred first (Ray takes the least loaded of the first rank with room)."""
    def free_slot(r: ReplicaView) -> bool:
        return r.load is None or r.load < spread_at

    if not adapter:
        roomy = [r.id for r in replicas if r.kv_free_blocks is None or r.kv_free_blocks > 0]
        return [roomy, [r.id for r in replicas if r.id not in roomy]]
    holders = [r for r in replicas if r.holds]
    # fewer adapters, then less load; ties broken by a hash of (adapter, replica), so equal replicas take
    # different adapters instead of the first in the list taking them all
    cold = sorted((r for r in replicas if not r.holds),
                  key=lambda r: (r.num_adapters, r.load or 0, zlib.crc32(f"{adapter}|{r.id}".encode())))
    paged = [r.id for r in cold if r.lora_pages_free is None or r.lora_pages_free > 0]
    if holders:
        ready = [r.id for r in holders if free_slot(r)]
        if ready:
            return [ready, [r.id for r in holders if r.id not in ready], paged,
                    [r.id for r in cold if r.id not in paged]]
        # hot: every holder's batch is full -> cold replicas with a free slot compete with them
        spill = [r.id for r in cold if free_slot(r)]
        return [[r.id for r in holders] + spill, [r.id for r in cold if r.id not in spill]]
    # nobody holds it: one replica (the caller records it as a holder at once, so a burst of first requests
    # does not load it everywhere), then the others with room in their pool, then the rest
    return [paged[:1], paged[1:], [r.id for r in cold if r.id not in paged]]


@functools.cache
def _router_class():
    """The Ray class, built on first use (Ray is an optional dependency)."""
    from ray.serve.request_router import FIFOMixin, MultiplexMixin, RequestRouter

    class AdapterRouter(FIFOMixin, MultiplexMixin, RequestRouter):
        def initialize_state(self, spread_at: int = 16, sticky_s: float = DEFAULT_STICKY_S, **_: Any) -> None:
            self.spread_at = spread_at
            self.sticky_s = sticky_s
            self._sent: dict[str, dict[Any, float]] = {}  # adapter id -> replica id -> last routed there
            logging.getLogger("loraplex.serve").info(
                "adapter-aware router for %s: a hot adapter spreads at %d ongoing requests per holder",
                self._deployment_id, spread_at)

        def _recent(self, adapter: str) -> set:
            sent = self._sent.get(adapter, {})
            now = time.monotonic()
            for rid in [rid for rid, t in sent.items() if now - t > self.sticky_s or rid not in self._replicas]:
                del sent[rid]
            return set(sent)

        async def choose_replicas(self, candidate_replicas, pending_request=None):
            adapter = pending_request.metadata.multiplexed_model_id if pending_request is not None else None
            holders = set()
            if adapter:
                holders = set(self._multiplexed_model_id_to_replica_ids.get(adapter, ())) | self._recent(adapter)
            views, by_id = [], {}
            for r in candidate_replicas:
                stats = r.routing_stats or {}
                resident = set(stats.get("adapters", ())) | set(r.multiplexed_model_ids)
                views.append(ReplicaView(
                    id=r.replica_id, load=self._replica_queue_len_cache.get(r.replica_id),
                    holds=bool(adapter) and (r.replica_id in holders or adapter in resident),
                    num_adapters=len(resident), lora_pages_free=stats.get("lora_pages_free"),
                    kv_free_blocks=stats.get("kv_free_blocks")))
                by_id[r.replica_id] = r
            if pending_request is not None:
                pending_request.routing_context.should_backoff = True  # all ranks full: back off, then retry
            ranks = rank_replicas(adapter, views, self.spread_at)
            if adapter and not any(v.holds for v in views) and ranks[0]:
                self._sent.setdefault(adapter, {})[ranks[0][0]] = time.monotonic()  # its holder from now on
            return [[by_id[i] for i in rank] for rank in ranks if rank]

        def on_request_routed(self, pending_request, replica_id, result) -> None:
            adapter = pending_request.metadata.multiplexed_model_id
            if adapter:
                self._sent.setdefault(adapter, {})[replica_id] = time.monotonic()

    AdapterRouter.__qualname__ = "AdapterRouter"  # pickled by reference: this module's attribute
    return AdapterRouter


def __getattr__(name: str):
    if name == "AdapterRouter":  # `loraplex.serve.cluster_router:AdapterRouter` in a Ray Serve config
        return _router_class()
    raise AttributeError(name)
