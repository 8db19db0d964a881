"""Tests for trainer/job_store.py: files, jobs and their state machine, pagination, events, checkpoints,
publishing hand-off, two stores on one root (the HTTP and engine processes), ids and model names; on both
backends (SQLite + a folder, PostgreSQL + S3 on SeaweedFS)."""
from __future__ import annotations

import json
import re
import threading
import time

import pytest

from loraplex.adapters.store import validate_adapter_name
from loraplex.trainer.job_store import (
    CHECKPOINT_SUFFIX_CHARS,
    FileInUseError,
    InvalidTransitionError,
    JobStore,
    NotFoundError,
    fine_tuned_model_name,
)

CHAT = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'
HP = {"n_epochs": 3, "batch_size": 4, "learning_rate_multiplier": 1.0}
LORA = {"r": 8, "alpha": 16.0, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"], "use_rslora": False,
        "max_length": 256}
METHOD = {"type": "supervised", "supervised": {"hyperparameters": HP}}


@pytest.fixture
def store(tmp_path, backend):
    with JobStore(tmp_path / "ft", **backend) as s:
        yield s


def other_root(tmp_path, backend):
    """Where a second process keeps its local state: the same root on one machine, another with a shared
    database and blob store (nothing but those two may carry state between them)."""
    return tmp_path / ("ft" if not backend else "ft-on-another-machine")


def make_job(store: JobStore, training_file: str | None = None, **kw):
    training_file = training_file or store.add_file(CHAT, "train.jsonl", "fine-tune").id
    args = dict(model="base", training_file=training_file, validation_file=None, suffix="s", seed=7,
                hyperparameters=HP, lora=LORA, method=METHOD)
    return store.create_job(**{**args, **kw})


def test_files(store):
    f = store.add_file(CHAT, "train.jsonl", "fine-tune")
    assert re.fullmatch(r"file-[0-9a-f]{24}", f.id)
    assert (f.bytes, f.filename, f.purpose, f.status) == (len(CHAT), "train.jsonl", "fine-tune", "processed")
    assert store.file_path(f.id).read_bytes() == CHAT
    assert store.get_file(f.id) == f and store.get_file("file-000000000000000000000000") is None
    assert f.to_openai() == {"object": "file", "id": f.id, "bytes": len(CHAT), "created_at": f.created_at,
                             "filename": "train.jsonl", "purpose": "fine-tune", "status": "processed"}
    g = store.add_file(b"x", "other.txt", "assistants")
    assert store.list_files() == [g, f]  # newest first
    assert store.list_files("fine-tune") == [f]
    assert store.delete_file(f.id)
    with pytest.raises(NotFoundError):
        store.file_path(f.id)
    assert not store.delete_file(f.id)
    assert store.list_files() == [g]
    assert [b.key for b in store.blobs.list("files/")] == [f"files/{g.id}"]  # no temp files left
    assert store.read_file(g.id) == b"x"
    with pytest.raises(NotFoundError):
        store.read_file(f.id)


def test_file_path_refuses_non_ids(store):
    for bad in ("../jobs.sqlite3", "file-../../x", "file-ABC", ""):
        with pytest.raises(ValueError):
            store.file_path(bad)


def test_failed_file_write_leaves_nothing(store, monkeypatch):
    def boom(*args):
        raise OSError("disk full (simulated)")
    with monkeypatch.context() as m:  # the object cannot be written
        m.setattr(store.blobs, "put_bytes", boom)
        with pytest.raises(OSError, match="simulated"):
            store.add_file(CHAT, "a.jsonl", "fine-tune")
    with monkeypatch.context() as m:  # the object is written, its row is not: the object goes too
        m.setattr(store.db, "execute", boom)
        with pytest.raises(OSError, match="simulated"):
            store.add_file(CHAT, "a.jsonl", "fine-tune")
    assert store.blobs.list("files/") == [] and store.list_files() == []


