"""Write a randomly initialised checkpoint in the exact layout of Qwen/Qwen-VL-Chat.

The real weights cannot be downloaded here, so tests, demos and benchmarks run on checkpoints
that differ from the real one only in sizes and values: same file names, JSON files, tensor
names, shapes (relative to the config) and sharded index. Values are scaled so activations stay
O(1) through the layers, and every norm gain and bias is randomised, so a misplaced norm or a
dropped bias changes the output instead of hiding behind ones and zeros.

    python -m qwen_vl.model_executor.checkpoint OUT_DIR --preset tiny [--seed N] [--bin] [--no-safetensors]
        [--shards N] [--dtype bfloat16]
"""

import argparse
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from qwen_vl.model_executor.cache import cache_dir
from qwen_vl.model_executor.config import QWenConfig
from qwen_vl.model_executor.tokenizer import TIKTOKEN_FILE, VOCAB_SIZE, qwen_tiktoken_path

# Config overrides on top of the real checkpoint's config (QWenConfig's defaults).
# `visual` entries are merged into the real visual dict. The adapter has output_dim // 128 heads
# and feeds the decoder directly, so output_dim == hidden_size and output_dim >= 128; and
# width != output_dim, or the original has no kv_proj (it is an identity then).
PRESETS: dict[str, dict] = {
    # Tests: loads in seconds. The vocabulary stays real-sized (the tokenizer is real).
    "tiny": {
        "hidden_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "kv_channels": 64,
        "intermediate_size": 512,
        "visual": {"width": 128, "layers": 2, "heads": 4, "mlp_ratio": 2.0, "output_dim": 256},
    },
    # CPU benchmarks: compute dominates the overheads, under 1 GB on disk in bf16.
    "small": {
        "hidden_size": 1024,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "kv_channels": 128,
        "intermediate_size": 5504,
        "visual": {"width": 512, "layers": 6, "heads": 8, "mlp_ratio": 4.0, "output_dim": 1024},
    },
    # The real widths and head counts (ViT 1664 wide, 16 heads, MLP 8192; decoder 4096 wide, 32
    # heads, MLP 11008; adapter 32 heads), few layers: the shapes tensor parallelism splits on
    # GPUs, tested here. About 3.5 GB in bf16, 7.1 GB loaded in float32 (mostly the vocabulary).
    "real-widths": {"num_hidden_layers": 2, "visual": {"layers": 1}},
    # Real sizes (about 19 GB in bf16): GPU micro-benchmarks only.
    "real": {},
}

# The JSON files next to the weights, as published (the config's sizes come from the preset).
_CONFIG_METADATA = {
    "_name_or_path": "./",
    "architectures": ["QWenLMHeadModel"],
    "auto_map": {
        "AutoConfig": "configuration_qwen.QWenConfig",
        "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel",
    },
    "model_type": "qwen",
    "transformers_version": "4.31.0",
}
GENERATION_CONFIG = {
    "chat_format": "chatml",
    "do_sample": True,
    "eos_token_id": 151643,
    "max_new_tokens": 512,
    "max_window_size": 6144,
    "pad_token_id": 151643,
    "top_k": 0,
    "top_p": 0.3,
    "transformers_version": "4.31.0",
}
TOKENIZER_CONFIG = {
    "model_max_length": 8192,
    "tokenizer_class": "QWenTokenizer",
    "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]},
}

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

Init = Callable[[torch.Generator], torch.Tensor]


def config_dict(preset: str = "tiny", dtype: str = "bfloat16") -> dict:
    """config.json for a preset: every key of the real one, the preset's sizes."""
    defaults = QWenConfig()
    config = {name: getattr(defaults, name) for name in QWenConfig.__annotations__}
    overrides = PRESETS[preset]
    config.update({k: v for k, v in overrides.items() if k != "visual"})
    config["visual"] = {**config["visual"], **overrides.get("visual", {})}
    config.update(_CONFIG_METADATA, torch_dtype=dtype)
    return dict(sorted(config.items()))


def sincos_table(dim: int, grid: int) -> torch.Tensor:
    """The adapter's fixed 2D sin-cos table, (grid * grid, dim), positions in row-major order.

    As the original (MAE's formula): the first dim/2 channels encode the column, the last
    dim/2 the row; each half is sin then cos of pos * omega_i, omega_i = 10000^(-i / (dim/4)).
    """
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1).double() * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(cols), encode(rows)], dim=1).float()


def _normal(shape: tuple[int, ...], std: float) -> Init:
    return lambda gen: torch.randn(shape, generator=gen) * std


def _matrix(shape: tuple[int, ...]) -> Init:
    # std 1/sqrt(fan_in): unit-variance inputs give unit-variance outputs.
    return _normal(shape, math.prod(shape[1:]) ** -0.5)


def _gain(size: int) -> Init:
    return lambda gen: 1 + 0.2 * torch.randn(size, generator=gen)


