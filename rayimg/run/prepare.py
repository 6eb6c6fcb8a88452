"""`rayimg prepare`: a Ray Data pipeline from captioned images to the encode cache.

    rows (listing or streamed manifest lines) -> read + clean + transform (tasks) -> encode + write
    shards (actor pool, GPU on a cluster) -> one small record per row back to the driver

The driver only sees item references and per-row records, never image data. No single row stops
the job: a malformed or incomplete metadata line, a missing or broken file, a duplicate goes on
as a skipped row with its reason, and the end of the run decides every row -- kept (manifest.jsonl)
or skipped (skipped.jsonl, with the file and line it came from) -- and counts them in report.json.
Everything that can be checked before work starts is: the dataset path, its layout and columns,
the model, and that an existing cache was built with the same model and transforms.
"""

from __future__ import annotations

import json
import time

import numpy as np
from ray.data.datasource import FileBasedDatasource

from rayimg.config import ConfigError, PrepareJob, StorageConfig, TransformConfig, absolute_paths, to_dict
from rayimg.data import cache as cache_mod
from rayimg.data.sources import (DatasetError, SourceItem, check_manifest_columns, check_manifest_sample, check_source,
                                 list_rows, manifest_rows_to_items)
from rayimg.storage import Storage, arrow_filesystem, is_s3

READ_BATCH = 16
MANIFEST_BLOCK_ROWS = 4096
ITEM_COLUMNS = ("image_uri", "caption", "caption_uri", "kind", "source", "line", "row", "reason", "detail")
# What stage 1 hands stage 2: every row, with pixels only when status is "encode".
STAGE1_COLUMNS = ("status", "key", "image_sha256", "caption", "pixels", "width", "height", "original_size",
                  "crop_top_left", "target_size", "flipped", "image_uri", "kind", "source", "line", "row", "reason", "detail")
# What reaches the driver: one small record per input row (cache.finalize decides its fate).
ROW_COLUMNS = ("row", "source", "line", "image_uri", "kind", "status", "key", "image_sha256", "reason", "detail")
NO_PIXELS = np.zeros((3, 0, 0), dtype=np.uint8)


def _opt_str(value) -> str | None:
    """A column value that may be missing: Ray Data turns an all-null column into NaN floats."""
    return value if isinstance(value, str) else None


# --------------------------------------------------------------------------- stage 0: manifest lines
class ManifestLines(FileBasedDatasource):
    """A manifest as rows ``(line, raw)``: each non-blank line of a JSONL file, or each row of a
    Parquet file (its image and caption columns as JSON, ``line`` = row number). Parsing is left
    to the per-row stage, so a malformed line becomes a skipped row, not a failed read."""

    def __init__(self, path: str, *, filesystem, columns: list[str]):
        super().__init__(path, filesystem=filesystem)
        self.columns = columns

    def _open_input_source(self, filesystem, path: str, **open_args):
        if path.endswith(".parquet"):
            return filesystem.open_input_file(path)  # Parquet needs random access
        return super()._open_input_source(filesystem, path, **open_args)

    def _read_stream(self, f, path: str):
        lines = self._parquet_rows(f) if path.endswith(".parquet") else self._jsonl_lines(f)
        numbers, raws = [], []
        for number, raw in lines:
            numbers.append(number)
            raws.append(raw)
            if len(numbers) >= MANIFEST_BLOCK_ROWS:
                yield self._block(numbers, raws)
                numbers, raws = [], []
        if numbers:
            yield self._block(numbers, raws)

    @staticmethod
    def _block(numbers, raws):
        import pyarrow as pa

        return pa.table({"line": pa.array(numbers, pa.int64()), "raw": pa.array(raws, pa.binary())})

    @staticmethod
    def _jsonl_lines(f):
        pending, number = b"", 0
        while True:
            chunk = f.read(1 << 20)
            if not chunk:
                break
            *complete, pending = (pending + chunk).split(b"\n")
            for line in complete:
                number += 1
                if line.strip():
                    yield number, line
        if pending.strip():
            yield number + 1, pending

    def _parquet_rows(self, f):
        import pyarrow.parquet as pq

        number = 0
        for batch in pq.ParquetFile(f).iter_batches(batch_size=MANIFEST_BLOCK_ROWS, columns=self.columns):
            for row in batch.to_pylist():
                number += 1
                yield number, json.dumps(row, default=str).encode()


