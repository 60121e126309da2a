"""Vision stage micro-benchmark: images/second through the ViT + adapter.

    python -m qwen_vl.benchmarks.vision --preset small --batch 1 8 32
    python -m qwen_vl.benchmarks.vision --preset real --batch 1     # ViT-bigG sizes: minutes on a CPU

Compares our `qwen_vl.model_executor.visual.VisionTransformer` (vLLM's parallel linear layers,
on a CPU the original's scores-softmax-values attention; run here in a one-rank vLLM distributed
group) with the reference's `VisionTransformer` (qwen_vl/testing/reference.py, plain PyTorch) on the same
weights: the `tiny` and `small` presets load them from a checkpoint written into the project
cache; `real` builds the real sizes (48 layers of width 1664) with random weights, identical
in both models, without writing a checkpoint. Input: random pixels, already preprocessed
[batch, 3, 448, 448]. Each figure is the median of `--repeats` timed forwards after one untimed
one. `--attention-forms` also times our tower with each attention form (`fused`, of the ViT's
blocks and of the adapter together: the original's explicit scores, or torch's fused kernel),
alternating.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from .harness import checkpoint_for, free_port

VISUAL_PREFIX = "transformer.visual."


def init_vllm_single_rank() -> None:
    """A one-process, one-rank vLLM distributed state: enough for its parallel layers."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel

    with set_current_vllm_config(VllmConfig()):
        init_distributed_environment(world_size=1, rank=0, distributed_init_method=f"tcp://127.0.0.1:{free_port()}",
                                     local_rank=0, backend="gloo")
        initialize_model_parallel(1)


def visual_config(preset: str) -> tuple[dict, dict[str, torch.Tensor] | None]:
    """(the checkpoint's visual dict, its `transformer.visual.*` tensors or None for random)."""
    from qwen_vl.testing.checkpoint import config_dict

    if preset == "real":
        return config_dict("real")["visual"], None
    return checkpoint_visual(checkpoint_for(preset))


def checkpoint_visual(model_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(the visual dict of `model_dir`'s config, its `transformer.visual.*` tensors)."""
    from qwen_vl.testing.reference import read_checkpoint

    state = {k[len(VISUAL_PREFIX):]: v for k, v in read_checkpoint(model_dir).items() if k.startswith(VISUAL_PREFIX)}
    return json.loads((model_dir / "config.json").read_text())["visual"], state


def build_models(visual: dict, state: dict | None, dtype: torch.dtype):
    from vllm.config import VllmConfig, set_current_vllm_config

    from qwen_vl.model_executor.cpu_products import use_float32_products
    from qwen_vl.model_executor.visual import VisionTransformer as Ours
    from qwen_vl.testing.reference import VisionTransformer as Reference

    reference = Reference(visual)
    if state is None:
        # Random weights at unit-ish scale; both models get the very same tensors.
        generator = torch.Generator().manual_seed(0)
        state = {name: torch.randn(p.shape, generator=generator) * p.shape[-1] ** -0.5
                 for name, p in reference.state_dict().items()}
    reference.load_state_dict(state, strict=True)
    with set_current_vllm_config(VllmConfig()):
        ours = Ours(visual, prefix="transformer.visual")
    params = dict(ours.named_parameters())
    for name, tensor in state.items():
        param = params[name]
        loader = getattr(param, "weight_loader", None)
        if loader is not None:
            loader(param, tensor)
        else:
            param.data.copy_(tensor)
    ours = ours.to(dtype).eval()
    # What vLLM's loader does after loading: on CPU this picks (and may pre-pack for) the GEMM kernel.
    for module in ours.modules():
        method = getattr(module, "quant_method", None)
        if method is not None:
            method.process_weights_after_loading(module)
    use_float32_products(ours)  # and then our model's hook (cpu_products.py)
    return ours, reference.to(dtype).eval()


@torch.inference_mode()
def images_per_second(model, batch: int, repeats: int, dtype: torch.dtype, size: int) -> float:
    pixels = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch)).to(dtype)
    model(pixels)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        model(pixels)
        times.append(time.perf_counter() - started)
    return batch / statistics.median(times)


