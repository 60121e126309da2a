"""Independent plain-PyTorch reference of Qwen-VL / Qwen-VL-Chat.

Written from the architecture facts in shared/qwen-vl-chat/FACTS.md (cited below as "FACTS:
<section>"), not from our vLLM model: parity tests compare the two, and benchmarks use this file
as the one-request-at-a-time "original repo" baseline. It imports nothing from qwen_vl.model_executor.

Layout, top to bottom: config and loading helpers, image preprocessing, the visual encoder and
its adapter (Resampler), the decoder, the whole model with a KV cache and generation, and the
chat prompt builder (ReferenceTokenizer). The module tree mirrors the checkpoint's tensor names,
so loading is one strict `load_state_dict`.
"""

from __future__ import annotations

import json
import math
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

IMAGE_SIZE = 448
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TOKENS_PER_IMAGE = 256

# Special-token ids (FACTS: Tokenizer): 151643 onwards, in this order.
ENDOFTEXT_ID = 151643
IM_START_ID = 151644
IM_END_ID = 151645
IMAGE_START_ID = 151857
IMAGE_END_ID = 151858
IMAGE_PAD_ID = 151859


@dataclass
class ReferenceConfig:
    """The fields of config.json that change outputs; `visual` is kept as the file's dict."""

    vocab_size: int = 151936
    hidden_size: int = 4096
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    intermediate_size: int = 22016
    layer_norm_epsilon: float = 1e-6
    rotary_emb_base: float = 10000.0
    seq_length: int = 2048
    use_logn_attn: bool = True
    use_dynamic_ntk: bool = True
    visual: dict = field(default_factory=lambda: {
        "width": 1664, "layers": 48, "heads": 16, "mlp_ratio": 4.9231, "output_dim": 4096,
        "patch_size": 14, "image_size": 448, "image_start_id": IMAGE_START_ID})

    @classmethod
    def from_json(cls, path: str | Path) -> "ReferenceConfig":
        raw = json.loads(Path(path).read_text())
        config = cls(**{k: raw[k] for k in cls.__dataclass_fields__ if k in raw})
        # The original sizes c_attn by kv_channels * heads and splits heads by hidden // heads;
        # a checkpoint where these disagree is not one this reference understands.
        kv_channels = raw.get("kv_channels", config.head_dim)
        if kv_channels != config.head_dim or raw.get("rotary_pct", 1.0) != 1.0:
            raise ValueError("expected kv_channels == hidden_size // heads and rotary_pct == 1")
        return config

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


# ---------------------------------------------------------------------------------------------
# Image preprocessing (FACTS: Image preprocessing)
# ---------------------------------------------------------------------------------------------

def preprocess(image: Image.Image, size: int = IMAGE_SIZE) -> torch.Tensor:
    """PIL image -> normalised float32 [3, size, size], as the original's transform does it
    (it resizes to config.visual["image_size"], 448 in Qwen-VL-Chat)."""
    # convert("RGB") drops alpha without compositing; PIL's bicubic (not torch's) matters.
    image = image.convert("RGB").resize((size, size), Image.BICUBIC)
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float() / 255
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return (pixels - mean) / std


def resize_position_table(table: torch.Tensor, grid: int) -> torch.Tensor:
    """[side*side, dim] table -> [grid*grid, dim], bicubic, align_corners False, in float32."""
    side = math.isqrt(table.shape[0])
    if side == grid:
        return table
    square = table.float().reshape(1, side, side, -1).permute(0, 3, 1, 2)
    resized = F.interpolate(square, size=(grid, grid), mode="bicubic", align_corners=False)
    return resized.permute(0, 2, 3, 1).reshape(grid * grid, -1).to(table.dtype)


# ---------------------------------------------------------------------------------------------
# Visual encoder: a ViT over 32x32 patches (FACTS: Visual encoder and adapter)
# ---------------------------------------------------------------------------------------------

class VisualAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [n, seq, width]
        n, seq, width = x.shape
        head_dim = width // self.heads
        # The fused projection is laid out per head as (q, k, v), not [Q; K; V].
        qkv = self.in_proj(x).view(n, seq, self.heads, 3 * head_dim)
        q, k, v = (t.transpose(1, 2) for t in qkv.split(head_dim, dim=-1))
        scores = (q / math.sqrt(head_dim)) @ k.transpose(-1, -2)
        out = scores.softmax(dim=-1) @ v
        return self.out_proj(out.transpose(1, 2).reshape(n, seq, width))


class VisualMLP(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))  # exact (erf) GELU


class VisualBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_width: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = VisualAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = VisualMLP(width, mlp_width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class VisualTransformer(nn.Module):
    """Only a container, so that names read `visual.transformer.resblocks.N` as stored."""

    def __init__(self, width: int, layers: int, heads: int, mlp_width: int):
        super().__init__()
        self.resblocks = nn.ModuleList(VisualBlock(width, heads, mlp_width) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x)
        return x


class PoolingAttention(nn.Module):
    """Multi-head attention with the parameter names and [Q; K; V] blocked split of
    torch.nn.MultiheadAttention (which the original adapter uses)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * dim))
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, query, key, value):  # query [n, lq, dim], key/value [n, lk, dim]
        n, lq, dim = query.shape
        head_dim = dim // self.heads
        wq, wk, wv = self.in_proj_weight.chunk(3)
        bq, bk, bv = self.in_proj_bias.chunk(3)

        def heads(t):
            return t.view(n, -1, self.heads, head_dim).transpose(1, 2)

        q = heads(F.linear(query, wq, bq))
        k, v = heads(F.linear(key, wk, bk)), heads(F.linear(value, wv, bv))
        scores = (q / math.sqrt(head_dim)) @ k.transpose(-1, -2)
        out = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(n, lq, dim)
        return self.out_proj(out)


class Resampler(nn.Module):
    """The adapter: 256 learned queries cross-attend to the 1024 patch features."""

    def __init__(self, width: int, dim: int, queries: int = TOKENS_PER_IMAGE):
        super().__init__()
        self.query = nn.Parameter(torch.empty(queries, dim))
        self.pos_embed = nn.Parameter(torch.empty(queries, dim))  # fixed 16x16 sin-cos, as stored
        # The original projects only when the widths differ (Identity otherwise: no tensor).
        self.kv_proj = nn.Linear(width, dim, bias=False) if width != dim else nn.Identity()
        self.ln_q = nn.LayerNorm(dim, eps=1e-6)
        self.ln_kv = nn.LayerNorm(dim, eps=1e-6)
        self.attn = PoolingAttention(dim, dim // 128)

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # [n, patches, width]
        n, patches, _ = features.shape
        features = self.ln_kv(self.kv_proj(features))
        grid = math.isqrt(patches)
        queries = (self.ln_q(self.query) + self.pos_embed).expand(n, -1, -1)
        keys = features + resize_position_table(self.pos_embed, grid)  # values carry no positions
        return self.attn(queries, keys, features)


class VisionTransformer(nn.Module):
    def __init__(self, visual: dict):
        super().__init__()
        width, patch = visual["width"], visual["patch_size"]
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False)
        self.positional_embedding = nn.Parameter(torch.empty(TOKENS_PER_IMAGE, width))  # 16x16
        self.ln_pre = nn.LayerNorm(width, eps=1e-6)
        mlp_width = int(width * visual["mlp_ratio"])
        self.transformer = VisualTransformer(width, visual["layers"], visual["heads"], mlp_width)
        self.attn_pool = Resampler(width, visual["output_dim"])
        self.ln_post = nn.LayerNorm(visual["output_dim"], eps=1e-6)
        self.proj = nn.Parameter(torch.empty(visual["output_dim"], visual["output_dim"]))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # [n, 3, 448, 448] -> [n, 256, out]
        x = self.conv1(pixels.to(self.conv1.weight.dtype))
        x = x.flatten(2).transpose(1, 2)  # [n, 1024, width], row-major patches, no class token
        grid = math.isqrt(x.shape[1])
        x = self.ln_pre(x + resize_position_table(self.positional_embedding, grid))
        x = self.attn_pool(self.transformer(x))
        return self.ln_post(x) @ self.proj


# ---------------------------------------------------------------------------------------------
# Decoder (FACTS: Decoder)
# ---------------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalised in float32, cast back, then scaled (the order changes bf16 rounding).
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def ntk_alpha(prompt_length: int, seq_length: int) -> float:
    """Dynamic-NTK alpha from the prefill length; 1 whenever prompt_length <= seq_length."""
    context_value = math.log(prompt_length / seq_length, 2) + 1
    return max(2 ** math.ceil(context_value) - 1, 1)


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, base: float, alpha: float):
    base = base * alpha ** (head_dim / (head_dim - 2))
    exponents = torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim
    inv_freq = 1.0 / (base ** exponents)  # float32, as the original computes it
    freqs = torch.outer(positions.float(), inv_freq)
    angles = torch.cat((freqs, freqs), dim=-1)  # rotate-half layout over the full head dim
    return angles.cos()[:, None, :], angles.sin()[:, None, :]  # [seq, 1, head_dim]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x32 = x.float()
    first, second = x32.chunk(2, dim=-1)
    rotated = torch.cat((-second, first), dim=-1)
    return (x32 * cos + rotated * sin).type_as(x)


class KVCache:
    """Keys and values per layer, grown by concatenation (as the original's past_key_values),
    and the dynamic-NTK alpha fixed at prefill (FACTS: Decoder, use_dynamic_ntk)."""

    def __init__(self, layers: int):
        self.keys: list[torch.Tensor | None] = [None] * layers
        self.values: list[torch.Tensor | None] = [None] * layers
        self.length = 0
        self.alpha = 1.0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        if self.keys[layer] is not None:
            k = torch.cat((self.keys[layer], k))
            v = torch.cat((self.values[layer], v))
        self.keys[layer], self.values[layer] = k, v
        return k, v


class Attention(nn.Module):
    def __init__(self, config: ReferenceConfig):
        super().__init__()
        self.heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.c_attn = nn.Linear(config.hidden_size, 3 * config.hidden_size)  # split [Q; K; V]
        self.c_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x, cos, sin, logn, cache: KVCache, layer: int):  # x [seq, hidden]
        seq = x.shape[0]
        q, k, v = (t.view(seq, self.heads, self.head_dim) for t in self.c_attn(x).chunk(3, dim=-1))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q = q * logn.type_as(q)  # logn scaling, after rotary, queries only
        k, v = cache.update(layer, k, v)
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # [heads, seq, dim]
        # The original divides by sqrt(head_dim) held as a 0-d tensor of the model dtype (in
        # bf16: 11.3125, not 11.3137); mirrored so that bf16 baselines round the same way.
        scale = torch.tensor(math.sqrt(self.head_dim), dtype=q.dtype, device=q.device)
        scores = (q @ k.transpose(-1, -2)) / scale
        # Causal over the whole cache: query i (absolute position start + i) sees keys <= it.
        start = k.shape[1] - seq
        visible = torch.ones(seq, k.shape[1], dtype=torch.bool, device=x.device).tril(start)
        scores = scores.masked_fill(~visible, torch.finfo(scores.dtype).min)
        probs = scores.float().softmax(dim=-1).type_as(v)
        return self.c_proj((probs @ v).transpose(0, 1).reshape(seq, -1))


class MLP(nn.Module):
    def __init__(self, config: ReferenceConfig):
        super().__init__()
        width = config.intermediate_size // 2
        self.w1 = nn.Linear(config.hidden_size, width, bias=False)
        self.w2 = nn.Linear(config.hidden_size, width, bias=False)
        self.c_proj = nn.Linear(width, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.w1(x) * F.silu(self.w2(x)))  # SiLU on w2, not w1


class Block(nn.Module):
    def __init__(self, config: ReferenceConfig):
        super().__init__()
        self.ln_1 = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.attn = Attention(config)
        self.ln_2 = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, logn, cache, layer):
        x = x + self.attn(self.ln_1(x), cos, sin, logn, cache, layer)
        return x + self.mlp(self.ln_2(x))


class QWenModel(nn.Module):
    """`transformer.*`: embeddings, visual encoder, blocks and the final norm."""

    def __init__(self, config: ReferenceConfig):
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.h = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.ln_f = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.visual = VisionTransformer(config.visual)


class ReferenceQwenVL(nn.Module):
    def __init__(self, config: ReferenceConfig, dynamic_ntk: bool | None = None):
        super().__init__()
        self.config = config
        self.dynamic_ntk = config.use_dynamic_ntk if dynamic_ntk is None else dynamic_ntk
        self.transformer = QWenModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)  # untied

    # -- loading --------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu", dynamic_ntk: bool | None = None):
        path = Path(path)
        config = ReferenceConfig.from_json(path / "config.json")
        with torch.device("meta"):
            model = cls(config, dynamic_ntk)
        state = read_checkpoint(path)
        quantization = json.loads((path / "config.json").read_text()).get("quantization_config")
        if quantization is not None:
            state = dequantize_checkpoint(state, quantization)
        for name in state:  # one tensor at a time: memory peaks at the converted model, not both copies
            state[name] = state[name].to(device=device, dtype=dtype)
        model.load_state_dict(state, strict=True, assign=True)  # strict: none missing or unused
        return model.eval()

    def new_cache(self) -> KVCache:
        return KVCache(self.config.num_hidden_layers)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    # -- forward --------------------------------------------------------------------------------

    @torch.inference_mode()
    def encode_images(self, images: list[Image.Image]) -> torch.Tensor:
        """[num_images, 256, output_dim]; all images of a prompt are encoded together."""
        size = self.config.visual["image_size"]
        pixels = torch.stack([preprocess(image, size) for image in images]).to(self.device)
        return self.transformer.visual(pixels)

    def embed(self, input_ids: torch.Tensor, images: list[Image.Image]) -> torch.Tensor:
        embeds = self.transformer.wte(input_ids)
        starts = (input_ids == IMAGE_START_ID).nonzero().flatten().tolist()
        if len(starts) != len(images):
            raise ValueError(f"{len(starts)} <img> spans but {len(images)} images")
        if not images:
            return embeds
        features = self.encode_images(images).to(embeds.dtype)
        for start, image_features in zip(starts, features):
            # 256 positions strictly between <img> and </img>; the tags keep their embeddings.
            end = start + TOKENS_PER_IMAGE + 1
            if end >= len(input_ids) or input_ids[end] != IMAGE_END_ID:
                raise ValueError("each <img> must be followed by 256 ids and </img>")
            embeds[start + 1:end] = image_features
        return embeds

    @torch.inference_mode()
    def forward(self, input_ids, images=(), cache: KVCache | None = None) -> torch.Tensor:
        """Logits [seq, vocab] (float32) for `input_ids` appended after whatever `cache` holds.
        Images belong to the `<img>` spans inside these ids (prefill)."""
        input_ids = torch.as_tensor(input_ids, dtype=torch.long, device=self.device)
        cache = cache if cache is not None else self.new_cache()
        seq, config = len(input_ids), self.config
        if cache.length == 0 and self.dynamic_ntk:
            cache.alpha = ntk_alpha(seq, config.seq_length)  # decoding keeps the prefill's alpha
        positions = torch.arange(cache.length, cache.length + seq, device=self.device)
        cos, sin = rotary_cos_sin(positions, config.head_dim, config.rotary_emb_base, cache.alpha)
        logn = torch.ones(seq, device=self.device)
        if config.use_logn_attn:
            beyond = positions >= config.seq_length
            log_pos = torch.log(positions[beyond].double() + 1)
            logn[beyond] = (log_pos / math.log(config.seq_length)).float()
        logn = logn[:, None, None]

        x = self.embed(input_ids, list(images))
        for layer, block in enumerate(self.transformer.h):
            x = block(x, cos, sin, logn, cache, layer)
        cache.length += seq
        return self.lm_head(self.transformer.ln_f(x)).float()

    def logits(self, input_ids: list[int], images=()) -> torch.Tensor:
        """Full-sequence forward without a cache: [seq, vocab] float32."""
        return self(input_ids, images)

    # -- generation -----------------------------------------------------------------------------

    def generate(self, input_ids: list[int], images=(), max_new_tokens: int = 16,
                 temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                 seed: int | None = None, stop_ids=()) -> list[int]:
        """One request at a time; temperature 0 is greedy. The stop id, if hit, is included."""
        tokens, _ = self._generate(input_ids, images, max_new_tokens, temperature, top_p, top_k,
                                   seed, stop_ids)
        return tokens

    def generate_greedy(self, input_ids: list[int], images=(), max_new_tokens: int = 16,
                        stop_ids=()) -> tuple[list[int], torch.Tensor]:
        """Greedy tokens and the log-softmax [vocab] (float32) of the first generated position."""
        tokens, first_logits = self._generate(input_ids, images, max_new_tokens, 0.0, 1.0, 0,
                                              None, stop_ids)
        return tokens, first_logits.log_softmax(dim=-1)

    def _generate(self, input_ids, images, max_new_tokens, temperature, top_p, top_k, seed,
                  stop_ids):
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        cache = self.new_cache()
        logits = self(input_ids, images, cache)[-1]
        first_logits, tokens = logits, []
        for _ in range(max_new_tokens):
            token = pick_token(logits, temperature, top_p, top_k, generator)
            tokens.append(token)
            if token in stop_ids or len(tokens) == max_new_tokens:
                break
            logits = self([token], (), cache)[-1]
        return tokens, first_logits


def pick_token(logits: torch.Tensor, temperature: float, top_p: float, top_k: int,
               generator: torch.Generator | None) -> int:
    """Greedy at temperature 0; else temperature, then top-k, then top-p (nucleus) sampling."""
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits.float() / temperature
    if 0 < top_k < logits.numel():
        kth = logits.topk(top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        logits = nucleus(logits, top_p)
    probs = logits.softmax(dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def nucleus(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Top-p over one row: the smallest prefix whose mass reaches top_p (the best token always
    stays); the other tokens' logits become -inf."""
    ordered, order = logits.sort(descending=True)
    probs = ordered.softmax(dim=-1)
    drop = probs.cumsum(dim=-1) - probs >= top_p
    return logits.scatter(0, order, ordered.masked_fill(drop, float("-inf")))


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a Hugging Face checkpoint directory: safetensors or .bin, sharded or not."""
    from safetensors.torch import load_file

    def load(file: Path) -> dict[str, torch.Tensor]:
        if file.suffix == ".safetensors":
            return load_file(file)
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)

    for index_name, single_name in (("model.safetensors.index.json", "model.safetensors"),
                                    ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (path / index_name).exists():
            shards = sorted(set(json.loads((path / index_name).read_text())["weight_map"].values()))
            state = {}
            for shard in shards:
                state.update(load(path / shard))
            return state
        if (path / single_name).exists():
            return load(path / single_name)
    raise FileNotFoundError(f"no safetensors or pytorch_model.bin checkpoint in {path}")


def _nibbles(words: torch.Tensor) -> torch.Tensor:
    """int32 words [..., n] -> their eight 4-bit fields [..., n, 8], lowest bits first."""
    words = words.to(torch.int64) & 0xFFFFFFFF
    return torch.stack([(words >> (4 * k)) & 0xF for k in range(8)], dim=-1)


def dequantize_checkpoint(state: dict[str, torch.Tensor], quantization: dict) -> dict[str, torch.Tensor]:
    """A 4-bit checkpoint's tensors with each quantized layer's float weight back in place, as the
    original's quantized linear layers compute it:
    - GPTQ (AutoGPTQ's QuantLinear, Qwen-VL-Chat-Int4): qweight [in/8, out] holds input 8r+k in
      bits 4k of row r; qzeros [groups, out/8] holds output 8c+k in bits 4k of column c, stored as
      zero - 1; w[o, i] = scales[g_idx[i], o] * (q - (stored_zero + 1)). AutoGPTQ 0.4 gave every
      layer a bias; the layers Qwen builds without one carry zeros, which the original leaves unused.
    - AWQ (AutoAWQ's gemm layout): qweight [in, out/8] and qzeros [groups, out/8] hold output
      8c + order[k] in bits 4k, order = 0, 2, 4, 6, 1, 3, 5, 7; w = scales * (q - zero), group
      i // group_size.
    """
    method, group = quantization["quant_method"], quantization["group_size"]
    state = dict(state)
    for name in [n for n in state if n.endswith(".qweight")]:
        layer = name[: -len(".qweight")]
        qweight, qzeros = state.pop(name), state.pop(f"{layer}.qzeros")
        scales = state.pop(f"{layer}.scales").float()
        if method == "gptq":
            q = _nibbles(qweight.t()).reshape(qweight.shape[1], -1)  # [out, in]
            zeros = _nibbles(qzeros).reshape(qzeros.shape[0], -1) + 1  # [groups, out]
            groups = state.pop(f"{layer}.g_idx").long()
            if f"{layer}.bias" in state and not torch.count_nonzero(state[f"{layer}.bias"]) and not layer.endswith("c_attn"):
                del state[f"{layer}.bias"]
        elif method == "awq":
            order = torch.tensor([0, 4, 1, 5, 2, 6, 3, 7])  # output k of eight sits in nibble order[k]
            q = _nibbles(qweight)[..., order].reshape(qweight.shape[0], -1).t()  # [out, in]
            zeros = _nibbles(qzeros)[..., order].reshape(qzeros.shape[0], -1)
            groups = torch.arange(q.shape[1]) // group
        else:
            raise ValueError(f"quant_method {method!r}: the reference reads gptq and awq")
        state[f"{layer}.weight"] = scales[groups].t() * (q - zeros[groups].t()).float()
    return state


# ---------------------------------------------------------------------------------------------
# Chat prompt (FACTS: Tokenizer, Chat prompt)
# ---------------------------------------------------------------------------------------------

QWEN_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
                r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")  # single digits
IMAGE_SPECIALS = ("<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>", "<img>", "</img>",
                  "<imgpad>")
SPECIAL_TOKENS = (("<|endoftext|>", "<|im_start|>", "<|im_end|>")
                  + tuple(f"<|extra_{i}|>" for i in range(205)) + IMAGE_SPECIALS)


class ReferenceTokenizer:
    """The original tokenizer's encoding and `make_context`, built on tiktoken directly."""

    def __init__(self, tiktoken_path: str | Path):
        import base64

        import tiktoken

        ranks = {}
        for line in Path(tiktoken_path).read_text().splitlines():
            if line:
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
        specials = {token: len(ranks) + i for i, token in enumerate(SPECIAL_TOKENS)}
        assert specials["<img>"] == IMAGE_START_ID, "qwen.tiktoken must hold 151643 ranks"
        self.encoding = tiktoken.Encoding("qwen_reference", pat_str=QWEN_PATTERN,
                                          mergeable_ranks=ranks, special_tokens=specials)
        self.special_ids = specials

    def encode_content(self, text: str) -> list[int]:
        """Only the nine image/grounding tokens are special; `<img>path</img>` becomes `<img>`,
        the path's UTF-8 bytes as ids 0-255, `<imgpad>` up to 256 ids, then `</img>`."""
        text = unicodedata.normalize("NFC", text)
        ids = self.encoding.encode(text, allowed_special=set(IMAGE_SPECIALS), disallowed_special=())
        out, i = [], 0
        while i < len(ids):
            if ids[i] != IMAGE_START_ID:
                out.append(ids[i])
                i += 1
                continue
            try:
                end = ids.index(IMAGE_END_ID, i + 1)
            except ValueError:
                raise ValueError("<img> without a closing </img>") from None
            path_bytes = self.encoding.decode_bytes(ids[i + 1:end])
            if len(path_bytes) > TOKENS_PER_IMAGE:
                raise ValueError("image path longer than 256 UTF-8 bytes")
            padding = [IMAGE_PAD_ID] * (TOKENS_PER_IMAGE - len(path_bytes))
            out += [IMAGE_START_ID, *path_bytes, *padding, IMAGE_END_ID]
            i = end + 1
        return out

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """Image spans decode back to `<img>path</img>`; skipping drops every id >= 151643."""
        text_ids, i = [], 0
        while i < len(ids):
            if ids[i] == IMAGE_START_ID and IMAGE_END_ID in ids[i + 1:]:
                end = ids.index(IMAGE_END_ID, i + 1)
                inner = ids[i + 1:end]
                inner = inner[:inner.index(IMAGE_PAD_ID)] if IMAGE_PAD_ID in inner else inner
                path = bytes(inner).decode("utf-8", errors="replace")
                text_ids += [IMAGE_START_ID, *self.encoding.encode_ordinary(path), IMAGE_END_ID]
                i = end + 1
            else:
                text_ids.append(ids[i])
                i += 1
        if skip_special_tokens:
            text_ids = [t for t in text_ids if t < ENDOFTEXT_ID]
        return self.encoding.decode(text_ids, errors="replace")

    @staticmethod
    def from_list_format(items: list[dict]) -> str:
        text, pictures = "", 0
        for item in items:
            if "image" in item:
                pictures += 1
                text += f"Picture {pictures}: <img>{item['image']}</img>\n"
            elif "text" in item:
                text += item["text"]
            elif "box" in item:
                if "ref" in item:
                    text += f"<ref>{item['ref']}</ref>"
                for x1, y1, x2, y2 in item["box"]:
                    text += "<box>(%d,%d),(%d,%d)</box>" % (x1, y1, x2, y2)
            else:
                raise ValueError(f"unknown list-format item {item!r}")
        return text

    def make_context(self, query: str, history: list[tuple[str, str]] = (),
                     system: str = "You are a helpful assistant.",
                     max_window_size: int = 6144) -> list[int]:
        newline = self.encode_content("\n")

        def message(role: str, content: str) -> list[int]:
            # Role and content encoded separately: no BPE merge crosses the boundaries.
            return ([IM_START_ID] + self.encode_content(role) + newline
                    + self.encode_content(content) + [IM_END_ID])

        system_ids = message("system", system)
        context: list[int] = []
        for turn_query, turn_answer in reversed(list(history)):  # newest first
            turn = (newline + message("user", turn_query)
                    + newline + message("assistant", turn_answer))
            if len(system_ids) + len(turn) + len(context) >= max_window_size:
                break  # this and all older turns are dropped
            context = turn + context
        return (system_ids + context + newline + message("user", query) + newline
                + [IM_START_ID] + self.encode_content("assistant") + newline)