def test_delete_file_refused_while_a_job_uses_it(store):
    job = make_job(store)
    valid = store.add_file(CHAT, "valid.jsonl", "fine-tune")
    job2 = make_job(store, training_file=job.training_file, validation_file=valid.id)
    for file_id in (job.training_file, valid.id):
        with pytest.raises(FileInUseError, match="has not finished"):
            store.delete_file(file_id)
    store.set_status(job.id, "queued")
    store.set_status(job.id, "running")
    store.set_status(job2.id, "cancelled")
    with pytest.raises(FileInUseError):
        store.delete_file(job.training_file)
    assert store.delete_file(valid.id)  # job2 has finished
    store.set_status(job.id, "failed", error={"code": "x", "message": "y"})
    assert store.delete_file(job.training_file)


def test_create_job(store):
    job = make_job(store, metadata={"team": "a"})
    assert re.fullmatch(r"ftjob-[0-9a-f]{24}", job.id)
    assert job.status == "validating_files" and job.finished_at is None and job.output_path is None
    assert store.get_job(job.id) == job and store.get_job("ftjob-nope") is None
    out = job.to_openai()
    assert out == {
        "object": "fine_tuning.job", "id": job.id, "model": "base", "created_at": job.created_at, "finished_at": None,
        "fine_tuned_model": None, "organization_id": "loraplex", "result_files": [], "status": "validating_files",
        "validation_file": None, "training_file": job.training_file, "hyperparameters": HP, "trained_tokens": None,
        "error": None, "seed": 7, "user_provided_suffix": "s", "method": METHOD, "estimated_finish": None,
        "integrations": [], "metadata": {"team": "a"}, "lora": LORA, "priority": 0}
    json.dumps(out)


def test_create_job_needs_existing_files(store):
    with pytest.raises(NotFoundError) as info:
        make_job(store, training_file="file-000000000000000000000000")
    assert info.value.param == "training_file"
    with pytest.raises(NotFoundError) as info:
        make_job(store, validation_file="file-000000000000000000000000")
    assert info.value.param == "validation_file"
    assert store.list_jobs() == ([], False)


ALLOWED = [("validating_files", "queued"), ("validating_files", "failed"), ("validating_files", "cancelled"),
           ("queued", "running"), ("queued", "failed"), ("queued", "cancelled"),
           ("running", "succeeded"), ("running", "failed"), ("running", "cancelled"), ("running", "queued")]
PATHS = {"validating_files": [], "queued": ["queued"], "running": ["queued", "running"]}


@pytest.mark.parametrize("start,end", ALLOWED)
def test_allowed_transitions(store, start, end):
    job = make_job(store)
    for status in PATHS[start]:
        store.set_status(job.id, status)
    after = store.set_status(job.id, end)
    assert after.status == end == store.get_job(job.id).status
    assert (after.finished_at is not None) == (end in ("succeeded", "failed", "cancelled"))


@pytest.mark.parametrize("path,refused", [
    ([], "running"), ([], "succeeded"), ([], "validating_files"), (["queued"], "succeeded"),
    (["queued"], "validating_files"), (["queued"], "queued"), (["queued", "running"], "running"),
    (["queued", "running"], "validating_files"), (["queued", "running", "succeeded"], "failed"),
    (["queued", "running", "succeeded"], "queued"), (["failed"], "queued"), (["failed"], "cancelled"),
    (["cancelled"], "cancelled"), (["cancelled"], "running"), (["queued", "running", "failed"], "succeeded")])
def test_refused_transitions(store, path, refused):
    job = make_job(store)
    for status in path:
        store.set_status(job.id, status)
    before = store.get_job(job.id)
    with pytest.raises(InvalidTransitionError, match="cannot become"):
        store.set_status(job.id, refused)
    assert store.get_job(job.id) == before
    assert issubclass(InvalidTransitionError, ValueError)


