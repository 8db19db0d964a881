"""JobStore: fine-tuning files, jobs, events and checkpoints in a database (SQLite by default, PostgreSQL for
several machines: storage/database.py) with the uploaded files in a blob store (a folder or S3), shared by
several processes.

The HTTP process (serve/fine_tuning_service.py) writes files and jobs and publishes finished ones; the
engine process (trainer/service.py) trains them and writes status changes, events, checkpoints and the
final output. Both open the same store at once, so every read-modify-write runs in one transaction (SQLite's
`BEGIN IMMEDIATE`, PostgreSQL's row lock on the job), and nothing is swept at open beyond stale upload temp
files.

Layout by default, under `root`: `jobs.sqlite3`; uploaded files at `files/<file_id>` (written aside,
fsynced, linked into place; an S3 object under the same key otherwise); checkpoints under
`checkpoints/<job_id>/` (written by the engine side; only rows here).

A job's columns the engine side reads:
- `hyperparameters`: OpenAI's `{"n_epochs", "batch_size" (sequences per optimizer step),
  "learning_rate_multiplier"}` and, for DPO, `"beta"`: numbers, or "auto" until the engine side has read the
  data and resolved them (trainer/defaults.py; it writes them back with `set_resolved`); the learning rate is
  trainer.defaults.BASE_LEARNING_RATE * multiplier.
- `method`: `{"type": "supervised" | "dpo", <type>: {"hyperparameters": ...}}` (OpenAI's shape).
- `priority`: our extension (ASPEN's job priority): a larger number gets a larger share of training steps.
- `lora`: every `trainer.lora_layers.LoRASpec` field, resolved (`r`, `alpha`, `dropout`,
  `target_modules` (a list), `use_rslora`), plus whichever of these trainer extras the client gave
  (absent: the engine side's default):
    `micro_batch_size` (int >= 1: sequences per batched step; gradient accumulation above it),
    `max_length` (int: tokens per training sequence), `packing` (bool), `template` (a name in
    `trainer.data.TEMPLATES`), `validation_fraction` (float in [0, 1): held out when no validation file),
    `warmup_ratio` (float in [0, 1)), `eval_every` (optimizer steps between validation runs; 0: each
    epoch's end), `checkpoint_every` (optimizer steps between checkpoints; 0: each epoch's end),
    `early_stopping_patience` (evaluations without improvement before stopping; 0: off; on: the adapter of
    the best validation loss is published), `self_distillation` (share of the training set added as the
    base model's own answers: trainer/regularization.py), `self_distillation_kl` (bool: train those towards
    the base's distributions rather than their tokens).
- `seed`, `training_file`, `validation_file` (file ids: read them with `read_file`).

Status machine (OpenAI's names): validating_files -> queued | failed | cancelled; queued -> running |
paused | failed | cancelled; running -> succeeded | failed | cancelled | paused | queued (a restart
re-queues); paused -> queued (resume) | failed | cancelled; succeeded, failed and cancelled never change. The engine side records its result with `set_output` (status stays
running); the HTTP side publishes it as an adapter and sets succeeded.

References: OpenAI's fine-tuning API objects (file, fine_tuning.job, .event, .checkpoint) and its model
names `ft:{base}:{suffix}:{job_id}`.
"""
from __future__ import annotations

import json
import math
import re
import secrets
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraplex.adapters.store import MAX_NAME_CHARS
from loraplex.storage.blobs import (
    BlobNotFoundError,
    BlobStore,
    FileBlobStore,
    open_blob_store,
)
from loraplex.storage.database import (
    Database,
    Migration,
    Transaction,
    identity_column,
    open_database,
)

STATUSES = ("validating_files", "queued", "running", "paused", "succeeded", "failed", "cancelled")
ACTIVE_STATUSES = ("validating_files", "queued", "running", "paused")
TERMINAL_STATUSES = ("succeeded", "failed", "cancelled")
_TRANSITIONS = {
    "validating_files": frozenset({"queued", "failed", "cancelled"}),
    "queued": frozenset({"running", "paused", "failed", "cancelled"}),
    "running": frozenset({"succeeded", "failed", "cancelled", "paused", "queued"}),
    "paused": frozenset({"queued", "failed", "cancelled"}),
}
RESULTS_PURPOSE = "fine-tune-results"  # OpenAI's purpose of a job's result file (metrics CSV)
EVENT_LEVELS = ("info", "warn", "error")
_METRIC_KEYS = ("train_loss", "valid_loss")
# the result file's columns (OpenAI's), one row per optimizer step; validation ones where it was evaluated
RESULT_COLUMNS = ("step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy",
                  "learning_rate")
