"""The vision tower's two attention forms, in the ViT's blocks and in the
adapter (the original's scores-softmax-values on CPUs, torch's fused kernel
elsewhere), both match the reference in float32.

Run in a child process: the tower's parallel layers need a one-rank vLLM
distributed state, which must not leak into the engines other tests start."""

import textwrap

import pytest
import torch

from tests.helpers import child_result

CHILD = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import torch
    from qwen_vl.benchmarks import vision
    from qwen_vl.model_executor.visual import Adapter

    vision.init_vllm_single_rank()
    ours, reference = vision.build_models(*vision.checkpoint_visual(Path(sys.argv[1])), torch.float32)
    attentions = vision.attention_layers(ours)
    pixels = torch.randn(2, 3, 448, 448, generator=torch.Generator().manual_seed(1))
    out = {"default_fused": [m.fused for m in attentions],
           "adapters": sum(isinstance(m, Adapter) for m in attentions), "layers": len(attentions)}
    with torch.inference_mode():
        want = reference(pixels)
        for fused in (False, True):
            for m in attentions:
                m.fused = fused
            got = ours(pixels)
            out[str(fused)] = {"shape": list(got.shape), "max_abs": (got - want).abs().max().item(),
                               "scale": want.abs().max().item()}
        for m in attentions:
            m.fused = False
        out["forms"] = vision.attention_forms(ours, 1, 1, torch.float32, 448, rounds=2)
        out["after_forms"] = [m.fused for m in attentions]
    print("RESULT " + json.dumps(out))
""")


@pytest.fixture(scope="module")
def both_forms(tiny_checkpoint):
    return child_result(CHILD, str(tiny_checkpoint))


def test_cpu_uses_the_originals_scores_form(both_forms):
    # The tiny preset's two ViT blocks and its adapter.
    assert both_forms["adapters"] == 1 and both_forms["layers"] == 3
    assert not any(both_forms["default_fused"])


@pytest.mark.parametrize("fused", [False, True], ids=["scores", "fused"])
def test_attention_form_matches_the_reference(both_forms, fused):
    result = both_forms[str(fused)]
    assert result["shape"] == [2, 256, 256]
    assert result["scale"] > 0.1
    assert result["max_abs"] < 1e-5 * max(1.0, result["scale"])


def test_benchmark_times_each_form_and_restores_the_tower(both_forms):
    forms = both_forms["forms"]
    assert len(forms["scores_images_per_s"]) == len(forms["fused_images_per_s"]) == 2
    assert all(rate > 0 for rate in forms["scores_images_per_s"] + forms["fused_images_per_s"])
    assert both_forms["after_forms"] == [False] * len(both_forms["after_forms"])


def test_resized_positions_are_computed_once_per_table():
    from qwen_vl.model_executor.visual import ResizedPositions, resize_positions

    table = torch.randn(256, 64, generator=torch.Generator().manual_seed(2))
    positions = ResizedPositions()
    first = positions(table, 1024)
    assert torch.equal(first, resize_positions(table, 1024))
    assert positions(table, 1024) is first


def test_resized_positions_follow_a_table_changed_in_place():
    from qwen_vl.model_executor.visual import ResizedPositions, resize_positions

    table = torch.randn(256, 64, generator=torch.Generator().manual_seed(3))
    positions = ResizedPositions()
    positions(table, 1024)
    with torch.no_grad():
        table.data.copy_(torch.randn(256, 64, generator=torch.Generator().manual_seed(4)))
    assert torch.equal(positions(table, 1024), resize_positions(table, 1024))
    assert torch.equal(positions(table.bfloat16(), 1024), resize_positions(table.bfloat16(), 1024))
    assert positions(table, 256).shape == (256, 64)
