"""Qwen-VL's visual side: a ViT (patch stride 14 on 448x448 input) and the
position-aware adapter that turns its 1024 patch features into 256 embeddings
of the decoder's width.

The module tree mirrors the checkpoint (`transformer.visual.*`), so the weight
map is the identity below this prefix. The ViT's linear layers are vLLM's
tensor-parallel ones; the adapter is one small cross-attention layer and stays
replicated on every rank.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.layers.linear import ColumnParallelLinear, RowParallelLinear
from vllm.platforms import current_platform

from .cpu_products import conv2d, linear, matmul

# Every LayerNorm of the original visual tower uses this epsilon.
LAYER_NORM_EPS = 1e-6
NUM_QUERIES = 256


def resize_positions(table: torch.Tensor, num_positions: int) -> torch.Tensor:
    """Resize a square table of absolute positions (N, C) to `num_positions`
    entries, bicubically in float32 as the original does: the result differs
    from a float16/bfloat16 interpolation and it changes the features."""
    src = int(math.isqrt(table.shape[0]))
    tgt = int(math.isqrt(num_positions))
    if src == tgt:
        return table
    grid = table.float().reshape(1, src, src, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(tgt, tgt), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).flatten(0, 2).to(table.dtype)


class ResizedPositions:
    """`resize_positions` of one table, kept while the table is unchanged. The
    tables are constants once the weights are loaded, and the resize costs more
    than the check on a CPU (each call: 10 ms for the `small` adapter's 1024
    wide table, 43 ms for the real one's 4096; comparing with a copy of the
    table: a fraction of a millisecond). Comparing the values, not a version
    counter, also sees weights reloaded in place."""

    def __init__(self):
        self.table: torch.Tensor | None = None
        self.resized: torch.Tensor | None = None

    def __call__(self, table: torch.Tensor, num_positions: int) -> torch.Tensor:
        unchanged = (
            self.table is not None
            and self.resized.shape[0] == num_positions
            and self.table.dtype == table.dtype
            and self.table.device == table.device
            and torch.equal(self.table, table)
        )
        if not unchanged:
            self.table = table.detach().clone()
            self.resized = resize_positions(table, num_positions)
        return self.resized


def scores_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v with the scores materialised, in the inputs' dtype."""
    scores = matmul(q / math.sqrt(q.shape[-1]), k.transpose(-1, -2))
    return matmul(scores.softmax(dim=-1), v)


class VisualAttention(nn.Module):
    """Self-attention of a ViT block. The fused `in_proj` output is laid out per
    head as (q, k, v) for each head, not as [Q; K; V]; a column-parallel split
    of it therefore hands each rank whole heads.

    On a CPU it computes as the original does: q scaled by 1/sqrt(head_dim),
    scores, a softmax in the model's dtype, then the values. There this is
    about 30% faster than torch's fused CPU kernel for 1024 patches (9.9 against
    14.3 ms a layer for one image of the `small` preset in bfloat16, 2 cores;
    11-13% more images/s through the whole tower) and, in bfloat16, closer to
    the original's features. Elsewhere (`fused`) it uses
    `scaled_dot_product_attention`, which never holds the scores of a whole
    encoder batch (16 x 1024 x 1024 per image at the real sizes).
    """

    def __init__(self, width: int, heads: int, prefix: str = ""):
        super().__init__()
        tp = get_tensor_model_parallel_world_size()
        self.heads = heads // tp
        self.head_dim = width // heads
        self.in_proj = ColumnParallelLinear(width, 3 * width, bias=True, prefix=f"{prefix}.in_proj")
        self.out_proj = RowParallelLinear(width, width, bias=True, prefix=f"{prefix}.out_proj")
        self.fused = not current_platform.is_cpu()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        qkv, _ = self.in_proj(x)
        qkv = qkv.view(batch, seq, self.heads, 3 * self.head_dim).transpose(1, 2)
        q, k, v = qkv.chunk(3, dim=-1)
        out = F.scaled_dot_product_attention(q, k, v) if self.fused else scores_attention(q, k, v)
        out = out.transpose(1, 2).reshape(batch, seq, self.heads * self.head_dim)
        out, _ = self.out_proj(out)
        return out


class VisualMLP(nn.Module):
    def __init__(self, width: int, mlp_width: int, prefix: str = ""):
        super().__init__()
        self.c_fc = ColumnParallelLinear(width, mlp_width, bias=True, prefix=f"{prefix}.c_fc")
        self.c_proj = RowParallelLinear(mlp_width, width, bias=True, prefix=f"{prefix}.c_proj")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = self.c_fc(x)
        # The original uses the exact (erf) GELU, not the tanh approximation.
        x = F.gelu(x)
        x, _ = self.c_proj(x)
        return x


class VisualBlock(nn.Module):
    """Pre-LN transformer block."""

    def __init__(self, width: int, heads: int, mlp_width: int, prefix: str = ""):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.attn = VisualAttention(width, heads, prefix=f"{prefix}.attn")
        self.ln_2 = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.mlp = VisualMLP(width, mlp_width, prefix=f"{prefix}.mlp")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class VisualTransformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_width: int, prefix: str = ""):
        super().__init__()
        self.resblocks = nn.ModuleList(
            VisualBlock(width, heads, mlp_width, prefix=f"{prefix}.resblocks.{i}")
            for i in range(layers)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x)
        return x