# --------------------------------------------------------------------------- stage 1: read + transform
class Preprocess:
    """Reads each row's image and caption, cleans and transforms it. Every row goes on: a usable
    one with its pixels (status ``encode``), one already in the cache as ``cached``, an unusable
    one as ``skipped`` with its reason."""

    def __init__(self, storage_cfg: StorageConfig, transforms: TransformConfig, min_size: int, model_key: str,
                 done: set[str]):
        from rayimg.data.buckets import make_buckets

        self.storage = Storage(storage_cfg)
        self.transforms = transforms
        self.min_size = min_size
        self.model_key = model_key
        self.done = done
        self.buckets = make_buckets(transforms.buckets, transforms.resolution) if transforms.buckets.enabled else None

    def _read(self, uri: str, missing: str) -> "bytes | tuple[str, str]":
        """The bytes at ``uri``, or (reason, detail): ``missing`` when there is no such file."""
        try:
            return self.storage.read_bytes(uri)
        except FileNotFoundError:
            return missing, f"{uri} does not exist"
        except OSError as e:
            return "unreadable", f"{uri}: {type(e).__name__}: {e}"

    def _prepare(self, uri: str, caption: str | None, caption_uri: str | None):
        """A PreparedItem, or (reason, detail) for a row that cannot be used."""
        from rayimg.data.transforms import BadItem, process_item

        image_bytes = self._read(uri, "missing_file")
        if isinstance(image_bytes, tuple):
            return image_bytes
        if caption is None and caption_uri is not None:
            caption = self._read(caption_uri, "missing_caption")
            if isinstance(caption, tuple):
                return caption
        try:
            return process_item(image_bytes, caption, cfg=self.transforms, min_size=self.min_size,
                                model_id=self.model_key, buckets=self.buckets)
        except BadItem as e:
            return e.reason, e.detail
        except Exception as e:  # one row's surprise is that row's skip reason, not the job's end
            return "processing_error", f"{type(e).__name__}: {e}"

    def __call__(self, batch: dict) -> dict:
        out = {k: [] for k in STAGE1_COLUMNS}
        for i in range(len(batch["image_uri"])):
            row = {"image_uri": str(batch["image_uri"][i]), "kind": str(batch["kind"][i]), "source": str(batch["source"][i]),
                   "line": int(batch["line"][i]), "row": int(batch["row"][i])}
            reason, detail = _opt_str(batch["reason"][i]), _opt_str(batch["detail"][i]) or ""
            item = (reason, detail) if reason else self._prepare(
                row["image_uri"], _opt_str(batch["caption"][i]), _opt_str(batch["caption_uri"][i]))
            if isinstance(item, tuple):
                _append(out, row, status="skipped", reason=item[0], detail=item[1])
            elif item.key in self.done:
                _append(out, row, status="cached", key=item.key, image_sha256=item.image_sha256)
            else:
                _append(out, row, status="encode", key=item.key, image_sha256=item.image_sha256, caption=item.caption,
                        pixels=cache_mod.pixels_to_uint8(item.pixels), width=item.width, height=item.height,
                        original_size=item.original_size, crop_top_left=item.crop_top_left,
                        target_size=item.target_size, flipped=item.flipped)
        return out


def _append(out: dict, row: dict, *, status: str, key: str = "", image_sha256: str = "", caption: str = "",
            pixels: np.ndarray = NO_PIXELS, width: int = 0, height: int = 0, original_size=(0, 0), crop_top_left=(0, 0),
            target_size=(0, 0), flipped: bool = False, reason: str = "", detail: str = "") -> None:
    values = {**row, "status": status, "key": key, "image_sha256": image_sha256, "caption": caption, "pixels": pixels,
              "width": width, "height": height, "original_size": np.asarray(original_size, dtype=np.int64),
              "crop_top_left": np.asarray(crop_top_left, dtype=np.int64),
              "target_size": np.asarray(target_size, dtype=np.int64), "flipped": bool(flipped), "reason": reason,
              "detail": detail}
    for k in STAGE1_COLUMNS:
        out[k].append(values[k])


