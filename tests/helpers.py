"""What the test modules share besides fixtures (those are in tests/conftest.py): the test
server's key and model name and the requests sent to it, the test images, servers started the
way the tests start them, environment variables for the engines started inside a block, and
the cases that the reference and the plugin must answer alike."""

import base64
import contextlib
import io
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from qwen_vl.benchmarks.harness import Server, our_server_command
from qwen_vl.model_executor.tokenizer import IM_END_ID, IM_START_ID

API_KEY = "test-key"
SERVED_MODEL = "qwen-vl-tiny"
AUTH = {"Authorization": f"Bearer {API_KEY}"}

# One HTTP client for the whole session. A new httpx client parses the CA bundle (ssl's
# load_verify_locations), which took 2-15 s of this VM's time now and then while an engine was
# streaming (measured 2026-12-06), long enough for a test's request to miss what it was sent to see.
http = httpx.Client(timeout=120)

# ---- requests ------------------------------------------------------------------------------


def post(server: str, path: str, body=None, *, content: bytes | None = None, headers: dict = AUTH,
         timeout: float = 120) -> httpx.Response:
    """POST `body` as JSON, or `content` (bytes sent as they are, labelled JSON), to `server`'s
    `path`, with the test key unless `headers` say otherwise."""
    if content is not None:
        return http.post(f"{server}{path}", content=content, headers={**headers, "Content-Type": "application/json"},
                          timeout=timeout)
    return http.post(f"{server}{path}", json=body, headers=headers, timeout=timeout)


def chat_body(content="Hello", **fields) -> dict:
    """A chat request of one user message, for 2 tokens unless `fields` say otherwise."""
    return {"model": SERVED_MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 2, **fields}


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def with_image(url: str, **fields) -> dict:
    """A chat request asking what the image at `url` is."""
    return chat_body([image_part(url), {"type": "text", "text": "What is this?"}], **fields)


def chat_answers(servers: dict, body: dict, timeout: float = 120) -> dict:
    """Each server's answer (JSON) to the same chat request, by the servers' names; each must be a 200."""
    answers = {}
    for name, url in servers.items():
        response = post(url, "/v1/chat/completions", body, timeout=timeout)
        assert response.status_code == 200, (name, response.text)
        answers[name] = response.json()
    return answers


def sse_chunks(lines: Iterable[str]) -> Iterator[dict]:
    """The JSON objects of a server-sent event stream's `data:` lines (a streamed response's
    `iter_lines()`), in order, up to `data: [DONE]`."""
    for line in lines:
        if line == "data: [DONE]":
            return
        if line.startswith("data: "):
            yield json.loads(line[len("data: "):])


async def async_sse_chunks(lines: AsyncIterable[str]) -> AsyncIterator[dict]:
    """`sse_chunks` of an `aiter_lines()`."""
    async for line in lines:
        if line == "data: [DONE]":
            return
        if line.startswith("data: "):
            yield json.loads(line[len("data: "):])


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


# ---- images: deterministic, with distinct, textured content (so that a wrong resize, channel
# order or normalisation changes the encoder's output) ------------------------------------------


def unfinished_in_engine(server: str) -> float:
    """The server's qwen_vl_requests_unfinished gauge: requests its engine holds now."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(http.get(f"{server}/metrics", timeout=30).text):
        if family.name == "qwen_vl_requests_unfinished":
            return family.samples[0].value
    raise AssertionError("qwen_vl_requests_unfinished missing")


def wait_until_the_engine_is_idle(server: str, timeout: float = 10.0) -> float:
    """Polls the gauge until the engine holds no request (an abort reaches it shortly after the
    client goes) or `timeout` passes; returns the gauge's last value."""
    deadline = time.monotonic() + timeout
    while (unfinished := unfinished_in_engine(server)) != 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    return unfinished


