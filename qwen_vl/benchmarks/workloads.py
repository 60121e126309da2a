"""Benchmark workloads: chat requests generated locally, reproducible from a seed.

Images are drawn with numpy + PIL (a gradient and a few filled shapes, so PNGs stay small and
JPEGs look like photos to the codec) and sent inline as `data:` URLs, so no system under test
fetches anything. Every request asks for exactly `max_tokens` tokens (`ignore_eos`), greedy,
so runs of different servers compare token for token. Everything is generated and encoded
before any timing starts.

    single-image  one image, 200-1600 px a side, varied aspect ratios, a short question
    multi-image   2-4 images in one user message
    text          text only: a paragraph of 20-300 words and a question about it
    same-image    one image shared by every request (the processor and prefix caches)
    grounding     one image and a grounding prompt ("Generate the caption with grounding:", <ref>...)
    mixed         each request drawn from the five above
    long-conversation  8 images over three user turns (3, 3, 2) with two assistant answers and
                  long texts: ~4-5k prompt tokens, past seq_length (dynamic NTK alpha 3 or 7)
"""

import base64
import io
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

WORKLOADS = ("single-image", "multi-image", "text", "same-image", "grounding", "mixed", "long-conversation")
MIXED_KINDS = ("single-image", "multi-image", "text", "same-image", "grounding")

QUESTIONS = (
    "What is in this picture?",
    "Describe the image in one sentence.",
    "What colours do you see?",
    "How many shapes are there?",
    "Is there anything unusual here?",
    "What is the main object?",
)
MULTI_IMAGE_QUESTIONS = (
    "What differs between these pictures?",
    "Which picture is the brightest?",
    "Describe each picture briefly.",
)
GROUNDING_PROMPTS = (
    "Generate the caption with grounding:",
    "<ref>the red car</ref>",
    "Where is <ref>the blue circle</ref>? Answer with a box.",
    "Output the bounding box of <ref>the largest square</ref>.",
    "Find <ref>the yellow triangle</ref> in the picture.",
)
WORDS = (
    "the a model image server request token cache prompt engine batch latency answer question "
    "picture vision language adapter encoder decoder layer attention query key value stream "
    "chunk river mountain city window light green blue red yellow quickly slowly because while "
    "after before under over between across simple exact fast careful measure compare result"
).split()
TEXT_QUESTIONS = ("Summarise the text above.", "What is this text about?", "Continue the story.")
SAMPLING = ("greedy", "checkpoint")
# (width, height) ratios: square, landscape, portrait, panorama, tall.
ASPECTS = (1.0, 4 / 3, 3 / 4, 16 / 9, 9 / 16, 2.5, 0.4)


@dataclass
class Request:
    """One chat request: OpenAI messages (images as data URLs) and its output length."""

    kind: str
    messages: list[dict]
    max_tokens: int
    num_images: int = 0
    image_bytes: int = 0
    extra: dict = field(default_factory=dict)
    sampling: str = "greedy"  # or "checkpoint": the server's defaults (generation_config.json)

    def body(self, model: str) -> dict:
        """The streaming request body every system under test receives."""
        return {
            "model": model,
            "messages": self.messages,
            "max_tokens": self.max_tokens,
            "ignore_eos": True,
            **({"temperature": 0.0} if self.sampling == "greedy" else {}),
            "stream": True,
            "stream_options": {"include_usage": True},
            **self.extra,
        }


