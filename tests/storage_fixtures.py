"""Backends for the store contract tests: SQLite + a folder, and PostgreSQL + S3 (SeaweedFS), both real."""
from __future__ import annotations

import itertools
import uuid

import pytest

from tests.services import start_postgres, start_seaweedfs

_counter = itertools.count()


@pytest.fixture(scope="session")
def postgres():
    pg = start_postgres()
    yield pg
    pg.remove()


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory):
    server = start_seaweedfs(tmp_path_factory.mktemp("seaweedfs"))
    yield server
    server.stop()


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
    return {"database": pg.create_database(f"t{n}_{uuid.uuid4().hex[:8]}"),
            "blobs": f"s3://loraplex-t{n}-{uuid.uuid4().hex[:8]}/store"}
