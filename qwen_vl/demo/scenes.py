"""The demo model's world: procedurally drawn scenes of flat shapes and, sometimes, one word.

A scene is a plain background (white, light grey, black) or a soft vertical gradient between two
of them; 1 to 4 non-overlapping filled shapes (circle, square, upright equilateral triangle) in
eight colours, never the background's, 15-40% of the image's shorter side, no two alike in both
colour and shape; in some scenes one word of 3-6 uppercase letters in a bold sans-serif font, at
least 8% of the shorter side tall. Images come in any size and aspect ratio: the model sees them
resized, as every Qwen-VL image is.

Two generators draw from this domain: `training_scene` (what the model learns from) and
`evaluation_scene` (what its accuracy is measured on). They are written apart on purpose: other
colour values, sizes, placement, fonts and text colours, so the evaluation measures the domain
and not the training generator's habits. Seeds never overlap: training draws from one
`random.Random` stream per run; evaluation seeds scenes by number with a distinct prefix.
"""

import math
import random
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

SHAPES = ("circle", "square", "triangle")
COLOURS = ("red", "green", "blue", "yellow", "orange", "purple", "black", "white")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"  # the word's
BACKGROUNDS = ("white", "light grey", "black")

# Reference RGB values; each generator perturbs them its own way.
RGB = {
    "red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220), "yellow": (245, 215, 30),
    "orange": (245, 135, 20), "purple": (130, 40, 170), "black": (0, 0, 0), "white": (255, 255, 255),
    "light grey": (211, 211, 211),
}
_BOLD_SANS = ("DejaVuSans-Bold.ttf", "LiberationSans-Bold.ttf", "FreeSansBold.ttf", "Arial Bold.ttf")
_FONT_DIRS = ("/usr/share/fonts", "/usr/local/share/fonts", "/Library/Fonts", "C:/Windows/Fonts")


@dataclass
class Shape:
    colour: str
    shape: str
    box: tuple[int, int, int, int]  # x1, y1, x2, y2 in pixels, the shape's bounding box

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass
class Scene:
    width: int
    height: int
    background: tuple[str, str]  # top and bottom colour (equal: plain)
    shapes: list[Shape]
    word: str | None = None
    word_box: tuple[int, int, int, int] | None = None
    letters: list[tuple[int, int]] = field(default_factory=list)  # each letter's x1, x2 in pixels, as drawn
    image: Image.Image | None = field(default=None, repr=False)

    def with_shape(self, shape: str) -> list[Shape]:
        return [s for s in self.shapes if s.shape == shape]


@cache
def bold_fonts() -> tuple[str | None, ...]:
    """Bold sans-serif font files found on this machine, then None: Pillow's built-in font,
    drawn with a stroke of its own colour to make it bold (present wherever Pillow is)."""
    found = []
    for folder in _FONT_DIRS:
        if Path(folder).is_dir():
            for name in _BOLD_SANS:
                found += [str(p) for p in sorted(Path(folder).rglob(name))][:1]
    return (*dict.fromkeys(found), None)


def _font(path: str | None, size: int) -> tuple[ImageFont.FreeTypeFont, int]:
    """(font, stroke width) for a cap height of about `size` pixels."""
    if path is None:
        return ImageFont.load_default(size=round(size * 1.45)), max(1, round(size / 12))
    return ImageFont.truetype(path, round(size * 1.37)), 0


def _gradient(width: int, height: int, top: tuple[int, int, int], bottom: tuple[int, int, int]) -> Image.Image:
    column = Image.new("RGB", (1, height))
    for y in range(height):
        t = y / max(1, height - 1)
        column.putpixel((0, y), tuple(round(a + (b - a) * t) for a, b in zip(top, bottom)))
    return column.resize((width, height))


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    x1, y1, x2, y2 = box
    if shape == "circle":
        draw.ellipse((x1, y1, x2 - 1, y2 - 1), fill=fill)
    elif shape == "square":
        draw.rectangle((x1, y1, x2 - 1, y2 - 1), fill=fill)
    else:
        draw.polygon([((x1 + x2) / 2, y1), (x2, y2 - 1), (x1, y2 - 1)], fill=fill)


def _apart(a: tuple[int, int, int, int], b: tuple[int, int, int, int], gap: int) -> bool:
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def _render(scene: Scene, rgb: dict[str, tuple[int, int, int]], word_fill, font_path: str | None,
            word_size: int) -> Scene:
    top, bottom = (rgb[name] for name in scene.background)
    image = _gradient(scene.width, scene.height, top, bottom)
    draw = ImageDraw.Draw(image)
    for s in scene.shapes:
        _draw_shape(draw, s.shape, s.box, rgb[s.colour])
    if scene.word:
        font, stroke = _font(font_path, word_size)
        x, y = scene.word_box[:2]
        left, top_, _, _ = draw.textbbox((0, 0), scene.word, font=font, stroke_width=stroke)
        draw.text((x - left, y - top_), scene.word, font=font, fill=word_fill, stroke_width=stroke, stroke_fill=word_fill)
        # Letter k lies between where the text up to it ends and where the text through it ends
        # (kerning moves a boundary by a pixel or two; the stroke widens both ends).
        ends = [x - left + draw.textbbox((0, 0), scene.word[:k], font=font, stroke_width=stroke)[2] if k else x
                for k in range(len(scene.word))] + [scene.word_box[2]]
        scene.letters = [(round(a), round(b)) for a, b in zip(ends, ends[1:], strict=False)]
    scene.image = image
    return scene


def _word_extent(word: str, font_path: str | None, size: int) -> tuple[int, int]:
    font, stroke = _font(font_path, size)
    left, top, right, bottom = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox(
        (0, 0), word, font=font, stroke_width=stroke)
    return right - left, bottom - top


