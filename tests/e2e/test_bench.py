"""`loraplex bench serve` against a real server with adapters, and `loraplex bench offline` on the same
workload: both finish every request and write a valid result file."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from loraplex.adapters.synthetic import write_random_peft
from loraplex.engine.llm_engine import _read_model_config
from tests.e2e.conftest import Server

pytestmark = pytest.mark.e2e
WORKLOAD = ["--num-prompts", "12", "--input-len", "24", "--output-len", "8", "--request-rate", "20",
            "--adapter-dist", "powerlaw", "--base-fraction", "0.25", "--seed", "5"]


def bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loraplex.serve.cli", "bench", *args], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def check_result(path, kind: str, models: set[str]) -> dict:
    result = json.loads(path.read_text())
    assert result["kind"] == kind
    overall = result["overall"]
    assert (overall["requests"], overall["completed"], overall["errors"]) == (12, 12, 0)
    assert overall["total_output_tokens"] == 12 * 8  # ignore_eos: every request makes its 8 tokens
    assert overall["output_throughput"] > 0 and overall["ttft_ms"]["p50"] <= overall["e2e_ms"]["p50"]
    assert set(result["per_model"]) <= models and len(result["per_model"]) >= 2
    for r in result["requests"]:
        assert r["error"] is None and r["output_tokens"] == 8 and 0 < r["ttft_s"] <= r["e2e_s"]
        assert r["prompt_tokens"] >= 24 and r["tpot_s"] > 0
    assert result["config"]["num_adapters"] == 2 and result["config"]["request_rate"] == 20
    return result


def test_bench_serve_and_offline_on_the_same_workload(default_model_dir, tmp_path):
    config = _read_model_config(str(default_model_dir))
    folders = [write_random_peft(tmp_path / f"a{i}", config, r=8, seed=i, std=0.02) for i in range(2)]
    modules = [f"a{i}={f}" for i, f in enumerate(folders)]
    srv = Server(["--model", str(default_model_dir), "--dtype", "float32", "--max-model-len", "512",
                  "--max-num-seqs", "16", "--served-model-name", "smol", "--no-enable-training",
                  "--lora-modules", *modules])
    try:
        served = bench("serve", "--base-url", srv.base_url, "--model", "smol", "--adapters", "a0,a1", *WORKLOAD,
                       "--result-file", str(tmp_path / "serve.json"))
        assert served.returncode == 0, served.stdout + served.stderr
        assert "TTFT ms" in served.stdout
        chat = bench("serve", "--base-url", srv.base_url + "/v1", "--model", "smol", "--adapters", "a0,missing",
                     "--num-prompts", "4", "--output-len", "2", "--endpoint", "chat", "--base-fraction", "0",
                     "--result-file", str(tmp_path / "errors.json"))
    finally:
        srv.stop()
    serve_result = check_result(tmp_path / "serve.json", "serve", {"smol", "a0", "a1"})
    errors = json.loads((tmp_path / "errors.json").read_text())["overall"]
    assert errors["errors"] >= 1 and errors["completed"] + errors["errors"] == 4  # the unknown adapter: 404s
    assert "first error: HTTP 404" in chat.stdout

    offline = bench("offline", "--model", str(default_model_dir), "--dtype", "float32", "--max-model-len", "512",
                    "--served-model-name", "smol", "--lora-modules", *modules, *WORKLOAD,
                    "--result-file", str(tmp_path / "offline.json"), "--log-level", "warning")
    assert offline.returncode == 0, offline.stdout + offline.stderr
    offline_result = check_result(tmp_path / "offline.json", "offline", {"smol", "a0", "a1"})
    # the same seed: the same requests, to the same models, in both runs
    assert [(r["model"], r["arrival_s"]) for r in offline_result["requests"]] == \
        [(r["model"], r["arrival_s"]) for r in serve_result["requests"]]
    assert [r["prompt_tokens"] for r in offline_result["requests"]] == \
        [r["prompt_tokens"] for r in serve_result["requests"]]
