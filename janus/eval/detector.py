"""A programmatic object detector for the shapes world (janus.data.shapes).

pixels -> palette colour (or nothing) -> 4-connected components of one colour -> shape, size, position.

- Colour: each pixel takes the nearest of the background and the palette colours. It keeps a palette
  colour only when it is a plausible blend of that colour with the background (within COLOUR_TOLERANCE
  of the segment between them): an anti-aliased edge pixel that is more colour than background joins
  its object, one that is more background is dropped, and off-palette pixels (noise) are dropped.
- Components smaller than MIN_AREA of the image are specks, not objects.
- Shape: the component's mask is compared with every shape drawn into the same bounding box (the
  renderer's own outlines, same anti-aliasing); the best intersection-over-union names the shape, and
  below MIN_SHAPE_IOU the shape is unknown (None). At 32 px a small object is 7 px wide: corner and
  vertex counts are not measurable there, whole-mask overlap is.
- Size: the bounding box's longer side against SIZE_THRESHOLD. Position: the bounding box's centre,
  which is what the scenes' coordinates and relations use (a triangle's centroid sits lower).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from itertools import product

import numpy as np
from PIL import Image, ImageDraw

from janus.data.shapes import BACKGROUND, PALETTE, SHAPES, SIZE_THRESHOLD, SUPERSAMPLE, polygon

COLOUR_TOLERANCE = 60.0  # RGB distance from the background-to-colour segment
MIN_AREA = 0.005  # of the image's pixels; the smallest object (a small star) covers about 0.017
MIN_SHAPE_IOU = 0.6
SMALL_MASK = 24  # pixels; masks up to this size are also matched in slightly larger boxes

_COLOUR_NAMES = tuple(PALETTE)
_REFERENCE = np.array([BACKGROUND, *PALETTE.values()], dtype=np.float64)  # row 0: background
_DIRECTIONS = _REFERENCE[1:] - _REFERENCE[0]


@dataclass(frozen=True)
class DetectedObject:
    colour: str
    shape: str | None  # None: no shape fits well enough
    size: str  # "small" | "large"
    x: float  # bounding-box centre, in image widths from the left
    y: float  # ... in image heights from the top
    width: float  # bounding box, in image widths
    height: float  # ... in image heights
    area: int  # pixels
    shape_iou: float  # overlap with the best-fitting shape


def detect(image: Image.Image) -> list[DetectedObject]:
    """The objects in an image, in reading order of their top-left pixel."""
    rgb = np.asarray(image.convert("RGB"))
    height, width = rgb.shape[:2]
    labels = colour_labels(rgb)
    objects = []
    for colour, runs in components(labels):
        area = sum(end - start for _, start, end in runs)
        if area < MIN_AREA * width * height:
            continue
        rows = [r for r, _, _ in runs]
        top, bottom = min(rows), max(rows) + 1
        left, right = min(s for _, s, _ in runs), max(e for _, _, e in runs)
        mask = np.zeros((bottom - top, right - left), dtype=bool)
        for r, start, end in runs:
            mask[r - top, start - left : end - left] = True
        shape, iou = classify_shape(mask)
        box_w, box_h = (right - left) / width, (bottom - top) / height
        objects.append(
            DetectedObject(
                colour=_COLOUR_NAMES[colour],
                shape=shape,
                size="small" if max(box_w, box_h) < SIZE_THRESHOLD else "large",
                x=(left + right) / 2 / width,
                y=(top + bottom) / 2 / height,
                width=box_w,
                height=box_h,
                area=area,
                shape_iou=iou,
            )
        )
    return objects


def colour_labels(rgb: np.ndarray) -> np.ndarray:
    """[H, W] palette index of every pixel of a uint8 [H, W, 3] RGB array; -1 for none."""
    # Each distinct colour is classified once: a rendered image has a few hundred of them.
    codes = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
    distinct, index = np.unique(codes.ravel(), return_inverse=True)
    colours = np.stack([distinct >> 16, (distinct >> 8) & 255, distinct & 255], axis=1).astype(np.float64)
    nearest = ((colours[:, None, :] - _REFERENCE[None]) ** 2).sum(-1).argmin(1)
    colour = np.maximum(nearest - 1, 0)
    direction = _DIRECTIONS[colour]
    offset = colours - _REFERENCE[0]
    t = np.clip((offset * direction).sum(1) / (direction * direction).sum(1), 0.0, 1.0)
    residual = np.linalg.norm(offset - t[:, None] * direction, axis=1)
    labels = np.where((nearest > 0) & (residual <= COLOUR_TOLERANCE), colour, -1)
    return labels[index].reshape(rgb.shape[:2])


def components(labels: np.ndarray) -> list[tuple[int, list[tuple[int, int, int]]]]:
    """4-connected components of equal labels >= 0, each as (label, runs of (row, start, end)).

    Works on horizontal runs, not pixels: runs on neighbouring rows with the same label that share a
    column are joined (union-find), which keeps the Python loop to a few runs per row.
    """
    height, width = labels.shape
    flat = labels.ravel()
    new_run = np.ones(flat.size, dtype=bool)
    new_run[1:] = flat[1:] != flat[:-1]
    new_run[::width] = True  # a run never continues onto the next row
    starts = np.flatnonzero(new_run)
    ends = np.append(starts[1:], flat.size)
    keep = flat[starts] >= 0
    starts, ends = starts[keep], ends[keep]
    rows = starts // width
    runs = list(zip(rows.tolist(), (starts - rows * width).tolist(), (ends - rows * width).tolist(), flat[starts].tolist()))
    first = np.searchsorted(rows, np.arange(height + 1)).tolist()  # runs of row r: first[r]:first[r + 1]

    parent = list(range(len(runs)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for r in range(1, height):
        i, above_end = first[r - 1], first[r]
        for j in range(first[r], first[r + 1]):  # both rows' runs are sorted by column: walk them together
            _, start, end, label = runs[j]
            while i < above_end and runs[i][2] <= start:
                i += 1
            k = i
            while k < above_end and runs[k][1] < end:
                if runs[k][3] == label:
                    parent[root(j)] = root(k)
                k += 1

    groups: dict[int, list[int]] = {}
    for i in range(len(runs)):
        groups.setdefault(root(i), []).append(i)
    return [(runs[members[0]][3], [runs[m][:3] for m in members]) for members in groups.values()]


def classify_shape(mask: np.ndarray) -> tuple[str | None, float]:
    """The shape whose outline, drawn into the mask's bounding box, overlaps it best, and that IoU."""
    height, width = mask.shape
    # At small sizes a thin tip (a star's point) can be less than half covered and drop out of the
    # mask, leaving it a pixel short of the shape's box on some side: try boxes grown by one pixel too.
    growths = product((0, 1), repeat=4) if max(height, width) <= SMALL_MASK else [(0, 0, 0, 0)]
    scores = dict.fromkeys(SHAPES, 0.0)
    for left, top, right, bottom in growths:
        box = np.zeros((height + top + bottom, width + left + right), dtype=bool)
        box[top : top + height, left : left + width] = mask
        for shape in SHAPES:
            scores[shape] = max(scores[shape], _iou(box, shape_mask(shape, box.shape[1], box.shape[0])))
    shape = max(scores, key=scores.get)
    return (shape if scores[shape] >= MIN_SHAPE_IOU else None), scores[shape]


@lru_cache(maxsize=8192)
def shape_mask(shape: str, width: int, height: int) -> np.ndarray:
    """`shape` filling a width x height box, rendered as the scenes are: pixels at least half covered."""
    big = Image.new("L", (width * SUPERSAMPLE, height * SUPERSAMPLE), 0)
    outline = polygon(shape, width * SUPERSAMPLE / 2, height * SUPERSAMPLE / 2, width * SUPERSAMPLE, height * SUPERSAMPLE)
    ImageDraw.Draw(big).polygon(outline, fill=255)
    return np.asarray(big.reduce(SUPERSAMPLE)) >= 128


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))
