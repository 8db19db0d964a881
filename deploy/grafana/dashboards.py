"""loraplex's Grafana dashboards as code (grafana-foundation-sdk). The JSON beside it is generated from this file:

    python deploy/grafana/dashboards.py           # writes deploy/grafana/dashboards/*.json
    python deploy/grafana/dashboards.py --check   # exit 1 if a committed JSON differs (the tests run this)

Four dashboards, each with a `datasource` variable (any Prometheus that scrapes loraplex): overview (requests,
latency percentiles, tokens/s, queue, KV cache, 429s and 5xx), adapters (per-adapter requests and tokens,
residency by tier, pool pages, loads and evictions, load time), fine-tuning (jobs by status, train and
validation loss per job, the training share of the engine loop), process (device memory by kind, KV blocks).
Every expression here is evaluated against a live server by tests/deploy/test_prometheus.py.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from grafana_foundation_sdk.builders.dashboard import Dashboard, DatasourceVariable, Row
from grafana_foundation_sdk.builders.prometheus import Dataquery
from grafana_foundation_sdk.builders.stat import Panel as Stat
from grafana_foundation_sdk.builders.timeseries import Panel as Timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import DataSourceRef

OUT = Path(__file__).parent / "dashboards"
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
RATE = "$__rate_interval"


def query(expr: str, legend: str = "", ref: str = "A") -> Dataquery:
    return Dataquery().expr(expr).legend_format(legend or "__auto").ref_id(ref).datasource(DATASOURCE)


def series(title: str, unit: str, *targets: tuple[str, str], description: str = "", width: int = 12,
           minimum: float | None = 0) -> Timeseries:
    panel = Timeseries().title(title).unit(unit).datasource(DATASOURCE).span(width).height(8)
    if description:
        panel = panel.description(description)
    if minimum is not None:
        panel = panel.min(minimum)
    for i, (expr, legend) in enumerate(targets):
        panel = panel.with_target(query(expr, legend, chr(ord("A") + i)))
    return panel


def stat(title: str, unit: str, expr: str, description: str = "") -> Stat:
    panel = Stat().title(title).unit(unit).datasource(DATASOURCE).span(6).height(4).with_target(query(expr))
    return panel.description(description) if description else panel


def quantiles(metric: str, *qs: float) -> list[tuple[str, str]]:
    return [(f"histogram_quantile({q}, sum by (le) (rate({metric}_bucket[{RATE}])))", f"p{round(q * 100)}")
            for q in qs]


def dashboard(uid: str, title: str, description: str) -> Dashboard:
    return (Dashboard(title).uid(uid).description(description).tags(["loraplex"]).refresh("30s")
            .time("now-1h", "now").timezone("browser").editable()
            .with_variable(DatasourceVariable("datasource").label("Prometheus").type("prometheus")))


def overview() -> Dashboard:
    return (dashboard("loraplex-overview", "loraplex / Overview", "Traffic, latency, queue and KV cache.")
            .with_row(Row("Traffic"))
            .with_panel(stat("Requests/s", "reqps", "sum(rate(loraplex:request_success_total[5m]))"))
            .with_panel(stat("Generation tokens/s", "short", "sum(rate(loraplex:generation_tokens_total[5m]))"))
            .with_panel(stat("429 share (5m)", "percentunit",
                             '(sum(rate(loraplex:http_responses_total{status="429"}[5m])) or vector(0))'
                             " / sum(rate(loraplex:http_responses_total[5m]))",
                             "Requests refused because the queue was full (--max-queue-len)."))
            .with_panel(stat("5xx share (5m)", "percentunit",
                             '(sum(rate(loraplex:http_responses_total{status=~"5.."}[5m])) or vector(0))'
                             " / sum(rate(loraplex:http_responses_total[5m]))"))
            .with_panel(series("Finished requests by reason", "reqps",
                               (f"sum by (finished_reason) (rate(loraplex:request_success_total[{RATE}]))",
                                "{{finished_reason}}")))
            .with_panel(series("HTTP responses by status", "reqps",
                               (f"sum by (status) (rate(loraplex:http_responses_total[{RATE}]))", "{{status}}")))
            .with_panel(series("Tokens/s", "short",
                               (f"sum(rate(loraplex:generation_tokens_total[{RATE}]))", "generated"),
                               (f"sum(rate(loraplex:prompt_tokens_total[{RATE}]))", "prompt (prefill)")))
            .with_row(Row("Latency"))
            .with_panel(series("Time to first token", "s",
                               *quantiles("loraplex:time_to_first_token_seconds", 0.5, 0.95, 0.99), width=8))
            .with_panel(series("Time per output token", "s",
                               *quantiles("loraplex:time_per_output_token_seconds", 0.5, 0.95, 0.99), width=8))
            .with_panel(series("End-to-end latency", "s",
                               *quantiles("loraplex:e2e_request_latency_seconds", 0.5, 0.95, 0.99), width=8))
            .with_row(Row("Queue and KV cache"))
            .with_panel(series("Requests running and waiting", "short",
                               ("sum(loraplex:num_requests_running)", "running"),
                               ("sum(loraplex:num_requests_waiting)", "waiting")))
            .with_panel(series("KV cache usage", "percentunit",
                               ("max by (instance) (loraplex:kv_cache_usage_perc)", "{{instance}}"))))


def adapters() -> Dashboard:
    per_adapter = "sum by (model_name) (rate({metric}[" + RATE + "]))"
    return (dashboard("loraplex-adapters", "loraplex / Adapters",
                      "Per-adapter traffic (model_name is the adapter or base model a request named), residency "
                      "of adapter weights by tier, the paged LoRA pool.")
            .with_row(Row("Traffic per adapter"))
            .with_panel(series("Requests/s per adapter", "reqps",
                               (per_adapter.format(metric="loraplex:request_success_total"), "{{model_name}}")))
            .with_panel(series("Generation tokens/s per adapter", "short",
                               (per_adapter.format(metric="loraplex:generation_tokens_total"), "{{model_name}}")))
            .with_row(Row("Residency"))
            .with_panel(series("Adapters resident by tier", "short",
                               ("sum by (tier) (loraplex:lora_adapters_resident)", "{{tier}}"),
                               ("sum(loraplex:lora_adapters_registered)", "registered"), width=8))
            .with_panel(series("Adapter versions by level", "short",
                               ("count by (level) (loraplex:lora_adapter_loaded)", "{{level}}"), width=8))
            .with_panel(series("LoRA pool pages", "short",
                               ("sum(loraplex:lora_pool_pages_used)", "used"),
                               ("sum(loraplex:lora_pool_pages_free)", "free"), width=8))
            .with_row(Row("Loads"))
            .with_panel(series("Pool loads and evictions", "ops",
                               (f"sum(rate(loraplex:lora_adapter_loads_total[{RATE}]))", "loads"),
                               (f"sum(rate(loraplex:lora_adapter_evictions_total[{RATE}]))", "evictions")))
            .with_panel(series("Adapter load time", "s",
                               *quantiles("loraplex:lora_adapter_load_seconds", 0.5, 0.99))))


def fine_tuning() -> Dashboard:
    share = (f"sum(rate(loraplex:engine_training_seconds_total[{RATE}])) / "
             f"(sum(rate(loraplex:engine_training_seconds_total[{RATE}])) "
             f"+ sum(rate(loraplex:engine_inference_seconds_total[{RATE}])))")
    return (dashboard("loraplex-fine-tuning", "loraplex / Fine-tuning",
                      "Jobs by status, each job's losses (running, paused, or finished in the last hour) and "
                      "how much of the engine loop training takes (bounded by --train-share under load).")
            .with_panel(series("Jobs by status", "short",
                               ("sum by (status) (loraplex:fine_tuning_jobs)", "{{status}}"), width=8))
            .with_panel(series("Training share of the engine loop", "percentunit", (share, "training"),
                               description="Training slices / (training + inference steps), in engine-loop time.",
                               width=16))
            .with_panel(series("Training loss per job", "short",
                               ('max by (job_id, suffix) (loraplex:fine_tuning_loss{split="train"})',
                                "{{suffix}} {{job_id}}"), minimum=None))
            .with_panel(series("Validation loss per job", "short",
                               ('max by (job_id, suffix) (loraplex:fine_tuning_loss{split="valid"})',
                                "{{suffix}} {{job_id}}"), minimum=None)))


def process() -> Dashboard:
    return (dashboard("loraplex-process", "loraplex / Process", "Device memory by kind and the KV cache's blocks.")
            .with_panel(series("Device memory by kind", "bytes",
                               ("sum by (instance, kind) (loraplex:memory_bytes)", "{{instance}} {{kind}}")))
            .with_panel(series("KV cache blocks", "short",
                               ("sum(loraplex:kv_cache_total_blocks)", "total"),
                               ("sum(loraplex:kv_cache_free_blocks)", "free")))
            .with_panel(series("Scrape health", "short", ('up{job="loraplex"}', "{{instance}}"), width=24)))


DASHBOARDS = {"overview": overview, "adapters": adapters, "fine-tuning": fine_tuning, "process": process}


def render() -> dict[str, str]:
    """file name -> the dashboard's JSON text."""
    return {f"loraplex-{name}.json": json.dumps(build().build(), cls=JSONEncoder, indent=2, sort_keys=True) + "\n"
            for name, build in DASHBOARDS.items()}


def expressions(doc: dict) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every query in a dashboard's JSON."""
    return [(panel.get("title", ""), target["expr"]) for panel in doc.get("panels", [])
            for target in panel.get("targets", []) if "expr" in target]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="compare with the committed JSON instead of writing")
    ns = p.parse_args()
    stale = []
    for name, text in render().items():
        path = OUT / name
        if ns.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(name)
        else:
            OUT.mkdir(exist_ok=True)
            path.write_text(text)
            print(f"wrote {path}")
    if stale:
        print(f"out of date (run python deploy/grafana/dashboards.py): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
