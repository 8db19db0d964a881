"""OpenAI's fine-tuning API over HTTP: /v1/files and /v1/fine_tuning/jobs through the official client, bad
requests (that change nothing), engine control calls, publishing a trained job, and the admin key."""
from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import openai
import pytest
from starlette.testclient import TestClient

from loraplex.adapters.errors import AdapterError
from loraplex.engine.core.errors import EngineDeadError
from loraplex.serve.adapter_service import AdapterSettings
from loraplex.serve.app import build_app
from loraplex.serve.fine_tuning_routes import is_fine_tuning_admin_route
from loraplex.serve.fine_tuning_service import (
    FineTuningService,
    FineTuningSettings,
    sanitize_filename,
)
from loraplex.trainer.job_store import JobStore
from tests.serve.fake_engine import MODEL_NAME

MAX_FILE_BYTES = 4096
EXAMPLE = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
TRAIN = (json.dumps(EXAMPLE) + "\n").encode() * 3
FILES, JOBS = "/v1/files", "/v1/fine_tuning/jobs"


class FakeAdapters:
    """AdapterService's publish_folder, recorded."""

    def __init__(self) -> None:
        self.settings = AdapterSettings(Path("/unused"), max_lora_rank=32)
        self.published: list[tuple] = []
        self.error: Exception | None = None

    async def publish_folder(self, name: str, folder: Path, *, allow_bin: bool, replace: bool,
                             skip_if_same: bool = False):
        self.published.append((name, folder, allow_bin, replace))
        if self.error is not None:
            raise self.error

    async def engine_limits(self) -> dict[str, int]:
        return {"pool_pages": 1024, "max_lora_rank": 32, "max_mixlora_experts": 16, "max_mixlora_adapters": 16}


@pytest.fixture
def adapters() -> FakeAdapters:
    return FakeAdapters()


@pytest.fixture
def service(engine, adapters, tmp_path) -> FineTuningService:
    return FineTuningService(engine, adapters, FineTuningSettings(tmp_path / "ft", max_file_bytes=MAX_FILE_BYTES),
                             [MODEL_NAME])


@pytest.fixture
def ft_client(engine, service):
    with TestClient(build_app(engine, [MODEL_NAME], fine_tuning=service), raise_server_exceptions=False) as c:
        yield c


@pytest.fixture
def ft_oai(ft_client) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=ft_client, max_retries=0)


def _error(r, status: int, param: str | None = "any") -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param != "any":
        assert err["param"] == param, err
    return err


def _upload(oai: openai.OpenAI, data: bytes = TRAIN, name: str = "train.jsonl"):
    return oai.files.create(file=(name, data), purpose="fine-tune")


def _nothing_stored(client, service) -> None:
    assert client.get(FILES).json()["data"] == []
    assert service.store.blobs.list("files/") == []


def _no_jobs(client, engine) -> None:
    assert client.get(JOBS).json()["data"] == []
    assert [c for c in engine.calls if c[0] == "train_submit"] == []


