"""This server under several CPU and parallel set-ups, one after the other, on the same requests.

    python -m qwen_vl.benchmarks.scaling --setups vllm-auto both-cores default --concurrency 1 4 16
    python -m qwen_vl.benchmarks.scaling --setups default tp2 pp2 dp2 --concurrency 16

Set-ups (engine arguments and environment on top of `compare`'s engine arguments):

    vllm-auto    vLLM's own CPU binding (VLLM_CPU_OMP_THREADS_BIND=auto: one core per rank kept
                 free), no preloads: this server before it chose its own CPU defaults
    both-cores   our binding (every core computes), no preloads
    default      our defaults: our binding, tcmalloc and libiomp5 preloaded (run with
                 --no-enforce-eager to get the server's default compiled mode)
    eager        our defaults in eager mode (--enforce-eager: no torch.compile)
    vllm-top-p   our defaults, but vLLM's own top-p on CPUs, which sorts the vocabulary
                 (QWEN_VL_CPU_TOP_P=vllm); compare with `default` under --sampling checkpoint
    images-1     our defaults, but one image encoded per engine step (--images-per-step 1)
                 instead of vLLM's budget (8 at 2048 batched tokens)
    onednn       our defaults on vLLM's plain CpuPlatform (oneDNN) where the default is its
                 ZenCpuPlatform (zentorch, AMD CPUs with AVX-512): QWEN_VL_ZENTORCH=0
    zen-unpacked our defaults, zentorch's GEMMs on unpacked weights (VLLM_ZENTORCH_WEIGHT_PREPACK=0)
    tp2 pp2 dp2  our defaults with --tensor-parallel-size 2 / --pipeline-parallel-size 2 /
                 --data-parallel-size 2 (one rank per core); pp2 traced once instead of eager

Each set-up is a fresh server (closed loop per level, as `compare`); the table goes to stdout
and, with --markdown, into that file's `## --section` (the rest of the file is kept). Its MFU
column is the FLOPs the level's completed requests needed (`mfu.request_flops`, from the
checkpoint's config) per second of the level, over torch's matrix-multiply rate in --dtype on
every allowed core, measured at the start and at the end of the same run, the higher of the
two (`mfu.matmul_peak`; single measurements varied by 25% on this shared VM).
Raw results: --out-dir/<setup>/ours-c<N>.json and the server logs.
"""

import json
import os
import shlex
import sys
import time
from pathlib import Path

from . import compare
from .harness import checkpoint_for, engine_args, machine
from .report import replace_section

SETUPS: dict[str, tuple[dict[str, str], list[str]]] = {
    "vllm-auto": ({"VLLM_CPU_OMP_THREADS_BIND": "auto"}, ["--no-cpu-preload"]),
    "both-cores": ({}, ["--no-cpu-preload"]),
    "default": ({}, []),
    "eager": ({}, ["--enforce-eager"]),
    "vllm-top-p": ({"QWEN_VL_CPU_TOP_P": "vllm"}, []),
    "images-1": ({}, ["--images-per-step", "1"]),
    "onednn": ({"QWEN_VL_ZENTORCH": "0"}, []),
    "zen-unpacked": ({"VLLM_ZENTORCH_WEIGHT_PREPACK": "0"}, []),
    "tp2": ({}, ["--tensor-parallel-size", "2"]),
    # Traced once, not compiled (eager mode is refused: see qwen_vl/server/cpu.py).
    "pp2": ({}, ["--pipeline-parallel-size", "2", "--no-enforce-eager", "--compilation-config",
                 '{"mode": 2, "backend": "eager"}']),
    "dp2": ({}, ["--data-parallel-size", "2"]),
}


