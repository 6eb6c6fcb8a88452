"""The pixel judge names colour and shape of pictures drawn by hand here with PIL's own
primitives (not through the generator's geometry), and of the generator's pictures."""

from __future__ import annotations

import math
import random

import pytest
from PIL import Image, ImageDraw, ImageFilter

from rayimg.demo.judge import judge
from rayimg.demo.shapes import SHAPES, dataset_specs, render

HAND_COLORS = {"red": (255, 0, 0), "green": (0, 200, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0), "purple": (128, 0, 160)}


def hand_drawn(shape: str, color: str, rng: random.Random, background: str = "white", size: int = 64) -> Image.Image:
    """``shape`` drawn with ImageDraw primitives at a random place and size on ``background``."""
    bg = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (140, 140, 140)}.get(background, (230, 230, 230))
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    if background == "stripes":
        for x in range(0, size, 6):
            draw.line([(x, 0), (x, size)], fill=(90, 90, 90), width=2)
    r = rng.uniform(0.16, 0.34) * size
    cx, cy = rng.uniform(r + 1, size - r - 1), rng.uniform(r + 1, size - r - 1)
    fill = HAND_COLORS[color]
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - 0.8 * r, cy - 0.8 * r, cx + 0.8 * r, cy + 0.8 * r], fill=fill)
    elif shape == "triangle":
        draw.regular_polygon((cx, cy, r), 3, rotation=0, fill=fill)  # apex up
    elif shape == "star":
        pts = []
        for i in range(10):
            rad = r if i % 2 == 0 else r * 0.5
            a = math.radians(-90 + 36 * i)
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        draw.polygon(pts, fill=fill)
    elif shape == "cross":
        w = 0.3 * r
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
    else:
        raise ValueError(shape)
    return img


def test_hand_drawn_pictures_are_judged_right():
    rng = random.Random(1234)
    cases = [(s, c, b) for s in SHAPES for c in HAND_COLORS for b in ("white", "black", "gray", "stripes")]
    color_ok = shape_ok = 0
    wrong = []
    for shape, color, background in cases:
        verdict = judge(hand_drawn(shape, color, rng, background))
        color_ok += verdict.color == color
        shape_ok += verdict.shape == shape
        if (verdict.color, verdict.shape) != (color, shape):
            wrong.append((shape, color, background, verdict.color, verdict.shape))
    n = len(cases)
    assert color_ok / n >= 0.98, wrong
    assert shape_ok / n >= 0.95, wrong


def test_blurred_and_larger_pictures_keep_their_shape():
    """Renders are soft-edged; the judge must not depend on crisp edges or on the 64-pixel size."""
    rng = random.Random(7)
    ok = 0
    cases = [(s, c) for s in SHAPES for c in HAND_COLORS]
    for shape, color in cases:
        img = hand_drawn(shape, color, rng, size=128).filter(ImageFilter.GaussianBlur(2.5))
        verdict = judge(img)
        ok += (verdict.shape, verdict.color) == (shape, color)
    assert ok / len(cases) >= 0.9


def test_no_shape_means_none():
    for bg in ((255, 255, 255), (0, 0, 0), (128, 128, 128)):
        verdict = judge(Image.new("RGB", (64, 64), bg))
        assert (verdict.color, verdict.shape) == ("none", "none")
    # a textured gray background alone is no shape either
    img = Image.new("RGB", (64, 64), (220, 220, 220))
    draw = ImageDraw.Draw(img)
    for x in range(0, 64, 8):
        draw.rectangle([x, 0, x + 3, 64], fill=(80, 80, 80))
    assert judge(img).shape == "none"


def test_the_largest_region_wins_over_specks():
    rng = random.Random(3)
    img = hand_drawn("triangle", "blue", rng)
    draw = ImageDraw.Draw(img)
    draw.rectangle([0, 0, 2, 2], fill=(255, 0, 0))  # a red speck in a corner
    verdict = judge(img)
    assert (verdict.color, verdict.shape) == ("blue", "triangle")


@pytest.mark.parametrize("seed", [0, 1])
def test_generator_pictures_agree_with_their_specs(seed):
    specs = dataset_specs(100, seed=seed, shapes=SHAPES)
    verdicts = [judge(render(s)) for s in specs]
    assert sum(v.color == s.color for v, s in zip(verdicts, specs)) >= 99
    assert sum(v.shape == s.shape for v, s in zip(verdicts, specs)) >= 97


def test_same_pixels_same_verdict():
    img = hand_drawn("star", "yellow", random.Random(0))
    assert judge(img) == judge(img.copy())
