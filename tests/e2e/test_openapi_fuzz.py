"""schemathesis against a real server with the default model: every operation of /openapi.json, with generated
requests (valid and not), answers without a server error and with a body its schema describes."""
from __future__ import annotations

import pytest

from tests.e2e.conftest import smol_server

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402 - after the skip
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import response_schema_conformance  # noqa: E402


@pytest.fixture(scope="module")
def server(default_model_dir):
    srv = smol_server(default_model_dir, "--max-model-len", "96", "--max-num-seqs", "16")
    yield srv
    srv.stop()


def test_no_server_errors_and_conforming_answers(server):
    """Each operation in turn (hypothesis drives schemathesis' generated cases; derandomized: the same cases each
    run). A failure names the operation and the request schemathesis can replay."""
    import httpx
    document = httpx.get(server.base_url + "/openapi.json").json()
    schema = schemathesis.openapi.from_dict(document)
    schema.config.update(base_url=server.base_url)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == sum(len(ops) for ops in document["paths"].values())
    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                  database=None)
        def check(case):
            case.call_and_validate(checks=[not_a_server_error, response_schema_conformance], timeout=120)

        check()
