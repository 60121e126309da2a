"""The vLLM plugin reproduces the independent plain-PyTorch reference
(qwen_vl/testing/reference.py) token for token, in float32, on the same checkpoint."""

import pytest

from tests.helpers import CASE_NAMES, MAX_TOKENS, assert_matches_reference


@pytest.mark.parametrize("name", CASE_NAMES)
def test_greedy_tokens_and_first_step_logprobs_match_reference(name, parity_cases, engine, reference):
    prompt_ids, images = parity_cases[name]
    expected = reference.generate_greedy(prompt_ids, images, max_new_tokens=MAX_TOKENS)
    assert_matches_reference(engine, prompt_ids, images, expected)
