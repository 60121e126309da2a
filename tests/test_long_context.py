"""Past seq_length (2048) the plugin answers as the original does, with
dynamic NTK: each prompt's alpha comes from its whole length, decoding keeps
it, batching and chunked prefill do not mix alphas, and the prefix cache never
hands keys computed under one alpha to a request under another."""


import pytest
from vllm import SamplingParams

from qwen_vl.model_executor.config import QWenConfig
from qwen_vl.testing.reference import ntk_alpha as reference_ntk_alpha
from tests.helpers import SERVED_MODEL, data_url, image_part, offline_answer, pattern_image, words

TOP_LOGPROBS = 20
GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=TOP_LOGPROBS)
def text_of_length(tok, length: int, seed: int) -> list[int]:
    """A chat prompt of exactly `length` ids."""
    n = length
    while True:
        ids = tok.make_context(words(n, seed))
        if len(ids) == length:
            return ids
        n += length - len(ids)


def long_cases(tok) -> dict:
    """name -> (prompt ids in the original's format, images in prompt order)."""
    nine = [pattern_image(200 + i, (320 + 30 * i, 400)) for i in range(9)]
    nine_query = tok.from_list_format([{"image": f"p{i}.png"} for i in range(9)] + [{"text": "Compare them."}])
    history, history_images = [], []
    for turn in range(4):
        images = [pattern_image(300 + 3 * turn + j, (500, 380)) for j in range(3)]
        history_images += images
        query = tok.from_list_format(
            [{"image": f"t{turn}_{j}.jpg"} for j in range(3)] + [{"text": words(150, 10 + turn)}]
        )
        history.append((query, words(150, 20 + turn)))
    new_image = pattern_image(400, (640, 480))
    new_query = tok.from_list_format([{"image": "new.jpg"}, {"text": "And this one, with all the others?"}])
    return {
        "2300 tokens of text": (tok.make_context(words(2280, 1)), []),
        "nine images in one query": (tok.make_context(nine_query), nine),
        "a history of image turns plus a new image": (
            tok.make_context(new_query, history=history),
            history_images + [new_image],
        ),
        "7600 tokens of text": (tok.make_context(words(7580, 2)), []),
        "2040 tokens, decoding past 2048": (text_of_length(tok, 2040, 3), []),
    }


CASES = [
    "2300 tokens of text",
    "nine images in one query",
    "a history of image turns plus a new image",
    "7600 tokens of text",
    "2040 tokens, decoding past 2048",
]


def request(prompt_ids, images) -> dict:
    body = {"prompt_token_ids": prompt_ids}
    if images:
        body["multi_modal_data"] = {"image": images}
    return body


@pytest.fixture(scope="module")
def cases(ref_tokenizer):
    return long_cases(ref_tokenizer)


@pytest.fixture(scope="module")
def expected(cases, reference):
    """The reference's greedy tokens and first-step log-probabilities, per case."""
    return {name: reference.generate_greedy(ids, images, max_new_tokens=16) for name, (ids, images) in cases.items()}


def test_the_cases_have_the_lengths_and_alphas_they_are_named_for(cases):
    lengths = {name: len(ids) for name, (ids, _) in cases.items()}
    assert 2200 < lengths["2300 tokens of text"] <= 2400
    assert 2322 < lengths["nine images in one query"] <= 2500  # 9 x 258 positions and the text
    assert 4500 < lengths["a history of image turns plus a new image"] <= 5500
    assert 7400 < lengths["7600 tokens of text"] <= 7800
    assert lengths["2040 tokens, decoding past 2048"] == 2040
    alphas = {name: reference_ntk_alpha(length, 2048) for name, length in lengths.items()}
    assert [alphas[name] for name in CASES] == [3, 3, 7, 7, 1]


def test_the_default_context_is_max_position_embeddings(engine):
    assert engine.llm_engine.model_config.max_model_len == 8192


def test_alpha_follows_the_original_for_every_prompt_length():
    config = QWenConfig()
    for length in range(1, 16385):
        assert config.ntk_alpha(length) == reference_ntk_alpha(length, 2048), length
    assert [config.ntk_alpha(n) for n in (2048, 2049, 4096, 4097, 8192)] == [1, 3, 3, 7, 7]


@pytest.mark.parametrize("name", CASES)
def test_greedy_tokens_and_first_step_logprobs_match_reference(name, cases, expected, engine):
    prompt_ids, images = cases[name]
    expected_tokens, expected_logprobs = expected[name]
    output = engine.generate([request(prompt_ids, images)], GREEDY, use_tqdm=False)[0].outputs[0]

    assert list(output.token_ids) == expected_tokens
    first_step = output.logprobs[0]
    assert len(first_step) >= TOP_LOGPROBS
    worst = max(abs(lp.logprob - expected_logprobs[token].item()) for token, lp in first_step.items())
    assert worst < 2e-4, f"first-step logprobs differ by up to {worst:.2e}"


def test_long_and_short_prompts_in_one_batch_with_chunked_prefill_each_keep_their_alpha(
    cases, expected, engine, ref_tokenizer
):
    scheduler = engine.llm_engine.vllm_config.scheduler_config
    longest = max(len(ids) for ids, _ in cases.values())
    assert scheduler.enable_chunked_prefill and scheduler.max_num_batched_tokens < longest  # split in chunks

    shorts = [ref_tokenizer.make_context(f"Question {i}: {words(20 + 30 * i, 50 + i)}") for i in range(6)]
    short_alone = [list(o.outputs[0].token_ids) for o in engine.generate(
        [request(ids, []) for ids in shorts], GREEDY, use_tqdm=False)]
    batch = [request(*cases[name]) for name in CASES] + [request(ids, []) for ids in shorts]
    outputs = engine.generate(batch, GREEDY, use_tqdm=False)

    for name, output in zip(CASES, outputs):
        assert list(output.outputs[0].token_ids) == expected[name][0], name
    for i, output in enumerate(outputs[len(CASES):]):
        assert list(output.outputs[0].token_ids) == short_alone[i], f"short request {i}"


