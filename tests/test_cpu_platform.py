"""The CPU platform vLLM runs the model on: ZenCpuPlatform (zentorch's GEMMs)
on AMD CPUs with AVX-512, vLLM's plain CpuPlatform elsewhere and with
QWEN_VL_ZENTORCH=0. The suite's other engines run on whichever this machine
gets by default; on an AMD machine a server under the opt-out is checked
against the reference too, so both paths stay exact."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import assert_server_matches_reference, environment_variable, start_server


def amd_with_avx512() -> bool:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    return "AuthenticAMD" in cpuinfo and "avx512" in cpuinfo


def platform_of_a_new_process(**env: str) -> str:
    """The class name of vLLM's current_platform in a fresh interpreter with `env` added (and
    the opt-out only where `env` sets it, whatever the suite's own environment says)."""
    code = "from vllm.platforms import current_platform; print(type(current_platform).__name__)"
    inherited = {k: v for k, v in os.environ.items() if k != "QWEN_VL_ZENTORCH"}
    done = subprocess.run([sys.executable, "-c", code], env={**inherited, **env}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


def test_default_platform_is_zen_on_amd_with_avx512_and_vllms_cpu_platform_elsewhere():
    expected = "ZenCpuPlatform" if amd_with_avx512() else "CpuPlatform"
    assert platform_of_a_new_process() == expected


def test_opt_out_keeps_vllms_cpu_platform():
    assert platform_of_a_new_process(QWEN_VL_ZENTORCH="0") == "CpuPlatform"


def test_server_refuses_an_opt_out_value_it_does_not_know(monkeypatch, capsys):
    from qwen_vl.server.settings import parse

    monkeypatch.setenv("QWEN_VL_ZENTORCH", "off")
    with pytest.raises(SystemExit) as exit_info:
        parse(["--model", "unused"])
    assert exit_info.value.code == 2
    assert "QWEN_VL_ZENTORCH must be 0 or 1, not 'off'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def opted_out_server(tiny_checkpoint, tmp_path_factory):
    """Our server with QWEN_VL_ZENTORCH=0, on a machine where the default is Zen."""
    if not amd_with_avx512():
        pytest.skip("not an AMD CPU with AVX-512: vLLM's CpuPlatform is already the default, tested everywhere")
    log = tmp_path_factory.mktemp("oneDNN") / "server.log"
    with environment_variable("QWEN_VL_ZENTORCH", "0"):
        server = start_server(tiny_checkpoint, log)
    yield server.url, log
    server.stop()


def test_opted_out_server_matches_reference(opted_out_server, ref_tokenizer, reference):
    url, log = opted_out_server
    assert "vLLM platform: CpuPlatform" in log.read_text()
    assert_server_matches_reference(url, ref_tokenizer, reference)
