"""A deterministic analyser of one-shape images: which colour, which shape, where, on which background. numpy only.

`analyse` reads an image the way `shapes.render` draws one, and must also read the noisy, blurry 32x32 and 128x128
outputs of a small diffusion model, so every step is a robust statistic rather than an exact match:

1. Work at 64x64, floats in [0, 1]: larger images box-downsampled, smaller ones (stage I's 32x32) bicubic-
   upsampled, so their antialiased edges give the regions below sub-pixel outlines rather than 2x2 staircases.
2. Background: medians of the four border strips. Opposite strips that disagree mean a two-tone background split
   between them; the split's row/column is where the perpendicular borders switch colour. Pixels within
   `SPLIT_BAND` of it may be a mix of the two background colours.
3. Foreground colour: the largest 4-connected region of pixels far (> `FOREGROUND_DISTANCE`) from the local
   background after a 3x3 majority vote against noise; its colour is the median of its more distant half.
4. Shape region: each pixel's opacity `alpha` is its projection on the segment local background -> foreground
   (an antialiased edge pixel is exactly `alpha f + (1 - alpha) b`); in the split band it is unmixed against both
   background colours. The region is the largest component with `alpha > 0.5`, which keeps areas unbiased.
5. Colour: hue of the foreground colour, or brightness when it is unsaturated. Shape: nearest prototype in
   (fill ratio = area / bounding box, solidity = area / convex hull), from the table measured at the image's
   own size class (upsampled or not). Position: centroid in a 3x3 grid.
6. Background: the border medians of step 2, named as the shape's colour is (step 5), with the split's direction
   for a two-tone one (`read_background`).
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .shapes import COLOURS, ShapeRecord, position_name

WORK_SIZE = 64
BORDER = 2  # px at WORK_SIZE: border strip width for the background estimate
SPLIT_DISTANCE = 0.2  # RGB distance between opposite border medians above which the background is two-tone
SPLIT_BAND = 2  # px either side of a split where background pixels may mix the two colours
FOREGROUND_DISTANCE = 0.15  # RGB distance from the background (palette neighbours are >= 0.32 apart)
ACHROMATIC_CHROMA = 0.2  # max - min of RGB below which a colour is judged white/black by its value
# (fill ratio, solidity) of each shape, measured on clean 64px renderings (median over both sizes) when the sizes were
# 0.09 / 0.145; at today's `shapes.SIZES` the medians are within 0.025 of these (the star's fill ratio is now 0.39).
# For images of `WORK_SIZE` or more.
SHAPE_PROTOTYPES: dict[str, tuple[float, float]] = {
    "circle": (0.78, 0.935),
    "square": (1.0, 1.0),
    "triangle": (0.555, 0.875),
    "star": (0.415, 0.57),
    "cross": (0.56, 0.73),
}
# The same for images smaller than `WORK_SIZE`, as read after their bicubic upsampling: medians over 600 clean 32px
# renderings (both sizes). A 32px star (about 9 px across) keeps less of its points' concavity than at 64px (fill
# 0.47, not 0.415): read with the table above, 11 of 300 clean 32px stars came out crosses.
UPSAMPLED_SHAPE_PROTOTYPES: dict[str, tuple[float, float]] = {
    "circle": (0.775, 0.944),
    "square": (0.994, 0.997),
    "triangle": (0.581, 0.896),
    "star": (0.471, 0.633),
    "cross": (0.57, 0.759),
}


@dataclass(frozen=True)
class Analysis:
    """What `analyse` found. The label fields are None when no foreground region was found.

    `rgb` is the estimated shape colour in [0, 1]; `centroid` (x, y) and `area` are in fractions of the image.
    """

    colour: str | None
    shape: str | None
    position: str | None
    rgb: tuple[float, float, float] | None = None
    centroid: tuple[float, float] | None = None
    area: float = 0.0
    fill_ratio: float = 0.0
    solidity: float = 0.0
    corners: int = 0
    background: str | None = None
    background2: str | None = None
    split: str | None = None


@dataclass(frozen=True)
class _Background:
    """Per-pixel background colour `(H, W, 3)`, and for a two-tone background the two colours and the band mask."""

    image: np.ndarray
    colours: tuple[np.ndarray, ...]
    band: np.ndarray
    split: str | None = None


def _rgb_image(image: Image.Image | np.ndarray) -> Image.Image:
    """An RGB PIL image from a PIL image or an `(H, W, 3)` uint8 / [0, 1] float array (an RGB image as it is: the
    callers only read it)."""
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"`image` has shape {image.shape}; expected (H, W, 3).")
        array = image if image.dtype == np.uint8 else np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8)
        image = Image.fromarray(array)
    if not isinstance(image, Image.Image):
        raise TypeError(f"`image` is a {type(image).__name__}; expected a PIL image or a numpy array.")
    return image if image.mode == "RGB" else image.convert("RGB")


def _upsampled(image: Image.Image) -> bool:
    """Whether `to_pixels` upsamples `image` (bicubically) rather than box-downsampling or keeping it."""
    return min(image.size) < WORK_SIZE


def to_pixels(image: Image.Image | np.ndarray) -> np.ndarray:
    """`(WORK_SIZE, WORK_SIZE, 3)` float64 in [0, 1] from a PIL image or an `(H, W, 3)` uint8 / [0, 1] float array."""
    image = _rgb_image(image)
    if image.size != (WORK_SIZE, WORK_SIZE):
        resample = Image.Resampling.BICUBIC if _upsampled(image) else Image.Resampling.BOX
        image = image.resize((WORK_SIZE, WORK_SIZE), resample)
    return np.asarray(image, dtype=np.float64) / 255.0


def _split_index(pixels: np.ndarray, first: np.ndarray, second: np.ndarray, axis: int) -> int:
    """Row (axis 0) or column (axis 1) where the two border lines running along `axis` switch colour."""
    lines = pixels[:, [0, -1]] if axis == 0 else pixels[[0, -1], :].transpose(1, 0, 2)  # (L, 2, 3)
    nearer_first = np.linalg.norm(lines - first, axis=-1) < np.linalg.norm(lines - second, axis=-1)
    return int(round(nearer_first.sum() / 2))


def estimate_background(pixels: np.ndarray) -> _Background:
    """Plain or two-tone background from the medians of the four border strips (robust to a shape touching one)."""
    top, bottom = (np.median(pixels[rows].reshape(-1, 3), axis=0) for rows in (slice(0, BORDER), slice(-BORDER, None)))
    left, right = (
        np.median(pixels[:, cols].reshape(-1, 3), axis=0) for cols in (slice(0, BORDER), slice(-BORDER, None))
    )
    size = pixels.shape[0]
    image, band = np.empty_like(pixels), np.zeros(pixels.shape[:2], dtype=bool)
    if np.linalg.norm(top - bottom) > SPLIT_DISTANCE:
        at = _split_index(pixels, top, bottom, axis=0)
        image[:at], image[at:] = top, bottom
        band[max(at - SPLIT_BAND, 0) : at + SPLIT_BAND] = True
        return _Background(image, (top, bottom), band, "horizontal")
    if np.linalg.norm(left - right) > SPLIT_DISTANCE:
        at = _split_index(pixels, left, right, axis=1)
        image[:, :at], image[:, at:] = left, right
        band[:, max(at - SPLIT_BAND, 0) : at + SPLIT_BAND] = True
        return _Background(image, (left, right), band, "vertical")
    border = np.concatenate([pixels[:BORDER].reshape(-1, 3), pixels[-BORDER:].reshape(-1, 3),
                             pixels[:, :BORDER].reshape(-1, 3), pixels[:, -BORDER:].reshape(-1, 3)])  # fmt: skip
    image[:] = np.median(border, axis=0)
    return _Background(image, (image[0, 0],), np.zeros((size, size), dtype=bool))


def _distance_to_segment(pixels: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """RGB distance of each pixel to the segment a-b (the colours a blurred a|b edge can take)."""
    direction = b - a
    t = np.clip(((pixels - a) @ direction) / max(float(direction @ direction), 1e-12), 0.0, 1.0)
    return np.linalg.norm(pixels - (a + t[..., None] * direction), axis=-1)


def _foreground_distance(pixels: np.ndarray, background: _Background) -> np.ndarray:
    """Distance to the local background colour, or, in a split band, to any mix of the two background colours."""
    distance = np.linalg.norm(pixels - background.image, axis=-1)
    if len(background.colours) == 2:
        mixed = _distance_to_segment(pixels, *background.colours)
        distance = np.where(background.band, mixed, distance)
    return distance


def _majority(mask: np.ndarray) -> np.ndarray:
    """3x3 majority vote (>= 5 of 9): drops isolated noise pixels, fills pinholes."""
    padded = np.pad(mask.astype(np.int32), 1)
    h, w = mask.shape
    votes = sum(padded[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3))
    return votes >= 5


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of `mask` (all False if empty); ties go to the lowest pixel index.

    Labels start as pixel indices and repeatedly take the maximum over 4-neighbours inside the mask until stable.
    """
    h, w = mask.shape
    labels = np.where(mask, np.arange(1, h * w + 1).reshape(h, w), 0)
    while True:
        padded = np.pad(labels, 1)
        neighbours = np.stack(
            [padded[1:-1, 1:-1], padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]]
        )
        updated = np.where(mask, neighbours.max(axis=0), 0)
        if np.array_equal(updated, labels):
            break
        labels = updated
    counts = np.bincount(labels.ravel())
    counts[0] = 0
    return labels == int(counts.argmax()) if counts.max() > 0 else np.zeros_like(mask)


