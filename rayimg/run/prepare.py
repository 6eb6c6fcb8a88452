"""`rayimg prepare`: a Ray Data pipeline from captioned images to the encode cache.

    items (listing or streamed manifest) -> read + clean + transform (tasks) -> encode + write
    shards (actor pool, GPU on a cluster) -> small records back to the driver (progress)

The driver only sees item references and per-item records, never image data. Everything that
can be checked before work starts is: the dataset path, its layout and caption column, the model,
and that an existing cache was built with the same model and transforms.
"""

from __future__ import annotations

import time

import numpy as np

from rayimg.config import ConfigError, PrepareJob, StorageConfig, TransformConfig, absolute_paths, to_dict
from rayimg.data import cache as cache_mod
from rayimg.data.sources import DatasetError, check_manifest_columns, check_source, list_items, manifest_rows_to_items
from rayimg.storage import Storage, arrow_filesystem, is_s3

READ_BATCH = 16


def _opt_str(value) -> str | None:
    """A column value that may be missing: Ray Data turns an all-null column into NaN floats."""
    return value if isinstance(value, str) else None


# --------------------------------------------------------------------------- stage 1: read + transform
class Preprocess:
    """Reads each item's bytes and caption, cleans and transforms it; bad items are written to
    the cache's ``bad/`` folder with their reason and dropped from the stream."""

    def __init__(self, storage_cfg: StorageConfig, transforms: TransformConfig, min_size: int, model_key: str,
                 cache_root: str, done: set[str]):
        from rayimg.data.buckets import make_buckets

        self.storage = Storage(storage_cfg)
        self.transforms = transforms
        self.min_size = min_size
        self.model_key = model_key
        self.root = cache_root
        self.done = done
        self.buckets = make_buckets(transforms.buckets, transforms.resolution) if transforms.buckets.enabled else None

    def _read(self, uri: str | None) -> bytes | None:
        return None if uri is None else self.storage.read_bytes(uri)

    def __call__(self, batch: dict) -> dict:
        from rayimg.data.transforms import BadItem, process_item

        out = {k: [] for k in ("key", "caption", "pixels", "width", "height", "original_size", "crop_top_left",
                               "target_size", "flipped", "image_uri", "kind")}
        bad, skipped_done = [], 0
        for i in range(len(batch["image_uri"])):
            uri = str(batch["image_uri"][i])
            caption, caption_uri = _opt_str(batch["caption"][i]), _opt_str(batch["caption_uri"][i])
            try:
                try:
                    image_bytes = self.storage.read_bytes(uri)
                    if caption is None and caption_uri is not None:
                        caption = self._read(str(caption_uri))
                except FileNotFoundError as e:
                    raise BadItem("unreadable", str(e)) from None
                except OSError as e:
                    raise BadItem("unreadable", f"{type(e).__name__}: {e}") from None
                item = process_item(image_bytes, caption, cfg=self.transforms, min_size=self.min_size,
                                    model_id=self.model_key, buckets=self.buckets)
            except BadItem as e:
                bad.append({"image_uri": uri, "reason": e.reason, "detail": e.detail})
                continue
            if item.key in self.done:
                skipped_done += 1
                continue
            out["key"].append(item.key)
            out["caption"].append(item.caption)
            out["pixels"].append(cache_mod.pixels_to_uint8(item.pixels))
            out["width"].append(item.width)
            out["height"].append(item.height)
            out["original_size"].append(np.asarray(item.original_size, dtype=np.int64))
            out["crop_top_left"].append(np.asarray(item.crop_top_left, dtype=np.int64))
            out["target_size"].append(np.asarray(item.target_size, dtype=np.int64))
            out["flipped"].append(bool(item.flipped))
            out["image_uri"].append(uri)
            out["kind"].append(str(batch["kind"][i]))
        cache_mod.write_bad(self.storage, self.root, bad)
        # Bad and already-cached items leave the stream here; their counts ride on the first row
        # for the progress line (the report itself is built from the files). A batch with no
        # usable row drops its counts from progress only.
        n = len(out["key"])
        out["_bad"] = ([len(bad)] + [0] * (n - 1)) if n else []
        out["_done"] = ([skipped_done] + [0] * (n - 1)) if n else []
        return out


