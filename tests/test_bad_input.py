"""Hostile and unusual input, made by hand: broken and pathological images,
image formats beyond plain RGB, JSON pathologies and absurd parameters. Each
is a 400 with OpenAI's error object or a normal answer, never a 500, and the
server stays healthy. (tests/test_server_errors.py covers the ordinary
refusals: invalid fields, auth, sizes, context length.)

An accepted image is answered exactly as the same pixels after the
original's `convert("RGB")`, sent as a PNG."""

import io
import json
import random
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from tests.helpers import MAX_TOKENS, SERVED_MODEL, assert_error, chat_body, data_url, http, image_part, offline_answer, pattern_image, post, with_image


def encoded(image: Image.Image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(width: int, height: int) -> bytes:
    """A PNG of a few dozen bytes whose header claims width x height (8-bit grey) and one row of data."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    row = zlib.compress(b"\x00" * (1 + min(width, 1024)))
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", row) + png_chunk(b"IEND", b"")


# ---- broken images ---------------------------------------------------------------


def test_a_truncated_png_is_an_invalid_image(server):
    whole = encoded(pattern_image(10, (128, 128)), "PNG")
    response = post(server, "/v1/chat/completions", with_image(data_url(whole[: len(whole) // 2])))
    assert_error(response, 400, code="invalid_image", says="image 1: image data is corrupt or truncated")


def test_random_bytes_are_an_invalid_image(server):
    garbage = random.Random(0).randbytes(4096)
    response = post(server, "/v1/chat/completions", with_image(data_url(garbage)))
    assert_error(response, 400, code="invalid_image", says="image 1: image is not a valid")


def test_an_image_of_zero_by_zero_pixels_is_an_invalid_image(server):
    response = post(server, "/v1/chat/completions", with_image(data_url(png_claiming(0, 0))))
    assert_error(response, 400, code="invalid_image", says="image 1:")


def test_a_one_by_100000_strip_is_too_large(server):
    strip = encoded(Image.new("L", (1, 100_000)), "PNG")
    response = post(server, "/v1/chat/completions", with_image(data_url(strip)))
    assert_error(response, 400, code="image_too_large", says="side is longer than 20000 pixels (1x100000)")


def test_a_few_bytes_claiming_20000_by_20000_pixels_are_too_large(server):
    bomb = png_claiming(20_000, 20_000)
    assert len(bomb) < 200
    response = post(server, "/v1/chat/completions", with_image(data_url(bomb)))
    assert_error(response, 400, code="image_too_large", says="more than 40000000 pixels")


def test_non_ascii_characters_in_a_data_url_are_not_base64(server):
    url = "data:image/png;base64,iVBOR\u00e9w0KGgo="
    body = chat_body([image_part(url), {"type": "text", "text": "Hi"}])
    assert_error(post(server, "/v1/chat/completions", body), 400, code="invalid_image", says="not valid base64")


def test_non_ascii_characters_in_a_completion_image_url_are_not_base64(server):
    body = {"model": SERVED_MODEL, "prompt": "<img>data:image/png;base64,\u00e9\u00e9</img>Hi", "max_tokens": 2}
    assert_error(post(server, "/v1/completions", body), 400, code="invalid_image", says="not valid base64")


# ---- image formats beyond RGB: accepted, answered as their RGB pixels -------------


def animated_gif() -> bytes:
    frames = [pattern_image(seed, (96, 64)).quantize(64) for seed in (11, 12, 13)]
    return encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def cmyk_jpeg() -> bytes:
    return encoded(pattern_image(14, (96, 64)).convert("CMYK"), "JPEG", quality=90)


def png_16_bit() -> bytes:
    grey = np.asarray(pattern_image(15, (96, 64)).convert("L"), dtype=np.uint16) * 257
    return encoded(Image.fromarray(grey), "PNG")


def palette_png() -> bytes:
    return encoded(pattern_image(16, (96, 64)).quantize(32), "PNG", transparency=0)


def grey_alpha_png() -> bytes:
    return encoded(pattern_image(17, (96, 64), mode="LA"), "PNG")


FORMATS = {
    "animated GIF": (animated_gif, "image/gif", "P"),
    "CMYK JPEG": (cmyk_jpeg, "image/jpeg", "CMYK"),
    "16-bit PNG": (png_16_bit, "image/png", "I;16"),
    "palette PNG": (palette_png, "image/png", "P"),
    "grey+alpha PNG": (grey_alpha_png, "image/png", "LA"),
}


def answer(server: str, body: dict) -> str:
    response = post(server, "/v1/chat/completions", body)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


@pytest.mark.parametrize("make, mime, mode", FORMATS.values(), ids=FORMATS.keys())
def test_an_image_format_is_answered_as_its_rgb_pixels(server, make, mime, mode):
    data = make()
    original = Image.open(io.BytesIO(data))
    assert original.mode == mode  # the format really is the one named
    as_rgb_png = encoded(original.convert("RGB"), "PNG")  # the first frame, for an animation
    fields = {"temperature": 0, "max_tokens": 8, "ignore_eos": True}
    assert answer(server, with_image(data_url(data, mime), **fields)) == answer(server, with_image(data_url(as_rgb_png), **fields))


# ---- JSON pathologies ------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [b"[" * 100_000 + b"]" * 100_000,
     b'{"model": "qwen-vl-tiny", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
     b'{"model": "qwen-vl-tiny", "x": ' + b'{"x": ' * 100_000 + b"1" + b"}" * 100_001],
    ids=["nested arrays", "nested messages", "nested objects"],
)
def test_json_nested_100000_levels_deep_is_refused(server, content):
    assert_error(post(server, "/v1/chat/completions", content=content), 400, says="error parsing the body")


def test_a_history_of_50000_messages_is_answered_from_its_newest_turns(server):
    messages = []
    for i in range(25_000):
        messages += [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]
    messages.append({"role": "user", "content": "And now?"})
    response = post(server, "/v1/chat/completions", {"model": SERVED_MODEL, "messages": messages, "max_tokens": 2})
    # History is dropped oldest first at max_window_size (6144), inside the 8192 context.
    assert response.status_code == 200, response.text
    assert 4000 < response.json()["usage"]["prompt_tokens"] <= 6144


def test_100000_text_parts_in_one_message_are_refused_for_their_length(server):
    body = chat_body([{"type": "text", "text": "word "}] * 100_000)
    assert_error(post(server, "/v1/chat/completions", body), 400, code="context_length_exceeded", param="messages")


@pytest.mark.parametrize("field", ["temperature", "top_p", "presence_penalty", "repetition_penalty"])
@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_sampling_values_are_refused(server, field, value):
    # Python's json module reads these non-standard literals; pydantic's bounds must still refuse them.
    content = json.dumps(chat_body()).replace('"max_tokens": 2', f'"max_tokens": 2, "{field}": {value}').encode()
    assert_error(post(server, "/v1/chat/completions", content=content), 400, code="invalid_value", param=field)


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", chat_body("@@")),
    ("/v1/chat/completions", chat_body([{"type": "text", "text": "@@"}])),
    ("/v1/chat/completions", {**chat_body(), "messages": [{"role": "system", "content": "@@"},
                                                          {"role": "user", "content": "Hi"}]}),
    ("/v1/completions", {"model": SERVED_MODEL, "prompt": "@@", "max_tokens": 2}),
], ids=["content", "text part", "system", "completion prompt"])
def test_a_lone_surrogate_escape_in_text_is_refused(server, path, body):
    # Valid JSON ("\ud800"), but no Unicode text: the tokenizer cannot take it.
    content = json.dumps(body).replace("@@", "a\\ud800b").encode()
    # Completion prompts are strings in the schema, so pydantic refuses it (invalid_value).
    param, code = ("prompt", "invalid_value") if path == "/v1/completions" else ("messages", None)
    assert_error(post(server, path, content=content), 400, code=code, param=param, says="unicode")


# ---- absurd parameters and shapes --------------------------------------------------


@pytest.mark.parametrize("max_tokens", [10**12, 10**30])
def test_max_tokens_beyond_any_context_is_refused(server, max_tokens):
    response = post(server, "/v1/chat/completions", chat_body(max_tokens=max_tokens))
    assert_error(response, 400, code="context_length_exceeded", param="max_tokens", says=f"max_tokens={max_tokens}")


@pytest.mark.parametrize("fields, param", [
    ({"n": 10**20}, "n"),
    ({"seed": 2**64}, "seed"),
    ({"top_k": -(10**20)}, "top_k"),
    ({"max_tokens": 2.5}, "max_tokens"),
])
def test_out_of_range_integers_are_refused(server, fields, param):
    assert_error(post(server, "/v1/chat/completions", chat_body(**fields)), 400, code="invalid_value", param=param)


def test_a_grounding_image_beyond_any_count_is_refused(server):
    response = post(server, "/v1/chat/completions", chat_body(grounding_image=10**30))
    assert_error(response, 400, param="grounding_image", says="has 0 image(s)")


@pytest.mark.parametrize("role", ["tool", "developer", "function", "", None])
def test_roles_qwen_vl_chat_does_not_have_are_refused(server, role):
    body = {"model": SERVED_MODEL, "messages": [{"role": role, "content": "Hi"}], "max_tokens": 2}
    assert_error(post(server, "/v1/chat/completions", body), 400, code="invalid_value", param="messages.0.role")


@pytest.mark.parametrize("part", ["just a string", {"text": "no type"}, {"type": "input_audio", "input_audio": {}},
                                  image_part("")])
def test_content_parts_that_are_not_text_or_image_are_refused(server, part):
    response = post(server, "/v1/chat/completions", chat_body([part]))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_value"
    assert error["param"].startswith("messages.0.content.0"), error


@pytest.mark.parametrize("content", [None, "", []], ids=["null", "empty string", "no parts"])
def test_an_empty_user_message_is_answered_as_the_original_answers_an_empty_query(server, content, engine, ref_tokenizer):
    prompt_ids = ref_tokenizer.make_context("")
    response = post(server, "/v1/chat/completions", chat_body(content, temperature=0, max_tokens=MAX_TOKENS))
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["prompt_tokens"] == len(prompt_ids)
    assert response.json()["choices"][0]["message"]["content"] == offline_answer(engine, prompt_ids, [])


def test_a_conversation_of_only_a_system_message_is_refused(server):
    body = {"model": SERVED_MODEL, "messages": [{"role": "system", "content": "Be brief."}], "max_tokens": 2}
    assert_error(post(server, "/v1/chat/completions", body), 400, param="messages", says="must come from the user")


def test_a_100000_character_word_is_refused_for_its_length(server):
    response = post(server, "/v1/chat/completions", chat_body("a" * 100_000))
    assert_error(response, 400, code="context_length_exceeded", param="messages", says="context is 8192 tokens")


def test_a_100000_character_completion_prompt_is_refused_for_its_length(server):
    body = {"model": SERVED_MODEL, "prompt": "漢字" * 50_000, "max_tokens": 2}
    assert_error(post(server, "/v1/completions", body), 400, code="context_length_exceeded", param="prompt")


def test_an_empty_completion_prompt_is_refused(server):
    body = {"model": SERVED_MODEL, "prompt": "", "max_tokens": 2}
    assert_error(post(server, "/v1/completions", body), 400, code="invalid_value", param="prompt", says="at least 1 character")


def test_a_stop_sequence_of_a_million_characters_is_harmless(server):
    response = post(server, "/v1/chat/completions", chat_body(stop="x" * 1_000_000))
    assert response.status_code == 200, response.text


# ---- and after all that ------------------------------------------------------------


def test_the_server_is_still_healthy(server):
    assert http.get(f"{server}/health", timeout=30).status_code == 200
    response = post(server, "/v1/chat/completions", chat_body("Still there?", temperature=0))
    assert response.status_code == 200, response.text
