"""Adapter store: names and versions in a database (SQLite or PostgreSQL), files in a blob store (a folder or
S3), every publish atomic and every change in a log other processes follow."""
from __future__ import annotations

import json
import logging
import math
import os
import pathlib
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from loraplex.adapters.errors import AdapterError, AdapterNotFoundError
from loraplex.storage.blobs import BlobStore, FileBlobStore, open_blob_store
from loraplex.storage.database import (
    Database,
    Migration,
    identity_column,
    open_database,
)

logger = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
README_NAME = "README.md"
_REQUIRED_FILES = (CONFIG_NAME, WEIGHTS_NAME)
_PUBLISHED_FILES = (CONFIG_NAME, WEIGHTS_NAME, README_NAME)
MAX_NAME_CHARS = 128  # fits OpenAI's fine-tuned model names: ft:{base}:{suffix}:{job_id}
# ':' is allowed for those names; every allowed character is safe in a single path component on Linux.
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,%d}" % (MAX_NAME_CHARS - 1))

STALE_UPLOAD_S = 3600.0  # objects of a version never committed are garbage once this old
NOTIFY_CHANNEL = "loraplex_adapters"  # PostgreSQL: NOTIFY <channel>, '<name>' on every publish and delete


def _schema_v1(dialect: str) -> str:
    # AUTOINCREMENT / IDENTITY: an adapter_id is never reused, so an id cached anywhere (pool, prefix-cache
    # hash, another replica) can never silently point at a different adapter after a delete and re-publish.
    ident = identity_column()[dialect]
    real = "REAL" if dialect == "sqlite" else "DOUBLE PRECISION"
    return f"""
CREATE TABLE IF NOT EXISTS adapters (
    adapter_id {ident},
    name TEXT NOT NULL UNIQUE,
    created {real} NOT NULL
);
CREATE TABLE IF NOT EXISTS versions (
    adapter_id INTEGER NOT NULL REFERENCES adapters(adapter_id) ON DELETE CASCADE,
    version INTEGER NOT NULL,
    rank INTEGER NOT NULL,
    alpha {real} NOT NULL,
    target_modules TEXT NOT NULL,
    num_bytes INTEGER NOT NULL,
    created {real} NOT NULL,
    sha256 TEXT NOT NULL,
    PRIMARY KEY (adapter_id, version)
)"""


def _schema_v2(dialect: str) -> str:
    # v2: a version's objects live under their own blob prefix (the versions of v1 kept their folders
    # adapters/<name>/v<N>); every publish and delete is a row of the change log, which other processes
    # poll (or hear of through NOTIFY) to learn about new versions and deletes (tombstones).
    ident = identity_column()[dialect]
    real = "REAL" if dialect == "sqlite" else "DOUBLE PRECISION"
    return f"""
ALTER TABLE versions ADD COLUMN prefix TEXT;
UPDATE versions SET prefix = 'adapters/' || (SELECT name FROM adapters a WHERE a.adapter_id = versions.adapter_id)
    || '/v' || CAST(version AS TEXT) WHERE prefix IS NULL;
CREATE TABLE IF NOT EXISTS adapter_changes (
    seq {ident},
    name TEXT NOT NULL,
    adapter_id INTEGER NOT NULL,
    version INTEGER,
    kind TEXT NOT NULL,
    created {real} NOT NULL
)"""


# v3: an adapter's metadata (description, example prompts), JSON; one per name, editable, kept across versions
_SCHEMA_V3 = "ALTER TABLE adapters ADD COLUMN metadata TEXT"
_SCHEMA_V4 = "ALTER TABLE versions ADD COLUMN adapter_type TEXT NOT NULL DEFAULT 'lora'"  # or 'mixlora'
MIGRATIONS = (Migration(1, _schema_v1("sqlite"), _schema_v1("postgresql")),
              Migration(2, _schema_v2("sqlite"), _schema_v2("postgresql")),
              Migration(3, _SCHEMA_V3, _SCHEMA_V3),
              Migration(4, _SCHEMA_V4, _SCHEMA_V4))
ADAPTER_TYPES = ("lora", "dora", "mixlora")  # dora: a PEFT LoRA with use_dora
MAX_DESCRIPTION_CHARS = 2000
MAX_EXAMPLES = 20
MAX_EXAMPLE_CHARS = 4000


