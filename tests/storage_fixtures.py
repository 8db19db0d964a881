"""Backends for the store contract tests: SQLite + a folder, and PostgreSQL + S3 (SeaweedFS), both real."""
from __future__ import annotations

import itertools
import shutil
import tempfile
import uuid
from pathlib import Path

import pytest

from tests.services import start_postgres, start_seaweedfs

_counter = itertools.count()
TEST_BUCKET = "loraplex-tests"


@pytest.fixture(scope="session")
def postgres():
    pg = start_postgres()
    yield pg
    pg.remove()


@pytest.fixture(scope="session")
def seaweedfs():
    # a folder of its own, not pytest's: another pytest run on the machine prunes old basetemp folders
    root = Path(tempfile.mkdtemp(prefix="loraplex-seaweedfs-"))
    server = start_seaweedfs(root)
    yield server
    server.stop()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=["sqlite+file", "postgresql+s3"])
def backend(request, tmp_path, monkeypatch):
    """-> kwargs for a store: {} (the local default) or {"database": url, "blobs": "s3://..."}, each test with
    its own database and bucket."""
    if request.param == "sqlite+file":
        return {}
    pg = request.getfixturevalue("postgres")
    s3 = request.getfixturevalue("seaweedfs")
    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    n = next(_counter)
    # one bucket, a prefix per test: SeaweedFS gives every bucket volumes of its own, and runs out of them
    # after a few dozen buckets (PutObject: InternalError)
    return {"database": pg.create_database(f"t{n}_{uuid.uuid4().hex[:8]}"),
            "blobs": f"s3://{TEST_BUCKET}/t{n}-{uuid.uuid4().hex[:8]}"}
