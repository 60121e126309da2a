"""vLLM 0.32's behaviour under the plugin's hooks that no other test pins down directly (the list
of every hook, with its tests: qwen_vl/model_executor/__init__.py): which renderer vLLM picks for
Qwen-VL and for other models, and that every prompt vLLM turns into engine input passes through
the renderer's `_process_singleton`, where the dynamic-NTK cache salt is set."""

import asyncio

import pytest
from PIL import Image
from vllm.engine.arg_utils import EngineArgs
from vllm.renderers import renderer_from_config
from vllm.renderers.hf import HfRenderer
from vllm.renderers.registry import RENDERER_REGISTRY
from vllm.tokenizers.registry import TokenizerRegistry

from qwen_vl.model_executor import register
from qwen_vl.model_executor.renderer import RENDERER_MODE, QwenVLRenderer
from qwen_vl.model_executor.tokenizer import IMAGE_SPAN, IMG_END_ID, IMG_START_ID

ALPHA_3_SALT = "|qwen-vl-dynamic-ntk-alpha=3"


@pytest.fixture(scope="module")
def renderer(tiny_checkpoint):
    return renderer_from_config(EngineArgs(model=str(tiny_checkpoint)).create_engine_config())


@pytest.mark.parametrize("mode", ["auto", "hf"])
def test_vllm_renders_qwen_vl_with_the_plugins_renderer(tiny_checkpoint, mode):
    config = EngineArgs(model=str(tiny_checkpoint), tokenizer_mode=mode).create_engine_config()
    assert config.model_config.tokenizer_mode == RENDERER_MODE
    assert type(renderer_from_config(config)) is QwenVLRenderer


def test_other_models_keep_vllms_renderer_and_tokenizer():
    register()
    register()  # idempotent
    assert RENDERER_REGISTRY.load_renderer_cls("hf") is HfRenderer
    assert TokenizerRegistry.tokenizers[RENDERER_MODE] == TokenizerRegistry.tokenizers["hf"]


def test_a_prompt_past_seq_length_carries_the_salt_of_its_alpha(renderer):
    engine_input = renderer.process_for_engine({"prompt_token_ids": list(range(100, 3100))}, arrival_time=0.0)
    assert engine_input["cache_salt"] == ALPHA_3_SALT


def test_a_prompt_up_to_seq_length_carries_no_salt_of_ours(renderer):
    engine_input = renderer.process_for_engine({"prompt_token_ids": list(range(100, 2148))}, arrival_time=0.0)
    assert "cache_salt" not in engine_input


def test_the_users_salt_is_kept_beside_ours_on_the_async_path(renderer):
    prompt = {"prompt_token_ids": list(range(100, 3100)), "cache_salt": "user"}
    engine_input = asyncio.run(renderer.process_for_engine_async(prompt, arrival_time=0.0))
    assert engine_input["cache_salt"] == "user" + ALPHA_3_SALT


def test_the_salt_counts_an_images_258_positions(renderer):
    """1900 ids and `<img></img>` are 1902 ids as given, 2158 positions once vLLM has expanded the
    span: alpha 3."""
    prompt = {"prompt_token_ids": list(range(100, 2000)) + [IMG_START_ID, IMG_END_ID],
              "multi_modal_data": {"image": [Image.new("RGB", (64, 64), "red")]}}
    engine_input = renderer.process_for_engine(prompt, arrival_time=0.0)
    assert len(engine_input["prompt_token_ids"]) == 1900 + len(IMAGE_SPAN)
    assert engine_input["cache_salt"] == ALPHA_3_SALT
