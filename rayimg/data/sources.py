"""Dataset readers: find the (image, caption) items of a dataset without reading any image.

Layouts (``data.format``):
- ``imagefolder``: ``metadata.jsonl`` with ``file_name`` and a caption column (``text`` by default);
- ``captions``: ``images/`` + ``captions/`` with matching stems, or captions beside images
  (``a.png`` + ``a.txt``);
- ``dreambooth``: a folder of instance images + ``data.instance_prompt``, optionally class images
  (``data.class_source``) + ``data.class_prompt``;
- ``manifest``: a Parquet or JSONL file of image URIs (absolute, or relative to the manifest) and
  captions — the format for large datasets. Manifests are read by the job in streaming blocks;
  :func:`manifest_rows_to_items` maps each block.

Captions are carried by value when the layout holds them in a table, or by URI (``caption_uri``)
when each lives in its own file, so workers read them, not the driver. Everything here is
checked up front: a missing path, an empty listing or a wrong caption column raises
:class:`DatasetError` naming the problem before any work starts.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass
from typing import Iterator

from rayimg.config import DataConfig
from rayimg.storage import Storage, StorageError, is_s3, join

CAPTION_EXTS = (".txt", ".caption")
TABLE_EXTS = (".jsonl", ".json", ".parquet", ".csv", ".md", ".yaml", ".yml", ".toml")
MANIFEST_EXTS = (".parquet", ".jsonl")


class DatasetError(ValueError):
    """The dataset cannot be read as configured; raised before any work starts."""


@dataclass(frozen=True)
class SourceItem:
    image_uri: str
    caption: str | None = None  # the caption itself, when the layout holds it in a table
    caption_uri: str | None = None  # or the file that holds it
    kind: str = "instance"  # "class" for DreamBooth prior-preservation images

    def to_row(self) -> dict:
        return {"image_uri": self.image_uri, "caption": self.caption, "caption_uri": self.caption_uri, "kind": self.kind}


def _ext(uri: str) -> str:
    return posixpath.splitext(uri)[1].lower()


def _name(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[-1]


def _is_candidate_image(uri: str) -> bool:
    """Every file that is not a caption, a table or hidden is an item (bad formats get reported)."""
    name = _name(uri)
    return not name.startswith(".") and _ext(uri) not in CAPTION_EXTS + TABLE_EXTS


def _listing(storage: Storage, source: str, what: str) -> list[str]:
    try:
        uris = storage.list(source)
    except StorageError as e:
        raise DatasetError(f"{what} {source!r} cannot be read: {e}") from None
    if not uris:
        raise DatasetError(f"{what} {source!r} does not exist or is empty")
    return uris


def detect_format(storage: Storage, cfg: DataConfig) -> str:
    """The layout of ``cfg.source`` ('imagefolder', 'captions', 'dreambooth' or 'manifest')."""
    if cfg.format != "auto":
        return cfg.format
    if _ext(cfg.source) in MANIFEST_EXTS:
        return "manifest"
    if cfg.instance_prompt:
        return "dreambooth"
    if storage.exists(join(cfg.source, "metadata.jsonl")):
        return "imagefolder"
    uris = _listing(storage, cfg.source, "data.source")
    if any(_ext(u) in CAPTION_EXTS for u in uris):
        return "captions"
    raise DatasetError(
        f"data.source {cfg.source!r}: cannot tell the dataset layout (no metadata.jsonl, no .txt captions, "
        "not a .parquet/.jsonl manifest); set data.format or data.instance_prompt for DreamBooth"
    )


def list_items(storage: Storage, cfg: DataConfig) -> list[SourceItem]:
    """The items of a folder layout (not 'manifest'), in a stable order."""
    fmt = detect_format(storage, cfg)
    if fmt == "imagefolder":
        return list(_imagefolder(storage, cfg))
    if fmt == "captions":
        return list(_captions(storage, cfg))
    if fmt == "dreambooth":
        return list(_dreambooth(storage, cfg))
    raise DatasetError(f"data.format {fmt!r} is read as a streaming manifest, not listed")


def _imagefolder(storage: Storage, cfg: DataConfig) -> Iterator[SourceItem]:
    meta_uri = join(cfg.source, "metadata.jsonl")
    try:
        text = storage.read_bytes(meta_uri).decode("utf-8-sig")
    except FileNotFoundError:
        raise DatasetError(f"data.source {cfg.source!r}: no metadata.jsonl (ImageFolder layout)") from None
    except UnicodeDecodeError as e:
        raise DatasetError(f"{meta_uri}: not UTF-8 ({e})") from None
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{meta_uri} line {lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise DatasetError(f"{meta_uri} line {lineno}: expected a JSON object")
        rows.append(row)
    if not rows:
        raise DatasetError(f"{meta_uri}: no rows")
    _check_columns(meta_uri, rows[0].keys(), cfg)
    for row in rows:
        name = row.get(cfg.image_column)
        if not isinstance(name, str) or not name:
            continue
        caption = row.get(cfg.caption_column)
        yield SourceItem(image_uri=_resolve(cfg.source, name), caption=caption if isinstance(caption, str) else None)


def _check_columns(where: str, columns, cfg: DataConfig) -> None:
    columns = list(columns)
    if cfg.image_column not in columns:
        raise DatasetError(f"{where}: no column data.image_column={cfg.image_column!r}; columns are {sorted(columns)}")
    if cfg.caption_column not in columns:
        raise DatasetError(f"{where}: no column data.caption_column={cfg.caption_column!r}; columns are {sorted(columns)}")


def _resolve(base: str, name: str) -> str:
    """An image path from a table: absolute (URI or /path) as is, else relative to ``base``."""
    if "://" in name or name.startswith("/"):
        return name
    return join(base, name)


def _captions(storage: Storage, cfg: DataConfig) -> Iterator[SourceItem]:
    uris = _listing(storage, cfg.source, "data.source")
    base = cfg.source.rstrip("/")
    images_dir, captions_dir = base + "/images/", base + "/captions/"
    split = any(u.startswith(images_dir) for u in uris) and any(u.startswith(captions_dir) for u in uris)
    captions = {}
    for u in uris:
        if _ext(u) in CAPTION_EXTS:
            rel = u[len(captions_dir):] if split and u.startswith(captions_dir) else u
            captions.setdefault(posixpath.splitext(rel)[0], u)
    for u in uris:
        if split and not u.startswith(images_dir):
            continue
        if not _is_candidate_image(u):
            continue
        stem = posixpath.splitext(u[len(images_dir):] if split else u)[0]
        yield SourceItem(image_uri=u, caption_uri=captions.get(stem))


def _dreambooth(storage: Storage, cfg: DataConfig) -> Iterator[SourceItem]:
    for u in _listing(storage, cfg.source, "data.source"):
        if _is_candidate_image(u):
            yield SourceItem(image_uri=u, caption=cfg.instance_prompt)
    if cfg.class_source:
        for u in _listing(storage, cfg.class_source, "data.class_source"):
            if _is_candidate_image(u):
                yield SourceItem(image_uri=u, caption=cfg.class_prompt, kind="class")


def check_manifest_columns(columns, cfg: DataConfig) -> None:
    _check_columns(f"manifest {cfg.source}", columns, cfg)


def manifest_rows_to_items(rows: list[dict], cfg: DataConfig) -> list[SourceItem]:
    """Map manifest rows to items: image paths relative to the manifest's folder."""
    base = cfg.source.rsplit("/", 1)[0] if "/" in cfg.source else "."
    out = []
    for row in rows:
        name = row.get(cfg.image_column)
        caption = row.get(cfg.caption_column)
        if not isinstance(name, str) or not name:
            continue
        out.append(SourceItem(image_uri=_resolve(base, name), caption=caption if isinstance(caption, str) else None))
    return out


def check_source(storage: Storage, cfg: DataConfig) -> str:
    """Fail early on a missing path, unreadable bucket or wrong layout; returns the format."""
    if is_s3(cfg.source) and _ext(cfg.source) not in MANIFEST_EXTS:
        _listing(storage, cfg.source, "data.source")
    fmt = detect_format(storage, cfg)
    if fmt == "manifest" and not storage.exists(cfg.source):
        raise DatasetError(f"data.source {cfg.source!r}: manifest file does not exist")
    if cfg.class_source:
        _listing(storage, cfg.class_source, "data.class_source")
    return fmt
