"""Keeps prefix caching exact under dynamic NTK.

vLLM's prefix cache reuses a block when the token ids (and images) before
and in it are the same. Under dynamic NTK that is not enough: the cached keys
were rotated with the alpha of the prompt that computed them (rotary.py), and
a prompt with another alpha must not reuse them. vLLM lets a request carry a
`cache_salt` that enters the hash of its first block (and so of all blocks
after it); giving every prompt with alpha > 1 the salt of its alpha keeps the
alphas apart, while prompts of one alpha share their prefixes as before
(alpha 1, every prompt up to `seq_length` tokens, carries no salt of ours).

The salt is set where vLLM turns every prompt into engine input (the offline
`LLM`, `vllm serve` and our server alike): the renderer, after image spans
are expanded and the prompt truncated, so it sees the length the model will.
"""

from vllm.renderers.hf import HfRenderer

MODEL_TYPE = "qwen"


def ntk_cache_salt(user_salt: str | None, alpha: int) -> str | None:
    """The cache salt of a prompt with this alpha: the user's own salt, if
    any, still separates users; ours is appended only when alpha > 1."""
    if alpha == 1:
        return user_salt
    return f"{user_salt or ''}|qwen-vl-dynamic-ntk-alpha={alpha}"


class QwenVLRenderer(HfRenderer):
    """vLLM's Hugging Face renderer, plus the dynamic-NTK cache salt when
    the model is Qwen-VL; unchanged for every other model."""

    def _salt(self, engine_input):
        config = self.model_config.hf_config
        if config.model_type == MODEL_TYPE and "prompt_token_ids" in engine_input:
            alpha = config.ntk_alpha(len(engine_input["prompt_token_ids"]))
            salt = ntk_cache_salt(engine_input.get("cache_salt"), alpha)
            if salt is not None:
                engine_input["cache_salt"] = salt
        return engine_input

    def _process_singleton(self, prompt, **kwargs):
        return self._salt(super()._process_singleton(prompt, **kwargs))

    async def _process_singleton_async(self, prompt, **kwargs):
        return self._salt(await super()._process_singleton_async(prompt, **kwargs))


def register_renderer() -> None:
    """Serve renderer mode "hf" (what tokenizer_mode "auto" resolves to) with
    QwenVLRenderer. Written to the registry's table directly: its `register`
    would log an "overwritten" warning in every process vLLM starts."""
    from vllm.renderers.registry import RENDERER_REGISTRY

    RENDERER_REGISTRY.renderers["hf"] = (__name__, QwenVLRenderer.__name__)