def pattern_image(seed: int, size: tuple[int, int] = (448, 448), mode: str = "RGB") -> Image.Image:
    width, height = size
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = []
    for _ in range(len(mode)):
        fx, fy, phase = rng.uniform(0.005, 0.05, 2).tolist() + [rng.uniform(0, 6.28)]
        wave = np.sin(x * fx + y * fy + phase)
        noise = rng.normal(0, 0.15, (height, width))
        channels.append(np.clip((wave + noise) * 100 + 128, 0, 255))
    pixels = np.stack(channels, axis=-1).astype(np.uint8)
    return Image.fromarray(pixels)  # 3 channels: RGB, 4: RGBA


def data_url(content: Image.Image | bytes, mime: str = "image/png") -> str:
    """A data URL: a PIL image saved as PNG, or bytes sent as they are, labelled `mime`."""
    if isinstance(content, Image.Image):
        buffer = io.BytesIO()
        content.save(buffer, format="PNG")
        content = buffer.getvalue()
    return f"data:{mime};base64,{base64.b64encode(content).decode()}"


def turned_photo(orientation: int, fmt: str = "JPEG", mode: str = "RGB") -> bytes:
    """A 96x64 pattern image saved with an EXIF orientation tag: viewers (and
    vLLM's media loader) turn or flip it by the tag; the original's
    `Image.open` keeps the pixels as stored."""
    image = pattern_image(orientation, (96, 64), mode)
    exif = Image.Exif()
    exif[0x0112] = orientation  # ExifTags.Base.Orientation
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, exif=exif)
    return buffer.getvalue()


# ---- servers -------------------------------------------------------------------------------


def child_result(script: str, *args: str, timeout: float = 300) -> dict:
    """Runs `script` in a new Python process from the repository's root and returns the JSON it
    printed after "RESULT " (for code that needs a one-rank vLLM distributed state, which must
    not leak into the engines other tests start)."""
    done = subprocess.run([sys.executable, "-c", script, *args], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=timeout)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


def start_server(checkpoint, log: Path, *extra: str, eager: bool = True) -> Server:
    """`python -m qwen_vl.server` on a free loopback port, float32, seed 0, with the test API key
    and model name, eager unless told (compiling adds ~40 s of start-up); started (`started`)."""
    flags = ["--dtype", "float32", *(["--enforce-eager"] if eager else []), "--seed", "0", "--api-key", API_KEY, *extra]
    return started(Server("qwen_vl.server",
                          lambda port: our_server_command(checkpoint, port, *flags, served_model_name=SERVED_MODEL), log))


def started(server: Server) -> Server:
    """`server`, started and answering /health; generous, since a loaded 2-core machine has
    taken minutes to start one. A failed start says the end of the server's log."""
    try:
        server.start(timeout=600)
    except RuntimeError as error:
        raise RuntimeError(f"{error}:\n{server.log.read_text(errors='replace')[-5000:]}") from None
    return server


# ---- the environment of the engines started inside a block ------------------------------------


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


# ---- cases the reference and the plugin answer alike ----------------------------------------

TOP_LOGPROBS = 20
MAX_TOKENS = 16
CASE_NAMES = [
    "text only",
    "one image",
    "two images in one query",
    "ref and box in the query",
    "multi-turn with an image in the history",
]


def cases(tok) -> dict:
    """name (CASE_NAMES) -> (prompt ids in the original's own format, images in prompt order)."""
    cat, dog, street = pattern_image(0, (640, 480)), pattern_image(1, (300, 500)), pattern_image(2, (1024, 768))
    one_image = tok.from_list_format([{"image": "https://example.com/cat.png"}, {"text": "What is this?"}])
    two_images = tok.from_list_format(
        [{"image": "cat.png"}, {"image": "dog.jpg"}, {"text": "What differs between the two pictures?"}]
    )
    grounding = tok.from_list_format(
        [{"image": "street.jpg"}, {"text": "Is this the car?"}, {"ref": "the car", "box": [(120, 340, 560, 890)]}]
    )
    history = [(tok.from_list_format([{"image": "cat.png"}, {"text": "Describe it."}]), "A red circle on blue.")]
    return {
        "text only": (tok.make_context("Tell me a joke about the number 1234567."), []),
        "one image": (tok.make_context(one_image), [cat]),
        "two images in one query": (tok.make_context(two_images), [cat, dog]),
        "ref and box in the query": (tok.make_context(grounding), [street]),
        "multi-turn with an image in the history": (
            tok.make_context("And what colour is the background?", history=history),
            [cat],
        ),
    }


