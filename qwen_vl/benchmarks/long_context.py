"""Long conversations on this server at its defaults: throughput and TTFT beside the
single-image workload, what one long request does to short requests running beside
it, and whether the longest prompt the context admits (8192 positions) is served.

    python -m qwen_vl.benchmarks.long_context --preset small

The server runs with its own defaults (context = max_position_embeddings, KV cache and
encoder budget as shipped) plus `--server-arg`s. Results: a section of the markdown report
(`--markdown`, default BENCHMARKS.md; the rest of the file is kept) and raw JSON in `--out-dir`.
"""

import argparse
import asyncio
import json
import shlex
import sys
import time

from .harness import SERVED_MODEL, Server, checkpoint_for, machine, our_server_command
from .load import benchmark
from .report import add_run_arguments, parse_run_arguments, replace_section
from .workloads import WORDS, Request, _user_message, build_workload


def longest_request(max_tokens: int, context: int = 8192) -> Request:
    """A text request whose prompt fills the context but for `max_tokens`: exactly the
    positions our prompt builder counts."""
    from qwen_vl.api.prompt import PromptBuilder
    from qwen_vl.api.protocol import Message
    from qwen_vl.model_executor.tokenizer import build_backend, qwen_tiktoken_path

    builder, target = PromptBuilder(build_backend(qwen_tiktoken_path())), context - max_tokens
    count = target
    while True:
        text = " ".join(WORDS[i % len(WORDS)] for i in range(count))
        length = len(builder.chat([Message(role="user", content=text)]).token_ids)
        if length == target:
            return Request("longest", [_user_message([], text)], max_tokens)
        count += target - length


async def interference(url: str, shorts: list, long_requests: list, concurrency: int, timeout: float) -> dict:
    """Short requests at `concurrency`, while one long request after another runs beside them."""
    done = asyncio.Event()

    async def long_loop() -> list[dict]:
        runs = []
        for request in long_requests:
            if done.is_set():
                break
            runs.append(await benchmark(url, SERVED_MODEL, [request], concurrency=1, num_requests=1,
                                        timeout=timeout, progress=False))
        return runs

    background = asyncio.create_task(long_loop())
    short = await benchmark(url, SERVED_MODEL, shorts, concurrency=concurrency, num_requests=len(shorts),
                            timeout=timeout, progress=False)
    done.set()
    longs = await background
    return {"short": short, "long": longs}


def row(label: str, result: dict) -> str:
    return (f"| {label} | {result['completed']} / {result['failed']} | {sum(result['input_lens']) / max(1, len(result['input_lens'])):.0f} "
            f"| {result['output_throughput']:.1f} | {result['median_ttft_ms']:.0f} | {result['p99_ttft_ms']:.0f} "
            f"| {result['median_itl_ms']:.0f} | {result['p99_itl_ms']:.0f} |")