def validate_metadata(metadata: object) -> dict:
    """An adapter's metadata: {"description": str, "examples": [str, ...]} (both optional, bounded); -> the
    normalised dict, or AdapterError."""
    if not isinstance(metadata, dict):
        raise AdapterError("adapter metadata must be a JSON object with `description` and `examples`",
                           param="metadata")
    unknown = sorted(set(metadata) - {"description", "examples"})
    if unknown:
        raise AdapterError(f"unknown adapter metadata field(s): {', '.join(unknown)} (allowed: description, "
                           "examples)", param=unknown[0])
    out: dict = {}
    description = metadata.get("description")
    if description is not None:
        if not isinstance(description, str) or len(description) > MAX_DESCRIPTION_CHARS:
            raise AdapterError(f"`description` must be text of at most {MAX_DESCRIPTION_CHARS} characters",
                               param="description")
        out["description"] = description
    examples = metadata.get("examples")
    if examples is not None:
        if not isinstance(examples, list) or len(examples) > MAX_EXAMPLES or not all(
                isinstance(e, str) and 0 < len(e) <= MAX_EXAMPLE_CHARS for e in examples):
            raise AdapterError(f"`examples` must be a list of at most {MAX_EXAMPLES} prompts of 1 to "
                               f"{MAX_EXAMPLE_CHARS} characters", param="examples")
        out["examples"] = list(examples)
    return out
_SELECT = ("SELECT a.name, a.adapter_id, v.version, v.rank, v.alpha, v.target_modules, v.num_bytes, "
           "v.created, v.sha256, v.prefix, v.adapter_type FROM versions v JOIN adapters a ON a.adapter_id = v.adapter_id")


@dataclass(frozen=True, slots=True)
class AdapterChange:
    """One row of the change log: a version published, or a name deleted (a tombstone: version None)."""
    seq: int
    name: str
    adapter_id: int
    version: int | None
    kind: str  # "publish" | "delete"
    created: float


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
    path: pathlib.Path  # local folder of adapter_config.json and adapter_model.safetensors (after `fetch`)
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    num_bytes: int  # all files of this version
    created: float  # unix time of the publish
    sha256: str  # of adapter_model.safetensors
    prefix: str = ""  # blob-store folder of its files
    adapter_type: str = "lora"  # "lora" (PEFT) or "mixlora" (MoE-PEFT's MixLoRA)


