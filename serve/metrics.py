"""Prometheus metrics (vLLM's names under a `loraplex:` prefix) in one registry per app."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from loraplex.engine.core.outputs import EngineStats, RequestOutput

logger = logging.getLogger("loraplex.serve")

PREFIX = "loraplex:"
LOSS_KEPT_S = 3600.0  # a finished job's last losses stay in /metrics this long
CONTENT_TYPE = CONTENT_TYPE_LATEST
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                 7.5, 10.0, 20.0, 40.0, 80.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
                 0.75, 1.0, 2.5, 5.0)
_LOAD_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                120.0, 240.0, 480.0)


class _EngineStatsCollector(Collector):
    """Gauges read from `engine.stats()` at scrape time, so they are never stale."""

    def __init__(self, stats: Callable[[], EngineStats], model_name: str) -> None:
        self._stats = stats
        self._model_name = model_name

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            stats = self._stats()
        except Exception:  # a dead engine must not break /metrics
            logger.warning("engine.stats() failed during a metrics scrape", exc_info=True)
            return
        for name, doc, value in (
                ("num_requests_running", "Requests in the running batch.", stats.num_running),
                ("num_requests_waiting", "Requests waiting to be scheduled.", stats.num_waiting),
                ("kv_cache_usage_perc", "Fraction of KV cache blocks in use (1 = full).",
                 stats.kv_cache_usage),
                ("kv_cache_free_blocks", "KV cache blocks on the free list (cached prefixes included).",
                 stats.num_free_blocks),
                ("kv_cache_total_blocks", "KV cache blocks in all.", stats.num_total_blocks)):
            gauge = GaugeMetricFamily(PREFIX + name, doc, labels=["model_name"])
            gauge.add_metric([self._model_name], float(value))
            yield gauge
        for name, doc, value in (
                ("engine_inference_seconds", "Seconds the engine loop spent in forward steps for requests.",
                 stats.inference_seconds),
                ("engine_training_seconds", "Seconds the engine loop spent in training slices.",
                 stats.training_seconds),
                ("spec_decode_num_draft_tokens", "Draft tokens proposed by prompt-lookup speculative decoding.",
                 stats.spec_draft_tokens),
                ("spec_decode_num_accepted_tokens", "Draft tokens the model confirmed (speculative decoding).",
                 stats.spec_accepted_tokens)):
            counter = CounterMetricFamily(PREFIX + name, doc, labels=["model_name"])
            counter.add_metric([self._model_name], float(value))
            yield counter
        if stats.memory_bytes:
            memory = GaugeMetricFamily(PREFIX + "memory_bytes", "Bytes held on the device: base weights "
                                       "(quantized where they are), KV cache, LoRA pool.", labels=["model_name", "kind"])
            for kind, value in stats.memory_bytes.items():
                memory.add_metric([self._model_name, kind], float(value))
            yield memory
        if stats.adapters is not None:
            yield from self._adapter_metrics(stats.adapters)
        if stats.replicas:
            yield from self._replica_metrics(stats.replicas)

    def _replica_metrics(self, replicas: dict[str, EngineStats]) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        """A cluster ingress: each engine replica's last report (the unlabelled gauges above are their sums)."""
        families = {name: GaugeMetricFamily(PREFIX + "replica_" + name, doc, labels=["model_name", "replica"])
                    for name, doc in (("num_requests_running", "Requests in a replica's running batch."),
                                      ("num_requests_waiting", "Requests waiting on a replica."),
                                      ("kv_cache_usage_perc", "Fraction of a replica's KV cache blocks in use."),
                                      ("lora_pool_pages_free", "A replica's LoRA pool pages on the free list."))}
        loaded = GaugeMetricFamily(PREFIX + "replica_lora_adapter_loaded", "Adapter versions a replica holds, by "
                                   "where their weights are (device, host, store).",
                                   labels=["replica", "adapter_name", "version", "level"])
        pulls = CounterMetricFamily(PREFIX + "replica_adapter_pulls", "Adapter versions a replica pulled from the "
                                    "shared store (its multiplexed loads).", labels=["replica", "adapter"])
        for replica, st in sorted(replicas.items()):
            a = st.adapters or {}
            for name, value in (("num_requests_running", st.num_running), ("num_requests_waiting", st.num_waiting),
                                ("kv_cache_usage_perc", st.kv_cache_usage),
                                ("lora_pool_pages_free", a.get("pages_free"))):
                if value is not None:
                    families[name].add_metric([self._model_name, replica], float(value))
            for name, version, level, _ in a.get("residency", ()):
                loaded.add_metric([replica, name, str(version), level], 1.0)
            for adapter, n in a.get("pulls", {}).items():
                pulls.add_metric([replica, adapter], float(n))
        yield from families.values()
        yield loaded
        yield pulls

    def _adapter_metrics(self, a: dict) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        for name, doc, value in (
                ("lora_pool_pages_used", "LoRA pool pages holding adapter weights.", a["pages_used"]),
                ("lora_pool_pages_free", "LoRA pool pages on the free list.", a["pages_free"]),
                ("lora_adapters_registered", "Adapter versions the engine can serve.", a["registered"])):
            gauge = GaugeMetricFamily(PREFIX + name, doc, labels=["model_name"])
            gauge.add_metric([self._model_name], float(value))
            yield gauge
        resident = GaugeMetricFamily(PREFIX + "lora_adapters_resident", "Adapters resident per memory tier.",
                                     labels=["model_name", "tier"])
        resident.add_metric([self._model_name, "device"], float(a["resident_device"]))
        resident.add_metric([self._model_name, "host"], float(a["resident_host"]))
        yield resident
        for name, doc, value in (("lora_adapter_loads", "Adapter loads into the pool.", a["loads"]),
                                 ("lora_adapter_evictions", "Adapters evicted from the pool.", a["evictions"])):
            counter = CounterMetricFamily(PREFIX + name, doc, labels=["model_name"])
            counter.add_metric([self._model_name], float(value))
            yield counter
        if "running_names" in a:
            # the Gateway API Inference Extension's model-server protocol (vLLM's vllm:lora_requests_info):
            # one series, its value the scrape time, labels naming the adapters of running and waiting requests
            info = GaugeMetricFamily(PREFIX + "lora_requests_info", "Adapters of the running and waiting "
                                     "requests (labels; the value is the time of this reading).",
                                     labels=["running_lora_adapters", "waiting_lora_adapters", "max_lora"])
            info.add_metric([",".join(a["running_names"]), ",".join(a["waiting_names"]), str(a["max_loras"])],
                            time.time())
            yield info
        if "residency" in a:
            loaded = GaugeMetricFamily(PREFIX + "lora_adapter_loaded", "Adapter versions this server can serve, "
                                       "by where their weights are (device: in the pool; host: in memory; store: "
                                       "on disk).", labels=["adapter_name", "version", "level", "rank"])
            for name, version, level, rank in a["residency"]:
                loaded.add_metric([name, str(version), level, str(rank)], 1.0)
            yield loaded


