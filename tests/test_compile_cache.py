"""The server starts vLLM's engine with the compile cache that vLLM 0.32 loads back
(VLLM_USE_AOT_COMPILE=0; qwen_vl/server/__main__.py says why), unless the user chose."""

import os

import pytest

from qwen_vl.engine import engine
from qwen_vl.server import __main__ as server_main
from qwen_vl.server import cpu


class EngineThatRecordsItsEnvironment:
    """Stands in for the engine: records the variable as the engine's processes would inherit it,
    then refuses, so that main() ends at once (exit status 2)."""

    seen: list[str | None] = []

    def __init__(self, *args, **kwargs):
        self.seen.append(os.environ.get(server_main.AOT_COMPILE_ENV))
        raise ValueError("stopped by the test")


@pytest.fixture
def started(monkeypatch, tiny_checkpoint):
    monkeypatch.setattr(engine, "Engine", EngineThatRecordsItsEnvironment)
    monkeypatch.setattr(cpu, "apply_cpu_defaults", lambda *args: None)
    EngineThatRecordsItsEnvironment.seen = []

    def start() -> str | None:
        with pytest.raises(SystemExit) as exit_:
            server_main.main(["--model", str(tiny_checkpoint)])
        assert exit_.value.code == 2
        return EngineThatRecordsItsEnvironment.seen[-1]

    return start


def test_the_engine_starts_with_the_compile_cache_that_reloads(monkeypatch, started):
    monkeypatch.setenv(server_main.AOT_COMPILE_ENV, "unset after the test")  # recorded, so restored
    monkeypatch.delenv(server_main.AOT_COMPILE_ENV)
    assert started() == "0"


def test_a_choice_in_the_environment_wins(monkeypatch, started):
    monkeypatch.setenv(server_main.AOT_COMPILE_ENV, "1")
    assert started() == "1"
