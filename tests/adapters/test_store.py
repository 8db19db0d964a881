"""Tests for adapters/store.py: versions, ids, atomic publish, persistence, name rules, threads."""
from __future__ import annotations

import hashlib
import json
import pathlib
import threading

import pytest
import torch
from safetensors.torch import save_file

from loraplex.adapters import store as store_module
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
def store(tmp_path: pathlib.Path):
    with AdapterStore(tmp_path / "store") as s:
        yield s


def store_leftovers(root: pathlib.Path) -> list[pathlib.Path]:
    """Everything on disk under the store that is not the database or its WAL files."""
    return sorted(p for p in root.rglob("*") if not p.name.startswith("store.sqlite3") and p.is_file())


def test_publish_and_republish(tmp_path, store):
    src = make_adapter_dir(tmp_path / "src", readme=True)
    v1 = store.publish("my-adapter", src, **PUBLISH_ARGS)
    assert (v1.name, v1.version, v1.rank, v1.alpha) == ("my-adapter", 1, 4, 8.0)
    assert v1.target_modules == ("q_proj", "v_proj")
    for name in ("adapter_config.json", "adapter_model.safetensors", "README.md"):
        assert (v1.path / name).read_bytes() == (src / name).read_bytes()
    assert v1.sha256 == hashlib.sha256((src / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert v1.num_bytes == sum(p.stat().st_size for p in src.iterdir())

    v2 = store.publish("my-adapter", make_adapter_dir(tmp_path / "src2", seed=1), **PUBLISH_ARGS)
    assert (v2.adapter_id, v2.version) == (v1.adapter_id, 2)
    assert v2.sha256 != v1.sha256
    assert v1.path.is_dir() and v2.path.is_dir() and v1.path != v2.path  # v1 stays for running requests
    assert store.latest("my-adapter") == v2
    assert store.get_version("my-adapter", 1) == v1
    assert store.versions("my-adapter") == [v1, v2]
    assert "my-adapter" in store and "other" not in store


def test_only_adapter_files_are_copied(tmp_path, store):
    src = make_adapter_dir(tmp_path / "src")
    (src / "optimizer.pt").write_bytes(b"\x80\x04.")
    (src / "sub").mkdir()
    version = store.publish("a", src, **PUBLISH_ARGS)
    assert sorted(p.name for p in version.path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


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
    assert "a" not in store and not first.path.exists() and not (store.root / "adapters" / "a").exists()
    again = store.publish("a", src, **PUBLISH_ARGS)
    assert again.version == 1
    assert again.adapter_id not in (first.adapter_id, other.adapter_id)


def test_persists_across_reopen(tmp_path):
    root = tmp_path / "store"
    src = make_adapter_dir(tmp_path / "src")
    with AdapterStore(root) as s:
        v1 = s.publish("a", src, **PUBLISH_ARGS)
        v2 = s.publish("a", src, **PUBLISH_ARGS)
        b = s.publish("b", src, **PUBLISH_ARGS)
        s.delete("b")
    with AdapterStore(root) as s:
        assert s.versions("a") == [v1, v2]
        assert "b" not in s
        # AUTOINCREMENT remembers ids across restarts, even of deleted adapters.
        assert s.publish("b", src, **PUBLISH_ARGS).adapter_id > b.adapter_id


def test_reopen_sweeps_crash_leftovers(tmp_path):
    root = tmp_path / "store"
    src = make_adapter_dir(tmp_path / "src")
    with AdapterStore(root) as s:
        kept = s.publish("a", src, **PUBLISH_ARGS)
    # A crash mid-copy leaves a staging dir; a crash between rename and commit leaves an orphan version.
    make_adapter_dir(root / "tmp" / "publish-crashed")
    make_adapter_dir(root / "adapters" / "a" / "v2")
    make_adapter_dir(root / "adapters" / "ghost" / "v1")
    with AdapterStore(root) as s:
        assert list((root / "tmp").iterdir()) == []
        assert not (root / "adapters" / "a" / "v2").exists()
        assert not (root / "adapters" / "ghost").exists()
        assert kept.path.is_dir()
        assert s.publish("a", src, **PUBLISH_ARGS).version == 2


def test_failed_publish_leaves_nothing(tmp_path, store, monkeypatch):
    src = make_adapter_dir(tmp_path / "src")
    (src / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match="adapter_model.safetensors"):
        store.publish("a", src, **PUBLISH_ARGS)
    with pytest.raises(AdapterError):
        store.publish("a", tmp_path / "missing", **PUBLISH_ARGS)

    make_adapter_dir(src)
    real_copy = store_module._copy_file
    calls = []

    def copy_then_fail(src_file, dst_file):
        calls.append(src_file)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        return real_copy(src_file, dst_file)

    monkeypatch.setattr(store_module, "_copy_file", copy_then_fail)
    with pytest.raises(OSError, match="simulated"):
        store.publish("a", src, **PUBLISH_ARGS)
    assert "a" not in store and store.list() == []
    assert store_leftovers(store.root) == []
    assert list((store.root / "adapters").iterdir()) == []


def test_failure_after_rename_rolls_back(tmp_path, store, monkeypatch):
    src = make_adapter_dir(tmp_path / "src")
    v1 = store.publish("a", src, **PUBLISH_ARGS)
    real_fsync_dir = store_module._fsync_dir

    def fail_on_name_dir(path):
        if path.name in ("a", "b"):  # called right after the version dir is renamed into place
            raise OSError("fsync failed (simulated)")
        real_fsync_dir(path)

    monkeypatch.setattr(store_module, "_fsync_dir", fail_on_name_dir)
    for name in ("a", "b"):  # an existing name, and a new one (whose row and folder must vanish too)
        with pytest.raises(OSError, match="simulated"):
            store.publish(name, src, **PUBLISH_ARGS)
    assert store.versions("a") == [v1] and "b" not in store
    assert sorted(p.relative_to(store.root).as_posix() for p in store_leftovers(store.root)) == [
        "adapters/a/v1/adapter_config.json", "adapters/a/v1/adapter_model.safetensors"]
    monkeypatch.undo()
    assert store.publish("b", src, **PUBLISH_ARGS).adapter_id > v1.adapter_id


@pytest.mark.parametrize("bad", ["../x", "a/b", "", "x" * 129, ".hidden", "-x", "a..b", "a b", "a\n", "ü",
                                 ":x", "a\\b", "ft:..:x", "a:b/c", "a\x00b"])
def test_bad_names_refused(tmp_path, store, bad):
    with pytest.raises(AdapterError) as info:
        validate_adapter_name(bad)
    assert info.value.param == "name"
    with pytest.raises(AdapterError):
        store.publish(bad, make_adapter_dir(tmp_path / "src"), **PUBLISH_ARGS)
    assert list((store.root / "adapters").iterdir()) == []


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
    assert version.path.parent.parent == store.root / "adapters" and version.path.parent.name == name
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
    assert all(v.path.is_dir() for v in results)
