"""The render job's lists of every row, ``manifest.parquet`` and ``errors.jsonl``, merged from the
parts each work unit writes (``manifest/part-*.parquet``, ``errors/*.jsonl``).

Each part is written sorted by row id, so the merge streams: it reads every part a batch at a
time and k-way merges them (:func:`heapq.merge`), through local sorted runs when there are more
than :data:`FANOUT` parts. Memory stays bounded by the number of parts merged at once, whatever
the catalog's size (ten million rows included); the parts and the result pass through local disk.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import json
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator

from rayimg.storage import Storage, is_s3, join, local_path

PART_BATCH = 256  # rows read at a time from each manifest part
FANOUT = 64  # parts merged at once; more go through intermediate sorted runs
ROW_GROUP = 16_384  # rows per row group of manifest.parquet


def manifest_schema():
    import pyarrow as pa

    return pa.schema([("row_id", pa.string()), ("key", pa.string()), ("path", pa.string()), ("prompt", pa.string()),
                      ("seed", pa.int64()), ("adapters", pa.string()), ("parameters", pa.string()), ("seconds", pa.float64())])


def manifest_row(rid: str, key: str, path: str, req, seconds: float | None) -> dict:
    """One manifest row: ``seconds`` is the render's time, None when the image was already there."""
    params = req.params()
    return {"row_id": rid, "key": key, "path": path, "prompt": req.prompt, "seed": req.seed,
            "adapters": json.dumps([{"name": n, "version": v, "scale": s} for n, v, s in req.adapters]),
            "parameters": json.dumps(params, sort_keys=True), "seconds": seconds}