def test_set_status_fields_and_errors(store):
    job = make_job(store)
    with pytest.raises(ValueError, match="unknown job status"):
        store.set_status(job.id, "done")
    with pytest.raises(NotFoundError):
        store.set_status("ftjob-missing", "queued")
    store.set_status(job.id, "queued")
    store.set_status(job.id, "running")
    done = store.set_status(job.id, "succeeded", fine_tuned_model="ft:base:s:x", trained_tokens=123)
    assert (done.fine_tuned_model, done.trained_tokens, done.error) == ("ft:base:s:x", 123, None)
    failed = store.set_status(make_job(store).id, "failed", error={"code": "invalid_training_file",
                                                                   "message": "line 3: bad", "param": "training_file"})
    assert failed.to_openai()["error"] == {"code": "invalid_training_file", "message": "line 3: bad",
                                           "param": "training_file"}


def test_output_and_awaiting_publish(store):
    a, b, c = make_job(store), make_job(store), make_job(store)
    for job in (a, b, c):
        store.set_status(job.id, "queued")
        store.set_status(job.id, "running")
    assert store.jobs_awaiting_publish() == []
    store.set_output(b.id, "/ckpt/b/final", 1000)
    store.set_output(a.id, "/ckpt/a/final", 10)
    assert [j.id for j in store.jobs_awaiting_publish()] == [a.id, b.id]  # oldest first
    assert store.get_job(b.id).status == "running" and store.get_job(b.id).trained_tokens == 1000
    store.set_status(a.id, "succeeded", fine_tuned_model="ft:x")
    assert [j.id for j in store.jobs_awaiting_publish()] == [b.id]
    store.set_status(c.id, "cancelled")
    assert store.set_output(c.id, "/ckpt/c/final", 5).output_path is None  # cancelled meanwhile: dropped
    assert [j.id for j in store.jobs_awaiting_publish()] == [b.id]
    assert [j.id for j in store.jobs_in_status("running")] == [b.id]
    assert [j.id for j in store.jobs_in_status("running", "cancelled", "succeeded")] == [a.id, b.id, c.id]


def test_list_jobs_pagination(store):
    jobs = [make_job(store) for _ in range(5)]
    newest_first = [j.id for j in reversed(jobs)]
    page, more = store.list_jobs(limit=2)
    assert [j.id for j in page] == newest_first[:2] and more
    page, more = store.list_jobs(after=page[-1].id, limit=2)
    assert [j.id for j in page] == newest_first[2:4] and more
    page, more = store.list_jobs(after=page[-1].id, limit=2)
    assert [j.id for j in page] == newest_first[4:] and not more
    page, more = store.list_jobs(limit=5)
    assert len(page) == 5 and not more
    assert store.list_jobs(after=jobs[0].id) == ([], False)
    with pytest.raises(ValueError, match="after must"):
        store.list_jobs(after="ftjob-unknown")


def test_events(store):
    job, other = make_job(store), make_job(store)
    store.add_event(job.id, "info", "Created fine-tuning job")
    store.add_event(other.id, "info", "other job")
    store.add_event(job.id, "info", "Step 1/2", {"step": 1, "train_loss": 1.5, "learning_rate": 2e-4})
    store.add_event(job.id, "warning", "careful")
    store.add_event(job.id, "error", "Step 2/2", {"step": 2, "train_loss": float("nan"), "valid_loss": 1.0})
    with pytest.raises(ValueError, match="level"):
        store.add_event(job.id, "debug", "x")
    events, more = store.list_events(job.id)
    assert not more and [e["message"] for e in events] == ["Step 2/2", "careful", "Step 1/2", "Created fine-tuning job"]
    first = events[-1]
    assert re.fullmatch(r"ftevent-[0-9a-f]{24}", first["id"])
    assert first == {"object": "fine_tuning.job.event", "id": first["id"], "created_at": first["created_at"],
                     "level": "info", "message": "Created fine-tuning job", "data": None, "type": "message"}
    assert events[2]["type"] == "metrics" and events[2]["data"]["train_loss"] == 1.5
    assert events[1]["level"] == "warn" and events[1]["type"] == "message"
    assert events[0]["data"] == {"step": 2, "train_loss": None, "valid_loss": 1.0}  # NaN is not JSON
    json.dumps(events, allow_nan=False)
    page, more = store.list_events(job.id, limit=2)
    assert [e["id"] for e in page] == [e["id"] for e in events[:2]] and more
    page, more = store.list_events(job.id, after=page[-1]["id"], limit=2)
    assert [e["id"] for e in page] == [e["id"] for e in events[2:]] and not more
    with pytest.raises(ValueError, match="after must"):
        store.list_events(other.id, after=events[0]["id"])  # a cursor from another job's list
    assert store.list_events("ftjob-none") == ([], False)


