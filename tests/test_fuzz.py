"""Fuzzing against the server's own OpenAPI document with schemathesis and
`--checks all`: valid requests drawn from the schema are accepted, invalid
ones refused with a 4xx in OpenAI's error format, responses match what the
document says (status, content type, headers, body), methods the document
does not list get 405 with `Allow` (RFC 9110), and requests without the API
key get 401.

Deterministic (`--generation-deterministic`) and bounded: MAX_EXAMPLES cases
per operation and phase, at most 2 generated tokens per choice (see
tests/fuzz_hooks.py, which also makes valid requests valid in the ways a JSON
schema cannot say). The response-time check gets a limit that never fires:
speed is measured by the benchmarks, not asserted by tests."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import schemathesis

from tests.helpers import API_KEY, http

MAX_EXAMPLES = 25
OPERATIONS = [
    ("GET", "/health"),
    ("GET", "/version"),
    ("GET", "/metrics"),
    ("GET", "/v1/models"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("POST", "/tokenize"),
    ("POST", "/detokenize"),
    ("POST", "/v1/tokenize"),
    ("POST", "/v1/detokenize"),
]
# /health (an empty 200) and /metrics (Prometheus text): the schema says what they send.
TEXT_RESPONSES = {"/health", "/metrics"}


@pytest.fixture(scope="module")
def api_schema(server):
    return schemathesis.openapi.from_url(f"{server}/openapi.json")


def test_the_schema_documents_every_fuzzed_operation(api_schema):
    for method, path in OPERATIONS:
        assert method.lower() in api_schema[path], (method, path)


@pytest.mark.parametrize("path", sorted(TEXT_RESPONSES))
def test_the_schema_documents_what_health_and_metrics_send(api_schema, server, path):
    response = http.get(f"{server}{path}", timeout=30)
    documented = api_schema.raw_schema["paths"][path]["get"]["responses"]["200"].get("content", {})
    assert response.headers.get("content-type", "").split(";")[0] in documented or (
        not response.content and not documented
    )


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_the_schema_documents_the_400_error_object(api_schema, path):
    responses = api_schema.raw_schema["paths"][path]["post"]["responses"]
    assert "422" not in responses
    assert "400" in responses


def test_schemathesis_with_all_checks_passes(server, tmp_path):
    command = [
        sys.executable, "-m", "schemathesis.cli", "run", f"{server}/openapi.json", "--checks", "all",
        # A response-time limit that never fires: speed is for the benchmarks.
        "--max-response-time", "600", "--header", f"Authorization: Bearer {API_KEY}",
        "--max-examples", str(MAX_EXAMPLES), "--generation-deterministic", "--request-timeout", "300",
        "--continue-on-failure", "--no-color", "--report", "ndjson", "--report-dir", str(tmp_path),
    ]
    tests = Path(__file__).parent
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.fuzz_hooks",
           "PYTHONPATH": os.pathsep.join([str(tests.parent), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
    assert run.returncode == 0, run.stdout[-20000:] + run.stderr[-5000:]
    # It ran every operation, in every phase that applies.
    assert "Tested: 10" in run.stdout, run.stdout[-3000:]
