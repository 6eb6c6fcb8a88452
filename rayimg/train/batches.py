"""Turning item records into training batches: from the latent cache, or encoded on the fly."""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import numpy as np
import torch

from rayimg.data.cache import pixels_to_uint8, uint8_to_pixels


def time_ids(record: dict) -> list[int]:
    """SDXL micro-conditioning: original_size + crop_top_left + target_size (each (h, w))."""
    return [*record["original_size"], *record["crop_top_left"], *record["target_size"]]


class CachedBatches:
    """Batches from cache records; shard tensors are loaded on demand and kept in a small LRU.

    With ``use_embeddings`` (the text encoders are frozen) a cache holding text embeddings gives
    ``prompt_embeds`` and no captions, so no text encoder runs in the training step; otherwise
    the captions are passed and encoded in the step.
    """

    def __init__(self, records: list[dict], load_shard: Callable[[str], dict[str, torch.Tensor]], family: str,
                 max_shards: int = 16, use_embeddings: bool = True):
        self.records = records
        self.use_embeddings = use_embeddings
        self.load_shard = load_shard
        self.family = family
        self.max_shards = max_shards
        self._shards: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()

    def buckets(self) -> list[tuple[int, int]]:
        return [(r["width"], r["height"]) for r in self.records]

    def _shard(self, sid: str) -> dict[str, torch.Tensor]:
        if sid in self._shards:
            self._shards.move_to_end(sid)
        else:
            self._shards[sid] = self.load_shard(sid)
            while len(self._shards) > self.max_shards:
                self._shards.popitem(last=False)
        return self._shards[sid]

    def batch(self, indices: list[int], device) -> dict:
        recs = [self.records[i] for i in indices]
        rows = [self._shard(r["shard"]) for r in recs]
        out = {"latents": torch.stack([s["latents"][r["index"]] for s, r in zip(rows, recs)]).to(device)}
        if self.use_embeddings and "prompt_embeds" in rows[0]:
            out["prompt_embeds"] = torch.stack([s["prompt_embeds"][r["index"]] for s, r in zip(rows, recs)]).to(device)
            if "pooled_prompt_embeds" in rows[0]:
                out["pooled_prompt_embeds"] = torch.stack([s["pooled_prompt_embeds"][r["index"]] for s, r in zip(rows, recs)]).to(device)
        else:
            out["captions"] = [r["caption"] for r in recs]
        if self.family == "sdxl":
            out["time_ids"] = torch.tensor([time_ids(r) for r in recs], dtype=torch.float32, device=device)
        out["is_class"] = torch.tensor([r.get("kind") == "class" for r in recs], device=device)
        return out


class PixelBatches:
    """Batches of preprocessed images, encoded by the VAE inside the training step (no cache)."""

    def __init__(self, items: list, family: str):
        # items: rayimg.data.transforms.PreparedItem, with a ``kind`` attribute set by the caller
        self.items = [(it, pixels_to_uint8(it.pixels)) for it in items]
        self.family = family

    def buckets(self) -> list[tuple[int, int]]:
        return [(it.width, it.height) for it, _ in self.items]

    def batch(self, indices: list[int], device) -> dict:
        picked = [self.items[i] for i in indices]
        out = {"pixels": uint8_to_pixels(torch.as_tensor(np.stack([px for _, px in picked]))).to(device),
               "captions": [it.caption for it, _ in picked]}
        if self.family == "sdxl":
            out["time_ids"] = torch.tensor([[*it.original_size, *it.crop_top_left, *it.target_size] for it, _ in picked],
                                           dtype=torch.float32, device=device)
        out["is_class"] = torch.tensor([getattr(it, "kind", "instance") == "class" for it, _ in picked], device=device)
        return out


def make_batches(job, records: list[dict], storage, family: str, model_key: str, *, use_embeddings: bool = True):
    """:class:`CachedBatches` over cache records when ``job.cache`` is set, else
    :class:`PixelBatches` of the source items, read and transformed here (bad items skipped)."""
    from rayimg.data.buckets import make_buckets
    from rayimg.data.cache import CacheReader
    from rayimg.data.transforms import BadItem, process_item

    if job.cache:
        return CachedBatches(records, lambda sid: CacheReader.load_shard_from(storage, job.cache, sid), family,
                             use_embeddings=use_embeddings)
    t = job.transforms
    buckets = make_buckets(t.buckets, t.resolution) if t.buckets.enabled else None
    items = []
    for r in records:
        try:
            caption = r["caption"] if isinstance(r.get("caption"), str) else (
                storage.read_bytes(r["caption_uri"]) if isinstance(r.get("caption_uri"), str) else None)
            item = process_item(storage.read_bytes(r["image_uri"]), caption, cfg=t, min_size=job.data.min_size,
                                model_id=model_key, buckets=buckets)
        except (BadItem, OSError):
            continue
        item.kind = r.get("kind", "instance")
        items.append(item)
    if not items:
        raise ValueError(f"data.source {job.data.source!r}: no usable item")
    return PixelBatches(items, family)
