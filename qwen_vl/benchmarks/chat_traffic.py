"""Chat traffic as users send it: conversations arriving at random, and the share of requests
served within a latency target (goodput), per system, at several arrival rates.

    python -m qwen_vl.benchmarks.chat_traffic --preset small --rates 0.25 0.5 --duration 90
    python -m qwen_vl.benchmarks.chat_traffic --systems ours vllm023 --vllm023-venv DIR \\
        --ours-variant "knobs=--long-prefill-token-threshold 256 --images-per-step 1"

The traffic (`build_traffic`, the same for every system from `--seed`): conversations arrive
open loop, Poisson at the rate, for `--duration` seconds; each is drawn from the mix

    question  70%  one image and a short question (~290 prompt tokens)
    chat      20%  three turns, an image in each; each turn resends the history (the earlier
                   images and the server's own answers) as clients do, after a think time of
                   1-3 s; the prefix cache may serve the earlier turns
    long      10%  six images and ~1200 words in one message (~2.9k prompt tokens: past
                   vLLM 0.23's 2048-token context, which refuses it)

Every answer is `--max-tokens` tokens (`ignore_eos`), greedy, streamed. Per request: TTFT, the
gaps between streamed chunks (ITL) and the longest of them (the longest pause a reader sees).
A request is within target when it succeeds, its TTFT is at most `--ttft-target` (the long
prompts: `--long-ttft-target`) and its longest pause at most `--pause-target`; the defaults
(4 s, 30 s, 1.5 s) are scaled to this 2-core CPU, where one image takes ~0.2 s through the
`small` ViT and a decode step ~40 ms. Goodput: requests within target per second of the run
(first arrival to last answer). A refused or failed request (a conversation's later turns are
then never sent, and count as failed too) is never within target.

Systems: `ours` (this server at its defaults), each `--ours-variant NAME=ARGS` (this server with
those flags), `vllm023` (vLLM 0.23's server, built-in Qwen-VL, `--vllm023-args`, its context
2048). Results: a section of `--markdown` (default BENCHMARKS.md), CDF plots of TTFT and the
longest pause (`--plot`, default docs/chat-traffic.png), raw JSON in `--out-dir`.
"""

import argparse
import asyncio
import json
import math
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np

from .harness import SERVED_MODEL, Server, checkpoint_for, machine, our_server_command
from .load import RequestResult, send
from .report import add_run_arguments, parse_run_arguments, replace_section
from .workloads import MULTI_IMAGE_QUESTIONS, QUESTIONS, _pick, _random_image_url, _user_message, _words

MIX = {"question": 0.7, "chat": 0.2, "long": 0.1}
CHAT_TURNS = 3
LONG_IMAGES = 6
THINK_SECONDS = (1.0, 3.0)
SECTION = "Chat traffic: goodput"


@dataclass
class Turn:
    image_urls: list[str]
    text: str


@dataclass
class Conversation:
    kind: str
    arrival: float  # seconds after the run starts
    turns: list[Turn]
    think: list[float]  # seconds between an answer and the next turn


@dataclass
class TurnResult:
    conversation: int
    turn: int
    kind: str
    result: RequestResult = field(default_factory=RequestResult)

    @property
    def longest_pause(self) -> float:
        return max(self.result.itl, default=0.0)


def build_traffic(rate: float, duration: float, seed: int = 0) -> list[Conversation]:
    """The conversations that arrive in `duration` seconds at `rate` per second (Poisson),
    each drawn from MIX; the same arguments give the same conversations, images included."""
    rng = np.random.default_rng(seed)
    kinds, weights = list(MIX), list(MIX.values())
    traffic, clock = [], 0.0
    while True:
        clock += float(rng.exponential(1.0 / rate))
        if clock >= duration:
            return traffic
        kind = kinds[int(rng.choice(len(kinds), p=weights))]
        if kind == "question":
            turns, think = [Turn([_random_image_url(rng)], _pick(rng, QUESTIONS))], []
        elif kind == "chat":
            turns = [Turn([_random_image_url(rng)], _pick(rng, QUESTIONS)) for _ in range(CHAT_TURNS)]
            think = [float(rng.uniform(*THINK_SECONDS)) for _ in range(CHAT_TURNS - 1)]
        else:
            urls = [_random_image_url(rng) for _ in range(LONG_IMAGES)]
            turns, think = [Turn(urls, _words(rng, 1100, 1300) + "\n" + _pick(rng, MULTI_IMAGE_QUESTIONS))], []
        traffic.append(Conversation(kind, clock, turns, think))


