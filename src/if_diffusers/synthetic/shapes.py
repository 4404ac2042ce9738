"""A deterministic captioned-shapes dataset: one coloured shape on a plain or two-tone background.

Every example is a pure function of `(index, seed)`: the attributes are drawn from
`np.random.default_rng((seed, index, split))` into a frozen `ShapeRecord`, the caption is written from the record
alone, and `render(record, size)` draws the record at any size (32 for the demo's stage I, 128 after its stage II). Drawing happens
at 4x the target size and is box-downsampled, so edges are antialiased and each edge pixel is the area-weighted mix
of shape and background (which is what `analysis.analyse` assumes when it thresholds at half contrast).

A fixed set of (shape, colour) pairs, `HELD_OUT_PAIRS`, never occurs in `training_examples`; `held_out_examples`
draws only those pairs, to measure whether a model composes attributes it has only seen apart.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
# Hues spaced >= 20 degrees apart and two achromatic colours: `analysis` separates them by hue, or by brightness when
# saturation is low. Values in 0..255 RGB.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (250, 140, 10),
    "yellow": (245, 220, 30),
    "green": (40, 170, 50),
    "blue": (30, 70, 220),
    "purple": (140, 50, 200),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
# Half-extent of the shape as a fraction of the image side (a circle's radius, a square's half side).
# Large enough that the analyser still reads the shape at 32x32 (the demo cascade's stage-I size), small enough that
# a shape in an outer cell keeps clear of the image's edge (the analyser reads the background there).
SIZES: dict[str, float] = {"small": 0.13, "large": 0.18}
# 3x3 grid: row (y) and column (x) anchors as fractions of the side. Anchors sit 0.093 inside the thirds' boundaries
# (1/3, 2/3) so that jitter plus antialiasing never moves a centroid into the neighbouring cell.
ROWS: dict[str, float] = {"top": 0.24, "middle": 0.5, "bottom": 0.76}
COLUMNS: dict[str, float] = {"left": 0.24, "middle": 0.5, "right": 0.76}
POSITION_PHRASES: dict[str, str] = {
    "top left": "at the top left",
    "top": "at the top",
    "top right": "at the top right",
    "left": "on the left",
    "middle": "in the middle",
    "right": "on the right",
    "bottom left": "at the bottom left",
    "bottom": "at the bottom",
    "bottom right": "at the bottom right",
}
POSITIONS: tuple[str, ...] = tuple(POSITION_PHRASES)
SPLITS: tuple[str, ...] = ("vertical", "horizontal")
# Reserved (shape, colour) pairs: each shape once, each colour at most once, so every word still occurs in training.
HELD_OUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {("circle", "purple"), ("square", "orange"), ("triangle", "green"), ("star", "red"), ("cross", "white")}
)
TWO_TONE_PROBABILITY = 0.3
# Captions leave out the size, and independently the position, with this probability (the record still has them),
# so that short prompts such as "a red circle on a blue background" are in the training distribution.
OMIT_PROBABILITY = 0.2
POSITION_JITTER = 0.02  # uniform, fraction of the side
SIZE_JITTER = 0.08  # uniform, relative
SUPERSAMPLE = 4
_TRAIN, _HELD_OUT = 0, 1  # rng stream tags: the two splits never share a random stream


@dataclass(frozen=True)
class ShapeRecord:
    """Everything needed to render and caption one example.

    `centre` is the shape's centroid in fractions of the side (x, y); `extent` its half-extent, also in fractions.
    `background2` and `split` are both None for a plain background; for a two-tone one, `background` fills the left
    (vertical split) or top (horizontal split) half and `background2` the other half. `says_size` and
    `says_position` tell whether the caption names the size and the position.
    """

    shape: str
    colour: str
    size: str
    position: str
    background: str
    background2: str | None
    split: str | None
    centre: tuple[float, float]
    extent: float
    says_size: bool = True
    says_position: bool = True

    @property
    def caption(self) -> str:
        return caption(self)


@dataclass(frozen=True)
class Example:
    """A rendered example: the image, its caption and the record both were made from."""

    image: Image.Image
    caption: str
    record: ShapeRecord


def position_name(row: str, column: str) -> str:
    """Grid cell name: "top left", "top", "middle", "right", ... (the middle row/column is left unnamed)."""
    parts = [part for part in (row, column) if part != "middle"]
    return " ".join(parts) if parts else "middle"


def _grid_cell(position: str) -> tuple[str, str]:
    """Inverse of `position_name`: (row, column)."""
    for row in ROWS:
        for column in COLUMNS:
            if position_name(row, column) == position:
                return row, column
    raise ValueError(f"`position` is {position!r}; expected one of {POSITIONS}.")


def caption(record: ShapeRecord) -> str:
    """e.g. "a small red triangle at the top left on a blue background" (without "small" when not
    `record.says_size`, without "at the top left" when not `record.says_position`)."""
    if record.split is None:
        background = f"on a {record.background} background"
    elif record.split == "vertical":
        background = f"on a background with {record.background} on the left and {record.background2} on the right"
    else:
        background = f"on a background with {record.background} at the top and {record.background2} at the bottom"
    words = ["a", record.size if record.says_size else "", record.colour, record.shape,
             POSITION_PHRASES[record.position] if record.says_position else "", background]  # fmt: skip
    return " ".join(word for word in words if word)


def caption_vocabulary() -> tuple[str, ...]:
    """Every word any caption can contain, sorted (to train a sentencepiece tokenizer on)."""
    words: set[str] = set()
    phrases = ["a on background with at the top and bottom left right", *SHAPES, *COLOURS, *SIZES]
    for phrase in [*phrases, *POSITION_PHRASES.values()]:
        words.update(phrase.split())
    return tuple(sorted(words))


def is_held_out(record: ShapeRecord) -> bool:
    """Whether the record's (shape, colour) pair is reserved for evaluation."""
    return (record.shape, record.colour) in HELD_OUT_PAIRS