def _place(rng: random.Random, width: int, height: int, extent: tuple[int, int], taken: list, gap: int,
           tries: int = 60):
    w, h = extent
    if w >= width or h >= height:
        return None
    for _ in range(tries):
        x, y = rng.randrange(0, width - w), rng.randrange(0, height - h)
        box = (x, y, x + w, y + h)
        if all(_apart(box, other, gap) for other in taken):
            return box
    return None


def _background(rng: random.Random, gradient_share: float) -> tuple[str, str]:
    if rng.random() < gradient_share:
        top, bottom = rng.sample(BACKGROUNDS, 2)
        return top, bottom
    plain = rng.choice(BACKGROUNDS)
    return plain, plain


def _allowed_colours(background: tuple[str, str]) -> list[str]:
    return [c for c in COLOURS if c not in background]


def _contrasting(background: tuple[str, str]) -> list[str]:
    """Text colours readable on every part of the background."""
    dark = {"black"} & set(background)
    light = {"white", "light grey"} & set(background)
    if dark and light:  # a gradient from dark to light: a saturated mid colour
        return ["red", "blue", "purple", "green", "orange"]
    return ["white", "yellow", "orange"] if dark else ["black", "blue", "red", "purple", "green"]


def _random_word(rng: random.Random) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 6)))


def training_scene(rng: random.Random) -> Scene:
    """A scene for training: about 110-900 px a side, aspect ratio 1:2 to 2:1, colours jittered,
    shapes placed by rejection, a word in about 45% of scenes."""
    aspect = math.exp(rng.uniform(-math.log(2), math.log(2)))
    area = rng.uniform(160, 640) ** 2
    width, height = max(64, round(math.sqrt(area * aspect))), max(64, round(math.sqrt(area / aspect)))
    short = min(width, height)
    background = _background(rng, 0.3)
    rgb = {name: tuple(max(0, min(255, v + rng.randint(-18, 18))) for v in value) for name, value in RGB.items()}
    for name in BACKGROUNDS:
        rgb[name] = RGB[name] if rng.random() < 0.5 else rgb[name]

    taken: list[tuple[int, int, int, int]] = []
    word = word_box = None
    font_path, word_size = rng.choice(bold_fonts()), 0
    if rng.random() < 0.45:
        word = _random_word(rng)
        for _ in range(6):
            word_size = round(short * rng.uniform(0.08, 0.16))
            word_box = _place(rng, width, height, _word_extent(word, font_path, word_size), taken, 2)
            if word_box:
                taken.append(word_box)
                break
        else:
            word = None

    pairs = [(c, s) for c in _allowed_colours(background) for s in SHAPES]
    shapes: list[Shape] = []
    for colour, shape in rng.sample(pairs, rng.randint(1, 4)):
        for _ in range(8):
            box = _place(rng, width, height, _extent(shape, round(short * rng.uniform(0.15, 0.40))), taken, 2)
            if box:
                taken.append(box)
                shapes.append(Shape(colour, shape, box))
                break
    if not shapes:
        return training_scene(rng)
    word_fill = rgb[rng.choice(_contrasting(background))]
    return _render(Scene(width, height, background, shapes, word, word_box), rgb, word_fill, font_path, word_size)


def _extent(shape: str, side: int) -> tuple[int, int]:
    """Width and height of the bounding box of a shape `side` pixels wide."""
    return side, round(side * math.sqrt(3) / 2) if shape == "triangle" else side


def evaluation_scene(seed: int) -> Scene:
    """A scene for measuring the model, drawn independently of `training_scene`: common photo
    sizes, exact reference colours, shapes 16-36% of the shorter side kept 6 px apart (16% when
    one does not fit), the word (in about half the scenes) placed first in a band at the top or
    the bottom, the fonts taken in turn by seed."""
    rng = random.Random(f"qwen-vl-demo-evaluation-{seed}")
    width, height = rng.choice([(640, 480), (480, 640), (512, 512), (800, 450), (300, 300), (1024, 768),
                                (400, 600), (720, 540)])
    short = min(width, height)
    background = _background(rng, 0.25)
    count = rng.randint(1, 4)
    taken: list[tuple[int, int, int, int]] = []
    word = word_box = None
    fonts = bold_fonts()
    font_path, word_size = fonts[seed % len(fonts)], 0
    if rng.random() < 0.5:
        word = _random_word(rng)
        word_size = round(short * rng.uniform(0.09, 0.14))
        extent = _word_extent(word, font_path, word_size)
        band = rng.choice(["top", "bottom"])
        w, h = extent
        if w < width - 8:
            x = rng.randrange(4, width - w - 4)
            y = rng.randrange(4, max(5, short // 10)) if band == "top" else height - h - rng.randrange(4, max(5, short // 10))
            word_box = (x, y, x + w, y + h)
            taken.append(word_box)
        else:
            word = None

    pairs = [(c, s) for c in _allowed_colours(background) for s in SHAPES]
    shapes: list[Shape] = []
    for colour, shape in rng.sample(pairs, count):
        side = round(short * rng.uniform(0.16, 0.36))
        box = _place(rng, width, height, _extent(shape, side), taken, 6, tries=200)
        if box is None:
            side = round(short * 0.16)
            box = _place(rng, width, height, _extent(shape, side), taken, 3, tries=400)
        if box is not None:
            taken.append(box)
            shapes.append(Shape(colour, shape, box))
    word_fill = RGB[_contrasting(background)[seed % len(_contrasting(background))]]
    return _render(Scene(width, height, background, shapes, word, word_box), RGB, word_fill, font_path, word_size)
