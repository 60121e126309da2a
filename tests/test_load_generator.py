"""The load generator (qwen_vl.benchmarks.load) against a stand-in streaming server: every
request is sent, cycled in order, and its per-request figures (prompt and output tokens,
images, errors) line up, which the MFU count relies on."""

import asyncio
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from qwen_vl.benchmarks.load import benchmark
from qwen_vl.benchmarks.workloads import build_workload


class StandIn(BaseHTTPRequestHandler):
    """Streams two text chunks; the prompt "size" is the body's length, so each request's
    usage identifies it. Every third request gets a 503."""

    seen = []

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        StandIn.seen.append(body)
        if len(StandIn.seen) % 3 == 0:
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for event in ({"choices": [{"delta": {"content": "a"}}]}, {"choices": [{"delta": {"content": "b"}}]},
                      {"choices": [], "usage": {"prompt_tokens": len(body), "completion_tokens": 2}}):
            self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")


@pytest.fixture
def stand_in():
    StandIn.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), StandIn)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_requests_and_their_figures_line_up(stand_in):
    requests = build_workload("mixed", 4, seed=3, max_tokens=2)
    assert len({r.num_images for r in requests}) > 1  # the counts differ, so a mix-up would show
    result = asyncio.run(benchmark(stand_in, "m", requests, concurrency=1, num_requests=6, progress=False))
    sizes = [len(body) for body in StandIn.seen]
    assert len(sizes) == 6 and sizes[4:] == sizes[:2]  # cycled in order
    assert result["completed"] == 4 and result["failed"] == 2
    assert result["request_errors"] == ["", "", "http_503", "", "", "http_503"]
    order = [0, 1, 2, 3, 0, 1]
    assert result["input_images"] == [requests[i].num_images for i in order]
    assert [p for p, e in zip(result["input_lens"], result["request_errors"]) if not e] == \
        [s for s, e in zip(sizes, result["request_errors"]) if not e]
    assert result["total_output_tokens"] == 8


@pytest.mark.parametrize("sampling", ["greedy", "checkpoint"])
def test_sampling_is_greedy_or_left_to_the_servers_defaults(stand_in, sampling):
    requests = build_workload("single-image", 1, seed=0, max_tokens=2, sampling=sampling)
    result = asyncio.run(benchmark(stand_in, "m", requests, concurrency=1, num_requests=1, progress=False))
    body = json.loads(StandIn.seen[0])
    sampling_fields = {"temperature", "top_p", "top_k", "seed"} & set(body)
    assert sampling_fields == ({"temperature"} if sampling == "greedy" else set())
    assert body.get("temperature", 0.0) == 0.0 and body["ignore_eos"] is True
    assert result["sampling"] == sampling