def _alpha(pixels: np.ndarray, background: _Background, colour: np.ndarray) -> np.ndarray:
    """Estimated shape opacity per pixel: projection onto background -> `colour`; in a split band, unmixed in 3 colours."""
    direction = colour - background.image
    alpha = np.einsum("hwc,hwc->hw", pixels - background.image, direction) / np.maximum((direction**2).sum(-1), 1e-12)
    if len(background.colours) == 2:
        # pixel - b = s (a - b) + alpha (colour - b): least squares over the two mixing weights (s, alpha).
        a, b = background.colours
        basis = np.stack([a - b, colour - b], axis=1)  # (3, 2)
        weights = (pixels - b) @ np.linalg.pinv(basis).T  # (H, W, 2)
        alpha = np.where(background.band, weights[..., 1], alpha)
    return alpha


def _convex_hull(points: np.ndarray) -> np.ndarray:
    """Convex hull (Andrew's monotone chain) of `(N, 2)` points, counter-clockwise, without collinear points."""
    unique = [tuple(p) for p in np.unique(points, axis=0).tolist()]
    if len(unique) < 3:
        return np.array(unique, dtype=np.float64).reshape(-1, 2)

    def half(sequence: list[tuple[float, float]]) -> list[tuple[float, float]]:
        chain: list[tuple[float, float]] = []
        for x, y in sequence:
            # pop while the last two chain points and (x, y) do not turn counter-clockwise (2D cross product <= 0)
            while (
                len(chain) >= 2
                and (chain[-1][0] - chain[-2][0]) * (y - chain[-2][1])
                - (chain[-1][1] - chain[-2][1]) * (x - chain[-2][0])
                <= 0
            ):
                chain.pop()
            chain.append((x, y))
        return chain

    lower, upper = half(unique), half(unique[::-1])
    return np.array(lower[:-1] + upper[:-1], dtype=np.float64)


