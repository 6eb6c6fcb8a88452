"""The encode cache: shards of VAE latents (and optionally text embeddings) plus a manifest.

Layout under the cache root (local or s3://)::

    cache.json               header: model id and hash, family, transforms; checked on resume and by train
    shards/<id>.safetensors  one bucket's items: ``latents`` (N, C, h, w), optional ``prompt_embeds``
                             (N, 77, D) and ``pooled_prompt_embeds`` (N, P)
    shards/<id>.json         the shard's item records; written after the shard, so a shard counts only
                             once its record file exists (a crash mid-write leaves no half entry)
    bad/<id>.jsonl           items skipped for a reason (written as they are found)
    manifest.jsonl           every item: key, shard, index, bucket, caption, SDXL conditioning, source
    report.json              counts per skip reason and totals

Shard ids are hashes of the item keys they hold, so re-encoding the same items rewrites the same
files; a re-run skips every key already in a finished shard.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from rayimg.storage import Storage, join

CACHE_FORMAT = 1
# Header fields that must match for a cache to be reused or trained from.
COMPAT_FIELDS = ("format", "model_id", "model_hash", "family", "transforms", "cache_text_embeddings")


class CacheError(ValueError):
    """The cache is missing, broken or built for something else; the message says which."""


@dataclass
class CacheItem:
    """One cached item's record (its tensors are row ``index`` of ``shard``)."""

    key: str
    shard: str
    index: int
    width: int
    height: int
    caption: str
    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]
    target_size: tuple[int, int]
    flipped: bool
    image_uri: str
    kind: str

    @classmethod
    def from_dict(cls, d: dict) -> "CacheItem":
        return cls(**{**d, "original_size": tuple(d["original_size"]), "crop_top_left": tuple(d["crop_top_left"]),
                      "target_size": tuple(d["target_size"])})

    def to_dict(self) -> dict:
        return {**self.__dict__, "original_size": list(self.original_size), "crop_top_left": list(self.crop_top_left),
                "target_size": list(self.target_size)}


def make_header(*, model_id: str, model_hash: str, family: str, transforms: dict, cache_text_embeddings: bool,
                latent_channels: int, vae_scale_factor: int, scaling_factor: float) -> dict:
    return {
        "format": CACHE_FORMAT,
        "model_id": model_id,
        "model_hash": model_hash,
        "family": family,
        "transforms": transforms,
        "cache_text_embeddings": cache_text_embeddings,
        "latent_channels": latent_channels,
        "vae_scale_factor": vae_scale_factor,
        "scaling_factor": scaling_factor,
        "latents": "vae latent_dist mean x scaling_factor",
    }


def read_header(storage: Storage, root: str) -> dict | None:
    uri = join(root, "cache.json")
    if not storage.exists(uri):
        return None
    try:
        return json.loads(storage.read_text(uri))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CacheError(f"{uri}: not a valid cache header ({e})") from None


def check_compatible(existing: dict, wanted: dict, root: str) -> None:
    """Refuse to mix items encoded with another model or other transforms into one cache."""
    for name in COMPAT_FIELDS:
        if existing.get(name) != wanted.get(name):
            raise CacheError(
                f"cache {root} was built with {name}={existing.get(name)!r}, this job has {wanted.get(name)!r}; "
                "use another cache.output or delete the old cache"
            )


def ensure_header(storage: Storage, root: str, header: dict) -> None:
    existing = read_header(storage, root)
    if existing is None:
        storage.write_text(join(root, "cache.json"), json.dumps(header, indent=2, sort_keys=True))
    else:
        check_compatible(existing, header, root)


def shard_id(keys: list[str], width: int, height: int) -> str:
    digest = hashlib.sha256("\n".join(keys).encode()).hexdigest()[:20]
    return f"{width}x{height}-{digest}"


def write_shard(storage: Storage, root: str, records: list[dict], tensors: dict[str, torch.Tensor]) -> str:
    """Write one shard (tensors first, then its record file, which marks it finished)."""
    keys = [r["key"] for r in records]
    width, height = records[0]["width"], records[0]["height"]
    sid = shard_id(keys, width, height)
    blob = st_save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata={"format": str(CACHE_FORMAT)})
    storage.write_bytes(join(root, "shards", f"{sid}.safetensors"), blob)
    items = [{**r, "shard": sid, "index": i} for i, r in enumerate(records)]
    storage.write_text(join(root, "shards", f"{sid}.json"), json.dumps({"shard": sid, "items": items}))
    return sid


def finished_shards(storage: Storage, root: str) -> list[dict]:
    """Record files of every finished shard (sorted by shard id)."""
    out = []
    for uri in storage.list(join(root, "shards")):
        if uri.endswith(".json"):
            out.append(json.loads(storage.read_text(uri)))
    out.sort(key=lambda s: s["shard"])
    return out


