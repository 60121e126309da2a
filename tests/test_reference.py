"""Self-checks of the plain-PyTorch reference (qwen_vl/testing/reference.py); no model_executor needed."""

import importlib.resources
import json

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from qwen_vl.testing.reference import (
    IM_END_ID,
    IM_START_ID,
    IMAGE_END_ID,
    IMAGE_PAD_ID,
    IMAGE_START_ID,
    ReferenceConfig,
    ReferenceQwenVL,
    ReferenceTokenizer,
    preprocess,
)

REAL_CHECKPOINT = "/work/shared/qwen-vl-chat"
TINY_CONFIG = {
    "architectures": ["QWenLMHeadModel"], "model_type": "qwen",
    "hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4, "kv_channels": 64,
    "intermediate_size": 512, "vocab_size": 151936, "layer_norm_epsilon": 1e-6,
    "rotary_emb_base": 10000, "rotary_pct": 1.0, "seq_length": 2048,
    "use_dynamic_ntk": True, "use_logn_attn": True, "no_bias": True,
    "tie_word_embeddings": False,
    "visual": {"width": 128, "layers": 2, "heads": 4, "mlp_ratio": 2.0, "output_dim": 256,
               "patch_size": 14, "image_size": 448, "image_start_id": 151857},
}


def random_tensors(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the real checkpoint's names, scaled so activations stay O(1)."""
    g = torch.Generator().manual_seed(seed)
    h, inter, vocab = config["hidden_size"], config["intermediate_size"] // 2, config["vocab_size"]
    vis = config["visual"]
    w, out, mlp = vis["width"], vis["output_dim"], int(vis["width"] * vis["mlp_ratio"])

    def matrix(*shape):
        return torch.randn(*shape, generator=g) / shape[-1] ** 0.5

    def gain(n):
        return 1 + 0.1 * torch.randn(n, generator=g)

    def bias(n):
        return 0.1 * torch.randn(n, generator=g)

    t = {"transformer.wte.weight": torch.randn(vocab, h, generator=g),
         "transformer.ln_f.weight": gain(h), "lm_head.weight": matrix(vocab, h)}
    for i in range(config["num_hidden_layers"]):
        p = f"transformer.h.{i}."
        t |= {p + "ln_1.weight": gain(h), p + "attn.c_attn.weight": matrix(3 * h, h),
              p + "attn.c_attn.bias": bias(3 * h), p + "attn.c_proj.weight": matrix(h, h),
              p + "ln_2.weight": gain(h), p + "mlp.w1.weight": matrix(inter, h),
              p + "mlp.w2.weight": matrix(inter, h), p + "mlp.c_proj.weight": matrix(h, inter)}
    v = "transformer.visual."
    t |= {v + "conv1.weight": matrix(w, 3, 14, 14) / 3 ** 0.5 / 14,
          v + "positional_embedding": torch.randn(256, w, generator=g),
          v + "ln_pre.weight": gain(w), v + "ln_pre.bias": bias(w),
          v + "ln_post.weight": gain(out), v + "ln_post.bias": bias(out),
          v + "proj": matrix(out, out)}
    for i in range(vis["layers"]):
        p = f"{v}transformer.resblocks.{i}."
        t |= {p + "ln_1.weight": gain(w), p + "ln_1.bias": bias(w),
              p + "attn.in_proj.weight": matrix(3 * w, w), p + "attn.in_proj.bias": bias(3 * w),
              p + "attn.out_proj.weight": matrix(w, w), p + "attn.out_proj.bias": bias(w),
              p + "ln_2.weight": gain(w), p + "ln_2.bias": bias(w),
              p + "mlp.c_fc.weight": matrix(mlp, w), p + "mlp.c_fc.bias": bias(mlp),
              p + "mlp.c_proj.weight": matrix(w, mlp), p + "mlp.c_proj.bias": bias(w)}
    p = v + "attn_pool."
    t |= {p + "query": torch.randn(256, out, generator=g),
          p + "pos_embed": torch.randn(256, out, generator=g),
          p + "kv_proj.weight": matrix(out, w),
          p + "ln_q.weight": gain(out), p + "ln_q.bias": bias(out),
          p + "ln_kv.weight": gain(out), p + "ln_kv.bias": bias(out),
          p + "attn.in_proj_weight": matrix(3 * out, out), p + "attn.in_proj_bias": bias(3 * out),
          p + "attn.out_proj.weight": matrix(out, out), p + "attn.out_proj.bias": bias(out)}
    return t


def write_checkpoint(directory, config: dict, tensors: dict[str, torch.Tensor]):
    (directory / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in tensors.items()}, directory / "model.safetensors")
    return directory


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny_qwen_vl")
    return write_checkpoint(directory, TINY_CONFIG, random_tensors(TINY_CONFIG))


