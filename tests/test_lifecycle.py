"""The server under overload, shutdown and a dying engine: each test has its
own server, since each ends it."""

import asyncio
import os
import signal
import time

import httpx
import psutil
import pytest

from tests.helpers import AUTH, SERVED_MODEL, post, sse_chunks, start_server


def long_request(max_tokens: int = 200, stream: bool = False) -> dict:
    return {"model": SERVED_MODEL, "messages": [{"role": "user", "content": "Write a long story."}],
            "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0, "stream": stream}


def test_beyond_the_pending_bound_requests_get_503_with_retry_after(tiny_checkpoint, tmp_path):
    server = start_server(tiny_checkpoint, tmp_path / "log", "--max-pending-requests", "2")
    try:
        async def burst():
            async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=120) as client:
                return await asyncio.gather(*(client.post("/v1/chat/completions", json=long_request(60))
                                              for _ in range(8)))

        responses = asyncio.run(burst())
        statuses = sorted(r.status_code for r in responses)
        assert statuses.count(200) >= 2 and statuses.count(503) >= 1
        assert set(statuses) <= {200, 503}
        for r in responses:
            if r.status_code == 503:
                assert r.headers["retry-after"] == "1"
                assert r.json()["error"]["code"] == "overloaded"
            else:
                assert r.json()["usage"]["completion_tokens"] == 60
        # Once the burst is over, requests are admitted again.
        assert post(server.url, "/v1/chat/completions", long_request(4)).status_code == 200
    finally:
        server.stop()


def test_sigterm_lets_requests_in_flight_finish_then_exits_0(tiny_checkpoint, tmp_path):
    server = start_server(tiny_checkpoint, tmp_path / "log", "--shutdown-grace-period", "60")
    process, url = server.process, server.url
    tokens = []
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=long_request(120, stream=True), headers=AUTH,
                      timeout=120) as response:
        chunks = sse_chunks(response.iter_lines())
        next(chunks)
        process.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/health", timeout=5)  # no longer accepting
        finish = None
        for chunk in chunks:
            for choice in chunk["choices"]:
                tokens.append(choice["delta"].get("content", ""))
                finish = choice.get("finish_reason") or finish
    assert finish == "length"
    assert process.wait(timeout=60) == 0


TEARDOWN_PROBE = """
import os


class _Probe:
    # Destroyed by the interpreter's teardown, if the process goes through one.
    def __del__(self, _open=open, _join=os.path.join, _pid=os.getpid):
        with _open(_join({directory!r}, str(_pid())), "w"):
            pass


_probe = _Probe()
"""


def test_idle_server_stops_cleanly_on_sigterm(tiny_checkpoint, tmp_path, monkeypatch):
    """No engine process outlives the server, none has to be force-killed (vLLM gives its
    engine core 5 s, then kills it and logs a warning), and none spends ~2 s in the
    interpreter's teardown (qwen_vl.model_executor.exit): a probe object in every process of
    the server writes a file if it is destroyed by one. The stop time is printed, not asserted."""
    probes = tmp_path / "torn-down"
    probes.mkdir()
    (tmp_path / "sitecustomize.py").write_text(TEARDOWN_PROBE.format(directory=str(probes)))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    log = tmp_path / "log"
    process = start_server(tiny_checkpoint, log).process
    children = psutil.Process(process.pid).children(recursive=True)
    engine = {p.pid for p in children if p.name().startswith("VLLM::")}
    assert len(engine) >= 2, [p.cmdline() for p in children]  # EngineCore and its worker
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0
    print(f"idle server stopped in {time.monotonic() - started:.2f} s")
    _, alive = psutil.wait_procs(children, timeout=5)
    assert not alive, [p.cmdline() for p in alive]
    text = log.read_text()
    assert "force killing" not in text and "Traceback" not in text, text[-3000:]
    torn_down = {int(path.name) for path in probes.iterdir()}
    assert not torn_down & (engine | {process.pid}), (torn_down, engine, process.pid)


def test_engine_death_turns_health_and_requests_into_503_then_exits_nonzero(tiny_checkpoint, tmp_path):
    server = start_server(tiny_checkpoint, tmp_path / "log")
    process, url = server.process, server.url
    try:
        engine_core = [p for p in psutil.Process(process.pid).children(recursive=True)
                       if "EngineCore" in " ".join(p.cmdline()) or p.name().startswith("VLLM::EngineCor")]
        assert engine_core, [p.cmdline() for p in psutil.Process(process.pid).children(recursive=True)]
        for p in engine_core:
            p.kill()
        deadline = time.monotonic() + 10
        while httpx.get(f"{url}/health").status_code != 503:
            assert time.monotonic() < deadline, "/health still 200 ten seconds after the engine died"
            time.sleep(0.2)
        started = time.monotonic()
        response = post(url, "/v1/chat/completions", long_request(8), timeout=30)
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "engine_unavailable"
        assert time.monotonic() - started < 5
        assert process.wait(timeout=60) != 0
    finally:
        server.stop()