def _bias(size: int) -> Init:
    return _normal((size,), 0.1)


def _lm_head(vocab: int, hidden: int) -> Init:
    def init(gen: torch.Generator) -> torch.Tensor:
        weight = _matrix((vocab, hidden))(gen)
        # Rows past the tokenizer's vocabulary are padding: a logit of 0 is never the argmax
        # of ~150k unit-variance logits, so a random model only emits ids the tokenizer decodes.
        weight[VOCAB_SIZE:] = 0
        return weight

    return init


def tensor_specs(config: dict) -> dict[str, tuple[tuple[int, ...], Init]]:
    """Every tensor of the checkpoint, in the real order: name -> (shape, initialiser)."""
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    projection = config["num_attention_heads"] * config["kv_channels"]
    ff = config["intermediate_size"] // 2
    visual = config["visual"]
    width, out = visual["width"], visual["output_dim"]
    mlp = int(width * visual["mlp_ratio"])
    patch = visual["patch_size"]
    queries = 256  # a 16x16 grid of adapter queries; the patch grid's table is also 16x16

    specs = {"transformer.wte.weight": ((vocab, hidden), _normal((vocab, hidden), 1.0))}
    for i in range(config["num_hidden_layers"]):
        p = f"transformer.h.{i}."
        specs |= {
            p + "ln_1.weight": ((hidden,), _gain(hidden)),
            p + "attn.c_attn.weight": ((3 * projection, hidden), _matrix((3 * projection, hidden))),
            p + "attn.c_attn.bias": ((3 * projection,), _bias(3 * projection)),
            p + "attn.c_proj.weight": ((hidden, projection), _matrix((hidden, projection))),
            p + "ln_2.weight": ((hidden,), _gain(hidden)),
            p + "mlp.w1.weight": ((ff, hidden), _matrix((ff, hidden))),
            p + "mlp.w2.weight": ((ff, hidden), _matrix((ff, hidden))),
            p + "mlp.c_proj.weight": ((hidden, ff), _matrix((hidden, ff))),
        }
    specs["transformer.ln_f.weight"] = ((hidden,), _gain(hidden))

    v = "transformer.visual."
    specs |= {
        v + "conv1.weight": ((width, 3, patch, patch), _matrix((width, 3, patch, patch))),
        v + "positional_embedding": ((queries, width), _normal((queries, width), 0.5)),
        v + "ln_pre.weight": ((width,), _gain(width)),
        v + "ln_pre.bias": ((width,), _bias(width)),
    }
    for i in range(visual["layers"]):
        p = f"{v}transformer.resblocks.{i}."
        specs |= {
            p + "ln_1.weight": ((width,), _gain(width)),
            p + "ln_1.bias": ((width,), _bias(width)),
            p + "attn.in_proj.weight": ((3 * width, width), _matrix((3 * width, width))),
            p + "attn.in_proj.bias": ((3 * width,), _bias(3 * width)),
            p + "attn.out_proj.weight": ((width, width), _matrix((width, width))),
            p + "attn.out_proj.bias": ((width,), _bias(width)),
            p + "ln_2.weight": ((width,), _gain(width)),
            p + "ln_2.bias": ((width,), _bias(width)),
            p + "mlp.c_fc.weight": ((mlp, width), _matrix((mlp, width))),
            p + "mlp.c_fc.bias": ((mlp,), _bias(mlp)),
            p + "mlp.c_proj.weight": ((width, mlp), _matrix((width, mlp))),
            p + "mlp.c_proj.bias": ((width,), _bias(width)),
        }
    a = v + "attn_pool."
    table = sincos_table(out, 16)
    specs |= {
        a + "query": ((queries, out), _normal((queries, out), 1.0)),
        a + "pos_embed": ((queries, out), lambda gen: table.clone()),
        a + "kv_proj.weight": ((out, width), _matrix((out, width))),
        a + "ln_q.weight": ((out,), _gain(out)),
        a + "ln_q.bias": ((out,), _bias(out)),
        a + "ln_kv.weight": ((out,), _gain(out)),
        a + "ln_kv.bias": ((out,), _bias(out)),
        a + "attn.in_proj_weight": ((3 * out, out), _matrix((3 * out, out))),
        a + "attn.in_proj_bias": ((3 * out,), _bias(3 * out)),
        a + "attn.out_proj.weight": ((out, out), _matrix((out, out))),
        a + "attn.out_proj.bias": ((out,), _bias(out)),
        v + "ln_post.weight": ((out,), _gain(out)),
        v + "ln_post.bias": ((out,), _bias(out)),
        # Applied as x @ proj: fan-in is the first dimension (square anyway).
        v + "proj": ((out, out), _normal((out, out), out**-0.5)),
    }
    specs["lm_head.weight"] = ((vocab, hidden), _lm_head(vocab, hidden))
    return specs