@pytest.fixture(scope="module")
def model(tiny_path):
    return ReferenceQwenVL.from_pretrained(tiny_path)


@pytest.fixture(scope="module")
def tokenizer():
    path = importlib.resources.files("dashscope") / "resources" / "qwen.tiktoken"
    assert path.is_file()
    return ReferenceTokenizer(path)


def image(seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (300, 200, 3), generator=g, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def image_span(path: str = "a.jpg") -> list[int]:
    data = list(path.encode())
    return [IMAGE_START_ID, *data, *[IMAGE_PAD_ID] * (256 - len(data)), IMAGE_END_ID]


# -- checkpoint names -------------------------------------------------------------------------

def test_module_tree_matches_the_real_checkpoint_names():
    config = ReferenceConfig.from_json(f"{REAL_CHECKPOINT}/config.json")
    with torch.device("meta"):
        names = set(ReferenceQwenVL(config).state_dict())
    index = json.loads(open(f"{REAL_CHECKPOINT}/pytorch_model.bin.index.json").read())
    assert names == set(index["weight_map"])


def test_loading_rejects_a_missing_tensor(tmp_path):
    tensors = random_tensors(TINY_CONFIG)
    del tensors["transformer.visual.attn_pool.kv_proj.weight"]
    with pytest.raises(RuntimeError, match="kv_proj"):
        ReferenceQwenVL.from_pretrained(write_checkpoint(tmp_path, TINY_CONFIG, tensors))


def test_loading_reads_sharded_bin_checkpoints(tmp_path, tiny_path, model):
    tensors = random_tensors(TINY_CONFIG)
    names = sorted(tensors)
    shards = {"pytorch_model-00001-of-00002.bin": names[::2],
              "pytorch_model-00002-of-00002.bin": names[1::2]}
    for shard, shard_names in shards.items():
        torch.save({n: tensors[n] for n in shard_names}, tmp_path / shard)
    weight_map = {n: s for s, ns in shards.items() for n in ns}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "config.json").write_text(json.dumps(TINY_CONFIG))
    from_bin = ReferenceQwenVL.from_pretrained(tmp_path)
    ids = [1, 2, 3, 4]
    torch.testing.assert_close(from_bin.logits(ids), model.logits(ids), rtol=0, atol=0)


# -- shapes -----------------------------------------------------------------------------------

def test_preprocess_gives_normalised_448_square():
    pixels = preprocess(Image.new("RGBA", (50, 80), (255, 0, 0, 0)))
    assert pixels.shape == (3, 448, 448) and pixels.dtype == torch.float32
    # Alpha is dropped, not composited: a transparent red pixel stays red.
    assert torch.allclose(pixels[:, 0, 0], torch.tensor([(1 - 0.48145466) / 0.26862954,
                                                         (0 - 0.4578275) / 0.26130258,
                                                         (0 - 0.40821073) / 0.27577711]))


def test_visual_encoder_gives_256_features_per_image(model):
    features = model.encode_images([image(0), image(1)])
    assert features.shape == (2, 256, 256)
    assert torch.isfinite(features).all()


def test_logits_have_one_row_per_position(model):
    ids = [100, 200] + image_span() + [300]
    logits = model.logits(ids, [image(0)])
    assert logits.shape == (len(ids), 151936) and logits.dtype == torch.float32


