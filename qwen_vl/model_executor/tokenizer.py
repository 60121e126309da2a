"""The Qwen tokenizer as a fast (Rust `tokenizers`) tokenizer, built from the checkpoint's `qwen.tiktoken`.

The checkpoint ships only the BPE ranks and remote code (`tokenization_qwen.QWenTokenizer`).
`register_tokenizer()` makes a checkpoint directory load as is, with `trust_remote_code=False`,
through `AutoTokenizer` and vLLM: its tokenizer_config.json names "QWenTokenizer" and, once our
class of that name is registered for `QWenConfig`, transformers treats it as local code and
picks it over the remote `auto_map` entry.

Ids match the original (tiktoken with the pattern below, text NFC-normalised first). Unlike the
original, decoding with `skip_special_tokens=True` keeps the grounding tags (`<ref>`, `<box>`,
`<quad>` and their closing tags): they are added as non-special tokens, so both transformers'
`decode` and vLLM's streaming detokenizer (which asks the Rust tokenizer) leave them in the
text, where the box parser needs them.
"""

import hashlib
import importlib.util
import os
import tempfile
from pathlib import Path

import tokenizers
import transformers
from tokenizers import AddedToken, normalizers
from transformers.convert_slow_tokenizer import TikTokenConverter

from qwen_vl.cache import cache_dir
from qwen_vl.model_executor.config import QWenConfig, register_config

TIKTOKEN_FILE = "qwen.tiktoken"
# Like GPT-4's pattern, but digits are split one by one (\p{N}, not \p{N}{1,3}).
PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

BASE_VOCAB_SIZE = 151643  # entries in qwen.tiktoken; special tokens follow
ENDOFTEXT = "<|endoftext|>"
GROUNDING_TOKENS = ("<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>")
IMAGE_TAGS = ("<img>", "</img>", "<imgpad>")
SPECIAL_TOKENS = (
    ENDOFTEXT,
    "<|im_start|>",
    "<|im_end|>",
    *(f"<|extra_{i}|>" for i in range(205)),
    *GROUNDING_TOKENS,
    *IMAGE_TAGS,
)
_ID = {token: BASE_VOCAB_SIZE + i for i, token in enumerate(SPECIAL_TOKENS)}

ENDOFTEXT_ID = _ID[ENDOFTEXT]  # 151643
IM_START_ID = _ID["<|im_start|>"]  # 151644
IM_END_ID = _ID["<|im_end|>"]  # 151645
REF_START_ID = _ID["<ref>"]  # 151851
REF_END_ID = _ID["</ref>"]
BOX_START_ID = _ID["<box>"]
BOX_END_ID = _ID["</box>"]
QUAD_START_ID = _ID["<quad>"]
QUAD_END_ID = _ID["</quad>"]
IMG_START_ID = _ID["<img>"]  # 151857, config.visual["image_start_id"]
IMG_END_ID = _ID["</img>"]  # 151858
IMG_PAD_ID = _ID["<imgpad>"]  # 151859
VOCAB_SIZE = BASE_VOCAB_SIZE + len(SPECIAL_TOKENS)  # 151860; the model pads its vocab to 151936

# Visual features per image: the adapter's 16x16 learned queries.
IMAGE_TOKENS_PER_IMAGE = 256
# An image in a prompt: `<img>`, a pad for each visual feature, `</img>` (258 positions).
IMAGE_SPAN = [IMG_START_ID] + [IMG_PAD_ID] * IMAGE_TOKENS_PER_IMAGE + [IMG_END_ID]

# Part of the cache key: a change to how the backend is built must not reuse an old build.
_RECIPE = "\n".join([PATTERN, "NFC", *SPECIAL_TOKENS, "grounding-not-special", tokenizers.__version__])


def qwen_tiktoken_path() -> Path:
    """`qwen.tiktoken` as shipped inside the `dashscope` package (found without importing it)."""
    spec = importlib.util.find_spec("dashscope")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("qwen.tiktoken is taken from the `dashscope` package: pip install dashscope")
    return Path(spec.submodule_search_locations[0]) / "resources" / TIKTOKEN_FILE


def build_backend(tiktoken_file: str | os.PathLike) -> tokenizers.Tokenizer:
    """Build the Rust tokenizer from the BPE ranks (about 2 s: every merge is derived from the ranks)."""
    backend = TikTokenConverter(vocab_file=str(tiktoken_file), pattern=PATTERN).converted()
    backend.normalizer = normalizers.NFC()
    # Added in id order; each call appends after the previous ids.
    for token in SPECIAL_TOKENS:
        grounding = token in GROUNDING_TOKENS
        added = AddedToken(token, special=not grounding, normalized=False)
        count = backend.add_tokens([added]) if grounding else backend.add_special_tokens([added])
        if count != 1 or backend.token_to_id(token) != _ID[token]:
            raise ValueError(f"{tiktoken_file} does not hold the {BASE_VOCAB_SIZE} Qwen BPE ranks")
    return backend


def cached_backend_file(tiktoken_file: str | os.PathLike) -> Path:
    """The built tokenizer.json for this ranks file, built on first use into the user cache.

    Keyed by the file's content and the build recipe. Written to a temporary file and renamed,
    so concurrent vLLM processes never read a half-written file.
    """
    digest = hashlib.sha256(Path(tiktoken_file).read_bytes() + _RECIPE.encode()).hexdigest()[:32]
    target = cache_dir() / "tokenizers" / f"qwen-{digest}.json"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".tmp")
        os.close(fd)
        try:
            build_backend(tiktoken_file).save(tmp)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return target


class QWenTokenizer(transformers.TokenizersBackend):
    """Named like the remote class so tokenizer_config.json's "tokenizer_class" resolves to it."""

    vocab_files_names = {"vocab_file": TIKTOKEN_FILE}

    def __init__(self, vocab_file=None, **kwargs):
        if vocab_file is None:
            raise ValueError(f"QWenTokenizer needs the checkpoint's {TIKTOKEN_FILE}")
        # The backend always comes from the ranks (via the cache), never from a tokenizer.json
        # that may sit next to them.
        kwargs["tokenizer_file"] = str(cached_backend_file(vocab_file))
        kwargs.setdefault("eos_token", ENDOFTEXT)
        kwargs.setdefault("pad_token", ENDOFTEXT)
        # Declared to transformers too, so all_special_ids agrees with what decoding skips.
        skipped = [t for t in SPECIAL_TOKENS[1:] if t not in GROUNDING_TOKENS]
        kwargs.setdefault("extra_special_tokens", skipped)
        super().__init__(vocab_file=vocab_file, **kwargs)

    @classmethod
    def convert_to_native_format(cls, trust_remote_code=False, **kwargs):
        # The base class would re-extract vocab and merges from a tokenizer.json; __init__
        # builds the backend itself.
        return kwargs


def register_tokenizer() -> None:
    """Make AutoTokenizer (and so vLLM) load Qwen checkpoints with QWenTokenizer. Idempotent."""
    register_config()
    transformers.AutoTokenizer.register(QWenConfig, tokenizer_class=QWenTokenizer, exist_ok=True)
