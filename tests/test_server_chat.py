"""The chat API, through the official openai client against a real server:
answers equal the offline engine's greedy output for the same conversation,
in every shape the API takes images and turns."""

import asyncio

import httpx
import pytest

from tests.helpers import (
    AUTH,
    MAX_TOKENS,
    SERVED_MODEL,
    data_url,
    http,
    image_part,
    offline_answer,
    pattern_image,
    post,
    sse_chunks,
    unfinished_in_engine,
    wait_until_the_engine_is_idle,
)


def ask(client, messages, **kwargs):
    kwargs = {"temperature": 0, "max_tokens": MAX_TOKENS, **kwargs}
    return client.chat.completions.create(model=SERVED_MODEL, messages=messages, **kwargs)


CAT = pattern_image(10, (640, 480))
DOG = pattern_image(11, (300, 500))


def test_answer_equals_offline_greedy(client, engine, ref_tokenizer):
    query = ref_tokenizer.from_list_format([{"image": "cat"}, {"text": "What is in the picture?"}])
    expected = offline_answer(engine, ref_tokenizer.make_context(query), [CAT])
    answer = ask(client, [{"role": "user", "content": [image_part(data_url(CAT)), {"type": "text", "text": "What is in the picture?"}]}])
    assert answer.choices[0].message.content == expected
    assert answer.choices[0].finish_reason in ("length", "stop")
    assert answer.usage.prompt_tokens == len(ref_tokenizer.make_context(query))
    assert answer.usage.completion_tokens >= 1
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens


def test_streamed_answer_equals_offline_greedy(client, engine, ref_tokenizer):
    expected = offline_answer(engine, ref_tokenizer.make_context("Count from one to ten."), [])
    stream = ask(client, [{"role": "user", "content": "Count from one to ten."}], stream=True,
                 stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() == expected
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("length", "stop")
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1


def test_image_by_http_url_equals_image_by_data_url(client, image_host):
    question = {"type": "text", "text": "Describe it."}
    by_data = ask(client, [{"role": "user", "content": [image_part(data_url(DOG)), question]}])
    by_http = ask(client, [{"role": "user", "content": [image_part(image_host("dog.png", DOG)), question]}])
    assert by_http.choices[0].message.content == by_data.choices[0].message.content


def test_two_images_in_one_message(client, engine, ref_tokenizer):
    query = ref_tokenizer.from_list_format([{"image": "a"}, {"image": "b"}, {"text": "What differs?"}])
    expected = offline_answer(engine, ref_tokenizer.make_context(query), [CAT, DOG])
    answer = ask(client, [{"role": "user", "content": [
        image_part(data_url(CAT)), image_part(data_url(DOG)), {"type": "text", "text": "What differs?"}]}])
    assert answer.choices[0].message.content == expected


def test_multi_turn_with_an_image_in_an_earlier_turn(client, engine, ref_tokenizer):
    first = ref_tokenizer.from_list_format([{"image": "a"}, {"text": "What is it?"}])
    history = [(first, "A pattern.")]
    expected = offline_answer(engine, ref_tokenizer.make_context("Which colours?", history=history), [CAT])
    answer = ask(client, [
        {"role": "user", "content": [image_part(data_url(CAT)), {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": "A pattern."},
        {"role": "user", "content": "Which colours?"},
    ])
    assert answer.choices[0].message.content == expected


def test_logprobs_are_returned_per_token(client):
    answer = ask(client, [{"role": "user", "content": "Hi"}], logprobs=True, top_logprobs=3)
    content = answer.choices[0].logprobs.content
    assert len(content) == answer.usage.completion_tokens
    for token in content:
        assert len(token.top_logprobs) == 3
        assert token.top_logprobs[0].logprob >= token.top_logprobs[-1].logprob
        # Greedy: the chosen token is the most likely one.
        assert token.logprob == pytest.approx(token.top_logprobs[0].logprob)


def test_n_choices_with_a_seed_are_reproducible(client):
    kwargs = dict(model=SERVED_MODEL, messages=[{"role": "user", "content": "Tell a story."}], n=3, seed=7,
                  temperature=1.0, max_tokens=12, logprobs=True)
    first = client.chat.completions.create(**kwargs)
    second = client.chat.completions.create(**kwargs)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.message.content for c in first.choices] == [c.message.content for c in second.choices]
    assert len({c.message.content for c in first.choices}) > 1
    # usage counts the tokens of every choice
    assert first.usage.completion_tokens == sum(len(c.logprobs.content) for c in first.choices)


def test_boxes_field_is_the_parse_of_the_streamed_text(client):
    """The tiny random model does not write boxes on request; what it writes is
    parsed as a real answer would be (tests/test_grounding.py covers the parser)."""
    from qwen_vl.api.grounding import parse_grounding

    stream = ask(client, [{"role": "user", "content": [image_part(data_url(CAT)), {"type": "text", "text": "Find it"}]}],
                 stream=True, max_tokens=64)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    closing = [c for c in chunks if c.choices and c.choices[0].finish_reason][-1]
    boxes = closing.choices[0].delta.model_extra.get("boxes")
    assert boxes == [
        {"ref": b.ref, "kind": b.kind, "box": list(b.box), "points": [list(p) for p in b.points], "image_index": 0,
         "box_pixels": list(b.to_pixels(640, 480))}
        for b in parse_grounding(text)
    ]


async def _stream_text(async_client, index: int) -> str:
    stream = await async_client.chat.completions.create(
        model=SERVED_MODEL, messages=[{"role": "user", "content": f"Request {index}: say something."}],
        temperature=0, max_tokens=MAX_TOKENS, stream=True,
    )
    return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])


def test_32_concurrent_streams_match_their_sequential_outputs(async_client):
    async def run():
        sequential = [await _stream_text(async_client, i) for i in range(32)]
        concurrent = await asyncio.gather(*(_stream_text(async_client, i) for i in range(32)))
        return sequential, concurrent

    sequential, concurrent = asyncio.run(run())
    assert all(concurrent)
    assert concurrent == sequential


def test_client_disconnect_mid_stream_aborts_the_request(server):
    # Nearly the whole context: still generating when the client hangs up, however fast the machine.
    body = {"model": SERVED_MODEL, "messages": [{"role": "user", "content": "Write a long story."}],
            "max_tokens": 8000, "ignore_eos": True, "stream": True}
    with http.stream("POST", f"{server}/v1/chat/completions", json=body, headers=AUTH, timeout=60) as response:
        chunks = sse_chunks(response.iter_lines())
        received = [next(chunks, None) for _ in range(3)]
        # Still streaming: three chunks, none an error or a choice's last.
        assert all(chunk and "error" not in chunk and not chunk["choices"][0].get("finish_reason")
                   for chunk in received), received
        assert unfinished_in_engine(server) >= 1, received
    # The connection is closed mid-stream: the engine must drop the request.
    assert wait_until_the_engine_is_idle(server) == 0


def test_client_disconnect_before_a_non_streamed_answer_aborts_it(server):
    body = {"model": SERVED_MODEL, "messages": [{"role": "user", "content": "Write a long story."}],
            "max_tokens": 8000, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        post(server, "/v1/chat/completions", body, timeout=httpx.Timeout(60, read=2.0))
    assert wait_until_the_engine_is_idle(server) == 0
