"""QWenConfig: the real config.json loads without remote code, in transformers and in vLLM."""

import json
import shutil
from pathlib import Path

import pytest
import transformers

from qwen_vl.model_executor.config import QWenConfig, register_config

REAL = Path(__file__).parent / "data" / "qwen-vl-chat"


@pytest.fixture(scope="module")
def real_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("real-config")
    shutil.copyfile(REAL / "config.json", path / "config.json")
    return path


def test_defaults_are_the_real_checkpoint_values():
    real = json.loads((REAL / "config.json").read_text())
    defaults = QWenConfig()
    for key in QWenConfig.__annotations__:
        assert getattr(defaults, key) == real[key], key


def test_real_config_loads_through_auto_config(real_dir):
    register_config()
    register_config()  # idempotent
    config = transformers.AutoConfig.from_pretrained(real_dir, trust_remote_code=False)
    assert isinstance(config, QWenConfig)
    assert config.visual["width"] == 1664 and config.seq_length == 2048


def test_real_config_loads_through_vllm(real_dir):
    from vllm.transformers_utils.config import get_config

    register_config()
    config = get_config(real_dir, trust_remote_code=False)
    assert isinstance(config, QWenConfig)
    assert config.rope_theta == 10000 and config.partial_rotary_factor == 1.0


def test_vllm_derives_max_model_len_from_max_position_embeddings(real_dir):
    # With dynamic NTK the original answers up to max_position_embeddings (8192), not only
    # up to its training length seq_length (2048), the smallest length key vLLM knows.
    import vllm.config  # noqa: F401  (initialises vllm.config before the convertor module)
    from vllm.transformers_utils.config import get_config
    from vllm.transformers_utils.model_arch_config_convertor import ModelArchConfigConvertorBase

    register_config()
    config = get_config(real_dir, trust_remote_code=False)
    convertor = ModelArchConfigConvertorBase(config, config.get_text_config())
    assert convertor.derive_max_model_len_and_key() == (8192, "model_max_length")