def attention_layers(model) -> list:
    """The modules of the tower that choose an attention form: the ViT's blocks and the adapter."""
    from qwen_vl.model_executor.visual import Adapter, VisualAttention

    return [m for m in model.modules() if isinstance(m, (VisualAttention, Adapter))]


def attention_forms(model, batch: int, repeats: int, dtype: torch.dtype, size: int, rounds: int = 3) -> dict:
    """img/s of `model` with each attention form, alternating for `rounds` rounds (this VM's
    speed drifts by 10-20% within minutes: separate runs cannot compare them)."""
    layers = attention_layers(model)
    default = [m.fused for m in layers]
    out = {"scores_images_per_s": [], "fused_images_per_s": []}
    for _ in range(rounds):
        for fused in (False, True):
            for m in layers:
                m.fused = fused
            rate = images_per_second(model, batch, repeats, dtype, size)
            out[f"{'fused' if fused else 'scores'}_images_per_s"].append(round(rate, 2))
    for m, fused in zip(layers, default):
        m.fused = fused
    return out


def shown(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m qwen_vl.benchmarks.vision",
                                     description="ViT + adapter images/s: ours vs the reference, same weights.")
    parser.add_argument("--preset", action="append", choices=("tiny", "small", "real"), default=None,
                        help="repeat for several (default small)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--attention-forms", action="store_true",
                        help="also time our tower with torch's fused attention (fused) against the original's form "
                             "(scores), alternating, in this one process")
    parser.add_argument("--ours-only", action="store_true",
                        help="time our tower alone, not the reference (in bfloat16 on an x86 CPU without AVX-512 "
                             "the reference's products are emulated: minutes an image at the real sizes)")
    parser.add_argument("--result-json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    init_vllm_single_rank()
    rows = []
    for preset in args.preset or ["small"]:
        if preset == "real":
            print("preset real: ViT-bigG sizes (about 1.9 B parameters); each forward takes minutes on a CPU",
                  file=sys.stderr)
        visual, state = visual_config(preset)
        ours, reference = build_models(visual, state, dtype)
        size = visual["image_size"]
        with torch.inference_mode():
            probe = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0)).to(dtype)
            difference = None if args.ours_only else (ours(probe).float() - reference(probe).float()).abs().max().item()
        for batch in args.batch:
            row = {"preset": preset, "dtype": args.dtype, "batch": batch, "threads": torch.get_num_threads(),
                   "ours_images_per_s": images_per_second(ours, batch, args.repeats, dtype, size),
                   "reference_images_per_s": None if args.ours_only
                   else images_per_second(reference, batch, args.repeats, dtype, size),
                   "max_abs_difference": difference}
            row["speedup"] = None if args.ours_only else row["ours_images_per_s"] / row["reference_images_per_s"]
            if args.attention_forms:
                row.update(attention_forms(ours, batch, args.repeats, dtype, size))
                print(f"{preset} batch {batch}: attention forms, img/s per round: scores {row['scores_images_per_s']}, "
                      f"fused {row['fused_images_per_s']}", file=sys.stderr)
            rows.append(row)
            print(f"{preset} batch {batch}: ours {row['ours_images_per_s']:.3f} img/s, "
                  f"reference {shown(row['reference_images_per_s'], '.2f')} img/s ({shown(row['speedup'], '.2f')}x)",
                  file=sys.stderr)
    lines = ["| preset | dtype | batch | ours img/s | reference img/s | ours / reference | max abs diff |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['preset']} | {r['dtype']} | {r['batch']} | {r['ours_images_per_s']:.3f} "
              f"| {shown(r['reference_images_per_s'], '.2f')} | {shown(r['speedup'], '.2f')}x "
              f"| {shown(r['max_abs_difference'], '.2e')} |" for r in rows]
    print("\n".join(lines))
    if args.result_json:
        args.result_json.write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
