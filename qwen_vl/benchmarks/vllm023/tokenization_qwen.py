"""The Qwen tokenizer as the remote code vLLM 0.23 expects of a Qwen-VL checkpoint.

`tokenizer_config.json` names `tokenization_qwen.QWenTokenizer` in its `auto_map`; served with
`--trust-remote-code`, transformers loads this file from the checkpoint directory (the benchmark
copies it there: `qwen_vl.benchmarks.vllm023.prepare_checkpoint`). It imports nothing of this
project: vLLM 0.23 runs in its own environment.

vLLM 0.23 (`vllm/tokenizers/qwen_vl.py`, `vllm/model_executor/models/qwen_vl.py`) wraps the loaded
class, replacing `tokenize` and `_decode`, and reads these attributes:
    tokenizer       a tiktoken Encoding of the BPE ranks and the special tokens
    decoder         id -> token (bytes for BPE ranks, str for special tokens)
    errors          how invalid UTF-8 decodes
    special_tokens  special token -> id
    image_start_tag, image_end_tag, image_pad_tag   "<img>", "</img>", "<imgpad>"
The ids are the original's: the 151643 ranks of `qwen.tiktoken`, then `<|endoftext|>`,
`<|im_start|>`, `<|im_end|>`, `<|extra_0|>`..`<|extra_204|>`, the grounding tags and the image
tags (151643..151859). Text is NFC-normalised before encoding and every special-token string in
it is a special token, as vLLM 0.23's wrapper encodes (it renders chat templates to text).
"""

import base64
import unicodedata

import tiktoken
from transformers import PreTrainedTokenizer

VOCAB_FILE = "qwen.tiktoken"
# Like GPT-4's pattern, but digits are split one by one.
PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    *(f"<|extra_{i}|>" for i in range(205)),
    "<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>",
    "<img>", "</img>", "<imgpad>",
)


def read_ranks(path: str) -> dict[bytes, int]:
    """`qwen.tiktoken`: one "base64(token) rank" per line."""
    with open(path, "rb") as lines:
        return {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in lines if line.strip())}


class QWenTokenizer(PreTrainedTokenizer):
    vocab_files_names = {"vocab_file": VOCAB_FILE}
    image_start_tag = "<img>"
    image_end_tag = "</img>"
    image_pad_tag = "<imgpad>"

    def __init__(self, vocab_file: str, errors: str = "replace", **kwargs):
        # Before the base class: its __init__ already asks for the vocabulary.
        self.errors = errors
        self.mergeable_ranks = read_ranks(vocab_file)
        first = len(self.mergeable_ranks)
        self.special_tokens = {token: first + i for i, token in enumerate(SPECIAL_TOKENS)}
        self.tokenizer = tiktoken.Encoding("qwen", pat_str=PATTERN, mergeable_ranks=self.mergeable_ranks,
                                           special_tokens=self.special_tokens)
        self.decoder: dict[int, bytes | str] = {i: token for token, i in self.mergeable_ranks.items()}
        self.decoder |= {i: token for token, i in self.special_tokens.items()}
        self.eod_id = self.special_tokens["<|endoftext|>"]
        super().__init__(errors=errors, **kwargs)

    @property
    def vocab_size(self) -> int:
        return len(self.decoder)

    def get_vocab(self) -> dict[bytes | str, int]:
        return {**self.mergeable_ranks, **self.special_tokens}

    def tokenize(self, text: str, **kwargs) -> list[bytes | str]:
        text = unicodedata.normalize("NFC", text)
        return [self.decoder[i] for i in self.tokenizer.encode(text, allowed_special="all")]

    def _convert_token_to_id(self, token: bytes | str) -> int:
        if token in self.special_tokens:
            return self.special_tokens[token]
        return self.mergeable_ranks[token]

    def _convert_id_to_token(self, index: int) -> bytes | str:
        return self.decoder[index]

    def convert_tokens_to_string(self, tokens: list[bytes | str]) -> str:
        # Byte tokens may split a UTF-8 character: join runs of bytes before decoding.
        text, pending = [], b""
        for token in tokens:
            if isinstance(token, bytes):
                pending += token
                continue
            text += [pending.decode("utf-8", errors=self.errors), token]
            pending = b""
        return "".join(text) + pending.decode("utf-8", errors=self.errors)

    def _decode(self, token_ids: int | list[int], skip_special_tokens: bool = False, errors: str | None = None,
                **kwargs) -> str:
        ids = [token_ids] if isinstance(token_ids, int) else list(token_ids)
        if skip_special_tokens:
            ids = [i for i in ids if i < self.eod_id]
        return self.tokenizer.decode(ids, errors=errors or self.errors)
