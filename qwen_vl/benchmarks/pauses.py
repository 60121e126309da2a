"""Pauses: what one long prompt does to the streams running beside it, under each scheduling.

    python -m qwen_vl.benchmarks.pauses --preset small
    python -m qwen_vl.benchmarks.pauses --setups "vllm=--decode-pause-budget 0" "default="

For each setup (NAME=FLAGS for this server; the first is the one the others are held against),
one server per round (`--rounds`, each round starting with another set-up), and on it:

    alone     three closed-loop streams of one-image chats (the short streams), nothing else
    beside    the same streams while long prompts (8 images over three turns, ~4k tokens: the
              `long-conversation` workload) run one after another beside them
    long      the long prompts alone, one at a time: their TTFT
    uniform   16 closed-loop one-image chats (throughput)

Every request asks for `--max-tokens` tokens (`ignore_eos`), greedy. The streams' figures are
their ITL p99 and their longest pause (the longest gap in any one stream). The targets, against
the first setup's ITL p99 alone: alone, ITL p99 and TTFT p50 within 1.2x of the
first setup's; beside, ITL p99 within 5x and longest pause within 10x, the long prompts' TTFT
within 1.3x of their TTFT alone; uniform within 5% of the first setup's tok/s. Results: a
section of `--markdown` (default BENCHMARKS.md) and raw JSON in `--out-dir`.
"""

import argparse
import asyncio
import json
import shlex
import sys
import time

from .harness import SERVED_MODEL, Server, checkpoint_for, machine, our_server_command
from .load import benchmark
from .long_context import interference
from .mfu import matmul_peak, product_dtype, read_bandwidth
from .report import add_run_arguments, parse_run_arguments, replace_section
from .workloads import build_workload

SECTION = "Pauses beside a long prompt"


def measure(url: str, args) -> dict:
    def run(requests, concurrency):
        return asyncio.run(benchmark(url, SERVED_MODEL, requests, concurrency=concurrency,
                                     num_requests=len(requests), timeout=args.request_timeout, progress=False))

    warmup = build_workload("single-image", 4, args.seed + 50_000, args.max_tokens)
    run(warmup, 2)
    shorts = build_workload("single-image", args.short_requests, args.seed, args.max_tokens)
    longs = build_workload("long-conversation", args.long_requests, args.seed + 1, args.max_tokens)
    alone = run(shorts, 3)
    beside = asyncio.run(interference(url, build_workload("single-image", args.short_requests, args.seed + 2,
                                                         args.max_tokens), longs, 3, args.request_timeout))
    long_alone = run(build_workload("long-conversation", args.long_requests, args.seed + 3, args.max_tokens), 1)
    uniform = run(build_workload("single-image", 48, args.seed + 4, args.max_tokens), 16)
    return {"alone": alone, "beside": beside["short"], "long_beside": beside["long"], "long_alone": long_alone,
            "uniform": uniform}


