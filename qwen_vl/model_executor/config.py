"""Configuration of Qwen-VL / Qwen-VL-Chat, readable without the checkpoint's remote code.

The published config.json names `model_type: "qwen"` and points `auto_map` at
`configuration_qwen.QWenConfig` (remote code). Registering this class under "qwen" lets
transformers and vLLM load that file with `trust_remote_code=False`: both consult the
registered model type before they would consider the remote code.
"""

import math
from dataclasses import field

import transformers


def _real_visual() -> dict:
    return {
        "heads": 16,
        "image_size": 448,
        "image_start_id": 151857,
        "layers": 48,
        "mlp_ratio": 4.9231,
        "output_dim": 4096,
        "patch_size": 14,
        "width": 1664,
    }


class QWenConfig(transformers.PretrainedConfig):
    """Every key of the real config.json, defaulting to the real checkpoint's values.

    `visual` stays a plain dict (as in config.json) because the model reads it by key.
    """

    model_type = "qwen"
    # The standard names vLLM looks up first (it warns when it falls back to the Qwen ones).
    attribute_map = {"rope_theta": "rotary_emb_base", "partial_rotary_factor": "rotary_pct"}

    vocab_size: int = 151936
    hidden_size: int = 4096
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    kv_channels: int = 128
    intermediate_size: int = 22016
    layer_norm_epsilon: float = 1e-6
    initializer_range: float = 0.02
    # Rotary and logn scaling are defined relative to the training length (seq_length);
    # max_position_embeddings is what dynamic NTK lets the model reach.
    seq_length: int = 2048
    max_position_embeddings: int = 8192
    rotary_emb_base: int | float = 10000
    rotary_pct: float = 1.0
    use_dynamic_ntk: bool = True
    use_logn_attn: bool = True
    no_bias: bool = True
    scale_attn_weights: bool = True
    attn_dropout_prob: float = 0.0
    emb_dropout_prob: float = 0.0
    use_cache: bool = True
    use_flash_attn: bool | str = False
    bf16: bool = False
    fp16: bool = False
    fp32: bool = False
    onnx_safe: bool | None = None
    tie_word_embeddings: bool = False
    tokenizer_type: str = "QWenTokenizer"
    visual: dict = field(default_factory=_real_visual)

    def ntk_alpha(self, prompt_length: int) -> int:
        """The original's dynamic-NTK alpha for a prompt of `prompt_length`
        positions (images included, 258 each), decided once at prefill:
        1 up to seq_length (2048), then 3 up to 4096, 7 up to 8192, ..."""
        if not self.use_dynamic_ntk or prompt_length <= self.seq_length:
            return 1
        context_value = math.log(prompt_length / self.seq_length, 2) + 1
        return max(2 ** math.ceil(context_value) - 1, 1)

    @property
    def model_max_length(self) -> int:
        """The longest context vLLM serves by default. With dynamic NTK the
        original answers up to max_position_embeddings (8192), not just its
        training length `seq_length`, which vLLM would otherwise pick as the
        smallest of the length keys it knows."""
        return self.max_position_embeddings if self.use_dynamic_ntk else self.seq_length

    @property
    def mrope_section(self) -> list[int]:
        """Makes vLLM ask the model for each request's positions
        (`get_mrope_input_positions`), the route of dynamic NTK (rotary.py).
        Qwen's rotary itself is 1-D: the three rows vLLM keeps are equal."""
        head_dim = self.hidden_size // self.num_attention_heads
        return [head_dim // 2, 0, 0]


def register_config() -> None:
    """Make `AutoConfig` (and so vLLM's config loader) map model_type "qwen" to QWenConfig.

    Idempotent. vLLM spawns several processes, so this must run in each of them (the plugin
    entry point does); registering only in the parent leaves children to a failing retry loop.
    """
    transformers.AutoConfig.register(QWenConfig.model_type, QWenConfig, exist_ok=True)


def tensor_parallel_sizes(config: QWenConfig) -> dict[str, int]:
    """The sizes that tensor parallelism splits across ranks (the adapter is
    replicated; vLLM itself checks the decoder's heads and pads the vocabulary)."""
    visual = config.visual
    return {
        "intermediate_size // 2 (decoder MLP width)": config.intermediate_size // 2,
        "visual.heads (ViT heads)": visual["heads"],
        "int(visual.width * visual.mlp_ratio) (ViT MLP width)": int(visual["width"] * visual["mlp_ratio"]),
    }


def check_tensor_parallel(config: QWenConfig, tp_size: int) -> None:
    """A clear error at start for a split that vLLM's parallel layers would
    otherwise refuse deep inside model construction, on every rank."""
    for name, size in tensor_parallel_sizes(config).items():
        if size % tp_size:
            raise ValueError(
                f"Qwen-VL: {name} = {size} is not divisible by the tensor-parallel size {tp_size}; "
                f"choose a --tensor-parallel-size that divides it"
            )


class VerifyParallelSizes:
    """vLLM's per-architecture config hook (`MODELS_CONFIG_MAP`), run once in
    the process that builds the engine's config, before any worker starts."""

    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        check_tensor_parallel(vllm_config.model_config.hf_config, vllm_config.parallel_config.tensor_parallel_size)

    @staticmethod
    def verify_and_update_model_config(model_config) -> None:
        return
