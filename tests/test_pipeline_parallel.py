"""Pipeline parallelism: two stages, one rank per core; the first holds the
embeddings, the vision stage and the first half of the blocks, the second the
rest, the final norm and the LM head. Answers are the reference's."""

import gc

import pytest
from vllm import LLM

from tests.conftest import cpu_threads_bind
from tests.test_parity import CASE_NAMES, assert_matches_reference, parity_cases  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def pp_engine(tiny_checkpoint):
    # Traced once, not compiled: vLLM 0.32's CPU worker allocates the buffers the second stage
    # receives into only in its warm-up run, which eager mode skips.
    with cpu_threads_bind("0|1"):
        llm = LLM(model=str(tiny_checkpoint), dtype="float32", max_model_len=2048, seed=0, pipeline_parallel_size=2,
                  compilation_config={"mode": 2, "backend": "eager"})
    yield llm
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


@pytest.mark.parametrize("name", CASE_NAMES)
def test_two_stages_match_reference(name, pp_engine, parity_cases, reference):  # noqa: F811 (the fixture)
    prompt_ids, images = parity_cases[name]
    expected = reference.generate_greedy(prompt_ids, images, max_new_tokens=16)
    assert_matches_reference(pp_engine, prompt_ids, images, expected)
