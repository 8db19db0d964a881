"""Servers on a shared PostgreSQL database and S3 bucket (SeaweedFS), both real: what one server publishes and
stores, another with empty local folders serves and returns, with the same greedy tokens."""
from __future__ import annotations

import uuid

import httpx
import pytest

from tests.e2e.conftest import Server

pytestmark = pytest.mark.e2e

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
              "--blob-store", f"s3://loraplex-e2e-{uuid.uuid4().hex[:8]}/prod"]
    args = ["--model", str(default_model_dir), "--dtype", "float32", "--served-model-name", "smol", *shared]
    first = Server(args)
    try:
        r = httpx.post(first.base_url + "/v1/load_lora_adapter",
                       json={"lora_name": "quill", "lora_path": str(quill_adapter)}, timeout=60)
        assert r.status_code == 200, r.text
        base, adapted = complete(first, "smol"), complete(first, "quill")
        assert adapted != base
        upload = httpx.post(first.base_url + "/v1/files", data={"purpose": "fine-tune"}, timeout=30,
                            files={"file": ("train.jsonl", b'{"messages": [{"role": "user", "content": "hi"}, '
                                                           b'{"role": "assistant", "content": "hello"}]}\n')})
        assert upload.status_code == 200, upload.text
        file_id = upload.json()["id"]
        # the database goes away: what is served keeps working; a change is a 503 and changes nothing
        postgres.stop()
        try:
            assert complete(first, "quill") == adapted
            r = httpx.post(first.base_url + "/v1/load_lora_adapter", timeout=60,
                           json={"lora_name": "quill", "lora_path": str(quill_adapter), "load_inplace": True})
            assert r.status_code == 503 and r.json()["error"]["code"] == "storage_unavailable", r.text
        finally:
            postgres.start()
        weights = [k for k in list_objects(shared) if k.endswith("safetensors")]
        assert len(weights) == 1 and weights[0].startswith("adapters/quill/")  # v1's only: the 503 left nothing
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
