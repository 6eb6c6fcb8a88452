"""Dataset readers: find the (image, caption) items of a dataset without reading any image.

Layouts (``data.format``):
- ``imagefolder``: ``metadata.jsonl`` (or ``metadata.csv`` with a header row) with ``file_name``
  and a caption column (``text`` by default);
- ``captions``: ``images/`` + ``captions/`` with matching stems, or captions beside images
  (``a.png`` + ``a.txt``);
- ``dreambooth``: a folder of instance images + ``data.instance_prompt``, optionally class images
  (``data.class_source``) + ``data.class_prompt``;
- ``manifest``: a Parquet or JSONL file of image URIs (absolute, or relative to the manifest) and
  captions — the format for large datasets. Manifests are read by the job in streaming blocks;
  :func:`manifest_rows_to_items` maps each block.

Captions are carried by value when the layout holds them in a table, or by URI (``caption_uri``)
when each lives in its own file, so workers read them, not the driver.

Every input row becomes one :class:`SourceItem`, usable or not: a metadata or manifest line that
is not a JSON object (or a CSV record with the wrong number of fields) or that names no image is
an item with ``reason`` set (``malformed_line``, ``missing_image_path``) and its ``source`` and
``line``, so the prepare job skips and reports it instead of stopping. What makes the whole
dataset unreadable -- a missing path, an empty listing, a column that no row has -- raises
:class:`DatasetError` naming the problem before any work starts.
"""

from __future__ import annotations

import csv
import io
import json
import posixpath
from dataclasses import dataclass, replace
from typing import Iterable, Iterator

from rayimg.config import DataConfig
from rayimg.storage import Storage, StorageError, is_s3, join

CAPTION_EXTS = (".txt", ".caption")
TABLE_EXTS = (".jsonl", ".json", ".parquet", ".csv", ".md", ".yaml", ".yml", ".toml")
MANIFEST_EXTS = (".parquet", ".jsonl")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")  # ImageFolder layout, in order of preference


#: Why a whole input row is skipped, beside the per-item :data:`rayimg.data.captions.REASONS`
#: (the prepare report counts both; add, never rename).
ROW_REASONS = (
    "malformed_line",      # a metadata/manifest line that is not a JSON object (or a CSV record) rayimg can read
    "missing_image_path",  # a metadata/manifest row that names no image
    "missing_file",        # the image file the row names does not exist
    "duplicate_path",      # the same image path listed again by a later row
    "processing_error",    # an unexpected error while preparing this row (the detail names it)
)


class DatasetError(ValueError):
    """The dataset cannot be read as configured; raised before any work starts."""


@dataclass(frozen=True)
class SourceItem:
    """One input row. ``reason``/``detail`` are set when the row itself is unusable (a code of
    :data:`rayimg.data.captions.REASONS`); ``source`` is the file that lists the row (the metadata
    file or manifest; the image itself in folder layouts) and ``line`` its 1-based line (row, for
    Parquet) there, 0 when it has none; ``row`` orders the rows of one dataset (the first of two
    duplicates is the one kept)."""

    image_uri: str
    caption: str | None = None  # the caption itself, when the layout holds it in a table
    caption_uri: str | None = None  # or the file that holds it
    kind: str = "instance"  # "class" for DreamBooth prior-preservation images
    source: str = ""
    line: int = 0
    row: int = 0
    reason: str = ""
    detail: str = ""

    def to_row(self) -> dict:
        return {"image_uri": self.image_uri, "caption": self.caption, "caption_uri": self.caption_uri, "kind": self.kind,
                "source": self.source, "line": self.line, "row": self.row, "reason": self.reason, "detail": self.detail}

    def where(self) -> str:
        """``source line N`` (or just the source) for messages."""
        return f"{self.source} line {self.line}" if self.line else self.source


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
    if any(storage.exists(join(cfg.source, name)) for name in METADATA_FILES):
        return "imagefolder"
    uris = _listing(storage, cfg.source, "data.source")
    if any(_ext(u) in CAPTION_EXTS for u in uris):
        return "captions"
    raise DatasetError(
        f"data.source {cfg.source!r}: cannot tell the dataset layout (no metadata.jsonl/.csv, no .txt captions, "
        "not a .parquet/.jsonl manifest); set data.format or data.instance_prompt for DreamBooth"
    )


