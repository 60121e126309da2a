"""What the plugin adds where vLLM turns requests into engine input: the
original chat()'s history window for `vllm serve`, and the dynamic-NTK cache
salt for every way in.

History window. The original (`make_context`) adds earlier turns newest first
and stops at the first that would make the context reach `max_window_size`
(generation_config.json: 6144 for Qwen-VL-Chat), counting the system message
and the kept turns, not the new query. Our server does it on token ids
(qwen_vl.api.prompt); for `vllm serve` the renderer drops the same turns from
the messages before vLLM parses them (so their images are never fetched),
counting each turn as the plugin's chat template renders it, 258 positions an
image. Only with the plugin's template (a request or server that names its own
template gets its own rules) and a chatml checkpoint.

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
"""

from functools import cached_property

from vllm.renderers.hf import HfRenderer

from .tokenizer import IMAGE_TOKENS_PER_IMAGE

MODEL_TYPE = "qwen"
DEFAULT_SYSTEM = "You are a helpful assistant."
TEXT_PARTS = ("text", "input_text", "output_text")
IMAGE_PARTS = ("image_url", "input_image", "image_pil", "image_embeds")


def _text_and_images(content) -> tuple[str, int]:
    """A message's content as the chat template renders it: its text parts joined, and
    its number of images."""
    if content is None or isinstance(content, str):
        return content or "", 0
    texts, images = [], 0
    for part in content:
        if isinstance(part, str):
            texts.append(part)
            continue
        if not isinstance(part, dict):
            continue  # vLLM's parser refuses it
        kind = part.get("type") or next((key for key in IMAGE_PARTS if key in part), None)
        if kind in TEXT_PARTS:
            texts.append(part.get("text") or "")
        elif kind in IMAGE_PARTS:
            images += 1
    return "".join(texts), images


def within_window(messages: list, count, max_window_size: int) -> list:
    """The messages the original chat() would keep: the leading system messages, the
    newest earlier turns that fit `max_window_size` with them, the query. A turn starts
    at a user message. `count(text)` gives the token ids of rendered text (image spans
    as `<img></img>`, two ids). A conversation that does not end with a user message is
    not the original's shape and is left as it is, as is anything vLLM's parser will refuse."""
    if not all(isinstance(message, dict) for message in messages):
        return messages
    first = 0
    while first < len(messages) and messages[first].get("role") == "system":
        first += 1
    dialogue = messages[first:]
    if len(dialogue) < 2 or dialogue[-1].get("role") != "user":
        return messages

    def rendered(message) -> int:
        # As the template writes any message after the leading system ones.
        text, images = _text_and_images(message.get("content"))
        text = "".join(f"Picture {n}: <img></img>\n" for n in range(1, images + 1)) + text
        return count(f"\n<|im_start|>{message.get('role')}\n{text}<|im_end|>") + IMAGE_TOKENS_PER_IMAGE * images

    system = "\n".join(_text_and_images(m.get("content"))[0] for m in messages[:first]) if first else DEFAULT_SYSTEM
    system_size = count(f"<|im_start|>system\n{system}<|im_end|>")
    turns: list[list] = []
    for message in dialogue[:-1]:
        if message.get("role") == "user" or not turns:
            turns.append([])
        turns[-1].append(message)
    kept: list = []
    context_size = 0
    for turn in reversed(turns):
        size = sum(rendered(m) for m in turn)
        if system_size + size + context_size >= max_window_size:
            break
        kept = turn + kept
        context_size += size
    return messages[:first] + kept + dialogue[-1:]


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

    @cached_property
    def _max_window_size(self) -> int | None:
        """generation_config.json's max_window_size for a chatml Qwen checkpoint, else None."""
        from vllm.transformers_utils.config import try_get_generation_config

        config = self.model_config
        if config.hf_config.model_type != MODEL_TYPE:
            return None
        generation = try_get_generation_config(config.model, trust_remote_code=config.trust_remote_code,
                                               revision=config.revision)
        if generation is None or getattr(generation, "chat_format", None) != "chatml":
            return None
        return int(getattr(generation, "max_window_size", None) or 6144)

    def _window(self, messages, params):
        if params.chat_template is not None or self._max_window_size is None:
            return messages
        tokenizer = self.get_tokenizer()
        return within_window(list(messages), lambda text: len(tokenizer.encode(text, add_special_tokens=False)),
                             self._max_window_size)

    def render_messages(self, messages, params):
        return super().render_messages(self._window(messages, params), params)

    async def render_messages_async(self, messages, params):
        return await super().render_messages_async(self._window(messages, params), params)

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
