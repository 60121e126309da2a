"""usage.prompt_tokens_details.cached_tokens, as OpenAI's API reports it: the prompt tokens
whose keys and values came from vLLM's prefix cache. A prompt sent for the first time reports
none; the same prompt again reports its full blocks (images included), on both endpoints,
streamed or not, and the Prometheus counter adds them up."""

import json
import re
import uuid

import pytest

from tests.helpers import AUTH, SERVED_MODEL, data_url, http, image_part, pattern_image, post


def chat_request(seed: int) -> tuple[str, dict]:
    """A chat no other test sends: its own image and text."""
    content = [image_part(data_url(pattern_image(seed, (320, 240)))),
               {"type": "text", "text": f"What is in picture {uuid.uuid4().hex}?"}]
    return "/v1/chat/completions", {"model": SERVED_MODEL, "messages": [{"role": "user", "content": content}]}


def completion_request(seed: int) -> tuple[str, dict]:
    """A text prompt of a few hundred tokens no other test sends."""
    text = " ".join(f"{uuid.uuid4().hex[:6]} {seed}" for _ in range(100))
    return "/v1/completions", {"model": SERVED_MODEL, "prompt": text}


def usage_of(server: str, path: str, body: dict, stream: bool) -> dict:
    body = {**body, "max_tokens": 2, "temperature": 0}
    if not stream:
        response = post(server, path, body)
        assert response.status_code == 200, response.text
        return response.json()["usage"]
    body |= {"stream": True, "stream_options": {"include_usage": True}}
    with http.stream("POST", f"{server}{path}", json=body, headers=AUTH, timeout=120) as response:
        assert response.status_code == 200, response.read()
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return json.loads(events[-2])["usage"]


def cached_counter(server: str) -> float:
    text = http.get(f"{server}/metrics", timeout=10).text
    return float(re.search(r"^qwen_vl_cached_prompt_tokens_total (\S+)$", text, re.M)[1])


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("build", [chat_request, completion_request], ids=["chat", "completions"])
def test_the_same_prompt_again_reports_its_cached_prefix(server, build, stream):
    path, body = build(70 + stream)
    counted = cached_counter(server)
    first = usage_of(server, path, body, stream)
    assert first["prompt_tokens_details"] == {"cached_tokens": 0}
    again = usage_of(server, path, body, stream)
    assert again["prompt_tokens"] == first["prompt_tokens"] > 256
    # vLLM caches whole blocks and always computes the prompt's last token.
    assert 256 <= again["prompt_tokens_details"]["cached_tokens"] < again["prompt_tokens"]
    assert cached_counter(server) == counted + again["prompt_tokens_details"]["cached_tokens"]


def test_a_changed_image_is_not_served_from_the_cache(server):
    path, body = chat_request(80)
    usage_of(server, path, body, stream=False)
    changed = json.loads(json.dumps(body))
    changed["messages"][0]["content"][0]["image_url"]["url"] = data_url(pattern_image(81, (320, 240)))
    # Only the system prompt and the <img> before the image's own positions are the same:
    # less than a block.
    assert usage_of(server, path, changed, stream=False)["prompt_tokens_details"] == {"cached_tokens": 0}
