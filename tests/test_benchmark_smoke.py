"""The load generator end to end against the session's real server: a complete result, no
failures. Timings are recorded, never asserted."""

import json
import subprocess
import sys

from tests.helpers import API_KEY, SERVED_MODEL

# `vllm bench serve`'s key names, which BENCHMARKS.md and the plots read.
EXPECTED_KEYS = {
    "duration", "completed", "failed", "errors", "total_input_tokens", "total_output_tokens",
    "request_throughput", "output_throughput", "total_token_throughput", "max_concurrency",
} | {f"{stat}_{metric}_ms" for stat in ("mean", "median", "std", "p90", "p99")
     for metric in ("ttft", "tpot", "itl", "e2el")}


def test_load_generator_completes_every_request_and_writes_every_metric(server, tmp_path):
    result_file = tmp_path / "result.json"
    command = [
        sys.executable, "-m", "qwen_vl.benchmarks.load", "--base-url", server, "--api-key", API_KEY,
        "--model", SERVED_MODEL, "--workload", "mixed", "--num-requests", "8", "--concurrency", "4",
        "--max-tokens", "8", "--warmup", "1", "--no-progress", "--result-json", str(result_file),
    ]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr[-3000:]
    result = json.loads(result_file.read_text())
    assert EXPECTED_KEYS <= result.keys()
    assert (result["completed"], result["failed"], result["errors"]) == (8, 0, {})
    assert result["total_input_tokens"] > 0
    assert result["total_output_tokens"] > 0
    assert "| output tok/s |" in finished.stdout