def run(args) -> list[str]:
    model = args.model or checkpoint_for(args.preset)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    server = Server("ours", lambda port: our_server_command(model, port, "--seed", "0", *args.server_arg),
                    args.out_dir / "long-context-server.log")
    print(f"starting: {shlex.join(server.command)}", file=sys.stderr)
    ready = server.start(args.start_timeout)
    results: dict = {"startup_s": ready}
    try:
        table = []
        for workload in ("single-image", "long-conversation"):
            for index, concurrency in enumerate(args.concurrency):
                count = max(args.min_requests, 2 * concurrency)
                requests = build_workload(workload, count, args.seed + index, args.max_tokens)
                warmup = build_workload(workload, 1, args.seed + 10_000 + index, args.max_tokens)
                print(f"{workload} at concurrency {concurrency}: {count} requests", file=sys.stderr)
                result = asyncio.run(benchmark(server.url, SERVED_MODEL, requests, concurrency=concurrency,
                                               num_requests=count, warmup=warmup, timeout=args.request_timeout,
                                               progress=False))
                results[f"{workload}-c{concurrency}"] = result
                table.append(row(f"{workload} | {concurrency}", result))

        shorts = build_workload("single-image", args.interference_requests, args.seed + 20_000, args.max_tokens)
        longs = build_workload("long-conversation", args.interference_requests, args.seed + 30_000, args.max_tokens)
        alone = asyncio.run(benchmark(server.url, SERVED_MODEL, shorts, concurrency=args.interference_concurrency,
                                      num_requests=len(shorts), timeout=args.request_timeout, progress=False))
        beside = asyncio.run(interference(server.url, shorts, longs, args.interference_concurrency,
                                          args.request_timeout))
        results["interference"] = {"alone": alone, **beside}

        longest = [longest_request(args.max_tokens)]
        results["longest"] = asyncio.run(benchmark(server.url, SERVED_MODEL, longest, concurrency=1, num_requests=1,
                                                   timeout=args.request_timeout, progress=False))
    finally:
        server.stop()
    (args.out_dir / "long-context.json").write_text(json.dumps(results, indent=2) + "\n")

    info, longest = machine(), results["longest"]
    short_beside, long_runs = results["interference"]["short"], results["interference"]["long"]
    long_ttfts = [r["median_ttft_ms"] / 1000 for r in long_runs if r["completed"]]
    served = "served" if longest["completed"] else f"FAILED: {longest['errors']}"
    return [
        "Written by `python -m qwen_vl.benchmarks.long_context`; every figure is measured.",
        "",
        "```bash",
        shlex.join(["python", "-m", "qwen_vl.benchmarks.long_context", *args.argv]),
        "```",
        "",
        f"- this server at its defaults (`{shlex.join(server.command[3:])}`): context 8192, chunked prefill, "
        f"prefix caching on; ready in {ready:.1f} s",
        f"- checkpoint `{args.preset or model}`; {args.max_tokens} output tokens per request (`ignore_eos`, greedy), "
        "closed loop, 1 warm-up request per level",
        "- `long-conversation`: 8 images over three user turns with two assistant answers, ~4-5k prompt tokens "
        "(alpha 3 or 7); `single-image`: one image and a short question (~280 tokens)",
        f"- machine: {info['nproc']} CPUs, load average at the end {' / '.join(map(str, info['load_average']))}; "
        f"date {time.strftime('%Y-%m-%d %H:%M %Z')}",
        "",
        "| workload | concurrency | completed / failed | mean prompt tokens | output tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms |",
        "|---|---|---|---|---|---|---|---|---|",
        *table,
        "",
        f"One long request beside short ones: {len(shorts)} single-image requests at concurrency "
        f"{args.interference_concurrency}, alone and with long-conversation requests sent one after another "
        f"beside them ({len(long_ttfts)} ran; their TTFT p50 {sorted(long_ttfts)[len(long_ttfts) // 2] if long_ttfts else float('nan'):.1f} s):",
        "",
        "| short requests | completed / failed | mean prompt tokens | output tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms |",
        "|---|---|---|---|---|---|---|---|",
        row("alone", results["interference"]["alone"]),
        row("beside a long request", short_beside),
        "",
        f"The longest prompt the default context admits ({longest['input_lens'][0] if longest['input_lens'] else '?'} "
        f"prompt tokens + {args.max_tokens} output = up to 8192 positions): {served}, TTFT {longest['median_ttft_ms'] / 1000:.1f} s.",
    ]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m qwen_vl.benchmarks.long_context", description=__doc__.split("\n\n")[0])
    add_run_arguments(parser)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--min-requests", type=int, default=4, help="timed requests per level: max(this, 2 x concurrency)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--interference-requests", type=int, default=12)
    parser.add_argument("--interference-concurrency", type=int, default=3)
    parser.add_argument("--server-arg", action="append", default=[], help="more arguments for the server")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = parse_run_arguments(build_parser(), argv)
    lines = run(args)
    replace_section(args.markdown, "Long conversations", lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
