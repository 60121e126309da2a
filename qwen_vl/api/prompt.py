"""Chat messages and raw completion prompts -> token ids.

Chat: the original Qwen-VL-Chat `chat()`'s prompt, built by
qwen_vl.model_executor.chat_prompt (shared with `vllm serve`), from our
request messages. Completions: the pretrained Qwen-VL's raw format, where each
`<img>URL</img>` holds an image.
"""

import re
from dataclasses import dataclass, field

import tokenizers

from qwen_vl.model_executor.chat_prompt import (
    DEFAULT_MAX_WINDOW_SIZE,
    ChatMessage,
    ChatPromptBuilder,
    PromptError,
    check_unicode,
)
from qwen_vl.model_executor.tokenizer import IMAGE_SPAN, IMG_END_ID, IMG_START_ID

from .protocol import ImagePart, Message

__all__ = ["Prompt", "PromptBuilder", "PromptError", "truncate"]

# In completion prompts (the pretrained model's raw format) `<img>URL</img>` holds an image.
_IMAGE_URL_SPAN = re.compile(r"<img>(.*?)</img>", re.DOTALL)


@dataclass
class Prompt:
    token_ids: list[int]
    image_urls: list[str] = field(default_factory=list)  # in order of appearance


def chat_message(message: Message) -> ChatMessage:
    if message.content is None or isinstance(message.content, str):
        return ChatMessage(message.role, message.content or "")
    images = [p.image_url.url for p in message.content if isinstance(p, ImagePart)]
    text = "".join(p.text for p in message.content if not isinstance(p, ImagePart))
    return ChatMessage(message.role, text, images)


class PromptBuilder(ChatPromptBuilder):
    def __init__(self, backend: tokenizers.Tokenizer, max_window_size: int = DEFAULT_MAX_WINDOW_SIZE):
        super().__init__(backend, max_window_size)
        # Raw prompts read every special-token string as the token it names.
        self._raw = tokenizers.Tokenizer.from_str(backend.to_str())

    def chat(self, messages: list[Message]) -> Prompt:
        prompt = self.build([chat_message(message) for message in messages])
        return Prompt(prompt.token_ids, prompt.images)

    def completion(self, text: str) -> Prompt:
        """A raw prompt for the pretrained Qwen-VL: every special-token string is
        a token (as the original tokenizer reads raw text) and each
        `<img>URL</img>` span holds the URL of an image."""
        check_unicode(text, "prompt")
        ids: list[int] = []
        urls: list[str] = []
        position = 0
        for match in _IMAGE_URL_SPAN.finditer(text):
            ids += self._raw.encode(text[position : match.start()], add_special_tokens=False).ids
            url = match.group(1).strip()
            if not url:
                raise PromptError("prompt: an <img></img> span must hold an image URL", "prompt")
            urls.append(url)
            ids += IMAGE_SPAN
            position = match.end()
        ids += self._raw.encode(text[position:], add_special_tokens=False).ids
        if ids.count(IMG_START_ID) != len(urls) or ids.count(IMG_END_ID) != len(urls):
            raise PromptError("prompt: unbalanced <img> tags", "prompt")
        if not ids:  # the engine refuses an empty prompt
            raise PromptError("prompt: the prompt is empty", "prompt")
        return Prompt(ids, urls)


def truncate(prompt: Prompt, keep: int, side: str) -> Prompt:
    """vLLM's truncate_prompt_tokens: keep the first (`right`) or last (`left`)
    `keep` tokens. An image span is kept whole or dropped with its image;
    a cut through one is refused."""
    ids = prompt.token_ids
    if keep >= len(ids):
        return prompt
    start, stop = (len(ids) - keep, len(ids)) if side == "left" else (0, keep)
    urls = []
    spans = [i for i, token in enumerate(ids) if token == IMG_START_ID]
    for url, first in zip(prompt.image_urls, spans):
        last = first + len(IMAGE_SPAN)
        if start <= first and last <= stop:
            urls.append(url)
        elif first < stop and start < last:
            raise PromptError(f"truncate_prompt_tokens={keep} would cut through an image's {len(IMAGE_SPAN)} "
                              "positions", "truncate_prompt_tokens")
    return Prompt(ids[start:stop], urls)
