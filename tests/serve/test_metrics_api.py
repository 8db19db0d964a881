"""/metrics exposes vLLM-like `loraplex:` metrics from a per-app registry."""
from __future__ import annotations

from loraplex.serve.app import build_app
from tests.serve.fake_engine import MODEL_NAME, FakeEngine

NAMES = [
    "loraplex:num_requests_running", "loraplex:num_requests_waiting", "loraplex:kv_cache_usage_perc",
    "loraplex:prompt_tokens_total", "loraplex:generation_tokens_total", "loraplex:request_success_total",
    "loraplex:time_to_first_token_seconds_bucket", "loraplex:time_per_output_token_seconds_bucket",
    "loraplex:e2e_request_latency_seconds_bucket",
]


def _samples(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def test_metrics_after_requests(client, engine):
    r = client.post("/v1/chat/completions", json={"model": MODEL_NAME, "max_tokens": 4,
                                                  "messages": [{"role": "user", "content": "hi"}]})
    prompt_tokens = r.json()["usage"]["prompt_tokens"]
    client.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "abc"})  # runs to EOS
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    for name in NAMES:
        assert name in r.text, name
    samples = _samples(r.text)
    label = '{model_name="fake-model"}'
    assert samples[f"loraplex:prompt_tokens_total{label}"] == prompt_tokens + 3
    assert samples[f"loraplex:generation_tokens_total{label}"] == 4 + len(engine.reply_ids) + 1
    assert samples['loraplex:request_success_total{finished_reason="length",model_name="fake-model"}'] == 1
    assert samples['loraplex:request_success_total{finished_reason="stop",model_name="fake-model"}'] == 1
    assert samples[f"loraplex:time_to_first_token_seconds_count{label}"] == 2
    assert abs(samples[f"loraplex:kv_cache_usage_perc{label}"] - 0.1) < 1e-9 # the fake reports 90 of 100 blocks free
    assert samples[f"loraplex:num_requests_running{label}"] == 0
    # speculative decoding's counters, as the engine reports them (vLLM's spec_decode_* names)
    assert samples[f"loraplex:spec_decode_num_draft_tokens_total{label}"] == 12
    assert samples[f"loraplex:spec_decode_num_accepted_tokens_total{label}"] == 9


def test_registries_are_per_app():
    a, b = build_app(FakeEngine(), ["a"]), build_app(FakeEngine(), ["b"])
    a.state.metrics.start_request("a").finish("stop")
    assert 'model_name="a"' in a.state.metrics.render().decode()
    assert 'finished_reason="stop"' not in b.state.metrics.render().decode()


def test_scrape_survives_a_dead_engine():
    engine = FakeEngine()

    def broken_stats():
        raise RuntimeError("loop died")
    engine.stats = broken_stats
    text = build_app(engine, [MODEL_NAME]).state.metrics.render().decode()
    assert "loraplex:num_requests_running" not in text and "loraplex:prompt_tokens" in text


def test_gateway_inference_extension_lora_metrics():
    """The model-server protocol an endpoint picker (GIE / llm-d) reads: queue and KV gauges, and the LoRA
    info gauge naming the adapters of running and waiting requests, plus per-version residency."""
    import time

    from loraplex.engine.core.outputs import EngineStats
    engine = FakeEngine()
    adapters = {"pages_used": 8, "pages_free": 24, "resident_device": 1, "resident_host": 2, "registered": 2,
                "loads": 3, "evictions": 1, "recent_load_latencies_s": [], "running_names": ["poet", "rose"],
                "waiting_names": ["iris"], "max_loras": 8,
                "residency": [("poet", 2, "device", 16), ("rose", 1, "host", 8)]}
    engine.stats = lambda: EngineStats(num_running=2, num_waiting=1, num_free_blocks=50, num_total_blocks=100,
                                       adapters=adapters)
    before = time.time()
    samples = _samples(build_app(engine, [MODEL_NAME]).state.metrics.render().decode())
    info = [(k, v) for k, v in samples.items() if k.startswith("loraplex:lora_requests_info{")]
    assert len(info) == 1
    assert info[0][0] == ('loraplex:lora_requests_info{max_lora="8",running_lora_adapters="poet,rose",'
                          'waiting_lora_adapters="iris"}') and info[0][1] >= before
    assert samples['loraplex:lora_adapter_loaded{adapter_name="poet",level="device",rank="16",version="2"}'] == 1
    assert samples['loraplex:lora_adapter_loaded{adapter_name="rose",level="host",rank="8",version="1"}'] == 1
    assert samples['loraplex:num_requests_waiting{model_name="fake-model"}'] == 1
    assert samples['loraplex:kv_cache_usage_perc{model_name="fake-model"}'] == 0.5


def test_cluster_ingress_reports_each_replica():
    """A cluster ingress's engine reports each replica's own gauges beside their sums, and the adapter versions
    each replica pulled (the replica label keeps them apart)."""
    from loraplex.engine.core.outputs import EngineStats
    engine = FakeEngine()
    one = EngineStats(num_running=3, num_waiting=1, num_free_blocks=25, num_total_blocks=100,
                      adapters={"pages_free": 4, "residency": [("poet", 2, "device", 8)], "pulls": {"poet@v2": 1}})
    two = EngineStats(num_running=1, num_waiting=0, num_free_blocks=100, num_total_blocks=100,
                      adapters={"pages_free": 12, "residency": [], "pulls": {}})
    engine.stats = lambda: EngineStats(num_running=4, num_waiting=1, num_free_blocks=125, num_total_blocks=200,
                                       replicas={"r1": one, "r2": two})
    samples = _samples(build_app(engine, [MODEL_NAME]).state.metrics.render().decode())
    assert samples['loraplex:num_requests_running{model_name="fake-model"}'] == 4
    assert samples['loraplex:replica_num_requests_running{model_name="fake-model",replica="r1"}'] == 3
    assert samples['loraplex:replica_num_requests_running{model_name="fake-model",replica="r2"}'] == 1
    assert samples['loraplex:replica_kv_cache_usage_perc{model_name="fake-model",replica="r1"}'] == 0.75
    assert samples['loraplex:replica_lora_pool_pages_free{model_name="fake-model",replica="r2"}'] == 12
    assert samples['loraplex:replica_lora_adapter_loaded{adapter_name="poet",level="device",replica="r1",'
                   'version="2"}'] == 1
    assert samples['loraplex:replica_adapter_pulls_total{adapter="poet@v2",replica="r1"}'] == 1
    assert not any("replica=\"r2\"" in k for k in samples if k.startswith("loraplex:replica_adapter_pulls"))


def test_http_responses_by_route_template_and_status(client):
    client.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "hi", "max_tokens": 2})
    client.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "hi", "max_tokens": -1})
    client.get("/v1/models/nope")
    client.get("/no/such/path")
    samples = _samples(client.get("/metrics").text)
    http = {k: v for k, v in samples.items() if k.startswith("loraplex:http_responses_total{")}
    assert http['loraplex:http_responses_total{method="POST",route="/v1/completions",status="200"}'] == 1
    assert http['loraplex:http_responses_total{method="POST",route="/v1/completions",status="400"}'] == 1
    assert http['loraplex:http_responses_total{method="GET",route="/v1/models/{model:path}",status="404"}'] == 1
    assert http['loraplex:http_responses_total{method="GET",route="unmatched",status="404"}'] == 1
