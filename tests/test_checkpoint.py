"""The random checkpoint has the exact layout of the real Qwen-VL-Chat checkpoint."""

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qwen_vl.model_executor.tokenizer import VOCAB_SIZE
from qwen_vl.testing import checkpoint
from qwen_vl.testing.checkpoint import sincos_table, write_checkpoint

REAL = Path(__file__).parent / "data" / "qwen-vl-chat"


def _load_json(path):
    return json.loads(Path(path).read_text())


def _abstract(names):
    return {re.sub(r"\.\d+\.", ".N.", name) for name in names}


def _tensors(directory, ext):
    index = _load_json(directory / f"{'model' if ext == 'safetensors' else 'pytorch_model'}.{ext}.index.json")
    tensors = {}
    for shard in sorted(set(index["weight_map"].values())):
        path = directory / shard
        tensors |= load_file(path) if ext == "safetensors" else torch.load(path, weights_only=True)
    return index, tensors


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    return _tensors(tiny_checkpoint, "safetensors")[1]


def test_tensor_names_match_the_real_index(tiny_checkpoint):
    real = _load_json(REAL / "pytorch_model.bin.index.json")["weight_map"]
    ours = _load_json(tiny_checkpoint / "model.safetensors.index.json")["weight_map"]
    assert _abstract(ours) == _abstract(real)


def test_config_has_every_real_key(tiny_checkpoint):
    real = _load_json(REAL / "config.json")
    ours = _load_json(tiny_checkpoint / "config.json")
    assert set(ours) == set(real) and set(ours["visual"]) == set(real["visual"])
    sizes = set(checkpoint.PRESETS["tiny"]) | {"visual"}
    same = {k for k in real if k not in sizes}
    assert {k: ours[k] for k in same} == {k: real[k] for k in same}


def test_generation_and_tokenizer_configs_are_the_real_ones(tiny_checkpoint):
    for name in ("generation_config.json", "tokenizer_config.json"):
        assert _load_json(tiny_checkpoint / name) == _load_json(REAL / name), name
    assert not (tiny_checkpoint / "tokenizer.json").exists()
    assert (tiny_checkpoint / "qwen.tiktoken").stat().st_size > 2_000_000


def test_shapes_follow_the_config(tiny_checkpoint, tiny):
    config = _load_json(tiny_checkpoint / "config.json")
    h, v, ff = config["hidden_size"], config["vocab_size"], config["intermediate_size"] // 2
    visual = config["visual"]
    w, out, mlp = visual["width"], visual["output_dim"], int(visual["width"] * visual["mlp_ratio"])
    assert v == 151936 and h == out
    expected = {
        "transformer.wte.weight": (v, h),
        "lm_head.weight": (v, h),
        "transformer.h.1.attn.c_attn.weight": (3 * h, h),
        "transformer.h.1.attn.c_attn.bias": (3 * h,),
        "transformer.h.1.attn.c_proj.weight": (h, h),
        "transformer.h.1.mlp.w1.weight": (ff, h),
        "transformer.h.1.mlp.w2.weight": (ff, h),
        "transformer.h.1.mlp.c_proj.weight": (h, ff),
        "transformer.visual.conv1.weight": (w, 3, 14, 14),
        "transformer.visual.positional_embedding": (256, w),
        "transformer.visual.transformer.resblocks.1.attn.in_proj.weight": (3 * w, w),
        "transformer.visual.transformer.resblocks.1.mlp.c_fc.weight": (mlp, w),
        "transformer.visual.transformer.resblocks.1.mlp.c_proj.weight": (w, mlp),
        "transformer.visual.attn_pool.query": (256, out),
        "transformer.visual.attn_pool.pos_embed": (256, out),
        "transformer.visual.attn_pool.kv_proj.weight": (out, w),
        "transformer.visual.attn_pool.attn.in_proj_weight": (3 * out, out),
        "transformer.visual.ln_post.weight": (out,),
        "transformer.visual.proj": (out, out),
    }
    assert {name: tuple(tiny[name].shape) for name in expected} == expected
    assert sum(name.startswith("transformer.h.") and name.endswith("ln_1.weight") for name in tiny) == 2
    assert all(t.dtype == torch.bfloat16 for t in tiny.values())


def test_index_maps_every_tensor_to_its_shard(tiny_checkpoint):
    index, tensors = _tensors(tiny_checkpoint, "safetensors")
    assert set(index["weight_map"]) == set(tensors)
    assert set(index["weight_map"].values()) == {f"model-0000{k}-of-00002.safetensors" for k in (1, 2)}
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())


def test_bin_and_safetensors_shards_hold_identical_tensors(tiny, tiny_checkpoint_bin):
    assert not list(tiny_checkpoint_bin.glob("*.safetensors"))
    bin_tensors = _tensors(tiny_checkpoint_bin, "bin")[1]
    assert bin_tensors.keys() == tiny.keys()
    assert all(torch.equal(bin_tensors[name], tiny[name]) for name in tiny)


def test_norm_gains_and_biases_are_randomised(tiny):
    for name, tensor in tiny.items():
        if name.endswith(".bias") or name.endswith("_bias"):
            assert tensor.float().abs().mean() > 0.02, name
        if re.search(r"ln_\w+\.weight$", name):
            assert (tensor.float() - 1).abs().mean() > 0.05, name


def test_pos_embed_is_the_fixed_sincos_table(tiny):
    assert torch.allclose(tiny["transformer.visual.attn_pool.pos_embed"].float(), sincos_table(256, 16), atol=1e-2)


def test_sincos_table_encodes_the_column_then_the_row():
    # Position 16 * i + j; with dim 8, omega = (1, 1/100): sin, cos of j * omega, then of i * omega.
    i, j = 3, 5
    omega = torch.tensor([1.0, 0.01])
    expected = torch.cat([(j * omega).sin(), (j * omega).cos(), (i * omega).sin(), (i * omega).cos()])
    assert torch.allclose(sincos_table(8, 16)[16 * i + j], expected)


def test_lm_head_rows_past_the_tokenizer_vocab_are_zero(tiny):
    lm_head = tiny["lm_head.weight"]
    assert not lm_head[VOCAB_SIZE:].any() and lm_head[:VOCAB_SIZE].float().std() > 0.01


def test_seed_changes_the_weights(tmp_path, tiny):
    other = write_checkpoint(tmp_path, seed=1, num_shards=1)
    name = "transformer.h.0.mlp.w1.weight"
    assert not torch.equal(load_file(other / "model-00001-of-00001.safetensors")[name], tiny[name])


def test_cli_writes_bin_shards_only(tmp_path):
    checkpoint.main([str(tmp_path), "--preset", "tiny", "--bin", "--no-safetensors", "--shards", "3"])
    assert sorted(p.name for p in tmp_path.glob("pytorch_model-*.bin")) == [
        f"pytorch_model-0000{k}-of-00003.bin" for k in (1, 2, 3)
    ]
    assert not list(tmp_path.glob("*.safetensors"))


def test_sizes_the_original_layout_cannot_express_are_rejected(tmp_path, monkeypatch):
    tiny = checkpoint.PRESETS["tiny"]
    square = {**tiny, "visual": {**tiny["visual"], "width": 256}}
    monkeypatch.setitem(checkpoint.PRESETS, "no-kv-proj", square)
    with pytest.raises(ValueError, match="kv_proj"):
        write_checkpoint(tmp_path, preset="no-kv-proj")