def test_checkpoints(store):
    job = make_job(store, suffix="my-bot")
    assert store.latest_checkpoint(job.id) is None and store.list_checkpoints(job.id) == ([], False)
    for step in (10, 20, 30):
        ckpt = store.add_checkpoint(job.id, step, f"/ck/step-{step}", {"train_loss": 1.0 / step, "valid_loss": 0.5})
    assert re.fullmatch(r"ftckpt-[0-9a-f]{24}", ckpt["id"])
    name = f"ft:base:my-bot:{job.id}"
    assert ckpt == {"object": "fine_tuning.job.checkpoint", "id": ckpt["id"], "created_at": ckpt["created_at"],
                    "fine_tuned_model_checkpoint": f"{name}:ckpt-step-30", "step_number": 30,
                    "metrics": {"step": 30, "train_loss": 1 / 30, "valid_loss": 0.5}, "fine_tuning_job_id": job.id}
    assert store.latest_checkpoint(job.id) == {**ckpt, "path": "/ck/step-30"}
    page, more = store.list_checkpoints(job.id, limit=2)
    assert [c["step_number"] for c in page] == [30, 20] and more and "path" not in page[0]
    page, more = store.list_checkpoints(job.id, after=page[-1]["id"], limit=2)
    assert [c["step_number"] for c in page] == [10] and not more
    with pytest.raises(NotFoundError):
        store.add_checkpoint("ftjob-none", 1, "/x", {})


def test_two_stores_on_one_root(tmp_path, backend):
    """The HTTP process and the engine process each open the store; each sees the other's writes."""
    with JobStore(tmp_path / "ft", **backend) as http, JobStore(other_root(tmp_path, backend), **backend) as engine:
        job = make_job(http)
        assert engine.get_job(job.id) == job
        assert engine.file_path(job.training_file).read_bytes() == CHAT
        http.set_status(job.id, "queued")
        assert [j.id for j in engine.jobs_in_status("queued")] == [job.id]
        engine.set_status(job.id, "running")
        engine.add_event(job.id, "info", "Step 1/1", {"train_loss": 0.5})
        engine.add_checkpoint(job.id, 1, "/ck/1", {"train_loss": 0.5})
        engine.set_output(job.id, "/ck/final", 42)
        assert [j.id for j in http.jobs_awaiting_publish()] == [job.id]
        assert http.list_events(job.id)[0][0]["message"] == "Step 1/1"
        assert http.latest_checkpoint(job.id)["path"] == "/ck/1"
        http.set_status(job.id, "succeeded", fine_tuned_model="ft:x")
        with pytest.raises(InvalidTransitionError):  # the engine side cannot cancel a finished job
            engine.set_status(job.id, "cancelled")
        assert engine.get_job(job.id).status == "succeeded"


