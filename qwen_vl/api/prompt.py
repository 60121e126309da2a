"""Chat messages -> the token ids the original Qwen-VL-Chat `chat()` builds.

ChatML (`make_context`): `<|im_start|>system\\n{system}<|im_end|>`, then for every
earlier turn `\\n<|im_start|>user\\n{query}<|im_end|>\\n<|im_start|>assistant\\n{answer}<|im_end|>`,
then the new query and `\\n<|im_start|>assistant\\n`. Role names and contents are
encoded separately, so no BPE merge crosses a boundary. Images of a user turn
are written `Picture {n}: <img></img>\\n` before its text, n restarting at 1 in
each turn; each span is `<img>` + 256 `<imgpad>` + `</img>` (258 positions).

Inside contents only the grounding tags (`<ref>`, `<box>`, `<quad>` and their
closing tags) are tokens: any other special-token string a user types
(`<|im_start|>`, `<|endoftext|>`, even `<img>`) is encoded as plain text, so
users can neither inject control tokens nor images without an image part.
"""

import re
from dataclasses import dataclass, field

import tokenizers

from qwen_vl.model_executor.tokenizer import (
    GROUNDING_TOKENS,
    IM_END_ID,
    IM_START_ID,
    IMAGE_TOKENS_PER_IMAGE,
    IMG_END_ID,
    IMG_PAD_ID,
    IMG_START_ID,
)

from .protocol import ImagePart, Message

DEFAULT_SYSTEM = "You are a helpful assistant."
IMAGE_SPAN = [IMG_START_ID] + [IMG_PAD_ID] * IMAGE_TOKENS_PER_IMAGE + [IMG_END_ID]
_GROUNDING_SPLIT = re.compile("(" + "|".join(re.escape(t) for t in GROUNDING_TOKENS) + ")")
# In completion prompts (the pretrained model's raw format) `<img>URL</img>` holds an image.
_IMAGE_URL_SPAN = re.compile(r"<img>(.*?)</img>", re.DOTALL)


class PromptError(ValueError):
    """The messages cannot be turned into a Qwen-VL prompt (a 400)."""

    def __init__(self, message: str, param: str | None = "messages"):
        super().__init__(message)
        self.param = param


@dataclass
class Prompt:
    token_ids: list[int]
    image_urls: list[str] = field(default_factory=list)  # in order of appearance


def _check_unicode(text: str, param: str) -> None:
    """JSON may carry lone surrogates ("\\ud800"), which are no Unicode text:
    the tokenizer cannot take them, so the request is refused."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise PromptError(f"{param}: the text holds a lone surrogate ({text[e.start]!r}), which is not Unicode "
                          "text", param) from None


class PromptBuilder:
    def __init__(self, backend: tokenizers.Tokenizer, max_window_size: int = 6144):
        # Two private copies of the Rust tokenizer (its special-token switch is
        # per instance and vLLM's detokenizer uses the shared one): `_plain`
        # reads every special-token string as text, `_raw` recognises them all.
        self._plain = tokenizers.Tokenizer.from_str(backend.to_str())
        self._plain.encode_special_tokens = True
        self._raw = tokenizers.Tokenizer.from_str(backend.to_str())
        self._grounding_ids = {t: self._raw.token_to_id(t) for t in GROUNDING_TOKENS}
        self.max_window_size = max_window_size
        self._newline = self.encode_text("\n")

    def encode_text(self, text: str) -> list[int]:
        """Content text: the grounding tags are tokens, nothing else is special."""
        _check_unicode(text, "messages")
        ids: list[int] = []
        for piece in _GROUNDING_SPLIT.split(text):
            if piece in self._grounding_ids:
                ids.append(self._grounding_ids[piece])
            elif piece:
                ids += self._plain.encode(piece, add_special_tokens=False).ids
        return ids

    def _message(self, role: str, content: list[int]) -> list[int]:
        return [IM_START_ID] + self.encode_text(role) + self._newline + content + [IM_END_ID]

    def _user_content(self, message: Message, image_urls: list[str]) -> list[int]:
        """Images first (`Picture n: <img></img>\\n`), then the text parts as they come."""
        if isinstance(message.content, str):
            return self.encode_text(message.content)
        parts = message.content or []
        images = [p.image_url.url for p in parts if isinstance(p, ImagePart)]
        text = "".join(p.text for p in parts if not isinstance(p, ImagePart))
        ids: list[int] = []
        pending = ""
        for n, url in enumerate(images, start=1):
            ids += self.encode_text(pending + f"Picture {n}: ")
            ids += IMAGE_SPAN
            image_urls.append(url)
            pending = "\n"
        # The "\n" after the last span and the text form one piece, as in the original.
        return ids + self.encode_text(pending + text)

    def _text(self, message: Message, index: int) -> str:
        """The text of a system or assistant message, which may not hold images."""
        if message.content is None or isinstance(message.content, str):
            return message.content or ""
        if any(isinstance(p, ImagePart) for p in message.content):
            raise PromptError(f"messages[{index}]: only user messages may hold images", f"messages[{index}].content")
        return "".join(p.text for p in message.content)

    def _text_content(self, message: Message, index: int) -> list[int]:
        return self.encode_text(self._text(message, index))

    def chat(self, messages: list[Message]) -> Prompt:
        first = 0
        while first < len(messages) and messages[first].role == "system":
            first += 1
        dialogue = list(enumerate(messages))[first:]
        if not dialogue or dialogue[-1][1].role != "user":
            raise PromptError("the last message must come from the user")
        for i, message in dialogue:
            if message.role == "system":
                raise PromptError(f"messages[{i}]: system messages must come first", f"messages[{i}].role")
        system_ids = self._message("system", self._system_ids(messages[:first]))

        # Turns: each starts at a user message; the last user message is the query.
        turns: list[list[tuple[int, Message]]] = []
        for i, message in dialogue[:-1]:
            if message.role == "user" or not turns:
                turns.append([])
            turns[-1].append((i, message))
        turns.append([dialogue[-1]])

        rendered: list[tuple[list[int], list[str]]] = []
        for turn in turns:
            ids: list[int] = []
            urls: list[str] = []
            for i, message in turn:
                content = self._user_content(message, urls) if message.role == "user" else self._text_content(message, i)
                ids += self._newline + self._message(message.role, content)
            rendered.append((ids, urls))

        query_ids, query_urls = rendered.pop()
        # The original adds history newest first and stops at the first turn
        # that would make the context reach max_window_size.
        context: list[int] = []
        context_urls: list[str] = []
        for ids, urls in reversed(rendered):
            if len(system_ids) + len(ids) + len(context) >= self.max_window_size:
                break
            context = ids + context
            context_urls = urls + context_urls
        reply = self._newline + [IM_START_ID] + self.encode_text("assistant") + self._newline
        return Prompt(system_ids + context + query_ids + reply, context_urls + query_urls)

    def _system_ids(self, system_messages: list[Message]) -> list[int]:
        if not system_messages:
            return self.encode_text(DEFAULT_SYSTEM)
        texts = [self._text(message, i) for i, message in enumerate(system_messages)]
        return self.encode_text("\n".join(texts))

    def completion(self, text: str) -> Prompt:
        """A raw prompt for the pretrained Qwen-VL: every special-token string is
        a token (as the original tokenizer reads raw text) and each
        `<img>URL</img>` span holds the URL of an image."""
        _check_unicode(text, "prompt")
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