# ---- prefix caching ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared_prefix_prompts(ref_tokenizer, reference):
    """Three chat prompts opening with the same 1500-word system message: one
    short (alpha 1), two long (alpha 3), with the reference's greedy tokens."""
    tok, system = ref_tokenizer, words(1500, 7)
    prompts = {
        "short": tok.make_context("Sum it up.", system=system),
        "long": tok.make_context(words(1200, 8), system=system),
        "long too": tok.make_context(words(1100, 9), system=system),
    }
    assert [reference_ntk_alpha(len(ids), 2048) for ids in prompts.values()] == [1, 3, 3]
    return {name: (ids, reference.generate_greedy(ids, [], max_new_tokens=16)[0]) for name, (ids) in prompts.items()}


@pytest.mark.parametrize("order", [("long", "short"), ("short", "long")], ids=["long first", "short first"])
def test_a_cached_prefix_is_not_reused_under_another_alpha(order, shared_prefix_prompts, engine):
    assert engine.llm_engine.vllm_config.cache_config.enable_prefix_caching
    engine.reset_prefix_cache()
    for name in order:
        ids, expected_tokens = shared_prefix_prompts[name]
        output = engine.generate([request(ids, [])], GREEDY, use_tqdm=False)[0]
        assert list(output.outputs[0].token_ids) == expected_tokens, name
        assert output.num_cached_tokens == 0, name


def test_prompts_of_one_alpha_share_their_cached_prefix(shared_prefix_prompts, engine):
    engine.reset_prefix_cache()
    for name in ("long", "long too"):
        ids, expected_tokens = shared_prefix_prompts[name]
        output = engine.generate([request(ids, [])], GREEDY, use_tqdm=False)[0]
        assert list(output.outputs[0].token_ids) == expected_tokens, name
    assert output.num_cached_tokens >= 1024  # the system message's full blocks


# ---- through our server --------------------------------------------------------------------


def test_a_long_chat_with_image_turns_through_the_server_equals_offline_greedy(client, engine, ref_tokenizer):
    first, second, third = (pattern_image(500 + i, (400, 300)) for i in range(3))
    turns = [("Describe both. " + words(900, 30), words(300, 31)), ("And now? " + words(700, 32), words(200, 33))]
    history = [
        (ref_tokenizer.from_list_format([{"image": "a"}, {"image": "b"}, {"text": turns[0][0]}]), turns[0][1]),
        (turns[1][0], turns[1][1]),
    ]
    query = ref_tokenizer.from_list_format([{"image": "c"}, {"text": "Which of the three is brightest?"}])
    prompt_ids = ref_tokenizer.make_context(query, history=history)
    assert 2048 < len(prompt_ids) <= 4096  # alpha 3
    expected = offline_answer(engine, prompt_ids, [first, second, third])

    messages = [
        {"role": "user", "content": [image_part(data_url(first)), image_part(data_url(second)),
                                     {"type": "text", "text": turns[0][0]}]},
        {"role": "assistant", "content": turns[0][1]},
        {"role": "user", "content": turns[1][0]},
        {"role": "assistant", "content": turns[1][1]},
        {"role": "user", "content": [image_part(data_url(third)), {"type": "text", "text": "Which of the three is brightest?"}]},
    ]
    answer = client.chat.completions.create(model=SERVED_MODEL, messages=messages, temperature=0, max_tokens=16)
    assert answer.usage.prompt_tokens == len(prompt_ids)
    assert answer.choices[0].message.content == expected


def test_a_long_completion_prompt_through_the_server_equals_offline_greedy(client, engine):
    prompt = words(3500, 40)
    expected = engine.generate(prompt, SamplingParams(temperature=0.0, max_tokens=16), use_tqdm=False)[0]
    assert len(expected.prompt_token_ids) > 3000
    answer = client.completions.create(model=SERVED_MODEL, prompt=prompt, temperature=0, max_tokens=16)
    assert answer.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert answer.choices[0].text == expected.outputs[0].text


def test_usage_reports_no_cached_tokens_across_alphas_and_the_prefix_within_one(client, ref_tokenizer):
    # One long system message (its own words: no other test's prefix); the short chat is alpha 1,
    # the two long ones alpha 3: the long ones reuse each other's prefix, never the short one's.
    system = words(1500, 50)
    chats = {"short": "Sum it up.", "long": words(1200, 51), "long too": words(1100, 52)}
    assert [reference_ntk_alpha(len(ref_tokenizer.make_context(question, system=system)), 2048)
            for question in chats.values()] == [1, 3, 3]
    cached = {}
    for name, question in chats.items():
        answer = client.chat.completions.create(
            model=SERVED_MODEL, max_tokens=1,
            messages=[{"role": "system", "content": system}, {"role": "user", "content": question}])
        cached[name] = answer.usage.prompt_tokens_details.cached_tokens
    assert cached["short"] == 0
    assert cached["long"] == 0  # the short chat's blocks were computed under alpha 1
    assert cached["long too"] >= 1024  # the system message's full blocks, under alpha 3
