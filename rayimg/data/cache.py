"""The encode cache: shards of VAE latents (and optionally text embeddings) plus a manifest.

Layout under the cache root (local or s3://)::

    cache.json               header: model id and hash, family, transforms; checked on resume and by train
    shards/<id>.safetensors  one bucket's items: ``latents`` (N, C, h, w), optional ``prompt_embeds``
                             (N, 77, D) and ``pooled_prompt_embeds`` (N, P)
    shards/<id>.json         the shard's item records; written after the shard, so a shard counts only
                             once its record file exists (a crash mid-write leaves no half entry)
    manifest.jsonl           every kept item: key, shard, index, bucket, caption, SDXL conditioning,
                             image, and the input row it came from (source, line)
    skipped.jsonl            every input row not kept: source, line, image_uri, reason, detail
    report.json              input rows read, kept, skipped per reason; shards, buckets, timing

Shard ids hash the bucket, item keys and input rows they hold: two shards of one run never hold
the same rows, so their names differ, and re-encoding the same rows rewrites the same files. A
re-run skips every key already in a finished shard. The manifest, skipped.jsonl and the report
describe the last run's input: every input row is either kept or skipped with a reason.
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
    image_sha256: str = ""  # of the image file's bytes
    source: str = ""        # the file that listed the item (metadata, manifest) or the image itself
    line: int | None = None  # its line (row, for Parquet) in ``source``; None when it has none

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


def shard_id(records: list[dict], width: int, height: int) -> str:
    """``<width>x<height>-<hash>``: the hash covers each item's key and input row, so shards of
    one run (which never share a row) never share a name, and the same rows give the same name."""
    ident = [[r["key"], r.get("source", ""), r.get("line") or 0, r.get("row", 0)] for r in records]
    digest = hashlib.sha256(json.dumps(ident, separators=(",", ":")).encode()).hexdigest()[:32]
    return f"{width}x{height}-{digest}"


def write_shard(storage: Storage, root: str, records: list[dict], tensors: dict[str, torch.Tensor]) -> str:
    """Write one shard (tensors first, then its record file, which marks it finished)."""
    width, height = records[0]["width"], records[0]["height"]
    sid = shard_id(records, width, height)
    blob = st_save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata={"format": str(CACHE_FORMAT)})
    storage.write_bytes(join(root, "shards", f"{sid}.safetensors"), blob)
    items = [{**{k: v for k, v in r.items() if k != "row"}, "shard": sid, "index": i} for i, r in enumerate(records)]
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


#: A row's fate in one prepare run, as the job reports it to :func:`finalize`.
ROW_STATUSES = ("encoded", "cached", "skipped")


def finalize(storage: Storage, root: str, rows: list[dict], *, seconds: float | None = None) -> dict:
    """Decide every input row of this run: kept (in manifest.jsonl) or skipped (skipped.jsonl),
    then write report.json and return it.

    ``rows`` has one dict per input row: ``row`` (input order), ``source``, ``line`` (0: none),
    ``image_uri``, ``kind``, ``status`` (:data:`ROW_STATUSES`), and ``key``/``image_sha256`` when
    encoded or cached, ``reason``/``detail`` when skipped. A row skipped for a reason of its own
    keeps it; among the usable rows, in input order, one naming an image path an earlier one named
    is a ``duplicate_path``, and one whose image bytes equal those of a row kept earlier is a
    ``duplicate``: the first one wins, whatever order the workers finished in.
    """
    records: dict[str, dict] = {}
    shards = finished_shards(storage, root)
    for shard in shards:
        for item in shard["items"]:
            records.setdefault(item["key"], item)
    first_path: dict[str, dict] = {}
    first_image: dict[str, dict] = {}
    kept, skipped = [], []

    def where(r: dict) -> str:
        return f"{r['source']} line {r['line']}" if r.get("line") else r["source"]

    def skip(r: dict, reason: str, detail: str) -> None:
        skipped.append({"source": r["source"], "line": r.get("line") or None, "image_uri": r.get("image_uri") or None,
                        "reason": reason, "detail": detail})

    for r in sorted(rows, key=lambda r: r["row"]):
        if r["status"] == "skipped":
            skip(r, r["reason"], r.get("detail", ""))
            continue
        uri = r["image_uri"]
        if uri in first_path:
            skip(r, "duplicate_path", f"{uri} is listed again (first at {where(first_path[uri])})")
            continue
        first_path[uri] = r
        record = records[r["key"]]
        image = r.get("image_sha256") or record.get("image_sha256") or ""
        identity = image or r["key"]  # caches written before records held the image hash
        if identity in first_image:
            first = first_image[identity]
            skip(r, "duplicate", f"same image bytes as {first['image_uri']} ({where(first)})")
            continue
        first_image[identity] = r
        kept.append({**record, "image_uri": uri, "kind": r.get("kind") or record.get("kind", "instance"),
                     "image_sha256": image, "source": r["source"], "line": r.get("line") or None})
    # Tensor files whose record never landed belong to an interrupted run; their items were
    # re-encoded into other shards, so the orphans only take space.
    finished = {d["shard"] for d in shards}
    for uri in storage.list(join(root, "shards")):
        if uri.endswith(".safetensors") and uri.rsplit("/", 1)[-1][: -len(".safetensors")] not in finished:
            storage.delete(uri)
    kept.sort(key=lambda it: (it["shard"], it["index"]))
    storage.write_text(join(root, "manifest.jsonl"), "".join(json.dumps(it, sort_keys=True) + "\n" for it in kept))
    storage.write_text(join(root, "skipped.jsonl"), "".join(json.dumps(r, sort_keys=True) + "\n" for r in skipped))
    status = Counter(r["status"] for r in rows)
    report = {
        "rows": len(rows),
        "items": len(kept),
        "skipped": len(skipped),
        "skipped_by_reason": dict(sorted(Counter(r["reason"] for r in skipped).items())),
        "encoded": status["encoded"],
        "already_cached": status["cached"],
        "buckets": dict(sorted(Counter(f"{it['width']}x{it['height']}" for it in kept).items())),
        "shards": len({it["shard"] for it in kept}),
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

