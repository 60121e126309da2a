"""Qwen-VL / Qwen-VL-Chat on vLLM: the Qwen-7B decoder on vLLM's paged KV
cache, with the visual encoder and adapter (`visual.py`) as the multimodal
encoder stage that vLLM runs at prefill and caches per image.

The module tree mirrors the checkpoint (`transformer.wte`, `transformer.h.N`,
`transformer.ln_f`, `transformer.visual`, `lm_head`); `load_weights` owns the
only renames: `mlp.w2` and `mlp.w1` are stacked into one column-parallel
layer. A 4-bit checkpoint (Qwen-VL-Chat-Int4's GPTQ, or AWQ) goes through the
same layers with vLLM's quantization config; the visual tower stays unquantized
(quantization.py).
"""

from collections.abc import Iterable

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import CacheConfig, VllmConfig
from vllm.distributed import get_pp_group, get_tensor_model_parallel_world_size
from vllm.logger import init_logger
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.interfaces import (
    MultiModalEmbeddings,
    SupportsMRoPE,
    SupportsMultiModal,
    SupportsPP,
)
from vllm.model_executor.models.utils import (
    PPMissingLayer,
    _merge_multimodal_embeddings,
    is_pp_missing_parameter,
    make_empty_intermediate_tensors_factory,
    make_layers,
    maybe_prefix,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFeatureSpec
from vllm.sequence import IntermediateTensors

from .config import QWenConfig
from .cpu_products import use_float32_products
from .processor import QwenVLDummyInputsBuilder, QwenVLMultiModalProcessor, QwenVLProcessingInfo
from .quantization import check_zero_points, checked_extra, gptq_in_zentorch_layout
from .rotary import NTKRotaryEmbedding, alpha_codes_needed, encoded_positions, logn_scale_table
from .visual import NUM_QUERIES, VisionTransformer

logger = init_logger(__name__)

# checkpoint name -> (our parameter name, shard of the stacked parameter).
# SiluAndMul applies SiLU to the first half: that is `w2` in Qwen.
STACKED_PARAMS = {
    ".mlp.w2.": (".mlp.gate_up_proj.", 0),
    ".mlp.w1.": (".mlp.gate_up_proj.", 1),
}


class QWenAttention(nn.Module):
    def __init__(
        self,
        config: QWenConfig,
        rotary_emb: NTKRotaryEmbedding,
        cache_config: CacheConfig | None,
        quant_config: QuantizationConfig | None,
        prefix: str,
    ):
        super().__init__()
        tp = get_tensor_model_parallel_world_size()
        total_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // total_heads
        self.num_heads = total_heads // tp
        self.c_attn = QKVParallelLinear(
            config.hidden_size, self.head_dim, total_heads, bias=True,
            quant_config=quant_config, prefix=f"{prefix}.c_attn",
        )
        self.c_proj = RowParallelLinear(
            total_heads * self.head_dim, config.hidden_size, bias=False,
            quant_config=quant_config, prefix=f"{prefix}.c_proj",
        )
        # Rotary over the full head dim (rotary_pct 1.0), rotate-half style; one
        # table shared by all layers, indexed by alpha-encoded positions (rotary.py).
        self.rotary_emb = rotary_emb
        self.use_logn_attn = config.use_logn_attn
        if self.use_logn_attn:
            self.register_buffer(
                "logn_scale",
                logn_scale_table(config.seq_length, rotary_emb.stride, rotary_emb.num_alphas),
                persistent=False,
            )
        self.attn = Attention(
            self.num_heads, self.head_dim, self.head_dim**-0.5,
            cache_config=cache_config, quant_config=quant_config, prefix=f"{prefix}.attn",
        )

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.c_attn(hidden_states)
        q, k, v = qkv.chunk(3, dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        if self.use_logn_attn:
            # After rotary, as the original does.
            q = q * self.logn_scale[positions].unsqueeze(-1).to(q.dtype)
        out = self.attn(q, k, v)
        out, _ = self.c_proj(out)
        return out


class QWenMLP(nn.Module):
    """c_proj(w1(x) * silu(w2(x)))."""

    def __init__(self, config: QWenConfig, quant_config: QuantizationConfig | None, prefix: str):
        super().__init__()
        width = config.intermediate_size // 2
        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size, [width, width], bias=False,
            quant_config=quant_config, prefix=f"{prefix}.gate_up_proj",
        )
        self.c_proj = RowParallelLinear(
            width, config.hidden_size, bias=False, quant_config=quant_config, prefix=f"{prefix}.c_proj"
        )
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = self.gate_up_proj(x)
        x, _ = self.c_proj(self.act(x))
        return x


class QWenBlock(nn.Module):
    def __init__(
        self,
        config: QWenConfig,
        rotary_emb: NTKRotaryEmbedding,
        cache_config: CacheConfig | None,
        quant_config: QuantizationConfig | None,
        prefix: str,
    ):
        super().__init__()
        self.ln_1 = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.attn = QWenAttention(config, rotary_emb, cache_config, quant_config, f"{prefix}.attn")
        self.ln_2 = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mlp = QWenMLP(config, quant_config, f"{prefix}.mlp")

    def forward(
        self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden_states
            hidden_states = self.ln_1(hidden_states)
        else:
            hidden_states, residual = self.ln_1(hidden_states, residual)
        hidden_states = self.attn(positions, hidden_states)
        hidden_states, residual = self.ln_2(hidden_states, residual)
        return self.mlp(hidden_states), residual


def positions_per_alpha(vllm_config: VllmConfig) -> int:
    """Rows of the rotary table per alpha: every position a request can reach."""
    config: QWenConfig = vllm_config.model_config.hf_config
    return max(config.max_position_embeddings, vllm_config.model_config.max_model_len)


# Positions arrive as M-RoPE's [3, num_tokens] (rotary.py says why); their last dim varies.
@support_torch_compile(
    dynamic_arg_dims={"input_ids": 0, "positions": -1, "intermediate_tensors": 0, "inputs_embeds": 0}
)
class QWenModel(nn.Module):
    """The checkpoint's `transformer`: embeddings, blocks, final norm, and the
    visual tower (which vLLM runs separately, through `embed_multimodal`).
    Under pipeline parallelism each rank builds its share of the blocks; the
    first also the embeddings and the visual tower, the last the final norm."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config: QWenConfig = vllm_config.model_config.hf_config
        quant_config = vllm_config.quant_config
        cache_config = vllm_config.cache_config
        stride = positions_per_alpha(vllm_config)
        head_dim = config.hidden_size // config.num_attention_heads
        self.rotary_emb = NTKRotaryEmbedding(
            head_dim, stride, alpha_codes_needed(config, stride), float(config.rotary_emb_base),
            vllm_config.model_config.dtype,
        )

        pp = get_pp_group()
        self.wte = (
            VocabParallelEmbedding(config.vocab_size, config.hidden_size, prefix=f"{prefix}.wte")
            if pp.is_first_rank else PPMissingLayer()
        )
        self.start_layer, self.end_layer, self.h = make_layers(
            config.num_hidden_layers,
            lambda prefix: QWenBlock(config, self.rotary_emb, cache_config, quant_config, prefix),
            prefix=f"{prefix}.h",
        )
        self.ln_f = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon) if pp.is_last_rank else PPMissingLayer()
        self.visual = VisionTransformer(config.visual, prefix=f"{prefix}.visual") if pp.is_first_rank else PPMissingLayer()
        self.make_empty_intermediate_tensors = make_empty_intermediate_tensors_factory(
            ["hidden_states", "residual"], config.hidden_size
        )

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.wte(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        positions = positions[0]  # the three M-RoPE rows are equal
        if get_pp_group().is_first_rank:
            hidden_states = inputs_embeds if inputs_embeds is not None else self.wte(input_ids)
            residual = None
        else:
            hidden_states, residual = intermediate_tensors["hidden_states"], intermediate_tensors["residual"]
        for block in self.h[self.start_layer:self.end_layer]:
            hidden_states, residual = block(positions, hidden_states, residual)
        if not get_pp_group().is_last_rank:
            return IntermediateTensors({"hidden_states": hidden_states, "residual": residual})
        hidden_states, _ = self.ln_f(hidden_states, residual)
        return hidden_states


@MULTIMODAL_REGISTRY.register_processor(
    QwenVLMultiModalProcessor, info=QwenVLProcessingInfo, dummy_inputs=QwenVLDummyInputsBuilder
)
class QWenLMHeadModel(nn.Module, SupportsMultiModal, SupportsMRoPE, SupportsPP):
    # For quantized checkpoints: vLLM's quantization configs find a stacked layer's shards by
    # these checkpoint names (the same pairs as STACKED_PARAMS, in shard order).
    packed_modules_mapping = {"gate_up_proj": ["w2", "w1"]}

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        # Only used when vLLM's server renders chat in the "string" content format: it
        # joins the placeholders and the text with "\n" itself. Our chat template (the
        # "openai" format) writes the pictures, numbered from 1 in each user turn.
        if modality.startswith("image"):
            return f"Picture {i}: <img></img>"
        raise ValueError("Qwen-VL takes images only")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config: QWenConfig = vllm_config.model_config.hf_config
        self.config = config
        self.transformer = QWenModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "transformer"))
        self.lm_head = ParallelLMHead(
            config.vocab_size, config.hidden_size, quant_config=vllm_config.quant_config, prefix=maybe_prefix(prefix, "lm_head")
        ) if get_pp_group().is_last_rank else PPMissingLayer()
        self.make_empty_intermediate_tensors = self.transformer.make_empty_intermediate_tensors
        self.dtype = vllm_config.model_config.dtype
        self.logits_processor = LogitsProcessor(config.vocab_size)
        self.quant_config = vllm_config.quant_config
        self.positions_per_alpha = positions_per_alpha(vllm_config)
        # Weights for inference only. torch's norms, convolution and attention (and vLLM's
        # RMSNorm) make trainable parameters, and vLLM's CPU worker runs its warm-up outside
        # inference mode: every layer's activations were then kept for a backward pass that
        # never comes (the real model's warm-up with 8 images grew by 11 GB and was OOM-killed).
        self.requires_grad_(False)

    def get_mrope_input_positions(
        self, input_tokens: list[int], mm_features: list[MultiModalFeatureSpec]
    ) -> tuple[torch.Tensor, int]:
        """A request's positions, computed once when its prompt is first
        scheduled: the dynamic-NTK alpha of the whole prompt (images are in
        `input_tokens` as their 258 positions) rides in every position, the
        decode steps' included (rotary.py)."""
        return encoded_positions(self.config, self.positions_per_alpha, len(input_tokens))

    def get_language_model(self) -> nn.Module:
        return self.transformer

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        pixel_values = kwargs.get("pixel_values")
        if pixel_values is None:
            return []
        if isinstance(pixel_values, (list, tuple)):
            pixel_values = torch.stack(list(pixel_values))
        if isinstance(self.transformer.visual, PPMissingLayer):
            # Only the first pipeline stage encodes images; vLLM's memory profiling asks all.
            return torch.zeros(len(pixel_values), NUM_QUERIES, self.config.hidden_size, dtype=self.dtype)
        # One call encodes every image scheduled in this step, across requests.
        return self.transformer.visual(pixel_values)

    def embed_input_ids(
        self,
        input_ids: torch.Tensor,
        multimodal_embeddings: MultiModalEmbeddings | None = None,
        *,
        is_multimodal: torch.Tensor | None = None,
    ) -> torch.Tensor:
        embeds = self.transformer.wte(input_ids)
        if multimodal_embeddings is None or len(multimodal_embeddings) == 0:
            return embeds
        return _merge_multimodal_embeddings(embeds, multimodal_embeddings, is_multimodal)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor | IntermediateTensors:
        return self.transformer(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def process_weights_after_loading(self) -> None:
        """vLLM's hook after every layer picked its kernel: on a CPU without bfloat16 products,
        bfloat16 layers multiply in float32 (cpu_products.py)."""
        use_float32_products(self)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load every tensor of the real checkpoint by its own name; an unknown
        or missing tensor fails here, naming the checkpoint's tensor. A 4-bit
        checkpoint's tensors that vLLM's layers do not take (`g_idx`, GPTQ's zero
        biases) are checked against what the layers compute, then dropped."""
        params = dict(self.named_parameters())
        expected = {checkpoint_name(name, shard) for name in params for shard in stacked_shards(name)}
        quant_config = self.quant_config
        seen: set[str] = set()
        for name, tensor in weights:
            target, shard = name, None
            for ckpt_part, (param_part, shard_id) in STACKED_PARAMS.items():
                if ckpt_part in name:
                    target, shard = name.replace(ckpt_part, param_part), shard_id
                    break
            if is_pp_missing_parameter(target, self):
                continue  # another pipeline stage's
            param = params.get(target)
            if param is None:
                layer = target.rpartition(".")[0]
                if quant_config is not None and checked_extra(name, tensor, quant_config, f"{layer}.bias" in params):
                    continue
                raise ValueError(f"unexpected tensor in the checkpoint: {name}")
            if name.endswith(".qzeros") and getattr(quant_config, "is_sym", False):
                check_zero_points(name, tensor)
            weight_loader = getattr(param, "weight_loader", default_weight_loader)
            if shard is None:
                weight_loader(param, tensor)
            else:
                weight_loader(param, tensor, shard)
            seen.add(name)
        missing = expected - seen
        if missing:
            raise ValueError(f"tensors missing from the checkpoint: {', '.join(sorted(missing))}")
        if quant_config is not None:
            gptq_in_zentorch_layout(self)
        return set(params)


def stacked_shards(param_name: str) -> list[int | None]:
    """The shards a parameter is loaded from: [None] unless it is stacked."""
    shards = [shard for part, shard in STACKED_PARAMS.values() if part in param_name]
    return shards or [None]


def checkpoint_name(param_name: str, shard: int | None) -> str:
    """Our parameter name (and shard) -> the checkpoint's tensor name."""
    for ckpt_part, (param_part, shard_id) in STACKED_PARAMS.items():
        if shard == shard_id and param_part in param_name:
            return param_name.replace(param_part, ckpt_part)
    return param_name
