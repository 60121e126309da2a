"""Write a randomly initialised checkpoint in the exact layout of Qwen/Qwen-VL-Chat, or of its
4-bit release Qwen/Qwen-VL-Chat-Int4 (GPTQ), or of an AutoAWQ conversion.

The real weights cannot be downloaded here, so tests, demos and benchmarks run on checkpoints
that differ from the real one only in sizes and values: same file names, JSON files, tensor
names, shapes (relative to the config) and sharded index. Values are scaled so activations stay
O(1) through the layers, and every norm gain and bias is randomised, so a misplaced norm or a
dropped bias changes the output instead of hiding behind ones and zeros.

    python -m qwen_vl.testing.checkpoint OUT_DIR --preset tiny [--seed N] [--bin] [--no-safetensors]
        [--shards N] [--dtype bfloat16] [--quantization gptq|awq [--group-size 128] [--dequantized DIR]]

With --quantization, the decoder's linear layers (QUANTIZED_LINEARS) are quantized to 4 bits by
round to nearest (quantize.py) and stored as the method stores them; everything else (ViT,
adapter, embeddings, norms, LM head, c_attn's bias) in float16, as the Int4 release. GPTQ layers
also carry the all-zero float16 bias AutoGPTQ 0.4 wrote for every layer. --dequantized writes the
same weights unquantized (float32, the 4-bit layers dequantized) in the original layout: what
the reference runs to check a quantized checkpoint.
"""

import argparse
import hashlib
import json
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from qwen_vl.model_executor.config import QWenConfig
from qwen_vl.model_executor.tokenizer import TIKTOKEN_FILE, VOCAB_SIZE, qwen_tiktoken_path
from qwen_vl.testing import quantize

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
    # The trained demo model's sizes (qwen_vl.demo): 224-pixel images (a 16x16 patch grid, the
    # original's position tables without resizing), about 11M parameters besides the vocabulary.
    "demo": {
        "hidden_size": 384,
        "num_hidden_layers": 4,
        "num_attention_heads": 6,
        "kv_channels": 64,
        "intermediate_size": 1536,
        "visual": {"width": 256, "layers": 6, "heads": 4, "mlp_ratio": 3.0, "output_dim": 384, "image_size": 224},
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

# The decoder's linear layers, quantized in Qwen-VL-Chat-Int4 (AutoGPTQ's `inside_layer_modules`
# for Qwen; the visual tower is one of its `outside_layer_modules`, left in float16).
QUANTIZED_LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2", "mlp.c_proj")
# config.json's `quantization_config` per method: Qwen's GPTQ recipe (BaseQuantizeConfig in
# QwenLM/Qwen's run_gptq.py) and AutoAWQ's `to_transformers_dict`; group_size is the writer's.
QUANTIZATION_CONFIGS = {
    "gptq": {
        "bits": 4, "damp_percent": 0.01, "desc_act": False, "model_file_base_name": "model",
        "model_name_or_path": None, "quant_method": "gptq", "static_groups": False, "sym": True,
        "true_sequential": True,
    },
    "awq": {"bits": 4, "modules_to_not_convert": None, "quant_method": "awq", "version": "gemm", "zero_point": True},
}

Init = Callable[[torch.Generator], torch.Tensor]


def config_dict(preset: str = "tiny", dtype: str = "bfloat16", quantization: str | None = None,
                group_size: int = 128) -> dict:
    """config.json for a preset: every key of the real one, the preset's sizes (and, when
    quantized, the method's `quantization_config`)."""
    defaults = QWenConfig()
    config = {name: getattr(defaults, name) for name in QWenConfig.__annotations__}
    overrides = PRESETS[preset]
    config.update({k: v for k, v in overrides.items() if k != "visual"})
    config["visual"] = {**config["visual"], **overrides.get("visual", {})}
    config.update(_CONFIG_METADATA, torch_dtype=dtype)
    if quantization is not None:
        config["quantization_config"] = {**QUANTIZATION_CONFIGS[quantization], "group_size": group_size}
    return dict(sorted(config.items()))


def quantized_layer(name: str) -> str | None:
    """`transformer.h.N.mlp.w1` for that layer's `.weight`, if the layer is one of QUANTIZED_LINEARS."""
    layer, _, suffix = name.rpartition(".")
    if suffix == "weight" and layer.startswith("transformer.h.") and layer.split(".", 3)[3] in QUANTIZED_LINEARS:
        return layer
    return None


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
    dtype: str | None = None,
    quantization: str | None = None,
    group_size: int = 128,
    dequantized_dir: str | os.PathLike | None = None,
) -> Path:
    """Write config, tokenizer files and random weights to out_dir; return it.

    Weights go to `model-0000K-of-0000N.safetensors` (+ `model.safetensors.index.json`) and/or,
    with bin_shards, `pytorch_model-0000K-of-0000N.bin` (+ `pytorch_model.bin.index.json`).
    Shards are generated one at a time, so memory holds one shard, not the model. `dtype`
    (default bfloat16, float16 when quantized) is that of every tensor left unquantized.
    """
    if not (safetensors or bin_shards):
        raise ValueError("nothing to write: enable safetensors or bin_shards")
    if quantization is not None and quantization not in quantize.METHODS:
        raise ValueError(f"unknown quantization {quantization!r}: one of {', '.join(quantize.METHODS)}")
    if dequantized_dir is not None and quantization is None:
        raise ValueError("a dequantized copy needs a quantized checkpoint: set quantization")
    dtype = dtype or ("float16" if quantization else "bfloat16")
    config = config_dict(preset, dtype, quantization, group_size)
    _check_sizes(config)
    specs = tensor_specs(config)
    if quantization is not None:
        for name, (shape, _) in specs.items():
            if quantized_layer(name):
                quantize.check_shape(name, *shape, group_size)
    out = write_files(out_dir, config)
    dequantized = None
    if dequantized_dir is not None:
        plain = {k: v for k, v in config.items() if k != "quantization_config"}
        dequantized = write_files(dequantized_dir, {**plain, "torch_dtype": "float32"})

    torch_dtype = DTYPES[dtype]
    groups = _shards(specs, torch_dtype.itemsize, num_shards)
    formats = [("model", "safetensors")] * safetensors + [("pytorch_model", "bin")] * bin_shards
    shards = ShardWriter(out, formats, len(groups))
    plain_shards = ShardWriter(dequantized, [("model", "safetensors")], len(groups)) if dequantized else None
    for k, names in enumerate(groups, start=1):
        tensors, plain_tensors = {}, {}
        for name in names:
            shape, init = specs[name]
            value = init(_generator(seed, name))
            assert tuple(value.shape) == shape, name
            layer = quantized_layer(name) if quantization else None
            if layer is None:
                tensors[name] = value.to(torch_dtype).contiguous()
                if plain_shards:
                    plain_tensors[name] = tensors[name].float()
                continue
            quantized = quantize.quantize(value, quantization, group_size)
            for suffix, packed in quantize.packed_tensors(quantized, quantization).items():
                tensors[f"{layer}.{suffix}"] = packed
            if quantization == "gptq" and f"{layer}.bias" not in specs:
                # AutoGPTQ 0.4 built every quantized layer with a bias; Qwen's are zero but for c_attn.
                tensors[f"{layer}.bias"] = torch.zeros(shape[0], dtype=torch.float16)
            if plain_shards:
                plain_tensors[name] = quantized.dequantize()
        shards.write(k, tensors)
        if plain_shards:
            plain_shards.write(k, plain_tensors)
    shards.close()
    if plain_shards:
        plain_shards.close()
    return out


