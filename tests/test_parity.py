"""The vLLM plugin reproduces the independent plain-PyTorch reference
(tests/reference.py) token for token, in float32, on the same checkpoint."""

import pytest
from vllm import SamplingParams

from tests.images import pattern_image

TOP_LOGPROBS = 20
GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=TOP_LOGPROBS)


def cases(tok):
    """name -> (prompt ids in the original's own format, images in prompt order)."""
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


@pytest.fixture(scope="module")
def parity_cases(ref_tokenizer):
    return cases(ref_tokenizer)


CASE_NAMES = [
    "text only",
    "one image",
    "two images in one query",
    "ref and box in the query",
    "multi-turn with an image in the history",
]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_greedy_tokens_and_first_step_logprobs_match_reference(name, parity_cases, engine, reference):
    prompt_ids, images = parity_cases[name]
    assert_matches_reference(engine, prompt_ids, images, reference.generate_greedy(prompt_ids, images, max_new_tokens=16))


def assert_matches_reference(llm, prompt_ids, images, expected) -> None:
    """`llm` (vLLM's offline engine) answers the case with the reference's
    greedy tokens, and its first-step top log-probabilities within 2e-4."""
    expected_tokens, expected_logprobs = expected
    request = {"prompt_token_ids": prompt_ids}
    if images:
        request["multi_modal_data"] = {"image": images}
    output = llm.generate([request], GREEDY, use_tqdm=False)[0].outputs[0]

    assert list(output.token_ids) == expected_tokens
    first_step = output.logprobs[0]
    assert len(first_step) >= TOP_LOGPROBS
    worst = max(abs(lp.logprob - expected_logprobs[token].item()) for token, lp in first_step.items())
    assert worst < 2e-4, f"first-step logprobs differ by up to {worst:.2e}"


def chat_case(tok) -> tuple[dict, list[int], list]:
    """A greedy chat request with one image, and the same conversation as the
    original's prompt ids and images."""
    from tests.images import data_url

    image = pattern_image(0, (640, 480))
    body = {
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(image)}}, {"type": "text", "text": "What is this?"}]}],
        "max_tokens": 16, "temperature": 0.0, "ignore_eos": True, "logprobs": True, "top_logprobs": TOP_LOGPROBS,
    }
    prompt_ids = tok.make_context(tok.from_list_format([{"image": "cat.png"}, {"text": "What is this?"}]))
    return body, prompt_ids, [image]


def assert_server_matches_reference(url: str, model: str, api_key: str, tok, reference) -> None:
    """The server's greedy answer is the reference's text, and its first-step
    top log-probabilities are the reference's within 2e-4."""
    import httpx

    body, prompt_ids, images = chat_case(tok)
    expected_tokens, expected_logprobs = reference.generate_greedy(prompt_ids, images, max_new_tokens=16)
    response = httpx.post(f"{url}/v1/chat/completions", json={"model": model, **body}, timeout=600,
                          headers={"Authorization": f"Bearer {api_key}"})
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["usage"]["completion_tokens"] == len(expected_tokens)
    # Compared without trailing whitespace: the server's text ends at the last non-blank character.
    assert answer["choices"][0]["message"]["content"].rstrip() == tok.decode(expected_tokens).rstrip()
    served = sorted(top["logprob"] for top in answer["choices"][0]["logprobs"]["content"][0]["top_logprobs"])
    expected = sorted(expected_logprobs.topk(TOP_LOGPROBS).values.tolist())
    worst = max(abs(a - b) for a, b in zip(served, expected))
    assert worst < 2e-4, f"first-step logprobs differ by up to {worst:.2e}"
