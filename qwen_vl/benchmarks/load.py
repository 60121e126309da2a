"""Load generator for any OpenAI-compatible chat endpoint: streaming requests over httpx.

    python -m qwen_vl.benchmarks.load --base-url http://127.0.0.1:8000 --model qwen-vl-demo \\
        --workload single-image --num-requests 64 --concurrency 8 --max-tokens 64 --result-json out.json

Closed loop (`--concurrency N`: N requests in flight, each new one sent when one finishes) or
open loop (`--request-rate R`: Poisson arrivals at R requests/s, at most `--concurrency` in
flight if given too). `--num-requests N` sends N timed requests; `--duration S` keeps sending
(the workload's requests, cycled) until S seconds have passed and then waits for those in
flight. `--warmup N` requests go first and are not counted.

Per request: TTFT (first chunk carrying text), the gaps between text chunks (inter-token
latencies: a chunk may carry several tokens, so these are per chunk), end-to-end latency, and
prompt/output tokens from `usage` (`stream_options.include_usage`); TPOT is
(e2e - TTFT) / (output tokens - 1). The result uses `vllm bench serve`'s key names
(`request_throughput`, `output_throughput`, `mean_ttft_ms`, `p99_itl_ms`, `completed`, ...).
"""

import argparse
import asyncio
import json
import math
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np

from .workloads import SAMPLING, WORKLOADS, Request, build_workload

PERCENTILES = (90, 99)
METRICS = ("ttft", "tpot", "itl", "e2el")


@dataclass
class RequestResult:
    success: bool = False
    error: str = ""  # "http_<status>", "timeout", "connection", "protocol"; empty on success
    start: float = 0.0  # perf_counter seconds at send
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)  # seconds between text chunks
    latency: float = 0.0  # end to end, seconds
    prompt_tokens: int = 0
    output_tokens: int = 0
    images: int = 0  # in the request (for FLOP counts)
    text: str = ""  # the answer (a multi-turn client sends it back in the next turn)


def _error_kind(exc: Exception) -> str:
    if isinstance(exc, httpx.TimeoutException):
        return "timeout"
    if isinstance(exc, (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)):
        return "connection"
    return "protocol"


async def send(client: httpx.AsyncClient, url: str, headers: dict, body: bytes) -> RequestResult:
    """One streaming chat request; never raises."""
    result = RequestResult(start=time.perf_counter())
    last = result.start
    chunks = 0
    try:
        async with client.stream("POST", url, content=body, headers=headers) as response:
            if response.status_code != 200:
                await response.aread()
                result.error = f"http_{response.status_code}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                now = time.perf_counter()
                event = json.loads(data)
                if "error" in event:
                    result.error = "protocol"
                    return result
                if event.get("usage"):
                    result.prompt_tokens = event["usage"].get("prompt_tokens") or 0
                    result.output_tokens = event["usage"].get("completion_tokens") or 0
                text = "".join((c.get("delta") or {}).get("content") or "" for c in event.get("choices") or ())
                if not text:
                    continue
                result.text += text
                if chunks == 0:
                    result.ttft = now - result.start
                else:
                    result.itl.append(now - last)
                last = now
                chunks += 1
    except (httpx.HTTPError, json.JSONDecodeError, OSError) as exc:
        result.error = _error_kind(exc)
        return result
    result.latency = time.perf_counter() - result.start
    if chunks == 0:
        result.error = "protocol"
        return result
    # A server without usage in its stream: one token per text chunk, at least.
    result.output_tokens = result.output_tokens or chunks
    result.success = True
    return result


def _stats(name: str, values_s: list[float]) -> dict:
    values = np.asarray(values_s, dtype=np.float64) * 1000 if values_s else np.zeros(1)
    out = {
        f"mean_{name}_ms": float(values.mean()),
        f"median_{name}_ms": float(np.median(values)),
        f"std_{name}_ms": float(values.std()),
    }
    out |= {f"p{p}_{name}_ms": float(np.percentile(values, p)) for p in PERCENTILES}
    return out


