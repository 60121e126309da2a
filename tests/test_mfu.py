"""The benchmarks' FLOP counts (qwen_vl.benchmarks.mfu) against torch's own FLOP counter running
the reference model: the formulas must count exactly the matrix products the model does."""

import time

import pytest
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from qwen_vl.benchmarks import mfu
from qwen_vl.testing.reference import preprocess


def counted(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_vision_flops_match_the_reference(reference, tiny_checkpoint):
    shapes = mfu.Shapes.from_checkpoint(tiny_checkpoint)
    assert shapes.vit_width != shapes.output_dim  # the adapter's kv projection is counted too
    pixels = torch.stack([preprocess(Image.new("RGB", (448, 448), c)) for c in ("red", "blue")])
    with torch.no_grad():
        assert counted(lambda: reference.transformer.visual(pixels[:1])) == mfu.vision_flops(shapes)
        assert counted(lambda: reference.transformer.visual(pixels)) == 2 * mfu.vision_flops(shapes)


def test_decoding_step_flops_match_the_reference(reference, tiny_checkpoint):
    shapes = mfu.Shapes.from_checkpoint(tiny_checkpoint)
    cache = reference.new_cache()
    reference([11, 22, 33, 44, 55], cache=cache)
    # One token after five: projections, attention over six positions, one row of logits.
    step = counted(lambda: reference([66], cache=cache))
    assert step == mfu.decoder_linear_flops(shapes) + mfu.attention_flops(shapes, 6) + mfu.lm_head_flops(shapes)


def test_request_flops_sum_the_steps_the_reference_takes(reference, tiny_checkpoint):
    """A request fed one position at a time through the reference (each step sees every
    position before it: causal attention) costs what request_flops says, once the logits
    of prompt positions that sample nothing are taken out."""
    shapes = mfu.Shapes.from_checkpoint(tiny_checkpoint)
    prompt, output = [5, 6, 7, 8], 3
    cache, total = reference.new_cache(), 0
    for token in prompt + [9] * (output - 1):  # the last generated token is never fed back
        total += counted(lambda: reference([token], cache=cache))
    unsampled_logits = (len(prompt) - 1) * mfu.lm_head_flops(shapes)
    assert mfu.request_flops(shapes, len(prompt), output, images=0) == total - unsampled_logits
    with_image = mfu.request_flops(shapes, len(prompt), output, images=1)
    assert with_image == total - unsampled_logits + mfu.vision_flops(shapes)


def test_run_flops_count_completed_requests_only(tiny_checkpoint):
    shapes = mfu.Shapes.from_checkpoint(tiny_checkpoint)
    result = {"input_lens": [290, 300, 0], "output_lens": [64, 64, 0], "input_images": [1, 1, 1],
              "request_errors": ["", "", "http_503"]}
    expected = mfu.request_flops(shapes, 290, 64, 1) + mfu.request_flops(shapes, 300, 64, 1)
    assert mfu.run_flops(shapes, result) == expected


def per_second(work, rounds: int = 5, seconds: float = 0.05) -> float:
    """Calls of `work` per second on one thread, timed here: the best of `rounds` runs of about
    `seconds` each (other work on the machine only ever slows a run down)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        best = 0.0
        for _ in range(rounds):
            calls, began = 0, time.perf_counter()
            while (elapsed := time.perf_counter() - began) < seconds:
                work()
                calls += 1
            best = max(best, calls / elapsed)
        return best
    finally:
        torch.set_num_threads(previous)


def test_matmul_peak_is_torch_mms_flops_per_second_as_timed_here():
    peak = mfu.matmul_peak("float32", threads=1, sizes=(128, 256), seconds=0.05)
    assert peak["threads"] == 1 and set(peak["flops_by_size"]) == {128, 256}
    assert peak["peak_flops"] == max(peak["flops_by_size"].values())
    # A product of two 256 x 256 matrices is 2 * 256^3 FLOPs. Best of three, as timed here.
    measured = max(mfu.matmul_peak("float32", threads=1, sizes=(256,), seconds=0.05)["peak_flops"] for _ in range(3))
    a = torch.randn(256, 256)
    assert 2 / 3 < measured / (per_second(lambda: torch.mm(a, a)) * 2 * 256**3) < 3 / 2


def test_matmul_peak_stops_at_a_size_whose_one_product_outlasts_its_time(monkeypatch):
    """A CPU that emulates the dtype (torch's bfloat16 product without AVX-512 BF16) would spend
    minutes on the larger sizes: the sweep stops at the first size whose one product takes
    longer than `seconds`, timed by that product."""
    real_mm = torch.mm

    def slower_from_128(a, b):
        if a.shape[0] >= 128:
            time.sleep(0.2)
        return real_mm(a, b)

    monkeypatch.setattr(torch, "mm", slower_from_128)
    peak = mfu.matmul_peak("float32", threads=1, sizes=(256, 64, 128), seconds=0.05)
    assert list(peak["flops_by_size"]) == [64, 128]
    assert peak["flops_by_size"][128] <= 2 * 128**3 / 0.2


@pytest.mark.parametrize("native", [True, False], ids=["bf16 products", "no bf16 products"])
def test_the_peak_is_measured_in_the_dtype_the_server_multiplies_in(monkeypatch, native):
    from qwen_vl.model_executor import cpu_products

    monkeypatch.setattr(cpu_products, "native_bfloat16_products", lambda: native)
    assert mfu.product_dtype("bfloat16") == ("bfloat16" if native else "float32")
    assert mfu.product_dtype("float32") == "float32"


def test_decode_step_bytes_are_the_weights_one_token_goes_through(reference, tiny_checkpoint):
    """What a decoding step must read: the reference's projection and LM-head weights (not the
    embedding table, which a step reads one row of, nor the biases and norms, which are tiny),
    then each attended position's key and value in every layer."""
    shapes = mfu.Shapes.from_checkpoint(tiny_checkpoint)
    weights = sum(p.numel() for name, p in reference.named_parameters()
                  if name.endswith(".weight") and (".h." in name and (".attn." in name or ".mlp." in name)
                                                    or name == "lm_head.weight"))
    assert mfu.decode_step_bytes(shapes, 2, keys=0) == 2 * weights
    cache = reference.new_cache()
    reference([11, 22, 33], cache=cache)
    cached = sum(k.numel() + v.numel() for k, v in zip(cache.keys, cache.values))
    assert mfu.decode_step_bytes(shapes, 4, keys=3) - mfu.decode_step_bytes(shapes, 4, keys=0) == 4 * cached


def test_single_stream_ceiling_is_bound_by_compute_or_memory(tiny_checkpoint):
    shapes = mfu.Shapes.from_checkpoint(tiny_checkpoint)
    prompt, output = 290, 64
    # Memory without limit: every FLOP at the peak, so the ceiling is the request's FLOPs at it.
    compute_only = mfu.single_stream_ceiling(shapes, prompt, output, 1, peak_flops=1e11, bandwidth=float("inf"))
    assert compute_only == pytest.approx(output / (mfu.request_flops(shapes, prompt, output, 1) / 1e11))
    # Compute without limit: each step after the first token reads its weights and cache.
    memory_only = mfu.single_stream_ceiling(shapes, prompt, output, 1, peak_flops=float("inf"), bandwidth=1e10)
    step_bytes = sum(mfu.decode_step_bytes(shapes, 2, prompt + step) for step in range(1, output))
    assert memory_only == pytest.approx(output / (step_bytes / 1e10))
    both = mfu.single_stream_ceiling(shapes, prompt, output, 1, peak_flops=1e11, bandwidth=1e10)
    assert both < min(compute_only, memory_only)


def one_image_run(requests: int, prompt: int = 290, output: int = 64) -> dict:
    return {"input_lens": [prompt] * requests, "output_lens": [output] * requests,
            "input_images": [1] * requests, "request_errors": [""] * requests}


def test_a_runs_roofline_is_its_flops_at_the_peak_or_its_steps_bytes_at_the_bandwidth(tiny_checkpoint):
    shapes = mfu.Shapes.from_checkpoint(tiny_checkpoint)
    run = one_image_run(8)
    compute_only = mfu.run_roofline_seconds(shapes, run, 4, peak_flops=1e11, bandwidth=float("inf"))
    assert compute_only == pytest.approx(mfu.run_flops(shapes, run) / 1e11)
    # One at a time, memory-bound: every decoding step of every request reads its weights and cache.
    alone = mfu.run_roofline_seconds(shapes, run, 1, peak_flops=float("inf"), bandwidth=1e10)
    step_bytes = sum(mfu.decode_step_bytes(shapes, 2, 290 + step) for step in range(1, 64))
    assert alone == pytest.approx(8 * step_bytes / 1e10)
    # Four sequences per step share each read of the weights; their caches stay their own.
    weights = mfu.decode_step_bytes(shapes, 2, keys=0)
    four = mfu.run_roofline_seconds(shapes, run, 4, peak_flops=float("inf"), bandwidth=1e10)
    assert four == pytest.approx((8 * step_bytes - 8 * 63 * weights * 3 / 4) / 1e10)
    # Failed requests cost nothing.
    failed = run | {"request_errors": ["http_400"] * 4 + [""] * 4}
    assert mfu.run_roofline_seconds(shapes, failed, 1, 1e11, 1e10) == pytest.approx(
        mfu.run_roofline_seconds(shapes, one_image_run(4), 1, 1e11, 1e10))


def test_read_bandwidth_is_the_bytes_torch_reads_per_second_as_timed_here():
    measured = max(mfu.read_bandwidth(threads=1, mib=8, seconds=0.05) for _ in range(3))
    x = torch.ones(8 * 2**20 // 4)  # 8 MiB of float32, read whole by a sum or a max
    reads = max(per_second(lambda: torch.sum(x)), per_second(lambda: torch.amax(x)))
    assert 2 / 3 < measured / (reads * 8 * 2**20) < 3 / 2


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_decode_step_bytes_of_a_4_bit_checkpoint_are_its_packed_weights_scales_and_zeros(method, tmp_path):
    """A 4-bit checkpoint's step reads the packed projections, a 16-bit scale per group (AWQ: and
    a 4-bit zero point; GPTQ's are the constant 8, which vLLM's kernels do not read) and the LM head."""
    from qwen_vl.testing.checkpoint import write_checkpoint
    from qwen_vl.testing.reference import read_checkpoint

    checkpoint = write_checkpoint(tmp_path, preset="tiny", quantization=method)
    tensors = read_checkpoint(checkpoint)
    suffixes = (".qweight", ".scales") + ((".qzeros",) if method == "awq" else ())
    stored = sum(t.nbytes for name, t in tensors.items() if name.endswith(suffixes)) + tensors["lm_head.weight"].nbytes
    assert mfu.decode_step_bytes(mfu.Shapes.from_checkpoint(checkpoint), 2, keys=0) == stored
