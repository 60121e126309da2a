"""Shared fixtures: real things on disk, built once per test session."""

import os

import pytest

# A small KV cache keeps each engine at a few GiB of RAM on the CI machine.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from qwen_vl.model_executor.checkpoint import write_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A random tiny checkpoint (seed 0) in the Qwen-VL-Chat layout, safetensors shards."""
    return write_checkpoint(tmp_path_factory.mktemp("tiny"), preset="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_checkpoint_bin(tmp_path_factory):
    """The same checkpoint as `tiny_checkpoint`, as pytorch_model-*.bin shards only."""
    return write_checkpoint(
        tmp_path_factory.mktemp("tiny-bin"), preset="tiny", seed=0, safetensors=False, bin_shards=True
    )


@pytest.fixture(scope="session")
def engine(tiny_checkpoint):
    """One vLLM offline engine on the tiny checkpoint for the whole session,
    float32 for parity; chunked prefill and prefix caching at vLLM's defaults.
    Eager mode: compiling adds ~40 s of start-up on this CPU and changes nothing
    the tests look at."""
    from vllm import LLM

    llm = LLM(model=str(tiny_checkpoint), dtype="float32", enforce_eager=True, max_model_len=2048, seed=0)
    yield llm
    llm.llm_engine.engine_core.shutdown()


@pytest.fixture(scope="session")
def reference(tiny_checkpoint):
    from tests.reference import ReferenceQwenVL

    return ReferenceQwenVL.from_pretrained(tiny_checkpoint)


@pytest.fixture(scope="session")
def ref_tokenizer():
    from qwen_vl.model_executor.tokenizer import qwen_tiktoken_path
    from tests.reference import ReferenceTokenizer

    return ReferenceTokenizer(qwen_tiktoken_path())
