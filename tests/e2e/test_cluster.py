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
from pathlib import Path

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
def tiny_model(default_model_dir, tmp_path_factory):
    """A tiny random Llama with the default tokenizer: the cluster's wiring does not need a real model."""
    from tests.adapters.peft_factory import make_tiny_model
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", default_model_dir, num_layers=2, seed=3)


@pytest.fixture(scope="module")
def cluster(tiny_model, postgres, seaweedfs):
    ray, serve = _ray()
    from loraplex.serve.cluster import build_application
    env = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", **seaweedfs.env()}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    port = free_port()
    if ray.is_initialized():  # a Ray left by an earlier test in this process
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": env})
    database = postgres.create_database(f"ray_{uuid.uuid4().hex[:8]}")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        flags = ["--model", str(tiny_model), "--dtype", "float32", "--max-model-len", "512",
                 "--served-model-name", "smol", "--num-replicas", "2", "--replica-cpus", "0.5",
                 "--train-lease", "3", "--routing-stats-period", "0.5",
                 "--database", database, "--blob-store", f"s3://{TEST_BUCKET}/ray-{uuid.uuid4().hex[:8]}"]
        serve.run(build_application(flags), name="loraplex", route_prefix="/")
        base_url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while httpx.get(base_url + "/ready").status_code != 200:
            assert time.monotonic() < deadline, "the cluster's ingress is not ready"
            time.sleep(0.5)
        yield Cluster(base_url, database)
    finally:
        serve.shutdown()
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class Cluster:
    def __init__(self, base_url: str, database: str) -> None:
        self.base_url, self.database = base_url, database

    def metrics(self) -> dict[str, float]:
        out = {}
        for line in httpx.get(self.base_url + "/metrics").text.splitlines():
            if line.startswith("loraplex:replica_"):
                key, value = line.rsplit(" ", 1)
                out[key] = float(value)
        return out

    def holders(self, adapter: str) -> set[str]:
        """Replicas (host:pid) that pulled `adapter` (name@vN), as the ingress last heard from them."""
        return {_label(k, "replica") for k, v in self.metrics().items()
                if k.startswith("loraplex:replica_adapter_pulls_total{") and _label(k, "adapter") == adapter}

    def wait_for_replicas(self, n: int, timeout_s: float = 120) -> None:
        from ray import serve

        from loraplex.serve.cluster import ENGINE_DEPLOYMENT
        deadline = time.monotonic() + timeout_s
        while True:
            status = serve.status().applications["loraplex"].deployments[ENGINE_DEPLOYMENT]
            if status.replica_states.get("RUNNING", 0) == n:
                return
            assert time.monotonic() < deadline, f"engine replicas: {status.replica_states}"
            time.sleep(0.5)


def _label(key: str, name: str) -> str:
    return key.split(f'{name}="', 1)[1].split('"', 1)[0]