def summarise(results: list[RequestResult], duration: float) -> dict:
    """Run-level metrics, `vllm bench serve`'s names; latencies over successful requests."""
    ok = [r for r in results if r.success]
    errors: dict[str, int] = {}
    for r in results:
        if not r.success:
            errors[r.error] = errors.get(r.error, 0) + 1
    total_input = sum(r.prompt_tokens for r in ok)
    total_output = sum(r.output_tokens for r in ok)
    summary = {
        "duration": duration,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": errors,
        "total_input_tokens": total_input,
        "total_output_tokens": total_output,
        "request_throughput": len(ok) / duration if duration else 0.0,
        "output_throughput": total_output / duration if duration else 0.0,
        "total_token_throughput": (total_input + total_output) / duration if duration else 0.0,
    }
    per_metric = {
        "ttft": [r.ttft for r in ok],
        "tpot": [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1],
        "itl": [gap for r in ok for gap in r.itl],
        "e2el": [r.latency for r in ok],
    }
    for name in METRICS:
        summary |= _stats(name, per_metric[name])
    summary |= {
        "input_lens": [r.prompt_tokens for r in results],
        "output_lens": [r.output_tokens for r in results],
        "input_images": [r.images for r in results],
        "ttfts": [r.ttft for r in results],
        "latencies": [r.latency for r in results],
        # The longest gap in each request's stream: the longest pause its reader saw.
        "longest_pauses": [max(r.itl, default=0.0) for r in results],
        "request_errors": [r.error for r in results],
    }
    return summary


async def benchmark(
    base_url: str,
    model: str,
    requests: list[Request],
    *,
    api_key: str | None = None,
    concurrency: int | None = None,
    request_rate: float = math.inf,
    num_requests: int | None = None,
    duration: float | None = None,
    warmup: list[Request] = (),
    seed: int = 0,
    timeout: float = 600.0,
    progress: bool = True,
) -> dict:
    """Send the requests (cycled) and measure. Closed loop when request_rate is inf."""
    if not requests:
        raise ValueError("no requests to send")
    if math.isinf(request_rate) and not concurrency:
        raise ValueError("a closed loop needs a concurrency")
    url = base_url.rstrip("/") + "/v1/chat/completions"
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    bodies = [json.dumps(r.body(model)).encode() for r in requests]  # encoded before timing
    warmup_bodies = [json.dumps(r.body(model)).encode() for r in warmup]
    total = num_requests if duration is None else None
    if total is None and duration is None:
        total = len(bodies)
    slots = concurrency or 1024
    limits = httpx.Limits(max_connections=slots, max_keepalive_connections=slots)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=30.0), limits=limits) as client:
        if warmup_bodies:
            gate = asyncio.Semaphore(concurrency or len(warmup_bodies))

            async def warm(body: bytes) -> None:
                async with gate:
                    await send(client, url, headers, body)

            await asyncio.gather(*(warm(b) for b in warmup_bodies))

        results: list[RequestResult] = []
        bar = _progress_bar(total, duration, progress)
        started = time.perf_counter()
        deadline = started + duration if duration is not None else math.inf
        sent = 0

        def next_index() -> int | None:
            """The next request to send (cycling), or None when the run is over."""
            nonlocal sent
            if (total is not None and sent >= total) or time.perf_counter() >= deadline:
                return None
            sent += 1
            return (sent - 1) % len(bodies)

        async def one(index: int) -> None:
            result = await send(client, url, headers, bodies[index])
            result.images = requests[index].num_images
            results.append(result)
            bar.update(1)

        if math.isinf(request_rate):
            async def worker() -> None:
                while (index := next_index()) is not None:
                    await one(index)

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        else:
            rng = np.random.default_rng(seed)
            gate = asyncio.Semaphore(slots)
            tasks = []

            async def gated(index: int) -> None:
                async with gate:
                    await one(index)

            while (index := next_index()) is not None:
                tasks.append(asyncio.create_task(gated(index)))
                await asyncio.sleep(rng.exponential(1.0 / request_rate))
            await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - started
        bar.close()
    summary = summarise(results, elapsed)
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "backend": "openai-chat",
        "base_url": base_url,
        "model_id": model,
        "num_prompts": len(results),
        "request_rate": request_rate if not math.isinf(request_rate) else "inf",
        "max_concurrency": concurrency,
        "workload": requests[0].kind if len({r.kind for r in requests}) == 1 else "mixed",
        "max_tokens": requests[0].max_tokens,
        "sampling": requests[0].sampling,
        "num_warmups": len(warmup_bodies),
        **summary,
    }


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int | None, duration: float | None, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc="requests" if total else f"requests ({duration:.0f} s)", unit="req", file=sys.stderr)