# --------------------------------------------------------------------------- stage 2: encode + write shards
class EncodeShards:
    """An actor holding the VAE (and text encoders); writes one shard per bucket of each batch's
    rows to encode and passes one small record per row on to the driver."""

    def __init__(self, model_cfg, storage_cfg: StorageConfig, cache_root: str, cache_text_embeddings: bool, micro_batch: int):
        from rayimg.data.encode import Encoder
        from rayimg.models.loader import load_model

        self.storage = Storage(storage_cfg)
        self.encoder = Encoder(load_model(model_cfg, self.storage), cache_text_embeddings=cache_text_embeddings)
        self.root = cache_root
        self.micro_batch = micro_batch

    def __call__(self, batch: dict) -> dict:
        import torch

        n = len(batch["status"])
        rows = [{k: _scalar(batch[k][i]) for k in ROW_COLUMNS} for i in range(n)]
        groups: dict[tuple[int, int], list[int]] = {}
        seen = set()
        for i, r in enumerate(rows):
            if r["status"] != "encode":
                continue
            r["status"] = "encoded"
            if r["key"] in seen:
                continue  # the same item twice in one batch: encoded once (finalize reports the second)
            seen.add(r["key"])
            groups.setdefault((int(batch["width"][i]), int(batch["height"][i])), []).append(i)
        for (width, height), idx in sorted(groups.items()):
            latents, embeds = [], {}
            for start in range(0, len(idx), self.micro_batch):
                part = idx[start:start + self.micro_batch]
                latents.append(self.encoder.encode_latents([batch["pixels"][i] for i in part]))
                if self.encoder.cache_text_embeddings:
                    for k, v in self.encoder.encode_text([str(batch["caption"][i]) for i in part]).items():
                        embeds.setdefault(k, []).append(v)
            tensors = {"latents": torch.cat(latents)}
            tensors.update({k: torch.cat(v) for k, v in embeds.items()})
            records = [
                {"key": rows[i]["key"], "caption": str(batch["caption"][i]), "width": width, "height": height,
                 "original_size": [int(v) for v in batch["original_size"][i]],
                 "crop_top_left": [int(v) for v in batch["crop_top_left"][i]],
                 "target_size": [int(v) for v in batch["target_size"][i]], "flipped": bool(batch["flipped"][i]),
                 "image_uri": rows[i]["image_uri"], "kind": rows[i]["kind"], "image_sha256": rows[i]["image_sha256"],
                 "source": rows[i]["source"], "line": rows[i]["line"] or None, "row": rows[i]["row"]}
                for i in idx
            ]
            cache_mod.write_shard(self.storage, self.root, records, tensors)
        return {k: [r[k] for r in rows] for k in ROW_COLUMNS}


def _scalar(value):
    """A numpy scalar from a batch as the plain Python value."""
    return value.item() if isinstance(value, np.generic) else value


# --------------------------------------------------------------------------- the job
def _listed_rows(cfg: PrepareJob, storage: Storage) -> list[SourceItem]:
    """The rows of a folder layout, read on the driver before Ray starts; a dataset with no
    usable row at all is a config error here."""
    rows = list_rows(storage, cfg.data)
    if not rows:
        raise DatasetError(f"data.source {cfg.data.source!r}: no images found")
    if all(r.reason for r in rows):
        first = rows[0]
        raise DatasetError(f"data.source {cfg.data.source!r}: none of its {len(rows)} row(s) is usable "
                           f"({first.where()}: {first.reason}: {first.detail})")
    return rows


def _check_manifest(cfg: PrepareJob, storage: Storage) -> int | None:
    """Check a manifest's columns before Ray starts; returns its row count when known (Parquet)."""
    filesystem, path = arrow_filesystem(cfg.storage, cfg.data.source)
    if cfg.data.source.endswith(".parquet"):
        import pyarrow.parquet as pq

        meta = pq.ParquetFile(filesystem.open_input_file(path) if filesystem else path)
        check_manifest_columns(meta.schema_arrow.names, cfg.data)
        return meta.metadata.num_rows
    size = 1 << 16
    with (filesystem.open_input_stream(path) if filesystem else open(path, "rb")) as f:
        sample = f.read(size + 1)
    check_manifest_sample(sample[:size], cfg.data, whole=len(sample) <= size)
    return None


