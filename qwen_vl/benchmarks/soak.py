"""Soak and overload runs of this server (load tests, not CI):

    python -m qwen_vl.benchmarks.soak soak     [--minutes 10] [--concurrency 16]
    python -m qwen_vl.benchmarks.soak overload [--saturation 16] [--factor 4]

`soak`: the server at saturation (closed loop) for a fixed time; reports the
server's RSS (its whole process tree: API process, engine core, worker) at the
start and the end, requests completed and errors.

`overload`: the server started with `--max-pending-requests` = the saturating
concurrency, then driven at `factor` times that concurrency; nothing may be
lost: every request either completes or gets its 503 (with Retry-After), and
RSS stays flat.

Both start their own server on a free loopback port (the random `tiny`
checkpoint by default, `--preset small` for the benchmark one) and stop it by
PID at the end.
"""

import argparse
import asyncio
import json
import os
import threading
import time
from pathlib import Path

from .harness import Server, checkpoint_for, our_server_command, resident_bytes
from .load import benchmark
from .workloads import build_workload

MODEL_NAME = "qwen-vl-soak"


class RssSampler(threading.Thread):
    def __init__(self, pid: int, every: float = 5.0):
        super().__init__(daemon=True)
        self.pid, self.every = pid, every
        self.samples: list[tuple[float, int]] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        started = time.monotonic()
        while not self.stopped.is_set():
            self.samples.append((time.monotonic() - started, resident_bytes(self.pid)))
            self.stopped.wait(self.every)


def start_server(args, extra: list[str], log: Path) -> Server:
    model = checkpoint_for(args.preset)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    server = Server("ours", lambda port: our_server_command(model, port, "--max-model-len", "2048", *extra,
                                                            served_model_name=MODEL_NAME), log, env)
    server.start(timeout=600)
    return server


def run(args, extra: list[str], concurrency: int, duration: float | None, num_requests: int | None) -> dict:
    log = Path(args.out) / f"{args.mode}-server.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    server = start_server(args, extra, log)
    try:
        requests = build_workload(args.workload, 64, seed=args.seed, max_tokens=args.max_tokens)
        warm = build_workload(args.workload, 4, seed=args.seed + 1, max_tokens=args.max_tokens)
        asyncio.run(benchmark(server.url, MODEL_NAME, warm, concurrency=4, num_requests=4, progress=False))
        sampler = RssSampler(server.process.pid)
        sampler.start()
        result = asyncio.run(benchmark(server.url, MODEL_NAME, requests, concurrency=concurrency,
                                       duration=duration, num_requests=num_requests, seed=args.seed,
                                       progress=not args.no_progress))
        sampler.stopped.set()
        sampler.join()
    finally:
        server.stop()
    rss = [value for _, value in sampler.samples]
    sent = result["completed"] + result["failed"]
    return {
        "mode": args.mode,
        "concurrency": concurrency,
        "server_args": extra,
        "sent": sent,
        "completed": result["completed"],
        "errors": result["errors"],
        "rejected_503": result["errors"].get("http_503", 0),
        "lost": sent - result["completed"] - result["errors"].get("http_503", 0),
        "duration_s": result["duration"],
        "request_throughput": result["request_throughput"],
        "output_throughput": result["output_throughput"],
        "median_ttft_ms": result["median_ttft_ms"],
        "p99_ttft_ms": result["p99_ttft_ms"],
        "rss_start_mib": rss[0] / 2**20,
        "rss_end_mib": rss[-1] / 2**20,
        "rss_max_mib": max(rss) / 2**20,
        "rss_samples": len(rss),
        # One sample a minute: growth that levels off is a cache filling, not a leak.
        "rss_mib_each_minute": [round(value / 2**20) for t, value in sampler.samples if t % 60 < sampler.every],
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["soak", "overload"])
    parser.add_argument("--preset", default="tiny", choices=["tiny", "small"], help="checkpoint preset")
    parser.add_argument("--workload", default="single-image")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--minutes", type=float, default=10.0, help="soak: how long")
    parser.add_argument("--concurrency", type=int, default=16, help="soak: requests in flight")
    parser.add_argument("--saturation", type=int, default=16, help="overload: the saturating concurrency")
    parser.add_argument("--factor", type=int, default=4, help="overload: multiple of the saturation sent")
    parser.add_argument("--requests", type=int, default=400, help="overload: requests sent")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--server-arg", action="append", default=[],
                        help="more server arguments, e.g. --server-arg=--mm-processor-cache-gb=0")
    parser.add_argument("--out", default="bench-results", help="logs and the JSON result go here")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    if args.mode == "soak":
        result = run(args, list(args.server_arg), args.concurrency, args.minutes * 60, None)
    else:
        extra = ["--max-pending-requests", str(args.saturation), *args.server_arg]
        result = run(args, extra, args.saturation * args.factor, None, args.requests)
    path = Path(args.out) / f"{args.mode}.json"
    path.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
