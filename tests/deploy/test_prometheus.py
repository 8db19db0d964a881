"""deploy/prometheus and deploy/grafana against the real tools: `promtool` checks the committed config and rules,
then Debian's Prometheus scrapes a live loraplex server (tiny model, two adapters, a fine-tuning job, a burst
that overflows its queue) with that config, and every PromQL expression of every dashboard panel and every
rule parses and returns data through Prometheus' HTTP API; the adapter panels return one series per adapter."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.e2e.conftest import Server, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROOT = Path(__file__).parents[2]
PROMETHEUS = ROOT / "deploy" / "prometheus"
DASHBOARDS = ROOT / "deploy" / "grafana" / "dashboards"
COMPARISON = re.compile(r"\s*(>|<|==|!=|>=|<=)\s*[0-9.]+\s*$")  # an alert's threshold


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if os.environ.get("LORAPLEX_REQUIRE_SERVICES") == "1":
            pytest.fail(f"{name} is required here (apt-get install prometheus; scripts/test.sh does it)")
        pytest.skip(f"{name} is not installed (apt-get install prometheus)")
    return path


def test_promtool_accepts_the_config_and_rules():
    promtool = _binary("promtool")
    for args in (["check", "config", str(PROMETHEUS / "prometheus.yml")],
                 ["check", "rules", *map(str, sorted((PROMETHEUS / "rules").glob("*.yml")))]):
        done = subprocess.run([promtool, *args], capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stdout + done.stderr


def test_the_committed_dashboards_are_what_the_code_generates():
    done = subprocess.run([sys.executable, str(ROOT / "deploy" / "grafana" / "dashboards.py"), "--check"],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


@pytest.fixture(scope="module")
def live(default_model_dir, tmp_path_factory):
    """A loraplex server under load, scraped every second by Prometheus with our config and rules."""
    prometheus = _binary("prometheus")
    from loraplex.engine.llm_engine import _read_model_config
    from tests.adapters.peft_factory import make_tiny_model, write_random_peft
    work = tmp_path_factory.mktemp("prometheus")
    model = make_tiny_model(work / "model", default_model_dir, seed=5)
    server = Server(["--model", str(model), "--dtype", "float32", "--max-model-len", "512",
                     "--served-model-name", "tiny", "--max-num-seqs", "2", "--max-queue-len", "1"])
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(PROMETHEUS / r) for r in config["rule_files"]]
    (job,) = config["scrape_configs"]
    job["static_configs"] = [{"targets": [f"127.0.0.1:{server.port}"]}]
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = open(work / "prometheus.log", "w")  # noqa: SIM115 - closed in the finally below
    proc = subprocess.Popen([prometheus, f"--config.file={work / 'prometheus.yml'}",
                             f"--storage.tsdb.path={work / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(url + "/-/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, (work / "prometheus.log").read_text()
            time.sleep(0.2)
        config = _read_model_config(str(model))
        for i, name in enumerate(["iris", "moss"]):
            folder = write_random_peft(work / name, config, r=4, seed=i, std=0.2)
            r = httpx.post(server.base_url + "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(folder)},
                           timeout=60)
            assert r.status_code == 200, r.text
        job_id = _start_fine_tuning(server)
        _load(server, seconds=12)
        _wait_for_job(server, job_id)
        time.sleep(3)  # a few more scrapes and rule evaluations
        yield url, server
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()
        server.stop()


def _start_fine_tuning(server: Server) -> str:
    rows = [{"messages": [{"role": "user", "content": f"What colour is the zorb number {i}?"},
                          {"role": "assistant", "content": f"Zorb {i} is glimmer-teal."}]} for i in range(12)]
    data = "\n".join(json.dumps(r) for r in rows).encode()
    f = httpx.post(server.base_url + "/v1/files", files={"file": ("zorbs.jsonl", data)}, data={"purpose": "fine-tune"},
                   timeout=60)
    assert f.status_code == 200, f.text
    r = httpx.post(server.base_url + "/v1/fine_tuning/jobs", timeout=60, json={
        "model": "tiny", "training_file": f.json()["id"], "suffix": "zorbs", "seed": 0,
        "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 6, "batch_size": 2}}},
        "lora": {"r": 4, "target_modules": ["q_proj", "v_proj"], "validation_fraction": 0.25, "eval_every": 2}})
    assert r.status_code == 200, r.text
    return r.json()["id"]


def _load(server: Server, seconds: float) -> None:
    """Sequential requests on the base model and both adapters, and bursts that overflow the queue (429s)."""
    deadline = time.monotonic() + seconds
    statuses: list[int] = []

    def one(model: str) -> None:
        statuses.append(httpx.post(server.base_url + "/v1/completions", timeout=60, json={
            "model": model, "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0}).status_code)
    while time.monotonic() < deadline:
        for model in ("tiny", "iris", "moss"):
            one(model)
        burst = [threading.Thread(target=one, args=("iris",)) for _ in range(8)]
        for t in burst:
            t.start()
        for t in burst:
            t.join()
    assert 200 in statuses and 429 in statuses, sorted(set(statuses))


def _wait_for_job(server: Server, job_id: str) -> None:
    deadline = time.monotonic() + 120
    while (status := httpx.get(f"{server.base_url}/v1/fine_tuning/jobs/{job_id}").json()["status"]) not in (
            "succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, status
        time.sleep(0.5)
    assert status == "succeeded"


def _query(url: str, expr: str) -> list[dict]:
    expr = expr.replace("$__rate_interval", "1m")
    r = httpx.get(url + "/api/v1/query", params={"query": expr}, timeout=30)
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", f"{expr}: {body.get('error')}"
    return body["data"]["result"]


def _rules() -> list[dict]:
    rules = []
    for path in sorted((PROMETHEUS / "rules").glob("*.yml")):
        for group in yaml.safe_load(path.read_text())["groups"]:
            rules.extend(group["rules"])
    return rules


def test_every_dashboard_panel_returns_data(live):
    url, _ = live
    checked = 0
    for path in sorted(DASHBOARDS.glob("*.json")):
        for title, expr in _expressions(json.loads(path.read_text())):
            assert _query(url, expr), f"{path.name} / {title}: no data for {expr}"
            checked += 1
    assert checked >= 30


def test_adapter_panels_have_a_series_per_adapter(live):
    url, _ = live
    doc = json.loads((DASHBOARDS / "loraplex-adapters.json").read_text())
    for title in ("Requests/s per adapter", "Generation tokens/s per adapter"):
        (expr,) = [e for t, e in _expressions(doc) if t == title]
        names = {s["metric"].get("model_name") for s in _query(url, expr)}
        assert names == {"tiny", "iris", "moss"}, (title, names)


def _expressions(doc: dict) -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in doc["panels"] for t in p.get("targets", [])]


def test_every_rule_returns_data_and_alerts_stay_quiet(live):
    url, _ = live
    for rule in _rules():
        expr = rule["expr"]
        if "alert" in rule:
            assert _query(url, COMPARISON.sub("", expr)), f"{rule['alert']}: its query returns no data"
            _query(url, expr)  # the whole expression parses
        else:
            assert _query(url, expr), f"{rule['record']}: no data"
            assert _query(url, rule["record"]), f"{rule['record']} was never recorded"
    r = httpx.get(url + "/api/v1/rules", timeout=10).json()
    rules = [rule for group in r["data"]["groups"] for rule in group["rules"]]
    assert all(rule["health"] == "ok" for rule in rules), [(x["name"], x.get("lastError")) for x in rules]
    firing = [rule["name"] for rule in rules if rule["type"] == "alerting" and rule["state"] == "firing"]
    assert not firing  # a healthy server under light load
