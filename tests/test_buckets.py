"""Aspect-ratio buckets: equal area, step-aligned, bounded aspect, both orientations."""

from __future__ import annotations

import math

import pytest

from rayimg.config import BucketConfig
from rayimg.data.buckets import make_buckets, pick_bucket, target_size

CONFIGS = [
    (BucketConfig(), 512),
    (BucketConfig(), 1024),
    (BucketConfig(min_side=64, max_side=512, step=32, max_aspect=2.0), 256),
    (BucketConfig(min_side=64, max_side=256, step=64, max_aspect=4.0), 128),
]


@pytest.mark.parametrize("cfg,resolution", CONFIGS, ids=lambda v: str(v) if isinstance(v, int) else f"step{v.step}-aspect{v.max_aspect}")
def test_bucket_properties(cfg, resolution):
    buckets = make_buckets(cfg, resolution)
    area = resolution * resolution
    assert buckets == sorted(buckets) == sorted(set(buckets))
    assert buckets == make_buckets(cfg, resolution)
    assert (resolution, resolution) in buckets
    for w, h in buckets:
        assert w % cfg.step == 0 and h % cfg.step == 0
        assert cfg.min_side <= w <= cfg.max_side and cfg.min_side <= h <= cfg.max_side
        assert max(w, h) / min(w, h) <= cfg.max_aspect
        assert area - cfg.step * cfg.max_side <= w * h <= area
        assert (h, w) in buckets  # both orientations
    assert any(w > h for w, h in buckets) and any(w < h for w, h in buckets)


def test_sdxl_buckets_hold_the_familiar_sizes():
    buckets = make_buckets(BucketConfig(), 1024)
    for size in [(1024, 1024), (1152, 896), (896, 1152), (1216, 832), (1344, 768), (768, 1344), (2048, 512)]:
        assert size in buckets


def test_max_aspect_limits_the_extremes():
    wide = make_buckets(BucketConfig(max_aspect=4.0), 1024)
    narrow = make_buckets(BucketConfig(max_aspect=2.0), 1024)
    assert set(narrow) < set(wide)
    assert max(w / h for w, h in narrow) <= 2.0 < max(w / h for w, h in wide)


def test_no_bucket_fits_names_the_fields():
    with pytest.raises(ValueError, match="min_side"):
        make_buckets(BucketConfig(min_side=256), 128)


def _closest_aspect(width, height, buckets):
    return min(abs(math.log(w / h) - math.log(width / height)) for w, h in buckets)


def test_pick_bucket_by_aspect():
    buckets = make_buckets(BucketConfig(), 1024)
    landscape = pick_bucket(1920, 1080, buckets)
    portrait = pick_bucket(1080, 1920, buckets)
    assert landscape[0] > landscape[1]
    assert portrait == (landscape[1], landscape[0])
    assert abs(math.log(landscape[0] / landscape[1]) - math.log(16 / 9)) == pytest.approx(_closest_aspect(1920, 1080, buckets))
    assert landscape == (1344, 768)
    assert pick_bucket(500, 500, buckets) == (1024, 1024)
    assert pick_bucket(37, 37, buckets) == (1024, 1024)


def test_pick_bucket_beyond_max_aspect_takes_the_extreme():
    buckets = make_buckets(BucketConfig(max_aspect=2.0), 1024)
    widest = max(buckets, key=lambda b: (b[0] / b[1], b[0] * b[1]))
    tallest = max(buckets, key=lambda b: (b[1] / b[0], b[0] * b[1]))
    assert pick_bucket(3000, 1000, buckets) == widest
    assert pick_bucket(1000, 3000, buckets) == tallest
    assert widest[0] / widest[1] <= 2.0


def test_pick_bucket_ties():
    # same aspect: larger area wins
    assert pick_bucket(300, 150, [(100, 50), (200, 100)]) == (200, 100)
    # same distance and area (2:1 vs 1:2 from a square): smaller width wins
    assert pick_bucket(64, 64, [(128, 64), (64, 128)]) == (64, 128)
    with pytest.raises(ValueError):
        pick_bucket(10, 10, [])


def test_target_size_without_buckets_is_square():
    assert target_size(300, 200, 512, None) == (512, 512)
    assert target_size(300, 200, 512, [(640, 384), (512, 512)]) == (640, 384)
