"""The demo model's weights file, as `qwen_vl.demo.train` writes it.

One small file: every tensor of the trained model in bfloat16, except that of the 151,936-row
embedding and LM head it holds only the rows the demo's conversations use (`vocab_ids`, a few
hundred). qwen_vl.testing.demo_checkpoint expands it into a checkpoint in Qwen-VL-Chat's exact
layout; the file shipped in the package (qwen_vl/testing/qwen-vl-demo.safetensors) is the one
the server serves when no --model is given.

    python -m qwen_vl.demo.weights WEIGHTS_FILE OUT_DIR   # expands a file into a checkpoint
"""

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from qwen_vl.testing.demo_checkpoint import write_trained_checkpoint


def save(model, out: Path, metadata: dict) -> None:
    """The trained model (qwen_vl.demo.network.TrainableQwenVL) as the weights file."""
    tensors = {name: tensor.detach().to(torch.bfloat16).contiguous() for name, tensor in model.state_dict().items()}
    tensors["vocab_ids"] = model.vocab.clone()
    tmp = out.with_suffix(".tmp")
    # One metadata entry: safetensors writes a dict's entries in no fixed order, and the same run
    # must write the same bytes.
    save_file(tensors, tmp, metadata={"training": json.dumps(metadata, sort_keys=True)})
    tmp.replace(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m qwen_vl.demo.weights", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("weights", type=Path, help="the file qwen_vl.demo.train wrote")
    parser.add_argument("out_dir", type=Path, help="the checkpoint directory to write")
    args = parser.parse_args(argv)
    print(write_trained_checkpoint(args.out_dir, args.weights))


if __name__ == "__main__":
    main()
