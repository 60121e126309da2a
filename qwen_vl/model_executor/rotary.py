"""Qwen's dynamic NTK rotary scaling, per request, on vLLM's paged KV cache.

The original raises the rotary base for prompts longer than `seq_length`
(2048): at prefill, from the whole prompt length L, alpha =
`QWenConfig.ntk_alpha(L)` (1, 3, 7, 15, ...) and base' = base * alpha^(d / (d - 2));
every decode step of that request keeps the prefill's alpha. So the
rotary angle of a token depends on its request, not only on its position.

How this reaches vLLM: a model may compute each request's positions itself
when its prompt is first scheduled (`SupportsMRoPE.get_mrope_input_positions`,
the hook M-RoPE models use); decode positions are then `delta + index`. We
encode the alpha in the position value: position = code * stride + index,
with code = log2(alpha + 1) - 1 (0 for alpha 1, so short prompts keep their
plain positions) and delta = code * stride. One rotary table holds a stride of
rows per alpha, so vLLM's own rotary kernel, indexing by position, picks the
request's alpha for prompt and decode tokens alike, and in every chunk of a
chunked prefill. Requests with different alphas share engine steps freely.
"""

import math

import numpy as np
import torch
from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding

from .config import QWenConfig


def alpha_code(alpha: int) -> int:
    """1 -> 0, 3 -> 1, 7 -> 2, ...: the alpha's slot in the rotary table."""
    return (alpha + 1).bit_length() - 2


def alpha_codes_needed(config: QWenConfig, max_positions: int) -> int:
    """Table slots for every alpha a prompt of up to `max_positions` can get."""
    return alpha_code(config.ntk_alpha(max_positions)) + 1


def encoded_positions(config: QWenConfig, stride: int, prompt_length: int) -> tuple[torch.Tensor, int]:
    """(positions [3, L], delta) of a prompt: M-RoPE's layout, all rows equal."""
    delta = alpha_code(config.ntk_alpha(prompt_length)) * stride
    positions = np.arange(delta, delta + prompt_length, dtype=np.int64)
    return torch.from_numpy(positions).expand(3, -1), delta


class NTKRotaryEmbedding(RotaryEmbedding):
    """vLLM's rotate-half rotary embedding whose cos/sin table stacks one
    block of `stride` positions per alpha (1, 3, 7, ...). Each block is
    computed as the original does: inverse frequencies in float32 from the
    scaled base (a Python float), angles = position x inv_freq in float32."""

    def __init__(self, head_dim: int, stride: int, num_alphas: int, base: float, dtype: torch.dtype):
        self.stride = stride
        self.num_alphas = num_alphas
        super().__init__(head_dim, head_dim, stride * num_alphas, base, True, dtype)

    def _compute_cos_sin_cache(self) -> torch.Tensor:
        d = self.rotary_dim
        positions = torch.arange(self.stride, dtype=torch.float)
        tables = []
        for code in range(self.num_alphas):
            alpha = 2 ** (code + 1) - 1
            inv_freq = self._compute_inv_freq(self.base * alpha ** (d / (d - 2)))
            angles = torch.outer(positions, inv_freq)
            tables.append(torch.cat((angles.cos(), angles.sin()), dim=-1))
        return torch.cat(tables)


def logn_scale_table(seq_length: int, stride: int, num_alphas: int) -> torch.Tensor:
    """Qwen's `use_logn_attn`: a query at position p >= seq_length is scaled
    by log(p + 1) / log(seq_length), which keeps attention entropy steady past
    the training length. Repeated per alpha block, to be indexed like the
    rotary table."""
    positions = torch.arange(stride, dtype=torch.float64)
    scale = torch.log(positions + 1) / math.log(seq_length)
    table = torch.where(positions >= seq_length, scale, torch.ones_like(scale)).float()
    return table.repeat(num_alphas)