def _choice(rng: np.random.Generator, options: tuple[str, ...] | list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _draw_backgrounds(rng: np.random.Generator, colour: str) -> tuple[str, str | None, str | None]:
    """A background colour, and with probability `TWO_TONE_PROBABILITY` a second one and a split; never `colour`."""
    others = [name for name in COLOURS if name != colour]
    background = _choice(rng, others)
    if rng.random() >= TWO_TONE_PROBABILITY:
        return background, None, None
    background2 = _choice(rng, [name for name in others if name != background])
    return background, background2, _choice(rng, SPLITS)


def sample_record(index: int, seed: int = 0, held_out: bool = False) -> ShapeRecord:
    """The record of example `index` of the training split (or of the held-out split), a pure function of its args.

    Training draws (shape, colour) uniformly among the non-reserved pairs; held-out draws uniformly among
    `HELD_OUT_PAIRS`. All other attributes are drawn the same way in both splits.
    """
    if not isinstance(index, int) or index < 0:
        raise ValueError(f"`index` is {index!r}; expected a non-negative int.")
    rng = np.random.default_rng((seed, index, _HELD_OUT if held_out else _TRAIN))
    pairs = sorted(HELD_OUT_PAIRS) if held_out else [
        (shape, colour) for shape in SHAPES for colour in COLOURS if (shape, colour) not in HELD_OUT_PAIRS
    ]  # fmt: skip
    shape, colour = pairs[int(rng.integers(len(pairs)))]
    size = _choice(rng, tuple(SIZES))
    row, column = _choice(rng, tuple(ROWS)), _choice(rng, tuple(COLUMNS))
    background, background2, split = _draw_backgrounds(rng, colour)
    dx, dy = rng.uniform(-POSITION_JITTER, POSITION_JITTER, size=2)
    extent = SIZES[size] * (1.0 + rng.uniform(-SIZE_JITTER, SIZE_JITTER))
    centre = (round(COLUMNS[column] + float(dx), 4), round(ROWS[row] + float(dy), 4))
    says_size, says_position = (bool(draw >= OMIT_PROBABILITY) for draw in rng.random(2))
    return ShapeRecord(shape, colour, size, position_name(row, column), background, background2, split, centre,
                       round(float(extent), 4), says_size, says_position)  # fmt: skip


def _regular_polygon(cx: float, cy: float, radii: list[float]) -> list[tuple[float, float]]:
    """Vertices at equal angles starting straight up, alternating through `radii` (one radius: a regular polygon)."""
    n = len(radii)
    return [
        (cx + r * math.sin(2 * math.pi * k / n), cy - r * math.cos(2 * math.pi * k / n)) for k, r in enumerate(radii)
    ]


def _shape_polygon(shape: str, cx: float, cy: float, h: float) -> list[tuple[float, float]]:
    """Outline of a polygonal shape, in pixels, whose centroid is (cx, cy)."""
    if shape == "square":
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":  # equilateral, pointing up; circumradius 1.15 h keeps its area close to the square's half
        return _regular_polygon(cx, cy, [1.15 * h] * 3)
    if shape == "star":  # five points, inner radius 0.4 of the outer one
        return _regular_polygon(cx, cy, [1.15 * h, 0.46 * h] * 5)
    if shape == "cross":  # a plus sign whose arms are a third of its width
        w = h / 3
        xs, ys = (cx - h, cx - w, cx + w, cx + h), (cy - h, cy - w, cy + w, cy + h)
        corners = [(1, 0), (2, 0), (2, 1), (3, 1), (3, 2), (2, 2), (2, 3), (1, 3), (1, 2), (0, 2), (0, 1), (1, 1)]
        return [(xs[i], ys[j]) for i, j in corners]
    raise ValueError(f"`shape` is {shape!r}; expected one of {SHAPES}.")


def _draw_background(draw: ImageDraw.ImageDraw, record: ShapeRecord, side: int) -> None:
    draw.rectangle((0, 0, side, side), fill=COLOURS[record.background])
    if record.split == "vertical":
        draw.rectangle((side // 2, 0, side, side), fill=COLOURS[record.background2])
    elif record.split == "horizontal":
        draw.rectangle((0, side // 2, side, side), fill=COLOURS[record.background2])


def render(record: ShapeRecord, size: int = 64) -> Image.Image:
    """Draw `record` as a `size` x `size` RGB image: drawn at `SUPERSAMPLE` x and box-downsampled (antialiased)."""
    if not isinstance(size, int) or size < 8:
        raise ValueError(f"`size` is {size!r}; expected an int >= 8.")
    side = size * SUPERSAMPLE
    canvas = Image.new("RGB", (side, side))
    draw = ImageDraw.Draw(canvas)
    _draw_background(draw, record, side)
    cx, cy, h = record.centre[0] * side, record.centre[1] * side, record.extent * side
    fill = COLOURS[record.colour]
    if record.shape == "circle":
        draw.ellipse((cx - h, cy - h, cx + h, cy + h), fill=fill)
    else:
        draw.polygon(_shape_polygon(record.shape, cx, cy, h), fill=fill)
    return canvas.resize((size, size), Image.Resampling.BOX)


def make_example(index: int, seed: int = 0, size: int = 64, held_out: bool = False) -> Example:
    """Example `index` of a split: `render(sample_record(...), size)` with its caption."""
    record = sample_record(index, seed, held_out)
    return Example(render(record, size), caption(record), record)


def training_examples(n: int, seed: int = 0, size: int = 64) -> Iterator[Example]:
    """The first `n` training examples (no reserved pair among them)."""
    return (make_example(index, seed, size) for index in range(n))


def held_out_examples(n: int, seed: int = 0, size: int = 64) -> Iterator[Example]:
    """The first `n` held-out examples (only reserved pairs)."""
    return (make_example(index, seed, size, held_out=True) for index in range(n))


class ShapesDataset:
    """Indexable view of a split (`len`, `[i]` -> `Example`), e.g. for a torch `DataLoader` with a transform."""

    def __init__(self, length: int, seed: int = 0, size: int = 64, held_out: bool = False) -> None:
        if not isinstance(length, int) or length < 0:
            raise ValueError(f"`length` is {length!r}; expected a non-negative int.")
        self.length, self.seed, self.size, self.held_out = length, seed, size, held_out

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Example:
        if not 0 <= index < self.length:
            raise IndexError(f"`index` is {index}; expected 0 <= index < {self.length}.")
        return make_example(index, self.seed, self.size, self.held_out)
