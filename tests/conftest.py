"""Shared fixtures: real things (checkpoints on disk, an engine, a server), built once per test
session. What the tests share that is not a fixture is in tests/helpers.py."""

import functools
import http.server
import os
import sys
import threading

import pytest

# A small KV cache keeps each engine at a few GiB of RAM on the CI machine.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from qwen_vl.benchmarks.harness import Server
from qwen_vl.testing.checkpoint import write_checkpoint
from tests.helpers import API_KEY, cases, start_server, started


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
    from qwen_vl.testing.reference import ReferenceQwenVL

    return ReferenceQwenVL.from_pretrained(tiny_checkpoint)


@pytest.fixture(scope="session")
def ref_tokenizer():
    from qwen_vl.model_executor.tokenizer import qwen_tiktoken_path
    from qwen_vl.testing.reference import ReferenceTokenizer

    return ReferenceTokenizer(qwen_tiktoken_path())


@pytest.fixture(scope="session")
def parity_cases(ref_tokenizer):
    """The parity cases (tests.helpers.cases) in the original's prompt format."""
    return cases(ref_tokenizer)


@pytest.fixture(scope="session")
def server(tiny_checkpoint, tmp_path_factory):
    """One real server for the session, with private image URLs allowed (the
    tests serve images from 127.0.0.1)."""
    log = tmp_path_factory.mktemp("server") / "server.log"
    server = start_server(
        tiny_checkpoint, log, "--allow-private-image-urls", "--max-images-per-request", "4",
        # Compact JSON: random weights would otherwise fill a JSON answer with whitespace.
        "--structured-outputs-config", '{"backend": "xgrammar", "disable_any_whitespace": true}',
    )
    yield server.url
    server.stop()


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory):
    """The server as `bash scripts/run.sh` starts it, serving the shipped demo model (no --model),
    with the test key; one per module that asks for it."""
    log = tmp_path_factory.mktemp("demo-server") / "server.log"
    server = started(Server("qwen_vl.server (demo)", lambda port: [
        sys.executable, "-m", "qwen_vl.server", "--port", str(port), "--api-key", API_KEY], log))
    yield server.url
    server.stop()


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
