"""Servers on a shared PostgreSQL database and S3 bucket (SeaweedFS), both real: what one server publishes and
stores, another with empty local folders serves and returns, with the same greedy tokens; with the database or
the bucket down, served adapters keep serving and changes are 503s that leave nothing behind; two live servers
follow each other's publishes and deletes, and a job whose server dies finishes on the other."""
from __future__ import annotations

import time
import uuid
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import Server
from tests.storage_fixtures import TEST_BUCKET

pytestmark = pytest.mark.e2e

TRAIN_LINE = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'
PROMPT = {"prompt": "The quick brown fox", "max_tokens": 12, "temperature": 0, "logprobs": 1}


def complete(server, model: str) -> tuple[str, list[float]]:
    """Greedy text and its tokens' log-probabilities (an adapter may leave the text as the base's)."""
    r = httpx.post(server.base_url + "/v1/completions", json={"model": model, **PROMPT}, timeout=60)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    return choice["text"], [round(x, 4) for x in choice["logprobs"]["token_logprobs"]]


def list_objects(shared: list[str]) -> list[str]:
    from loraplex.storage.blobs import open_blob_store
    store = open_blob_store(shared[3])
    try:
        return [b.key for b in store.list("")]
    finally:
        store.close()


def test_a_second_server_serves_what_the_first_stored(default_model_dir, quill_adapter, postgres, seaweedfs,
                                                      monkeypatch):
    for k, v in seaweedfs.env().items():
        monkeypatch.setenv(k, v)  # the servers inherit the environment: boto3 finds the endpoint there
    shared = ["--database", postgres.create_database(f"e2e_{uuid.uuid4().hex[:8]}"),
              "--blob-store", f"s3://{TEST_BUCKET}/e2e-{uuid.uuid4().hex[:8]}"]
    args = ["--model", str(default_model_dir), "--dtype", "float32", "--served-model-name", "smol", *shared]
    first = Server(args)
    try:
        r = httpx.post(first.base_url + "/v1/load_lora_adapter",
                       json={"lora_name": "quill", "lora_path": str(quill_adapter)}, timeout=60)
        assert r.status_code == 200, r.text
        base, adapted = complete(first, "smol"), complete(first, "quill")
        assert adapted != base
        upload = httpx.post(first.base_url + "/v1/files", data={"purpose": "fine-tune"}, timeout=30,
                            files={"file": ("train.jsonl", TRAIN_LINE)})
        assert upload.status_code == 200, upload.text
        file_id = upload.json()["id"]
        # the database, then the bucket, goes away: what is served keeps working; a change is a 503 that
        # leaves nothing behind (the objects of a publish whose row failed, no row for objects never written)
        for service in (postgres, seaweedfs):
            service.stop()
            try:
                assert complete(first, "quill") == adapted
                r = httpx.post(first.base_url + "/v1/load_lora_adapter", timeout=60,
                               json={"lora_name": "quill", "lora_path": str(quill_adapter), "load_inplace": True})
                assert r.status_code == 503 and r.json()["error"]["code"] == "storage_unavailable", r.text
                r = httpx.post(first.base_url + "/v1/files", data={"purpose": "fine-tune"}, timeout=30,
                               files={"file": ("t.jsonl", TRAIN_LINE)})
                assert r.status_code == 503, r.text
            finally:
                service.start()
        weights = [k for k in list_objects(shared) if k.endswith("safetensors")]
        assert len(weights) == 1 and weights[0].startswith("adapters/quill/")  # v1's only: the 503s left nothing
        r = httpx.get(first.base_url + "/v1/adapters/quill")
        assert [v["version"] for v in r.json()["versions"]] == [1]
        assert [f["id"] for f in httpx.get(first.base_url + "/v1/files").json()["data"]] == [file_id]
    finally:
        first.stop()
    # another machine: fresh --adapter-dir and --fine-tuning-dir (the Server helper makes new temp ones)
    second = Server(args)
    try:
        models = [m["id"] for m in httpx.get(second.base_url + "/v1/models").json()["data"]]
        assert "quill" in models
        assert complete(second, "quill") == adapted and complete(second, "smol") == base
        content = httpx.get(second.base_url + f"/v1/files/{file_id}/content")
        assert content.status_code == 200 and b'"hello"' in content.content
        assert httpx.delete(second.base_url + "/v1/adapters/quill").json()["deleted"] is True
    finally:
        second.stop()


# ---- two live servers on one database and bucket ---------------------------------------------------------

@pytest.fixture(scope="module")
def smol_config(default_model_dir):
    from loraplex.engine.llm_engine import _read_model_config
    return _read_model_config(str(default_model_dir))


