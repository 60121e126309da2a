"""Qwen-VL as a trainable PyTorch module: the same function the plugin serves, batched.

Parameter names are the checkpoint's (`transformer.visual.transformer.resblocks.0.attn.in_proj`,
`transformer.h.0.attn.c_attn`, ...), so a state dict is a checkpoint. What differs from the
served model is only what training needs: a batch of right-padded sequences (causal attention
makes the padding invisible to the real positions), no KV cache, no dynamic NTK or logn (both
are identities below `seq_length`, 2048 positions, and the demo's conversations are a few
hundred), a vocabulary of the few hundred tokens the demo speaks, and an optional layout that
packs several single-turn questions about one picture into one row: `segments` numbers each
position (0: the part every question shares, the system prompt and the picture; k: the k-th
question and its answer; -1: padding), a question sees the shared part and itself, never another
question, and its positions continue from the shared part's end, so each question's logits are
exactly those of its own single-turn conversation (tests/test_demo.py checks it) while the
picture is encoded and attended once. `wte` and `lm_head` hold
only those rows (`vocab` lists their ids); every other row of the served checkpoint is zero:
an input row nobody types in the domain, an output row whose logit is 0. The loss counts those
zero logits (`log(rest) + 0` in the normaliser), so it is the full 151,936-way softmax that the
served model computes, not a cheaper one. tests/test_demo.py checks the logits against the
reference implementation of the original code.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

IMAGE_QUERIES = 256


class VisualAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, seq, width = x.shape
        # The original's fused projection is laid out per head as (q, k, v).
        q, k, v = self.in_proj(x).view(n, seq, self.heads, -1).transpose(1, 2).chunk(3, dim=-1)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(n, seq, width))


class VisualBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_width: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = VisualAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, mlp_width))
        self.mlp.add_module("gelu", nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(mlp_width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Resampler(nn.Module):
    """The adapter: 256 learned queries (plus a fixed 2-D sin-cos table) attend to the patches."""

    def __init__(self, width: int, dim: int):
        super().__init__()
        self.query = nn.Parameter(torch.zeros(IMAGE_QUERIES, dim))
        self.register_buffer("pos_embed", torch.zeros(IMAGE_QUERIES, dim))  # stored, never trained
        self.kv_proj = nn.Linear(width, dim, bias=False)
        self.ln_q = nn.LayerNorm(dim, eps=1e-6)
        self.ln_kv = nn.LayerNorm(dim, eps=1e-6)
        self.attn = nn.MultiheadAttention(dim, dim // 128, batch_first=True)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        features = self.ln_kv(self.kv_proj(patches))
        queries = (self.ln_q(self.query) + self.pos_embed).expand(len(patches), -1, -1)
        return self.attn(queries, features + self.pos_embed, features, need_weights=False)[0]


class VisionTransformer(nn.Module):
    def __init__(self, visual: dict):
        super().__init__()
        width, patch, out = visual["width"], visual["patch_size"], visual["output_dim"]
        if (visual["image_size"] // patch) ** 2 != IMAGE_QUERIES:
            raise ValueError("training expects a 16x16 patch grid (image_size = 16 * patch_size)")
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False)
        self.positional_embedding = nn.Parameter(torch.zeros(IMAGE_QUERIES, width))
        self.ln_pre = nn.LayerNorm(width, eps=1e-6)
        mlp_width = int(width * visual["mlp_ratio"])
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList(
            VisualBlock(width, visual["heads"], mlp_width) for _ in range(visual["layers"]))
        self.attn_pool = Resampler(width, out)
        self.ln_post = nn.LayerNorm(out, eps=1e-6)
        self.proj = nn.Parameter(torch.zeros(out, out))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # [n, 3, size, size] -> [n, 256, out]
        x = self.conv1(pixels).flatten(2).transpose(1, 2)
        x = self.ln_pre(x + self.positional_embedding)
        for block in self.transformer.resblocks:
            x = block(x)
        return self.ln_post(self.attn_pool(x)) @ self.proj


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rotary(positions: torch.Tensor, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for `positions` [n, seq] -> [n, 1, seq, head_dim] each (broadcast over heads)."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2).float() / head_dim)
    angles = (positions[..., None].float() * inv_freq).repeat(1, 1, 2)[:, None]
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    first, second = x.float().chunk(2, dim=-1)
    return (x.float() * cos + torch.cat((-second, first), dim=-1) * sin).type_as(x)


class Attention(nn.Module):
    def __init__(self, hidden: int, heads: int, projection: int):
        super().__init__()
        self.heads = heads
        self.c_attn = nn.Linear(hidden, 3 * projection)
        self.c_proj = nn.Linear(projection, hidden, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                keep_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The attention's output, and with `keep_weights` its weights [n, heads, seq, seq] (float32)."""
        n, seq, _ = x.shape
        q, k, v = (t.view(n, seq, self.heads, -1).transpose(1, 2) for t in self.c_attn(x).chunk(3, dim=-1))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        weights = None
        if keep_weights:
            visible = torch.ones(seq, seq, dtype=torch.bool).tril() if mask is None else mask
            scores = (q @ k.transpose(-1, -2)).float() / math.sqrt(q.shape[-1])
            weights = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1)
            out = weights.type_as(v) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return self.c_proj(out.transpose(1, 2).reshape(n, seq, -1)), weights


