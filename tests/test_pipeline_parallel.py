"""Pipeline parallelism: two stages, one rank per core; the first holds the
embeddings, the vision stage and the first half of the blocks, the second the
rest, the final norm and the LM head. Answers are the reference's."""

import gc

import pytest
from vllm import LLM

from qwen_vl.engine.engine import engine_config
from qwen_vl.server.settings import parse
from tests.helpers import CASE_NAMES, MAX_TOKENS, assert_matches_reference, cpu_threads_bind

EAGER_REFUSED = "needs its warm-up run, which --enforce-eager skips: drop --enforce-eager"


def test_eager_pipeline_parallelism_is_refused_offline_before_any_worker_starts(tiny_checkpoint):
    # Without the refusal the engine starts and its second stage's worker dies (vLLM 0.32's CPU
    # worker allocates what that stage receives into only in the warm-up run eager mode skips).
    with cpu_threads_bind("0|1"), pytest.raises(ValueError, match=EAGER_REFUSED):
        LLM(model=str(tiny_checkpoint), dtype="float32", max_model_len=2048, seed=0, pipeline_parallel_size=2,
            enforce_eager=True)


def test_eager_pipeline_parallelism_is_refused_by_our_server_when_it_builds_the_engine(tiny_checkpoint):
    engine_args = parse(["--model", str(tiny_checkpoint), "--pipeline-parallel-size", "2", "--enforce-eager"]).engine_args
    with pytest.raises(ValueError, match=EAGER_REFUSED):
        engine_config(engine_args, None)


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
def test_two_stages_match_reference(name, pp_engine, parity_cases, reference):
    prompt_ids, images = parity_cases[name]
    expected = reference.generate_greedy(prompt_ids, images, max_new_tokens=MAX_TOKENS)
    assert_matches_reference(pp_engine, prompt_ids, images, expected)