def test_image_changes_only_positions_from_its_span_on(model):
    ids = [100, 200] + image_span() + [300, 400]
    a, b = model.logits(ids, [image(0)]), model.logits(ids, [image(1)])
    start = ids.index(IMAGE_START_ID)
    torch.testing.assert_close(a[:start + 1], b[:start + 1], rtol=0, atol=0)
    assert (a[start + 1:] - b[start + 1:]).abs().amax() > 1e-3


# -- KV cache ---------------------------------------------------------------------------------

def incremental_logits(model, ids, images, prompt_length):
    cache = model.new_cache()
    rows = [model(ids[:prompt_length], images, cache)]
    rows += [model([token], (), cache) for token in ids[prompt_length:]]
    return torch.cat(rows)


def test_cached_decoding_equals_full_forward_with_an_image(model):
    prompt = [100, 200] + image_span() + [300]
    ids = prompt + [5, 6, 7, 8, 9]
    full = model.logits(ids, [image(0)])
    torch.testing.assert_close(incremental_logits(model, ids, [image(0)], len(prompt)), full,
                               rtol=0, atol=1e-5)


def test_cached_decoding_equals_full_forward_beyond_seq_length(tiny_path):
    # seq_length 8: positions >= 8 get logn scaling; prompt 10 and total 14 share NTK alpha 3.
    model = ReferenceQwenVL.from_pretrained(tiny_path)
    model.config.seq_length = 8
    ids = list(range(1000, 1014))
    full = model.logits(ids)
    torch.testing.assert_close(incremental_logits(model, ids, [], 10), full, rtol=0, atol=1e-5)


def test_dynamic_ntk_changes_only_prompts_longer_than_seq_length(tiny_path):
    on = ReferenceQwenVL.from_pretrained(tiny_path, dynamic_ntk=True)
    off = ReferenceQwenVL.from_pretrained(tiny_path, dynamic_ntk=False)
    on.config.seq_length = off.config.seq_length = 8
    short, long = list(range(1000, 1008)), list(range(1000, 1012))
    torch.testing.assert_close(on.logits(short), off.logits(short), rtol=0, atol=0)
    assert (on.logits(long) - off.logits(long)).abs().amax() > 1e-3


def test_generate_greedy_follows_the_argmax_and_returns_first_logprobs(model):
    prompt = [100, 200] + image_span() + [300]
    tokens, logprobs = model.generate_greedy(prompt, [image(0)], max_new_tokens=4)
    assert len(tokens) == 4 and logprobs.shape == (151936,)
    assert torch.allclose(logprobs.exp().sum(), torch.tensor(1.0))
    full = model.logits(prompt + tokens[:-1], [image(0)])
    assert full[len(prompt) - 1:].argmax(dim=-1).tolist() == tokens
    torch.testing.assert_close(logprobs, full[len(prompt) - 1].log_softmax(-1), rtol=0, atol=1e-5)


def test_generate_stops_at_a_stop_id_and_includes_it(model):
    tokens, _ = model.generate_greedy([100, 200, 300], max_new_tokens=8)
    stopped = model.generate([100, 200, 300], max_new_tokens=8, stop_ids=(tokens[1],))
    assert stopped == tokens[:tokens.index(tokens[1]) + 1]


def test_seeded_sampling_is_reproducible(model):
    kwargs = dict(max_new_tokens=6, temperature=1.0, top_p=0.9, top_k=50, seed=7)
    assert model.generate([100, 200], **kwargs) == model.generate([100, 200], **kwargs)


def test_the_forward_keeps_no_autograd_graph(model):
    """The reference is for inference only: its weights are trainable parameters, but a forward
    (the encoder's included) records nothing for backward, which would cost every test's
    forward time and memory."""
    assert all(parameter.requires_grad for parameter in model.parameters())
    logits = model.logits([100, 200] + image_span() + [300], [image(0)])
    features = model.encode_images([image(0)])
    for output in (logits, features):
        assert output.is_inference() and not output.requires_grad and output.grad_fn is None


# -- chat prompt ------------------------------------------------------------------------------

