"""Top-p on CPUs without a sort keeps the tokens vLLM's sorting top-p keeps, and the original's
nucleus rule (qwen_vl/testing/reference.py); vLLM's CPU sampler uses it once the plugin is registered."""

import pytest
import torch
from vllm.platforms import current_platform
from vllm.v1.sample.ops import topk_topp_sampler as sampler

from qwen_vl.model_executor.sampling import OPT_OUT, apply_top_k_top_p, install_cpu_top_p, top_p_mask
from qwen_vl.testing.reference import nucleus

# vLLM's CPU kernels (the sampler's fused_gumbel_argmax), the build for this CPU: vllm._C needs
# AVX-512 BF16, and importing it elsewhere stops the process (an illegal instruction on a Zen 3).
current_platform.import_kernels()

VOCAB = 151936  # Qwen-VL's
# With bf16 ties, rows whose nucleus edge lies this close to the bound are decided by float32
# rounding, which differs between any two ways of summing 150,000 probabilities: not compared.
ROUNDING = 1e-5


def batch(seed: int, scale: float, rows: int = 8, bfloat16: bool = False):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, VOCAB, generator=generator) * scale
    if bfloat16:  # a bf16 LM head's logits: many exact ties
        logits = logits.bfloat16().float()
    p = torch.rand(rows, generator=generator).clamp(min=0.02)
    p[0], p[1] = 1.0, 0.3  # "no top-p" beside others in a batch; Qwen-VL-Chat's default
    return logits, p


def ours(logits, k, p):
    return apply_top_k_top_p(logits.clone(), k, p) == float("-inf")


def vllms(logits, k, p):
    return sampler.apply_top_k_top_p_pytorch(logits.clone(), k, p, allow_cpu_sync=True) == float("-inf")


def near_rounding(logits, k, p) -> torch.Tensor:
    """Rows where the bound 1 - p lies within ROUNDING of the exact (float64) running mass on
    either side of the nucleus edge."""
    if k is not None:
        logits = sampler.apply_top_k_only(logits.clone(), k)
    at_or_below = logits.double().softmax(dim=-1).sort(dim=-1).values.cumsum(dim=-1)
    bound = (1 - p.double()).unsqueeze(1)
    above = torch.where(at_or_below > bound, at_or_below - bound, torch.inf).min(dim=-1).values
    below = torch.where(at_or_below <= bound, bound - at_or_below, torch.inf).min(dim=-1).values
    return torch.minimum(above, below) < ROUNDING


@pytest.mark.parametrize("scale", [0.64, 2.0, 5.0, 20.0])  # random weights' flat rows .. peaked
@pytest.mark.parametrize("with_top_k", [False, True])
def test_keeps_the_tokens_vllms_sorting_top_p_keeps(scale, with_top_k):
    for seed in range(3):
        logits, p = batch(seed, scale)
        k = None
        if with_top_k:
            k = torch.randint(1, 3000, (len(p),), generator=torch.Generator().manual_seed(seed))
            k[2] = VOCAB  # that row without top-k
        got = ours(logits, k, p)
        assert torch.equal(got, vllms(logits, k, p))
        assert (~got).sum(dim=-1).min() >= 1


def test_p_of_one_removes_only_tokens_of_zero_probability():
    logits = torch.randn(2, VOCAB) * 3
    logits[0, :100] = -200.0  # exp underflows to 0 in float32
    removed = top_p_mask(logits, torch.ones(2))
    assert removed[0].sum() == 100 and removed[0, :100].all()
    assert not removed[1].any()


def test_ties_at_the_edge_keep_as_many_tokens_and_differ_only_among_the_tied():
    rows_with_ties = 0
    for seed in range(4):
        for scale in (2.0, 5.0, 20.0):
            logits, p = batch(seed, scale, bfloat16=True)
            rows = ~near_rounding(logits, None, p)
            got, want = ours(logits, None, p)[rows], vllms(logits, None, p)[rows]
            assert torch.equal(got.sum(dim=-1), want.sum(dim=-1))
            for row, differ in zip(logits[rows], got != want):
                if differ.any():
                    assert row[differ].unique().numel() == 1  # one logit value: a tie
                    rows_with_ties += 1
    assert rows_with_ties > 0  # the case was exercised


def test_matches_the_originals_nucleus_rule():
    compared = 0
    for seed in range(3):
        for scale in (0.64, 5.0, 20.0):
            logits, p = batch(seed, scale, rows=4)
            got = top_p_mask(logits, p)
            for row in range(1, len(p)):  # row 0 has no top-p
                if near_rounding(logits[row:row + 1], None, p[row:row + 1]).item():
                    continue  # the original sums from the top, vLLM from the bottom
                assert torch.equal(got[row], nucleus(logits[row], p[row].item()) == float("-inf"))
                compared += 1
    assert compared >= 12  # of 27; every peaked row


def test_vllms_cpu_sampler_uses_it_once_installed(monkeypatch):
    monkeypatch.setattr(sampler, "apply_top_k_top_p", sampler.apply_top_k_top_p)  # restored after
    monkeypatch.delenv(OPT_OUT, raising=False)
    logits, p = batch(0, 5.0, rows=4)
    kept = ~ours(logits, None, p)
    calls = []
    monkeypatch.setattr("qwen_vl.model_executor.sampling.top_p_mask",
                        lambda logits, p: calls.append(len(p)) or top_p_mask(logits, p))
    assert install_cpu_top_p()
    assert sampler.apply_top_k_top_p is apply_top_k_top_p
    tokens, _ = sampler.TopKTopPSampler().forward(logits.clone(), {}, None, p)
    assert calls == [4]
    assert all(kept[row, token] for row, token in enumerate(tokens.tolist()))
    greedy_only, _ = sampler.TopKTopPSampler().forward(logits.clone(), {}, None, None)
    assert calls == [4] and greedy_only.shape == (4,)  # no top-p asked: vLLM's path


def test_opt_out_keeps_vllms_top_p(monkeypatch):
    monkeypatch.setattr(sampler, "apply_top_k_top_p", sampler.apply_top_k_top_p)
    monkeypatch.setenv(OPT_OUT, "vllm")
    before = sampler.apply_top_k_top_p
    assert not install_cpu_top_p()
    assert sampler.apply_top_k_top_p is before


@pytest.mark.parametrize("bad", ["all -inf", "+inf", "nan"])
def test_a_row_without_probabilities_gets_vllms_answer_not_an_error(bad):
    # A structured-output grammar that allows nothing masks a whole row to -inf (the fuzz test
    # met it); softmax then gives NaN, and the whole batch goes to vLLM's function instead.
    logits, p = batch(1, 5.0, rows=4)
    logits[2] = {"all -inf": float("-inf"), "+inf": logits[2], "nan": logits[2]}[bad]
    if bad != "all -inf":
        logits[2, 7] = float("inf") if bad == "+inf" else float("nan")
    assert top_p_mask(logits, p) is None
    for k in (None, torch.full((4,), 50)):
        got = apply_top_k_top_p(logits.clone(), k, p)
        want = sampler.apply_top_k_top_p_pytorch(logits.clone(), k, p, allow_cpu_sync=True)
        assert torch.equal(got.isneginf(), want.isneginf())


def test_an_empty_batch_passes_through():
    assert apply_top_k_top_p(torch.empty(0, VOCAB), None, torch.empty(0)).shape == (0, VOCAB)
