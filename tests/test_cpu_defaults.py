"""The server's CPU defaults: every allowed core computes (one thread per
physical core, an even share per rank on this node), the preloads vLLM asks
for when installed, and a user's explicit choice always wins."""

import os
from pathlib import Path

import pytest
from vllm.engine.arg_utils import AsyncEngineArgs

from qwen_vl.server import cpu
from qwen_vl.server.settings import build_parser

TWO_CORES = [(0, 0, 0), (1, 1, 0)]
REAL_CHECKPOINT = Path(__file__).parent / "data" / "qwen-vl-chat"  # the real config.json


def test_one_rank_computes_on_every_core():
    assert cpu.threads_bind(1, TWO_CORES) == "0-1"


def test_several_ranks_get_a_group_each():
    assert cpu.threads_bind(2, TWO_CORES) == "0|1"
    eight = [(i, i, 0) for i in range(8)]
    assert cpu.threads_bind(2, eight) == "0-3|4-7"


def test_smt_siblings_share_a_core_so_one_thread_per_core():
    siblings = [(0, 0, 0), (1, 1, 0), (2, 0, 0), (3, 1, 0)]
    assert cpu.threads_bind(1, siblings) == "0-1"


def test_ranks_go_one_per_numa_node_when_there_are_enough_nodes():
    two_nodes = [(i, i, i // 4) for i in range(8)]
    assert cpu.threads_bind(2, two_nodes) == "0-3|4-7"
    assert cpu.threads_bind(1, two_nodes) == "0-3"


def test_more_ranks_than_cores_is_a_clear_error():
    with pytest.raises(ValueError, match="3 engine ranks on this node need at least 3 physical cores"):
        cpu.threads_bind(3, TWO_CORES)


@pytest.mark.parametrize(
    ("flags", "ranks"),
    [([], 1), (["--tensor-parallel-size", "2"], 2), (["--pipeline-parallel-size", "2"], 2),
     (["--data-parallel-size", "2"], 2), (["--tensor-parallel-size", "2", "--nnodes", "2"], 1)],
)
def test_ranks_on_this_node(flags, ranks):
    args = build_parser().parse_args(["--model", "m", *flags])
    assert cpu.local_ranks(AsyncEngineArgs.from_cli_args(args)) == ranks


@pytest.fixture
def clean_environment(monkeypatch):
    # apply_cpu_defaults writes os.environ itself: set each variable through monkeypatch
    # first, so that teardown restores it and no later test's engine inherits a binding.
    for name in (cpu.BIND_ENV, "LD_PRELOAD"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    monkeypatch.setenv(cpu.KV_CACHE_ENV, os.environ.get(cpu.KV_CACHE_ENV, "1"))
    monkeypatch.setattr(cpu, "allowed_cpus", lambda: TWO_CORES)


def engine_args(*flags: str):
    return AsyncEngineArgs.from_cli_args(build_parser().parse_args(["--model", "m", *flags]))


def test_default_binds_all_cores_and_preloads_what_is_installed(clean_environment):
    cpu.apply_cpu_defaults(engine_args(), None, preload=True)
    assert os.environ[cpu.BIND_ENV] == "0-1"
    assert os.environ.get("LD_PRELOAD", "") == ":".join(cpu.preload_libraries())


def test_the_flag_sets_the_binding(clean_environment):
    cpu.apply_cpu_defaults(engine_args(), "auto", preload=False)
    assert os.environ[cpu.BIND_ENV] == "auto"
    assert "LD_PRELOAD" not in os.environ


def test_an_explicit_environment_wins(clean_environment, monkeypatch):
    monkeypatch.setenv(cpu.BIND_ENV, "1")
    monkeypatch.setenv("LD_PRELOAD", "libmine.so")
    cpu.apply_cpu_defaults(engine_args("--tensor-parallel-size", "2"), "0|1", preload=True)
    assert os.environ[cpu.BIND_ENV] == "1"
    assert os.environ["LD_PRELOAD"] == "libmine.so"


@pytest.mark.parametrize(("checkpoint", "flags", "gib"), [
    ("tiny", [], "2"),  # 8192 positions take 16 MiB: the 2 GiB floor
    ("real", [], "5"),  # 32 layers x 4096 x K,V in bfloat16: 4 GiB for 8192 positions, and a margin
    ("real", ["--max-model-len", "2048"], "2"),
    ("real", ["--dtype", "float32"], "9"),
])
def test_kv_cache_admits_one_request_of_the_whole_context(
    clean_environment, monkeypatch, tiny_checkpoint, checkpoint, flags, gib
):
    monkeypatch.delenv(cpu.KV_CACHE_ENV, raising=False)
    model = str(tiny_checkpoint if checkpoint == "tiny" else REAL_CHECKPOINT)
    cpu.apply_cpu_defaults(engine_args("--model", model, *flags), None, preload=False)
    assert os.environ[cpu.KV_CACHE_ENV] == gib


def test_help_documents_the_cpu_settings():
    text = build_parser().format_help()
    for line in ("--cpu-threads-bind", "QWEN_VL_CPU_THREADS_BIND", "--cpu-preload", "QWEN_VL_CPU_PRELOAD",
                 "--headless", "QWEN_VL_HEADLESS"):
        assert line in text