@pytest.fixture(scope="module")
def pair(default_model_dir, postgres, seaweedfs):
    """Servers A and B on a shared PostgreSQL database and S3 bucket, each with its own local folders, leases
    of 3 s (a dead trainer's jobs move on quickly)."""
    import os
    import tempfile
    env_before = dict(os.environ)
    os.environ.update(seaweedfs.env())
    shared = ["--database", postgres.create_database(f"pair_{uuid.uuid4().hex[:8]}"),
              "--blob-store", f"s3://{TEST_BUCKET}/pair-{uuid.uuid4().hex[:8]}", "--train-lease", "3"]
    servers, dirs = [], []
    try:
        for _ in range(2):
            ft_dir = tempfile.mkdtemp(prefix="loraplex-pair-ft-")
            dirs.append(ft_dir)
            servers.append(Server(["--model", str(default_model_dir), "--dtype", "float32", "--max-model-len", "512",
                                   "--served-model-name", "smol", "--fine-tuning-dir", ft_dir, *shared]))
        yield servers, dirs, shared
    finally:
        for s in servers:
            if s.proc.poll() is None:
                s.stop()
        os.environ.clear()
        os.environ.update(env_before)


def eventually(check, timeout_s: float):
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


def test_what_one_server_publishes_or_deletes_the_other_serves_at_once(pair, smol_config, tmp_path):
    from tests.adapters.peft_factory import write_random_peft
    (a, b), _, _ = pair
    v1 = write_random_peft(tmp_path / "v1", smol_config, r=4, seed=11, std=0.05)
    v2 = write_random_peft(tmp_path / "v2", smol_config, r=4, seed=12, std=0.05)
    r = httpx.post(a.base_url + "/v1/load_lora_adapter", json={"lora_name": "rose", "lora_path": str(v1)}, timeout=60)
    assert r.status_code == 200, r.text
    on_a = complete(a, "rose")
    t0 = time.monotonic()
    assert eventually(lambda: httpx.post(b.base_url + "/v1/completions", timeout=60,
                                         json={"model": "rose", **PROMPT}).status_code == 200, 2.0)
    assert complete(b, "rose") == on_a  # pulled from S3 on its first request, same tokens
    r = httpx.post(a.base_url + "/v1/load_lora_adapter", timeout=60,
                   json={"lora_name": "rose", "lora_path": str(v2), "load_inplace": True})
    assert r.status_code == 200, r.text
    on_a2 = complete(a, "rose")
    assert on_a2 != on_a
    assert eventually(lambda: complete(b, "rose") == on_a2, 2.0)  # v2 for new requests on B too
    assert httpx.delete(a.base_url + "/v1/adapters/rose").json()["deleted"] is True
    assert eventually(lambda: httpx.post(b.base_url + "/v1/completions", timeout=60,
                                         json={"model": "rose", **PROMPT}).status_code == 404, 1.5)
    print(f"publish -> served on the other server, republish, delete -> 404: {time.monotonic() - t0:.1f} s")


def test_a_job_whose_server_dies_finishes_on_the_other(pair):
    import openai
    import psycopg

    from loraplex.trainer.job_store import process_owner_id
    from tests.e2e.test_fine_tuning_server import DATA, create_job
    servers, dirs, shared = pair
    client = openai.OpenAI(base_url=f"{servers[0].base_url}/v1", api_key="unused", max_retries=0)
    uploaded = client.files.create(file=DATA.open("rb"), purpose="fine-tune")
    job = create_job(client, uploaded.id, n_epochs=3, checkpoint_every=2)
    # whichever trainer claimed it (the one the HTTP call went to, or the other's tick): kill that server
    owners = {process_owner_id(Path(d)): i for i, d in enumerate(dirs)}
    with psycopg.connect(shared[1], autocommit=True) as conn:
        owner = eventually(lambda: conn.execute("SELECT lease_owner FROM jobs WHERE id = %s",
                                                (job.id,)).fetchone()[0], 30.0)
    trainer = owners[owner]
    deadline = time.monotonic() + 300
    while not client.fine_tuning.jobs.checkpoints.list(job.id).data:
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.3)
    servers[trainer].kill()  # SIGKILL, server and engine: its lease stops being renewed
    survivor = servers[1 - trainer]
    client = openai.OpenAI(base_url=f"{survivor.base_url}/v1", api_key="unused", max_retries=0)
    deadline = time.monotonic() + 600
    while (done := client.fine_tuning.jobs.retrieve(job.id)).status not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, f"job still {done.status}"
        time.sleep(0.5)
    assert done.status == "succeeded", done.error
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data]
    assert any(m.startswith("Resumed from the checkpoint at step") for m in messages), messages
    assert sum(m.startswith("New fine-tuned model created") for m in messages) == 1  # published once
    r = httpx.get(survivor.base_url + f"/v1/adapters/{done.fine_tuned_model}")
    assert r.status_code == 200 and [v["version"] for v in r.json()["versions"]] == [1], r.text
    assert complete(survivor, done.fine_tuned_model)[0]
