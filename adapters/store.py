"""Adapter store: names and versions in SQLite (WAL), files on disk, every publish atomic."""
from __future__ import annotations

import hashlib
import json
import math
import os
import pathlib
import re
import shutil
import sqlite3
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from loraplex.adapters.errors import AdapterError, AdapterNotFoundError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
README_NAME = "README.md"
_REQUIRED_FILES = (CONFIG_NAME, WEIGHTS_NAME)
_PUBLISHED_FILES = (CONFIG_NAME, WEIGHTS_NAME, README_NAME)
MAX_NAME_CHARS = 128  # fits OpenAI's fine-tuned model names: ft:{base}:{suffix}:{job_id}
# ':' is allowed for those names; every allowed character is safe in a single path component on Linux.
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,%d}" % (MAX_NAME_CHARS - 1))
_VERSION_DIR_RE = re.compile(r"v[0-9]+")
_CHUNK_BYTES = 1 << 20

# AUTOINCREMENT: an adapter_id is never reused, so an id cached anywhere (pool, prefix-cache hash)
# can never silently point at a different adapter after a delete and re-publish.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS adapters (
    adapter_id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS versions (
    adapter_id INTEGER NOT NULL REFERENCES adapters(adapter_id) ON DELETE CASCADE,
    version INTEGER NOT NULL,
    rank INTEGER NOT NULL,
    alpha REAL NOT NULL,
    target_modules TEXT NOT NULL,
    num_bytes INTEGER NOT NULL,
    created REAL NOT NULL,
    sha256 TEXT NOT NULL,
    PRIMARY KEY (adapter_id, version)
);
"""
_SELECT = ("SELECT a.name, a.adapter_id, v.version, v.rank, v.alpha, v.target_modules, v.num_bytes, "
           "v.created, v.sha256 FROM versions v JOIN adapters a USING (adapter_id)")


def validate_adapter_name(name: str) -> str:
    """Return `name` if it is a safe adapter name (also a safe folder name), else raise AdapterError."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or ".." in name:
        raise AdapterError(f"Invalid adapter name {name!r}: use 1 to {MAX_NAME_CHARS} letters, digits, '.', "
                           "'_', ':' or '-', starting with a letter or digit and without '..'.", param="name")
    return name


@dataclass(frozen=True, slots=True)
class AdapterVersion:
    name: str
    adapter_id: int
    version: int
    path: pathlib.Path  # folder holding adapter_config.json and adapter_model.safetensors
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    num_bytes: int  # all files of this version on disk
    created: float  # unix time of the publish
    sha256: str  # of adapter_model.safetensors


