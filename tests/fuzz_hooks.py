"""Schemathesis hooks for tests/test_fuzz.py (loaded with SCHEMATHESIS_HOOKS).

Every generated request generates at most MAX_TOKENS tokens per choice: the
schema allows any max_tokens and the tiny model spends ~50 ms per token here.

Requests drawn as valid are then made valid in the ways a JSON schema cannot
say, each of which this server (like vLLM's) answers with a 400 that names
the field: the served model's name, a conversation that ends with the user,
images that can be fetched (none in raw prompts), no sampling n > 1 when greedy, and the few
field combinations vLLM refuses. Invalid requests are left as drawn."""

import schemathesis
from PIL import Image
from schemathesis import GenerationMode

from tests.helpers import SERVED_MODEL, data_url

MAX_TOKENS = 2
MAX_IMAGES = 4  # the server's --max-images-per-request in the tests


IMAGE_URL = data_url(Image.new("RGB", (16, 16), (200, 30, 30)))


def _cap_tokens(body: dict) -> None:
    for field in ("max_tokens", "max_completion_tokens"):
        value = body.get(field)
        # Integral floats (2000.0) are integers to the schema and to validation.
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > MAX_TOKENS:
            body[field] = MAX_TOKENS
    if body.get("max_tokens") is None:  # unset or null: the checkpoint's default, 512 tokens
        body["max_tokens"] = MAX_TOKENS


def _valid_conversation(messages: list) -> None:
    """Users only (so the last message is the user's and images may be
    anywhere), every image a small PNG, at most MAX_IMAGES of them."""
    images = 0
    for message in messages:
        if not isinstance(message, dict):
            continue
        message["role"] = "user"
        parts = message.get("content") if isinstance(message.get("content"), list) else []
        for i, part in enumerate(parts):
            if isinstance(part, dict) and isinstance(part.get("image_url"), dict):
                images += 1
                if images > MAX_IMAGES:
                    parts[i] = {"type": "text", "text": ""}
                else:
                    part["image_url"]["url"] = IMAGE_URL


def _without_image_tags(prompt):
    """A raw prompt's `<img>URL</img>` spans must hold fetchable images: none here."""
    if isinstance(prompt, str):
        return prompt.replace("<img>", "").replace("</img>", "")
    if isinstance(prompt, list):
        return [_without_image_tags(p) or "." for p in prompt]
    return prompt


def _valid_combination(body: dict) -> None:
    if "model" in body:
        body["model"] = SERVED_MODEL
    body.pop("grounding_image", None)  # it must name one of the conversation's images
    body.pop("truncate_prompt_tokens", None)  # it may not cut through an image
    body.pop("priority", None)  # the engine schedules first come, first served
    if body.get("temperature") == 0:
        body["n"] = 1  # vLLM: greedy sampling has one answer
    if not body.get("stream"):
        body.pop("stream_options", None)
    else:
        body.pop("prompt_logprobs", None)
        if body.get("echo"):
            body.pop("logprobs", None)
    if body.get("top_logprobs"):
        body["logprobs"] = True
    if isinstance(body.get("min_tokens"), (int, float)) and body["min_tokens"] > 1:
        body["min_tokens"] = 1  # at most max_tokens, which may be 1
    # Constraints a grammar backend can compile and the tiny model can meet within MAX_TOKENS.
    body.pop("response_format", None)
    if body.get("structured_outputs") is not None:
        body["structured_outputs"] = {"choice": ["yes", "no"]}
    body.pop("allowed_token_ids", None)  # with a constraint, it could leave no token to choose


@schemathesis.hook
def before_call(ctx, case, **kwargs):
    body = case.body
    if not isinstance(body, dict):
        return
    if "messages" in body or "prompt" in body:
        _cap_tokens(body)
    if case.meta is None or case.meta.generation.mode is not GenerationMode.POSITIVE:
        return
    if isinstance(body.get("messages"), list):
        _valid_conversation(body["messages"])
    if "prompt" in body:
        body["prompt"] = _without_image_tags(body["prompt"]) or "."
    _valid_combination(body)


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