TABLE_ROWS = (
    ("completed", "completed", "{:d}"),
    ("failed", "failed", "{:d}"),
    ("duration", "duration (s)", "{:.2f}"),
    ("total_input_tokens", "input tokens", "{:d}"),
    ("total_output_tokens", "output tokens", "{:d}"),
    ("request_throughput", "requests/s", "{:.2f}"),
    ("output_throughput", "output tok/s", "{:.1f}"),
    ("total_token_throughput", "total tok/s", "{:.1f}"),
    ("median_ttft_ms", "TTFT p50 (ms)", "{:.1f}"),
    ("p99_ttft_ms", "TTFT p99 (ms)", "{:.1f}"),
    ("median_tpot_ms", "TPOT p50 (ms)", "{:.1f}"),
    ("median_itl_ms", "ITL p50 (ms)", "{:.1f}"),
    ("p99_itl_ms", "ITL p99 (ms)", "{:.1f}"),
    ("median_e2el_ms", "E2E p50 (ms)", "{:.1f}"),
    ("p99_e2el_ms", "E2E p99 (ms)", "{:.1f}"),
)


def markdown_table(result: dict) -> str:
    lines = ["| metric | value |", "|---|---|"]
    for key, label, fmt in TABLE_ROWS:
        if key in result:
            lines.append(f"| {label} | {fmt.format(result[key])} |")
    if result.get("errors"):
        lines.append(f"| errors | {', '.join(f'{k}: {v}' for k, v in sorted(result['errors'].items()))} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m qwen_vl.benchmarks.load",
        description="Streaming load test of an OpenAI-compatible chat endpoint (closed or open loop).",
    )
    parser.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root (without /v1)")
    parser.add_argument("--api-key", default=None, help="sent as a bearer token")
    parser.add_argument("--model", required=True, help="the served model name")
    parser.add_argument("--workload", choices=WORKLOADS, default="single-image", help="see workloads.py")
    parser.add_argument("--num-requests", type=int, default=None, help="timed requests (default 64 without --duration)")
    parser.add_argument("--duration", type=float, default=None, help="send for this many seconds instead")
    parser.add_argument("--concurrency", type=int, default=None, help="requests in flight (closed loop), or the cap")
    parser.add_argument("--request-rate", type=float, default=math.inf, help="Poisson arrivals per second (open loop)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed requests first")
    parser.add_argument("--max-tokens", type=int, default=64, help="output tokens of every request (ignore_eos)")
    parser.add_argument("--sampling", choices=SAMPLING, default="greedy",
                        help="greedy (temperature 0), or checkpoint: no sampling fields, the server's defaults")
    parser.add_argument("--seed", type=int, default=0, help="workload and arrival seed")
    parser.add_argument("--timeout", type=float, default=600.0, help="per-request timeout, s")
    parser.add_argument("--result-json", type=Path, default=None, help="write the result here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if math.isinf(args.request_rate) and not args.concurrency:
        args.concurrency = 1
    if args.num_requests is None and args.duration is None:
        args.num_requests = 64
    pool = args.num_requests or 64
    requests = build_workload(args.workload, pool, seed=args.seed, max_tokens=args.max_tokens, sampling=args.sampling)
    warmup = build_workload(args.workload, args.warmup, seed=args.seed + 1, max_tokens=args.max_tokens,
                            sampling=args.sampling)
    result = asyncio.run(
        benchmark(
            args.base_url, args.model, requests,
            api_key=args.api_key, concurrency=args.concurrency, request_rate=args.request_rate,
            num_requests=args.num_requests, duration=args.duration, warmup=warmup, seed=args.seed,
            timeout=args.timeout, progress=not args.no_progress,
        )
    )
    print(markdown_table(result))
    if args.result_json:
        args.result_json.parent.mkdir(parents=True, exist_ok=True)
        args.result_json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
