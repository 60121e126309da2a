"""Qwen-VL's grounding markup in generated text -> boxes.

The model names a region as `<ref>the cat</ref><box>(x1,y1),(x2,y2)</box>`,
with integer coordinates on a 0..1000 grid over the image: the original
normalises the boxes it writes into prompts to [0, 1000), and draws whatever
the model writes as `x / 1000 * width`, so 1000 (the far edge) is accepted
and anything beyond it skipped. Several boxes may
follow one ref, a box may come without a ref, and `<quad>` with four points
(text regions, OCR) may stand in place of a box. Output cut off mid-tag, or
otherwise malformed, is skipped rather than refused: the text is still the
answer.
"""

import re
from dataclasses import dataclass
from typing import Literal

GRID = 1000  # coordinates are on a 0..GRID grid, whatever the image size

_POINT = r"\(\s*(\d{1,4})\s*,\s*(\d{1,4})\s*\)"
# The whole body of a <box> (two corners) or a <quad> (four points), spaces allowed.
_BODY = {kind: re.compile(r"\s*" + r"\s*,\s*".join([_POINT] * n) + r"\s*") for kind, n in (("box", 2), ("quad", 4))}
_TAG = re.compile(
    # A ref may hold any text but another grounding tag; box and quad bodies
    # hold no "<", so a stray opening tag cannot swallow the next good one.
    r"<ref>(?P<ref>(?:(?!</?(?:ref|box|quad)>).)*)</ref>"
    r"|<(?P<kind>box|quad)>(?P<body>[^<]*)</(?P=kind)>",
    re.DOTALL,
)


@dataclass
class GroundingBox:
    """One box or quad the model drew, in grid coordinates (0..1000)."""

    ref: str | None  # the phrase it grounds, when a <ref> came right before
    kind: Literal["box", "quad"]
    points: list[tuple[int, int]]  # as written: 2 corners for a box, 4 for a quad
    box: tuple[int, int, int, int]  # x1, y1, x2, y2 with x1 <= x2, y1 <= y2 (a quad's bounding box)
    # Where this box's markup sits in the text; the first box after a ref also
    # covers the ref, so that spans never overlap.
    span: tuple[int, int]

    def to_pixels(self, width: int, height: int) -> tuple[int, int, int, int]:
        """`box` in pixels of a width x height image, rounded down as the
        original's `draw_bbox_on_latest_picture` does."""
        x1, y1, x2, y2 = self.box
        return (int(x1 / GRID * width), int(y1 / GRID * height), int(x2 / GRID * width), int(y2 / GRID * height))


def parse_grounding(text: str) -> list[GroundingBox]:
    """All boxes and quads in `text`, in order; malformed ones are skipped."""
    boxes: list[GroundingBox] = []
    ref: str | None = None  # the phrase the next boxes belong to
    ref_start: int | None = None  # where that ref begins, until its first box claims it
    previous_end: int | None = None
    for match in _TAG.finditer(text):
        if previous_end is not None and text[previous_end : match.start()].strip():
            ref = ref_start = None  # words in between: what follows is not the ref's
        previous_end = match.end()
        if match["ref"] is not None:
            ref, ref_start = match["ref"].strip(), match.start()
            continue
        points = _parse_points(match["body"], _BODY[match["kind"]])
        if points is None:
            ref = ref_start = None
            continue
        xs, ys = [x for x, _ in points], [y for _, y in points]
        start = match.start() if ref_start is None else ref_start
        ref_start = None
        boxes.append(
            GroundingBox(ref, match["kind"], points, (min(xs), min(ys), max(xs), max(ys)), (start, match.end()))
        )
    return boxes


def _parse_points(body: str, pattern: re.Pattern) -> list[tuple[int, int]] | None:
    match = pattern.fullmatch(body)
    if match is None:
        return None
    values = [int(v) for v in match.groups()]
    if any(v > GRID for v in values):
        return None  # off the grid: not a place in the image
    return list(zip(values[0::2], values[1::2]))
