"""Qwen-VL / Qwen-VL-Chat as a vLLM out-of-tree model plugin.

vLLM calls `register` (entry point group `vllm.general_plugins`) in every
process it starts; each step is idempotent.
"""

from pathlib import Path

ARCHITECTURE = "QWenLMHeadModel"
MODEL_TYPE = "qwen"
# The original chat() prompt as a Jinja template, for vLLM's own OpenAI server
# (`vllm serve`). Both servers build the ids of the original's conversations with
# chat_prompt.py (renderer.py for `vllm serve`); the template renders the rest.
CHAT_TEMPLATE = Path(__file__).with_name("chat_template.jinja")


def register() -> None:
    from vllm import ModelRegistry
    from vllm.transformers_utils.chat_templates.registry import (
        get_chat_template_fallback_path,
        register_chat_template_fallback_path,
    )

    from .config import register_config
    from .exit import install_fast_exit
    from .renderer import register_renderer
    from .sampling import install_cpu_top_p
    from .serving import register_serving_defaults
    from .tokenizer import register_tokenizer

    install_fast_exit()
    install_cpu_top_p()
    register_config()
    register_tokenizer()
    register_renderer()
    register_serving_defaults(ARCHITECTURE)
    if get_chat_template_fallback_path(MODEL_TYPE, "") != CHAT_TEMPLATE:
        register_chat_template_fallback_path(MODEL_TYPE, CHAT_TEMPLATE)
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        # Lazy "module:class" form: the model module imports torch layers that
        # must not initialise a device in the process that registers.
        ModelRegistry.register_model(ARCHITECTURE, "qwen_vl.model_executor.model:QWenLMHeadModel")
