"""Deterministic test images: distinct, textured content (so that a wrong
resize, channel order or normalisation changes the encoder's output)."""

import base64
import io

import numpy as np
from PIL import Image


def pattern_image(seed: int, size: tuple[int, int] = (448, 448), mode: str = "RGB") -> Image.Image:
    width, height = size
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = []
    for _ in range(len(mode)):
        fx, fy, phase = rng.uniform(0.005, 0.05, 2).tolist() + [rng.uniform(0, 6.28)]
        wave = np.sin(x * fx + y * fy + phase)
        noise = rng.normal(0, 0.15, (height, width))
        channels.append(np.clip((wave + noise) * 100 + 128, 0, 255))
    pixels = np.stack(channels, axis=-1).astype(np.uint8)
    return Image.fromarray(pixels)  # 3 channels: RGB, 4: RGBA


def data_url(content: Image.Image | bytes, mime: str = "image/png") -> str:
    """A data URL: a PIL image saved as PNG, or bytes sent as they are, labelled `mime`."""
    if isinstance(content, Image.Image):
        buffer = io.BytesIO()
        content.save(buffer, format="PNG")
        content = buffer.getvalue()
    return f"data:{mime};base64,{base64.b64encode(content).decode()}"


def turned_photo(orientation: int, fmt: str = "JPEG", mode: str = "RGB") -> bytes:
    """A 96x64 pattern image saved with an EXIF orientation tag: viewers (and
    vLLM's media loader) turn or flip it by the tag; the original's
    `Image.open` keeps the pixels as stored."""
    image = pattern_image(orientation, (96, 64), mode)
    exif = Image.Exif()
    exif[0x0112] = orientation  # ExifTags.Base.Orientation
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, exif=exif)
    return buffer.getvalue()