_FILE_ID_RE = re.compile(r"file-[0-9a-f]{24}")
_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
_STALE_TMP_S = 3600.0
BLOB_PATH = "blob:"  # a recorded folder kept in the (remote) blob store: blob:<prefix>


def _schema_v1(dialect: str) -> str:
    ident = identity_column()[dialect]
    return f"""
CREATE TABLE IF NOT EXISTS files (
    seq {ident},
    id TEXT NOT NULL UNIQUE,
    bytes INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    filename TEXT NOT NULL,
    purpose TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    seq {ident},
    id TEXT NOT NULL UNIQUE,
    model TEXT NOT NULL,
    training_file TEXT NOT NULL,
    validation_file TEXT,
    suffix TEXT,
    seed INTEGER NOT NULL,
    hyperparameters TEXT NOT NULL,
    lora TEXT NOT NULL,
    method TEXT NOT NULL,
    metadata TEXT,
    status TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    finished_at INTEGER,
    fine_tuned_model TEXT,
    trained_tokens INTEGER,
    error TEXT,
    output_path TEXT,
    priority INTEGER NOT NULL DEFAULT 0,
    result_files TEXT
);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status);
CREATE TABLE IF NOT EXISTS events (
    seq {ident},
    id TEXT NOT NULL UNIQUE,
    job_id TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    level TEXT NOT NULL,
    message TEXT NOT NULL,
    data TEXT
);
CREATE INDEX IF NOT EXISTS events_by_job ON events (job_id, seq);
CREATE TABLE IF NOT EXISTS checkpoints (
    seq {ident},
    id TEXT NOT NULL UNIQUE,
    job_id TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    step INTEGER NOT NULL,
    path TEXT NOT NULL,
    metrics TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS checkpoints_by_job ON checkpoints (job_id, seq)
"""
_JOB_COLUMNS = ("id", "model", "training_file", "validation_file", "suffix", "seed", "hyperparameters", "lora",
                "method", "metadata", "status", "created_at", "finished_at", "fine_tuned_model", "trained_tokens",
                "error", "output_path", "priority", "result_files")
_JSON_JOB_COLUMNS = ("hyperparameters", "lora", "method", "metadata", "error", "result_files")
# columns added after the first release, before schemas were versioned: a SQLite store of then lacks them
_ADDED_JOB_COLUMNS = (("priority", "INTEGER NOT NULL DEFAULT 0"), ("result_files", "TEXT"))


def _add_missing_columns(tx: Transaction) -> None:
    have = {row[1] for row in tx.execute("PRAGMA table_info(jobs)")}
    for name, sql_type in _ADDED_JOB_COLUMNS:
        if name not in have:
            tx.execute(f"ALTER TABLE jobs ADD COLUMN {name} {sql_type}")


def _sqlite_v1(tx: Transaction) -> None:
    tx.script(_schema_v1("sqlite"))
    _add_missing_columns(tx)


def _schema_v2(dialect: str) -> str:
    # v2: leases. A trainer holds the jobs it trains (lease_owner until lease_expires, renewed while it
    # trains); a job whose lease expired (its trainer died) is claimed by another. The HTTP side claims the
    # publishing of a finished job the same way, so two servers never publish one job twice.
    real = "REAL" if dialect == "sqlite" else "DOUBLE PRECISION"
    return f"""
ALTER TABLE jobs ADD COLUMN lease_owner TEXT;
ALTER TABLE jobs ADD COLUMN lease_expires {real};
ALTER TABLE jobs ADD COLUMN publisher TEXT;
ALTER TABLE jobs ADD COLUMN publisher_expires {real}"""


MIGRATIONS = (Migration(1, _sqlite_v1, _schema_v1("postgresql")),
              Migration(2, _schema_v2("sqlite"), _schema_v2("postgresql")))
CLAIMABLE = ("queued", "running")  # a trainer may take these (running: its trainer died, or restarts)


class InvalidTransitionError(ValueError):
    """A status change the job state machine does not allow (e.g. anything out of a terminal state)."""


class FileInUseError(ValueError):
    """The file is the training or validation file of a job that has not finished."""


