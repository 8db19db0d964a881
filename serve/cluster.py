"""loraplex on Ray Serve: an ingress deployment (the same Starlette app as `loraplex serve`, over a RemoteEngine)
and an engine deployment with N replicas, one engine each (with its LoRA pool and trainer).

    loraplex cluster --num-replicas 2 --database postgresql://... --blob-store s3://bucket/prefix [serve flags]

or, in a Ray Serve config of your own, `loraplex.serve.cluster:build_application(flags)` (a
`serve.Application`). Adapter requests are routed with the multiplexed id `name@vN` to a replica that holds
that version (Ray's multiplex-aware router); a replica that gets a version it lacks pulls it from the shared
store (`pull on a miss`) and keeps up to `--max-cpu-loras` of them. Base requests are balanced. Each replica's
trainer claims queued fine-tuning jobs from the shared job store (leases: trainer/job_store.py), so a job
outlives its replica. Replicas need stores every replica reaches: PostgreSQL + S3 across machines (SQLite
and a folder work on one machine).
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import tempfile
from pathlib import Path
from typing import Any

logger = logging.getLogger("loraplex.serve")

ENGINE_DEPLOYMENT = "LoraplexEngine"
INGRESS_DEPLOYMENT = "LoraplexIngress"
APP_NAME = "loraplex"


class _Loaded:
    """A multiplexed adapter version on a replica: its key in the engine. Ray drops the least recently used
    beyond the replica's limit and calls `__del__`: the version retires from the engine (requests running on
    it finish first) and its cached files become evictable again."""

    def __init__(self, replica: EngineReplica, record) -> None:
        self.replica, self.record = replica, record
        self.key = (record.adapter_id, record.version)
        self._loop = asyncio.get_running_loop()

    def __del__(self) -> None:  # Ray runs it in an executor thread: hand the work to the replica's loop
        replica, self.replica = getattr(self, "replica", None), None
        if replica is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(lambda: self._loop.create_task(replica.drop_adapter(self.record)))


class EngineReplica:
    """One engine (in this process: the replica is its own process already) with the adapter hook and trainer.
    `ns`: the parsed `loraplex cluster` flags. Each replica keeps its local state (adapter cache, checkpoints)
    in a folder of its own, so its job leases are its own. The engine starts with the replica (async
    constructor: Ray Serve awaits it), not with its first request: its trainer must claim and run jobs (a dead
    replica's among them) in a replica no request has reached yet."""

    async def __init__(self, ns: argparse.Namespace) -> None:
        from loraplex.adapters.runtime import create_lora_runtime
        from loraplex.adapters.store import AdapterStore
        from loraplex.engine.async_engine import AsyncEngine
        from loraplex.engine.engine_args import engine_args_from
        from loraplex.trainer.service import create_training_runtime
        _configure_logging(ns)
        import torch
        # as many compute threads as the CPUs Ray reserved for this replica: replicas sharing a machine must not
        # oversubscribe its cores (each would default to all of them)
        torch.set_num_threads(max(1, round(ns.replica_cpus)))
        self.replica = f"{socket.gethostname()}:{os.getpid()}"  # where to find it (its label in /metrics)
        local = Path(tempfile.mkdtemp(prefix=f"loraplex-replica-{os.getpid()}-"))
        ns = argparse.Namespace(**{**vars(ns), "fine_tuning_dir": str(local / "fine_tuning")})
        args = engine_args_from(ns)
        self.engine = AsyncEngine.from_engine_args(args, in_process=True,
                                                   hook_factory=create_lora_runtime if ns.enable_lora else None,
                                                   background_factory=create_training_runtime
                                                   if args.enable_training else None)
        self.store = AdapterStore(local / "adapters", database=ns.database, blobs=ns.blob_store) \
            if ns.enable_lora else None
        self.loads: dict[str, int] = {}  # multiplexed id -> times this replica pulled it (0 or 1 unless dropped)
        await self.engine.start()
        logger.info("engine replica %s ready (local state in %s)", self.replica, local)

    async def info(self) -> dict[str, Any]:
        return {"model_config": self.engine.model_config, "max_model_len": self.engine.max_model_len,
                "max_num_seqs": self.engine.core.max_num_seqs, "stats": self.report(),
                "replica": self.replica}

    async def get_adapter(self, model_id: str) -> _Loaded:
        """`name@vN` -> that version registered with this replica's engine, pulled from the store first
        (wrapped in serve.multiplexed by build_application: loaded once per replica, least recently used
        dropped beyond the limit)."""
        name, _, version = model_id.rpartition("@v")
        record = await asyncio.to_thread(self.store.get_version, name, int(version))
        folder = await asyncio.to_thread(self.store.fetch, record, pin=True)
        await self.engine.call("register_adapter", record.name, record.adapter_id, record.version, str(folder))
        self.loads[model_id] = self.loads.get(model_id, 0) + 1
        logger.info("replica %s pulled adapter %s", self.replica, model_id)
        return _Loaded(self, record)

    async def drop_adapter(self, record) -> None:
        try:
            await self.engine.call("unregister_adapter", record.adapter_id, record.version)
        except Exception as e:  # noqa: BLE001 - a replica shutting down: nothing left to retire
            logger.debug("replica %s: %s@v%d not retired: %s", self.replica, record.name, record.version, e)
        self.store.release(record)  # a lock and a dict: no thread needed (and none may be left at shutdown)
        logger.info("replica %s dropped adapter %s@v%d", self.replica, record.name, record.version)

    async def generate(self, request_id: str, prompt_token_ids: list[int], params, adapter, parts=()):
        """Stream (replica, RequestOutput, stats or None) for one request; stats with the last output. `parts`: the
        `name@vN` of a composition's other adapters (adapters/composition.py), pulled here too."""
        from ray import serve
        model_id = serve.get_multiplexed_model_id()
        if model_id:
            loaded = [await self.get_adapter(model_id)] + [await self.get_adapter(p) for p in parts]
            if adapter is None or tuple(adapter[:2]) != loaded[0].key:
                raise ValueError(f"adapter {adapter} is not {model_id}")
        stream = self.engine.add_request(request_id, prompt_token_ids, params, adapter if model_id else None)
        try:
            async for out in stream:
                yield self.replica, out, (self.report() if out.finished else None)
        finally:
            if not stream.finished:  # the caller went away (a cancelled stream): free the KV blocks now
                self.engine.abort(request_id)

    def report(self):
        """This replica's EngineStats for the ingress's /metrics, with the adapter versions it pulled."""
        stats = self.engine.stats()
        if stats.adapters is not None:
            stats.adapters = {**stats.adapters, "pulls": dict(self.loads)}
        return stats

    async def call(self, method: str, *args):
        return await self.engine.call(method, *args)

    def record_routing_stats(self) -> dict[str, Any]:
        """What a request router sees of this replica: queue, free KV blocks and LoRA pool pages."""
        stats = self.engine.stats()
        adapters = stats.adapters or {}
        return {"num_running": stats.num_running, "num_waiting": stats.num_waiting,
                "kv_free_blocks": stats.num_free_blocks, "lora_pages_free": adapters.get("pages_free", 0),
                "adapters": [f"{name}@v{version}" for name, version, _, _ in adapters.get("residency", [])]}


class _Ingress:
    def __init__(self, engine_handle: Any) -> None:
        pass  # the app built by _ingress_app reaches the engine deployment by name


def _configure_logging(ns: argparse.Namespace) -> None:
    """Our loggers in a Ray worker: to stderr (Ray keeps it in the worker's log and shows it on the driver)."""
    from loraplex.serve.server import LOG_FORMAT
    logging.basicConfig(level=ns.log_level.upper(), format=LOG_FORMAT)


def _ingress_app(ns: argparse.Namespace):
    """Built on the ingress replica (the stores' connections never cross processes)."""
    _configure_logging(ns)
    from ray import serve

    from loraplex.engine.default_model import ensure_default_model
    from loraplex.serve.remote_engine import RemoteEngine
    from loraplex.serve.server import build_server_app
    handle = serve.get_deployment_handle(ENGINE_DEPLOYMENT, app_name=ns.app_name)
    model_path = ns.model or str(ensure_default_model(progress=logger.info))
    local = Path(tempfile.mkdtemp(prefix="loraplex-ingress-"))
    ns = argparse.Namespace(**{**vars(ns), "adapter_dir": ns.adapter_dir or str(local / "adapters"),
                               "fine_tuning_dir": str(local / "fine_tuning")})
    max_replicas = (ns.autoscaling_config or {}).get("max_replicas", ns.num_replicas)
    return build_server_app(ns, RemoteEngine(handle, model_path, max_queue_len=ns.max_queue_len,
                                             max_replicas=max_replicas))


def build_application(ns: argparse.Namespace | list[str] | dict):
    """The Ray Serve application: `ns` is the parsed `loraplex cluster` flags, their argv, or (an application
    builder in a Ray Serve config: `import_path: loraplex.serve.cluster:build_application`) the config's
    `args`, `{"flags": [...]}`."""
    from ray import serve
    if isinstance(ns, dict):
        unknown = set(ns) - {"flags"}
        if unknown or not isinstance(ns.get("flags", []), list):
            raise ValueError(f"build_application takes args {{'flags': [...]}}; got {sorted(ns)}")
        ns = [str(f) for f in ns.get("flags", [])]
    if not isinstance(ns, argparse.Namespace):
        parser = argparse.ArgumentParser(prog="loraplex cluster")
        add_cluster_args(parser)
        ns = parser.parse_args(ns)
    from ray.serve.config import RequestRouterConfig
    check_cluster_args(ns)
    # multiplexing keeps up to this many adapter versions registered per replica (its host tier holds them)
    per_replica = max(2, ns.max_cpu_loras or 2 * ns.max_loras)
    engine_cls = type("EngineReplica", (EngineReplica,), {
        "get_adapter": serve.multiplexed(max_num_models_per_replica=per_replica)(EngineReplica.get_adapter)})
    router = RequestRouterConfig(
        request_router_class="loraplex.serve.cluster_router.AdapterRouter",
        request_router_kwargs={"spread_at": ns.spread_queue or ns.max_num_seqs},
        request_routing_stats_period_s=ns.routing_stats_period)
    scaling = {"autoscaling_config": ns.autoscaling_config} if ns.autoscaling_config else \
        {"num_replicas": ns.num_replicas}
    engine = serve.deployment(engine_cls, name=ENGINE_DEPLOYMENT, **scaling,
                              max_ongoing_requests=ns.max_num_seqs + ns.max_queue_len,
                              ray_actor_options={"num_cpus": ns.replica_cpus}, request_router_config=router,
                              **({"max_replicas_per_node": 1} if ns.one_replica_per_node else {}))
    ingress = serve.deployment(serve.ingress(lambda: _ingress_app(ns))(_Ingress), name=INGRESS_DEPLOYMENT,
                               ray_actor_options={"num_cpus": 0})
    return ingress.bind(engine.bind(ns))  # bound to the engine: one application, deployed together


def add_cluster_args(p: argparse.ArgumentParser) -> None:
    from loraplex.serve.server import add_serve_args
    add_serve_args(p)
    c = p.add_argument_group("cluster (Ray Serve)")
    c.add_argument("--num-replicas", type=int, default=2, help="engine replicas (default: 2)")
    c.add_argument("--replica-cpus", type=float, default=1.0,
                   help="CPUs Ray reserves per engine replica; its torch threads (at least 1) follow it")
    c.add_argument("--autoscaling-config", type=_json_object, default=None, metavar="JSON",
                   help="Ray Serve autoscaling for the engine replicas instead of --num-replicas, e.g. "
                        "'{\"min_replicas\": 1, \"max_replicas\": 4, \"target_ongoing_requests\": 8}' "
                        "(or @file.json)")
    c.add_argument("--spread-queue", type=int, default=None, metavar="N",
                   help="ongoing requests on every replica holding an adapter at which the router lets "
                        "another replica load it too (default: --max-num-seqs, a full batch)")
    c.add_argument("--routing-stats-period", type=float, default=2.0, metavar="S",
                   help="seconds between the replicas' residency reports to the router (default: 2)")
    c.add_argument("--one-replica-per-node", action="store_true", help="spread replicas over nodes")
    c.add_argument("--ray-address", default=None, help="an existing Ray cluster (default: start a local one)")
    c.add_argument("--app-name", default=APP_NAME)


def _json_object(text: str) -> dict:
    import json
    try:
        value = json.loads(Path(text[1:]).read_text() if text.startswith("@") else text)
    except (OSError, ValueError) as e:
        raise argparse.ArgumentTypeError(f"not a JSON object: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("not a JSON object")
    return value


def check_cluster_args(ns: argparse.Namespace) -> None:
    """ValueError with a message for the user (before Ray starts anything)."""
    from ray.serve.config import AutoscalingConfig
    if ns.num_replicas < 1:
        raise ValueError("--num-replicas must be at least 1")
    if ns.spread_queue is not None and ns.spread_queue < 1:
        raise ValueError("--spread-queue must be at least 1")
    if ns.routing_stats_period <= 0:
        raise ValueError("--routing-stats-period must be positive")
    if ns.autoscaling_config is not None:
        unknown = sorted(set(ns.autoscaling_config) - set(AutoscalingConfig.model_fields))
        if unknown:  # Ray would drop them silently
            raise ValueError(f"--autoscaling-config: unknown field(s) {', '.join(unknown)}; Ray Serve's "
                             f"AutoscalingConfig has {', '.join(sorted(AutoscalingConfig.model_fields))}")
        try:
            AutoscalingConfig(**ns.autoscaling_config)
        except Exception as e:  # noqa: BLE001 - pydantic's error, said in one line
            raise ValueError("--autoscaling-config: " + " ".join(str(e).split())) from None


def run_cluster(ns: argparse.Namespace) -> int:
    try:
        import ray
        from ray import serve
    except ImportError:
        logger.error("loraplex cluster needs Ray Serve: pip install 'loraplex[cluster]'")
        return 2
    try:
        check_cluster_args(ns)
    except ValueError as e:
        logger.error("%s", e)
        return 2
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(address=ns.ray_address, include_dashboard=False)
    serve.start(http_options={"host": ns.host, "port": ns.port})
    serve.run(build_application(ns), name=ns.app_name, route_prefix="/")
    scale = f"autoscaling {ns.autoscaling_config}" if ns.autoscaling_config else f"{ns.num_replicas} engine replicas"
    logger.info("loraplex cluster: %s behind http://%s:%d", scale, ns.host, ns.port)
    try:
        while True:
            import time
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
    return 0
