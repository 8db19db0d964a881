"""The metadata database behind the stores, chosen by URL: `sqlite:///path/to/file.sqlite3` (the zero-setup
default, one machine) or `postgresql://user@host:port/db` (psycopg 3; several machines).

Stores write their SQL once, with `?` placeholders and the small common subset both dialects share; the few
differences are methods here (`json_text`, the DDL of an identity column). Every read-modify-write runs in
`transaction()`: SQLite's `BEGIN IMMEDIATE` (one writer at a time), PostgreSQL's `BEGIN` plus, when a store
names a lock, a transaction-scoped advisory lock (the same serialisation across every process on every
machine). Schemas are versioned: `migrate(component, steps)` applies each store's numbered steps once, in
order, recorded in `schema_migrations`, under a lock so two processes starting together apply each step once.

A lost connection (server restarted, network cut) becomes `StorageUnavailableError` (the HTTP layer's 503);
the next call reconnects.
"""
from __future__ import annotations

import hashlib
import logging
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

logger = logging.getLogger(__name__)

SQLITE_BUSY_TIMEOUT_S = 30.0
PG_CONNECT_TIMEOUT_S = 5
_PLACEHOLDER = re.compile(r"\?")


class StorageUnavailableError(RuntimeError):
    """The database or blob store cannot be reached; nothing was changed."""


@dataclass(frozen=True, slots=True)
class Migration:
    """One numbered schema step of a store: SQL per dialect, or a callable(tx) for what SQL alone cannot say."""
    version: int
    sqlite: str | Callable[[Transaction], None]
    postgresql: str | Callable[[Transaction], None]


class Transaction:
    """Statements of one transaction (or, from `Database.execute`, one autocommitted statement)."""

    def __init__(self, db: Database, conn: Any) -> None:
        self.db, self._conn = db, conn

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        """Run one statement; -> its rows (empty for statements without a result)."""
        return self.db._run(self._conn, sql, params)

    def one(self, sql: str, params: Sequence[Any] = ()) -> tuple | None:
        rows = self.execute(sql, params)
        return rows[0] if rows else None

    def script(self, sql: str) -> None:
        self.db._script(self._conn, sql)


class Database:
    """A connection to the metadata database shared by the threads of one process (serialised by a lock)."""

    dialect: str
    url: str

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._conn: Any = None

    # ---- the interface stores use ------------------------------------------------------------

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        """One statement on its own (autocommit)."""
        with self._lock, self._translate_errors():
            return self._run(self._connection(), sql, params)

    def one(self, sql: str, params: Sequence[Any] = ()) -> tuple | None:
        rows = self.execute(sql, params)
        return rows[0] if rows else None

    @contextmanager
    def transaction(self, lock: str | None = None) -> Iterator[Transaction]:
        """A read-modify-write: committed when the block ends, rolled back when it raises. `lock` names what it
        serialises with (PostgreSQL: an advisory lock of that name; SQLite serialises every writer anyway)."""
        with self._lock, self._translate_errors():
            conn = self._connection()
            self._begin(conn, lock)
            try:
                yield Transaction(self, conn)
            except BaseException:
                self._rollback(conn)
                raise
            self._commit(conn)

    def migrate(self, component: str, steps: Sequence[Migration]) -> int:
        """Apply `component`'s schema steps not yet applied, in order; -> the schema version now."""
        with self.transaction(lock=f"migrate:{component}") as tx:
            tx.script("CREATE TABLE IF NOT EXISTS schema_migrations (component TEXT NOT NULL, version INTEGER NOT NULL,"
                      " applied_at DOUBLE PRECISION NOT NULL, PRIMARY KEY (component, version))")
            done = {v for (v,) in tx.execute("SELECT version FROM schema_migrations WHERE component = ?",
                                             (component,))}
            for step in sorted(steps, key=lambda s: s.version):
                if step.version in done:
                    continue
                action = step.sqlite if self.dialect == "sqlite" else step.postgresql
                if callable(action):
                    action(tx)
                else:
                    tx.script(action)
                tx.execute("INSERT INTO schema_migrations (component, version, applied_at) VALUES (?, ?, ?)",
                           (component, step.version, time.time()))
                logger.info("%s: applied %s schema step %d", self.url_for_logs(), component, step.version)
            return max([s.version for s in steps] + [0])

    def json_text(self, column: str) -> str:
        """SQL for the text value of key `?` (a parameter) of the JSON object in `column`."""
        raise NotImplementedError

    def json_key(self, key: str) -> str:
        """The parameter `json_text` expects for `key`."""
        raise NotImplementedError

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                try:
                    self._conn.close()
                finally:
                    self._conn = None

    def url_for_logs(self) -> str:
        parts = urlsplit(self.url)
        host = parts.hostname or ""
        return f"{parts.scheme}://{host}{':' + str(parts.port) if parts.port else ''}{parts.path}"

    # ---- per dialect --------------------------------------------------------------------------

    def _connection(self) -> Any:
        raise NotImplementedError

    def _run(self, conn: Any, sql: str, params: Sequence[Any]) -> list[tuple]:
        raise NotImplementedError

    def _script(self, conn: Any, sql: str) -> None:
        raise NotImplementedError

    def _begin(self, conn: Any, lock: str | None) -> None:
        raise NotImplementedError

    def _commit(self, conn: Any) -> None:
        raise NotImplementedError

    def _rollback(self, conn: Any) -> None:
        raise NotImplementedError

    @contextmanager
    def _translate_errors(self) -> Iterator[None]:
        yield