def complete(cluster: Cluster, model: str, prompt: str, max_tokens: int = 16) -> str:
    r = httpx.post(cluster.base_url + "/v1/completions", timeout=120,
                   json={"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_greedy_outputs_through_the_cluster_equal_one_engines(cluster, tiny_model):
    from loraplex.engine.core.sampling_params import SamplingParams
    from loraplex.engine.engine_args import EngineArgs
    from loraplex.engine.llm_engine import LLMEngine
    engine = LLMEngine.from_engine_args(EngineArgs(model=str(tiny_model), dtype="float32", max_model_len=512))
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


def test_adapters_are_pulled_by_the_replica_that_gets_them(cluster, tiny_model, tmp_path):
    from loraplex.engine.llm_engine import _read_model_config
    from tests.adapters.peft_factory import write_random_peft
    config = _read_model_config(str(tiny_model))
    v1 = write_random_peft(tmp_path / "v1", config, r=8, seed=21, std=0.3)
    v2 = write_random_peft(tmp_path / "v2", config, r=8, seed=22, std=0.3)
    r = httpx.post(cluster.base_url + "/v1/load_lora_adapter", json={"lora_name": "tulip", "lora_path": str(v1)}, timeout=120)
    assert r.status_code == 200, r.text
    base = complete(cluster, "smol", PROMPTS[1])
    first = complete(cluster, "tulip", PROMPTS[1])
    assert first != base
    assert all(complete(cluster, "tulip", PROMPTS[1]) == first for _ in range(3))
    long = {"model": "tulip", "prompt": PROMPTS[0], "max_tokens": 48, "temperature": 0, "ignore_eos": True}
    v1_only = httpx.post(cluster.base_url + "/v1/completions", json=long, timeout=120).json()["choices"][0]["text"]
    pieces = []
    with httpx.stream("POST", cluster.base_url + "/v1/completions", json={**long, "stream": True}, timeout=120) as stream:
        for line in stream.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            pieces.append(json.loads(line[6:])["choices"][0]["text"])
            if len(pieces) == 3:  # v2 published while this v1 stream runs on its replica
                r = httpx.post(cluster.base_url + "/v1/load_lora_adapter", timeout=120,
                               json={"lora_name": "tulip", "lora_path": str(v2), "load_inplace": True})
                assert r.status_code == 200, r.text
    assert "".join(pieces) == v1_only  # the stream kept v1 to its last token
    second = complete(cluster, "tulip", PROMPTS[1])
    assert second not in (first, base)  # v2 (a new multiplexed id: no replica serves v1 for it)
    assert httpx.delete(cluster.base_url + "/v1/adapters/tulip").json()["deleted"] is True
    assert httpx.post(cluster.base_url + "/v1/completions", json={"model": "tulip", "prompt": "x", "max_tokens": 1},
                      timeout=60).status_code == 404


def _upload(cluster: Cluster, name: str, folder) -> None:
    r = httpx.post(cluster.base_url + "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(folder)},
                   timeout=120)
    assert r.status_code == 200, r.text


def test_each_version_is_loaded_once_per_replica_under_spaced_traffic(cluster, tiny_model, tmp_path):
    """Sequential requests over four adapters: each version is pulled by one replica, once (the router keeps a
    version where it is held; nothing is busy enough to spread), and they end up on both replicas (a version
    nobody holds goes to the replica with fewer adapters)."""
    from loraplex.engine.llm_engine import _read_model_config
    from tests.adapters.peft_factory import write_random_peft
    config = _read_model_config(str(tiny_model))
    names = [f"bloom{i}" for i in range(4)]
    for i, name in enumerate(names):
        _upload(cluster, name, write_random_peft(tmp_path / name, config, r=4, seed=40 + i, std=0.3))
    for round in range(4):
        for name in names:
            complete(cluster, name, PROMPTS[round % len(PROMPTS)], max_tokens=4)
        time.sleep(0.3)  # spaced: the replicas' residency reaches the router between rounds
    for name in names:  # one more request each: every replica reports its pulls with its requests' last output
        complete(cluster, name, PROMPTS[0], max_tokens=2)
    pulls = {k: v for k, v in cluster.metrics().items() if k.startswith("loraplex:replica_adapter_pulls_total{")
             and _label(k, "adapter").startswith("bloom")}
    assert sorted(_label(k, "adapter") for k in pulls) == [f"{n}@v1" for n in names], pulls  # one replica each
    assert set(pulls.values()) == {1.0}, pulls  # loaded once there
    assert len({_label(k, "replica") for k in pulls}) == 2, pulls  # spread over both replicas


def _stream(cluster: Cluster, body: dict, events: list, kill_after: int | None = None, kill=None) -> None:
    with httpx.stream("POST", cluster.base_url + "/v1/completions", json={**body, "stream": True},
                      timeout=120) as stream:
        for line in stream.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
                if kill is not None and len(events) == kill_after:
                    kill()


def test_a_replica_killed_mid_stream_ends_that_stream_with_an_error(cluster, tiny_model, tmp_path):
    """SIGKILL the replica serving a stream: that client gets an error event and the end of the stream (not a
    hang), a stream on the other replica finishes untouched, and Ray starts a new replica."""
    import signal
    import threading

    from loraplex.engine.llm_engine import _read_model_config
    from tests.adapters.peft_factory import write_random_peft
    config = _read_model_config(str(tiny_model))
    placed: dict[str, str] = {}  # replica -> an adapter only it holds
    for i in range(6):
        name = f"moss{i}"
        _upload(cluster, name, write_random_peft(tmp_path / name, config, r=4, seed=60 + i, std=0.3))
        complete(cluster, name, PROMPTS[0], max_tokens=2)
        time.sleep(0.6)
        (holder,) = cluster.holders(f"{name}@v1")
        placed.setdefault(holder, name)
        if len(placed) == 2:
            break
    (victim, doomed), (_, spared) = sorted(placed.items())
    long = {"prompt": PROMPTS[1], "max_tokens": 400, "temperature": 0, "ignore_eos": True}
    spared_events: list = []
    other = threading.Thread(target=_stream, args=(cluster, {**long, "model": spared}, spared_events))
    other.start()
    doomed_events: list = []
    t0 = time.monotonic()
    _stream(cluster, {**long, "model": doomed}, doomed_events, kill_after=3,
            kill=lambda: os.kill(int(victim.rsplit(":", 1)[1]), signal.SIGKILL))
    other.join(120)
    assert time.monotonic() - t0 < 60
    assert "error" in doomed_events[-1], doomed_events[-3:]
    assert doomed_events[-1]["error"]["code"] == "replica_failed", doomed_events[-1]
    assert sum(len(e["choices"]) for e in doomed_events[:-1]) < 400
    assert "error" not in spared_events[-1] and spared_events[-1]["choices"][0]["finish_reason"] == "length"
    assert complete(cluster, doomed, PROMPTS[0], max_tokens=2)  # pulled again by a live replica
    cluster.wait_for_replicas(2)  # Ray replaced the dead one


def test_a_job_whose_replica_dies_finishes_on_another_from_its_checkpoint(cluster):
    import glob
    import signal
    import tempfile

    import openai
    import psycopg

    from loraplex.trainer.job_store import process_owner_id
    from tests.e2e.test_fine_tuning_server import DATA, create_job
    cluster.wait_for_replicas(2)
    client = openai.OpenAI(base_url=f"{cluster.base_url}/v1", api_key="unused", max_retries=0)
    uploaded = client.files.create(file=DATA.open("rb"), purpose="fine-tune")
    job = create_job(client, uploaded.id, n_epochs=40, checkpoint_every=2, target_modules=["q_proj", "v_proj"])
    with psycopg.connect(cluster.database, autocommit=True) as conn:
        deadline = time.monotonic() + 60
        while not (owner := conn.execute("SELECT lease_owner FROM jobs WHERE id = %s", (job.id,)).fetchone()[0]):
            assert time.monotonic() < deadline, "no replica claimed the job"
            time.sleep(0.1)
    # the replica's lease owner is its local folder's: loraplex-replica-<pid>-*/fine_tuning
    folders = glob.glob(os.path.join(tempfile.gettempdir(), "loraplex-replica-*", "fine_tuning"))
    (folder,) = [f for f in folders if process_owner_id(Path(f)) == owner]
    pid = int(Path(folder).parent.name.split("-")[2])
    deadline = time.monotonic() + 120
    while not client.fine_tuning.jobs.checkpoints.list(job.id).data:
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.1)
    assert client.fine_tuning.jobs.retrieve(job.id).status == "running", "the job ended before its replica died"
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 180
    while (done := client.fine_tuning.jobs.retrieve(job.id)).status not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, f"job still {done.status}"
        time.sleep(0.5)
    assert done.status == "succeeded", done.error
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100)]  # all pages
    assert any(m.startswith("Resumed from the checkpoint at step") for m in messages), messages
    assert sum(m.startswith("New fine-tuned model created") for m in messages) == 1  # published once
    r = httpx.get(cluster.base_url + f"/v1/adapters/{done.fine_tuned_model}")
    assert r.status_code == 200 and [v["version"] for v in r.json()["versions"]] == [1], r.text
    assert complete(cluster, done.fine_tuned_model, PROMPTS[0], max_tokens=2)