def test_make_context_is_chatml_with_separately_encoded_pieces(tokenizer):
    enc = tokenizer.encoding.encode_ordinary
    expected = ([IM_START_ID] + enc("system") + enc("\n") + enc("You are a helpful assistant.")
                + [IM_END_ID] + enc("\n")
                + [IM_START_ID] + enc("user") + enc("\n") + enc("Hi there") + [IM_END_ID]
                + enc("\n")
                + [IM_START_ID] + enc("assistant") + enc("\n") + enc("Hello!") + [IM_END_ID]
                + enc("\n")
                + [IM_START_ID] + enc("user") + enc("\n") + enc("Picture 1: ") + image_span("a.jpg")
                + enc("\nWhat is 12?") + [IM_END_ID] + enc("\n")
                + [IM_START_ID] + enc("assistant") + enc("\n"))
    query = tokenizer.from_list_format([{"image": "a.jpg"}, {"text": "What is 12?"}])
    assert query == "Picture 1: <img>a.jpg</img>\nWhat is 12?"
    assert tokenizer.make_context(query, history=[("Hi there", "Hello!")]) == expected
    assert enc("12") == [enc("1")[0], enc("2")[0]]  # single digits


def test_typed_control_tokens_are_plain_text(tokenizer):
    ids = tokenizer.encode_content("a<|im_start|>b<|endoftext|><|extra_3|>")
    assert not {t for t in ids if t >= 151643}
    assert tokenizer.decode(ids) == "a<|im_start|>b<|endoftext|><|extra_3|>"
    context = tokenizer.make_context("<|im_start|>system")
    assert context.count(IM_START_ID) == 3  # system, user, assistant only


def test_grounding_tokens_are_special_in_content(tokenizer):
    items = [{"text": "find "}, {"ref": "the cat", "box": [(1, 2, 3.9, 4)]}]
    query = tokenizer.from_list_format(items)
    assert query == "find <ref>the cat</ref><box>(1,2),(3,4)</box>"
    ids = tokenizer.encode_content(query)
    assert [t for t in ids if t >= 151643] == [151851, 151852, 151853, 151854]


def test_history_is_dropped_oldest_first_at_max_window_size(tokenizer):
    enc = tokenizer.encoding.encode_ordinary
    history = [("old question " * 20, "old answer"), ("new question", "new answer")]
    without_old = tokenizer.make_context("now", history=history[1:])
    without_any = tokenizer.make_context("now")
    system_length = 2 + len(enc("system") + enc("\n") + enc("You are a helpful assistant."))
    # The window counts system + kept history, not the current query.
    kept_length = system_length + len(without_old) - len(without_any)
    assert len(tokenizer.make_context("now", history=history)) > len(without_old)
    assert tokenizer.make_context("now", history, max_window_size=kept_length + 1) == without_old
    assert tokenizer.make_context("now", history, max_window_size=kept_length) == without_any


def test_image_paths_decode_back(tokenizer):
    ids = tokenizer.encode_content("Picture 1: <img>https://x/é.png</img>\n")
    assert len(ids) == len(tokenizer.encoding.encode_ordinary("Picture 1: ")) + 258 + 1
    assert tokenizer.decode(ids) == "Picture 1: <img>https://x/é.png</img>\n"
    assert tokenizer.decode(ids, skip_special_tokens=True) == "Picture 1: https://x/é.png\n"


def test_text_is_nfc_normalised(tokenizer):
    assert tokenizer.encode_content("e\u0301") == tokenizer.encode_content("\u00e9")


def test_plain_text_encoding_agrees_with_dashscopes_qwen_tokenizer(tokenizer):
    qwen_tokenizer = pytest.importorskip("dashscope.tokenizers.qwen_tokenizer")
    path = importlib.resources.files("dashscope") / "resources" / "qwen.tiktoken"
    other = qwen_tokenizer.QwenTokenizer(str(path))
    text = "Hello, world! 2024年は\n\n  naïve café's 12345 ∑x²\t<b>ok</b>"
    assert tokenizer.encode_content(text) == other.encode(text, allowed_special=set())
