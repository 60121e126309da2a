"""Model FLOP utilisation: the FLOPs a run's requests needed, counted from the checkpoint's
config.json, over what this machine's matrix multiply can do in the same dtype.

    python -m qwen_vl.benchmarks.mfu --model DIR      # the counts for one request, and the peak

What is counted (multiply-adds as 2 FLOPs, matrix products only; norms, activations, softmax
and rotary are left out, as is usual for MFU):

- vision, per image: the patch convolution, every ViT block (fused QKV, 1024 x 1024 attention,
  output projection, MLP), the adapter (kv projection, its Q/K/V/out projections, 256 x 1024
  cross-attention) and the final projection;
- decoder, per token: each layer's QKV, output and MLP projections, and causal attention over
  the positions the token sees (prompt tokens in prefill, then every generated token but the
  last, which is sampled and never fed back);
- the LM head once per generated token (vLLM computes logits for sampled positions only).

`tests/test_mfu.py` checks these counts against torch's own FLOP counter running the reference
model. The peak is torch's bf16 (or float32) matrix multiply on square matrices, with as many
threads as the server computes with, measured in the same run as the load; float32's for a bf16
model on an x86 CPU without AVX-512, where the server multiplies in float32 (`product_dtype`).

One request at a time is bound by memory as much as by compute: each decoding step reads every
projection weight, the LM head and the sequence's cache (`decode_step_bytes`), and the steps of one
request cannot overlap. `single_stream_ceiling` is the output rate a single stream could reach at
best on this machine: its prefill at the matmul peak, then every step at the slower of its FLOPs
at that peak and its bytes at the read bandwidth (`read_bandwidth`, measured like the peak).
`run_roofline_seconds` is the same bound for a whole load run at a concurrency: the run's time
over it is the share of the machine's roofline the server reached.
"""

import argparse
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

PATCHES = 1024  # (448 / 14)^2
DTYPE_BYTES = {"bfloat16": 2, "float32": 4}
QUERIES = 256  # the adapter's learned queries: positions per image


@dataclass(frozen=True)
class Shapes:
    hidden: int
    layers: int
    ffn: int  # each of w1, w2: intermediate_size // 2
    vocab: int
    vit_width: int
    vit_layers: int
    vit_mlp: int
    patch: int
    output_dim: int
    # A 4-bit checkpoint's decoder projections (GPTQ, AWQ): bits per weight, inputs per scale,
    # and whether each group also stores a 4-bit zero point (AWQ). None: 16-bit like the rest.
    linear_bits: int | None = None
    group_size: int = 0
    zero_points: bool = False

    @classmethod
    def from_config(cls, config: dict) -> "Shapes":
        visual = config["visual"]
        quantization = config.get("quantization_config") or {}
        return cls(
            hidden=config["hidden_size"], layers=config["num_hidden_layers"], ffn=config["intermediate_size"] // 2,
            vocab=config["vocab_size"], vit_width=visual["width"], vit_layers=visual["layers"],
            vit_mlp=int(visual["width"] * visual["mlp_ratio"]), patch=visual["patch_size"],
            output_dim=visual["output_dim"], linear_bits=quantization.get("bits"),
            group_size=quantization.get("group_size", 0), zero_points=quantization.get("quant_method") == "awq",
        )

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> "Shapes":
        return cls.from_config(json.loads((Path(path) / "config.json").read_text()))


def vision_flops(s: Shapes) -> int:
    """One image through the ViT, the adapter and the final projection."""
    n, w, d, q = PATCHES, s.vit_width, s.output_dim, QUERIES
    conv = 2 * n * 3 * s.patch * s.patch * w
    block = 2 * n * w * 3 * w + 4 * n * n * w + 2 * n * w * w + 4 * n * w * s.vit_mlp
    kv_proj = 2 * n * w * d if w != d else 0
    adapter = kv_proj + 2 * q * d * d + 2 * 2 * n * d * d + 4 * q * n * d + 2 * q * d * d
    return conv + s.vit_layers * block + adapter + 2 * q * d * d


def decoder_linear_flops(s: Shapes) -> int:
    """The projections of every layer, for one token."""
    h = s.hidden
    return s.layers * (2 * h * 3 * h + 2 * h * h + 3 * 2 * h * s.ffn)


def attention_flops(s: Shapes, keys: int) -> int:
    """Scores and weighted values of every layer, for one query that sees `keys` positions."""
    return s.layers * 4 * keys * s.hidden


def lm_head_flops(s: Shapes) -> int:
    return 2 * s.hidden * s.vocab