class _FineTuningCollector(Collector):
    """Jobs by status, and the newest train/valid loss of each running or paused job and of those that finished
    in the last LOSS_KEPT_S (a dashboard shows how a job ended), read from the job store at scrape time (so
    every server on a shared store reports the same numbers)."""

    def __init__(self, store) -> None:
        self._store = store

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            counts = self._store.count_by_status()
            active = self._store.recent_jobs(time.time() - LOSS_KEPT_S)
            losses = [(job, self._store.latest_losses(job.id)) for job in active]
        except Exception:  # an unreachable store must not break /metrics
            logger.warning("the job store failed during a metrics scrape", exc_info=True)
            return
        jobs = GaugeMetricFamily(PREFIX + "fine_tuning_jobs", "Fine-tuning jobs by status.", labels=["status"])
        for status in ("validating_files", "queued", "running", "paused", "succeeded", "failed", "cancelled"):
            jobs.add_metric([status], float(counts.get(status, 0)))
        yield jobs
        loss = GaugeMetricFamily(PREFIX + "fine_tuning_loss", "The newest loss of a job running, paused or "
                                 "finished in the last hour.", labels=["job_id", "suffix", "status", "split"])
        for job, values in losses:
            for key, split in (("train_loss", "train"), ("valid_loss", "valid")):
                if key in values:
                    loss.add_metric([job.id, job.suffix or "", job.status, split], values[key])
        yield loss