class MLP(nn.Module):
    def __init__(self, hidden: int, width: int):
        super().__init__()
        self.w1 = nn.Linear(hidden, width, bias=False)
        self.w2 = nn.Linear(hidden, width, bias=False)
        self.c_proj = nn.Linear(width, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.w1(x) * F.silu(self.w2(x)))


class Block(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        hidden, eps = config["hidden_size"], config["layer_norm_epsilon"]
        self.ln_1 = RMSNorm(hidden, eps)
        self.attn = Attention(hidden, config["num_attention_heads"], config["num_attention_heads"] * config["kv_channels"])
        self.ln_2 = RMSNorm(hidden, eps)
        self.mlp = MLP(hidden, config["intermediate_size"] // 2)

    def forward(self, x, cos, sin, mask, keep_weights=False):
        attended, weights = self.attn(self.ln_1(x), cos, sin, mask, keep_weights)
        x = x + attended
        return x + self.mlp(self.ln_2(x)), weights


def packed_layout(segments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions [n, seq] and the attention mask [n, 1, seq, seq] (True: may attend) of rows of
    packed questions: a question's positions continue from the shared part's end; each position
    sees the earlier positions of the shared part and of its own question (padding sees padding
    and the shared part, so no row of the mask is empty)."""
    seq = segments.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    same = segments[..., :, None] == segments[..., None, :]
    before_in_segment = (same & causal.tril(-1)).sum(dim=-1)  # the shared part is the rows' prefix
    positions = torch.where(segments == 0, torch.arange(seq), (segments == 0).sum(dim=1, keepdim=True) + before_in_segment)
    visible = (same | (segments == 0)[..., None, :]) & causal
    return positions, visible[:, None]


class TrainableQwenVL(nn.Module):
    def __init__(self, config: dict, vocab: list[int]):
        super().__init__()
        if config.get("use_dynamic_ntk") is False or config.get("rotary_pct", 1.0) != 1.0:
            raise ValueError("the demo trains the original's decoder: full rotary, dynamic NTK on")
        self.config = config
        self.register_buffer("vocab", torch.tensor(vocab), persistent=False)  # compact id -> real id
        hidden = config["hidden_size"]
        self.transformer = nn.Module()
        self.transformer.wte = nn.Embedding(len(vocab), hidden)
        self.transformer.h = nn.ModuleList(Block(config) for _ in range(config["num_hidden_layers"]))
        self.transformer.ln_f = RMSNorm(hidden, config["layer_norm_epsilon"])
        self.transformer.visual = VisionTransformer(config["visual"])
        self.lm_head = nn.Linear(hidden, len(vocab), bias=False)
        # The zero rows' share of the softmax's normaliser: `rest` logits of exactly 0.
        self.log_rest = math.log(config["vocab_size"] - len(vocab))

    def hidden_states(self, ids: torch.Tensor, image_positions: torch.Tensor, image_tokens: torch.Tensor,
                      segments: torch.Tensor | None = None) -> torch.Tensor:
        """ids [n, seq] (compact), image_positions [n, seq] bool (the <imgpad> positions, 256 per
        image, images in order), image_tokens [images, 256, hidden] (the visual encoder's output),
        segments [n, seq] (the packed questions' layout, see the module's docstring; None: one
        conversation per row) -> [n, seq, hidden]."""
        return self.hidden_states_and_attention(ids, image_positions, image_tokens, segments, None)[0]

    def hidden_states_and_attention(self, ids, image_positions, image_tokens, segments, layer: int | None):
        """hidden_states, and the attention weights [n, heads, seq, seq] of decoder layer `layer`
        (computed explicitly there: the same function, float32 softmax)."""
        x = self.transformer.wte(ids)
        if len(image_tokens):
            x = x.masked_scatter(image_positions[..., None], image_tokens.to(x.dtype))
        if segments is None:
            positions, mask = torch.arange(ids.shape[1]).expand(ids.shape), None
        else:
            positions, mask = packed_layout(segments)
        cos, sin = rotary(positions, self.config["kv_channels"], self.config["rotary_emb_base"])
        kept = None
        for i, block in enumerate(self.transformer.h):
            x, weights = block(x, cos, sin, mask, keep_weights=i == layer)
            kept = weights if i == layer else kept
        return self.transformer.ln_f(x), kept

    def full_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over the compact vocabulary plus one column standing for all zero rows."""
        logits = self.lm_head(hidden).float()
        return torch.cat((logits, logits.new_full((*logits.shape[:-1], 1), self.log_rest)), dim=-1)

    def answer_loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the next token where targets >= 0 (the answers)."""
        return self.answer_losses(hidden, targets).mean()

    def answer_losses(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The cross-entropy of each answer token (where targets >= 0), in row-major order."""
        picked = targets >= 0
        return F.cross_entropy(self.full_logits(hidden[picked]), targets[picked], reduction="none")

    def loss(self, ids, image_positions, pixels, targets) -> torch.Tensor:
        image_tokens = self.transformer.visual(pixels) if len(pixels) else pixels.new_zeros(0)
        return self.answer_loss(self.hidden_states(ids, image_positions, image_tokens), targets)

    # -- loading a checkpoint ------------------------------------------------------------------------

    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
        own = {name: state[name][self.vocab] if name in ("transformer.wte.weight", "lm_head.weight") else state[name]
               for name in self.state_dict()}
        self.load_state_dict(own, strict=True)
