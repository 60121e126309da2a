"""What the server and the plugin's hooks into vLLM know of the served checkpoint, read in one
place.

Qwen-VL's generation_config.json carries, beside its sampling defaults, two facts of the original
`chat()`: `chat_format` ("chatml" for Qwen-VL-Chat: its chat prompt and its stops apply) and
`max_window_size` (6144: how far the chat history may take the context before the oldest turns are
dropped). They are read as vLLM's model config reads that file (its revision, trust_remote_code,
token, config path and format), and always from the checkpoint: `--generation-config` replaces
vLLM's sampling defaults, not the prompt format the checkpoint was trained for.

Facts of the format itself, the same in every Qwen-VL checkpoint, are constants, also where no
vLLM model config is (the benchmarks' baseline): the special token ids and IMAGE_SPAN
(tokenizer.py), CHAT_STOP_TOKEN_IDS and DEFAULT_MAX_WINDOW_SIZE (chat_prompt.py).
"""

import copy
from functools import cached_property

from .chat_prompt import CHAT_STOP_TOKEN_IDS, DEFAULT_MAX_WINDOW_SIZE


def checkpoint_generation_config(model_config) -> dict:
    """The checkpoint's generation_config.json, its fields that differ from transformers' defaults
    ({} where there is none): what vLLM's model config reads for `generation_config="auto"`,
    whatever --generation-config names."""
    checkpoint = copy.copy(model_config)  # shallow: vLLM's own model config stays as it is
    checkpoint.generation_config = "auto"
    return checkpoint.try_get_generation_config()


class CheckpointFacts:
    """The facts of the checkpoint that vLLM's ModelConfig `model_config` serves; made by the
    engine (`Engine.checkpoint`), `vllm serve`'s renderer and the per-architecture hook
    (serving.py)."""

    def __init__(self, model_config):
        self.model_config = model_config
        self.generation_config: dict = checkpoint_generation_config(model_config)
        # The original chat()'s prompt and stops are the checkpoint's own.
        self.chatml: bool = self.generation_config.get("chat_format") == "chatml"
        # How far the chat history may take the context (chat_prompt.ChatPromptBuilder).
        self.max_window_size: int = int(self.generation_config.get("max_window_size") or DEFAULT_MAX_WINDOW_SIZE)
        # Where a chat answer ends, besides eos: a chat prompt is ChatML whatever the checkpoint.
        self.stop_token_ids: tuple[int, ...] = CHAT_STOP_TOKEN_IDS

    @cached_property
    def sampling_defaults(self) -> dict:
        """What vLLM gives the sampling fields a request leaves unset (Qwen-VL-Chat: top_p 0.3,
        top_k 0 = off, max_tokens 512), from the generation config vLLM serves with
        (--generation-config, --override-generation-config). Read when first asked, not when the
        per-architecture hook makes its facts: vLLM's model config is still being built then."""
        return self.model_config.get_diff_sampling_param()
