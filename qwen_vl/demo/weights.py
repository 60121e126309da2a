"""The demo model's weights file, and the checkpoint it expands into.

`qwen_vl.demo.train` writes one small file: every tensor of the trained model in bfloat16, except
that of the 151,936-row embedding and LM head it holds only the rows the demo's conversations use
(`vocab_ids`, a few hundred); every other row is zero (qwen_vl.demo.network explains why that is
the model that was trained). `write_demo_checkpoint` expands it into a checkpoint in
Qwen-VL-Chat's exact layout (config, generation config, tokenizer files, one safetensors shard
and its index), which the plugin serves like any other: `--model DIR`.

    python -m qwen_vl.demo.weights WEIGHTS_FILE OUT_DIR
"""

import argparse
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qwen_vl.testing.checkpoint import ShardWriter, config_dict, write_files

VOCAB_TENSORS = ("transformer.wte.weight", "lm_head.weight")


def save(model, out: Path, metadata: dict) -> None:
    """The trained model (qwen_vl.demo.network.TrainableQwenVL) as the weights file."""
    tensors = {name: tensor.detach().to(torch.bfloat16).contiguous() for name, tensor in model.state_dict().items()}
    tensors["vocab_ids"] = model.vocab.clone()
    tmp = out.with_suffix(".tmp")
    # One metadata entry: safetensors writes a dict's entries in no fixed order, and the same run
    # must write the same bytes.
    save_file(tensors, tmp, metadata={"training": json.dumps(metadata, sort_keys=True)})
    tmp.replace(out)


def checkpoint_tensors(weights: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, by its name, the vocabulary rows scattered into zeros."""
    config = config_dict("demo")
    with safe_open(weights, "pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    vocab = tensors.pop("vocab_ids")
    for name in VOCAB_TENSORS:
        full = torch.zeros(config["vocab_size"], config["hidden_size"], dtype=torch.bfloat16)
        full[vocab] = tensors[name]
        tensors[name] = full
    return tensors


def training_metadata(weights: Path) -> dict:
    with safe_open(weights, "pt") as f:
        return json.loads(f.metadata()["training"])


def write_demo_checkpoint(out_dir: Path, weights: Path) -> Path:
    out = write_files(out_dir, config_dict("demo"))
    shards = ShardWriter(out, [("model", "safetensors")], 1)
    shards.write(1, dict(sorted(checkpoint_tensors(weights).items())))
    shards.close()
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m qwen_vl.demo.weights", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("weights", type=Path, help="the file qwen_vl.demo.train wrote")
    parser.add_argument("out_dir", type=Path, help="the checkpoint directory to write")
    args = parser.parse_args(argv)
    print(write_demo_checkpoint(args.out_dir, args.weights))


if __name__ == "__main__":
    main()
