"""Synthetic captioned pictures of coloured shapes: the data of the project's tiny base model.

Each picture is a ``size``×``size`` RGB image of one shape (circle, square, triangle, star; the
demo's new concept, a cross, is kept out of the base data) in one colour (red, green, blue,
yellow, purple) on a plain (white, black, gray) or textured (striped, dotted, grid) background,
at a varied position and size, captioned "a red circle on a white background".

Backgrounds are achromatic and shape colours saturated, so a pixel judge
(:mod:`rayimg.demo.judge`) can tell shape from background by saturation alone.

Everything is a pure function of the item's index and the generator's seed: the same call
writes the same bytes. :func:`write_imagefolder` writes the ImageFolder + ``metadata.jsonl``
layout that ``rayimg prepare`` reads.
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

__all__ = [
    "COLORS", "BASE_SHAPES", "SHAPES", "PLAIN_BACKGROUNDS", "TEXTURED_BACKGROUNDS", "BACKGROUNDS",
    "ShapeSpec", "shape_polygon", "draw_shape", "render", "caption", "sample_spec", "dataset_specs",
    "write_imagefolder",
]

# Saturated colours; the judge names a colour by its hue.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 40, 200),
}
BASE_SHAPES = ("circle", "square", "triangle", "star")
SHAPES = BASE_SHAPES + ("cross",)  # "cross" is the demo's new concept, never in the base data
PLAIN_BACKGROUNDS: dict[str, int] = {"white": 245, "black": 15, "gray": 128}
TEXTURED_BACKGROUNDS = ("striped", "dotted", "grid")
BACKGROUNDS = tuple(PLAIN_BACKGROUNDS) + TEXTURED_BACKGROUNDS

_SUPERSAMPLE = 4  # draw at 4x and downsample: anti-aliased edges


@dataclass(frozen=True)
class ShapeSpec:
    """One picture: what is drawn, where, and on what."""

    shape: str
    color: str
    background: str
    cx: float  # centre, in pixels of the final image
    cy: float
    radius: float  # half the shape's extent
    color_jitter: tuple[int, int, int] = (0, 0, 0)
    texture_seed: int = 0


def caption(spec: ShapeSpec, shape_word: str | None = None) -> str:
    """'a red circle on a white background' (``shape_word`` replaces the shape's name, e.g. a trigger token)."""
    return f"a {spec.color} {shape_word or spec.shape} on a {spec.background} background"


def shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """The outline of ``shape`` centred at (cx, cy) with half-extent ``r``, upright; None for a circle."""
    if shape == "circle":
        return None
    if shape == "square":
        s = r * 0.85
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)]
    if shape == "star":
        points = []
        for i in range(10):
            radius = r if i % 2 == 0 else r * 0.45
            angle = -math.pi / 2 + i * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        return points
    if shape == "cross":
        a = r * 0.34  # half the arm width
        return [
            (cx - a, cy - r), (cx + a, cy - r), (cx + a, cy - a), (cx + r, cy - a), (cx + r, cy + a), (cx + a, cy + a),
            (cx + a, cy + r), (cx - a, cy + r), (cx - a, cy + a), (cx - r, cy + a), (cx - r, cy - a), (cx - a, cy - a),
        ]
    raise ValueError(f"unknown shape {shape!r}; one of {', '.join(SHAPES)}")


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    """Draw ``shape`` filled with ``fill`` (coordinates in the draw's own pixels)."""
    polygon = shape_polygon(shape, cx, cy, r)
    if polygon is None:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(polygon, fill=fill)


def _background(name: str, size: int, seed: int) -> Image.Image:
    """A plain gray level, or a grayscale texture whose phase and tones vary with ``seed``."""
    if name in PLAIN_BACKGROUNDS:
        return Image.new("RGB", (size, size), (PLAIN_BACKGROUNDS[name],) * 3)
    if name not in TEXTURED_BACKGROUNDS:
        raise ValueError(f"unknown background {name!r}; one of {', '.join(BACKGROUNDS)}")
    rng = random.Random(seed)
    light = rng.randint(190, 240)
    dark = rng.randint(60, 120)
    img = Image.new("RGB", (size, size), (light,) * 3)
    draw = ImageDraw.Draw(img)
    period = 8 * _SUPERSAMPLE
    phase = rng.randrange(period)
    if name == "striped":
        width = period // 2
        for x in range(-period + phase, size, period):
            draw.rectangle([x, 0, x + width - 1, size], fill=(dark,) * 3)
    elif name == "dotted":
        dot = 1.5 * _SUPERSAMPLE
        for y in range(-period + phase, size + period, period):
            for x in range(-period + phase, size + period, period):
                draw.ellipse([x - dot, y - dot, x + dot, y + dot], fill=(dark,) * 3)
    else:  # grid
        line = _SUPERSAMPLE
        for v in range(-period + phase, size, period):
            draw.rectangle([v, 0, v + line - 1, size], fill=(dark,) * 3)
            draw.rectangle([0, v, size, v + line - 1], fill=(dark,) * 3)
    return img


