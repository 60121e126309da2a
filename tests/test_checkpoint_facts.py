"""The served checkpoint's facts (qwen_vl.model_executor.checkpoint_facts), read once from vLLM's
model config: its chat format, history window and chat stops, and the sampling defaults vLLM
fills in; and the copy of its generation config with the chat's stops that vLLM then serves."""

import json
import shutil

import pytest
from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs

from qwen_vl.engine.engine import Engine
from qwen_vl.model_executor.checkpoint_facts import CheckpointFacts
from qwen_vl.model_executor.tokenizer import ENDOFTEXT_ID, IM_END_ID, IM_START_ID

GENERATION_CONFIG = "generation_config.json"


def model_config(model, **engine_args):
    return EngineArgs(model=str(model), **engine_args).create_engine_config().model_config


def with_generation_config(checkpoint, directory, generation_config: dict | None):
    """A copy of `checkpoint` with this generation_config.json (None: without one)."""
    shutil.copytree(checkpoint, directory)
    path = directory / GENERATION_CONFIG
    if generation_config is None:
        path.unlink()
    else:
        path.write_text(json.dumps(generation_config))
    return directory


def test_qwen_vl_chats_facts_come_from_its_generation_config(tiny_checkpoint):
    checkpoint = CheckpointFacts(model_config(tiny_checkpoint))
    assert checkpoint.chatml
    assert checkpoint.max_window_size == 6144
    assert checkpoint.stop_token_ids == (IM_END_ID, IM_START_ID)
    assert checkpoint.sampling_defaults == {"top_k": 0, "top_p": 0.3, "max_tokens": 512}


def test_the_history_window_is_the_checkpoints_own(tiny_checkpoint, tmp_path):
    own = json.loads((tiny_checkpoint / GENERATION_CONFIG).read_text())
    checkpoint = with_generation_config(tiny_checkpoint, tmp_path / "window", {**own, "max_window_size": 100})
    assert CheckpointFacts(model_config(checkpoint)).max_window_size == 100


def test_a_checkpoint_without_a_generation_config_is_not_chatml_and_keeps_vllms_stops(tiny_checkpoint, tmp_path):
    config = model_config(with_generation_config(tiny_checkpoint, tmp_path / "none", None))
    checkpoint = CheckpointFacts(config)
    assert not checkpoint.chatml and checkpoint.max_window_size == 6144
    assert config.generation_config == "auto"  # no copy with the chat's stops


def test_vllm_serves_a_chatml_checkpoint_with_the_chats_stops_as_eos(tiny_checkpoint):
    """vLLM stops every request at the eos ids of the generation config it reads: the copy the
    per-architecture hook made, the checkpoint's own otherwise unchanged."""
    config = model_config(tiny_checkpoint)
    served = config.try_get_generation_config()
    assert served["eos_token_id"] == [ENDOFTEXT_ID, IM_END_ID, IM_START_ID]
    own = json.loads((tiny_checkpoint / GENERATION_CONFIG).read_text())
    assert {k: v for k, v in served.items() if k not in ("eos_token_id", "transformers_version")} == {
        k: v for k, v in own.items() if k not in ("eos_token_id", "transformers_version")}


def test_a_users_generation_config_sets_the_sampling_defaults_not_the_prompt_format(tiny_checkpoint, tmp_path):
    users = tmp_path / "users"
    users.mkdir()
    (users / GENERATION_CONFIG).write_text(json.dumps({"top_p": 0.9}))
    config = model_config(tiny_checkpoint, generation_config=str(users))
    assert config.generation_config == str(users)  # left alone: no chat stops added
    checkpoint = CheckpointFacts(config)
    assert checkpoint.chatml and checkpoint.max_window_size == 6144
    assert checkpoint.sampling_defaults == {"top_p": 0.9}


def test_vllms_neutral_sampling_defaults_keep_the_prompt_format(tiny_checkpoint):
    checkpoint = CheckpointFacts(model_config(tiny_checkpoint, generation_config="vllm"))
    assert checkpoint.chatml and checkpoint.sampling_defaults == {}


@pytest.mark.parametrize("trust_remote_code", [False, True])
def test_the_generation_config_is_read_with_the_model_configs_revision_and_trust(
        tiny_checkpoint, monkeypatch, trust_remote_code):
    import vllm.config.model

    config = model_config(tiny_checkpoint)
    config.revision, config.trust_remote_code = "v1.0", trust_remote_code
    reads = []
    monkeypatch.setattr(vllm.config.model, "try_get_generation_config",
                        lambda model, **kwargs: reads.append((model, kwargs)))
    CheckpointFacts(config)
    [(model, kwargs)] = reads
    assert model == str(tiny_checkpoint)
    assert kwargs["revision"] == "v1.0" and kwargs["trust_remote_code"] is trust_remote_code
    assert config.generation_config != "auto"  # the model config itself is left as it was


def test_the_engine_carries_the_facts_of_its_checkpoint(tiny_checkpoint):
    engine = Engine(AsyncEngineArgs(model=str(tiny_checkpoint)))
    assert engine.checkpoint.chatml and engine.checkpoint.max_window_size == 6144
    assert engine.checkpoint.model_config is engine.vllm_config.model_config
