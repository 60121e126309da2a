"""Shared fixtures: real things on disk, built once per test session."""

import contextlib
import functools
import http.server
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

# A small KV cache keeps each engine at a few GiB of RAM on the CI machine.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from qwen_vl.model_executor.checkpoint import write_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A random tiny checkpoint (seed 0) in the Qwen-VL-Chat layout, safetensors shards."""
    return write_checkpoint(tmp_path_factory.mktemp("tiny"), preset="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_checkpoint_bin(tmp_path_factory):
    """The same checkpoint as `tiny_checkpoint`, as pytorch_model-*.bin shards only."""
    return write_checkpoint(
        tmp_path_factory.mktemp("tiny-bin"), preset="tiny", seed=0, safetensors=False, bin_shards=True
    )


@pytest.fixture(scope="session")
def engine(tiny_checkpoint):
    """One vLLM offline engine on the tiny checkpoint for the whole session,
    float32 for parity; chunked prefill and prefix caching at vLLM's defaults.
    Eager mode: compiling adds ~40 s of start-up on this CPU and changes nothing
    the tests look at."""
    from vllm import LLM

    llm = LLM(model=str(tiny_checkpoint), dtype="float32", enforce_eager=True, seed=0)
    yield llm
    llm.llm_engine.engine_core.shutdown()


@pytest.fixture(scope="session")
def reference(tiny_checkpoint):
    from tests.reference import ReferenceQwenVL

    return ReferenceQwenVL.from_pretrained(tiny_checkpoint)


@pytest.fixture(scope="session")
def ref_tokenizer():
    from qwen_vl.model_executor.tokenizer import qwen_tiktoken_path
    from tests.reference import ReferenceTokenizer

    return ReferenceTokenizer(qwen_tiktoken_path())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


API_KEY = "test-key"
SERVED_MODEL = "qwen-vl-tiny"


def launch(command: list[str], url: str, log_path) -> subprocess.Popen:
    """Start a server process (output to `log_path`) and return once its
    /health answers 200."""
    with open(log_path, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    # Generous: a loaded 2-core machine has taken minutes to start a server.
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{command[2]} exited with {process.returncode}:\n{log_path.read_text()[-5000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(1)
    process.kill()
    raise RuntimeError(f"{command[2]} not healthy in time:\n{log_path.read_text()[-5000:]}")


def start_server(checkpoint, log_path, *extra: str, eager: bool = True) -> tuple[subprocess.Popen, str]:
    """`python -m qwen_vl.server` on a free loopback port, float32, with the
    test API key, eager unless told (compiling adds ~40 s of start-up); returns
    once /health answers 200."""
    for attempt in range(3):
        port = free_port()
        command = [
            sys.executable, "-m", "qwen_vl.server", "--model", str(checkpoint), "--port", str(port),
            "--served-model-name", SERVED_MODEL, "--dtype", "float32", *(["--enforce-eager"] if eager else []),
            "--seed", "0", "--api-key", API_KEY, *extra,
        ]
        url = f"http://127.0.0.1:{port}"
        try:
            return launch(command, url, log_path), url
        except RuntimeError:
            # The port was free when picked, but the engine's start takes a while and
            # another process (vLLM's own sockets among them) may take it meanwhile.
            if attempt == 2 or "address already in use" not in log_path.read_text():
                raise


def stop_server(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="session")
def server(tiny_checkpoint, tmp_path_factory):
    """One real server for the session, with private image URLs allowed (the
    tests serve images from 127.0.0.1)."""
    log = tmp_path_factory.mktemp("server") / "server.log"
    process, url = start_server(
        tiny_checkpoint, log, "--allow-private-image-urls", "--max-images-per-request", "4",
        # Compact JSON: random weights would otherwise fill a JSON answer with whitespace.
        "--structured-outputs-config", '{"backend": "xgrammar", "disable_any_whitespace": true}',
    )
    yield url
    stop_server(process)


ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 413: "invalid_request_error", 503: "service_unavailable_error"}


def assert_error(response: httpx.Response, status: int, *, code=None, param=None, says: str = "") -> dict:
    """`status` with exactly OpenAI's error object, no stack trace; returns the error."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert "Traceback" not in response.text
    body = response.json()
    assert list(body) == ["error"]
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == ERROR_TYPES[status]
    assert isinstance(error["message"], str) and error["message"]
    assert says.lower() in error["message"].lower(), error["message"]
    assert error["code"] == code
    assert error["param"] == param
    return error


def chat_answers(servers: dict, body: dict, timeout: float = 120) -> dict:
    """Each server's answer (JSON) to the same chat request, by the servers' names; each must be a 200."""
    answers = {}
    for name, url in servers.items():
        response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=timeout,
                              headers={"Authorization": f"Bearer {API_KEY}"})
        assert response.status_code == 200, (name, response.text)
        answers[name] = response.json()
    return answers


def chat_body(content="Hello", **fields) -> dict:
    return {"model": SERVED_MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 2, **fields}


@pytest.fixture(scope="session")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def async_client(server):
    from openai import AsyncOpenAI

    return AsyncOpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0, timeout=300)


@pytest.fixture(scope="session")
def image_host(tmp_path_factory):
    """A plain HTTP server on 127.0.0.1 serving test images: `image_host(name)` -> URL."""
    root = tmp_path_factory.mktemp("images")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()

    def publish(name: str, image) -> str:
        image.save(root / name)
        return f"http://127.0.0.1:{httpd.server_port}/{name}"

    yield publish
    httpd.shutdown()


@contextlib.contextmanager
def environment_variable(name: str, value: str):
    """`name`=`value` in os.environ inside (the engines and servers started there inherit
    it), its earlier value or absence back after."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


def cpu_threads_bind(value: str):
    """VLLM_CPU_OMP_THREADS_BIND for the engines started inside: one group of
    cores per rank ("0|1": a rank per core; vLLM's default refuses several
    ranks on one NUMA node)."""
    return environment_variable("VLLM_CPU_OMP_THREADS_BIND", value)
