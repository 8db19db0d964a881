"""Fixtures for the HTTP layer: a fake engine and the app behind a TestClient and the openai client."""
from __future__ import annotations

import openai
import pytest
from starlette.testclient import TestClient

from loraplex.serve.app import build_app
from tests.serve.fake_engine import MODEL_NAME, FakeEngine

@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def client(engine):
    with TestClient(build_app(engine, [MODEL_NAME]), raise_server_exceptions=False) as c:
        yield c


@pytest.fixture
def oai(client) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client, max_retries=0)