def rows(results: dict[str, list[dict]], concurrency: list[int], limits: compare.Limits) -> list[str]:
    lines = ["| setup | concurrency | completed / failed | output tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms "
             "| ITL p99 ms | MFU | start-up s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for setup, runs in results.items():
        by = {r.get("concurrency"): r for r in runs if "error" not in r}
        for c in concurrency:
            r = by.get(c)
            if r is None:
                error = next((r["error"] for r in runs if "error" in r), "not measured")
                lines.append(f"| {setup} | {c} | failed: {error} | | | | | | | |")
                continue
            lines.append(
                f"| {setup} | {c} | {r['completed']} / {r['failed']} | {r['output_throughput']:.1f} "
                f"| {r['median_ttft_ms']:.0f} | {r['p99_ttft_ms']:.0f} | {r['median_itl_ms']:.1f} "
                f"| {r['p99_itl_ms']:.1f} | {compare.utilisation(limits, r):.1%} | {r['startup_s']:.0f} |"
            )
    return lines


def main(argv: list[str] | None = None) -> dict[str, list[dict]]:
    parser = compare.build_parser()
    parser.prog = "python -m qwen_vl.benchmarks.scaling"
    parser.description = "This server under several CPU and parallel set-ups (see the module docstring)."
    parser.add_argument("--setups", nargs="+", choices=SETUPS, default=["vllm-auto", "both-cores", "default"])
    parser.set_defaults(markdown=None, out_dir=Path("bench-results/scaling"), section="Scaling")
    args = parser.parse_args(argv)
    command = shlex.join(["python", "-m", "qwen_vl.benchmarks.scaling", *(sys.argv[1:] if argv is None else argv)])
    model = args.model or checkpoint_for(args.preset)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(args.kv_cache_gib)}
    limits = compare.Limits.measure(model, args.dtype)  # before any server runs: the machine to itself
    print(f"torch.mm {args.dtype}: {limits.peak_flops / 1e9:.0f} GFLOP/s", file=sys.stderr)
    results: dict[str, list[dict]] = {}
    base_engine_args = list(args.engine_arg)
    for setup in args.setups:
        extra_env, extra_args = SETUPS[setup]
        args.engine_arg = [*base_engine_args, shlex.join(extra_args)]
        out_dir = args.out_dir / setup
        out_dir.mkdir(parents=True, exist_ok=True)
        began = time.perf_counter()
        results[setup] = compare.run_server("ours", model, args, out_dir, {**env, **extra_env})
        print(f"[{setup}] done in {time.perf_counter() - began:.0f} s", file=sys.stderr)
    limits = compare.Limits.measure(model, args.dtype, limits)
    info = machine()
    (args.out_dir / "results.json").write_text(json.dumps(
        {"command": command, "machine": info, "limits": {"peak_flops": limits.peak_flops, "bandwidth": limits.bandwidth},
         "runs": results}, indent=2) + "\n")
    table = rows(results, args.concurrency, limits)
    print("\n".join(table))
    if args.markdown:
        args.engine_arg = base_engine_args
        text = [
            "```bash", command, "```", "",
            f"- checkpoint `{args.preset or model}`, workload `{args.workload}`, {args.max_tokens} output tokens "
            f"({compare.SAMPLING_TEXT[args.sampling]}), "
            f"requests per level {', '.join(map(str, compare.level_sizes(args, 'ours')))}; engine arguments "
            f"`{shlex.join(engine_args(args))}` plus each set-up's, VLLM_CPU_KVCACHE_SPACE={args.kv_cache_gib}",
            f"- machine: {info['nproc']} CPUs ({info['cpu']}), {info['ram_gib']} GiB RAM; vLLM {info['vllm']} (default platform: {info['platform']}); "
            f"load average at the end {' / '.join(map(str, info['load_average']))} (the machine is shared: "
            "other work skews every figure)",
            compare.limits_line(limits, args),
            f"- date: {time.strftime('%Y-%m-%d %H:%M %Z')}", "", *table,
        ]
        replace_section(args.markdown, args.section, text)
    return results


if __name__ == "__main__":
    main()
