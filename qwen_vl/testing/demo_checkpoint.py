"""The built-in demo: a small Qwen-VL-Chat trained here (qwen_vl.demo.train), shipped as one file
in the package and expanded into a checkpoint in the user cache on first use.

The file (`qwen-vl-demo.safetensors`, bfloat16) holds every tensor of the trained model except
that, of the 151,936-row embedding and LM head, it holds only the rows the demo's conversations
use (`vocab_ids`, a few hundred); every other row of the served checkpoint is zero, which is the
model that was trained (qwen_vl.demo.network explains why). Expanded, it is a checkpoint in
Qwen-VL-Chat's exact layout (config, generation config, tokenizer files, one safetensors shard and
its index) that the plugin serves like any other.

Two digests are recorded here: the file's, checked before it is expanded (a damaged file is
refused with a message naming it), and the expanded checkpoint's (every file, name and bytes),
which tests/test_demo_shipped.py checks, so CI sees at once if some machine's torch, safetensors
or tokenizer file would expand other bytes. The cache directory is named by the file's digest:
new weights expand beside the old ones.

    python -m qwen_vl.testing.demo_checkpoint   # expands it (if needed) and prints where
"""

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open

from qwen_vl.cache import cache_dir
from qwen_vl.testing.checkpoint import ShardWriter, config_dict, write_files

WEIGHTS = Path(__file__).with_name("qwen-vl-demo.safetensors")
WEIGHTS_SHA256 = "93f8464c75fc27f8c417c21796f821b677855c7ffa06bcd160a76feabd199968"
CHECKPOINT_SHA256 = "a94198eea8d93029753a2a86aaa30abc40f0770f8d44f81e129a7efe069a5279"
VOCAB_TENSORS = ("transformer.wte.weight", "lm_head.weight")


def file_sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def checkpoint_sha256(directory: Path) -> str:
    """One digest of every file in `directory`: names and contents, in name order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(directory).as_posix()}\0{file_sha256(path)}\n".encode())
    return digest.hexdigest()


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
    """How the file was trained (seed, steps, batch, learning rates), as the training run wrote it."""
    with safe_open(weights, "pt") as f:
        return json.loads(f.metadata()["training"])


def write_trained_checkpoint(out_dir: Path, weights: Path) -> Path:
    """`weights` (a file qwen_vl.demo.train wrote) expanded into a checkpoint in `out_dir`."""
    out = write_files(out_dir, config_dict("demo"))
    shards = ShardWriter(out, [("model", "safetensors")], 1)
    shards.write(1, dict(sorted(checkpoint_tensors(weights).items())))
    shards.close()
    return out


def demo_checkpoint() -> Path:
    """The shipped demo's checkpoint in the user cache, expanded on first use.

    Expanded into a temporary directory and renamed into place, so a process never
    sees half a checkpoint; when several expand at once, the first rename wins and the others
    discard theirs.
    """
    target = cache_dir() / f"qwen-vl-demo-{WEIGHTS_SHA256[:12]}"
    if target.is_dir():
        return target
    if not WEIGHTS.is_file() or (found := file_sha256(WEIGHTS)) != WEIGHTS_SHA256:
        state = "is missing" if not WEIGHTS.is_file() else f"has sha256 {found}"
        raise RuntimeError(f"the demo's weights file {WEIGHTS} {state}, not the shipped {WEIGHTS_SHA256} "
                           "(reinstall qwen-vl-serve, or `git checkout` the file; with git-lfs, `git lfs pull`)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".qwen-vl-demo-", dir=target.parent))
    try:
        write_trained_checkpoint(tmp, WEIGHTS)
        tmp.rename(target)
    except OSError:
        if not target.is_dir():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


if __name__ == "__main__":
    print(demo_checkpoint())