class SQLiteDatabase(Database):
    dialect = "sqlite"

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = Path(path)
        self.url = f"sqlite:///{self.path}"
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                   timeout=SQLITE_BUSY_TIMEOUT_S)
            conn.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")  # a commit that returned survives a power cut
            conn.execute("PRAGMA foreign_keys=ON")
            self._conn = conn
        return self._conn

    def _run(self, conn, sql, params):
        return conn.execute(sql, tuple(params)).fetchall()

    def _script(self, conn, sql):
        for statement in _statements(sql):  # executescript would commit the open transaction
            conn.execute(statement)

    def _begin(self, conn, lock):
        conn.execute("BEGIN IMMEDIATE")

    def _commit(self, conn):
        conn.execute("COMMIT")

    def _rollback(self, conn):
        if conn.in_transaction:
            conn.execute("ROLLBACK")

    def json_text(self, column: str) -> str:
        return f"json_extract({column}, ?)"

    def json_key(self, key: str) -> str:
        import json
        return "$." + json.dumps(str(key))


class PostgresDatabase(Database):
    dialect = "postgresql"

    def __init__(self, url: str) -> None:
        super().__init__()
        try:
            import psycopg  # noqa: F401
        except ImportError as e:  # pragma: no cover - depends on the install
            raise ValueError("a postgresql:// database needs psycopg 3: pip install 'loraplex[cluster]'") from e
        self.url = url

    def _connection(self):
        import psycopg
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = psycopg.connect(self.url, autocommit=True, connect_timeout=PG_CONNECT_TIMEOUT_S)
        return self._conn

    def _run(self, conn, sql, params):
        with conn.cursor() as cur:
            cur.execute(_PLACEHOLDER.sub("%s", sql), tuple(params))
            return cur.fetchall() if cur.description is not None else []

    def _script(self, conn, sql):
        with conn.cursor() as cur:
            for statement in _statements(sql):
                cur.execute(statement)

    def _begin(self, conn, lock):
        with conn.cursor() as cur:
            cur.execute("BEGIN")
            if lock is not None:
                cur.execute("SELECT pg_advisory_xact_lock(%s)", (_lock_key(lock),))

    def _commit(self, conn):
        with conn.cursor() as cur:
            cur.execute("COMMIT")

    def _rollback(self, conn):
        if conn.closed or conn.broken:
            return
        with conn.cursor() as cur:
            cur.execute("ROLLBACK")

    @contextmanager
    def _translate_errors(self):
        import psycopg
        try:
            yield
        except psycopg.OperationalError as e:
            conn, self._conn = self._conn, None
            if conn is not None:
                try:
                    conn.close()
                except Exception:  # noqa: BLE001 - the connection is gone either way
                    pass
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise StorageUnavailableError(f"the database at {self.url_for_logs()} is unavailable: {reason}") from e

    def json_text(self, column: str) -> str:
        return f"(({column})::jsonb ->> ?)"

    def json_key(self, key: str) -> str:
        return str(key)


def open_database(url: str, *, default_sqlite: Path | None = None) -> Database:
    """`sqlite:///abs/path`, `sqlite:relative/path`, `postgresql://...` (or `postgres://`); None or "" with
    `default_sqlite`: that file."""
    if not url:
        if default_sqlite is None:
            raise ValueError("no database URL given")
        return SQLiteDatabase(default_sqlite)
    scheme = url.split(":", 1)[0].lower()
    if scheme == "sqlite":
        path = url[len("sqlite:"):]
        path = path[2:] if path.startswith("//") else path  # sqlite:///abs -> /abs; sqlite:rel -> rel
        if not path:
            raise ValueError(f"--database {url!r}: give a file, e.g. sqlite:///var/lib/loraplex/store.sqlite3")
        return SQLiteDatabase(Path(path).expanduser())
    if scheme in ("postgresql", "postgres"):
        return PostgresDatabase(url)
    raise ValueError(f"--database {url!r}: use sqlite:///path or postgresql://user@host:port/dbname")


def identity_column() -> dict[str, str]:
    """DDL of an auto-numbered primary key that never reuses a number, per dialect."""
    return {"sqlite": "INTEGER PRIMARY KEY AUTOINCREMENT",
            "postgresql": "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY"}


def _lock_key(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


def _statements(sql: str) -> list[str]:
    return [s.strip() for s in sql.split(";") if s.strip()]