# --------------------------------------------------------------------------- stage 2: encode + write shards
class EncodeShards:
    """An actor holding the VAE (and text encoders); writes one shard per bucket of each batch."""

    def __init__(self, model_cfg, storage_cfg: StorageConfig, cache_root: str, cache_text_embeddings: bool, micro_batch: int):
        from rayimg.data.encode import Encoder
        from rayimg.models.loader import load_model

        self.storage = Storage(storage_cfg)
        self.encoder = Encoder(load_model(model_cfg, self.storage), cache_text_embeddings=cache_text_embeddings)
        self.root = cache_root
        self.micro_batch = micro_batch

    def __call__(self, batch: dict) -> dict:
        import torch

        n = len(batch["key"])
        records = [
            {
                "key": str(batch["key"][i]), "caption": str(batch["caption"][i]), "width": int(batch["width"][i]),
                "height": int(batch["height"][i]), "original_size": [int(v) for v in batch["original_size"][i]],
                "crop_top_left": [int(v) for v in batch["crop_top_left"][i]],
                "target_size": [int(v) for v in batch["target_size"][i]], "flipped": bool(batch["flipped"][i]),
                "image_uri": str(batch["image_uri"][i]), "kind": str(batch["kind"][i]),
            }
            for i in range(n)
        ]
        groups: dict[tuple[int, int], list[int]] = {}
        seen = set()
        for i, r in enumerate(records):
            if r["key"] in seen:
                continue  # the same item twice in one batch: encode it once (finalize reports it)
            seen.add(r["key"])
            groups.setdefault((r["width"], r["height"]), []).append(i)
        out = {"key": [], "shard": [], "_bad": [], "_done": []}
        for (_w, _h), idx in sorted(groups.items()):
            latents, embeds = [], {}
            for start in range(0, len(idx), self.micro_batch):
                part = idx[start:start + self.micro_batch]
                latents.append(self.encoder.encode_latents([batch["pixels"][i] for i in part]))
                if self.encoder.cache_text_embeddings:
                    for k, v in self.encoder.encode_text([records[i]["caption"] for i in part]).items():
                        embeds.setdefault(k, []).append(v)
            tensors = {"latents": torch.cat(latents)}
            tensors.update({k: torch.cat(v) for k, v in embeds.items()})
            sid = cache_mod.write_shard(self.storage, self.root, [records[i] for i in idx], tensors)
            out["key"].extend(records[i]["key"] for i in idx)
            out["shard"].extend([sid] * len(idx))
        # carry the skip counters of stage 1 (attached to whichever rows held them)
        total_bad, total_done = int(np.sum(batch["_bad"])), int(np.sum(batch["_done"]))
        out["_bad"] = [total_bad] + [0] * (len(out["key"]) - 1) if out["key"] else []
        out["_done"] = [total_done] + [0] * (len(out["key"]) - 1) if out["key"] else []
        return out


# --------------------------------------------------------------------------- the job
def _item_dataset(cfg: PrepareJob, storage: Storage, fmt: str):
    """(Ray Dataset of item rows, total or None)."""
    import ray

    if fmt != "manifest":
        items = list_items(storage, cfg.data)
        if not items:
            raise DatasetError(f"data.source {cfg.data.source!r}: no images found")
        return ray.data.from_items([it.to_row() for it in items]), len(items)
    filesystem, path = arrow_filesystem(cfg.storage, cfg.data.source)
    if cfg.data.source.endswith(".parquet"):
        import pyarrow.parquet as pq

        meta = pq.ParquetFile(filesystem.open_input_file(path) if filesystem else path)
        check_manifest_columns(meta.schema_arrow.names, cfg.data)
        total = meta.metadata.num_rows
        ds = ray.data.read_parquet(path, filesystem=filesystem, columns=[cfg.data.image_column, cfg.data.caption_column])
    else:
        first = storage.read_bytes(cfg.data.source)[:1 << 16].decode("utf-8", "replace").splitlines()[:1]
        import json

        try:
            columns = json.loads(first[0]).keys() if first else []
        except json.JSONDecodeError as e:
            raise DatasetError(f"manifest {cfg.data.source}: first line is not JSON ({e.msg})") from None
        check_manifest_columns(columns, cfg.data)
        total = None
        ds = ray.data.read_json(path, filesystem=filesystem, lines=True)
    data_cfg = cfg.data

    def to_items(batch):
        rows = [dict(zip(batch.keys(), vals)) for vals in zip(*batch.values())]
        items = [it.to_row() for it in manifest_rows_to_items(rows, data_cfg)]
        return {k: [it[k] for it in items] for k in ("image_uri", "caption", "caption_uri", "kind")}

    return ds.map_batches(to_items, batch_format="numpy"), total