class NotFoundError(LookupError):
    """No file or job with that id; `param` names the request field that carried it."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


@dataclass(frozen=True, slots=True)
class FileRecord:
    id: str
    bytes: int
    created_at: int  # unix seconds
    filename: str
    purpose: str
    status: str = "processed"

    def to_openai(self) -> dict[str, Any]:
        return {"object": "file", "id": self.id, "bytes": self.bytes, "created_at": self.created_at,
                "filename": self.filename, "purpose": self.purpose, "status": self.status}


@dataclass(frozen=True, slots=True)
class JobRecord:
    id: str
    model: str  # the base model's served name
    training_file: str
    validation_file: str | None
    suffix: str | None
    seed: int
    hyperparameters: dict  # n_epochs, batch_size, learning_rate_multiplier (and beta for DPO): numbers or "auto"
    lora: dict  # LoRASpec fields plus trainer extras (see the module docstring)
    method: dict  # {"type": "supervised" | "dpo", <type>: {"hyperparameters": {...}}}
    metadata: dict | None
    status: str
    created_at: int
    finished_at: int | None
    fine_tuned_model: str | None
    trained_tokens: int | None
    error: dict | None  # {"code", "message", "param"} once failed
    output_path: str | None  # the engine side's final PEFT folder, waiting to be published
    priority: int = 0
    result_files: list | None = None  # file ids (the metrics CSV), once succeeded

    @property
    def is_finished(self) -> bool:
        return self.status in TERMINAL_STATUSES

    def to_openai(self) -> dict[str, Any]:
        return {"object": "fine_tuning.job", "id": self.id, "model": self.model, "created_at": self.created_at,
                "finished_at": self.finished_at, "fine_tuned_model": self.fine_tuned_model,
                "organization_id": "loraplex", "result_files": list(self.result_files or []), "status": self.status,
                "validation_file": self.validation_file, "training_file": self.training_file,
                "hyperparameters": dict(self.hyperparameters), "trained_tokens": self.trained_tokens,
                "error": self.error, "seed": self.seed, "user_provided_suffix": self.suffix,
                "method": self.method, "estimated_finish": None, "integrations": [], "metadata": self.metadata,
                "lora": dict(self.lora), "priority": self.priority}  # our extensions


CHECKPOINT_SUFFIX_CHARS = len(":ckpt-step-") + 9  # a checkpoint's model name adds this much at most


def fine_tuned_model_name(base: str, suffix: str | None, job_id: str) -> str:
    """OpenAI's `ft:{base}:{suffix}:{job_id}` (suffix may be empty), made a valid adapter name: characters
    outside [A-Za-z0-9._-] become '-', no '..', and `base` is shortened so that the name, and its checkpoints'
    `...:ckpt-step-N`, fit MAX_NAME_CHARS."""
    tail = f":{_safe_name_part(suffix or '')}:{_safe_name_part(job_id)}"
    clean = _safe_name_part(base).lstrip(".-_") or "model"
    return "ft:" + clean[:max(1, MAX_NAME_CHARS - CHECKPOINT_SUFFIX_CHARS - 3 - len(tail))] + tail


def _safe_name_part(text: str) -> str:
    return re.sub(r"\.{2,}", ".", _UNSAFE_NAME_CHARS.sub("-", text))


def process_owner_id(local_root: Path) -> str:
    """Who holds a lease: this host and the store's local folder. Stable across restarts on purpose: a server
    restarted on its folder takes its jobs back at once instead of waiting for its old leases to expire; two
    servers sharing a database each have their own local folder (their own checkpoints and caches)."""
    import hashlib
    import socket
    return f"{socket.gethostname()}:{hashlib.sha256(str(Path(local_root).resolve()).encode()).hexdigest()[:12]}"


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


class JobStore:
    def __init__(self, root: Path, *, database: str | Database | None = None,
                 blobs: str | BlobStore | None = None) -> None:
        self.root = Path(root).expanduser().resolve()  # local state: the SQLite file, caches, checkpoints
        self.root.mkdir(parents=True, exist_ok=True)
        self.checkpoints_dir = self.root / "checkpoints"
        self.checkpoints_dir.mkdir(exist_ok=True)
        self.db = database if isinstance(database, Database) else open_database(
            database or "", default_sqlite=self.root / "jobs.sqlite3")
        self.blobs = blobs if isinstance(blobs, BlobStore) else open_blob_store(blobs or "", default_root=self.root)
        self.db.migrate("fine_tuning", MIGRATIONS)
        if isinstance(self.blobs, FileBlobStore):
            self.blobs.sweep_staging(_STALE_TMP_S)  # only old ones: another process may be writing

    def close(self) -> None:
        self.db.close()
        self.blobs.close()

    def __enter__(self) -> JobStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- files ------------------------------------------------------------------------------------

    def add_file(self, data: bytes, filename: str, purpose: str) -> FileRecord:
        """Store `data` durably, then record it; on any failure nothing remains."""
        file_id = new_id("file")
        record = FileRecord(id=file_id, bytes=len(data), created_at=int(time.time()), filename=filename,
                            purpose=purpose)
        self.blobs.put_bytes(_file_key(file_id), data)
        try:
            self.db.execute("INSERT INTO files (id, bytes, created_at, filename, purpose) VALUES (?, ?, ?, ?, ?)",
                            (record.id, record.bytes, record.created_at, record.filename, record.purpose))
        except BaseException:
            self.blobs.delete(_file_key(file_id))
            raise
        return record

    def get_file(self, file_id: str) -> FileRecord | None:
        row = self.db.one("SELECT id, bytes, created_at, filename, purpose FROM files WHERE id = ?", (file_id,))
        return None if row is None else FileRecord(*row)

    def list_files(self, purpose: str | None = None) -> list[FileRecord]:
        """Newest first."""
        sql = "SELECT id, bytes, created_at, filename, purpose FROM files"
        rows = (self.db.execute(sql + " ORDER BY seq DESC") if purpose is None else
                self.db.execute(sql + " WHERE purpose = ? ORDER BY seq DESC", (purpose,)))
        return [FileRecord(*row) for row in rows]

    def read_file(self, file_id: str) -> bytes:
        """A stored file's bytes (NotFoundError when it is gone)."""
        try:
            return self.blobs.get_bytes(_file_key(file_id))
        except BlobNotFoundError:
            raise NotFoundError(f"No such File object: {file_id}", param="file_id") from None

    def file_path(self, file_id: str) -> Path:
        """A local path of a stored file: in place for a folder blob store, else a copy in root/cache."""
        key = _file_key(file_id)
        local = self.blobs.local_path(key)
        if local is not None:
            if not local.is_file():
                raise NotFoundError(f"No such File object: {file_id}", param="file_id")
            return local
        cached = self.root / "cache" / key
        if not cached.is_file():
            try:
                self.blobs.get_file(key, cached)
            except BlobNotFoundError:
                raise NotFoundError(f"No such File object: {file_id}", param="file_id") from None
        return cached

    def delete_file(self, file_id: str) -> bool:
        """False when there is no such file; FileInUseError while an unfinished job uses it."""
        with self.db.transaction(lock="files") as tx:
            if tx.one("SELECT 1 FROM files WHERE id = ?", (file_id,)) is None:
                return False
            user = tx.one(f"SELECT id FROM jobs WHERE (training_file = ? OR validation_file = ?) AND status IN "
                          f"({_marks(ACTIVE_STATUSES)}) LIMIT 1", (file_id, file_id, *ACTIVE_STATUSES))
            if user is not None:
                raise FileInUseError(f"file {file_id} is used by fine-tuning job {user[0]}, which has not "
                                     "finished; cancel it or wait for it to end")
            tx.execute("DELETE FROM files WHERE id = ?", (file_id,))
        self.blobs.delete(_file_key(file_id))
        cached = self.root / "cache" / _file_key(file_id)
        cached.unlink(missing_ok=True)
        return True

    # ---- jobs -------------------------------------------------------------------------------------

    def create_job(self, *, model: str, training_file: str, validation_file: str | None, suffix: str | None,
                   seed: int, hyperparameters: dict, lora: dict, method: dict,
                   metadata: dict | None = None, priority: int = 0) -> JobRecord:
        """A new job in validating_files. Its files must exist (checked in the same transaction, so a
        concurrent delete cannot leave the job pointing at nothing): NotFoundError otherwise."""
        job = JobRecord(id=new_id("ftjob"), model=model, training_file=training_file,
                        validation_file=validation_file, suffix=suffix, seed=int(seed),
                        hyperparameters=dict(hyperparameters), lora=dict(lora), method=dict(method),
                        metadata=None if metadata is None else dict(metadata), status="validating_files",
                        created_at=int(time.time()), finished_at=None, fine_tuned_model=None, trained_tokens=None,
                        error=None, output_path=None, priority=int(priority), result_files=None)
        values = [_dumps(getattr(job, c)) if c in _JSON_JOB_COLUMNS else getattr(job, c) for c in _JOB_COLUMNS]
        with self.db.transaction(lock="files") as tx:
            for param, file_id in (("training_file", training_file), ("validation_file", validation_file)):
                if file_id is not None and tx.one("SELECT 1 FROM files WHERE id = ?", (file_id,)) is None:
                    raise NotFoundError(f"No such file: {file_id}", param=param)
            tx.execute(f"INSERT INTO jobs ({', '.join(_JOB_COLUMNS)}) VALUES ({_marks(_JOB_COLUMNS)})", values)
        return job

    def get_job(self, job_id: str) -> JobRecord | None:
        row = self.db.one(f"SELECT {', '.join(_JOB_COLUMNS)} FROM jobs WHERE id = ?", (job_id,))
        return None if row is None else _job(row)

    def list_jobs(self, after: str | None = None, limit: int = 20,
                  metadata: dict[str, str] | None = None) -> tuple[list[JobRecord], bool]:
        """Newest first; `after` is the id of the last job of the previous page (OpenAI's cursor); `metadata`:
        only jobs whose metadata has every one of these key-value pairs (OpenAI's `metadata[k]=v` filter)."""
        where, params = self._after("jobs", after, "job")
        clauses = [where.removeprefix("WHERE ")] if where else []
        for k, v in (metadata or {}).items():
            clauses.append(f"{self.db.json_text('metadata')} = ?")
            params = (*params, self.db.json_key(str(k)), str(v))
        where = "WHERE " + " AND ".join(clauses) if clauses else ""
        rows = self.db.execute(f"SELECT {', '.join(_JOB_COLUMNS)} FROM jobs {where} ORDER BY seq DESC LIMIT ?",
                               (*params, limit + 1))
        return [_job(row) for row in rows[:limit]], len(rows) > limit

    def jobs_in_status(self, *statuses: str) -> list[JobRecord]:
        """Oldest first."""
        rows = self.db.execute(f"SELECT {', '.join(_JOB_COLUMNS)} FROM jobs WHERE status IN ({_marks(statuses)})"
                               " ORDER BY seq", statuses)
        return [_job(row) for row in rows]

    def count_by_status(self) -> dict[str, int]:
        """Jobs per status (the metrics' gauge)."""
        return {status: n for status, n in self.db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status")}

    def recent_jobs(self, finished_after: int) -> list[JobRecord]:
        """Running and paused jobs, and those that finished after `finished_after` (epoch seconds); oldest first."""
        rows = self.db.execute(f"SELECT {', '.join(_JOB_COLUMNS)} FROM jobs WHERE status IN ('running', 'paused')"
                               " OR finished_at >= ? ORDER BY seq", (int(finished_after),))
        return [_job(row) for row in rows]

    def latest_losses(self, job_id: str, look_back: int = 50) -> dict[str, float]:
        """The newest train_loss and valid_loss a job reported (either may be missing), from its last
        `look_back` metrics events."""
        rows = self.db.execute("SELECT data FROM events WHERE job_id = ? AND data IS NOT NULL ORDER BY seq DESC"
                               " LIMIT ?", (job_id, look_back))
        out: dict[str, float] = {}
        for (data,) in rows:
            value = json.loads(data)
            if isinstance(value, dict):
                for key in _METRIC_KEYS:
                    if key not in out and isinstance(value.get(key), (int, float)):
                        out[key] = float(value[key])
            if len(out) == len(_METRIC_KEYS):
                break
        return out

    def jobs_awaiting_publish(self) -> list[JobRecord]:
        """Running jobs whose engine side has recorded its output (oldest first)."""
        rows = self.db.execute(f"SELECT {', '.join(_JOB_COLUMNS)} FROM jobs WHERE status = 'running'"
                               " AND output_path IS NOT NULL ORDER BY seq")
        return [_job(row) for row in rows]

    def set_status(self, job_id: str, status: str, *, error: dict | None = None, fine_tuned_model: str | None = None,
                   trained_tokens: int | None = None) -> JobRecord:
        """Move a job along the state machine (InvalidTransitionError otherwise); terminal states stamp
        finished_at. `error` is OpenAI's {"code", "message", "param"}."""
        if status not in STATUSES:
            raise ValueError(f"unknown job status {status!r} (expected one of {', '.join(STATUSES)})")
        changes: dict[str, Any] = {"status": status}
        if status in TERMINAL_STATUSES:
            changes["finished_at"] = int(time.time())
        if error is not None:
            changes["error"] = _dumps({"code": error.get("code"), "message": error.get("message"),
                                       "param": error.get("param")})
        if fine_tuned_model is not None:
            changes["fine_tuned_model"] = fine_tuned_model
        if trained_tokens is not None:
            changes["trained_tokens"] = int(trained_tokens)

        def check(current: JobRecord) -> None:
            if status not in _TRANSITIONS.get(current.status, ()):
                raise InvalidTransitionError(f"fine-tuning job {job_id} is {current.status}; it cannot become {status}")
        return self._update(job_id, changes, check)

    def set_output(self, job_id: str, path: str, trained_tokens: int) -> JobRecord:
        """The engine side's "training done, publish me": records the final PEFT folder of a running job.
        A job that is no longer running (cancelled meanwhile) keeps its state and the output is dropped."""
        def check(current: JobRecord) -> None:
            if current.status != "running":
                raise _Unchanged(current)
        try:
            return self._update(job_id, {"output_path": str(path), "trained_tokens": int(trained_tokens)}, check)
        except _Unchanged as unchanged:
            return unchanged.job

    def set_resolved(self, job_id: str, hyperparameters: dict) -> JobRecord:
        """The engine side's resolution of "auto" hyperparameters (shown on the job from then on, and in its
        method's hyperparameters, as OpenAI shows them once a job runs)."""
        job = self.get_job(job_id)
        if job is None:
            raise NotFoundError(f"No such fine-tuning job: {job_id}", param="fine_tuning_job_id")
        method = dict(job.method)
        kind = method.get("type", "supervised")
        method[kind] = {**(method.get(kind) or {}), "hyperparameters": dict(hyperparameters)}
        return self._update(job_id, {"hyperparameters": _dumps(hyperparameters), "method": _dumps(method)},
                            lambda current: None)

    def set_result_files(self, job_id: str, file_ids: list[str]) -> JobRecord:
        return self._update(job_id, {"result_files": _dumps(list(file_ids))}, lambda current: None)

    def metric_rows(self, job_id: str) -> list[dict]:
        """Every metrics event's data, oldest first, as the rows of the job's result file."""
        rows = self.db.execute("SELECT data FROM events WHERE job_id = ? AND data IS NOT NULL ORDER BY seq", (job_id,))
        out = []
        for (data,) in rows:
            value = json.loads(data)
            if isinstance(value, dict) and "step" in value and any(k in value for k in _METRIC_KEYS):
                out.append(value)
        return out

    def _update(self, job_id: str, changes: dict[str, Any], check) -> JobRecord:
        columns = ", ".join(f"{c} = ?" for c in changes)
        with self.db.transaction(lock=f"job:{job_id}") as tx:
            row = tx.one(f"SELECT {', '.join(_JOB_COLUMNS)} FROM jobs WHERE id = ?", (job_id,))
            if row is None:
                raise NotFoundError(f"No such fine-tuning job: {job_id}", param="fine_tuning_job_id")
            check(_job(row))
            tx.execute(f"UPDATE jobs SET {columns} WHERE id = ?", (*changes.values(), job_id))
            row = tx.one(f"SELECT {', '.join(_JOB_COLUMNS)} FROM jobs WHERE id = ?", (job_id,))
        return _job(row)

    # ---- folders the engine side writes (checkpoints, the trained adapter) -----------------------

    def keep_folder(self, folder: Path, kind: str, job_id: str) -> str:
        """Make `folder` (flat files the engine side wrote, e.g. a checkpoint) readable by every process of the
        store; -> the path to record: the folder itself when the blob store is a folder that holds it, else
        "blob:<prefix>" after uploading it under `kind`/`job_id`/ (write-once, a fresh prefix each time)."""
        folder = Path(folder).resolve()
        if isinstance(self.blobs, FileBlobStore) and self.blobs.root in folder.parents:
            return str(folder)
        prefix = f"{kind}/{job_id}/{folder.name}-{secrets.token_hex(4)}"
        for path in sorted(folder.iterdir()):
            if path.is_file() and not path.is_symlink():
                self.blobs.put_file(f"{prefix}/{path.name}", path)
        return BLOB_PATH + prefix

    def local_folder(self, path: str) -> Path:
        """A recorded folder (`keep_folder`) on this machine: as it is, or fetched into root/cache once."""
        if not path.startswith(BLOB_PATH):
            return Path(path)
        prefix = path[len(BLOB_PATH):]
        local = self.root / "cache" / prefix
        if not local.is_dir():
            staging = self.root / "cache" / ".tmp" / secrets.token_hex(8)
            infos = self.blobs.list(prefix + "/")
            if not infos:
                raise NotFoundError(f"the folder {path} is gone from {self.blobs.url}")
            for info in infos:
                self.blobs.get_file(info.key, staging / info.key.rsplit("/", 1)[1])
            local.parent.mkdir(parents=True, exist_ok=True)
            try:
                staging.rename(local)
            except OSError:  # another thread fetched it first
                shutil.rmtree(staging, ignore_errors=True)
        return local

    # ---- leases: which trainer trains a job, which server publishes it ---------------------------

    def claim(self, job_id: str, owner: str, lease_s: float) -> bool:
        """Take (or keep) `job_id` for training by `owner` until now + lease_s: False when another live owner
        holds it, or it is not queued or running, or it is trained already (waiting to be published)."""
        now = time.time()
        with self.db.transaction(lock=f"job:{job_id}") as tx:
            row = tx.one("SELECT status, output_path, lease_owner, lease_expires FROM jobs WHERE id = ?", (job_id,))
            if row is None or row[0] not in CLAIMABLE or row[1] is not None:
                return False
            if row[2] not in (None, owner) and (row[3] or 0) >= now:
                return False
            tx.execute("UPDATE jobs SET lease_owner = ?, lease_expires = ? WHERE id = ?",
                       (owner, now + lease_s, job_id))
        return True

    def claim_next(self, owner: str, lease_s: float, limit: int, skip: Sequence[str] = ()) -> list[str]:
        """Claim up to `limit` claimable jobs nobody holds (or whose lease expired, or that `owner` holds: after
        a restart), highest priority first, then oldest, leaving out `skip` (those the caller trains already);
        -> their ids. PostgreSQL skips rows another trainer is claiming at this moment (FOR UPDATE SKIP LOCKED)
        instead of waiting for it."""
        now = time.time()
        lock = " FOR UPDATE SKIP LOCKED" if self.db.dialect == "postgresql" else ""
        skip = list(skip)
        not_in = f"AND id NOT IN ({_marks(skip)}) " if skip else ""
        with self.db.transaction() as tx:
            rows = tx.execute(f"SELECT id FROM jobs WHERE status IN ({_marks(CLAIMABLE)}) AND output_path IS NULL "
                              f"AND (lease_owner IS NULL OR lease_owner = ? OR lease_expires < ?) {not_in}"
                              f"ORDER BY priority DESC, seq LIMIT ?{lock}", (*CLAIMABLE, owner, now, *skip, int(limit)))
            ids = [r[0] for r in rows]
            if ids:
                tx.execute(f"UPDATE jobs SET lease_owner = ?, lease_expires = ? WHERE id IN ({_marks(ids)})",
                           (owner, now + lease_s, *ids))
        return ids

    def renew(self, owner: str, lease_s: float) -> dict[str, str]:
        """Extend every lease `owner` holds; -> {job id: status} of those jobs (a job missing here is no longer
        this owner's: its lease expired and another took it, or it was released)."""
        now = time.time()
        with self.db.transaction() as tx:
            tx.execute("UPDATE jobs SET lease_expires = ? WHERE lease_owner = ?", (now + lease_s, owner))
            return dict(tx.execute("SELECT id, status FROM jobs WHERE lease_owner = ?", (owner,)))

    def release(self, job_id: str, owner: str) -> None:
        self.db.execute("UPDATE jobs SET lease_owner = NULL, lease_expires = NULL WHERE id = ? AND lease_owner = ?",
                        (job_id, owner))

    def lease_of(self, job_id: str) -> tuple[str | None, float | None]:
        row = self.db.one("SELECT lease_owner, lease_expires FROM jobs WHERE id = ?", (job_id,))
        return (None, None) if row is None else (row[0], row[1])

    def claim_publish(self, job_id: str, owner: str, lease_s: float) -> bool:
        """The HTTP side's claim on publishing a trained job (one server publishes it; another takes over when
        the claim expires)."""
        now = time.time()
        with self.db.transaction(lock=f"job:{job_id}") as tx:
            row = tx.one("SELECT status, output_path, publisher, publisher_expires FROM jobs WHERE id = ?", (job_id,))
            if row is None or row[0] != "running" or row[1] is None:
                return False
            if row[2] not in (None, owner) and (row[3] or 0) >= now:
                return False
            tx.execute("UPDATE jobs SET publisher = ?, publisher_expires = ? WHERE id = ?",
                       (owner, now + lease_s, job_id))
        return True

    # ---- events -----------------------------------------------------------------------------------

    def add_event(self, job_id: str, level: str, message: str, data: dict | None = None) -> None:
        level = "warn" if level == "warning" else level
        if level not in EVENT_LEVELS:
            raise ValueError(f"event level must be one of {', '.join(EVENT_LEVELS)}; got {level!r}")
        row = (new_id("ftevent"), job_id, int(time.time()), level, message, None if data is None else _dumps(data))
        self.db.execute("INSERT INTO events (id, job_id, created_at, level, message, data) VALUES (?, ?, ?, ?, ?, ?)",
                        row)

    def list_events(self, job_id: str, after: str | None = None, limit: int = 20) -> tuple[list[dict], bool]:
        """Newest first, as OpenAI's fine_tuning.job.event objects; `after` is an event id."""
        where, params = self._after("events", after, "event", job_id)
        rows = self.db.execute(f"SELECT id, created_at, level, message, data FROM events {where}"
                               " ORDER BY seq DESC LIMIT ?", (*params, limit + 1))
        events = []
        for event_id, created_at, level, message, data in rows[:limit]:
            data = None if data is None else json.loads(data)
            is_metrics = isinstance(data, dict) and any(k in data for k in _METRIC_KEYS)
            events.append({"object": "fine_tuning.job.event", "id": event_id, "created_at": created_at,
                           "level": level, "message": message, "data": data,
                           "type": "metrics" if is_metrics else "message"})
        return events, len(rows) > limit

    # ---- checkpoints ------------------------------------------------------------------------------

    def add_checkpoint(self, job_id: str, step: int, path: str, metrics: dict) -> dict:
        job = self.get_job(job_id)
        if job is None:
            raise NotFoundError(f"No such fine-tuning job: {job_id}", param="fine_tuning_job_id")
        row = (new_id("ftckpt"), job_id, int(time.time()), int(step), str(path), _dumps({"step": int(step), **metrics}))
        self.db.execute("INSERT INTO checkpoints (id, job_id, created_at, step, path, metrics) VALUES (?, ?, ?, ?, ?, ?)",
                        row)
        return _checkpoint(job, row[0], row[2], row[3], row[5])

    def list_checkpoints(self, job_id: str, after: str | None = None, limit: int = 10) -> tuple[list[dict], bool]:
        """Newest first, as OpenAI's fine_tuning.job.checkpoint objects; `after` is a checkpoint id."""
        job = self.get_job(job_id)
        if job is None:
            return [], False
        where, params = self._after("checkpoints", after, "checkpoint", job_id)
        rows = self.db.execute(f"SELECT id, created_at, step, metrics FROM checkpoints {where}"
                               " ORDER BY seq DESC LIMIT ?", (*params, limit + 1))
        return [_checkpoint(job, *row) for row in rows[:limit]], len(rows) > limit

    def checkpoint_at(self, job_id: str, step: int) -> dict | None:
        """The newest checkpoint of `job_id` at optimizer step `step`, with its folder under "path"."""
        job = self.get_job(job_id)
        row = self.db.one("SELECT id, created_at, step, metrics, path FROM checkpoints WHERE job_id = ? "
                          "AND step = ? ORDER BY seq DESC LIMIT 1", (job_id, int(step)))
        if job is None or row is None:
            return None
        return {**_checkpoint(job, *row[:4]), "path": row[4]}

    def latest_checkpoint(self, job_id: str) -> dict | None:
        """The newest checkpoint, with its folder under "path" (for resuming)."""
        job = self.get_job(job_id)
        row = self.db.one("SELECT id, created_at, step, metrics, path FROM checkpoints WHERE job_id = ?"
                          " ORDER BY seq DESC LIMIT 1", (job_id,))
        if job is None or row is None:
            return None
        return {**_checkpoint(job, *row[:4]), "path": row[4]}

    # ---- internals --------------------------------------------------------------------------------

    def _after(self, table: str, after: str | None, what: str, job_id: str | None = None) -> tuple[str, tuple]:
        """The WHERE clause of a page: rows of `job_id` (if given) older than the cursor row `after`."""
        clauses, params = [], []
        if job_id is not None:
            clauses.append("job_id = ?")
            params.append(job_id)
        if after is not None:
            sql, cursor_params = f"SELECT seq FROM {table} WHERE id = ?", (after,)
            if job_id is not None:
                sql, cursor_params = sql + " AND job_id = ?", (after, job_id)
            found = self.db.one(sql, cursor_params)
            if found is None:
                raise ValueError(f"after must be the id of a {what} from a previous page; got {after!r}")
            clauses.append("seq < ?")
            params.append(found[0])
        return ("WHERE " + " AND ".join(clauses) if clauses else ""), tuple(params)


class _Unchanged(Exception):
    def __init__(self, job: JobRecord) -> None:
        self.job = job


def _job(row: tuple) -> JobRecord:
    values = dict(zip(_JOB_COLUMNS, row))
    for column in _JSON_JOB_COLUMNS:
        if values[column] is not None:
            values[column] = json.loads(values[column])
    return JobRecord(**values)


def _checkpoint(job: JobRecord, checkpoint_id: str, created_at: int, step: int, metrics: str) -> dict:
    name = job.fine_tuned_model or fine_tuned_model_name(job.model, job.suffix, job.id)
    return {"object": "fine_tuning.job.checkpoint", "id": checkpoint_id, "created_at": created_at,
            "fine_tuned_model_checkpoint": f"{name}:ckpt-step-{step}", "step_number": step,
            "metrics": json.loads(metrics), "fine_tuning_job_id": job.id}


def _marks(items: tuple | list) -> str:
    return ", ".join("?" * len(items))


def _finite(value: Any) -> Any:
    """JSON has no NaN or Infinity (a diverged loss would make every later read fail): they become null.
    NumPy and 0-d torch scalars become Python numbers."""
    if hasattr(value, "item") and not isinstance(value, (dict, list, tuple, str)):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _dumps(value: Any) -> str:
    return json.dumps(_finite(value), allow_nan=False)


def _file_key(file_id: str) -> str:
    if not _FILE_ID_RE.fullmatch(file_id):  # ids become keys and paths: never let one climb out of files/
        raise ValueError(f"{file_id!r} is not a file id")
    return f"files/{file_id}"