def figures(result: dict) -> dict:
    long_beside = [ttft for run in result["long_beside"] for ttft, error in zip(run["ttfts"], run["request_errors"])
                   if not error]
    return {
        "alone_itl_p99": result["alone"]["p99_itl_ms"], "alone_ttft_p50": result["alone"]["median_ttft_ms"],
        "alone_pause": 1000 * max(result["alone"]["longest_pauses"]),
        "beside_itl_p99": result["beside"]["p99_itl_ms"], "beside_pause": 1000 * max(result["beside"]["longest_pauses"]),
        "long_ttft_beside": 1000 * sorted(long_beside)[len(long_beside) // 2] if long_beside else float("nan"),
        "long_ttft_alone": result["long_alone"]["median_ttft_ms"],
        "uniform_tok_s": result["uniform"]["output_throughput"],
    }


def report(runs: dict, args, limits: tuple) -> list[str]:
    info = machine()
    first = next(iter(runs))
    base = figures(runs[first]) if "error" not in runs[first] else None
    lines = [
        "Written by `python -m qwen_vl.benchmarks.pauses`; every figure is measured.",
        "",
        "```bash",
        shlex.join(["python", "-m", "qwen_vl.benchmarks.pauses", *args.argv]),
        "```",
        "",
        f"- checkpoint `{args.preset or args.model}`; {args.max_tokens} output tokens per request (`ignore_eos`, "
        f"greedy); short streams: 3 closed-loop one-image chats, {args.short_requests} requests; long prompts: "
        f"{args.long_requests} of `long-conversation` (8 images, ~4k tokens)",
        f"- machine: {info['nproc']} CPUs; torch.mm bf16 {limits[0] / 1e9:.0f} GFLOP/s, memory read "
        f"{limits[1] / 1e9:.1f} GB/s (before the servers); load average at the end "
        f"{' / '.join(map(str, info['load_average']))}; date {time.strftime('%Y-%m-%d %H:%M %Z')}",
        "",
        "| setup | alone: ITL p99 ms | alone: TTFT p50 ms | alone: longest pause ms | beside: ITL p99 ms "
        "| beside: longest pause ms | long TTFT p50 alone / beside s | uniform c=16 tok/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, result in runs.items():
        if "error" in result:
            lines.append(f"| {name} | FAILED: {result['error']} |" + " |" * 6)
            continue
        f = figures(result)
        lines.append(f"| {name} `{args.flags[name]}` | {f['alone_itl_p99']:.0f} | {f['alone_ttft_p50']:.0f} "
                     f"| {f['alone_pause']:.0f} | {f['beside_itl_p99']:.0f} | {f['beside_pause']:.0f} "
                     f"| {f['long_ttft_alone'] / 1000:.1f} / {f['long_ttft_beside'] / 1000:.1f} "
                     f"| {f['uniform_tok_s']:.1f} |")
    if base is not None:
        lines += ["", f"Against `{first}`'s ITL p99 alone ({base['alone_itl_p99']:.0f} ms), the targets:", ""]
        for name, result in list(runs.items())[1:]:
            if "error" in result:
                continue
            f = figures(result)
            checks = [
                ("alone ITL p99", f["alone_itl_p99"] / base["alone_itl_p99"], 1.2),
                ("alone TTFT p50", f["alone_ttft_p50"] / base["alone_ttft_p50"], 1.2),
                ("beside ITL p99", f["beside_itl_p99"] / base["alone_itl_p99"], 5.0),
                ("beside longest pause", f["beside_pause"] / base["alone_itl_p99"], 10.0),
                ("long TTFT beside / alone", f["long_ttft_beside"] / f["long_ttft_alone"], 1.3),
                ("uniform tok/s (lower bound)", base["uniform_tok_s"] / f["uniform_tok_s"], 1.05),
            ]
            lines.append(f"- {name}: " + "; ".join(
                f"{label} {ratio:.2f}x (<= {bound:g}x: {'met' if ratio <= bound else 'NOT met'})"
                for label, ratio, bound in checks))
        lines.append(f"- `{first}` itself beside the long prompts: ITL p99 "
                     f"{base['beside_itl_p99'] / base['alone_itl_p99']:.1f}x, longest pause "
                     f"{base['beside_pause'] / base['alone_itl_p99']:.1f}x its ITL p99 alone")
    return lines


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m qwen_vl.benchmarks.pauses", description=__doc__.split("\n\n")[0])
    add_run_arguments(parser)
    parser.add_argument("--setups", nargs="+", default=["vllm=--decode-pause-budget 0", "default="],
                        metavar="NAME=FLAGS", help="this server with these flags; the first is the reference")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--short-requests", type=int, default=24)
    parser.add_argument("--long-requests", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2, help="every set-up this many times, in rotated order")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = parse_run_arguments(build_parser(), argv)
    model = args.model or checkpoint_for(args.preset)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    args.flags = dict(setup.partition("=")[::2] for setup in args.setups)
    limits = (matmul_peak(product_dtype("bfloat16"))["peak_flops"], read_bandwidth())
    rounds = []
    names = list(args.flags)
    for number in range(args.rounds):
        runs = {}
        # Each round starts with another set-up, so that drift of the machine does not favour one.
        for name in names[number % len(names):] + names[:number % len(names)]:
            flags = shlex.split(args.flags[name])
            server = Server(name, lambda port: our_server_command(model, port, "--seed", "0", *flags),
                            args.out_dir / f"pauses-{name}-{number}.log")
            print(f"[{name}] round {number + 1}: {shlex.join(server.command)}", file=sys.stderr)
            try:
                server.start(args.start_timeout)
                runs[name] = measure(server.url, args)
            except RuntimeError as e:
                runs[name] = {"error": str(e)}
            finally:
                server.stop()
        rounds.append({name: runs[name] for name in names})
    (args.out_dir / "pauses.json").write_text(json.dumps(rounds, indent=2) + "\n")
    lines = []
    for number, runs in enumerate(rounds):
        section = report(runs, args, limits)
        lines += section if number == 0 else ["", f"Round {number + 1} (set-ups in another order):", "", *section[7:]]
    replace_section(args.markdown, SECTION, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
