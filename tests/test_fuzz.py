"""Fuzzing against the server's own OpenAPI document (schemathesis): for every
operation, valid and invalid requests drawn from the schema never get a 5xx;
every 4xx is OpenAI's error object; documented responses match their schema.

Deterministic (Hypothesis derandomized, no example database) and bounded:
MAX_EXAMPLES requests per operation and mode. Generation is capped at
MAX_TOKENS tokens per choice, because the schema allows any max_tokens and
the tiny model spends ~50 ms per token on this CPU."""

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import negative_data_rejection, response_schema_conformance

from tests.conftest import API_KEY, SERVED_MODEL

AUTH = {"Authorization": f"Bearer {API_KEY}"}
MAX_EXAMPLES = 50
MAX_TOKENS = 2
OPERATIONS = [
    ("GET", "/health"),
    ("GET", "/version"),
    ("GET", "/metrics"),
    ("GET", "/v1/models"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
]
ERROR_FIELDS = {"message", "type", "param", "code"}


@schemathesis.check
def openai_error_object(ctx, response, case):
    """A 4xx carries `{"error": {"message": str, "type": str, "param": str|null, "code": str|null}}`."""
    if not 400 <= response.status_code < 500:
        return None
    body = response.json()
    assert list(body) == ["error"], body
    error = body["error"]
    assert set(error) == ERROR_FIELDS, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    assert error["param"] is None or isinstance(error["param"], str), error
    assert error["code"] is None or isinstance(error["code"], str), error
    assert "Traceback" not in response.text
    return True


# /health (an empty 200) and /metrics (Prometheus text): the schema says what they send.
TEXT_RESPONSES = {"/health", "/metrics"}


def checks(path: str, mode: GenerationMode) -> list:
    chosen = [not_a_server_error, openai_error_object]
    chosen.append(response_schema_conformance)
    if mode is GenerationMode.NEGATIVE:
        chosen.append(negative_data_rejection)
    return chosen


@pytest.fixture(scope="module")
def api_schema(server):
    return schemathesis.openapi.from_url(f"{server}/openapi.json")


def shape(body, mode: GenerationMode) -> None:
    """Valid requests name the served model (else all would be 404s) and
    generate at most MAX_TOKENS tokens per choice; out-of-range values stay,
    for validation to refuse."""
    if not isinstance(body, dict):
        return
    if mode is GenerationMode.POSITIVE:
        body["model"] = SERVED_MODEL
    for field in ("max_tokens", "max_completion_tokens"):
        value = body.get(field)
        # Integral floats (2000.0) are integers to the schema and to validation.
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > MAX_TOKENS:
            body[field] = MAX_TOKENS
    if body.get("max_tokens") is None:  # unset or null: the checkpoint's default, 512 tokens
        body["max_tokens"] = MAX_TOKENS


def test_the_schema_documents_every_fuzzed_operation(api_schema):
    for method, path in OPERATIONS:
        assert method.lower() in api_schema[path], (method, path)


@pytest.mark.parametrize("path", sorted(TEXT_RESPONSES))
def test_the_schema_documents_what_health_and_metrics_send(api_schema, server, path):
    response = httpx.get(f"{server}{path}", timeout=30)
    documented = api_schema.raw_schema["paths"][path]["get"]["responses"]["200"].get("content", {})
    assert response.headers.get("content-type", "").split(";")[0] in documented or (
        not response.content and not documented
    )


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_the_schema_documents_the_400_error_object(api_schema, path):
    responses = api_schema.raw_schema["paths"][path]["post"]["responses"]
    assert "422" not in responses
    assert "400" in responses


# Invalid requests only where there is something to make invalid: the GET
# operations take no parameters and no body.
FUZZ_CASES = [(method, path, GenerationMode.POSITIVE) for method, path in OPERATIONS] + [
    (method, path, GenerationMode.NEGATIVE) for method, path in OPERATIONS if method == "POST"
]


@pytest.mark.parametrize("method, path, mode", FUZZ_CASES, ids=[f"{m} {p} {mode.value}" for m, p, mode in FUZZ_CASES])
def test_requests_drawn_from_the_schema_get_no_server_error(api_schema, server, method, path, mode):
    operation = api_schema[path][method.lower()]

    @settings(
        max_examples=MAX_EXAMPLES, derandomize=True, database=None, deadline=None,
        phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def fuzz(case):
        shape(case.body, mode)
        response = case.call(base_url=server, headers=AUTH, timeout=120)
        case.validate_response(response, checks=checks(path, mode))

    fuzz()
