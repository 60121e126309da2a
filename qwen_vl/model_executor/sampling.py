"""Top-p on CPUs without sorting the vocabulary.

Qwen-VL-Chat samples with top_p 0.3 by default (its generation_config.json), so every request
that does not choose its own sampling goes through top-p. vLLM's sampler on CPUs (no Triton
there) finds the top-p set by sorting each row of logits: 151,936 float32 values, 133 ms a
step for 16 sequences on two cores, three times a whole decoding step of the `small` model.

Top-p needs the order only where the kept mass crosses 1 - p, so this finds that place with
one pass over the vocabulary and sorts only the few tokens there:
1. probabilities, as vLLM's softmax (top-k, if asked, applied first by vLLM's own function);
2. each probability's float bits, shifted, name its bucket: buckets grow with probability,
   so the mass of all buckets below one is the mass of every token ranked below them;
3. the first bucket whose running mass, from the bottom, passes 1 - p holds the edge: tokens
   below it are removed, tokens above it kept, and its own tokens are sorted (by logit) and
   decided one by one with vLLM's rule: a token is removed when the mass of the tokens ranked
   at or below it is <= 1 - p; the most likely token is always kept.
The kept set is vLLM's except in two places where vLLM's own answer is arbitrary or rounding:
among tokens with equal logits at the edge (vLLM's sort is not stable, so which of them it
keeps is unspecified; here the lower vocabulary index ranks lower), and where a running mass
lies within float32 rounding of 1 - p (the sums are added in another order). The sampling
after the mask is vLLM's, unchanged.
"""

import os

import torch

# The float32 bits of a probability in [0, 1] rise with it; dropping 15 of the 23 mantissa
# bits leaves 32,513 buckets, each 1/256 of its value wide: a few tokens at the edge.
BUCKET_SHIFT = 15
NUM_BUCKETS = (0x3F800000 >> BUCKET_SHIFT) + 1  # the bits of 1.0, shifted, + 1
OPT_OUT = "QWEN_VL_CPU_TOP_P"  # "vllm": keep vLLM's sorting top-p (to compare)


def top_p_mask(logits: torch.Tensor, p: torch.Tensor) -> torch.Tensor | None:
    """True where top-p (per row, p in (0, 1]) removes a token of these float32 logits; None if
    a row has no probabilities (NaN: all -inf, e.g. a grammar allowing nothing, or +inf)."""
    rows = logits.shape[0]
    probs = logits.softmax(dim=-1)
    buckets = probs.view(torch.int32) >> BUCKET_SHIFT
    lowest, highest = torch.aminmax(buckets)
    if lowest < 0 or highest >= NUM_BUCKETS:  # NaN's bits, either sign
        return None
    buckets = buckets.long()
    mass = torch.zeros(rows, NUM_BUCKETS, dtype=probs.dtype).scatter_add_(1, buckets, probs)
    below = torch.nn.functional.pad(mass.cumsum(dim=1), (1, 0))  # [:, b]: buckets under b
    limit = 1 - p.to(probs.dtype).unsqueeze(1)  # vLLM's form of the bound
    edge = (below[:, 1:] <= limit).sum(dim=1, keepdim=True).clamp_(max=NUM_BUCKETS - 1)

    removed = buckets < edge
    row, column = (buckets == edge).nonzero(as_tuple=True)  # row-major: by index in a row
    by_logit = torch.argsort(logits[row, column], stable=True)
    order = by_logit[torch.argsort(row[by_logit], stable=True)]  # by row, logit, then index
    row, column = row[order], column[order]
    running = probs[row, column].double().cumsum(dim=0)
    count = torch.bincount(row, minlength=rows)
    earlier_rows = torch.cat([running.new_zeros(1), running])[count.cumsum(dim=0) - count]
    at_or_below = below.gather(1, edge).double()[row, 0] + running - earlier_rows[row]
    drop = at_or_below <= limit.double()[row, 0]
    removed[row[drop], column[drop]] = True
    nothing_kept = removed.all(dim=1).nonzero().squeeze(1)  # 1 - p rounded up to the whole mass
    removed[nothing_kept, logits[nothing_kept].argmax(dim=-1)] = False  # at least one token
    return removed


def apply_top_k_top_p(logits: torch.Tensor, k: torch.Tensor | None, p: torch.Tensor | None) -> torch.Tensor:
    """vLLM's `apply_top_k_top_p` on CPUs (no Triton), with top-p by `top_p_mask`; the logits
    may be updated in place, as vLLM's."""
    from vllm.v1.sample.ops import topk_topp_sampler as vllm_sampler  # imported once, by vLLM

    if p is None or logits.dtype != torch.float32 or logits.dim() != 2 or not logits.numel():
        return vllm_sampler.apply_top_k_top_p_pytorch(logits, k, p, allow_cpu_sync=True)
    if k is not None:
        logits = vllm_sampler.apply_top_k_only(logits, k)  # vLLM's own top-k, no sort either
    removed = top_p_mask(logits, p)
    if removed is None:  # as vLLM would have it, whatever that is
        return vllm_sampler.apply_top_k_top_p_pytorch(logits, None, p, allow_cpu_sync=True)
    return logits.masked_fill_(removed, float("-inf"))


def install_cpu_top_p() -> bool:
    """On CPUs without Triton, vLLM's sampler calls `apply_top_k_top_p` above instead of its own,
    which there is `apply_top_k_top_p_pytorch` (the sort)."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu() or os.environ.get(OPT_OUT) == "vllm":
        return False
    from vllm.v1.sample.ops import topk_topp_sampler as vllm_sampler

    if getattr(vllm_sampler, "HAS_TRITON", False):  # vLLM has a sort-free kernel there
        return False
    vllm_sampler.apply_top_k_top_p = apply_top_k_top_p
    return True