def request_flops(s: Shapes, prompt_tokens: int, output_tokens: int, images: int) -> int:
    """A whole request: its images, its prompt, its decoding steps and its sampled logits."""
    if output_tokens <= 0:
        return 0
    fed = prompt_tokens + output_tokens - 1  # every position that goes through the decoder
    causal_keys = fed * (fed + 1) // 2  # position i (from 0) attends to i + 1 positions
    return (images * vision_flops(s) + fed * decoder_linear_flops(s)
            + s.layers * 4 * s.hidden * causal_keys + output_tokens * lm_head_flops(s))


def run_flops(s: Shapes, result: dict) -> int:
    """The FLOPs of a load run's completed requests (`load.benchmark`'s per-request lists)."""
    return sum(request_flops(s, p, o, i) for p, o, i, error in zip(
        result["input_lens"], result["output_lens"], result["input_images"], result["request_errors"]) if not error)


def projection_bytes(s: Shapes, dtype_bytes: int) -> float:
    """Bytes of every layer's projection weights as the kernels read them: 16-bit values, or
    4-bit ones with a 16-bit scale (and for AWQ a 4-bit zero point) per group of inputs."""
    weights = decoder_linear_flops(s) // 2
    if s.linear_bits is None:
        return dtype_bytes * weights
    group = s.group_size if s.group_size > 0 else s.hidden
    per_group = dtype_bytes + (s.linear_bits / 8 if s.zero_points else 0)
    return weights * s.linear_bits / 8 + weights / group * per_group