def list_rows(storage: Storage, cfg: DataConfig) -> list[SourceItem]:
    """Every row of a folder layout (not 'manifest'), unusable ones included (``reason`` set),
    in a stable order with ``row`` numbered from 0."""
    fmt = detect_format(storage, cfg)
    if fmt == "imagefolder":
        rows = _imagefolder(storage, cfg)
    elif fmt == "captions":
        rows = _captions(storage, cfg)
    elif fmt == "dreambooth":
        rows = _dreambooth(storage, cfg)
    else:
        raise DatasetError(f"data.format {fmt!r} is read as a streaming manifest, not listed")
    return [replace(item, row=i) for i, item in enumerate(rows)]


def list_items(storage: Storage, cfg: DataConfig) -> list[SourceItem]:
    """The usable items of a folder layout; the first unusable row raises :class:`DatasetError`
    naming its line (for readers without a per-row report; prepare uses :func:`list_rows`)."""
    rows = list_rows(storage, cfg)
    for item in rows:
        if item.reason:
            raise DatasetError(f"{item.where()}: {item.detail}")
    return rows


def _imagefolder(storage: Storage, cfg: DataConfig) -> list[SourceItem]:
    for name in METADATA_FILES:
        meta_uri = join(cfg.source, name)
        try:
            raw = storage.read_bytes(meta_uri)
        except FileNotFoundError:
            continue
        break
    else:
        raise DatasetError(f"data.source {cfg.source!r}: no metadata.jsonl or metadata.csv (ImageFolder layout)")
    lines = _csv_rows(raw) if meta_uri.endswith(".csv") else _jsonl_rows(raw)
    items, tables = [], []
    for lineno, row, problem in lines:
        if problem:
            items.append(SourceItem(image_uri="", source=meta_uri, line=lineno, reason="malformed_line", detail=problem))
            continue
        tables.append(row)
        items.append(row_to_item(row, cfg, base=cfg.source, source=meta_uri, line=lineno))
    if not items:
        raise DatasetError(f"{meta_uri}: no rows")
    if not tables:
        first = items[0]
        raise DatasetError(f"{meta_uri}: no readable row ({len(items)} malformed; line {first.line}: {first.detail})")
    _check_columns(meta_uri, {c for row in tables for c in row}, cfg)
    return items


def _jsonl_rows(raw: bytes) -> Iterator[tuple[int, dict | None, str]]:
    """(line number, object or None, problem) for each non-blank line of a JSONL file."""
    for lineno, line in enumerate(raw.split(b"\n"), 1):
        if not line.strip():
            continue
        row, problem = parse_json_line(line)
        yield lineno, row, problem


def parse_json_line(line: bytes | str) -> tuple[dict | None, str]:
    """(object, "") for a line holding a JSON object, else (None, what is wrong with it)."""
    if isinstance(line, (bytes, bytearray, memoryview)):
        try:
            line = bytes(line).decode("utf-8")
        except UnicodeDecodeError as e:
            return None, f"not UTF-8 (invalid byte at column {e.start + 1})"
    line = line.removeprefix("\ufeff")  # a byte-order mark, as some editors start a file
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        return None, f"not valid JSON ({e.msg} at column {e.colno})"
    if not isinstance(row, dict):
        return None, f"expected a JSON object, got {type(row).__name__}"
    return row, ""