class AdapterStore:
    """Published adapters under `root`. One store per root at a time: opening sweeps leftovers of a
    crashed publish or delete, which would race another live store on the same root."""

    def __init__(self, root: pathlib.Path) -> None:
        self.root = pathlib.Path(root).resolve()
        self._files_dir = self.root / "adapters"
        self._tmp_dir = self.root / "tmp"
        self._files_dir.mkdir(parents=True, exist_ok=True)
        self._tmp_dir.mkdir(exist_ok=True)
        # One connection shared by all threads, serialised by the lock (reads too: a sqlite3
        # connection is not safe to use from two threads at once).
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.root / "store.sqlite3", isolation_level=None, check_same_thread=False,
                                   timeout=30.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a publish that returned survives a power cut
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)
        self._sweep()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> AdapterStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- reads ---------------------------------------------------------------------------------

    def latest(self, name: str) -> AdapterVersion:
        rows = self._query(_SELECT + " WHERE a.name = ? ORDER BY v.version DESC LIMIT 1", (name,))
        if not rows:
            raise AdapterNotFoundError(name)
        return rows[0]

    def get_version(self, name: str, version: int) -> AdapterVersion:
        rows = self._query(_SELECT + " WHERE a.name = ? AND v.version = ?", (name, version))
        if not rows:
            raise AdapterNotFoundError(f"{name} (version {version})")
        return rows[0]

    def versions(self, name: str) -> list[AdapterVersion]:
        rows = self._query(_SELECT + " WHERE a.name = ? ORDER BY v.version", (name,))
        if not rows:
            raise AdapterNotFoundError(name)
        return rows

    def list(self) -> list[AdapterVersion]:
        """The latest version of every adapter, sorted by name."""
        return self._query(_SELECT + " WHERE v.version = (SELECT MAX(version) FROM versions"
                           " WHERE adapter_id = a.adapter_id) ORDER BY a.name", ())

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        with self._lock:
            return self._db.execute("SELECT 1 FROM adapters WHERE name = ?", (name,)).fetchone() is not None

    def _query(self, sql: str, params: tuple[object, ...]) -> list[AdapterVersion]:
        with self._lock:
            rows = self._db.execute(sql, params).fetchall()
        return [AdapterVersion(name=name, adapter_id=adapter_id, version=version,
                               path=self._files_dir / name / f"v{version}", rank=rank, alpha=alpha,
                               target_modules=tuple(json.loads(modules)), num_bytes=num_bytes,
                               created=created, sha256=sha256)
                for name, adapter_id, version, rank, alpha, modules, num_bytes, created, sha256 in rows]

    # --- writes --------------------------------------------------------------------------------

    def publish(self, name: str, src_dir: pathlib.Path, *, rank: int, alpha: float,
                target_modules: Sequence[str]) -> AdapterVersion:
        """Publish the adapter folder `src_dir` as the next version of `name`. Copies the top-level
        regular files adapter_config.json, adapter_model.safetensors and README.md (if present);
        on any failure nothing of this publish remains."""
        validate_adapter_name(name)
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise AdapterError(f"The adapter rank must be a positive integer, got {rank!r}.", param="rank")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise AdapterError(f"The adapter alpha must be a finite number, got {alpha!r}.", param="alpha")
        # A bare str is a Sequence[str] too; "q_proj" must not become ("q", "_", "p", ...).
        if isinstance(target_modules, str) or not target_modules \
                or not all(isinstance(m, str) and m for m in target_modules):
            raise AdapterError(f"target_modules must be a non-empty list of module names, got {target_modules!r}.",
                               param="target_modules")
        sources = _source_files(pathlib.Path(src_dir))
        # Copy outside the lock (it may take seconds); only numbering, rename and insert are serialised.
        staging = pathlib.Path(tempfile.mkdtemp(prefix="publish-", dir=self._tmp_dir))
        try:
            num_bytes, sha256 = 0, ""
            for file_name, src in sources.items():
                file_bytes, digest = _copy_file(src, staging / file_name)
                num_bytes += file_bytes
                if file_name == WEIGHTS_NAME:
                    sha256 = digest
            _fsync_dir(staging)
            with self._lock:
                return self._commit(name, staging, rank=rank, alpha=float(alpha),
                                    target_modules=tuple(target_modules), num_bytes=num_bytes, sha256=sha256)
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # gone already when the rename succeeded

    def _commit(self, name: str, staging: pathlib.Path, *, rank: int, alpha: float,
                target_modules: tuple[str, ...], num_bytes: int, sha256: str) -> AdapterVersion:
        name_dir = self._files_dir / name
        final: pathlib.Path | None = None
        created_name_dir = False
        self._db.execute("BEGIN IMMEDIATE")
        try:
            row = self._db.execute("SELECT adapter_id FROM adapters WHERE name = ?", (name,)).fetchone()
            created = time.time()
            if row is None:
                adapter_id = self._db.execute("INSERT INTO adapters (name, created) VALUES (?, ?)",
                                              (name, created)).lastrowid
                version = 1
            else:
                adapter_id = row[0]
                (version,) = self._db.execute("SELECT COALESCE(MAX(version), 0) + 1 FROM versions"
                                              " WHERE adapter_id = ?", (adapter_id,)).fetchone()
            if not name_dir.exists():
                name_dir.mkdir()
                created_name_dir = True
            final = name_dir / f"v{version}"
            os.rename(staging, final)
            _fsync_dir(name_dir)
            if created_name_dir:
                _fsync_dir(self._files_dir)
            self._db.execute(
                "INSERT INTO versions (adapter_id, version, rank, alpha, target_modules, num_bytes, created,"
                " sha256) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (adapter_id, version, rank, alpha, json.dumps(list(target_modules)), num_bytes, created, sha256))
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            if final is not None and final.exists():
                shutil.rmtree(final, ignore_errors=True)
            if created_name_dir:
                shutil.rmtree(name_dir, ignore_errors=True)
            raise
        assert adapter_id is not None
        return AdapterVersion(name=name, adapter_id=adapter_id, version=version, path=final, rank=rank,
                              alpha=alpha, target_modules=target_modules, num_bytes=num_bytes, created=created,
                              sha256=sha256)

    def delete(self, name: str) -> list[AdapterVersion]:
        """Remove every version of `name` (rows and files) and return what was removed. Running
        requests are unaffected: the pool holds its own copy of the weights."""
        with self._lock:
            removed = self.versions(name)
            name_dir = self._files_dir / name
            # Move the files aside first so a crash mid-delete leaves only a tmp dir, swept at open.
            trash = self._tmp_dir / f"delete-{uuid.uuid4().hex}"
            moved = name_dir.exists()
            if moved:
                os.rename(name_dir, trash)
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("DELETE FROM versions WHERE adapter_id = ?", (removed[0].adapter_id,))
                self._db.execute("DELETE FROM adapters WHERE adapter_id = ?", (removed[0].adapter_id,))
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                if moved:
                    os.rename(trash, name_dir)
                raise
        shutil.rmtree(trash, ignore_errors=True)
        return removed

    def _sweep(self) -> None:
        """Remove what a crash left: staging and trash dirs, and version dirs renamed in but never committed."""
        for child in self._tmp_dir.iterdir():
            _remove(child)
        with self._lock:
            known = set(self._db.execute("SELECT a.name, v.version FROM versions v"
                                         " JOIN adapters a USING (adapter_id)"))
        for name_dir in self._files_dir.iterdir():
            if not name_dir.is_dir() or name_dir.is_symlink():
                continue
            for version_dir in name_dir.iterdir():
                is_version = _VERSION_DIR_RE.fullmatch(version_dir.name) is not None
                if is_version and (name_dir.name, int(version_dir.name[1:])) not in known:
                    _remove(version_dir)
            if not any(name_dir.iterdir()):
                name_dir.rmdir()


def _source_files(src_dir: pathlib.Path) -> dict[str, pathlib.Path]:
    if not src_dir.is_dir():
        raise AdapterError("The adapter folder to publish does not exist.")
    found: dict[str, pathlib.Path] = {}
    with os.scandir(src_dir) as entries:
        for entry in entries:
            # Symlinks are skipped: a published version must own its bytes.
            if entry.name in _PUBLISHED_FILES and entry.is_file(follow_symlinks=False):
                found[entry.name] = pathlib.Path(entry.path)
    missing = [n for n in _REQUIRED_FILES if n not in found]
    if missing:
        raise AdapterError(f"The adapter folder is missing {', '.join(missing)}.")
    return found


def _copy_file(src: pathlib.Path, dst: pathlib.Path) -> tuple[int, str]:
    """Copy src to the new file dst, fsync it, and return (num_bytes, sha256 hex)."""
    digest = hashlib.sha256()
    num_bytes = 0
    with open(src, "rb") as fin, open(dst, "xb") as fout:
        while chunk := fin.read(_CHUNK_BYTES):
            digest.update(chunk)
            fout.write(chunk)
            num_bytes += len(chunk)
        fout.flush()
        os.fsync(fout.fileno())
    return num_bytes, digest.hexdigest()


def _fsync_dir(path: pathlib.Path) -> None:
    # A rename or a new file is durable only once its directory entry is.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: pathlib.Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
