"""4-bit against 16-bit weights on this machine: memory, first-token latency, decoding speed, and
how close one stream's decoding comes to the bound set by reading the weights.

    python -m qwen_vl.benchmarks.int4 --models BF16_DIR INT4_DIR [--concurrency 1 4 16]

Each checkpoint is served by our server (compare's harness and settings, one server at a time)
under the one-image chat workload. Per checkpoint it reports: the checkpoint's bytes on disk; the
resident memory of the server's processes once it is ready (KV cache included, its size given);
TTFT p50 at concurrency 1; ITL p50 at 1 (one sequence's decoding step); output tok/s at each
level; and the decoding ceiling: the bytes one step must read (`mfu.decode_step_bytes`: the
projections as stored, 4-bit with their scales or 16-bit, the LM head, the cache) over the read
bandwidth measured in the same run, with the measured ITL's ratio to it. For a pair, the
speed-up of decoding against the ratio of bytes per step.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

from qwen_vl.benchmarks import compare, mfu

PROMPT_TOKENS = 290  # a one-image chat of the single-image workload: the image's 258 positions and the text


def checkpoint_bytes(model: Path) -> int:
    return sum(f.stat().st_size for f in model.iterdir() if f.suffix in (".safetensors", ".bin"))


def measure(model: Path, args, out_dir: Path, env: dict) -> dict:
    """One checkpoint under load, as `compare` measures a system (it reads the server's memory once ready)."""
    runs = compare.run_server("ours", model, args, out_dir, env)
    failed = [r["error"] for r in runs if "error" in r]
    if failed:
        raise RuntimeError(f"{model}: {failed[0]}")
    return {"model": str(model), "disk_bytes": checkpoint_bytes(model), "rss_bytes": runs[0]["ready_rss_bytes"],
            "startup_s": runs[0]["startup_s"], "levels": {r["concurrency"]: r for r in runs}}


def report(results: list[dict], bandwidth: float, args) -> list[str]:
    levels = args.concurrency
    lines = [f"- memory read bandwidth, measured before and after (the higher): {bandwidth / 1e9:.1f} GB/s; "
             f"KV cache {args.kv_cache_gib} GiB in every server", "",
             "| checkpoint | on disk GB | resident GB | TTFT p50 c=1 ms | ITL p50 c=1 ms | bytes per step GB "
             "| ceiling ms | ITL / ceiling | " + " | ".join(f"tok/s c={c}" for c in levels) + " |",
             "|---|---|---|---|---|---|---|---|" + "---|" * len(levels)]
    for result in results:
        shapes = mfu.Shapes.from_checkpoint(Path(result["model"]))
        one = result["levels"][levels[0]]
        step = mfu.decode_step_bytes(shapes, 2, PROMPT_TOKENS + args.max_tokens // 2)
        result["step_bytes"], result["ceiling_ms"] = step, step / bandwidth * 1e3
        lines.append(
            f"| {Path(result['model']).name} | {result['disk_bytes'] / 1e9:.2f} | {result['rss_bytes'] / 1e9:.2f} "
            f"| {one['median_ttft_ms']:.0f} | {one['median_itl_ms']:.1f} | {step / 1e9:.2f} | {result['ceiling_ms']:.1f} "
            f"| {one['median_itl_ms'] / result['ceiling_ms']:.2f}x | "
            + " | ".join(f"{result['levels'][c]['output_throughput']:.1f}" for c in levels) + " |")
    if len(results) == 2 and levels[0] == 1:
        full, small = results
        speedup = full["levels"][1]["median_itl_ms"] / small["levels"][1]["median_itl_ms"]
        bytes_ratio = full["step_bytes"] / small["step_bytes"]
        lines += ["", f"- decoding speed-up at c=1 (ITL p50 {Path(full['model']).name} / {Path(small['model']).name}): "
                      f"{speedup:.2f}x; ratio of bytes per step: {bytes_ratio:.2f}x; speed-up / byte ratio: "
                      f"{speedup / bytes_ratio:.0%}"]
    return lines


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m qwen_vl.benchmarks.int4", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, nargs="+", required=True,
                        help="checkpoint directories, e.g. a 16-bit one then its 4-bit twin")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--min-requests", type=int, default=8)
    parser.add_argument("--kv-cache-gib", type=int, default=2)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=False,
                        help="(default: compiled, as the server's default)")
    parser.add_argument("--out-dir", type=Path, default=Path("bench-results/int4"))
    args = parser.parse_args(argv)
    harness = compare.build_parser().parse_args([
        "--concurrency", *map(str, args.concurrency), "--max-tokens", str(args.max_tokens),
        "--min-requests", str(args.min_requests), "--kv-cache-gib", str(args.kv_cache_gib),
        "--max-model-len", str(args.max_model_len), "--no-progress",
        "--enforce-eager" if args.enforce_eager else "--no-enforce-eager"])
    args.out_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(args.kv_cache_gib)}
    bandwidth = mfu.read_bandwidth()
    results = []
    for model in args.models:
        began = time.perf_counter()
        results.append(measure(model, harness, args.out_dir, env))
        print(f"[{model.name}] done in {time.perf_counter() - began:.0f} s", file=sys.stderr)
    bandwidth = max(bandwidth, mfu.read_bandwidth())
    harness.kv_cache_gib = args.kv_cache_gib
    lines = report(results, bandwidth, harness)
    (args.out_dir / "results.json").write_text(json.dumps({"bandwidth": bandwidth, "results": results}, indent=2) + "\n")
    print("\n".join(lines))
    return results


if __name__ == "__main__":
    main()
