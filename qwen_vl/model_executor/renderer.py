"""What the plugin adds where vLLM turns requests into engine input: the
original chat()'s prompt for `vllm serve`, and the dynamic-NTK cache salt for
every way in.

The original's prompt. vLLM renders a chat template to text and tokenizes the
whole of it, reading every special-token string in it as a token. The original
encodes role names and contents apart and reads no special token in what users
typed but the grounding tags: under the template, a user's `<|im_end|>` would end
their turn, and a content that starts with a newline would merge with the one
after the role. It also drops the oldest turns where they would take the context
to `max_window_size` (generation_config.json: 6144 for Qwen-VL-Chat). So for a
conversation of the original's shape (system messages first, then turns, ending
with a user message; images in user messages only) the renderer builds the
token ids with the same code as our server (chat_prompt.ChatPromptBuilder),
lets vLLM parse only the messages the window keeps (so the dropped turns'
images are never fetched), and hands vLLM those ids in place of the template's
text. Anything else (another shape, a chat template named by the server or the
request, `continue_final_message`, no generation prompt, a part type the
original has no form for, a checkpoint that is not chatml) goes through
vLLM's template path unchanged.

Prefix caching under dynamic NTK.

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

How vLLM comes to use it: vLLM picks a model's renderer by its tokenizer mode
(`vllm.renderers.renderer_from_config`), as it gives its own Kimi K3 and
Inkling theirs. Mode "qwen_vl" is registered here, with vLLM's Hugging Face
tokenizer and this renderer, and the per-architecture hook (serving.py) sets
it for Qwen-VL; other models keep vLLM's renderers.
"""

import asyncio
from functools import cached_property

from vllm.renderers.hf import HfRenderer

from .chat_prompt import ChatMessage, ChatPromptBuilder, PromptError
from .checkpoint_facts import CheckpointFacts

RENDERER_MODE = "qwen_vl"  # vLLM's tokenizer mode that selects QwenVLRenderer
ROLES = ("system", "user", "assistant")
TEXT_PARTS = ("text", "input_text", "output_text")
IMAGE_PARTS = ("image_url", "input_image", "image_pil", "image_embeds")


def chat_messages(messages: list) -> list[ChatMessage] | None:
    """vLLM's request messages (OpenAI's dicts) as the prompt sees them, each image
    part kept as is; None if a message or part has no form in the original's prompt."""
    out = []
    for message in messages:
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            return None
        content = message.get("content")
        if content is None or isinstance(content, str):
            out.append(ChatMessage(message["role"], content or ""))
            continue
        texts, images = [], []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
                continue
            if not isinstance(part, dict):
                return None
            # vLLM also takes an image part without a type.
            kind = part.get("type") or next((key for key in IMAGE_PARTS if key in part), None)
            if kind in TEXT_PARTS and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif kind in IMAGE_PARTS:
                images.append(part)
            else:
                return None
        out.append(ChatMessage(message["role"], "".join(texts), images))
    return out


def original_prompt(builder: ChatPromptBuilder, messages: list) -> tuple[list, list[int]] | None:
    """(the messages the original's window keeps, the original's token ids for them),
    or None where the conversation has no form in the original's prompt."""
    converted = chat_messages(messages)
    if converted is None:
        return None
    try:
        prompt = builder.build(converted)
    except PromptError:
        return None
    first = next((i for i, m in enumerate(converted) if m.role != "system"), len(converted))
    return list(messages[:first]) + list(messages[first + prompt.dropped:]), prompt.token_ids


def ntk_cache_salt(user_salt: str | None, alpha: int) -> str | None:
    """The cache salt of a prompt with this alpha: the user's own salt, if
    any, still separates users; ours is appended only when alpha > 1."""
    if alpha == 1:
        return user_salt
    return f"{user_salt or ''}|qwen-vl-dynamic-ntk-alpha={alpha}"


class QwenVLRenderer(HfRenderer):
    """vLLM's Hugging Face renderer, plus the original's prompt and the
    dynamic-NTK cache salt."""

    def _salt(self, engine_input):
        if "prompt_token_ids" in engine_input:
            alpha = self.model_config.hf_config.ntk_alpha(len(engine_input["prompt_token_ids"]))
            salt = ntk_cache_salt(engine_input.get("cache_salt"), alpha)
            if salt is not None:
                engine_input["cache_salt"] = salt
        return engine_input

    @cached_property
    def _builder(self) -> ChatPromptBuilder | None:
        """The original's prompt builder for a chatml checkpoint, else None."""
        checkpoint = CheckpointFacts(self.model_config)
        if not checkpoint.chatml:
            return None
        return ChatPromptBuilder(self.get_tokenizer().backend_tokenizer, checkpoint.max_window_size)

    def _original(self, messages, params) -> tuple[list, list[int]] | None:
        template_kwargs = params.get_apply_chat_template_kwargs()
        if (params.chat_template is not None or template_kwargs.get("continue_final_message")
                or not template_kwargs.get("add_generation_prompt", True) or self._builder is None):
            return None
        return original_prompt(self._builder, messages)

    @staticmethod
    def _with_ids(prompt: dict, ids: list[int]) -> dict:
        """vLLM's prompt for the kept messages (their images), the original's ids for its text."""
        return {**{k: v for k, v in prompt.items() if k not in ("prompt", "prompt_token_ids")}, "prompt_token_ids": ids}

    def render_messages(self, messages, params):
        original = self._original(messages, params)
        if original is None:
            return super().render_messages(messages, params)
        conversation, prompt = super().render_messages(original[0], params)
        return conversation, self._with_ids(prompt, original[1])

    async def render_messages_async(self, messages, params):
        # Tokenizing a long conversation takes real time: not on the server's event loop.
        original = await asyncio.to_thread(self._original, messages, params)
        if original is None:
            return await super().render_messages_async(messages, params)
        conversation, prompt = await super().render_messages_async(original[0], params)
        return conversation, self._with_ids(prompt, original[1])

    def _process_singleton(self, prompt, **kwargs):
        return self._salt(super()._process_singleton(prompt, **kwargs))

    async def _process_singleton_async(self, prompt, **kwargs):
        return self._salt(await super()._process_singleton_async(prompt, **kwargs))


def register_renderer() -> None:
    """Tokenizer mode "qwen_vl": vLLM's Hugging Face tokenizer (mode "hf"'s) and
    QwenVLRenderer. Idempotent (the registries warn when a mode is registered again)."""
    from vllm.renderers.registry import RENDERER_REGISTRY
    from vllm.tokenizers.registry import TokenizerRegistry

    if RENDERER_MODE not in TokenizerRegistry.tokenizers:
        TokenizerRegistry.register(RENDERER_MODE, *TokenizerRegistry.tokenizers["hf"])
    if RENDERER_MODE not in RENDERER_REGISTRY.renderers:
        RENDERER_REGISTRY.register(RENDERER_MODE, __name__, QwenVLRenderer.__name__)