def random_image(rng: np.random.Generator, min_side: int = 200, max_side: int = 1600) -> Image.Image:
    """A gradient with 3-8 filled shapes; the longer side in [min_side, max_side]."""
    long_side = int(rng.integers(min_side, max_side + 1))
    aspect = ASPECTS[int(rng.integers(len(ASPECTS)))]
    if aspect >= 1:
        width, height = long_side, max(min_side // 2, int(long_side / aspect))
    else:
        width, height = max(min_side // 2, int(long_side * aspect)), long_side
    top, bottom = rng.integers(0, 256, size=3), rng.integers(0, 256, size=3)
    ramp = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    pixels = (top * (1 - ramp) + bottom * ramp).astype(np.uint8)
    image = Image.fromarray(np.repeat(pixels, width, axis=1), "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 9))):
        x1, x2 = sorted(rng.integers(0, width, size=2).tolist())
        y1, y2 = sorted(rng.integers(0, height, size=2).tolist())
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        shape = int(rng.integers(3))
        if shape == 0:
            draw.rectangle((x1, y1, x2, y2), fill=colour)
        elif shape == 1:
            draw.ellipse((x1, y1, x2, y2), fill=colour)
        else:
            draw.polygon([(x1, y2), (x2, y2), ((x1 + x2) // 2, y1)], fill=colour)
    return image


def data_url(image: Image.Image, fmt: str) -> str:
    buffer = io.BytesIO()
    if fmt == "JPEG":
        image.save(buffer, format="JPEG", quality=90)
    else:
        image.save(buffer, format="PNG", compress_level=1)
    mime = "jpeg" if fmt == "JPEG" else "png"
    return f"data:image/{mime};base64," + base64.b64encode(buffer.getvalue()).decode()


def _random_image_url(rng: np.random.Generator) -> str:
    return data_url(random_image(rng), "JPEG" if rng.random() < 0.5 else "PNG")


def _user_message(image_urls: list[str], text: str) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": url}} for url in image_urls]
    return {"role": "user", "content": parts + [{"type": "text", "text": text}]}


def _request(kind: str, image_urls: list[str], text: str, max_tokens: int) -> Request:
    message = _user_message(image_urls, text) if image_urls else {"role": "user", "content": text}
    return Request(kind, [message], max_tokens, len(image_urls), sum(len(u) for u in image_urls))


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def _words(rng: np.random.Generator, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS, size=int(rng.integers(low, high + 1))).tolist())


def _long_conversation(rng: np.random.Generator, max_tokens: int) -> Request:
    messages, images, image_bytes = [], 0, 0
    for turn, count in enumerate((3, 3, 2)):
        urls = [_random_image_url(rng) for _ in range(count)]
        images, image_bytes = images + count, image_bytes + sum(len(u) for u in urls)
        last = turn == 2
        question = _words(rng, 250, 350) + "\n" + _pick(rng, MULTI_IMAGE_QUESTIONS)
        messages.append(_user_message(urls, question))
        if not last:
            messages.append({"role": "assistant", "content": _words(rng, 500, 650)})
    return Request("long-conversation", messages, max_tokens, images, image_bytes)


def build_workload(name: str, num_requests: int, seed: int = 0, max_tokens: int = 64,
                   sampling: str = "greedy") -> list[Request]:
    """`num_requests` requests of workload `name`; the same seed gives the same requests.

    `sampling`: "greedy" (temperature 0), or "checkpoint": no sampling fields, so the server
    applies the checkpoint's generation_config.json (Qwen-VL-Chat: top_p 0.3), as a user's
    request that sets none does."""
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")
    if sampling not in SAMPLING:
        raise ValueError(f"unknown sampling {sampling!r}; choose from {', '.join(SAMPLING)}")
    rng = np.random.default_rng(seed)
    shared = _random_image_url(np.random.default_rng([seed, 1])) if name in ("same-image", "mixed") else None
    requests = []
    for _ in range(num_requests):
        kind = _pick(rng, MIXED_KINDS) if name == "mixed" else name
        if kind == "long-conversation":
            requests.append(_long_conversation(rng, max_tokens))
        elif kind == "single-image":
            requests.append(_request(kind, [_random_image_url(rng)], _pick(rng, QUESTIONS), max_tokens))
        elif kind == "multi-image":
            urls = [_random_image_url(rng) for _ in range(int(rng.integers(2, 5)))]
            requests.append(_request(kind, urls, _pick(rng, MULTI_IMAGE_QUESTIONS), max_tokens))
        elif kind == "text":
            words = rng.choice(WORDS, size=int(rng.integers(20, 301))).tolist()
            text = " ".join(words).capitalize() + ".\n" + _pick(rng, TEXT_QUESTIONS)
            requests.append(_request(kind, [], text, max_tokens))
        elif kind == "same-image":
            requests.append(_request(kind, [shared], _pick(rng, QUESTIONS), max_tokens))
        else:
            requests.append(_request(kind, [_random_image_url(rng)], _pick(rng, GROUNDING_PROMPTS), max_tokens))
    for request in requests:
        request.sampling = sampling
    return requests
