"""Aspect-ratio buckets: target sizes of about equal pixel area, so non-square images are
resized and lightly cropped instead of being cropped to squares (the kohya / SDXL scheme).

Every image goes to the bucket whose aspect ratio is closest to its own; a training batch is
then drawn from one bucket, so all its latents have one shape.
"""

from __future__ import annotations

import math
from typing import Sequence

from rayimg.config import BucketConfig

__all__ = ["make_buckets", "pick_bucket", "target_size"]

Size = tuple[int, int]  # (width, height)


def make_buckets(cfg: BucketConfig, resolution: int) -> list[Size]:
    """(width, height) buckets of pixel area at most ``resolution**2`` and within one
    ``step`` row of it: for each width from ``min_side`` to ``max_side`` in steps of ``step``,
    the largest height (a multiple of ``step``) with ``width * height <= resolution**2``.
    Buckets whose height falls outside [min_side, max_side] or whose long/short ratio exceeds
    ``max_aspect`` are left out; each bucket is added in both orientations. Sorted."""
    area = resolution * resolution
    step = cfg.step
    buckets: set[Size] = set()
    for width in range(cfg.min_side, cfg.max_side + 1, step):
        height = (area // width) // step * step
        # Out-of-range heights are skipped, not clamped: clamping would break "equal area".
        if height < cfg.min_side or height > cfg.max_side:
            continue
        if max(width, height) / min(width, height) > cfg.max_aspect + 1e-9:
            continue
        buckets.add((width, height))
        buckets.add((height, width))
    if not buckets:
        raise ValueError(
            f"no aspect-ratio bucket fits transforms.resolution={resolution} with buckets.min_side="
            f"{cfg.min_side}, buckets.max_side={cfg.max_side}, buckets.step={step}: "
            f"min_side must be <= resolution (<= {resolution // step * step} with this step)"
        )
    return sorted(buckets)


def pick_bucket(width: int, height: int, buckets: Sequence[Size]) -> Size:
    """The bucket whose aspect ratio is closest to ``width/height`` in log-ratio distance
    (so 2:1 and 1:2 are equally far from 1:1). Ties go to the larger area, then the smaller
    width. Images beyond the most extreme bucket get that extreme bucket."""
    if not buckets:
        raise ValueError("pick_bucket needs at least one bucket")
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    log_ratio = math.log(width / height)

    def rank(bucket: Size):
        bw, bh = bucket
        # Rounded so that mathematically equal distances tie despite float noise.
        return (round(abs(math.log(bw / bh) - log_ratio), 9), -bw * bh, bw)

    return min(buckets, key=rank)


def target_size(width: int, height: int, resolution: int, buckets: Sequence[Size] | None) -> Size:
    """Where an image of ``width x height`` goes: its bucket when bucketing is on
    (``buckets`` given), else the square ``(resolution, resolution)``."""
    if buckets:
        return pick_bucket(width, height, buckets)
    return (resolution, resolution)
