"""Turns a Qwen-VL prompt and its images into what the model consumes.

Images: as stored (no EXIF turning), `convert("RGB")` (alpha dropped), PIL bicubic
resize to 448x448 (aspect ratio not kept, no crop), CLIP mean/std: as the
original does.

Prompt: every `<img>...</img>` span, empty or holding a path or URL as users
of the original write it, becomes `<img>` + 256 `<imgpad>` + `</img>`: the
original's 258 positions per image, the visual embeddings on the 256 pads.
"""

from collections.abc import Mapping, Sequence
from io import BytesIO

import numpy as np
import torch
from PIL import ExifTags, Image
from transformers import BatchFeature
from vllm.config.multimodal import MultiModalDummyOptions
from vllm.multimodal.image import convert_image_mode, open_image
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.media import MediaWithBytes
from vllm.multimodal.parse import ImageProcessorItems, MultiModalDataItems, MultiModalDataParser
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    PromptReplacement,
    PromptUpdate,
    PromptUpdateDetails,
)

from .tokenizer import IMAGE_SPAN, IMAGE_TOKENS_PER_IMAGE, IMG_END_ID, IMG_PAD_ID, IMG_START_ID

IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


class ImageCountMismatch(ValueError):
    """The prompt's `<img>...</img>` spans and the images given disagree."""


def to_rgb(image: Image.Image) -> Image.Image:
    """The original's `convert("RGB")`, skipped when it would only copy."""
    return image if image.mode == "RGB" else image.convert("RGB")


def preprocess_image(image: Image.Image, size: int) -> torch.Tensor:
    """One image -> float32 [3, size, size], exactly as the original.

    PIL's bicubic resize, not torch's: the two differ by up to 0.03 after
    normalisation, enough to change the logits."""
    image = to_rgb(image).resize((size, size), Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)
    pixels = (pixels - torch.tensor(IMAGE_MEAN)) / torch.tensor(IMAGE_STD)
    return pixels.permute(2, 0, 1).contiguous()


def image_spans(token_ids: Sequence[int]) -> list[tuple[int, int]]:
    """(start, end) indices of each complete `<img>...</img>` span. An `<img>`
    followed by another `<img>` before any `</img>` is unterminated: text."""
    spans, start = [], None
    for i, token in enumerate(token_ids):
        if token == IMG_START_ID:
            start = i
        elif token == IMG_END_ID and start is not None:
            spans.append((start, i))
            start = None
    return spans


def empty_image_spans(token_ids: list[int]) -> list[int]:
    """Drop whatever each `<img>...</img>` span holds (a path, a URL, or
    already the 256 pads), leaving `<img></img>` for the prompt update."""
    out: list[int] = []
    prev = 0
    for start, end in image_spans(token_ids):
        out += token_ids[prev : start + 1]
        prev = end
    return out + token_ids[prev:]


# The EXIF orientations that PIL's `ImageOps.exif_transpose` turns or flips an image for.
TURNING_ORIENTATIONS = range(2, 9)
# Where PIL's `Image.getexif` finds an orientation, in a decoded image's `info` (a TIFF's own
# tags aside: PIL applies a TIFF's orientation when it decodes one, for the original too).
ORIENTATION_SOURCES = ("exif", "Raw profile type exif", "XML:com.adobe.xmp", "xmp")


def as_stored(item: MediaWithBytes) -> MediaWithBytes:
    """An image from vLLM's media loader (`vllm serve`'s image URLs) with its
    pixels as stored in the file. The loader turns a photo upright by its EXIF
    orientation tag; the original's `Image.open(...)` does not. Where the tag
    would have turned it, the bytes are decoded again (through vLLM's format
    allowlist, as the loader did) and any mode conversion the loader made
    (`io_config`: only with a user-set `image_mode`) is made again."""
    if item.io_config is None and not any(key in item.media.info for key in ORIENTATION_SOURCES):
        # No metadata that holds an orientation (the loader's image keeps what it read, unless
        # it converted the mode): nothing was turned, and nothing is decoded again.
        return item
    image = open_image(BytesIO(item.original_bytes))
    if image.getexif().get(ExifTags.Base.Orientation) not in TURNING_ORIENTATIONS:
        return item
    image.load()
    if item.io_config is not None:
        image = convert_image_mode(image, item.io_config["image_mode"], item.io_config["rgba_background_color"])
    return MediaWithBytes(image, item.original_bytes, item.io_config)


class QwenVLDataParser(MultiModalDataParser):
    """vLLM composites transparent images onto white and turns photos by
    their EXIF orientation; the original does neither
    (`Image.open(...).convert("RGB")`). PIL images (the offline engine) are
    converted here before vLLM's parser sees them; images from the media loader
    (`vllm serve`) keep their mode (`serving.keep_image_mode`) and are turned
    back to their stored pixels (`as_stored`)."""

    def _parse_image_data(self, data):
        items = list(data) if isinstance(data, (list, tuple)) else [data]
        if items and all(isinstance(d, Image.Image) for d in items):
            return ImageProcessorItems([to_rgb(d) for d in items])
        if items and all(isinstance(d, MediaWithBytes) and isinstance(d.media, Image.Image) for d in items):
            return ImageProcessorItems([as_stored(d) for d in items])
        return super()._parse_image_data(data)


class QwenVLProcessingInfo(BaseProcessingInfo):
    def get_hf_processor(self, **kwargs: object):
        # Preprocessing is ours (`preprocess_image`); no HF processor exists.
        return None

    def get_data_parser(self) -> MultiModalDataParser:
        return QwenVLDataParser(expected_hidden_size=self._get_expected_hidden_size())

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None}

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        return {"image": IMAGE_TOKENS_PER_IMAGE}

    @property
    def image_size(self) -> int:
        return self.get_hf_config().visual["image_size"]


class QwenVLDummyInputsBuilder(BaseDummyInputsBuilder[QwenVLProcessingInfo]):
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return "<img></img>" * mm_counts.get("image", 0)

    def get_dummy_mm_data(
        self,
        seq_len: int,
        mm_counts: Mapping[str, int],
        mm_options: Mapping[str, MultiModalDummyOptions] | None = None,
    ):
        size = self.info.image_size
        return {"image": self._get_dummy_images(width=size, height=size, num_images=mm_counts.get("image", 0))}


class QwenVLMultiModalProcessor(BaseMultiModalProcessor[QwenVLProcessingInfo]):
    def apply(self, inputs, timing_ctx):
        # vLLM would fail a count mismatch with a bare AssertionError deep in
        # prompt matching; say what is wrong instead.
        spans = len(image_spans(inputs.prompt))
        images = inputs.mm_data_items.get_all_counts().get("image", 0)
        if spans != images:
            raise ImageCountMismatch(
                f"the prompt has {spans} <img>...</img> span(s) but {images} image(s) "
                "were given: each image needs exactly one span, in order"
            )
        return super().apply(inputs, timing_ctx)

    def _postprocess_prompt(self, prompt: list[int]) -> list[int]:
        return empty_image_spans(prompt)

    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        size = self.info.image_size
        images = hf_data["images"]
        pixel_values = torch.stack([preprocess_image(image, size) for image in images])
        return BatchFeature({"pixel_values": pixel_values})

    def _get_mm_fields_config(self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]):
        return {"pixel_values": MultiModalFieldConfig.batched("image")}

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        return [
            PromptReplacement(
                modality="image",
                target=[IMG_START_ID, IMG_END_ID],
                replacement=PromptUpdateDetails.select_token_id(IMAGE_SPAN, IMG_PAD_ID),
            )
        ]
