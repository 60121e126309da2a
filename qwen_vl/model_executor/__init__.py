"""Qwen-VL / Qwen-VL-Chat as a vLLM out-of-tree model plugin.

vLLM calls `register` (entry point group `vllm.general_plugins`) in every
process it starts; each step is idempotent.
"""

ARCHITECTURE = "QWenLMHeadModel"


def register() -> None:
    from vllm import ModelRegistry

    from .config import register_config
    from .tokenizer import register_tokenizer

    register_config()
    register_tokenizer()
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        # Lazy "module:class" form: the model module imports torch layers that
        # must not initialise a device in the process that registers.
        ModelRegistry.register_model(ARCHITECTURE, "qwen_vl.model_executor.model:QWenLMHeadModel")
