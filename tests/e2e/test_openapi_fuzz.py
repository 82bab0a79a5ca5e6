"""schemathesis against the served OpenAPI document: no input may cause a 5xx."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from tests.e2e.conftest import API_KEY

OPERATIONS = ["POST /v1/chat/completions", "POST /v1/audio/speech",
              "POST /v1/audio/transcriptions", "POST /v1/realtime/client_secrets",
              "GET /v1/models", "GET /healthz", "GET /metrics"]


@pytest.fixture(scope="module")
def api_schema(server):
    return schemathesis.openapi.from_url(server + "/openapi.json")


@pytest.mark.parametrize("label", OPERATIONS)
def test_no_server_errors(api_schema, server, label):
    method, path = label.split(" ")
    operation = api_schema[path][method]

    @given(case=operation.as_strategy())
    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck),
              database=None)
    def check(case):
        # Keep generated chats short: a valid request does real work on two cores.
        if path == "/v1/chat/completions" and isinstance(case.body, dict):
            case.body["max_completion_tokens"] = 4
            case.body.pop("max_tokens", None)
            case.body.pop("n", None)
        case.call_and_validate(base_url=server, timeout=60, checks=[not_a_server_error],
                               headers={"Authorization": f"Bearer {API_KEY}"})

    check()
