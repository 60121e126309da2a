"""Chat messages -> the token ids the original Qwen-VL-Chat `chat()` builds,
for both ways in: our server (qwen_vl.api.prompt) and `vllm serve` (the
plugin's renderer).

ChatML (`make_context`): `<|im_start|>system\\n{system}<|im_end|>`, then for every
earlier turn `\\n<|im_start|>user\\n{query}<|im_end|>\\n<|im_start|>assistant\\n{answer}<|im_end|>`,
then the new query and `\\n<|im_start|>assistant\\n`. Role names and contents are
encoded separately, so no BPE merge crosses a boundary. Images of a user turn
are written `Picture {n}: <img></img>\\n` before its text, n restarting at 1 in
each turn; each span is `<img>` + 256 `<imgpad>` + `</img>` (258 positions).
Earlier turns are added newest first until one would make the context reach
`max_window_size`; it and all older turns are dropped.

Inside contents only the grounding tags (`<ref>`, `<box>`, `<quad>` and their
closing tags) are tokens: any other special-token string a user types
(`<|im_start|>`, `<|endoftext|>`, even `<img>`) is encoded as plain text, so
users can neither inject control tokens nor images without an image part.
"""

import re
from dataclasses import dataclass, field
from typing import Any

import tokenizers

from .tokenizer import GROUNDING_TOKENS, IM_END_ID, IM_START_ID, IMAGE_SPAN

DEFAULT_SYSTEM = "You are a helpful assistant."
DEFAULT_MAX_WINDOW_SIZE = 6144  # Qwen-VL-Chat's, and where generation_config.json names none
# The original chat() ends its answer at the end of its turn or the start of another
# (`get_stop_words_ids` for chatml); <|endoftext|>, the checkpoint's eos, ends it too.
CHAT_STOP_TOKEN_IDS = (IM_END_ID, IM_START_ID)
_GROUNDING_SPLIT = re.compile("(" + "|".join(re.escape(t) for t in GROUNDING_TOKENS) + ")")


class PromptError(ValueError):
    """The messages cannot be turned into a Qwen-VL prompt (a 400)."""

    def __init__(self, message: str, param: str | None = "messages"):
        super().__init__(message)
        self.param = param


@dataclass
class ChatMessage:
    """One message as the prompt sees it: its role, its text parts joined, and its images
    (whatever the caller uses to name them: URLs, content parts)."""

    role: str
    text: str
    images: list[Any] = field(default_factory=list)


@dataclass
class ChatPrompt:
    token_ids: list[int]
    images: list[Any]  # of the kept messages, in order of appearance
    dropped: int  # earlier messages left out by the window, after the leading system ones


def check_unicode(text: str, param: str) -> None:
    """JSON may carry lone surrogates ("\\ud800"), which are no Unicode text:
    the tokenizer cannot take them, so the request is refused."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise PromptError(f"{param}: the text holds a lone surrogate ({text[e.start]!r}), which is not Unicode "
                          "text", param) from None


class ChatPromptBuilder:
    def __init__(self, backend: tokenizers.Tokenizer, max_window_size: int = DEFAULT_MAX_WINDOW_SIZE):
        # A private copy of the Rust tokenizer (its special-token switch is per instance
        # and vLLM's detokenizer uses the shared one) that reads every special-token
        # string as text.
        self._plain = tokenizers.Tokenizer.from_str(backend.to_str())
        self._plain.encode_special_tokens = True
        self._grounding_ids = {t: backend.token_to_id(t) for t in GROUNDING_TOKENS}
        self.max_window_size = max_window_size
        self._newline = self.encode_text("\n")

    def encode_text(self, text: str) -> list[int]:
        """Content text: the grounding tags are tokens, nothing else is special."""
        check_unicode(text, "messages")
        ids: list[int] = []
        for piece in _GROUNDING_SPLIT.split(text):
            if piece in self._grounding_ids:
                ids.append(self._grounding_ids[piece])
            elif piece:
                ids += self._plain.encode(piece, add_special_tokens=False).ids
        return ids

    def _message(self, role: str, content: list[int]) -> list[int]:
        return [IM_START_ID] + self.encode_text(role) + self._newline + content + [IM_END_ID]

    def _content(self, message: ChatMessage) -> list[int]:
        """A user message's images first (`Picture n: <img></img>\\n`), then its text."""
        ids: list[int] = []
        pending = ""
        for n in range(1, len(message.images) + 1):
            ids += self.encode_text(pending + f"Picture {n}: ") + IMAGE_SPAN
            pending = "\n"
        # The "\n" after the last span and the text form one piece, as in the original.
        return ids + self.encode_text(pending + message.text)

    def build(self, messages: list[ChatMessage]) -> ChatPrompt:
        """`messages` in the request's order: errors name them by their position."""
        first = 0
        while first < len(messages) and messages[first].role == "system":
            first += 1
        dialogue = messages[first:]
        if not dialogue or dialogue[-1].role != "user":
            raise PromptError("the last message must come from the user")
        for i, message in enumerate(messages):
            if message.role == "system" and i >= first:
                raise PromptError(f"messages[{i}]: system messages must come first", f"messages[{i}].role")
            if message.images and message.role != "user":
                raise PromptError(f"messages[{i}]: only user messages may hold images", f"messages[{i}].content")
        system = "\n".join(m.text for m in messages[:first]) if first else DEFAULT_SYSTEM
        system_ids = self._message("system", self.encode_text(system))

        # Turns: each starts at a user message; the last user message is the query.
        turns: list[list[ChatMessage]] = []
        for message in dialogue[:-1]:
            if message.role == "user" or not turns:
                turns.append([])
            turns[-1].append(message)
        turns.append([dialogue[-1]])
        rendered = [sum((self._newline + self._message(m.role, self._content(m)) for m in turn), []) for turn in turns]

        query_ids, query = rendered.pop(), turns.pop()
        # The original adds history newest first and stops at the first turn
        # that would make the context reach max_window_size.
        context: list[int] = []
        kept: list[ChatMessage] = []
        for ids, turn in zip(reversed(rendered), reversed(turns)):
            if len(system_ids) + len(ids) + len(context) >= self.max_window_size:
                break
            context = ids + context
            kept = turn + kept
        reply = self._newline + [IM_START_ID] + self.encode_text("assistant") + self._newline
        images = [image for message in kept + query for image in message.images]
        return ChatPrompt(system_ids + context + query_ids + reply, images, len(dialogue) - 1 - len(kept))
