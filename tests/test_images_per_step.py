"""--images-per-step: the vision encoder takes at most that many images in one engine step, and
a prompt stops just before an image that does not fit, going on in the next step (chunked
prefill). Answers stay the offline engine's (vLLM's budget: all of a prompt's images at once),
alone and under concurrency; impossible settings are refused at start."""

import asyncio

import pytest
from vllm.engine.arg_utils import AsyncEngineArgs

from qwen_vl.engine.engine import engine_config
from qwen_vl.server.settings import build_parser, parse
from tests.helpers import API_KEY, MAX_TOKENS, SERVED_MODEL, data_url, image_part, offline_answer, pattern_image, start_server


@pytest.mark.parametrize(("flags", "says"), [
    (["--images-per-step", "0"], "at least 1"),
    (["--images-per-step", "2", "--no-enable-chunked-prefill"], "needs chunked prefill"),
])
def test_an_impossible_image_budget_is_refused_at_start(flags, says, capsys):
    with pytest.raises(SystemExit):
        parse(["--model", "m", *flags])
    assert says in capsys.readouterr().err


def test_help_documents_the_setting():
    text = build_parser().format_help()
    assert "--images-per-step" in text and "QWEN_VL_IMAGES_PER_STEP" in text


@pytest.mark.parametrize(("images", "budget"), [(1, 256), (3, 768), (None, 2048)])
def test_the_engine_configuration_carries_the_image_budget(tiny_checkpoint, images, budget):
    args = AsyncEngineArgs(model=str(tiny_checkpoint), max_model_len=2048, max_num_batched_tokens=2048,
                           enforce_eager=True)
    assert engine_config(args, images).scheduler_config.max_num_encoder_input_tokens == budget


@pytest.fixture(scope="module")
def one_image_server(tiny_checkpoint, tmp_path_factory):
    log = tmp_path_factory.mktemp("one-image") / "server.log"
    server = start_server(tiny_checkpoint, log, "--images-per-step", "1")
    yield server.url, log
    server.stop()


@pytest.fixture(scope="module")
def one_image_client(one_image_server):
    """A new client per call: each test runs its own event loop."""
    from openai import AsyncOpenAI

    return lambda: AsyncOpenAI(base_url=f"{one_image_server[0]}/v1", api_key=API_KEY, max_retries=0, timeout=300)


def conversation(images: list, text: str) -> list[dict]:
    parts = [image_part(data_url(image)) for image in images]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


async def ask(client, images: list, text: str) -> str:
    answer = await client.chat.completions.create(
        model=SERVED_MODEL, messages=conversation(images, text), temperature=0, max_tokens=MAX_TOKENS)
    return answer.choices[0].message.content


def expected(engine, ref_tokenizer, images: list, text: str) -> str:
    query = ref_tokenizer.from_list_format([*({"image": str(i)} for i in range(len(images))), {"text": text}])
    return offline_answer(engine, ref_tokenizer.make_context(query), images)


def test_the_server_says_its_budget(one_image_server):
    assert "vision encoder: at most 1 image(s) per engine step (256 encoder tokens)" in one_image_server[1].read_text()


def test_three_images_prefilled_in_three_steps_equal_the_offline_engine(one_image_client, engine, ref_tokenizer):
    # Images no other test sends: no prefix-cache hit skips a chunk.
    images = [pattern_image(seed, size) for seed, size in [(21, (448, 448)), (22, (200, 640)), (23, (900, 300))]]
    answer = asyncio.run(ask(one_image_client(), images, "Which?"))
    assert answer == expected(engine, ref_tokenizer, images, "Which?")


def test_concurrent_image_requests_equal_the_offline_engine(one_image_client, engine, ref_tokenizer):
    # Six requests at once, one or two images each: their images are encoded one per step while
    # the others prefill and decode.
    requests = [([pattern_image(30 + i, (320 + 40 * i, 240))] + ([pattern_image(40 + i, (256, 256))] if i % 2 else []),
                 f"Question {i}?") for i in range(6)]

    async def all_at_once():
        client = one_image_client()
        return await asyncio.gather(*(ask(client, images, text) for images, text in requests))

    answers = asyncio.run(all_at_once())
    assert answers == [expected(engine, ref_tokenizer, images, text) for images, text in requests]
