"""A deterministic pixel judge: which colour and which shape is in a picture of a coloured shape.

Backgrounds of the shape pictures (:mod:`rayimg.demo.shapes`) are achromatic and shapes are
saturated, so:

1. the foreground is the largest 4-connected region of saturated pixels (max - min channel
   above a threshold);
2. its colour is the palette colour nearest in hue to the region's mean colour;
3. its shape is the template (circle, square, triangle, star, cross, each drawn upright to fill
   its bounding box) with the highest IoU against the region cropped to its bounding box.

No learning, no randomness: the same pixels give the same verdict. A picture with too small a
saturated region gets ``color = shape = "none"``.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from rayimg.demo.shapes import COLORS, SHAPES, draw_shape

__all__ = ["Verdict", "judge", "foreground_mask", "SATURATION_THRESHOLD", "MIN_AREA_FRACTION"]

SATURATION_THRESHOLD = 60  # of 255: max - min channel
MIN_AREA_FRACTION = 0.01  # of the picture: below this there is no shape
_TEMPLATE_SIZE = 32


@dataclass(frozen=True)
class Verdict:
    color: str
    shape: str
    shape_scores: dict  # IoU per shape template
    area_fraction: float  # the foreground region's share of the picture


def _hue(rgb) -> float:
    r, g, b = (float(c) / 255.0 for c in rgb)
    return colorsys.rgb_to_hsv(r, g, b)[0] * 360.0


_PALETTE_HUES = {name: _hue(rgb) for name, rgb in COLORS.items()}


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of ``mask`` (label propagation: each pixel takes the
    largest label among itself and its masked neighbours until nothing changes)."""
    h, w = mask.shape
    labels = np.where(mask, np.arange(1, h * w + 1).reshape(h, w), 0)
    while True:
        padded = np.pad(labels, 1)
        best = np.maximum.reduce([labels, padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]])
        best = np.where(mask, best, 0)
        if np.array_equal(best, labels):
            break
        labels = best
    values, counts = np.unique(labels[mask], return_counts=True)
    if len(values) == 0:
        return mask
    return labels == values[np.argmax(counts)]


def foreground_mask(image: Image.Image) -> np.ndarray:
    """Boolean (H, W): the largest region of saturated pixels. The threshold is half the
    picture's peak saturation (at least :data:`SATURATION_THRESHOLD`), so a soft-edged shape is
    cut at its half-way edge, as a crisp one is."""
    rgb = np.asarray(image.convert("RGB")).astype(np.int16)
    saturation = rgb.max(axis=2) - rgb.min(axis=2)
    threshold = max(SATURATION_THRESHOLD, 0.5 * float(np.percentile(saturation, 99)))
    saturated = saturation > threshold
    return _largest_component(saturated) if saturated.any() else saturated


@lru_cache(maxsize=None)
def _templates() -> dict[str, np.ndarray]:
    out = {}
    for shape in SHAPES:
        big = Image.new("L", (512, 512), 0)
        draw_shape(ImageDraw.Draw(big), shape, 256, 256, 200, 255)
        out[shape] = _normalise(np.asarray(big) > 127)
    return out


def _normalise(mask: np.ndarray) -> np.ndarray:
    """``mask`` cropped to its bounding box and resized to a fixed square."""
    ys, xs = np.nonzero(mask)
    crop = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    img = Image.fromarray((crop * 255).astype(np.uint8)).resize((_TEMPLATE_SIZE, _TEMPLATE_SIZE), Image.BILINEAR)
    return np.asarray(img) > 127


def judge(image: Image.Image) -> Verdict:
    """The colour and shape in ``image`` (any size; shapes upright as the generator draws them)."""
    mask = foreground_mask(image)
    area = float(mask.mean())
    if area < MIN_AREA_FRACTION:
        return Verdict("none", "none", {}, area)
    rgb = np.asarray(image.convert("RGB")).astype(np.float64)
    hue = _hue(rgb[mask].mean(axis=0))
    color = min(_PALETTE_HUES, key=lambda c: min(abs(hue - _PALETTE_HUES[c]), 360 - abs(hue - _PALETTE_HUES[c])))
    region = _normalise(mask)
    scores = {}
    for shape, template in _templates().items():
        union = np.logical_or(region, template).sum()
        scores[shape] = float(np.logical_and(region, template).sum() / union) if union else 0.0
    shape = max(scores, key=scores.get)
    return Verdict(color, shape, scores, area)
