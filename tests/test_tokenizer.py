"""The Qwen tokenizer: same ids as the original, loadable from the hub files without remote code."""

import shutil
import unicodedata
from pathlib import Path

import pytest
import tiktoken
import tokenizers
import transformers
from tiktoken.load import load_tiktoken_bpe

from qwen_vl.model_executor import tokenizer as qwen
from qwen_vl.model_executor.tokenizer import QWenTokenizer, qwen_tiktoken_path, register_tokenizer

REAL = Path(__file__).parent / "data" / "qwen-vl-chat"

CORPUS = {
    "english": "The quick brown fox jumps over the lazy dog. It's what they'd've done, isn't it?",
    "contractions_upper": "I'M SURE YOU'LL SEE WHAT WE'VE DONE",
    "chinese": "通义千问是阿里云研发的大语言模型，能够理解图片中的内容。",
    "japanese_korean_arabic": "こんにちは世界 안녕하세요 مرحبا بالعالم",
    "code": "def f(x):\n\tif x > 0:\n        return x ** 2  # square\n    return {'a': [1, 2]}\n",
    "digits": "12345678901234 and 3.14159, 1,000,000",
    "whitespace": "a   b\n\n\n  c\t\t",
    "trailing_spaces": "end   ",
    "crlf": "line one\r\nline two\r\n\r\n",
    "emoji": "👋🏽 family 👨‍👩‍👧 party 🎉🎉",
    "mixed": "GPT-4o的价格是$5/1M tokens，比 Qwen 贵吗？I'm not sure😅.",
    "accents": "Ça coûte 12€ à Zürich, señor.",
    "special_tokens": "<|im_start|>user\nPicture 1: <img>https://a.b/c.jpg</img>\nwhere?<|im_end|>\n",
    "grounding": "<ref>a cat</ref><box>(12,34),(567,890)</box><quad>(1,2),(3,4),(5,6),(7,8)</quad>",
    "extras": "<|extra_0|><|extra_204|><|endoftext|><imgpad>",
}


@pytest.fixture(scope="module")
def hub_dir(tmp_path_factory):
    """A directory as downloaded from the hub: JSON files and qwen.tiktoken, no tokenizer.json."""
    path = tmp_path_factory.mktemp("hub")
    for name in ("config.json", "generation_config.json", "tokenizer_config.json"):
        shutil.copyfile(REAL / name, path / name)
    shutil.copyfile(qwen_tiktoken_path(), path / "qwen.tiktoken")
    return path


@pytest.fixture(scope="module")
def tok(hub_dir):
    register_tokenizer()
    return transformers.AutoTokenizer.from_pretrained(hub_dir, trust_remote_code=False)


@pytest.fixture(scope="module")
def original():
    """tiktoken with the original's pattern, ranks and special tokens."""
    return tiktoken.Encoding(
        "qwen",
        pat_str=qwen.PATTERN,
        mergeable_ranks=load_tiktoken_bpe(str(qwen_tiktoken_path())),
        special_tokens={token: qwen.BASE_VOCAB_SIZE + i for i, token in enumerate(qwen.SPECIAL_TOKENS)},
    )


@pytest.mark.parametrize("text", CORPUS.values(), ids=CORPUS.keys())
def test_ids_match_tiktoken(tok, original, text):
    assert tok.encode(text) == original.encode(text, allowed_special="all")


def test_text_is_nfc_normalised_before_encoding(tok, original):
    decomposed = "Cafe\u0301 re\u0301sume\u0301"
    assert tok.encode(decomposed) == original.encode(unicodedata.normalize("NFC", decomposed))


def test_special_tokens_follow_the_bpe_ranks_in_order(tok):
    ids = tok.convert_tokens_to_ids(list(qwen.SPECIAL_TOKENS))
    assert ids == list(range(151643, 151860))
    assert len(tok) == qwen.VOCAB_SIZE == 151860


