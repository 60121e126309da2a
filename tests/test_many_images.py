"""Images per request at the defaults: as many as the context holds (258 positions each; 31 in
8192), as the original answers them. Nine and twenty images in one chat give the original's
answer (float32, the reference on the tiny checkpoint); one more than the context holds is a 400.
A configured --max-images-per-request refuses beyond it (test_server_errors)."""

import pytest

from qwen_vl.api.state import max_images
from qwen_vl.model_executor.tokenizer import IM_END_ID, IM_START_ID
from tests.helpers import SERVED_MODEL, assert_error, data_url, image_part, pattern_image, post, start_server

QUESTION = "Which of these pictures is the brightest?"
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def default_server(tiny_checkpoint, tmp_path_factory):
    log = tmp_path_factory.mktemp("many-images") / "server.log"
    server = start_server(tiny_checkpoint, log)
    yield server.url, log
    server.stop()


def chat(images: list) -> dict:
    content = [image_part(data_url(image)) for image in images]
    return {"model": SERVED_MODEL, "temperature": 0, "max_tokens": MAX_TOKENS,
            "messages": [{"role": "user", "content": [*content, {"type": "text", "text": QUESTION}]}]}


def test_the_default_limit_is_the_images_the_context_holds(default_server):
    assert max_images(8192) == 31 and max_images(2048) == 7
    assert "at most 31 images per request" in default_server[1].read_text()


@pytest.mark.parametrize("count", [9, 20])
def test_many_images_at_the_defaults_give_the_original_answer(count, default_server, reference, ref_tokenizer):
    images = [pattern_image(600 + i, (200 + 13 * i, 300 - 7 * i)) for i in range(count)]
    query = ref_tokenizer.from_list_format([*({"image": str(i)} for i in range(count)), {"text": QUESTION}])
    prompt_ids = ref_tokenizer.make_context(query)
    tokens = reference.generate(prompt_ids, images, max_new_tokens=MAX_TOKENS, stop_ids=(IM_END_ID, IM_START_ID))
    expected = ref_tokenizer.decode([t for t in tokens if t not in (IM_END_ID, IM_START_ID)]).strip()

    response = post(default_server[0], "/v1/chat/completions", chat(images), timeout=600)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["usage"]["prompt_tokens"] == len(prompt_ids) > count * 258
    assert answer["choices"][0]["message"]["content"] == expected


def test_one_image_past_the_context_is_refused(default_server):
    # 32 images: 8256 positions, before any text; the context check answers first.
    images = [pattern_image(700, (64, 64))] * 32
    response = post(default_server[0], "/v1/chat/completions", chat(images), timeout=60)
    assert_error(response, 400, code="context_length_exceeded", param="messages",
                 says="(258 per image) but the model's context is 8192 tokens")