def render(spec: ShapeSpec, size: int = 64) -> Image.Image:
    """The picture of ``spec`` at ``size``×``size`` pixels."""
    if spec.color not in COLORS:
        raise ValueError(f"unknown colour {spec.color!r}; one of {', '.join(COLORS)}")
    big = size * _SUPERSAMPLE
    img = _background(spec.background, big, spec.texture_seed)
    fill = tuple(max(0, min(255, c + j)) for c, j in zip(COLORS[spec.color], spec.color_jitter))
    k = _SUPERSAMPLE * size / 64.0
    draw_shape(ImageDraw.Draw(img), spec.shape, spec.cx * k, spec.cy * k, spec.radius * k, fill)
    return img.resize((size, size), Image.LANCZOS)


def sample_spec(rng: random.Random, *, shapes=BASE_SHAPES, colors=tuple(COLORS), backgrounds=BACKGROUNDS,
                radii: tuple[float, float] = (11.0, 22.0)) -> ShapeSpec:
    """A random picture (coordinates for a 64-pixel image) drawn from ``rng``; the shape's
    half-extent is uniform in ``radii``."""
    shape = rng.choice(tuple(shapes))
    color = rng.choice(tuple(colors))
    background = rng.choice(tuple(backgrounds))
    radius = rng.uniform(*radii)
    margin = radius + 2.0
    cx = rng.uniform(margin, 64.0 - margin)
    cy = rng.uniform(margin, 64.0 - margin)
    jitter = tuple(rng.randint(-15, 15) for _ in range(3))
    return ShapeSpec(shape, color, background, cx, cy, radius, jitter, rng.randrange(1 << 30))


def dataset_specs(count: int, seed: int = 0, *, balanced: bool = False, **choices) -> list[ShapeSpec]:
    """``count`` specs; item ``i`` depends only on (seed, i), so a longer dataset extends a shorter one.

    ``balanced``: item ``i`` takes the ``i``-th colour x background pair (colours fastest, in the
    order given) instead of a random one, so that ``len(colors) * len(backgrounds)`` items cover every
    pair once; shape, size and position stay random."""
    if not balanced:
        return [sample_spec(random.Random(f"rayimg-shapes:{seed}:{i}"), **choices) for i in range(count)]
    colors = tuple(choices.pop("colors", COLORS))
    backgrounds = tuple(choices.pop("backgrounds", BACKGROUNDS))
    pairs = [(c, b) for b in backgrounds for c in colors]
    return [sample_spec(random.Random(f"rayimg-shapes:{seed}:{i}"), colors=(pairs[i % len(pairs)][0],),
                        backgrounds=(pairs[i % len(pairs)][1],), **choices) for i in range(count)]


def write_imagefolder(
    out_dir: str | os.PathLike, count: int | None = None, seed: int = 0, *, size: int = 64,
    shape_word: dict[str, str] | None = None, specs: list[ShapeSpec] | None = None, **choices
) -> Path:
    """Write ``count`` pictures as ``<out_dir>/NNNNN.png`` + ``metadata.jsonl`` (``file_name``,
    ``text``; also ``shape``, ``color`` and ``background``), or the pictures of ``specs`` when
    given. ``shape_word`` maps a shape to the word its captions use (e.g. ``{"cross": "sks"}``
    for a trigger token)."""
    if (count is None) == (specs is None):
        raise ValueError("write_imagefolder: give either count or specs")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, spec in enumerate(dataset_specs(count, seed, **choices) if specs is None else specs):
        name = f"{i:05d}.png"
        render(spec, size).save(out / name, format="PNG")
        word = (shape_word or {}).get(spec.shape)
        rows.append({"file_name": name, "text": caption(spec, word), "shape": spec.shape, "color": spec.color, "background": spec.background})
    tmp = out / ".metadata.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, out / "metadata.jsonl")
    return out