def _wait_for_status(client, job_id: str, status: str, timeout_s: float = 5.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        job = client.get(f"{JOBS}/{job_id}").json()
        if job["status"] == status or time.monotonic() > deadline:
            return job
        time.sleep(0.02)


# ---- files ------------------------------------------------------------------------------------------

def test_upload_list_retrieve_content_delete(ft_oai, ft_client, service):
    f = _upload(ft_oai)
    assert f.id.startswith("file-") and len(f.id) == 29
    assert (f.object, f.bytes, f.filename, f.purpose, f.status) == ("file", len(TRAIN), "train.jsonl", "fine-tune",
                                                                    "processed")
    g = _upload(ft_oai, name="second.jsonl")
    assert [x.id for x in ft_oai.files.list()] == [g.id, f.id]
    assert [x.id for x in ft_oai.files.list(purpose="fine-tune")] == [g.id, f.id]
    assert ft_client.get(FILES, params={"purpose": "assistants"}).json()["data"] == []
    assert ft_oai.files.retrieve(f.id).model_dump(exclude_none=True) == f.model_dump(exclude_none=True)
    assert ft_oai.files.content(f.id).read() == TRAIN
    deleted = ft_oai.files.delete(f.id)
    assert (deleted.id, deleted.deleted, deleted.object) == (f.id, True, "file")
    with pytest.raises(openai.NotFoundError):
        ft_oai.files.retrieve(f.id)
    with pytest.raises(openai.NotFoundError):
        ft_oai.files.delete(f.id)
    _error(ft_client.get(f"{FILES}/{f.id}/content"), 404, param="file_id")
    _error(ft_client.get(f"{FILES}/../jobs.sqlite3/content"), 404)
    assert [x.id for x in ft_oai.files.list()] == [g.id]


def test_bad_purpose_and_bad_form(ft_oai, ft_client, service):
    with pytest.raises(openai.BadRequestError, match="purpose"):
        ft_oai.files.create(file=("a.jsonl", TRAIN), purpose="assistants")
    _error(ft_client.post(FILES, files={"file": ("a.jsonl", TRAIN)}), 400, param="purpose")
    _error(ft_client.post(FILES, data={"purpose": "fine-tune"}, files={"other": ("a", b"x")}), 400, param="file")
    _error(ft_client.post(FILES, json={"purpose": "fine-tune"}), 400)
    _nothing_stored(ft_client, service)


@pytest.mark.parametrize("data,line", [
    (TRAIN + b'{"messages": [\n', 4),
    (b'{"messages": [{"role": "user", "content": "hi"}]}\n', 1),  # nothing to train on
    (TRAIN + b'{"messages": [{"role": "wizard", "content": "x"}]}\n', 4),
    (b"\xff\xfe" + TRAIN, 1),
])
def test_bad_training_file_refused(ft_client, service, data, line):
    r = ft_client.post(FILES, data={"purpose": "fine-tune"}, files={"file": ("bad.jsonl", data)})
    err = _error(r, 400, param="file")
    assert f"line {line}" in err["message"] and err["code"] == "invalid_file"
    _nothing_stored(ft_client, service)


def test_empty_file_refused(ft_client, service):
    err = _error(ft_client.post(FILES, data={"purpose": "fine-tune"}, files={"file": ("e.jsonl", b"")}), 400)
    assert "empty" in err["message"]
    _nothing_stored(ft_client, service)


def test_oversized_file(ft_oai, ft_client, service):
    big = (json.dumps(EXAMPLE) + "\n").encode() * (MAX_FILE_BYTES // len(TRAIN) * 3 + 3)
    assert len(big) > MAX_FILE_BYTES
    with pytest.raises(openai.APIStatusError) as info:
        _upload(ft_oai, big)
    assert info.value.status_code == 413
    # a body past the multipart allowance: refused by its Content-Length, or while streaming when it has none
    huge = b"x" * (MAX_FILE_BYTES + (64 << 10) + 1)
    err = _error(ft_client.post(FILES, data={"purpose": "fine-tune"}, files={"file": ("h.jsonl", huge)}), 413)
    assert err["code"] == "file_too_large" and "4 KiB" in err["message"]

    def chunks():
        yield b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.jsonl\"\r\n\r\n"
        for _ in range(100):
            yield b"x" * 1024
    r = ft_client.post(FILES, content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"})
    _error(r, 413)
    _nothing_stored(ft_client, service)
    assert _upload(ft_oai).bytes == len(TRAIN)  # still serving


def test_filename_sanitised(ft_oai):
    assert _upload(ft_oai, name="../../etc/passwd").filename == "passwd"
    assert sanitize_filename("C:\\data\\train.jsonl") == "train.jsonl"
    assert sanitize_filename("a\x00b\nc.jsonl") == "abc.jsonl"
    assert sanitize_filename("..") == sanitize_filename("") == sanitize_filename(None) == "upload.jsonl"
    long = sanitize_filename("x" * 1000 + ".jsonl")
    assert len(long) == 255 and long.endswith(".jsonl")


def test_file_in_use_cannot_be_deleted(ft_oai, ft_client):
    f = _upload(ft_oai)
    job = ft_oai.fine_tuning.jobs.create(model=MODEL_NAME, training_file=f.id)
    with pytest.raises(openai.ConflictError, match="has not finished"):
        ft_oai.files.delete(f.id)
    assert ft_oai.files.retrieve(f.id).id == f.id
    ft_oai.fine_tuning.jobs.cancel(job.id)
    assert ft_oai.files.delete(f.id).deleted


# ---- jobs -------------------------------------------------------------------------------------------

def test_create_with_method(ft_oai, engine):
    f = _upload(ft_oai)
    v = _upload(ft_oai, name="valid.jsonl")
    job = ft_oai.fine_tuning.jobs.create(
        model=MODEL_NAME, training_file=f.id, validation_file=v.id, suffix="my-bot_1", seed=42,
        method={"type": "supervised", "supervised": {"hyperparameters": {
            "n_epochs": 2, "batch_size": 8, "learning_rate_multiplier": 0.5}}})
    assert job.id.startswith("ftjob-") and job.object == "fine_tuning.job"
    assert (job.status, job.model, job.training_file, job.validation_file) == ("queued", MODEL_NAME, f.id, v.id)
    assert (job.seed, job.user_provided_suffix, job.fine_tuned_model, job.finished_at) == (42, "my-bot_1", None, None)
    hp = {"n_epochs": 2, "batch_size": 8, "learning_rate_multiplier": 0.5}
    assert job.hyperparameters.model_dump() == hp
    assert job.method.type == "supervised" and job.method.supervised.hyperparameters.model_dump() == hp
    assert engine.calls == [("train_submit", job.id)]
    assert ft_oai.fine_tuning.jobs.retrieve(job.id).model_dump() == job.model_dump()
    messages = [e.message for e in ft_oai.fine_tuning.jobs.list_events(job.id)]
    assert messages == ["Files validated, moving job to queued state", f"Created fine-tuning job: {job.id}"]


def test_create_with_legacy_hyperparameters_and_auto(ft_oai, ft_client, engine):
    f = _upload(ft_oai)
    job = ft_oai.fine_tuning.jobs.create(model=MODEL_NAME, training_file=f.id, hyperparameters={
        "n_epochs": "auto", "batch_size": 16, "learning_rate_multiplier": "auto"})
    # "auto" stays until the engine side has read the data (trainer/defaults.py resolves it, then the job shows it)
    assert job.hyperparameters.model_dump() == {"n_epochs": "auto", "batch_size": 16,
                                                "learning_rate_multiplier": "auto"}
    plain = ft_client.post(JOBS, json={"model": MODEL_NAME, "training_file": f.id}).json()
    assert plain["hyperparameters"] == {"n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": "auto"}
    assert 0 <= plain["seed"] < 2 ** 31 and plain["user_provided_suffix"] is None
    assert plain["lora"] == {"r": 16, "alpha": 32.0, "dropout": 0.0, "use_rslora": False, "use_dora": False,
                             "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
    supervised_only = ft_client.post(JOBS, json={"model": MODEL_NAME, "training_file": f.id,
                                                 "method": {"type": "supervised"}}).json()
    assert supervised_only["hyperparameters"]["n_epochs"] == "auto"
    assert [c[0] for c in engine.calls] == ["train_submit"] * 3


def test_lora_extension(ft_client, ft_oai, service):
    f = _upload(ft_oai)
    lora = {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"], "use_rslora": True,
            "use_dora": True, "max_length": 256, "micro_batch_size": 2, "eval_every": 5, "checkpoint_every": 10,
            "early_stopping_patience": 2, "packing": True, "template": "chatml", "validation_fraction": 0.2,
            "warmup_ratio": 0.1, "self_distillation": 1.0, "self_distillation_kl": True}
    r = ft_client.post(JOBS, json={"model": MODEL_NAME, "training_file": f.id, "lora": lora})
    assert r.status_code == 200, r.text
    assert r.json()["lora"] == {**lora, "alpha": 32.0}
    record = service.store.get_job(r.json()["id"])  # what the engine side reads
    assert record.lora == {**lora, "alpha": 32.0}


def test_mixlora_lora_extension(ft_client, ft_oai, service):
    f = _upload(ft_oai)
    lora = {"type": "mixlora", "r": 8, "alpha": 16, "num_experts": 4, "top_k": 1, "router_aux_loss_coef": 0.001,
            "jitter_noise": 0.01, "expert_lora": {"r": 4, "lora_alpha": 8}, "target_modules": ["q_proj", "up_proj"]}
    r = ft_client.post(JOBS, json={"model": MODEL_NAME, "training_file": f.id, "lora": lora})
    assert r.status_code == 200, r.text
    stored = service.store.get_job(r.json()["id"]).lora
    assert stored == r.json()["lora"]
    assert stored | {"alpha": 16} == {"type": "mixlora", "r": 8, "alpha": 16, "dropout": 0.0, "use_rslora": False,
                                      "use_dora": False,
                                      "target_modules": ["q_proj", "up_proj"], "num_experts": 4, "top_k": 1,
                                      "routing_strategy": "mixlora", "top_p": 0.8, "temperature": 0.0,
                                      "router_aux_loss_coef": 0.001, "router_init_range": 0.02, "jitter_noise": 0.01,
                                      "expert_r": 4, "expert_alpha": 8.0}
    from loraplex.trainer.defaults import (
        resolve_lora,  # what the engine side builds from it
    )
    spec, extras = resolve_lora(stored)
    assert spec.expert_rank == 4 and spec.num_experts == 4 and not extras
    defaults = ft_client.post(JOBS, json={"model": MODEL_NAME, "training_file": f.id, "lora": {"type": "mixlora"}})
    assert defaults.json()["lora"]["num_experts"] == 8 and defaults.json()["lora"]["top_k"] == 2
    assert len(defaults.json()["lora"]["target_modules"]) == 7


@pytest.mark.parametrize("patch,param", [
    ({"lora": {"type": "moe"}}, "lora.type"),
    ({"lora": {"num_experts": 4}}, "lora"),  # a MixLoRA setting on a plain LoRA job: refused, not ignored
    ({"lora": {"type": "mixlora", "num_experts": 0}}, "lora"),
    ({"lora": {"type": "mixlora", "num_experts": 4, "top_k": 5}}, "lora"),
    ({"lora": {"type": "mixlora", "routing_strategy": "mixlora-switch"}}, "lora"),
    ({"lora": {"type": "mixlora", "target_modules": ["q_proj", "v_proj"]}}, "lora"),  # no experts
    ({"lora": {"type": "mixlora", "num_experts": 17}}, "lora.num_experts"),  # above --max-mixlora-experts
    ({"lora": {"type": "mixlora", "expert_lora": {"r": 64}}}, "lora.r"),  # above --max-lora-rank
    ({"lora": {"type": "mixlora", "expert_lora": {"alpha": 3}}}, "lora.expert_lora.alpha"),
    ({"lora": {"type": "mixlora", "jitter_noise": 1.5}}, "lora"),
    ({"lora": {"type": "mixlora", "use_dora": True}}, "lora"),
])
def test_bad_mixlora_job_requests_change_nothing(ft_client, ft_oai, engine, patch, param):
    f = _upload(ft_oai)
    err = _error(ft_client.post(JOBS, json={"model": MODEL_NAME, "training_file": f.id, **patch}), 400, param=param)
    assert err["type"] == "invalid_request_error"
    _no_jobs(ft_client, engine)


@pytest.mark.parametrize("patch,param", [
    ({"model": "nope"}, "model"),
    ({"training_file": "file-000000000000000000000000"}, "training_file"),
    ({"validation_file": "file-000000000000000000000000"}, "validation_file"),
])
def test_not_found(ft_client, ft_oai, engine, patch, param):
    f = _upload(ft_oai)
    err = _error(ft_client.post(JOBS, json={"model": MODEL_NAME, "training_file": f.id, **patch}), 404, param=param)
    assert err["type"] == "invalid_request_error"
    _no_jobs(ft_client, engine)


def test_bad_model_through_the_client(ft_oai):
    f = _upload(ft_oai)
    with pytest.raises(openai.NotFoundError) as info:
        ft_oai.fine_tuning.jobs.create(model="gpt-4o-mini", training_file=f.id)
    assert info.value.code == "model_not_found"


@pytest.mark.parametrize("patch,param", [
    ({"suffix": "x" * 41}, "suffix"),
    ({"suffix": "my bot"}, "suffix"),
    ({"suffix": "a:b"}, "suffix"),
    ({"seed": -1}, "seed"),
    ({"seed": "7"}, "seed"),
    ({"method": {"type": "dpo", "dpo": {}}}, "training_file"),  # chat data, not preference pairs
    ({"method": {"type": "reinforcement"}}, "method.type"),
    ({"method": {"type": "magic"}}, "method.type"),
    ({"method": {"type": "supervised", "dpo": {"hyperparameters": {}}}}, "method"),
    ({"method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0}}}}, "method.dpo.hyperparameters.beta"),
    ({"priority": 11}, "priority"),
    ({"lora": {"self_distillation": 5}}, "lora.self_distillation"),
    ({"method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 0}}}},
     "method.supervised.hyperparameters.n_epochs"),
    ({"hyperparameters": {"n_epochs": 51}}, "hyperparameters.n_epochs"),
    ({"hyperparameters": {"n_epochs": "3"}}, "hyperparameters.n_epochs"),
    ({"hyperparameters": {"n_epochs": 2.5}}, "hyperparameters.n_epochs"),
    ({"hyperparameters": {"batch_size": 257}}, "hyperparameters.batch_size"),
    ({"hyperparameters": {"batch_size": True}}, "hyperparameters.batch_size"),
    ({"hyperparameters": {"learning_rate_multiplier": 0}}, "hyperparameters.learning_rate_multiplier"),
    ({"hyperparameters": {"learning_rate_multiplier": 10.5}}, "hyperparameters.learning_rate_multiplier"),
    ({"hyperparameters": {"warmup": 1}}, "hyperparameters.warmup"),
    ({"hyperparameters": {"n_epochs": 2}, "method": {"type": "supervised"}}, "method"),
    ({"integrations": [{"type": "wandb", "wandb": {"project": "p"}}]}, "integrations"),
    ({"metadata": {"k": "v" * 513}}, "metadata"),
    ({"lora": {"r": 0}}, "lora"),
    ({"lora": {"r": 1000}}, "lora"),
    ({"lora": {"r": 64}}, "lora.r"),  # trainable, but above the server's --max-lora-rank (32 here)
    ({"lora": {"alpha": -1}}, "lora"),
    ({"lora": {"dropout": 1.0}}, "lora"),
    ({"lora": {"target_modules": ["embed_tokens"]}}, "lora"),
    ({"lora": {"target_modules": []}}, "lora"),
    ({"lora": {"r": "8"}}, "lora.r"),
    ({"lora": {"lora_alpha": 16}}, "lora.lora_alpha"),
    ({"lora": {"micro_batch_size": 0}}, "lora.micro_batch_size"),
    ({"lora": {"max_length": 100_000}}, "lora.max_length"),
    ({"lora": {"template": "llama"}}, "lora.template"),
    ({"lora": {"warmup_ratio": 1.0}}, "lora.warmup_ratio"),
    ({"learning_rate": 0.1}, "learning_rate"),
    ({"training_file": None}, "training_file"),
])
def test_bad_job_requests_change_nothing(ft_client, ft_oai, engine, patch, param):
    f = _upload(ft_oai)
    err = _error(ft_client.post(JOBS, json={"model": MODEL_NAME, "training_file": f.id, **patch}), 400, param=param)
    assert err["type"] == "invalid_request_error"
    _no_jobs(ft_client, engine)


def test_unsupported_method_message(ft_oai):
    f = _upload(ft_oai)
    with pytest.raises(openai.BadRequestError, match="'reinforcement' fine-tuning method is not supported"):
        ft_oai.fine_tuning.jobs.create(model=MODEL_NAME, training_file=f.id, method={"type": "reinforcement"})
    with pytest.raises(openai.BadRequestError, match="the dpo method needs preference data"):
        ft_oai.fine_tuning.jobs.create(model=MODEL_NAME, training_file=f.id, method={"type": "dpo"})


PREFERENCE = b"".join(json.dumps({"input": {"messages": [{"role": "user", "content": f"q{i}"}]},
                                  "preferred_output": [{"role": "assistant", "content": "good"}],
                                  "non_preferred_output": [{"role": "assistant", "content": "bad"}]}).encode() + b"\n"
                      for i in range(4))


def test_dpo_jobs_take_preference_files_and_name_a_bad_line(ft_oai, ft_client, engine):
    f = _upload(ft_oai, PREFERENCE, "prefs.jsonl")
    job = ft_oai.fine_tuning.jobs.create(model=MODEL_NAME, training_file=f.id,
                                         method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2}}})
    assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == 0.2
    assert job.hyperparameters.n_epochs == "auto"
    with pytest.raises(openai.BadRequestError, match="the supervised method needs chat"):
        ft_oai.fine_tuning.jobs.create(model=MODEL_NAME, training_file=f.id)
    broken = PREFERENCE + json.dumps({"input": {"messages": [{"role": "user", "content": "q"}]},
                                      "preferred_output": [{"role": "assistant", "content": "x"}]}).encode()
    err = _error(ft_client.post("/v1/files", files={"file": ("p.jsonl", broken)}, data={"purpose": "fine-tune"}), 400,
                 param="file")
    assert "line 5: missing 'non_preferred_output'" in err["message"]


def test_metadata_filter_and_priority(ft_oai, ft_client, engine):
    f = _upload(ft_oai)
    a = ft_client.post(JOBS, json={"model": MODEL_NAME, "training_file": f.id, "metadata": {"team": "red"},
                                   "priority": 3}).json()
    b = ft_client.post(JOBS, json={"model": MODEL_NAME, "training_file": f.id, "metadata": {"team": "blue"}}).json()
    assert a["priority"] == 3 and b["priority"] == 0
    red = ft_client.get(JOBS, params={"metadata[team]": "red"}).json()["data"]
    assert [j["id"] for j in red] == [a["id"]]
    assert ft_client.get(JOBS, params={"metadata[team]": "green"}).json()["data"] == []
    assert len(ft_client.get(JOBS).json()["data"]) == 2
    _error(ft_client.get(JOBS, params={"metadata": "team"}), 400, param="metadata")


def test_pause_and_resume_need_the_right_status(ft_oai, ft_client, engine):
    f = _upload(ft_oai)
    job = ft_oai.fine_tuning.jobs.create(model=MODEL_NAME, training_file=f.id)
    ft_oai.fine_tuning.jobs.cancel(job.id)
    err = _error(ft_client.post(f"{JOBS}/{job.id}/pause"), 400, param="fine_tuning_job_id")
    assert "cancelled" in err["message"] and err["code"] == "job_not_pausable"
    _error(ft_client.post(f"{JOBS}/{job.id}/resume"), 400, param="fine_tuning_job_id")
    _error(ft_client.post(f"{JOBS}/ftjob-nope/pause"), 404)


def test_malformed_bodies(ft_client, engine):
    _error(ft_client.post(JOBS, content=b'{"model": ', headers={"content-type": "application/json"}), 400)
    _error(ft_client.post(JOBS, content=b"[1]"), 400)
    _error(ft_client.post(JOBS, content=b""), 400)
    _error(ft_client.post(JOBS, json={"training_file": "file-x"}), 400, param="model")
    _no_jobs(ft_client, engine)


def test_training_file_that_fails_validation_at_creation(ft_oai, ft_client, service, engine):
    """Files are validated at upload; one damaged on disk since is refused at job creation, with no job made."""
    f = _upload(ft_oai)
    service.store.file_path(f.id).write_bytes(b'{"messages": "oops"}\n')
    err = _error(ft_client.post(JOBS, json={"model": MODEL_NAME, "training_file": f.id}), 400, param="training_file")
    assert err["code"] == "invalid_training_file" and "line 1" in err["message"]
    _no_jobs(ft_client, engine)


def test_engine_refusing_the_job(ft_oai, ft_client, engine):
    f = _upload(ft_oai)
    engine.call_error = EngineDeadError("the engine loop died")
    r = ft_client.post(JOBS, json={"model": MODEL_NAME, "training_file": f.id})
    assert _error(r, 503)["code"] == "training_unavailable"
    (job,) = ft_client.get(JOBS).json()["data"]  # the job exists, failed, with the reason
    assert job["status"] == "failed" and job["error"]["code"] == "engine_error"
    assert job["finished_at"] is not None


def test_list_pagination(ft_oai, ft_client):
    f = _upload(ft_oai)
    ids = [ft_oai.fine_tuning.jobs.create(model=MODEL_NAME, training_file=f.id).id for _ in range(5)]
    page = ft_oai.fine_tuning.jobs.list(limit=2)
    assert [j.id for j in page.data] == ids[::-1][:2] and page.has_more
    assert [j.id for j in ft_oai.fine_tuning.jobs.list(limit=2)] == ids[::-1]  # auto-paging follows `after`
    second = ft_client.get(JOBS, params={"after": ids[3], "limit": 2}).json()
    assert [j["id"] for j in second["data"]] == [ids[2], ids[1]] and second["has_more"]
    last = ft_client.get(JOBS, params={"after": ids[1]}).json()
    assert [j["id"] for j in last["data"]] == [ids[0]] and not last["has_more"]
    _error(ft_client.get(JOBS, params={"after": "ftjob-unknown"}), 400, param="after")
    for bad in ("0", "101", "-1", "x"):
        _error(ft_client.get(JOBS, params={"limit": bad}), 400, param="limit")
    _error(ft_client.get(f"{JOBS}/ftjob-unknown"), 404)
    _error(ft_client.get(f"{JOBS}/ftjob-unknown/events"), 404)
    _error(ft_client.get(f"{JOBS}/ftjob-unknown/checkpoints"), 404)


def test_events_and_checkpoints(ft_oai, ft_client, service):
    f = _upload(ft_oai)
    job = ft_oai.fine_tuning.jobs.create(model=MODEL_NAME, training_file=f.id, suffix="bot")
    with JobStore(service.store.root) as engine_side:  # the engine process writes these
        engine_side.set_status(job.id, "running")
        for step in (1, 2, 3):
            engine_side.add_event(job.id, "info", f"Step {step}/3", {"step": step, "train_loss": 1.0 / step})
            engine_side.add_checkpoint(job.id, step, f"/ck/step-{step}", {"train_loss": 1.0 / step})
    events = list(ft_oai.fine_tuning.jobs.list_events(job.id, limit=2))
    assert [e.message for e in events][:3] == ["Step 3/3", "Step 2/3", "Step 1/3"]
    assert events[0].type == "metrics" and events[0].data == {"step": 3, "train_loss": 1 / 3}
    assert events[-1].type == "message" and len(events) == 5
    page = ft_oai.fine_tuning.jobs.list_events(job.id, limit=2)
    assert len(page.data) == 2 and page.has_more
    checkpoints = list(ft_oai.fine_tuning.jobs.checkpoints.list(job.id, limit=2))
    assert [c.step_number for c in checkpoints] == [3, 2, 1]
    c = checkpoints[0]
    assert c.fine_tuned_model_checkpoint == f"ft:{MODEL_NAME}:bot:{job.id}:ckpt-step-3"
    assert (c.fine_tuning_job_id, c.metrics.step, c.metrics.train_loss) == (job.id, 3, 1 / 3)
    raw = ft_client.get(f"{JOBS}/{job.id}/checkpoints").json()
    assert "path" not in raw["data"][0] and raw["first_id"] == c.id


def test_cancel(ft_oai, ft_client, engine):
    f = _upload(ft_oai)
    job = ft_oai.fine_tuning.jobs.create(model=MODEL_NAME, training_file=f.id)
    cancelled = ft_oai.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled" and cancelled.finished_at is not None
    assert engine.calls == [("train_submit", job.id), ("train_cancel", job.id)]
    assert ft_oai.fine_tuning.jobs.list_events(job.id).data[0].message == "The job was cancelled"
    with pytest.raises(openai.ConflictError, match="already cancelled"):
        ft_oai.fine_tuning.jobs.cancel(job.id)
    assert len(engine.calls) == 2
    with pytest.raises(openai.NotFoundError):
        ft_oai.fine_tuning.jobs.cancel("ftjob-unknown")


def test_cancel_when_the_engine_side_already_cancelled(ft_oai, engine, service):
    f = _upload(ft_oai)
    job = ft_oai.fine_tuning.jobs.create(model=MODEL_NAME, training_file=f.id)

    async def engine_cancels(method, *args):
        engine.calls.append((method, *args))
        service.store.set_status(args[0], "cancelled")
    engine.call = engine_cancels
    assert ft_oai.fine_tuning.jobs.cancel(job.id).status == "cancelled"
    assert engine.calls[-1] == ("train_cancel", job.id)


def test_cancel_when_the_engine_is_gone(ft_oai, engine):
    f = _upload(ft_oai)
    job = ft_oai.fine_tuning.jobs.create(model=MODEL_NAME, training_file=f.id)
    engine.call_error = EngineDeadError("gone")
    assert ft_oai.fine_tuning.jobs.cancel(job.id).status == "cancelled"


# ---- publishing -------------------------------------------------------------------------------------

def test_publish_after_training(ft_oai, ft_client, service, adapters, tmp_path):
    f = _upload(ft_oai)
    job = ft_oai.fine_tuning.jobs.create(model=MODEL_NAME, training_file=f.id, suffix="poet")
    out = tmp_path / "final"
    with JobStore(service.store.root) as engine_side:  # what trainer/service.py does when training ends
        engine_side.set_status(job.id, "running")
        engine_side.set_output(job.id, str(out), 1234)
    done = _wait_for_status(ft_client, job.id, "succeeded")
    name = f"ft:{MODEL_NAME}:poet:{job.id}"
    assert done["status"] == "succeeded", done
    assert (done["fine_tuned_model"], done["trained_tokens"]) == (name, 1234) and done["finished_at"]
    assert adapters.published == [(name, out, False, True)]
    events = [e.message for e in ft_oai.fine_tuning.jobs.list_events(job.id)]
    assert events[:2] == ["The job has successfully completed", f"New fine-tuned model created: {name}"]
    time.sleep(0.6)  # another tick of the loop publishes nothing more
    assert len(adapters.published) == 1


def test_failed_publish_fails_the_job(ft_oai, ft_client, service, adapters, tmp_path):
    f = _upload(ft_oai)
    job = ft_oai.fine_tuning.jobs.create(model=MODEL_NAME, training_file=f.id)
    adapters.error = AdapterError("lora_B has NaN values")
    service.store.set_status(job.id, "running")
    service.store.set_output(job.id, str(tmp_path / "final"), 10)
    failed = _wait_for_status(ft_client, job.id, "failed")
    assert failed["status"] == "failed" and failed["fine_tuned_model"] is None
    assert failed["error"]["code"] == "publish_failed" and "NaN" in failed["error"]["message"]
    assert adapters.published[0][0] == f"ft:{MODEL_NAME}::{job.id}"


def test_publish_pending_directly(engine, adapters, tmp_path):
    service = FineTuningService(engine, adapters, FineTuningSettings(tmp_path / "ft"), [MODEL_NAME])
    f = service.store.add_file(TRAIN, "t.jsonl", "fine-tune")
    job = service.store.create_job(model=MODEL_NAME, training_file=f.id, validation_file=None, suffix=None, seed=1,
                                   hyperparameters={}, lora={}, method={})
    for status in ("queued", "running"):
        service.store.set_status(job.id, status)
    assert asyncio.run(service.publish_pending()) == 0
    service.store.set_output(job.id, "/x", 5)
    assert asyncio.run(service.publish_pending()) == 1
    assert asyncio.run(service.publish_pending()) == 0
    assert service.store.get_job(job.id).status == "succeeded"
    asyncio.run(service.close())


# ---- access -----------------------------------------------------------------------------------------

def test_admin_key(engine, service):
    app = build_app(engine, [MODEL_NAME], api_key="user", admin_api_key="admin", fine_tuning=service)
    user, admin = {"Authorization": "Bearer user"}, {"Authorization": "Bearer admin"}
    form = {"data": {"purpose": "fine-tune"}, "files": {"file": ("t.jsonl", TRAIN)}}
    with TestClient(app, raise_server_exceptions=False) as c:
        assert c.post(FILES, headers=user, **form).status_code == 401
        file_id = c.post(FILES, headers=admin, **form).json()["id"]
        assert c.get(FILES, headers=user).status_code == 200
        assert c.get(f"{FILES}/{file_id}", headers=user).status_code == 200
        body = {"model": MODEL_NAME, "training_file": file_id}
        assert c.post(JOBS, headers=user, json=body).status_code == 401
        assert c.post(JOBS, json=body).status_code == 401
        job_id = c.post(JOBS, headers=admin, json=body).json()["id"]
        assert c.get(f"{JOBS}/{job_id}", headers=user).status_code == 200
        assert c.get(f"{JOBS}/{job_id}/events", headers=user).status_code == 200
        assert c.post(f"{JOBS}/{job_id}/cancel", headers=user).status_code == 401
        assert c.post(f"{JOBS}/{job_id}/pause", headers=user).status_code == 401
        assert c.post(f"{JOBS}/{job_id}/resume", headers=user).status_code == 401
        assert c.delete(f"{FILES}/{file_id}", headers=user).status_code == 401
        assert c.post(f"{JOBS}/{job_id}/cancel", headers=admin).json()["status"] == "cancelled"
        assert c.delete(f"{FILES}/{file_id}", headers=admin).json()["deleted"]


def test_admin_routes():
    for path, method in [(FILES, "POST"), (FILES + "/", "POST"), (f"{FILES}/file-1", "DELETE"), (JOBS, "POST"),
                         (f"{JOBS}/ftjob-1/cancel", "POST"), (f"{JOBS}/ftjob-1/pause", "POST"),
                         (f"{JOBS}/ftjob-1/resume", "POST")]:
        assert is_fine_tuning_admin_route(path, method), (path, method)
    from loraplex.serve.adapter_routes import is_admin_route
    assert is_admin_route("/v1/adapters/ft:m::ftjob-1/content", "GET")  # downloads take the admin key
    assert not is_admin_route("/v1/adapters/ft:m::ftjob-1", "GET")
    for path, method in [(FILES, "GET"), (f"{FILES}/file-1", "GET"), (f"{FILES}/file-1/content", "GET"),
                         (JOBS, "GET"), (f"{JOBS}/ftjob-1", "GET"), (f"{JOBS}/ftjob-1/events", "GET")]:
        assert not is_fine_tuning_admin_route(path, method), (path, method)


def test_fine_tuning_off(client):
    for r in (client.get(FILES), client.post(JOBS, json={}), client.post(f"{JOBS}/x/cancel")):
        err = _error(r, 400)
        assert err["code"] == "fine_tuning_disabled" and "fine-tuning" in err["message"]