def _check_sizes(config: dict) -> None:
    visual = config["visual"]
    if visual["output_dim"] != config["hidden_size"]:
        raise ValueError("visual.output_dim must equal hidden_size (the adapter feeds the decoder)")
    if visual["output_dim"] < 128 or visual["output_dim"] % 128:
        raise ValueError("visual.output_dim must be a multiple of 128 (adapter heads of 128 dims)")
    if visual["width"] == visual["output_dim"]:
        raise ValueError("visual.width must differ from output_dim (else the original has no kv_proj)")


def _shards(specs: dict, itemsize: int, num_shards: int) -> list[list[str]]:
    """Consecutive tensors split into up to num_shards groups of about equal bytes.

    A tensor goes to the shard its middle byte falls in, so the two vocabulary-sized matrices
    (first and last) land in different shards rather than leaving one empty.
    """
    sizes = {name: math.prod(shape) * itemsize for name, (shape, _) in specs.items()}
    total = sum(sizes.values())
    groups: list[list[str]] = [[] for _ in range(num_shards)]
    start = 0
    for name, size in sizes.items():
        groups[min(num_shards - 1, (2 * start + size) * num_shards // (2 * total))].append(name)
        start += size
    return [group for group in groups if group]


def _generator(seed: int, name: str) -> torch.Generator:
    # One stream per tensor: values do not depend on the shard layout or the file format.
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def write_checkpoint(
    out_dir: str | os.PathLike,
    preset: str = "tiny",
    seed: int = 0,
    safetensors: bool = True,
    bin_shards: bool = False,
    num_shards: int = 2,
    dtype: str = "bfloat16",
) -> Path:
    """Write config, tokenizer files and random weights to out_dir; return it.

    Weights go to `model-0000K-of-0000N.safetensors` (+ `model.safetensors.index.json`) and/or,
    with bin_shards, `pytorch_model-0000K-of-0000N.bin` (+ `pytorch_model.bin.index.json`).
    Shards are generated one at a time, so memory holds one shard, not the model.
    """
    if not (safetensors or bin_shards):
        raise ValueError("nothing to write: enable safetensors or bin_shards")
    config = config_dict(preset, dtype)
    _check_sizes(config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json", GENERATION_CONFIG)
    _write_json(out / "tokenizer_config.json", TOKENIZER_CONFIG)
    shutil.copyfile(qwen_tiktoken_path(), out / TIKTOKEN_FILE)

    torch_dtype = DTYPES[dtype]
    specs = tensor_specs(config)
    groups = _shards(specs, torch_dtype.itemsize, num_shards)
    formats = [("model", "safetensors")] * safetensors + [("pytorch_model", "bin")] * bin_shards
    weight_maps: dict[str, dict[str, str]] = {ext: {} for _, ext in formats}
    total_size = 0
    for k, names in enumerate(groups, start=1):
        tensors = {}
        for name in names:
            shape, init = specs[name]
            tensors[name] = init(_generator(seed, name)).to(torch_dtype).contiguous()
            assert tuple(tensors[name].shape) == shape, name
            total_size += tensors[name].nbytes
        for prefix, ext in formats:
            filename = f"{prefix}-{k:05d}-of-{len(groups):05d}.{ext}"
            if ext == "safetensors":
                save_file(tensors, out / filename, metadata={"format": "pt"})
            else:
                torch.save(tensors, out / filename)
            weight_maps[ext] |= dict.fromkeys(names, filename)
    for prefix, ext in formats:
        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_maps[ext].items()))}
        _write_json(out / f"{prefix}.{ext}.index.json", index)
    return out


def demo_checkpoint() -> Path:
    """The built-in demo checkpoint (tiny preset, seed 0), written into the user cache on first use.

    Written into a temporary directory and renamed into place, so a process never sees half a
    checkpoint; when several write at once, the first rename wins and the others discard theirs.
    """
    target = cache_dir() / "demo-tiny"
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-tiny-", dir=target.parent))
    try:
        write_checkpoint(tmp, preset="tiny", seed=0)
        tmp.rename(target)
    except OSError:
        if not target.is_dir():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m qwen_vl.model_executor.checkpoint",
        description="Write a random checkpoint in the exact Qwen-VL-Chat layout.",
    )
    parser.add_argument("out_dir", type=Path, help="directory to write (created if missing)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="sizes (default: tiny)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--bin", action="store_true", help="also write pytorch_model-*.bin shards")
    parser.add_argument("--no-safetensors", action="store_true", help="do not write safetensors shards")
    parser.add_argument("--shards", type=int, default=2, help="number of weight shards (default: 2)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="(default: bfloat16)")
    args = parser.parse_args(argv)
    out = write_checkpoint(
        args.out_dir,
        preset=args.preset,
        seed=args.seed,
        safetensors=not args.no_safetensors,
        bin_shards=args.bin,
        num_shards=args.shards,
        dtype=args.dtype,
    )
    print(out)


if __name__ == "__main__":
    main()