def test_concurrent_writers(tmp_path, backend):
    """Both processes' connections writing at once: every transition is applied exactly once."""
    with JobStore(tmp_path / "ft", **backend) as a, JobStore(other_root(tmp_path, backend), **backend) as b:
        jobs = [make_job(a) for _ in range(20)]
        results: dict[str, list[str]] = {"a": [], "b": []}

        def cancel_all(store, key):
            for job in jobs:
                try:
                    store.set_status(job.id, "cancelled")
                    results[key].append(job.id)
                except InvalidTransitionError:
                    pass
                store.add_event(job.id, "info", key)
        threads = [threading.Thread(target=cancel_all, args=(s, k)) for s, k in ((a, "a"), (b, "b"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(results["a"] + results["b"]) == sorted(j.id for j in jobs)  # each cancelled once
        assert all(len(a.list_events(j.id)[0]) == 2 for j in jobs)


def test_persists_across_reopen(tmp_path, backend):
    with JobStore(tmp_path / "ft", **backend) as s:
        job = make_job(s)
        s.add_event(job.id, "info", "hello")
    with JobStore(other_root(tmp_path, backend), **backend) as s:
        assert s.get_job(job.id) == job and s.list_events(job.id)[0][0]["message"] == "hello"


@pytest.mark.parametrize("base,suffix,expected", [
    ("SmolLM2-135M-Instruct", "my-bot", "ft:SmolLM2-135M-Instruct:my-bot:ftjob-abc"),
    ("HuggingFaceTB/SmolLM2-135M", None, "ft:HuggingFaceTB-SmolLM2-135M::ftjob-abc"),
    ("org/model..v1", "", "ft:org-model.v1::ftjob-abc"),
    ("../etc", "x", "ft:etc:x:ftjob-abc"),
    ("/", "x", "ft:model:x:ftjob-abc"),
])
def test_fine_tuned_model_name(base, suffix, expected):
    name = fine_tuned_model_name(base, suffix, "ftjob-abc")
    assert name == expected
    assert validate_adapter_name(name) == name


def test_fine_tuned_model_name_fits_the_adapter_name_limit():
    job_id = "ftjob-0123456789abcdef01234567"
    name = fine_tuned_model_name("m" * 300, "s" * 40, job_id)
    # room is left for a checkpoint's ":ckpt-step-N" (N up to 9 digits), also a served model name
    assert len(name) == 128 - CHECKPOINT_SUFFIX_CHARS and name.endswith(":" + "s" * 40 + ":" + job_id)
    assert validate_adapter_name(name) == name
    assert validate_adapter_name(f"{name}:ckpt-step-999999999")


def test_leases_give_each_job_to_one_trainer(tmp_path, backend):
    with JobStore(tmp_path / "ft", **backend) as a, JobStore(other_root(tmp_path, backend), **backend) as b:
        jobs = [make_job(a) for _ in range(12)]
        for job in jobs:
            a.set_status(job.id, "queued")
        got: dict[str, list[str]] = {}
        barrier = threading.Barrier(2)

        def claim(store, owner):
            barrier.wait()
            got[owner] = []
            for _ in range(8):  # two at a time, leaving out those it has
                got[owner] += store.claim_next(owner, 30.0, limit=2, skip=got[owner])
        threads = [threading.Thread(target=claim, args=(s, o)) for s, o in ((a, "trainer-a"), (b, "trainer-b"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not set(got["trainer-a"]) & set(got["trainer-b"])  # no job claimed by both
        assert sorted(got["trainer-a"] + got["trainer-b"]) == sorted(j.id for j in jobs)
        # from here on, sequentially: trainer-a holds everything, then dies
        for job_id in got["trainer-b"]:
            b.release(job_id, "trainer-b")
        assert sorted(a.claim_next("trainer-a", 30.0, limit=100)) == sorted(j.id for j in jobs)
        first = jobs[0].id
        assert not b.claim(first, "trainer-b", 30.0) and a.claim(first, "trainer-a", 30.0)  # held; re-claimable
        assert set(a.renew("trainer-a", 30.0)) == {j.id for j in jobs}
        assert b.claim_next("trainer-b", 30.0, limit=100) == []
        # trainer-a dies: once its leases expire, trainer-b takes its jobs, resuming running ones
        a.set_status(first, "running")
        a.renew("trainer-a", -1.0)  # (expire them now)
        assert sorted(b.claim_next("trainer-b", 30.0, limit=100)) == sorted(j.id for j in jobs)
        assert a.renew("trainer-a", 30.0) == {}  # trainer-a learns it holds nothing any more
        assert b.lease_of(first)[0] == "trainer-b"
        # a cancelled, paused or trained job is not claimable
        b.release(first, "trainer-b")
        b.set_output(first, "/x", 1)
        a.set_status(jobs[1].id, "cancelled")
        a.set_status(jobs[2].id, "paused")
        for job_id in (first, jobs[1].id, jobs[2].id):
            assert not a.claim(job_id, "trainer-c", 30.0)
        assert first not in a.claim_next("trainer-c", 30.0, limit=100)


def test_one_server_publishes_a_trained_job(tmp_path, backend):
    with JobStore(tmp_path / "ft", **backend) as a, JobStore(other_root(tmp_path, backend), **backend) as b:
        job = make_job(a)
        a.set_status(job.id, "queued")
        assert not a.claim_publish(job.id, "http-a", 60.0)  # nothing trained yet
        a.set_status(job.id, "running")
        a.set_output(job.id, "/x", 1)
        assert a.claim_publish(job.id, "http-a", 60.0) and not b.claim_publish(job.id, "http-b", 60.0)
        assert a.claim_publish(job.id, "http-a", -1.0)  # (http-a dies: its claim expires)
        assert b.claim_publish(job.id, "http-b", 60.0)


def test_folders_the_trainer_keeps_are_readable_elsewhere(tmp_path, backend):
    with JobStore(tmp_path / "ft", **backend) as trainer, JobStore(other_root(tmp_path, backend), **backend) as http:
        folder = trainer.checkpoints_dir / "ftjob-x" / "step-3"
        folder.mkdir(parents=True)
        (folder / "adapter_model.safetensors").write_bytes(b"weights")
        (folder / "trainer_state.json").write_text("{}")
        path = trainer.keep_folder(folder, "checkpoints", "ftjob-x")
        assert (path == str(folder)) == (not backend)  # a local store records the folder itself
        local = http.local_folder(path)
        assert sorted(p.name for p in local.iterdir()) == ["adapter_model.safetensors", "trainer_state.json"]
        assert (local / "adapter_model.safetensors").read_bytes() == b"weights"
        assert http.local_folder(path) == local  # fetched once


def test_status_counts_and_latest_losses_for_the_metrics(store):
    """What /metrics reads of the store: jobs per status and a running job's newest train and valid loss."""
    from loraplex.serve.metrics import _FineTuningCollector
    running, queued = make_job(store), make_job(store)
    for job in (running, queued):
        store.set_status(job.id, "queued")
    store.set_status(running.id, "running")
    store.add_event(running.id, "info", "Step 1/4", {"step": 1, "train_loss": 2.5})
    store.add_event(running.id, "info", "Step 2/4", {"step": 2, "train_loss": 2.0, "valid_loss": 2.2})
    store.add_event(running.id, "info", "Step 3/4", {"step": 3, "train_loss": 1.5})
    store.add_event(running.id, "info", "a message without data")
    assert store.count_by_status() == {"queued": 1, "running": 1}
    assert store.latest_losses(running.id) == {"train_loss": 1.5, "valid_loss": 2.2}
    assert store.latest_losses(queued.id) == {}
    families = {f.name: f for f in _FineTuningCollector(store).collect()}
    jobs = {s.labels["status"]: s.value for s in families["loraplex:fine_tuning_jobs"].samples}
    assert jobs["running"] == 1 and jobs["queued"] == 1 and jobs["failed"] == 0
    loss = {(s.labels["job_id"], s.labels["split"]): s.value for s in families["loraplex:fine_tuning_loss"].samples}
    assert loss == {(running.id, "train"): 1.5, (running.id, "valid"): 2.2}
    store.set_status(running.id, "succeeded", fine_tuned_model="ft:base:s:x")
    assert [j.id for j in store.recent_jobs(time.time() - 60)] == [running.id]  # finished a moment ago
    assert store.recent_jobs(time.time() + 60) == []
    families = {f.name: f for f in _FineTuningCollector(store).collect()}
    statuses = {s.labels["status"] for s in families["loraplex:fine_tuning_loss"].samples}
    assert statuses == {"succeeded"}
