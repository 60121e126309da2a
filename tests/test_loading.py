"""The checkpoint loads from safetensors or .bin shards alike, and a broken
checkpoint fails naming the tensor at fault."""

import json
import os
import shutil
import subprocess
import sys

from safetensors.torch import load_file, save_file
from vllm import LLM, SamplingParams

from tests.helpers import pattern_image

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=20)
PROMPT = "<|im_start|>user\nPicture 1: <img></img>\nWhat is this?<|im_end|>\n<|im_start|>assistant\n"


def answer(llm: LLM):
    request = {"prompt": PROMPT, "multi_modal_data": {"image": pattern_image(5)}}
    output = llm.generate([request], GREEDY, use_tqdm=False)[0].outputs[0]
    return list(output.token_ids), [{t: lp.logprob for t, lp in step.items()} for step in output.logprobs]


def test_bin_shards_give_the_same_logits_as_safetensors(engine, tiny_checkpoint_bin):
    assert not list(tiny_checkpoint_bin.glob("*.safetensors"))
    # The session engine's settings (context 8192), so that only the weights' format differs.
    from_bin = LLM(model=str(tiny_checkpoint_bin), dtype="float32", enforce_eager=True, seed=0)
    try:
        assert answer(from_bin) == answer(engine)
    finally:
        from_bin.llm_engine.engine_core.shutdown()
        del from_bin


def drop_tensor(checkpoint, out_dir, name: str) -> None:
    shutil.copytree(checkpoint, out_dir)
    index_path = out_dir / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = out_dir / index["weight_map"].pop(name)
    tensors = load_file(shard)
    del tensors[name]
    save_file(tensors, shard, metadata={"format": "pt"})
    index_path.write_text(json.dumps(index))


def test_missing_tensor_fails_naming_it(tiny_checkpoint, tmp_path):
    broken = tmp_path / "broken"
    drop_tensor(tiny_checkpoint, broken, "transformer.h.1.mlp.w1.weight")
    script = (
        "from vllm import LLM\n"
        f"LLM(model={str(broken)!r}, dtype='float32', enforce_eager=True, max_model_len=2048)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=os.environ.copy()
    )
    assert result.returncode != 0
    assert "tensors missing from the checkpoint: transformer.h.1.mlp.w1.weight" in result.stdout + result.stderr
