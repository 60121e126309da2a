"""Prompt expansion and image preprocessing, as the original does them."""

import io

import pytest
import torch
from PIL import Image
from vllm import SamplingParams
from vllm.multimodal.image import convert_image_mode
from vllm.multimodal.media import ImageMediaIO

from qwen_vl.model_executor.processor import (
    ImageCountMismatch,
    QwenVLDataParser,
    empty_image_spans,
    image_spans,
    preprocess_image,
)
from qwen_vl.model_executor.tokenizer import IMG_END_ID, IMG_PAD_ID, IMG_START_ID
from qwen_vl.testing.reference import preprocess as reference_preprocess
from tests.helpers import pattern_image, turned_photo

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


def parsed_through_vllms_loader(data: bytes, **media_io_kwargs) -> torch.Tensor:
    """The bytes as `vllm serve` hands an image URL's to the plugin: vLLM's media loader
    (the plugin's default: keep the mode), then the plugin's data parser and preprocessing."""
    loaded = ImageMediaIO(**{"image_mode": None, **media_io_kwargs}).load_bytes(data)
    items = QwenVLDataParser().parse_mm_data({"image": loaded})["image"]
    return preprocess_image(items.get(0), 448)


# (TIFF is not among them: PIL applies a TIFF's orientation tag itself when it opens one, for
# the original as for vLLM's loader.)
@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_images_from_vllms_loader_reach_the_model_as_stored(orientation, fmt):
    """vLLM's loader turns a photo by its EXIF orientation; the original does not. The plugin
    gives the model the stored pixels, for every orientation (1 leaves the image alone)."""
    data = turned_photo(orientation, fmt)
    stored = Image.open(io.BytesIO(data))
    if orientation != 1:  # what the plugin undoes: vLLM's loader does turn it
        assert ImageMediaIO(image_mode=None).load_bytes(data).media.tobytes() != stored.tobytes()
    assert torch.equal(parsed_through_vllms_loader(data), reference_preprocess(stored))


def test_an_orientation_in_xmp_metadata_is_undone_too():
    """PIL (and so vLLM's loader) also reads the orientation from XMP when EXIF has none."""
    buffer = io.BytesIO()
    pattern_image(9, (96, 64)).save(buffer, "JPEG", xmp=b'<x:xmpmeta><rdf:Description tiff:Orientation="6"/></x:xmpmeta>')
    data = buffer.getvalue()
    stored = Image.open(io.BytesIO(data))
    assert ImageMediaIO(image_mode=None).load_bytes(data).media.size == (64, 96)  # turned by the loader
    assert torch.equal(parsed_through_vllms_loader(data), reference_preprocess(stored))


def test_a_user_set_image_mode_still_applies_to_the_stored_pixels():
    """`--media-io-kwargs '{"image": {"image_mode": "RGB"}}'` is the user's choice: vLLM's
    compositing onto white, then no turning."""
    data = turned_photo(6, "PNG", mode="RGBA")
    expected = preprocess_image(convert_image_mode(Image.open(io.BytesIO(data)), "RGB"), 448)
    assert torch.equal(parsed_through_vllms_loader(data, image_mode="RGB"), expected)
    assert not torch.equal(expected, reference_preprocess(Image.open(io.BytesIO(data))))  # compositing differs


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