def decode_step_bytes(s: Shapes, dtype_bytes: int, keys: int) -> float:
    """The least one decoding step of one sequence reads from memory: every layer's projection
    weights, the LM head, and the keys and values of the `keys` positions it attends to."""
    return projection_bytes(s, dtype_bytes) + dtype_bytes * (lm_head_flops(s) // 2 + s.layers * 2 * s.hidden * keys)


def single_stream_ceiling(s: Shapes, prompt_tokens: int, output_tokens: int, images: int, peak_flops: float,
                          bandwidth: float, dtype_bytes: int = 2) -> float:
    """Output tokens per second one request at a time could reach on this machine, at best.

    Its images and prompt at the matmul peak (the first token's logits included), then each
    further token a step that takes at least its FLOPs at the peak and at least its bytes
    (`decode_step_bytes`) at the read bandwidth: the steps of one request cannot overlap."""
    seconds = request_flops(s, prompt_tokens, 1, images) / peak_flops  # up to the first token
    for step in range(1, output_tokens):
        keys = prompt_tokens + step
        flops = decoder_linear_flops(s) + attention_flops(s, keys) + lm_head_flops(s)
        seconds += max(flops / peak_flops, decode_step_bytes(s, dtype_bytes, keys) / bandwidth)
    return output_tokens / seconds


def run_roofline_seconds(s: Shapes, result: dict, concurrency: int, peak_flops: float, bandwidth: float,
                         dtype_bytes: int = 2) -> float:
    """The least time a load run's completed requests (`load.benchmark`'s per-request lists) could
    take on this machine with at most `concurrency` sequences per decoding step: every step's
    FLOPs at the matmul peak or its bytes at the read bandwidth, whichever is slower, summed over
    the run's steps. A step reads the projection weights and the LM head once, whatever the
    sequences it decodes, and each sequence's keys and values; the decode tokens need at least
    decode_tokens / concurrency steps. Spreading the images and prompts evenly over those steps
    (chunked prefill mixes them in) is the cheapest schedule, since a sum of maxima is at least
    the maximum of the sums: the whole run's FLOPs at the peak or its bytes at the bandwidth."""
    steps, kv_bytes = 0, 0
    for prompt, output, error in zip(result["input_lens"], result["output_lens"], result["request_errors"]):
        if error or output <= 1:
            continue
        steps += output - 1
        # Step j (1..output-1) attends to prompt + j positions.
        keys = (output - 1) * prompt + output * (output - 1) // 2
        kv_bytes += dtype_bytes * s.layers * 2 * s.hidden * keys
    weights = projection_bytes(s, dtype_bytes) + dtype_bytes * lm_head_flops(s) // 2
    seconds_of_bytes = (steps / concurrency * weights + kv_bytes) / bandwidth
    return max(run_flops(s, result) / peak_flops, seconds_of_bytes)


def read_bandwidth(threads: int | None = None, mib: int = 1024, seconds: float = 1.0) -> float:
    """Bytes per second torch reads from memory: the better of a sum and a max over a float32
    tensor far larger than the caches, each run for about `seconds`. (This 2-core VM: 29-42 GB/s
    on 2026-12-03; zentorch's matrix-vector products over the model's weights reached about 30.)"""
    import torch

    threads = threads or len(os.sched_getaffinity(0))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    best = 0.0
    try:
        x = torch.ones(mib * 2**20 // 4)
        for read in (torch.sum, torch.amax):
            read(x)  # warm-up: page faults
            runs, began = 0, time.perf_counter()
            while (elapsed := time.perf_counter() - began) < seconds:
                read(x)
                runs += 1
            best = max(best, x.numel() * 4 * runs / elapsed)
    finally:
        torch.set_num_threads(previous)
    return best


def product_dtype(dtype: str) -> str:
    """The dtype the server multiplies a `dtype` model's matrices in: float32 for bfloat16 on an x86
    CPU without AVX-512, where it widens every product of a prefill chunk or an image
    (qwen_vl/model_executor/cpu_products.py), so that the peak to compare with is float32's."""
    from qwen_vl.model_executor.cpu_products import native_bfloat16_products

    return "float32" if dtype == "bfloat16" and not native_bfloat16_products() else dtype


def matmul_peak(dtype: str = "bfloat16", threads: int | None = None, sizes=(1024, 2048, 4096),
                seconds: float = 2.0) -> dict:
    """The best FLOP/s of torch.mm on square matrices of `sizes`, each run for about `seconds`,
    smallest first. A size whose first product alone takes longer than `seconds` is timed by that
    product and ends the sweep: on a CPU without bfloat16 instructions torch's bfloat16 product
    is emulated (0.3-0.9 GFLOP/s on a 2-core AMD Zen 3 without AVX-512, against 138-156 in
    float32, 2026-12-07), where one product of 4096 would take minutes."""
    import torch

    threads = threads or len(os.sched_getaffinity(0))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    best = {}
    try:
        for n in sorted(sizes):
            a = torch.randn(n, n).to(getattr(torch, dtype))
            b = torch.randn(n, n).to(getattr(torch, dtype))
            began = time.perf_counter()
            torch.mm(a, b)  # warm-up: allocation, packing
            if (first := time.perf_counter() - began) > seconds:
                best[n] = 2 * n**3 / first
                break
            runs, began = 0, time.perf_counter()
            while (elapsed := time.perf_counter() - began) < seconds:
                torch.mm(a, b)
                runs += 1
            best[n] = 2 * n**3 * runs / elapsed
    finally:
        torch.set_num_threads(previous)
    return {"dtype": dtype, "threads": threads, "flops_by_size": best, "peak_flops": max(best.values())}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m qwen_vl.benchmarks.mfu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="a checkpoint directory (its config.json)")
    parser.add_argument("--prompt-tokens", type=int, default=290)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--images", type=int, default=1)
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    args = parser.parse_args(argv)
    s = Shapes.from_checkpoint(args.model)
    flops = request_flops(s, args.prompt_tokens, args.output_tokens, args.images)
    print(f"vision per image: {vision_flops(s) / 1e9:.1f} GFLOP; decoder per token: "
          f"{(decoder_linear_flops(s) + lm_head_flops(s)) / 1e9:.2f} GFLOP (+ attention); "
          f"one request ({args.prompt_tokens} prompt, {args.output_tokens} output, {args.images} image(s)): "
          f"{flops / 1e9:.1f} GFLOP")
    peak = matmul_peak(product_dtype(args.dtype))
    sizes = ", ".join(f"{n}: {f / 1e9:.0f}" for n, f in peak["flops_by_size"].items())
    widened = f" (a {args.dtype} model's products on this CPU)" if peak["dtype"] != args.dtype else ""
    print(f"torch.mm {peak['dtype']}{widened}, {peak['threads']} thread(s), GFLOP/s by size: {sizes}")
    bandwidth = read_bandwidth()
    dtype_bytes = DTYPE_BYTES[args.dtype]
    ceiling = single_stream_ceiling(s, args.prompt_tokens, args.output_tokens, args.images, peak["peak_flops"],
                                    bandwidth, dtype_bytes)
    print(f"memory read: {bandwidth / 1e9:.1f} GB/s; a decoding step reads at least "
          f"{decode_step_bytes(s, dtype_bytes, args.prompt_tokens) / 1e6:.0f} MB; one request at a time: "
          f"at most {ceiling:.1f} output tok/s")


if __name__ == "__main__":
    main()