async def converse(client: httpx.AsyncClient, url: str, headers: dict, index: int, conversation: Conversation,
                   started: float, max_tokens: int, results: list[TurnResult]) -> None:
    """One user: waits for the conversation's arrival, then sends its turns one after another."""
    await asyncio.sleep(max(0.0, started + conversation.arrival - time.perf_counter()))
    messages: list[dict] = []
    for number, turn in enumerate(conversation.turns):
        messages.append(_user_message(turn.image_urls, turn.text))
        body = {"model": SERVED_MODEL, "messages": messages, "max_tokens": max_tokens, "ignore_eos": True,
                "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}
        outcome = TurnResult(index, number, conversation.kind)
        outcome.result = await send(client, url, headers, json.dumps(body).encode())
        results.append(outcome)
        if not outcome.result.success:
            for later in range(number + 1, len(conversation.turns)):
                results.append(TurnResult(index, later, conversation.kind, RequestResult(error="not sent")))
            return
        messages.append({"role": "assistant", "content": outcome.result.text})
        if number < len(conversation.think):
            await asyncio.sleep(conversation.think[number])


async def play(base_url: str, traffic: list[Conversation], max_tokens: int, timeout: float) -> tuple[list, float]:
    url = base_url.rstrip("/") + "/v1/chat/completions"
    headers = {"Content-Type": "application/json"}
    results: list[TurnResult] = []
    limits = httpx.Limits(max_connections=1024, max_keepalive_connections=1024)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=30.0), limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(converse(client, url, headers, i, c, started, max_tokens, results)
                               for i, c in enumerate(traffic)))
        elapsed = time.perf_counter() - started
    return results, elapsed


@dataclass
class Targets:
    ttft: float
    long_ttft: float
    pause: float

    def met(self, outcome: TurnResult) -> bool:
        bound = self.long_ttft if outcome.kind == "long" else self.ttft
        return outcome.result.success and outcome.result.ttft <= bound and outcome.longest_pause <= self.pause


def percentile(values: list[float], p: float) -> float:
    return float(np.percentile(values, p)) if values else math.nan


def summarise(results: list[TurnResult], elapsed: float, targets: Targets) -> dict:
    ok = [r for r in results if r.result.success]
    good = [r for r in results if targets.met(r)]
    summary = {
        "requests": len(results), "completed": len(ok), "failed": len(results) - len(ok),
        "within_target": len(good), "elapsed_s": elapsed, "goodput": len(good) / elapsed if elapsed else 0.0,
        "within_target_share_of_accepted": len(good) / len(ok) if ok else 0.0,
        "itl_p99_ms": 1000 * percentile([g for r in ok for g in r.result.itl], 99),
        "longest_pause_max_s": max((r.longest_pause for r in ok), default=math.nan),
    }
    for kind in MIX:
        mine = [r for r in results if r.kind == kind]
        done = [r for r in mine if r.result.success]
        summary[kind] = {
            "requests": len(mine), "completed": len(done), "within_target": sum(targets.met(r) for r in mine),
            "ttft_p50_s": percentile([r.result.ttft for r in done], 50),
            "ttft_p99_s": percentile([r.result.ttft for r in done], 99),
            "longest_pause_p99_s": percentile([r.longest_pause for r in done], 99),
        }
    return summary


def system_names(args) -> list[str]:
    return [*args.systems, *(variant.partition("=")[0] for variant in args.ours_variant)]


def server_for(name: str, args, model: Path) -> Server:
    """`name`'s server; RuntimeError if it cannot run here (no vLLM 0.23 environment)."""
    log = args.out_dir / f"chat-{name}.log"
    if name == "vllm023":
        from . import vllm023

        python = vllm023.python(args.vllm023_venv)
        checkpoint = vllm023.prepare_checkpoint(model)
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(args.vllm023_kv_cache_gib)}
        return Server(name, lambda port: vllm023.server_command(python, checkpoint, port, SERVED_MODEL,
                                                                shlex.split(args.vllm023_args)),
                      log, vllm023.server_env(python, env))
    variants = dict(variant.partition("=")[::2] for variant in args.ours_variant)
    flags = ["--seed", "0", *shlex.split(variants.get(name, ""))]
    return Server(name, lambda port: our_server_command(model, port, *flags), log)


def run(args) -> dict:
    model = args.model or checkpoint_for(args.preset)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    targets = Targets(args.ttft_target, args.long_ttft_target, args.pause_target)
    traffics = {rate: build_traffic(rate, args.duration, args.seed) for rate in args.rates}
    runs: dict = {}
    for name in system_names(args):
        server = None
        try:
            server = server_for(name, args, model)
            print(f"[{name}] starting: {shlex.join(server.command)}", file=sys.stderr)
            ready = server.start(args.start_timeout)
            for rate, traffic in traffics.items():
                print(f"[{name}] rate {rate}/s: {len(traffic)} conversations", file=sys.stderr)
                results, elapsed = asyncio.run(play(server.url, traffic, args.max_tokens, args.request_timeout))
                runs[(name, rate)] = {"summary": summarise(results, elapsed, targets), "ready_s": ready,
                                      "results": [asdict(r) for r in results]}
        except RuntimeError as e:
            print(f"[{name}] FAILED: {e}", file=sys.stderr)
            runs[(name, None)] = {"error": str(e)}
        finally:
            if server is not None:
                server.stop()
    (args.out_dir / "chat-traffic.json").write_text(json.dumps(
        {f"{name}@{rate}": run for (name, rate), run in runs.items()}, indent=2) + "\n")
    return runs