def _csv_rows(raw: bytes) -> Iterator[tuple[int, dict | None, str]]:
    """(line number, row or None, problem) for each record of a CSV file with a header row."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        yield line, None, f"not UTF-8 (invalid byte {raw[e.start:e.start + 1]!r}); the CSV file cannot be read past it"
        return
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except (StopIteration, csv.Error):
        return
    while True:
        start = reader.line_num + 1
        try:
            values = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            yield start, None, f"not valid CSV ({e})"
            continue
        if not any(v.strip() for v in values):
            continue
        if len(values) != len(header):
            yield start, None, f"{len(values)} field(s), the header has {len(header)}"
            continue
        yield start, dict(zip(header, values)), ""


def row_to_item(row: dict, cfg: DataConfig, *, base: str, source: str, line: int) -> SourceItem:
    """One table row (metadata.jsonl/.csv, a manifest) -> an item; a row without an image path
    or with a caption that is not text is an item with its reason."""
    name = row.get(cfg.image_column)
    if not isinstance(name, str) or not name.strip():
        what = "no" if name is None or name == "" else f"a {type(name).__name__} in"
        return SourceItem(image_uri="", source=source, line=line, reason="missing_image_path",
                          detail=f"{what} column data.image_column={cfg.image_column!r}")
    uri = _resolve(base, name.strip())
    caption = row.get(cfg.caption_column)
    if caption is not None and not isinstance(caption, str):
        return SourceItem(image_uri=uri, source=source, line=line, reason="malformed_line",
                          detail=f"data.caption_column={cfg.caption_column!r} holds a {type(caption).__name__}, not text")
    return SourceItem(image_uri=uri, caption=caption, source=source, line=line)


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
        yield SourceItem(image_uri=u, caption_uri=captions.get(stem), source=u)


def _dreambooth(storage: Storage, cfg: DataConfig) -> Iterator[SourceItem]:
    for u in _listing(storage, cfg.source, "data.source"):
        if _is_candidate_image(u):
            yield SourceItem(image_uri=u, caption=cfg.instance_prompt, source=u)
    if cfg.class_source:
        for u in _listing(storage, cfg.class_source, "data.class_source"):
            if _is_candidate_image(u):
                yield SourceItem(image_uri=u, caption=cfg.class_prompt, kind="class", source=u)


def check_manifest_columns(columns, cfg: DataConfig) -> None:
    _check_columns(f"manifest {cfg.source}", columns, cfg)


def check_manifest_sample(sample: bytes, cfg: DataConfig, whole: bool) -> None:
    """Check a JSONL manifest's columns on its first bytes: a column that none of the sampled
    rows has is a config error; malformed or incomplete rows are left to the per-row report.
    ``whole``: the sample is the whole file (else its last, cut line is ignored)."""
    lines = sample.split(b"\n")
    if not whole:
        lines = lines[:-1]
    rows, problems = [], []
    for lineno, line in enumerate(lines, 1):
        if line.strip():
            row, problem = parse_json_line(line)
            if row is None:
                problems.append(f"line {lineno}: {problem}")
            else:
                rows.append(row)
    if rows:
        check_manifest_columns({c for row in rows for c in row}, cfg)
    elif problems:
        raise DatasetError(f"manifest {cfg.source}: none of its first {len(problems)} line(s) is a JSON object ({problems[0]})")


def manifest_rows_to_items(rows: Iterable[tuple[int, bytes]], cfg: DataConfig) -> list[SourceItem]:
    """Map manifest lines ``(line number, raw JSON)`` to items (``row`` = line): image paths
    relative to the manifest's folder; a malformed or incomplete line is an item with its reason."""
    base = cfg.source.rsplit("/", 1)[0] if "/" in cfg.source else "."
    out = []
    for line, raw in rows:
        row, problem = parse_json_line(raw)
        if row is None:
            item = SourceItem(image_uri="", source=cfg.source, line=line, reason="malformed_line", detail=problem)
        else:
            item = row_to_item(row, cfg, base=base, source=cfg.source, line=line)
        out.append(replace(item, row=line))
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
