"""Prompt expansion and image preprocessing, as the original does them."""

import pytest
import torch
from vllm import SamplingParams

from qwen_vl.model_executor.processor import ImageCountMismatch, empty_image_spans, image_spans, preprocess_image
from qwen_vl.model_executor.tokenizer import IMG_END_ID, IMG_PAD_ID, IMG_START_ID
from tests.images import pattern_image
from tests.reference import preprocess as reference_preprocess

GREEDY = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)


def test_image_span_content_is_dropped_and_unterminated_tags_stay():
    ids = [1, IMG_START_ID, 104, 116, IMG_END_ID, 2, IMG_START_ID, 3, IMG_START_ID, IMG_END_ID, 4]
    assert image_spans(ids) == [(1, 4), (8, 9)]
    assert empty_image_spans(ids) == [1, IMG_START_ID, IMG_END_ID, 2, IMG_START_ID, 3, IMG_START_ID, IMG_END_ID, 4]


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P"])
def test_preprocessing_equals_the_reference(mode):
    image = pattern_image(7, (333, 517)).convert(mode)
    assert torch.equal(preprocess_image(image, 448), reference_preprocess(image))


def test_alpha_is_dropped_not_composited():
    image = pattern_image(3, (64, 64), mode="RGBA")
    image.putalpha(0)
    expected = preprocess_image(image.convert("RGB"), 448)
    assert torch.equal(preprocess_image(image, 448), expected)


def test_each_image_takes_258_positions(engine, ref_tokenizer):
    query = ref_tokenizer.from_list_format([{"image": "a.png"}, {"image": "b.png"}, {"text": "Compare."}])
    prompt = ref_tokenizer.make_context(query)
    images = [pattern_image(1), pattern_image(2)]
    output = engine.generate([{"prompt_token_ids": prompt, "multi_modal_data": {"image": images}}], GREEDY, use_tqdm=False)[0]
    expanded = list(output.prompt_token_ids)
    assert len(expanded) == len(prompt)  # the original's 258 ids per image, positions unchanged
    spans = image_spans(expanded)
    assert len(spans) == 2
    for start, end in spans:
        assert end - start + 1 == 258
        assert expanded[start + 1 : end] == [IMG_PAD_ID] * 256


def test_path_inside_the_span_does_not_change_the_answer(engine):
    image = pattern_image(4)
    text = "<|im_start|>user\nPicture 1: <img>{}</img>\nWhat is it?<|im_end|>\n<|im_start|>assistant\n"
    outputs = engine.generate(
        [
            {"prompt": text.format(""), "multi_modal_data": {"image": image}},
            {"prompt": text.format("https://example.com/a/cat.png"), "multi_modal_data": {"image": image}},
        ],
        GREEDY,
        use_tqdm=False,
    )
    assert outputs[0].outputs[0].token_ids == outputs[1].outputs[0].token_ids


@pytest.mark.parametrize("spans, images", [(2, 1), (1, 2), (0, 1)])
def test_mismatched_image_count_is_a_clear_error(engine, spans, images):
    prompt = "Picture: <img></img>" * spans + " Describe."
    request = {"prompt": prompt, "multi_modal_data": {"image": [pattern_image(i) for i in range(images)]}}
    with pytest.raises(ImageCountMismatch, match=rf"{spans} <img>...</img> span\(s\) but {images} image\(s\)"):
        engine.generate([request], GREEDY, use_tqdm=False)
