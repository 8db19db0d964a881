"""loraplex on Ray Serve (serve/cluster.py), for real: a local Ray instance, an ingress and two engine replicas
of the default model on a shared PostgreSQL database and S3 bucket (SeaweedFS). Greedy outputs through the
cluster equal a single engine's; an adapter uploaded through the ingress is pulled by whichever replica gets
it, a republished name serves v2 to new requests while a v1 stream in flight ends on v1, and a delete is a
404."""
from __future__ import annotations

import json
import os
import socket
import time
import uuid

import httpx
import pytest

from tests.storage_fixtures import TEST_BUCKET

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):"]


def _ray():
    try:
        import ray
        from ray import serve
    except ImportError:
        if os.environ.get("LORAPLEX_REQUIRE_SERVICES") == "1":
            pytest.fail("Ray Serve is required here (pip install '.[cluster]')")
        pytest.skip("Ray Serve is not installed (pip install '.[cluster]')")
    return ray, serve


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(default_model_dir, postgres, seaweedfs):
    ray, serve = _ray()
    from loraplex.serve.cluster import build_application
    env = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", **seaweedfs.env()}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    port = free_port()
    if ray.is_initialized():  # a Ray left by an earlier test in this process
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": env})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        flags = ["--model", str(default_model_dir), "--dtype", "float32", "--max-model-len", "512",
                 "--served-model-name", "smol", "--num-replicas", "2", "--replica-cpus", "0.5",
                 "--no-enable-training",
                 "--database", postgres.create_database(f"ray_{uuid.uuid4().hex[:8]}"),
                 "--blob-store", f"s3://{TEST_BUCKET}/ray-{uuid.uuid4().hex[:8]}"]
        serve.run(build_application(flags), name="loraplex", route_prefix="/")
        base_url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while httpx.get(base_url + "/ready").status_code != 200:
            assert time.monotonic() < deadline, "the cluster's ingress is not ready"
            time.sleep(0.5)
        yield base_url
    finally:
        serve.shutdown()
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def complete(base_url: str, model: str, prompt: str) -> str:
    r = httpx.post(base_url + "/v1/completions", timeout=120,
                   json={"model": model, "prompt": prompt, "max_tokens": 16, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_greedy_outputs_through_the_cluster_equal_one_engines(cluster, default_model_dir):
    from loraplex.engine.core.sampling_params import SamplingParams
    from loraplex.engine.engine_args import EngineArgs
    from loraplex.engine.llm_engine import LLMEngine
    engine = LLMEngine.from_engine_args(EngineArgs(model=str(default_model_dir), dtype="float32", max_model_len=512))
    want = []
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(str(i), engine.tokenizer(prompt)["input_ids"], SamplingParams(max_tokens=16, temperature=0))
    texts: dict[str, list[int]] = {str(i): [] for i in range(len(PROMPTS))}
    while engine.has_unfinished_requests():
        for out in engine.step():
            texts[out.request_id].extend(out.token_ids)
    want = [engine.tokenizer.decode(texts[str(i)]) for i in range(len(PROMPTS))]
    for _ in range(2):  # base requests are balanced over both replicas: each gives the same tokens
        assert [complete(cluster, "smol", p) for p in PROMPTS] == want


def test_adapters_are_pulled_by_the_replica_that_gets_them(cluster, default_model_dir, tmp_path):
    from loraplex.engine.llm_engine import _read_model_config
    from tests.adapters.peft_factory import write_random_peft
    config = _read_model_config(str(default_model_dir))
    v1 = write_random_peft(tmp_path / "v1", config, r=8, seed=21, std=0.06)
    v2 = write_random_peft(tmp_path / "v2", config, r=8, seed=22, std=0.06)
    r = httpx.post(cluster + "/v1/load_lora_adapter", json={"lora_name": "tulip", "lora_path": str(v1)}, timeout=120)
    assert r.status_code == 200, r.text
    base = complete(cluster, "smol", PROMPTS[1])
    first = complete(cluster, "tulip", PROMPTS[1])
    assert first != base
    assert all(complete(cluster, "tulip", PROMPTS[1]) == first for _ in range(3))
    long = {"model": "tulip", "prompt": PROMPTS[0], "max_tokens": 48, "temperature": 0, "ignore_eos": True}
    v1_only = httpx.post(cluster + "/v1/completions", json=long, timeout=120).json()["choices"][0]["text"]
    pieces = []
    with httpx.stream("POST", cluster + "/v1/completions", json={**long, "stream": True}, timeout=120) as stream:
        for line in stream.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            pieces.append(json.loads(line[6:])["choices"][0]["text"])
            if len(pieces) == 3:  # v2 published while this v1 stream runs on its replica
                r = httpx.post(cluster + "/v1/load_lora_adapter", timeout=120,
                               json={"lora_name": "tulip", "lora_path": str(v2), "load_inplace": True})
                assert r.status_code == 200, r.text
    assert "".join(pieces) == v1_only  # the stream kept v1 to its last token
    second = complete(cluster, "tulip", PROMPTS[1])
    assert second not in (first, base)  # v2 (a new multiplexed id: no replica serves v1 for it)
    assert httpx.delete(cluster + "/v1/adapters/tulip").json()["deleted"] is True
    assert httpx.post(cluster + "/v1/completions", json={"model": "tulip", "prompt": "x", "max_tokens": 1},
                      timeout=60).status_code == 404
