"""The side-by-side report's machine figures (qwen_vl.benchmarks.compare): the MFU of each run and
what the target of 1.3x vLLM 0.23's output would take on the machine that ran it. Synthetic runs: these
check the arithmetic and the wiring, never a timing. Each level also gets its share of the roofline."""

import pytest

from qwen_vl.benchmarks import compare, mfu


def run(system: str, concurrency: int, requests: int, duration: float, **figures) -> dict:
    return {"system": system, "concurrency": concurrency, "duration": duration, "completed": requests, "failed": 0,
            "request_throughput": requests / duration, "output_throughput": 64 * requests / duration,
            "median_ttft_ms": 500.0, "p99_ttft_ms": 600.0, "median_tpot_ms": 30.0, "median_itl_ms": 30.0,
            "p99_itl_ms": 40.0, "input_lens": [290] * requests, "output_lens": [64] * requests,
            "input_images": [1] * requests, "request_errors": [""] * requests, **figures}


@pytest.fixture
def limits(tiny_checkpoint):
    return compare.Limits(mfu.Shapes.from_checkpoint(tiny_checkpoint), peak_flops=1e11, bandwidth=2e10, dtype_bytes=2)


def test_utilisation_is_the_requests_flops_per_second_over_the_peak(limits):
    r = run("ours", 16, requests=8, duration=4.0)
    assert compare.utilisation(limits, r) == pytest.approx(8 * mfu.request_flops(limits.shapes, 290, 64, 1) / 4.0 / 1e11)
    # The offline engine records no per-request figures: no MFU rather than a guess.
    offline = {k: v for k, v in r.items() if k not in ("input_lens", "output_lens", "input_images", "request_errors")}
    assert compare.utilisation(limits, offline) is None
    rows = compare.report_rows([r, {**offline, "system": "offline"}], [16], limits)
    assert rows[0].endswith("| MFU | roofline share |")
    assert rows[2].endswith(f"| {compare.utilisation(limits, r):.1%} | {compare.roofline_share(limits, r, 16):.0%} |")
    assert rows[3].endswith("| n/a | n/a |")


def test_the_roofline_share_is_the_runs_least_time_over_its_time(limits):
    r = run("ours", 4, requests=8, duration=4.0)
    least = mfu.run_roofline_seconds(limits.shapes, r, 4, 1e11, 2e10, 2)
    assert compare.roofline_share(limits, r, 4) == pytest.approx(least / 4.0)
    # More sequences per step share the weights' reads: the bound is lower, the share smaller.
    assert compare.roofline_share(limits, r, 16) <= compare.roofline_share(limits, r, 4)


def test_the_lines_against_vllm023_say_what_1_3x_would_take(limits):
    peer_one = run("vllm023", 1, 8, 24.0)
    for key, failed in (("input_lens", 0), ("output_lens", 0), ("input_images", 0), ("request_errors", "http_503")):
        peer_one[key] = peer_one[key] + [failed]  # a failed request: no part of the single-stream ceiling
    runs = [run("ours", 1, 8, 20.0), peer_one, run("ours", 16, 64, 40.0), run("vllm023", 16, 64, 44.0)]
    lines = compare.vllm023_target_lines(runs, [1, 16], limits)
    one, sixteen = lines[2], lines[3]
    # Several at once: 1.3x the peer's tok/s is 1.3x its MFU.
    implied = 1.3 * compare.utilisation(limits, runs[3])
    assert sixteen.startswith("- concurrency 16: output tok/s 1.10x (>= 1.3x: NOT met)")
    assert sixteen.endswith(f"{1.3 * 64 * 64 / 44.0:.1f} tok/s would be {implied:.0%} MFU")
    # One at a time: against the single-stream ceiling of the peer's own requests.
    ceiling = mfu.single_stream_ceiling(limits.shapes, 290, 64, 1, 1e11, 2e10, 2)
    needed = 1.3 * 64 * 8 / 24.0
    assert one.endswith(f"{needed:.1f} tok/s would be {needed / ceiling:.0%} of this machine's single-stream ceiling "
                        f"({ceiling:.1f})")


def test_a_ratio_just_short_of_the_target_is_not_shown_as_the_target(limits):
    runs = [run("ours", 16, 64, 10.0), run("vllm023", 16, 64, 10.0, output_throughput=64 * 64 / 10.0 / 1.2996)]
    [line] = compare.vllm023_target_lines(runs, [16], limits)[2:]
    assert line.startswith("- concurrency 16: output tok/s 1.2996x (>= 1.3x: NOT met)")
