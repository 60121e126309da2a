"""vLLM 0.23 beside this server, without vLLM 0.23: the checkpoint copy it is served from, and
the prompt it builds for the benchmark's requests (our remote-code tokenizer and chat template,
then its image expansion) equal to our server's, token for token. The servers themselves are
compared by `python -m qwen_vl.benchmarks.vllm023`, which needs the vLLM 0.23 environment."""

import json
import shutil
import types

import pytest
import transformers

from qwen_vl.api.prompt import PromptBuilder
from qwen_vl.api.protocol import Message
from qwen_vl.benchmarks import compare, vllm023
from qwen_vl.benchmarks.workloads import build_workload
from qwen_vl.model_executor.tokenizer import IM_END_ID, IM_START_ID, IMAGE_SPAN, IMG_END_ID, IMG_START_ID, build_backend, qwen_tiktoken_path


@pytest.fixture(scope="module")
def prepared(tiny_checkpoint, tmp_path_factory):
    return vllm023.prepare_checkpoint(tiny_checkpoint, cache=tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def remote_tokenizer(prepared):
    """Loaded as vLLM 0.23 loads it: AutoTokenizer on the copy, remote code trusted."""
    return transformers.AutoTokenizer.from_pretrained(prepared, trust_remote_code=True)


def as_vllm023(tokenizer, messages: list[dict]) -> list[int]:
    """vLLM 0.23's chat path: the template rendered to text, the text tokenized (every
    special-token string a token), then each <img></img> pair widened to the image's 256 pads."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer.encode(text, add_special_tokens=False)
    out = []
    for i, token in enumerate(ids):
        out += IMAGE_SPAN[:-1] if token == IMG_START_ID and ids[i + 1] == IMG_END_ID else [token]
    return out


def test_the_copy_links_the_weights_and_adds_our_remote_code_template_and_stops(tiny_checkpoint, prepared):
    weights = sorted(p.name for p in tiny_checkpoint.glob("*.safetensors"))
    assert weights and all((prepared / name).is_symlink() for name in weights)
    assert (prepared / "configuration_qwen.py").read_text() == (vllm023.HERE / "configuration_qwen.py").read_text()
    assert (prepared / "tokenization_qwen.py").read_text() == (vllm023.HERE / "tokenization_qwen.py").read_text()
    assert (prepared / "chat_template.jinja").exists()
    stops = json.loads((prepared / "generation_config.json").read_text())["eos_token_id"]
    assert stops[1:] == [IM_END_ID, IM_START_ID]


def test_a_checkpoint_without_the_qwen_auto_map_is_refused(tiny_checkpoint, tmp_path):
    copy = shutil.copytree(tiny_checkpoint, tmp_path / "plain")
    config = json.loads((copy / "tokenizer_config.json").read_text())
    del config["auto_map"]
    (copy / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(vllm023.Unavailable, match="AutoTokenizer"):
        vllm023.prepare_checkpoint(copy, cache=tmp_path / "cache")


def test_remote_tokenizer_has_the_qwen_ids_and_what_vllm023_reads(remote_tokenizer):
    assert remote_tokenizer.special_tokens["<|endoftext|>"] == 151643
    assert remote_tokenizer.special_tokens[remote_tokenizer.image_start_tag] == IMG_START_ID
    assert remote_tokenizer.special_tokens[remote_tokenizer.image_pad_tag] == IMAGE_SPAN[1]
    ids = remote_tokenizer.encode("Hello, 你好! 12345 🎉", add_special_tokens=False)
    assert ids == build_backend(qwen_tiktoken_path()).encode("Hello, 你好! 12345 🎉", add_special_tokens=False).ids
    assert remote_tokenizer.decode(ids) == "Hello, 你好! 12345 🎉"


@pytest.mark.parametrize("workload", ["single-image", "multi-image", "text", "grounding"])
def test_vllm023_builds_our_prompt_for_the_benchmark_requests(remote_tokenizer, workload):
    builder = PromptBuilder(build_backend(qwen_tiktoken_path()))
    for request in build_workload(workload, 6, seed=0):
        ours = builder.chat([Message.model_validate(m) for m in request.messages]).token_ids
        assert as_vllm023(remote_tokenizer, request.messages) == ours


def test_vllm023_command_has_remote_code_and_the_model_override_and_binds_every_core(tmp_path):
    command = vllm023.server_command(tmp_path / "bin" / "python", tmp_path / "ckpt", 8123, "m", ["--dtype", "float32"])
    assert command[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert "--trust-remote-code" in command and command[-2:] == ["--dtype", "float32"]
    assert json.loads(command[command.index("--hf-overrides") + 1]) == {"architectures": [vllm023.ARCHITECTURE]}
    env = vllm023.server_env(tmp_path / "bin" / "python", {"PYTHONPATH": "/repo"}, cpus=[(0, 0, 0), (1, 1, 0)])
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "0-1" and "PYTHONPATH" not in env
    assert vllm023.server_env(tmp_path, {"VLLM_CPU_OMP_THREADS_BIND": "1"}, cpus=[])["VLLM_CPU_OMP_THREADS_BIND"] == "1"


def test_without_a_vllm023_environment_the_system_fails_with_a_clear_error(tiny_checkpoint, tmp_path):
    args = types.SimpleNamespace(vllm023_venv=None)
    [run] = compare.run_server("vllm023", tiny_checkpoint, args, tmp_path, {})
    assert run["system"] == "vllm023" and "scripts/setup-vllm023.sh" in run["error"]