def assert_matches_reference(llm, prompt_ids, images, expected) -> None:
    """`llm` (vLLM's offline engine) answers the case with the reference's
    greedy tokens, and its first-step top log-probabilities within 2e-4."""
    from vllm import SamplingParams

    expected_tokens, expected_logprobs = expected
    request = {"prompt_token_ids": prompt_ids}
    if images:
        request["multi_modal_data"] = {"image": images}
    greedy = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=TOP_LOGPROBS)
    output = llm.generate([request], greedy, use_tqdm=False)[0].outputs[0]

    assert list(output.token_ids) == expected_tokens
    first_step = output.logprobs[0]
    assert len(first_step) >= TOP_LOGPROBS
    worst = max(abs(lp.logprob - expected_logprobs[token].item()) for token, lp in first_step.items())
    assert worst < 2e-4, f"first-step logprobs differ by up to {worst:.2e}"


def chat_case(tok) -> tuple[dict, list[int], list]:
    """A greedy chat request with one image, and the same conversation as the
    original's prompt ids and images."""
    image = pattern_image(0, (640, 480))
    body = {
        "messages": [{"role": "user", "content": [image_part(data_url(image)), {"type": "text", "text": "What is this?"}]}],
        "max_tokens": MAX_TOKENS, "temperature": 0.0, "ignore_eos": True, "logprobs": True, "top_logprobs": TOP_LOGPROBS,
    }
    prompt_ids = tok.make_context(tok.from_list_format([{"image": "cat.png"}, {"text": "What is this?"}]))
    return body, prompt_ids, [image]


def assert_server_matches_reference(url: str, tok, reference) -> None:
    """The test server's greedy answer is the reference's text, and its first-step
    top log-probabilities are the reference's within 2e-4."""
    body, prompt_ids, images = chat_case(tok)
    expected_tokens, expected_logprobs = reference.generate_greedy(prompt_ids, images, max_new_tokens=MAX_TOKENS)
    response = post(url, "/v1/chat/completions", {"model": SERVED_MODEL, **body}, timeout=600)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["usage"]["completion_tokens"] == len(expected_tokens)
    # Compared without trailing whitespace: the server's text ends at the last non-blank character.
    assert answer["choices"][0]["message"]["content"].rstrip() == tok.decode(expected_tokens).rstrip()
    served = sorted(top["logprob"] for top in answer["choices"][0]["logprobs"]["content"][0]["top_logprobs"])
    expected = sorted(expected_logprobs.topk(TOP_LOGPROBS).values.tolist())
    worst = max(abs(a - b) for a, b in zip(served, expected))
    assert worst < 2e-4, f"first-step logprobs differ by up to {worst:.2e}"


def offline_answer(engine, prompt_ids, images) -> str:
    """The offline engine's greedy answer (MAX_TOKENS at most, ended by the chat turn's end)
    without surrounding whitespace: what the server's chat answer to the same conversation is."""
    from vllm import SamplingParams

    request = {"prompt_token_ids": prompt_ids}
    if images:
        request["multi_modal_data"] = {"image": images}
    greedy = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, stop_token_ids=[IM_END_ID, IM_START_ID])
    return engine.generate([request], greedy, use_tqdm=False)[0].outputs[0].text.strip()


WORDS = ("apple river blue seven house quick light stone we go north paper tree cold open "
         "music green yellow happy small window bridge cloud sand fire").split()


def words(n: int, seed: int) -> str:
    """`n` words drawn (seeded) from WORDS: long text of a known make-up."""
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n))
