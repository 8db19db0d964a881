"""GET /openapi.json: every route of the app is described, request bodies by the very pydantic models the routes
validate with, and schemathesis reads the document."""
from __future__ import annotations

import re

import pytest

from loraplex.serve.schemas import ChatCompletionRequest


def test_every_route_is_described(client):
    doc = client.get("/openapi.json").json()
    assert doc["openapi"].startswith("3.1") and doc["info"]["version"]
    described = {(path, method) for path, ops in doc["paths"].items() for method in ops}
    routes = {(re.sub(r"\{(\w+)(:\w+)?\}", r"{\1}", r.path), m.lower()) for r in client.app.routes
              if hasattr(r, "methods") for m in r.methods if m != "HEAD"}  # (the playground's static files: a Mount)
    assert routes == described


def test_request_bodies_are_the_route_models(client):
    doc = client.get("/openapi.json").json()
    chat = doc["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert chat == {"$ref": "#/components/schemas/ChatCompletionRequest"}
    props = doc["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert set(props) == set(ChatCompletionRequest.model_json_schema()["properties"])
    assert {"tools", "response_format", "logit_bias", "prompt_logprobs"} <= set(props)
    assert "multipart/form-data" in doc["paths"]["/v1/adapters"]["post"]["requestBody"]["content"]


def test_schemathesis_reads_the_document(client):
    schemathesis = pytest.importorskip("schemathesis")
    schema = schemathesis.openapi.from_dict(client.get("/openapi.json").json())
    assert len(list(schema.get_all_operations())) == 35