class ServingMetrics:
    """Counters and histograms the HTTP layer feeds, plus the engine gauges, in a private registry."""

    def __init__(self, stats: Callable[[], EngineStats], model_name: str) -> None:
        self._stats = stats
        self._model_name = model_name
        self._loads_seen = 0
        self.registry = CollectorRegistry()
        self.registry.register(_EngineStatsCollector(stats, model_name))
        labels = ["model_name"]
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prefill tokens processed.",
                                     labels, registry=self.registry)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Generation tokens produced.",
                                         labels, registry=self.registry)
        self.request_success = Counter(PREFIX + "request_success", "Finished requests by finish reason.",
                                       labels + ["finished_reason"], registry=self.registry)
        self.time_to_first_token = Histogram(
            PREFIX + "time_to_first_token_seconds", "Time from arrival to the first output token.",
            labels, buckets=_TTFT_BUCKETS, registry=self.registry)
        self.time_per_output_token = Histogram(
            PREFIX + "time_per_output_token_seconds", "Mean time per output token after the first.",
            labels, buckets=_TPOT_BUCKETS, registry=self.registry)
        self.e2e_request_latency = Histogram(
            PREFIX + "e2e_request_latency_seconds", "Time from arrival to the last output token.",
            labels, buckets=_E2E_BUCKETS, registry=self.registry)
        self.lora_load_latency = Histogram(
            PREFIX + "lora_adapter_load_seconds", "Time to load an adapter into the pool (from host or disk).",
            labels, buckets=_LOAD_BUCKETS, registry=self.registry)
        # every HTTP response by route template and status: 429s (queue full), 5xx, 401s for the dashboards
        self.http_responses = Counter(PREFIX + "http_responses", "HTTP responses by route and status code.",
                                      ["route", "method", "status"], registry=self.registry)

    def total_generation_tokens(self) -> float:
        """Generation tokens counted so far, all models."""
        return sum(sample.value for metric in self.generation_tokens.collect() for sample in metric.samples
                   if sample.name.endswith("_total"))

    def watch_fine_tuning(self, store) -> None:
        """Export the job store's gauges (a server with fine-tuning on)."""
        self.registry.register(_FineTuningCollector(store))

    def start_request(self, model_name: str) -> RequestTracker:
        return RequestTracker(self, model_name)

    def render(self) -> bytes:
        self._observe_adapter_loads()
        return generate_latest(self.registry)

    def _observe_adapter_loads(self) -> None:
        """The engine reports its load count and its latest load latencies; observe the new ones."""
        try:
            adapters = self._stats().adapters
        except Exception:  # noqa: BLE001 - the collector logs a dead engine
            return
        if not adapters:
            return
        new = adapters["loads"] - self._loads_seen
        self._loads_seen = adapters["loads"]
        recent = adapters["recent_load_latencies_s"]
        for latency in recent[max(0, len(recent) - new):] if new > 0 else ():
            self.lora_load_latency.labels(self._model_name).observe(latency)


class RequestTracker:
    """Times one engine request from arrival to finish and feeds `ServingMetrics`."""

    def __init__(self, metrics: ServingMetrics, model_name: str) -> None:
        self._metrics = metrics
        self._model_name = model_name
        self.arrival_time = time.monotonic()
        self.first_token_time: float | None = None
        self.num_output_tokens = 0
        self.is_finished = False
        # this request's generation-token counter, looked up once: a label lookup per streamed token cost more
        # than the rest of the token's metrics work
        self._generated = metrics.generation_tokens.labels(model_name)

    def on_output(self, out: RequestOutput) -> None:
        m, name = self._metrics, self._model_name
        if out.token_ids and self.first_token_time is None:
            self.first_token_time = time.monotonic()
            m.time_to_first_token.labels(name).observe(self.first_token_time - self.arrival_time)
            m.prompt_tokens.labels(name).inc(out.num_prompt_tokens)
        if out.token_ids:
            self._generated.inc(len(out.token_ids))
        self.num_output_tokens = out.num_output_tokens
        if out.finished:
            self.finish(out.finish_reason or "stop")

    def finish(self, finish_reason: str) -> None:
        if self.is_finished:
            return
        self.is_finished = True
        m, name = self._metrics, self._model_name
        m.request_success.labels(name, finish_reason).inc()
        if finish_reason == "abort":
            return
        now = time.monotonic()
        m.e2e_request_latency.labels(name).observe(now - self.arrival_time)
        if self.first_token_time is not None and self.num_output_tokens > 1:
            m.time_per_output_token.labels(name).observe(
                (now - self.first_token_time) / (self.num_output_tokens - 1))


class HttpMetricsMiddleware:
    """Counts every HTTP response in the app's ServingMetrics by route template (`/v1/adapters/{name}`, never
    the raw path: bounded labels), method and status; outermost, so auth failures count too."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500  # an exception that escapes before a response started

        async def send_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)
        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            metrics = getattr(scope["app"].state, "metrics", None) if "app" in scope else None
            if metrics is not None:
                metrics.http_responses.labels(getattr(route, "path", "unmatched"), scope["method"],
                                              str(status)).inc()