class Adapter(nn.Module):
    """The position-aware vision-language adapter (the checkpoint's
    `attn_pool`): 256 learned queries attend once over the ViT features.
    Queries and keys carry 2D sin-cos absolute positions (`pos_embed`, stored
    in the checkpoint for a 16x16 grid and resized to the 32x32 patch grid for
    the keys); values carry none.

    The original calls nn.MultiheadAttention with `need_weights` at its
    default (True), which makes torch compute the scores explicitly (q scaled,
    bmm, softmax, bmm). On a CPU we compute that same arithmetic ourselves
    (`scores_attention`, with the module's parameters), so that its products
    can be widened where the CPU lacks bfloat16 products (cpu_products.py); it
    is also faster there than the fused kernel torch picks without weights
    (about 50 against 73 ms for a batch of 8 images of the `small` preset in
    bfloat16, 2 cores). Other platforms keep the fused kernel (`fused`)."""

    def __init__(self, output_dim: int, kv_dim: int):
        super().__init__()
        self.query = nn.Parameter(torch.empty(NUM_QUERIES, output_dim))
        self.pos_embed = nn.Parameter(torch.empty(NUM_QUERIES, output_dim), requires_grad=False)
        self.kv_proj = nn.Linear(kv_dim, output_dim, bias=False)
        # nn.MultiheadAttention reads a blocked [Q; K; V] `in_proj_weight`,
        # which is exactly how the original's adapter stores it. Sequence-first, as the original
        # calls it.
        self.attn = nn.MultiheadAttention(output_dim, output_dim // 128)
        self.ln_q = nn.LayerNorm(output_dim, eps=LAYER_NORM_EPS)
        self.ln_kv = nn.LayerNorm(output_dim, eps=LAYER_NORM_EPS)
        self.fused = not current_platform.is_cpu()
        self.key_positions = ResizedPositions()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        batch, num_patches, _ = features.shape
        key_positions = self.key_positions(self.pos_embed, num_patches)
        x = self.ln_kv(linear(features, self.kv_proj.weight))
        # Sequence-first and contiguous: torch's CPU matmul fails to allocate for a transposed
        # 3D input at the real widths (it asked for 32 GiB; what batch_first=True does to its
        # inputs) and falls back to a batched product that took 90-120 s and 9 GB for 8 images.
        x = x.transpose(0, 1).contiguous()  # [patches, batch, dim]
        q = (self.ln_q(self.query) + self.pos_embed).unsqueeze(1).repeat(1, batch, 1)
        k = x + key_positions.unsqueeze(1)
        out = self.attn(q, k, x, need_weights=False)[0] if self.fused else self.scores_attention(q, k, x)
        return out.transpose(0, 1).contiguous()

    def scores_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """What `self.attn(q, k, v)` computes with `need_weights=True`, sequence-first [len, batch,
        width] in and out: separate q, k and v projections (k is not v), q scaled by
        1/sqrt(head_dim), bmm, softmax, bmm, the output projection."""
        attn = self.attn
        queries, batch, width = q.shape
        heads = attn.num_heads

        def per_head(t: torch.Tensor) -> torch.Tensor:  # [len, batch, width] -> [batch * heads, len, head_dim]
            return t.view(t.shape[0], batch * heads, width // heads).transpose(0, 1)

        w_q, w_k, w_v = attn.in_proj_weight.chunk(3)
        b_q, b_k, b_v = attn.in_proj_bias.chunk(3)
        q, k, v = per_head(linear(q, w_q, b_q)), per_head(linear(k, w_k, b_k)), per_head(linear(v, w_v, b_v))
        scores = matmul(q * math.sqrt(1.0 / q.shape[-1]), k.transpose(-2, -1)).softmax(dim=-1)
        out = matmul(scores, v).transpose(0, 1).contiguous().view(queries * batch, width)
        return linear(out, attn.out_proj.weight, attn.out_proj.bias).view(queries, batch, width)


class VisionTransformer(nn.Module):
    """Images [B, 3, 448, 448] -> embeddings [B, 256, output_dim]."""

    def __init__(self, visual: dict, prefix: str = ""):
        super().__init__()
        width = visual["width"]
        patch = visual["patch_size"]
        self.image_size = visual["image_size"]
        self.num_patches = (self.image_size // patch) ** 2
        output_dim = visual["output_dim"]

        self.conv1 = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False)
        # A 16x16 table, resized to the patch grid at run time.
        self.positional_embedding = nn.Parameter(torch.empty(NUM_QUERIES, width))
        self.patch_positions = ResizedPositions()
        self.ln_pre = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.transformer = VisualTransformer(
            width,
            visual["layers"],
            visual["heads"],
            int(width * visual["mlp_ratio"]),
            prefix=f"{prefix}.transformer",
        )
        self.attn_pool = Adapter(output_dim, width)
        self.ln_post = nn.LayerNorm(output_dim, eps=LAYER_NORM_EPS)
        self.proj = nn.Parameter(torch.empty(output_dim, output_dim))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = conv2d(pixel_values.to(self.conv1.weight.dtype), self.conv1.weight, self.conv1.stride)
        x = x.flatten(2).transpose(1, 2)
        x = x + self.patch_positions(self.positional_embedding, x.shape[1])
        x = self.ln_pre(x)
        x = self.transformer(x)
        x = self.attn_pool(x)
        x = self.ln_post(x)
        return matmul(x, self.proj)