def _item_dataset(cfg: PrepareJob, listed: list[SourceItem] | None):
    """A Ray Dataset of item rows (:data:`ITEM_COLUMNS`), one per input row."""
    import ray

    if listed is not None:
        return ray.data.from_items([it.to_row() for it in listed])
    filesystem, path = arrow_filesystem(cfg.storage, cfg.data.source)
    columns = [cfg.data.image_column, cfg.data.caption_column]
    ds = ray.data.read_datasource(ManifestLines(path, filesystem=filesystem, columns=columns))
    data_cfg = cfg.data

    def to_items(batch):
        items = [it.to_row() for it in manifest_rows_to_items(zip(batch["line"].tolist(), batch["raw"]), data_cfg)]
        return {k: [it[k] for it in items] for k in ITEM_COLUMNS}

    return ds.map_batches(to_items, batch_format="numpy")


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
        listed = _listed_rows(cfg, storage) if fmt != "manifest" else None
        total = len(listed) if listed is not None else _check_manifest(cfg, storage)
    except DatasetError as e:
        raise ConfigError("", str(e)) from None
    model_dir = resolve_model_dir(cfg.model, storage)
    family = check_family(cfg.model, model_dir)
    model_id, model_hash = model_id_and_hash(cfg.model, model_dir)
    model_cfg = type(cfg.model)(**{**cfg.model.__dict__, "pretrained": str(model_dir)}) if not is_s3(cfg.model.pretrained) else cfg.model

    connect(cfg.cluster)
    print(f"[prepare] {fmt} dataset {cfg.data.source} -> cache {root} (model {model_id})", flush=True)
    ds = _item_dataset(cfg, listed)

    # The header needs the VAE's shape facts; read them from the model dir's config.
    vae_cfg = json.loads((model_dir / "vae" / "config.json").read_text())
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
    preprocess = Preprocess(cfg.storage, cfg.transforms, cfg.data.min_size, f"{model_id}@{model_hash[:16]}", done)
    ds = ds.map_batches(preprocess, batch_size=READ_BATCH, batch_format="numpy")
    ds = ds.map_batches(
        EncodeShards, batch_size=cfg.cache.shard_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=cfg.cache.concurrency), num_gpus=gpu if gpu > 0 else None,
        fn_constructor_kwargs=dict(model_cfg=model_cfg, storage_cfg=cfg.storage, cache_root=root,
                                   cache_text_embeddings=cfg.cache.cache_text_embeddings, micro_batch=cfg.cache.batch_size),
    )
    rows: list[dict] = []
    counts = {"encoded": 0, "cached": 0, "skipped": 0}
    last = time.perf_counter()
    printed = None  # the counts of the last progress line
    first_at, first_n = None, 0
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        batch_rows = [{k: _scalar(batch[k][i]) for k in ROW_COLUMNS} for i in range(len(batch["row"]))]
        rows.extend(batch_rows)
        for r in batch_rows:
            counts[r["status"]] += 1
        if first_at is None and counts["encoded"]:  # start-up (actors, model load) ends with the first encoded batch
            first_at, first_n = time.perf_counter(), counts["encoded"]
        now = time.perf_counter()
        if now - last >= 5.0:
            last, printed = now, dict(counts)
            _progress(counts["encoded"], counts["skipped"], counts["cached"], total, now - t0)
    if counts != printed:
        _progress(counts["encoded"], counts["skipped"], counts["cached"], total, time.perf_counter() - t0)
    end = time.perf_counter()
    report = cache_mod.finalize(storage, root, rows, seconds=end - t0)
    written = counts["encoded"]
    if first_at is not None and end > first_at and written > first_n:
        report["steady_items_per_s"] = round((written - first_n) / (end - first_at), 2)
    print(f"[prepare] done: {report['rows']} row(s) read, {report['items']} kept in {report['shards']} shard(s), "
          f"{report['skipped']} skipped {report['skipped_by_reason']}; report {root}/report.json, "
          f"skipped rows {root}/skipped.jsonl", flush=True)
    if report["items"] == 0:
        raise ConfigError("data.source", f"{cfg.data.source}: no usable image: all {report['rows']} row(s) were skipped "
                          f"({report['skipped_by_reason']}); see {root}/skipped.jsonl")
    return report


def _progress(encoded: int, skipped: int, cached: int, total: int | None, elapsed: float) -> None:
    processed = encoded + skipped + cached
    rate = processed / elapsed if elapsed > 0 else 0.0
    if total:
        eta = (total - processed) / (processed / elapsed) if processed else float("nan")
        head = f"{processed}/{total} rows ({100 * processed / total:.0f}%)"
        tail = f", ETA {eta:.0f}s" if processed else ""
    else:
        head, tail = f"{processed} rows", ""
    print(f"[prepare] {head}: {encoded} encoded, {cached} already cached, {skipped} skipped, {rate:.1f} rows/s{tail}", flush=True)