def write_files(out_dir: str | os.PathLike, config: dict) -> Path:
    """The checkpoint's directory with its JSON files and tokenizer, weights to come."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json", GENERATION_CONFIG)
    _write_json(out / "tokenizer_config.json", TOKENIZER_CONFIG)
    shutil.copyfile(qwen_tiktoken_path(), out / TIKTOKEN_FILE)
    return out


class ShardWriter:
    """Writes numbered weight shards in each format, then each format's index."""

    def __init__(self, out: Path, formats: list[tuple[str, str]], count: int):
        self.out, self.formats, self.count = out, formats, count
        self.weight_maps: dict[str, dict[str, str]] = {ext: {} for _, ext in formats}
        self.total_size = 0

    def write(self, k: int, tensors: dict[str, torch.Tensor]) -> None:
        self.total_size += sum(t.nbytes for t in tensors.values())
        for prefix, ext in self.formats:
            filename = f"{prefix}-{k:05d}-of-{self.count:05d}.{ext}"
            if ext == "safetensors":
                save_file(tensors, self.out / filename, metadata={"format": "pt"})
            else:
                torch.save(tensors, self.out / filename)
            self.weight_maps[ext] |= dict.fromkeys(tensors, filename)

    def close(self) -> None:
        for prefix, ext in self.formats:
            index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(self.weight_maps[ext].items()))}
            _write_json(self.out / f"{prefix}.{ext}.index.json", index)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m qwen_vl.testing.checkpoint",
        description="Write a random checkpoint in the exact Qwen-VL-Chat layout.",
    )
    parser.add_argument("out_dir", type=Path, help="directory to write (created if missing)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="sizes (default: tiny)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--bin", action="store_true", help="also write pytorch_model-*.bin shards")
    parser.add_argument("--no-safetensors", action="store_true", help="do not write safetensors shards")
    parser.add_argument("--shards", type=int, default=2, help="number of weight shards (default: 2)")
    parser.add_argument("--dtype", choices=sorted(DTYPES),
                        help="of the unquantized tensors (default: bfloat16; float16 with --quantization)")
    parser.add_argument("--quantization", choices=quantize.METHODS,
                        help="4-bit decoder layers in Qwen-VL-Chat-Int4's layout (gptq) or AutoAWQ's (awq)")
    parser.add_argument("--group-size", type=int, default=128, help="inputs per 4-bit scale (default: 128)")
    parser.add_argument("--dequantized", type=Path, metavar="DIR",
                        help="also write the same weights unquantized (float32) to DIR, for the reference")
    args = parser.parse_args(argv)
    out = write_checkpoint(
        args.out_dir,
        preset=args.preset,
        seed=args.seed,
        safetensors=not args.no_safetensors,
        bin_shards=args.bin,
        num_shards=args.shards,
        dtype=args.dtype,
        quantization=args.quantization,
        group_size=args.group_size,
        dequantized_dir=args.dequantized,
    )
    print(out)


if __name__ == "__main__":
    main()