class AdapterStore:
    """Published adapters: names and versions in a database, their files in a blob store (by default both
    under `root`: root/store.sqlite3 and folders under root/adapters/).

    A publish writes the version's files once under a fresh blob prefix, then commits it by inserting the
    version row (with a change-log row, and a PostgreSQL NOTIFY, in the same transaction): until that commit
    nothing of it is visible, after it every process sees it. A delete removes the rows and writes a tombstone
    to the change log in one transaction, then removes the files. Objects no row references (a publish that
    crashed before its commit, a delete that crashed after) are swept once older than `STALE_UPLOAD_S`.

    With a remote blob store, `fetch` copies a version's files into `cache_dir` (checksum verified) and
    returns that folder; the cache is bounded by `cache_bytes`, evicting the least recently fetched versions
    not pinned by this process."""

    def __init__(self, root: pathlib.Path, *, database: str | Database | None = None,
                 blobs: str | BlobStore | None = None, cache_dir: pathlib.Path | None = None,
                 cache_bytes: int = 20 << 30, sweep_after_s: float = STALE_UPLOAD_S) -> None:
        self.root = pathlib.Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.db = database if isinstance(database, Database) else open_database(
            database or "", default_sqlite=self.root / "store.sqlite3")
        self.blobs = blobs if isinstance(blobs, BlobStore) else open_blob_store(blobs or "", default_root=self.root)
        self.cache_dir = pathlib.Path(cache_dir or self.root / "cache").resolve()
        self.cache_bytes = int(cache_bytes)
        self._pinned: dict[str, int] = {}  # cache folder -> fetches not released
        self._cache_lock = threading.Lock()
        self.db.migrate("adapters", MIGRATIONS)
        self.sweep(older_than_s=sweep_after_s)

    def close(self) -> None:
        self.db.close()
        self.blobs.close()

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

    def metadata(self, name: str) -> dict:
        rows = self.db.execute("SELECT metadata FROM adapters WHERE name = ?", (name,))
        if not rows:
            raise AdapterNotFoundError(name)
        return json.loads(rows[0][0]) if rows[0][0] else {}

    def all_metadata(self) -> dict[str, dict]:
        """name -> metadata of every adapter that has some."""
        return {name: json.loads(text) for name, text in
                self.db.execute("SELECT name, metadata FROM adapters WHERE metadata IS NOT NULL", ())}

    def set_metadata(self, name: str, changes: dict) -> dict:
        """Merge `changes` (validate_metadata's fields; a field set to null is removed) into `name`'s
        metadata; -> the new metadata."""
        if not isinstance(changes, dict):
            raise AdapterError("adapter metadata must be a JSON object", param="metadata")
        with self.db.transaction(lock=f"adapter:{name}") as tx:
            row = tx.one("SELECT metadata FROM adapters WHERE name = ?", (name,))
            if row is None:
                raise AdapterNotFoundError(name)
            merged = {**(json.loads(row[0]) if row[0] else {}), **changes}
            merged = validate_metadata({k: v for k, v in merged.items() if v is not None})
            tx.execute("UPDATE adapters SET metadata = ? WHERE name = ?", (json.dumps(merged), name))
        return merged

    def list(self) -> list[AdapterVersion]:
        """The latest version of every adapter, sorted by name."""
        return self._query(_SELECT + " WHERE v.version = (SELECT MAX(version) FROM versions"
                           " WHERE adapter_id = a.adapter_id) ORDER BY a.name", ())

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        return self.db.one("SELECT 1 FROM adapters WHERE name = ?", (name,)) is not None

    def changes(self, after: int = 0, limit: int = 1000) -> list[AdapterChange]:
        """The change log after sequence number `after`, oldest first (other processes poll it)."""
        rows = self.db.execute("SELECT seq, name, adapter_id, version, kind, created FROM adapter_changes"
                               " WHERE seq > ? ORDER BY seq LIMIT ?", (int(after), int(limit)))
        return [AdapterChange(*row) for row in rows]

    def last_change(self) -> int:
        row = self.db.one("SELECT MAX(seq) FROM adapter_changes")
        return int(row[0] or 0) if row else 0

    def listen(self, on_change) -> _Listener | None:
        """PostgreSQL: call `on_change()` (from a thread of its own) whenever any process publishes or deletes;
        None for SQLite, whose readers poll `changes()`."""
        if self.db.dialect != "postgresql":
            return None
        return _Listener(self.db.url, on_change)

    def _query(self, sql: str, params: tuple[object, ...]) -> list[AdapterVersion]:
        return [self._version(*row) for row in self.db.execute(sql, params)]

    def _version(self, name, adapter_id, version, rank, alpha, modules, num_bytes, created, sha256,
                 prefix, adapter_type) -> AdapterVersion:
        return AdapterVersion(name=name, adapter_id=int(adapter_id), version=int(version),
                              path=self._local_folder(prefix), rank=int(rank), alpha=float(alpha),
                              target_modules=tuple(json.loads(modules)), num_bytes=int(num_bytes),
                              created=float(created), sha256=sha256, prefix=prefix, adapter_type=adapter_type)

    def _local_folder(self, prefix: str) -> pathlib.Path:
        direct = self.blobs.local_path(prefix)
        return direct if direct is not None else self.cache_dir / prefix

    # --- local copies --------------------------------------------------------------------------

    def fetch(self, version: AdapterVersion, *, pin: bool = False) -> pathlib.Path:
        """A local folder with `version`'s files: in place for a folder blob store, else copied into the
        cache (weights checked against the recorded sha256). `pin` keeps it from eviction until `release`."""
        folder = version.path
        if self.blobs.local_path(version.prefix) is None:
            with self._cache_lock:
                if not (folder / WEIGHTS_NAME).is_file():
                    self._download(version, folder)
                os.utime(folder)  # recency for the LRU
                if pin:
                    self._pinned[str(folder)] = self._pinned.get(str(folder), 0) + 1
                self._evict()
        elif not (folder / WEIGHTS_NAME).is_file():
            raise AdapterError(f"the files of adapter {version.name} v{version.version} are missing from "
                               f"{self.blobs.url}")
        return folder

    def release(self, version: AdapterVersion) -> None:
        with self._cache_lock:
            key = str(version.path)
            if self._pinned.get(key, 0) > 1:
                self._pinned[key] -= 1
            else:
                self._pinned.pop(key, None)

    def _download(self, version: AdapterVersion, folder: pathlib.Path) -> None:
        staging = pathlib.Path(tempfile.mkdtemp(prefix=".fetch-", dir=self._cache_tmp()))
        try:
            infos = self.blobs.list(version.prefix + "/")
            names = {i.key.rsplit("/", 1)[1] for i in infos}
            if not set(_REQUIRED_FILES) <= names:
                raise AdapterError(f"the files of adapter {version.name} v{version.version} are missing from "
                                   f"{self.blobs.url}")
            for info in infos:
                file_name = info.key.rsplit("/", 1)[1]
                if file_name not in _PUBLISHED_FILES:
                    continue
                digest = self.blobs.get_file(info.key, staging / file_name)
                if file_name == WEIGHTS_NAME and digest != version.sha256:
                    raise AdapterError(f"adapter {version.name} v{version.version}: the weights fetched from "
                                       f"{self.blobs.url} do not match their recorded sha256")
            folder.parent.mkdir(parents=True, exist_ok=True)
            os.rename(staging, folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _cache_tmp(self) -> pathlib.Path:
        tmp = self.cache_dir / ".tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        return tmp

    def cached_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.cache_dir.glob("adapters/*/*/*") if p.is_file())

    def _evict(self) -> None:
        folders = [p for p in self.cache_dir.glob("adapters/*/*") if p.is_dir()]
        sizes = {p: sum(f.stat().st_size for f in p.iterdir() if f.is_file()) for p in folders}
        total = sum(sizes.values())
        for folder in sorted(folders, key=lambda p: p.stat().st_mtime):
            if total <= self.cache_bytes:
                break
            if str(folder) in self._pinned:
                continue
            shutil.rmtree(folder, ignore_errors=True)
            total -= sizes[folder]
            logger.info("adapter cache: evicted %s (%d bytes)", folder.relative_to(self.cache_dir), sizes[folder])

    # --- writes --------------------------------------------------------------------------------

    def publish(self, name: str, src_dir: pathlib.Path, *, rank: int, alpha: float,
                target_modules: Sequence[str], metadata: dict | None = None,
                adapter_type: str = "lora") -> AdapterVersion:
        """Publish the adapter folder `src_dir` as the next version of `name`. Copies the top-level
        regular files adapter_config.json, adapter_model.safetensors and README.md (if present);
        on any failure nothing of this publish is visible (and its objects are removed). `metadata`
        (validate_metadata) replaces the name's metadata in the same commit; None keeps what it had."""
        validate_adapter_name(name)
        if metadata is not None:
            metadata = validate_metadata(metadata)
        if adapter_type not in ADAPTER_TYPES:
            raise AdapterError(f"adapter_type must be one of {', '.join(ADAPTER_TYPES)}, got {adapter_type!r}.",
                               param="adapter_type")
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
        # The files go first, under a prefix no other publish can pick; the version row is the commit.
        prefix = f"adapters/{name}/{uuid.uuid4().hex[:16]}"
        try:
            num_bytes, sha256 = 0, ""
            for file_name in sorted(sources, key=lambda f: f != WEIGHTS_NAME):
                digest = self.blobs.put_file(f"{prefix}/{file_name}", sources[file_name])
                num_bytes += sources[file_name].stat().st_size
                if file_name == WEIGHTS_NAME:
                    sha256 = digest
            return self._commit(name, prefix, rank=rank, alpha=float(alpha), target_modules=tuple(target_modules),
                                num_bytes=num_bytes, sha256=sha256, metadata=metadata, adapter_type=adapter_type)
        except BaseException:
            try:
                self._remove_objects(prefix)
            except Exception as e:  # noqa: BLE001 - the store away: the sweep removes them later
                logger.warning("adapter %s: objects of a failed publish stay until the next sweep: %s", name, e)
            raise

    def _commit(self, name: str, prefix: str, *, rank: int, alpha: float, target_modules: tuple[str, ...],
                num_bytes: int, sha256: str, metadata: dict | None = None, adapter_type: str = "lora"
                ) -> AdapterVersion:
        with self.db.transaction(lock=f"adapter:{name}") as tx:
            row = tx.one("SELECT adapter_id FROM adapters WHERE name = ?", (name,))
            created = time.time()
            if row is None:
                (adapter_id,) = tx.one("INSERT INTO adapters (name, created) VALUES (?, ?) RETURNING adapter_id",
                                       (name, created))
                version = 1
            else:
                adapter_id = row[0]
                (version,) = tx.one("SELECT COALESCE(MAX(version), 0) + 1 FROM versions WHERE adapter_id = ?",
                                    (adapter_id,))
            tx.execute("INSERT INTO versions (adapter_id, version, rank, alpha, target_modules, num_bytes, created,"
                       " sha256, prefix, adapter_type) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (adapter_id, version, rank, alpha, json.dumps(list(target_modules)), num_bytes, created,
                        sha256, prefix, adapter_type))
            if metadata is not None:
                tx.execute("UPDATE adapters SET metadata = ? WHERE adapter_id = ?", (json.dumps(metadata), adapter_id))
            self._log_change(tx, name, adapter_id, version, "publish", created)
        return AdapterVersion(name=name, adapter_id=int(adapter_id), version=int(version),
                              path=self._local_folder(prefix), rank=rank, alpha=alpha, target_modules=target_modules,
                              num_bytes=num_bytes, created=created, sha256=sha256, prefix=prefix,
                              adapter_type=adapter_type)

    def delete(self, name: str) -> list[AdapterVersion]:
        """Remove every version of `name` and return what was removed: the rows go (a tombstone goes to the
        change log) in one transaction, then the files. Running requests are unaffected: the pool holds its
        own copy of the weights."""
        with self.db.transaction(lock=f"adapter:{name}") as tx:
            removed = [self._version(*row) for row in
                       tx.execute(_SELECT + " WHERE a.name = ? ORDER BY v.version", (name,))]
            if not removed:
                raise AdapterNotFoundError(name)
            adapter_id = removed[0].adapter_id
            tx.execute("DELETE FROM versions WHERE adapter_id = ?", (adapter_id,))
            tx.execute("DELETE FROM adapters WHERE adapter_id = ?", (adapter_id,))
            self._log_change(tx, name, adapter_id, None, "delete", time.time())
        for version in removed:
            try:
                self._remove_objects(version.prefix)
            except Exception as e:  # noqa: BLE001 - the delete is committed; the sweep removes the rest later
                logger.warning("adapter %s v%d: its files stay until the next sweep: %s", name, version.version, e)
        return removed

    def _log_change(self, tx, name: str, adapter_id: int, version: int | None, kind: str, created: float) -> None:
        tx.execute("INSERT INTO adapter_changes (name, adapter_id, version, kind, created) VALUES (?, ?, ?, ?, ?)",
                   (name, adapter_id, version, kind, created))
        if self.db.dialect == "postgresql":
            tx.execute("SELECT pg_notify(?, ?)", (NOTIFY_CHANNEL, name))  # delivered at commit

    def _remove_objects(self, prefix: str) -> None:
        self.blobs.delete_prefix(prefix + "/")
        local = self.cache_dir / prefix
        if self.blobs.local_path(prefix) is None and local.is_dir() and str(local) not in self._pinned:
            shutil.rmtree(local, ignore_errors=True)

    def sweep(self, older_than_s: float = STALE_UPLOAD_S) -> int:
        """Remove objects under adapters/ that no version references and that are older than `older_than_s`
        (a publish that crashed before its commit, a delete that crashed before removing its files); -> how
        many objects went."""
        if isinstance(self.blobs, FileBlobStore):
            self.blobs.sweep_staging(older_than_s)
        live = {prefix for (prefix,) in self.db.execute("SELECT prefix FROM versions")}
        cutoff = time.time() - older_than_s
        by_prefix: dict[str, list] = {}
        for info in self.blobs.list("adapters/"):
            parts = info.key.split("/")
            if len(parts) >= 4:
                by_prefix.setdefault("/".join(parts[:3]), []).append(info)
        removed = 0
        for prefix, infos in by_prefix.items():
            if prefix not in live and max(i.modified for i in infos) <= cutoff:
                for info in infos:
                    self.blobs.delete(info.key)
                    removed += 1
        if removed:
            logger.info("adapter store: swept %d object(s) no version references", removed)
        return removed


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


class _Listener:
    """A connection of its own that LISTENs on NOTIFY_CHANNEL; reconnects (calling on_change, as something may
    have been missed) after a lost connection."""

    def __init__(self, url: str, on_change) -> None:
        self.url, self.on_change = url, on_change
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="adapter-store-listen", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psycopg
        while not self._stop.is_set():
            try:
                with psycopg.connect(self.url, autocommit=True, connect_timeout=5) as conn:
                    conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    self.on_change()
                    while not self._stop.is_set():
                        for _ in conn.notifies(timeout=1.0):
                            self.on_change()
            except Exception as e:  # noqa: BLE001 - the database away: retry; readers poll meanwhile
                logger.debug("adapter store listener: %s", e)
                self._stop.wait(2.0)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