def table(runs: dict) -> list[str]:
    lines = ["| system | rate /s | requests | completed | within target | share of accepted | goodput req/s "
             "| question TTFT p50 / p99 s | chat TTFT p50 / p99 s | long TTFT p50 s | ITL p99 ms | longest pause s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (name, rate), run in runs.items():
        if "error" in run:
            lines.append(f"| {name} | | FAILED: {run['error']} |" + " |" * 9)
            continue
        s = run["summary"]
        lines.append(
            f"| {name} | {rate:g} | {s['requests']} | {s['completed']} | {s['within_target']} "
            f"| {s['within_target_share_of_accepted']:.0%} | {s['goodput']:.3f} "
            f"| {s['question']['ttft_p50_s']:.2f} / {s['question']['ttft_p99_s']:.2f} "
            f"| {s['chat']['ttft_p50_s']:.2f} / {s['chat']['ttft_p99_s']:.2f} | {s['long']['ttft_p50_s']:.1f} "
            f"| {s['itl_p99_ms']:.0f} | {s['longest_pause_max_s']:.2f} |")
    return lines


def plot(runs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for (name, rate), run in runs.items():
        if "error" in run:
            continue
        ok = [r["result"] for r in run["results"] if r["result"]["success"] and r["kind"] != "long"]
        for axis, values in ((left, [r["ttft"] for r in ok]), (right, [max(r["itl"], default=0.0) for r in ok])):
            values = np.sort(values)
            axis.plot(values, np.arange(1, len(values) + 1) / max(1, len(values)), label=f"{name} @ {rate:g}/s")
    for axis, label in ((left, "TTFT (s)"), (right, "longest pause in the stream (s)")):
        axis.set_xscale("log")
        axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        axis.set_xlabel(label)
        axis.set_ylabel("share of requests (question and chat turns)")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)
    fig.suptitle("Chat traffic: latency CDFs")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(runs: dict, args) -> list[str]:
    info = machine()
    traffic = {rate: build_traffic(rate, args.duration, args.seed) for rate in args.rates}
    return [
        "Written by `python -m qwen_vl.benchmarks.chat_traffic`; every figure is measured.",
        "",
        "```bash",
        shlex.join(["python", "-m", "qwen_vl.benchmarks.chat_traffic", *args.argv]),
        "```",
        "",
        f"- checkpoint `{args.preset or args.model}`; {args.duration:g} s of arrivals per rate, seed {args.seed}: "
        + "; ".join(f"{rate:g}/s: {len(c)} conversations, {sum(len(x.turns) for x in c)} requests"
                    for rate, c in traffic.items()),
        f"- targets: TTFT <= {args.ttft_target:g} s ({args.long_ttft_target:g} s for the long prompts), "
        f"longest pause <= {args.pause_target:g} s; {args.max_tokens} output tokens per request",
        f"- machine: {info['nproc']} CPUs, load average at the end {' / '.join(map(str, info['load_average']))}; "
        f"date {time.strftime('%Y-%m-%d %H:%M %Z')}",
        "",
        *table(runs),
        "",
        f"![latency CDFs]({os.path.relpath(args.plot, args.markdown.parent)})",
    ]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m qwen_vl.benchmarks.chat_traffic",
                                     description=__doc__.split("\n\n")[0])
    add_run_arguments(parser)
    parser.add_argument("--systems", nargs="+", default=["ours"], choices=["ours", "vllm023"])
    parser.add_argument("--ours-variant", action="append", default=[], metavar="NAME=FLAGS",
                        help="this server with these flags, reported as NAME (repeatable)")
    parser.add_argument("--vllm023-venv", default=os.environ.get("QWEN_VL_VLLM023_VENV"),
                        help="vLLM 0.23's environment (scripts/setup-vllm023.sh; env QWEN_VL_VLLM023_VENV)")
    parser.add_argument("--vllm023-args", default="--dtype bfloat16 --max-model-len 2048 --max-num-seqs 32 "
                        "--max-num-batched-tokens 2048 --seed 0",
                        help="vLLM 0.23's engine flags (its best setting)")
    parser.add_argument("--vllm023-kv-cache-gib", type=int, default=4,
                        help="vLLM 0.23's KV cache (VLLM_CPU_KVCACHE_SPACE; unset, it asks for 92%% of the RAM)")
    parser.add_argument("--rates", type=float, nargs="+", default=[0.25, 0.5], help="conversations per second")
    parser.add_argument("--duration", type=float, default=90.0, help="seconds of arrivals per rate")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--ttft-target", type=float, default=4.0)
    parser.add_argument("--long-ttft-target", type=float, default=30.0)
    parser.add_argument("--pause-target", type=float, default=1.5)
    parser.add_argument("--plot", type=Path, default=Path("docs/chat-traffic.png"))
    return parser


def main(argv: list[str] | None = None) -> None:
    args = parse_run_arguments(build_parser(), argv)
    runs = run(args)
    plot(runs, args.plot)
    lines = report(runs, args)
    replace_section(args.markdown, SECTION, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
