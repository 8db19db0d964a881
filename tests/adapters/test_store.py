"""Tests for adapters/store.py: versions, ids, atomic publish, persistence, name rules, threads, the change log
and local copies; each on both backends (SQLite + a folder, PostgreSQL + S3 on SeaweedFS) unless it is about
the folder layout."""
from __future__ import annotations

import hashlib
import json
import pathlib
import threading

import pytest
import torch
from safetensors.torch import save_file

from loraplex.adapters.errors import AdapterError, AdapterNotFoundError
from loraplex.adapters.store import AdapterStore, AdapterVersion, validate_adapter_name

PUBLISH_ARGS = {"rank": 4, "alpha": 8.0, "target_modules": ("q_proj", "v_proj")}


def make_adapter_dir(path: pathlib.Path, seed: int = 0, readme: bool = False) -> pathlib.Path:
    """A tiny fake PEFT adapter folder: a config and a small valid safetensors file."""
    path.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    save_file({"base_model.model.layers.0.q_proj.lora_A.weight": torch.randn(4, 16, generator=generator),
               "base_model.model.layers.0.q_proj.lora_B.weight": torch.randn(16, 4, generator=generator)},
              str(path / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    (path / "adapter_config.json").write_text(json.dumps(config))
    if readme:
        (path / "README.md").write_text("# fake adapter\n")
    return path


@pytest.fixture
def store(tmp_path: pathlib.Path, backend):
    with AdapterStore(tmp_path / "store", **backend) as s:
        yield s


def objects(store: AdapterStore) -> list[str]:
    """Every object key under adapters/ in the store's blob store."""
    return [b.key for b in store.blobs.list("adapters/")]


def read(store: AdapterStore, version: AdapterVersion, name: str) -> bytes:
    return (store.fetch(version) / name).read_bytes()


def test_publish_and_republish(tmp_path, store):
    src = make_adapter_dir(tmp_path / "src", readme=True)
    v1 = store.publish("my-adapter", src, **PUBLISH_ARGS)
    assert (v1.name, v1.version, v1.rank, v1.alpha) == ("my-adapter", 1, 4, 8.0)
    assert v1.target_modules == ("q_proj", "v_proj")
    for name in ("adapter_config.json", "adapter_model.safetensors", "README.md"):
        assert read(store, v1, name) == (src / name).read_bytes()
    assert v1.sha256 == hashlib.sha256((src / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert v1.num_bytes == sum(p.stat().st_size for p in src.iterdir())

    v2 = store.publish("my-adapter", make_adapter_dir(tmp_path / "src2", seed=1), **PUBLISH_ARGS)
    assert (v2.adapter_id, v2.version) == (v1.adapter_id, 2)
    assert v2.sha256 != v1.sha256
    assert v1.prefix != v2.prefix  # v1 stays for running requests
    assert read(store, v1, "adapter_model.safetensors") == (src / "adapter_model.safetensors").read_bytes()
    assert store.latest("my-adapter") == v2
    assert store.get_version("my-adapter", 1) == v1
    assert store.versions("my-adapter") == [v1, v2]
    assert "my-adapter" in store and "other" not in store


def test_only_adapter_files_are_copied(tmp_path, store):
    src = make_adapter_dir(tmp_path / "src")
    (src / "optimizer.pt").write_bytes(b"\x80\x04.")
    (src / "sub").mkdir()
    version = store.publish("a", src, **PUBLISH_ARGS)
    assert sorted(p.name for p in store.fetch(version).iterdir()) == ["adapter_config.json",
                                                                        "adapter_model.safetensors"]
    assert objects(store) == [f"{version.prefix}/adapter_config.json", f"{version.prefix}/adapter_model.safetensors"]


def test_list_is_latest_per_name_sorted(tmp_path, store):
    src = make_adapter_dir(tmp_path / "src")
    for name in ("zeta", "alpha", "zeta", "mid"):
        store.publish(name, src, **PUBLISH_ARGS)
    assert [(v.name, v.version) for v in store.list()] == [("alpha", 1), ("mid", 1), ("zeta", 2)]


def test_not_found(store):
    for call in (lambda: store.latest("nope"), lambda: store.versions("nope"),
                 lambda: store.get_version("nope", 1), lambda: store.delete("nope")):
        with pytest.raises(AdapterNotFoundError):
            call()


def test_delete_then_publish_gets_new_id(tmp_path, store):
    src = make_adapter_dir(tmp_path / "src")
    first = store.publish("a", src, **PUBLISH_ARGS)
    store.publish("a", src, **PUBLISH_ARGS)
    other = store.publish("b", src, **PUBLISH_ARGS)
    removed = store.delete("a")
    assert [v.version for v in removed] == [1, 2]
    assert "a" not in store and not any(k.startswith("adapters/a/") for k in objects(store))
    again = store.publish("a", src, **PUBLISH_ARGS)
    assert again.version == 1 and again.prefix != first.prefix
    assert again.adapter_id not in (first.adapter_id, other.adapter_id)
    assert [(c.name, c.version, c.kind) for c in store.changes()] == [
        ("a", 1, "publish"), ("a", 2, "publish"), ("b", 1, "publish"), ("a", None, "delete"), ("a", 1, "publish")]
    assert [c.seq for c in store.changes(after=store.changes()[2].seq)] == [c.seq for c in store.changes()[3:]]


def test_persists_across_reopen(tmp_path, backend):
    root = tmp_path / "store"
    src = make_adapter_dir(tmp_path / "src")
    with AdapterStore(root, **backend) as s:
        v1 = s.publish("a", src, **PUBLISH_ARGS)
        v2 = s.publish("a", src, **PUBLISH_ARGS)
        b = s.publish("b", src, **PUBLISH_ARGS)
        s.delete("b")
    with AdapterStore(root, **backend) as s:
        assert s.versions("a") == [v1, v2]
        assert "b" not in s
        # AUTOINCREMENT remembers ids across restarts, even of deleted adapters.
        assert s.publish("b", src, **PUBLISH_ARGS).adapter_id > b.adapter_id


def test_sweep_removes_objects_no_version_references(tmp_path, backend):
    root = tmp_path / "store"
    src = make_adapter_dir(tmp_path / "src")
    with AdapterStore(root, **backend) as s:
        kept = s.publish("a", src, **PUBLISH_ARGS)
        # a publish that crashed before its commit leaves objects under a prefix no version names
        for prefix in ("adapters/a/crashed", "adapters/ghost/crashed"):
            s.blobs.put_file(f"{prefix}/adapter_model.safetensors", src / "adapter_model.safetensors")
        assert s.sweep() == 0  # young: maybe a publish in progress
    with AdapterStore(root, **backend, sweep_after_s=0) as s:  # reopening sweeps what is old enough
        assert objects(s) == [f"{kept.prefix}/adapter_config.json", f"{kept.prefix}/adapter_model.safetensors"]
        assert read(s, kept, "adapter_config.json") == (src / "adapter_config.json").read_bytes()
        assert s.publish("a", src, **PUBLISH_ARGS).version == 2


def test_failed_publish_leaves_nothing(tmp_path, store, monkeypatch):
    src = make_adapter_dir(tmp_path / "src")
    (src / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match="adapter_model.safetensors"):
        store.publish("a", src, **PUBLISH_ARGS)
    with pytest.raises(AdapterError):
        store.publish("a", tmp_path / "missing", **PUBLISH_ARGS)

    make_adapter_dir(src)
    real_put = store.blobs.put_file
    calls = []

    def put_then_fail(key, path):
        calls.append(key)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        return real_put(key, path)

    monkeypatch.setattr(store.blobs, "put_file", put_then_fail)
    with pytest.raises(OSError, match="simulated"):
        store.publish("a", src, **PUBLISH_ARGS)
    assert "a" not in store and store.list() == [] and store.changes() == []
    assert objects(store) == []


def test_failed_commit_rolls_back(tmp_path, store, monkeypatch):
    src = make_adapter_dir(tmp_path / "src")
    v1 = store.publish("a", src, **PUBLISH_ARGS)
    real_log = store._log_change

    def fail(*args):
        raise OSError("commit failed (simulated)")

    monkeypatch.setattr(store, "_log_change", fail)  # inside the commit's transaction, after the version row
    for name in ("a", "b"):  # an existing name, and a new one (whose row must vanish too)
        with pytest.raises(OSError, match="simulated"):
            store.publish(name, src, **PUBLISH_ARGS)
    assert store.versions("a") == [v1] and "b" not in store
    assert objects(store) == [f"{v1.prefix}/adapter_config.json", f"{v1.prefix}/adapter_model.safetensors"]
    monkeypatch.setattr(store, "_log_change", real_log)
    assert store.publish("b", src, **PUBLISH_ARGS).adapter_id > v1.adapter_id


@pytest.mark.parametrize("bad", ["../x", "a/b", "", "x" * 129, ".hidden", "-x", "a..b", "a b", "a\n", "ü",
                                 ":x", "a\\b", "ft:..:x", "a:b/c", "a\x00b"])
def test_bad_names_refused(tmp_path, store, bad):
    with pytest.raises(AdapterError) as info:
        validate_adapter_name(bad)
    assert info.value.param == "name"
    with pytest.raises(AdapterError):
        store.publish(bad, make_adapter_dir(tmp_path / "src"), **PUBLISH_ARGS)
    assert objects(store) == []


@pytest.mark.parametrize("good", ["my-adapter_1.v2", "a", "A" * 64, "9lives", "A" * 128,
                                  "ft:SmolLM2-135M-Instruct:my_suffix:ftjob-0123456789abcdef01234567",
                                  "ft:base::ftjob-0123456789abcdef01234567"])
def test_good_names(good):
    assert validate_adapter_name(good) == good


def test_fine_tuned_model_name_is_a_folder(tmp_path, store):
    """OpenAI-style names (':' and up to 128 characters) publish as one folder under adapters/."""
    name = "ft:" + "b" * 60 + ":suffix-1:ftjob-0123456789abcdef01234567"
    assert len(name) <= 128
    version = store.publish(name, make_adapter_dir(tmp_path / "src"), **PUBLISH_ARGS)
    assert version.prefix.split("/")[:2] == ["adapters", name] and len(version.prefix.split("/")) == 3
    assert store.fetch(version).is_dir()
    assert store.latest(name) == version


def test_bad_metadata_refused(tmp_path, store):
    src = make_adapter_dir(tmp_path / "src")
    for kwargs in ({"rank": 0}, {"rank": True}, {"alpha": float("nan")}, {"target_modules": "q_proj"},
                   {"target_modules": []}):
        with pytest.raises(AdapterError):
            store.publish("a", src, **{**PUBLISH_ARGS, **kwargs})
    assert "a" not in store


def test_concurrent_publishes_get_consecutive_versions(tmp_path, store):
    src = make_adapter_dir(tmp_path / "src")
    results: list[AdapterVersion] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def worker() -> None:
        try:
            barrier.wait()
            for _ in range(3):
                results.append(store.publish("shared", src, **PUBLISH_ARGS))
        except BaseException as exc:  # surfaced below; a thread's exception is otherwise lost
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(v.version for v in results) == list(range(1, 13))
    assert len({v.adapter_id for v in results}) == 1
    assert [v.version for v in store.versions("shared")] == list(range(1, 13))
    assert all(store.fetch(v).is_dir() for v in results)


def test_two_stores_on_one_backend_publish_consecutive_versions(tmp_path, backend):
    """Two processes (two stores, two connections) publishing one name at once: every version number once."""
    src = make_adapter_dir(tmp_path / "src")
    stores = [AdapterStore(tmp_path / "store", **backend) for _ in range(2)]
    results: list[AdapterVersion] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def worker(s: AdapterStore) -> None:
        try:
            barrier.wait()
            for _ in range(4):
                results.append(s.publish("shared", src, **PUBLISH_ARGS))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert errors == []
        assert sorted(v.version for v in results) == list(range(1, 9))
        assert [v.version for v in stores[1].versions("shared")] == list(range(1, 9))
        assert [c.version for c in stores[0].changes()] == sorted(v.version for v in results)
    finally:
        for s in stores:
            s.close()


def test_remote_copies_are_checked_and_the_cache_is_bounded(tmp_path, backend):
    if not backend:
        pytest.skip("a folder blob store is read in place")
    src = [make_adapter_dir(tmp_path / f"src{i}", seed=i) for i in range(3)]
    size = sum(p.stat().st_size for p in src[0].iterdir())
    with AdapterStore(tmp_path / "store", **backend, cache_bytes=2 * size) as s:
        a, b, c = (s.publish(n, folder, **PUBLISH_ARGS) for n, folder in zip("abc", src))
        assert not a.path.exists()  # nothing local until fetched
        weights = (src[0] / "adapter_model.safetensors").read_bytes()
        assert (s.fetch(a) / "adapter_model.safetensors").read_bytes() == weights
        s.fetch(b, pin=True)
        s.fetch(c)  # over the bound: the least recently fetched unpinned version (a) goes
        assert not a.path.exists() and b.path.exists() and c.path.exists() and s.cached_bytes() <= 2 * size
        s.fetch(a)  # fetched again on demand; b is pinned, so c goes
        assert a.path.exists() and b.path.exists() and not c.path.exists()
        # a weights object that does not match its recorded sha256 is refused
        s.blobs.delete(f"{c.prefix}/adapter_model.safetensors")
        s.blobs.put_file(f"{c.prefix}/adapter_model.safetensors", src[0] / "adapter_model.safetensors")
        with pytest.raises(AdapterError, match="sha256"):
            s.fetch(c)
        assert not c.path.exists()


def test_postgres_notifies_every_publish_and_delete(tmp_path, backend):
    if not backend:
        pytest.skip("NOTIFY is PostgreSQL's; SQLite stores are followed by polling changes()")
    import psycopg

    from loraplex.adapters.store import NOTIFY_CHANNEL
    src = make_adapter_dir(tmp_path / "src")
    with psycopg.connect(backend["database"], autocommit=True) as listener, \
            AdapterStore(tmp_path / "store", **backend) as s:
        listener.execute(f"LISTEN {NOTIFY_CHANNEL}")
        s.publish("a", src, **PUBLISH_ARGS)
        s.delete("a")
        heard = [n.payload for n in listener.notifies(timeout=5, stop_after=2)]
    assert heard == ["a", "a"]


def test_metadata_is_kept_per_name_across_versions_and_edits(store, tmp_path):
    from loraplex.adapters.store import AdapterError, AdapterNotFoundError
    src = make_adapter_dir(tmp_path / "src")
    store.publish("quill", src, rank=4, alpha=8, target_modules=["q_proj"],
                  metadata={"description": "Writes in rhyme.", "examples": ["A poem about rain"]})
    assert store.metadata("quill") == {"description": "Writes in rhyme.", "examples": ["A poem about rain"]}
    store.publish("quill", make_adapter_dir(tmp_path / "src2", seed=1), rank=4, alpha=8, target_modules=["q_proj"])
    assert store.metadata("quill")["description"] == "Writes in rhyme."  # a new version keeps it
    assert store.set_metadata("quill", {"examples": ["A limerick", "An ode"]}) == {
        "description": "Writes in rhyme.", "examples": ["A limerick", "An ode"]}
    assert store.set_metadata("quill", {"description": None}) == {"examples": ["A limerick", "An ode"]}
    for bad in ({"examples": "one"}, {"examples": [""]}, {"examples": ["x"] * 21}, {"description": "x" * 2001},
                {"colour": "red"}, ["not", "an", "object"]):
        with pytest.raises(AdapterError):
            store.set_metadata("quill", bad)
    with pytest.raises(AdapterError):  # refused before anything is written
        store.publish("quill", src, rank=4, alpha=8, target_modules=["q_proj"], metadata={"examples": 3})
    assert [v.version for v in store.versions("quill")] == [1, 2]
    assert store.metadata("quill") == {"examples": ["A limerick", "An ode"]}  # nothing changed
    assert store.all_metadata() == {"quill": {"examples": ["A limerick", "An ode"]}}
    with pytest.raises(AdapterNotFoundError):
        store.set_metadata("nope", {"description": "x"})
    store.delete("quill")
    with pytest.raises(AdapterNotFoundError):
        store.metadata("quill")


def test_adapter_type_is_kept_per_version(tmp_path, store):
    src = make_adapter_dir(tmp_path / "src")
    plain = store.publish("m", src, **PUBLISH_ARGS)
    mix = store.publish("m", src, **PUBLISH_ARGS, adapter_type="mixlora")
    assert (plain.adapter_type, mix.adapter_type) == ("lora", "mixlora")
    assert [v.adapter_type for v in store.versions("m")] == ["lora", "mixlora"] and store.latest("m") == mix
    with pytest.raises(AdapterError, match="adapter_type"):
        store.publish("m", src, **PUBLISH_ARGS, adapter_type="ia3")
    assert len(store.versions("m")) == 2