def test_exported_ids(tok):
    expected = {
        "ENDOFTEXT_ID": (151643, "<|endoftext|>"),
        "IM_START_ID": (151644, "<|im_start|>"),
        "IM_END_ID": (151645, "<|im_end|>"),
        "REF_START_ID": (151851, "<ref>"),
        "REF_END_ID": (151852, "</ref>"),
        "BOX_START_ID": (151853, "<box>"),
        "BOX_END_ID": (151854, "</box>"),
        "QUAD_START_ID": (151855, "<quad>"),
        "QUAD_END_ID": (151856, "</quad>"),
        "IMG_START_ID": (151857, "<img>"),
        "IMG_END_ID": (151858, "</img>"),
        "IMG_PAD_ID": (151859, "<imgpad>"),
    }
    for name, (value, token) in expected.items():
        assert getattr(qwen, name) == value == tok.convert_tokens_to_ids(token), name
    assert qwen.IMAGE_TOKENS_PER_IMAGE == 256


@pytest.mark.parametrize("token", qwen.SPECIAL_TOKENS[:4] + qwen.SPECIAL_TOKENS[-9:])
def test_special_token_strings_in_text_are_single_tokens(tok, token):
    ids = tok.encode(f"x{token}y")
    x, y = tok.convert_tokens_to_ids(["x", "y"])
    assert ids == [x, qwen.SPECIAL_TOKENS.index(token) + 151643, y]


def test_eos_and_pad_are_endoftext(tok):
    assert tok.eos_token == tok.pad_token == "<|endoftext|>"
    assert tok.eos_token_id == tok.pad_token_id == qwen.ENDOFTEXT_ID


def test_is_fast(tok):
    assert isinstance(tok, QWenTokenizer) and tok.is_fast


def test_decode_skipping_special_tokens_keeps_grounding_tags(tok):
    text = "<ref>a cat</ref><box>(12,34),(567,890)</box> and <quad>(1,2),(3,4),(5,6),(7,8)</quad>"
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == text


def test_decode_skipping_special_tokens_drops_control_and_image_tags(tok):
    text = "<|im_start|>assistant\n<img>a.jpg</img><imgpad><|extra_7|>hi<|im_end|><|endoftext|>"
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == "assistant\na.jpghi"
    assert tok.decode(tok.encode(text)) == text


def test_streaming_detokenizer_keeps_grounding_tags(tok):
    # vLLM streams text from a fast tokenizer with tokenizers' DecodeStream over the backend.
    from vllm.v1.engine.detokenizer import uses_fast_detokenizer

    assert uses_fast_detokenizer(tok)
    prompt = tok.encode("<|im_start|>assistant\n")
    output = tok.encode("<ref>狗</ref><box>(1,2),(3,4)</box><|im_end|>")
    stream = tokenizers.decoders.DecodeStream(ids=prompt, skip_special_tokens=True)
    text = "".join(stream.step(tok.backend_tokenizer, i) or "" for i in output)
    assert text == "<ref>狗</ref><box>(1,2),(3,4)</box>"


def test_loads_through_vllm_get_tokenizer(hub_dir, tok):
    from vllm.tokenizers import get_tokenizer

    register_tokenizer()
    vllm_tok = get_tokenizer(str(hub_dir))
    assert isinstance(vllm_tok, QWenTokenizer) and vllm_tok.is_fast
    assert vllm_tok.encode(CORPUS["mixed"]) == tok.encode(CORPUS["mixed"])
    assert vllm_tok.max_token_id == qwen.IMG_PAD_ID


def test_loading_writes_nothing_into_the_model_dir(hub_dir, tok):
    assert sorted(p.name for p in hub_dir.iterdir()) == [
        "config.json", "generation_config.json", "qwen.tiktoken", "tokenizer_config.json"
    ]


def test_built_backend_is_cached_by_file_content(tmp_path, monkeypatch):
    monkeypatch.setenv("QWEN_VL_CACHE", str(tmp_path / "cache"))
    ranks = tmp_path / "qwen.tiktoken"
    shutil.copyfile(qwen_tiktoken_path(), ranks)
    built = qwen.cached_backend_file(ranks)
    assert built.parent == tmp_path / "cache" / "tokenizers"
    mtime = built.stat().st_mtime_ns
    assert qwen.cached_backend_file(ranks) == built and built.stat().st_mtime_ns == mtime
    assert [p.name for p in built.parent.iterdir()] == [built.name]  # no temporary files left


def test_rejects_a_file_that_is_not_the_qwen_ranks(tmp_path):
    ranks = tmp_path / "qwen.tiktoken"
    ranks.write_bytes(b"".join(qwen_tiktoken_path().read_bytes().splitlines(keepends=True)[:1000]))
    with pytest.raises(ValueError, match="Qwen BPE ranks"):
        qwen.build_backend(ranks)