def _polygon_area(vertices: np.ndarray) -> float:
    x, y = vertices[:, 0], vertices[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _count_corners(hull: np.ndarray, min_share: float = 0.03) -> int:
    """Vertices left after simplifying the hull (Visvalingam): repeatedly drop the vertex whose triangle with its
    neighbours is smallest, while that triangle is under `min_share` of the hull's area. Pixel staircases vanish;
    a triangle keeps 3, a square 4, a star's pentagonal hull 5, a cross's octagonal hull 8, a circle ~10 or more."""
    vertices = [np.asarray(v, dtype=np.float64) for v in hull]
    limit = min_share * _polygon_area(np.asarray(vertices)) if len(vertices) >= 3 else 0.0
    while len(vertices) > 3:
        areas = [_polygon_area(np.stack([vertices[k - 1], vertices[k], vertices[(k + 1) % len(vertices)]]))
                 for k in range(len(vertices))]  # fmt: skip
        smallest = int(np.argmin(areas))
        if areas[smallest] >= limit:
            break
        del vertices[smallest]
    return len(vertices)


def _region_geometry(region: np.ndarray) -> tuple[float, float, int]:
    """(fill ratio, solidity, corner count) of a pixel region, measured on the pixels' squares (not their centres)."""
    ys, xs = np.nonzero(region)
    area = float(len(xs))
    box = (xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1)
    # Leftmost and rightmost pixel of each row suffice for the hull; each pixel contributes its four corners.
    rows = np.unique(ys)
    ends = np.array([(x, y) for y in rows for x in (xs[ys == y].min(), xs[ys == y].max())], dtype=np.float64)
    corners = np.concatenate([ends + offset for offset in ((0, 0), (1, 0), (0, 1), (1, 1))])
    hull = _convex_hull(corners)
    return area / box, area / max(_polygon_area(hull), 1.0), _count_corners(hull)


def name_colour(rgb: np.ndarray) -> str:
    """Palette name of an RGB colour in [0, 1]: by brightness if unsaturated, else by nearest hue (circular)."""
    chroma = float(rgb.max() - rgb.min())
    if chroma < ACHROMATIC_CHROMA:
        return "white" if float(rgb.mean()) > 0.5 else "black"
    hue = colorsys.rgb_to_hsv(*rgb)[0]
    distances = {}
    for name, value in COLOURS.items():
        reference = np.asarray(value, dtype=np.float64) / 255.0
        if reference.max() - reference.min() >= ACHROMATIC_CHROMA:
            delta = abs(hue - colorsys.rgb_to_hsv(*reference)[0])
            distances[name] = min(delta, 1.0 - delta)
    return min(distances, key=distances.get)


def name_shape(fill_ratio: float, solidity: float,
               prototypes: dict[str, tuple[float, float]] = SHAPE_PROTOTYPES) -> str:  # fmt: skip
    """Nearest `prototypes` entry in (fill ratio, solidity): `SHAPE_PROTOTYPES` for images read at or above
    `WORK_SIZE`, `UPSAMPLED_SHAPE_PROTOTYPES` for smaller ones."""
    return min(prototypes, key=lambda s: np.hypot(fill_ratio - prototypes[s][0], solidity - prototypes[s][1]))


def name_position(x: float, y: float) -> str:
    """3x3 grid cell of a centroid given in fractions of the side."""
    column = "left" if x < 1 / 3 else "right" if x > 2 / 3 else "middle"
    row = "top" if y < 1 / 3 else "bottom" if y > 2 / 3 else "middle"
    return position_name(row, column)


def _foreground_colour(pixels: np.ndarray, background: _Background) -> np.ndarray | None:
    """Median colour of the more distant half of the largest far-from-background region (None if there is none)."""
    distance = _foreground_distance(pixels, background)
    region = largest_component(_majority(distance > FOREGROUND_DISTANCE))
    if not region.any():
        return None
    inner = region & (distance >= np.median(distance[region]))
    return np.median(pixels[inner], axis=0)


def read_background(background: _Background) -> dict[str, str | None]:
    """`Analysis`' background fields: the colour names of a plain background (`background`), or of a two-tone one's
    left or top half (`background`) and other half (`background2`) with its `split` ("vertical": left | right,
    "horizontal": top / bottom), as `shapes.ShapeRecord` has them."""
    names = [name_colour(colour) for colour in background.colours]
    return {"background": names[0], "background2": names[1] if len(names) == 2 else None, "split": background.split}


def analyse(image: Image.Image | np.ndarray) -> Analysis:
    """Colour, shape and grid position of the largest non-background region of `image`, and its background (see the
    module docstring)."""
    image = _rgb_image(image)
    prototypes = UPSAMPLED_SHAPE_PROTOTYPES if _upsampled(image) else SHAPE_PROTOTYPES
    pixels = to_pixels(image)
    background = estimate_background(pixels)
    backdrop = read_background(background)
    colour = _foreground_colour(pixels, background)
    if colour is None:
        return Analysis(None, None, None, **backdrop)
    region = largest_component(_alpha(pixels, background, colour) > 0.5)
    if not region.any():
        return Analysis(name_colour(colour), None, None, rgb=tuple(colour.tolist()), **backdrop)
    ys, xs = np.nonzero(region)
    x, y = (xs.mean() + 0.5) / WORK_SIZE, (ys.mean() + 0.5) / WORK_SIZE
    fill_ratio, solidity, corners = _region_geometry(region)
    return Analysis(
        colour=name_colour(colour),
        shape=name_shape(fill_ratio, solidity, prototypes),
        position=name_position(x, y),
        rgb=tuple(float(c) for c in colour),
        centroid=(float(x), float(y)),
        area=float(region.mean()),
        fill_ratio=fill_ratio,
        solidity=solidity,
        corners=corners,
        **backdrop,
    )


def background_matches(found: Analysis, record: ShapeRecord) -> bool:
    """Whether `found` reads `record`'s background: the same plain colour, or a two-tone one split the same way with
    the same colour on each side."""
    return (found.background, found.background2, found.split) == (record.background, record.background2, record.split)


def score(images: Sequence[Image.Image | np.ndarray], records: Sequence[ShapeRecord]) -> dict[str, float]:
    """Fraction of images whose analysed colour, shape, position (and all three at once: "all") and background
    (`background_matches`) match their record."""
    if len(images) != len(records) or not records:
        raise ValueError(
            f"`images` has {len(images)} items and `records` {len(records)}; expected the same number > 0."
        )
    hits = {"colour": 0, "shape": 0, "position": 0, "all": 0, "background": 0}
    for image, record in zip(images, records):
        found = analyse(image)
        matches = {
            "colour": found.colour == record.colour,
            "shape": found.shape == record.shape,
            "position": found.position == record.position,
        }
        matches["all"] = all(matches.values())
        matches["background"] = background_matches(found, record)
        for key, matched in matches.items():
            hits[key] += int(matched)
    return {key: count / len(records) for key, count in hits.items()}