def write_manifest_part(storage: Storage, root: str, rows: list[dict]) -> None:
    """One ``manifest/`` part, sorted by row id."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = sorted(rows, key=_row_id)
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=manifest_schema()), buf)
    # rendered and skipped entries hash differently, so a re-run never overwrites a part that
    # recorded real render times with one that only saw existing files
    name = hashlib.sha256("\n".join(sorted(f"{r['row_id']}/{r['key']}/{r['seconds'] is None}" for r in rows)).encode()).hexdigest()[:20]
    storage.write_bytes(join(root, "manifest", f"part-{name}.parquet"), buf.getvalue())


def write_errors(storage: Storage, root: str, errors: list[dict]) -> None:
    """One ``errors/`` part, sorted by row id (named by its content, so a re-run rewrites the same file)."""
    if errors:
        text = "".join(json.dumps(e, sort_keys=True, default=str) + "\n" for e in sorted(errors, key=_row_id))
        storage.write_text(join(root, "errors", f"{hashlib.sha256(text.encode()).hexdigest()[:20]}.jsonl"), text)


def finalize(storage: Storage, root: str, *, fanout: int = FANOUT) -> dict:
    """Merge the parts into ``manifest.parquet`` (one row per catalog row, by row id; a rendered
    entry wins over one that found its image already there) and ``errors.jsonl`` (one line per
    bad row, by row id; the last part listed wins). Returns the counts."""
    with tempfile.TemporaryDirectory(prefix="rayimg-finalize-") as tmp:
        tmp_dir = Path(tmp)
        runs = [_local_sorted(storage, uri, tmp_dir, _sort_parquet) for uri in storage.list(join(root, "manifest"))
                if uri.endswith(".parquet")]
        images = _merge(runs, tmp_dir / "manifest.parquet", tmp_dir, fanout, _read_parquet, _write_parquet, _pick_manifest)
        storage.upload_file(tmp_dir / "manifest.parquet", join(root, "manifest.parquet"))
        runs = [_local_sorted(storage, uri, tmp_dir, _sort_jsonl) for uri in storage.list(join(root, "errors"))]
        errors = _merge(runs, tmp_dir / "errors.jsonl", tmp_dir, fanout, _read_jsonl, _write_jsonl, _pick_last)
        storage.upload_file(tmp_dir / "errors.jsonl", join(root, "errors.jsonl"))
    return {"images": images, "errors": errors}


def _row_id(row: dict) -> str:
    return str(row["row_id"])


def _local_sorted(storage: Storage, uri: str, tmp_dir: Path, sort: Callable[[Path, Path], bool]) -> Path:
    """A local path to the part at ``uri``, sorted by row id (a part written before parts were
    sorted is sorted here, in memory: one work unit's rows)."""
    copy = tmp_dir / "parts" / hashlib.sha256(uri.encode()).hexdigest()[:24]
    if is_s3(uri):
        path = storage.download_file(uri, copy)
        sort(path, path)
        return path
    path = local_path(uri)
    return copy if sort(path, copy) else path


def _merge(runs: list[Path], out: Path, tmp_dir: Path, fanout: int, read, write, pick) -> int:
    """K-way merge of sorted runs into ``out`` (in passes of ``fanout`` runs); rows of one row id
    reduced by ``pick``, in run order. Returns the rows written."""
    fanout = max(2, fanout)
    level = 0
    while len(runs) > fanout:
        merged = []
        for i in range(0, len(runs), fanout):
            path = tmp_dir / f"run-{level}-{i // fanout}{out.suffix}"
            write(pick(heapq.merge(*(read(p) for p in runs[i:i + fanout]), key=_row_id)), path)
            merged.append(path)
        runs, level = merged, level + 1
    return write(pick(heapq.merge(*(read(p) for p in runs), key=_row_id)), out)


def _pick_manifest(rows: Iterable[dict]) -> Iterator[dict]:
    """Per row id: the first rendered entry, else the first."""
    for _, group in itertools.groupby(rows, key=_row_id):
        first = next(group)
        if first["seconds"] is None:
            first = next((r for r in group if r["seconds"] is not None), first)
        yield first


def _pick_last(rows: Iterable[dict]) -> Iterator[dict]:
    for _, group in itertools.groupby(rows, key=_row_id):
        *_, last = group
        yield last


def _read_parquet(path: Path) -> Iterator[dict]:
    import pyarrow.parquet as pq

    with pq.ParquetFile(path) as f:
        for batch in f.iter_batches(batch_size=PART_BATCH):
            yield from batch.to_pylist()


def _write_parquet(rows: Iterable[dict], path: Path) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema, n, buf = manifest_schema(), 0, []
    with pq.ParquetWriter(path, schema) as writer:
        for row in rows:
            buf.append({name: row.get(name) for name in schema.names})
            if len(buf) >= ROW_GROUP:
                writer.write_table(pa.Table.from_pylist(buf, schema=schema))
                n, buf = n + len(buf), []
        if buf or not n:
            writer.write_table(pa.Table.from_pylist(buf, schema=schema))  # an empty manifest still has its schema
            n += len(buf)
    return n


def _sort_parquet(path: Path, out: Path) -> bool:
    """Whether the part at ``path`` was out of order (then ``out`` holds it sorted)."""
    import pyarrow.parquet as pq

    ids = pq.read_table(path, columns=["row_id"]).column(0).to_pylist()
    order = sorted(range(len(ids)), key=ids.__getitem__)
    if order == list(range(len(ids))):
        return False
    table = pq.read_table(path).take(order)
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out)
    return True


def _read_jsonl(path: Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def _write_jsonl(rows: Iterable[dict], path: Path) -> int:
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True, default=str) + "\n")
            n += 1
    return n


def _sort_jsonl(path: Path, out: Path) -> bool:
    rows = list(_read_jsonl(path))
    ids = [_row_id(r) for r in rows]
    if ids == sorted(ids):
        return False
    out.parent.mkdir(parents=True, exist_ok=True)
    _write_jsonl(sorted(rows, key=_row_id), out)  # stable: the part's order within one row id stays
    return True


__all__ = ["finalize", "manifest_row", "manifest_schema", "write_errors", "write_manifest_part"]