def run(cfg: PrepareJob) -> dict:
    import ray

    from rayimg.run.cluster import connect
    from rayimg.models.loader import check_family, model_id_and_hash, resolve_model_dir

    t0 = time.perf_counter()
    cfg = absolute_paths(cfg)  # workers do not share the driver's working directory
    storage = Storage(cfg.storage)
    root = cfg.cache.output.rstrip("/")
    # --- checks before any work
    try:
        fmt = check_source(storage, cfg.data)
    except DatasetError as e:
        raise ConfigError("", str(e)) from None
    model_dir = resolve_model_dir(cfg.model, storage)
    family = check_family(cfg.model, model_dir)
    model_id, model_hash = model_id_and_hash(cfg.model, model_dir)
    model_cfg = type(cfg.model)(**{**cfg.model.__dict__, "pretrained": str(model_dir)}) if not is_s3(cfg.model.pretrained) else cfg.model

    connect(cfg.cluster)
    print(f"[prepare] {fmt} dataset {cfg.data.source} -> cache {root} (model {model_id})", flush=True)
    try:
        ds, total = _item_dataset(cfg, storage, fmt)
    except DatasetError as e:
        raise ConfigError("", str(e)) from None

    # The header needs the VAE's shape facts; read them from the model dir's config.
    import json as _json
    vae_cfg = _json.loads((model_dir / "vae" / "config.json").read_text())
    header = cache_mod.make_header(
        model_id=model_id, model_hash=model_hash, family=family, transforms=to_dict(cfg.transforms),
        cache_text_embeddings=cfg.cache.cache_text_embeddings, latent_channels=int(vae_cfg["latent_channels"]),
        vae_scale_factor=2 ** (len(vae_cfg["block_out_channels"]) - 1), scaling_factor=float(vae_cfg["scaling_factor"]),
    )
    cache_mod.ensure_header(storage, root, header)
    done = cache_mod.done_keys(storage, root)
    if done:
        print(f"[prepare] resuming: {len(done)} item(s) already cached", flush=True)

    gpu = cfg.cache.num_gpus_per_actor
    # Stateless CPU tasks, so reading, decoding and transforming share the CPUs with the readers
    # (an actor pool here could hold every CPU and starve a manifest's read tasks).
    preprocess = Preprocess(cfg.storage, cfg.transforms, cfg.data.min_size, f"{model_id}@{model_hash[:16]}", root, done)
    ds = ds.map_batches(preprocess, batch_size=READ_BATCH, batch_format="numpy")
    ds = ds.map_batches(
        EncodeShards, batch_size=cfg.cache.shard_size, batch_format="numpy", concurrency=cfg.cache.concurrency,
        num_gpus=gpu if gpu > 0 else None,
        fn_constructor_kwargs=dict(model_cfg=model_cfg, storage_cfg=cfg.storage, cache_root=root,
                                   cache_text_embeddings=cfg.cache.cache_text_embeddings, micro_batch=cfg.cache.batch_size),
    )
    written = bad = skipped = 0
    last = time.perf_counter()
    first_at, first_n = None, 0
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        if first_at is None:  # start-up (actors, model load) ends with the first encoded batch
            first_at, first_n = time.perf_counter(), len(batch["key"])
        written += len(batch["key"])
        bad += int(np.sum(batch["_bad"])) if len(batch["_bad"]) else 0
        skipped += int(np.sum(batch["_done"])) if len(batch["_done"]) else 0
        now = time.perf_counter()
        if now - last >= 5.0:
            last = now
            _progress(written, bad, skipped, total, now - t0)
    _progress(written, bad, skipped, total, time.perf_counter() - t0)
    end = time.perf_counter()
    report = cache_mod.finalize(storage, root, seconds=end - t0)
    if first_at is not None and end > first_at and written > first_n:
        report["steady_items_per_s"] = round((written - first_n) / (end - first_at), 2)
    print(f"[prepare] done: {report['items']} item(s) cached in {report['shards']} shard(s), "
          f"{report['skipped']} skipped {report['skipped_by_reason']}; report {root}/report.json", flush=True)
    if report["items"] == 0:
        raise DatasetError(f"data.source {cfg.data.source!r}: no usable item (skipped: {report['skipped_by_reason']}); "
                           f"see {root}/bad_items.jsonl")
    del ray
    return report


def _progress(written: int, bad: int, skipped: int, total: int | None, elapsed: float) -> None:
    processed = written + bad + skipped
    rate = written / elapsed if elapsed > 0 else 0.0
    if total:
        eta = (total - processed) / (processed / elapsed) if processed else float("nan")
        head = f"{processed}/{total} items ({100 * processed / total:.0f}%)"
        tail = f", ETA {eta:.0f}s" if processed else ""
    else:
        head, tail = f"{processed} items", ""
    print(f"[prepare] {head}: {written} encoded, {skipped} already cached, {bad} skipped, {rate:.1f} items/s{tail}", flush=True)