def done_keys(storage: Storage, root: str) -> set[str]:
    return {item["key"] for shard in finished_shards(storage, root) for item in shard["items"]}


def write_bad(storage: Storage, root: str, rows: list[dict]) -> None:
    if not rows:
        return
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)
    name = hashlib.sha256(text.encode()).hexdigest()[:20]
    storage.write_text(join(root, "bad", f"{name}.jsonl"), text)


def finalize(storage: Storage, root: str, *, seconds: float | None = None) -> dict:
    """Merge shard records into manifest.jsonl and bad items into report.json; return the report.

    An item seen twice (same key: same image bytes, caption and settings) is kept once and the
    later copies are reported as ``duplicate``.
    """
    seen: dict[str, dict] = {}
    duplicates = []
    for shard in finished_shards(storage, root):
        for item in shard["items"]:
            if item["key"] in seen:
                duplicates.append({"image_uri": item["image_uri"], "reason": "duplicate",
                                   "detail": f"same content as {seen[item['key']]['image_uri']}"})
            else:
                seen[item["key"]] = item
    bad = {}
    for uri in storage.list(join(root, "bad")):
        for line in storage.read_text(uri).splitlines():
            if line.strip():
                row = json.loads(line)
                bad[(row["image_uri"], row["reason"])] = row
    for row in duplicates:
        bad.setdefault((row["image_uri"], row["reason"]), row)
    bad_rows = sorted(bad.values(), key=lambda r: (r["reason"], r["image_uri"]))
    # Tensor files whose record never landed belong to an interrupted run; their items were
    # re-encoded into other shards, so the orphans only take space.
    finished = {s for s in (it["shard"] for it in seen.values())} | {d["shard"] for d in finished_shards(storage, root)}
    for uri in storage.list(join(root, "shards")):
        if uri.endswith(".safetensors") and uri.rsplit("/", 1)[-1][: -len(".safetensors")] not in finished:
            storage.delete(uri)
    items = sorted(seen.values(), key=lambda it: (it["shard"], it["index"]))
    storage.write_text(join(root, "manifest.jsonl"), "".join(json.dumps(it, sort_keys=True) + "\n" for it in items))
    storage.write_text(join(root, "bad_items.jsonl"), "".join(json.dumps(r, sort_keys=True) + "\n" for r in bad_rows))
    report = {
        "items": len(items),
        "skipped": len(bad_rows),
        "skipped_by_reason": dict(sorted(Counter(r["reason"] for r in bad_rows).items())),
        "buckets": dict(sorted(Counter(f"{it['width']}x{it['height']}" for it in items).items())),
        "shards": len({it["shard"] for it in items}),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if seconds is not None:
        report["seconds"] = round(seconds, 2)
    storage.write_text(join(root, "report.json"), json.dumps(report, indent=2, sort_keys=True))
    return report


class CacheReader:
    """Read a finished cache: header, item records and shard tensors."""

    def __init__(self, storage: Storage, root: str):
        self.storage = storage
        self.root = root
        header = read_header(storage, root)
        if header is None:
            raise CacheError(f"{root}: no cache.json; run `rayimg prepare` to build the cache first")
        self.header = header
        manifest = join(root, "manifest.jsonl")
        if not storage.exists(manifest):
            raise CacheError(f"{root}: no manifest.jsonl; the prepare run did not finish (re-run it to resume)")
        self.items = [CacheItem.from_dict(json.loads(line)) for line in storage.read_text(manifest).splitlines() if line.strip()]

    def check_model(self, model_id: str, model_hash: str) -> None:
        if self.header.get("model_hash") != model_hash:
            raise CacheError(
                f"cache {self.root} was built for model {self.header.get('model_id')!r} (hash {str(self.header.get('model_hash'))[:12]}), "
                f"not {model_id!r} (hash {model_hash[:12]}); prepare a cache with this model"
            )

    def load_shard(self, shard: str) -> dict[str, torch.Tensor]:
        return self.load_shard_from(self.storage, self.root, shard)

    @staticmethod
    def load_shard_from(storage: Storage, root: str, shard: str) -> dict[str, torch.Tensor]:
        """One shard's tensors (safetensors only: nothing from storage is unpickled)."""
        return st_load(storage.read_bytes(join(root, "shards", f"{shard}.safetensors")))


def pixels_to_uint8(pixels: np.ndarray) -> np.ndarray:
    """[-1, 1] float pixels from an 8-bit image back to uint8, exactly."""
    return np.clip(np.rint((pixels + 1.0) * 127.5), 0, 255).astype(np.uint8)


def uint8_to_pixels(arr) -> torch.Tensor:
    """uint8 (array or tensor, on any device) -> float32 in [-1, 1]."""
    t = arr if isinstance(arr, torch.Tensor) else torch.as_tensor(np.asarray(arr))
    return t.float().div(127.5).sub(1.0)

