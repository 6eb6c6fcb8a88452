"""Reading a render catalog (JSON Lines, CSV or Parquet) as a Ray Dataset, checked up front.

A JSON Lines catalog is read as raw lines and parsed row by row in the render job's validation
stage (:class:`rayimg.run.render.Validate`), so a line that is not a JSON object is one bad row.
"""

from __future__ import annotations

import json

from rayimg.config import ConfigError, RenderJob
from rayimg.storage import Storage, arrow_filesystem


def _ext_format(job: RenderJob) -> str:
    if job.catalog.format != "auto":
        return job.catalog.format
    src = job.catalog.source.lower()
    for ext, fmt in ((".jsonl", "jsonl"), (".json", "jsonl"), (".csv", "csv"), (".parquet", "parquet")):
        if src.endswith(ext):
            return fmt
    raise ConfigError("catalog.format", f"cannot tell the format of {job.catalog.source!r} from its extension; set jsonl, csv or parquet")


PREVIEW_BYTES = 1 << 16  # the first bytes of a JSON Lines or CSV catalog read before Ray Data reads it
PREVIEW_ROWS = 64

# a JSON Lines catalog's raw rows (parsed by Validate): line number, the line's bytes, file name
LINE_COL, TEXT_COL, FILE_COL = "__rayimg_line", "__rayimg_text", "__rayimg_file"


def _catalog_lines():
    """A Ray Data source of a JSON Lines catalog's raw lines (number, text, file), read in bounded
    chunks and parsed row by row in :class:`Validate`, so a malformed line is one bad row (Ray
    Data's own JSON reader fails the whole read on it)."""
    from ray.data.datasource.file_based_datasource import FileBasedDatasource

    class CatalogLines(FileBasedDatasource):
        CHUNK_BYTES = 8 << 20
        BLOCK_ROWS = 20_000

        def _read_stream(self, f, path: str):
            import pyarrow as pa

            name = path.rsplit("/", 1)[-1]
            rows = {LINE_COL: [], TEXT_COL: []}
            number, rest = 0, b""

            def block():
                table = pa.table({LINE_COL: pa.array(rows[LINE_COL], pa.int64()), TEXT_COL: pa.array(rows[TEXT_COL], pa.binary()),
                                  FILE_COL: pa.array([name] * len(rows[LINE_COL]), pa.string())})
                for column in rows.values():
                    column.clear()
                return table

            while True:
                chunk = f.read(self.CHUNK_BYTES)
                data = rest + chunk
                lines = data.split(b"\n")
                rest = lines.pop() if chunk else b""  # the last, maybe partial, line waits for the next chunk
                for raw in lines:
                    number += 1
                    if raw.strip():
                        rows[LINE_COL].append(number)
                        rows[TEXT_COL].append(raw)  # bytes: a line that is not UTF-8 is one bad row, named by Validate
                    if len(rows[LINE_COL]) >= self.BLOCK_ROWS:
                        yield block()
                if not chunk:
                    break
            if rows[LINE_COL]:
                yield block()

    return CatalogLines


def parse_catalog_line(raw: bytes, line: int) -> dict:
    """One JSON Lines row; :class:`~rayimg.render.catalog.RowError` naming the line when it is
    not UTF-8 or not a JSON object (worded as ``rayimg prepare`` words a bad manifest line)."""
    from rayimg.data.sources import parse_json_line
    from rayimg.render.catalog import RowError

    row, problem = parse_json_line(raw)
    if row is None:
        raise RowError(f"line {line}: {problem}")
    return row


def read_catalog(job: RenderJob, storage: Storage, preview: bool = False):
    """A Ray Dataset of catalog rows; fails up front when the catalog cannot be read.
    ``preview``: ``(dataset, estimated rows, first rows)`` (see :func:`catalog_preview`), from the
    same first bytes (or Parquet footer) the up-front check reads."""
    import ray

    fmt = _ext_format(job)
    src = job.catalog.source
    if not storage.exists(src):
        raise ConfigError("catalog.source", f"{src} does not exist")
    fs, path = arrow_filesystem(job.storage, src)
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            parquet = pq.ParquetFile(fs.open_input_file(path) if fs else path)
            parquet.schema_arrow  # readable?
            ds = ray.data.read_parquet(path, filesystem=fs)
            return (ds, *_parquet_preview(parquet)) if preview else ds
        raw = storage.read_head(src, PREVIEW_BYTES) if fmt == "jsonl" or preview else b""  # the rest is Ray Data's to read
        if fmt == "jsonl":
            whole = len(raw) < PREVIEW_BYTES
            # only the first line must be JSON here (a file that is not JSON Lines at all fails before
            # any work); any later line that is not is one bad row (see Validate)
            lines = raw.split(b"\n")
            first = next((i for i, line in enumerate(lines) if line.strip()), None)
            if first is None and whole:
                raise ConfigError("catalog.source", f"{src} is empty")
            if first is not None and (whole or first < len(lines) - 1):  # a whole line (a UTF-8 character may straddle the cut)
                json.loads(lines[first].decode("utf-8-sig"))  # a byte-order mark opens some files
            ds = ray.data.read_datasource(_catalog_lines()(path, filesystem=fs))
        else:
            ds = ray.data.read_csv(path, filesystem=fs)
    except (UnicodeDecodeError, json.JSONDecodeError, OSError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError("catalog.source", f"{src} cannot be read as {fmt}: {e}") from None
    return (ds, *_text_preview(fmt, _size(fs, path), raw)) if preview else ds


def catalog_preview(job: RenderJob, storage: Storage) -> tuple[int, list[dict]]:
    """``(estimated row count, the first rows)`` of a catalog, without reading the rest: Parquet's
    footer gives the count; a JSON Lines or CSV catalog's is its size over the mean line length of
    its first 64 KiB (a ranged GET on S3). The rows (at most 64, unparseable ones left out) tell
    which shape the render actors warm up while the catalog is validated; the count sizes the
    work units before it is known exactly. The render job gets both from
    ``read_catalog(..., preview=True)``, with the check's own read."""
    fmt = _ext_format(job)
    fs, path = arrow_filesystem(job.storage, job.catalog.source)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return _parquet_preview(pq.ParquetFile(fs.open_input_file(path) if fs else path))
    return _text_preview(fmt, _size(fs, path), storage.read_head(job.catalog.source, PREVIEW_BYTES))


def _size(fs, path: str) -> int:
    if fs is not None:
        return fs.get_file_info(path).size
    import os

    return os.path.getsize(path)


def _parquet_preview(f) -> tuple[int, list[dict]]:
    columns = [c for c in ("width", "height", "guidance_scale", "guidance") if c in f.schema_arrow.names]
    rows: list[dict] = []
    if columns and f.metadata.num_rows:
        rows = next(f.iter_batches(batch_size=PREVIEW_ROWS, columns=columns)).to_pylist()
    return f.metadata.num_rows, rows


def _text_preview(fmt: str, size: int, raw: bytes) -> tuple[int, list[dict]]:
    """From a JSON Lines or CSV catalog's ``size`` and first bytes ``raw``."""
    lines = raw.split(b"\n")
    if len(raw) >= PREVIEW_BYTES:
        lines.pop()  # cut mid-line
    lines = [line for line in lines if line.strip()]
    estimate = round(size / max(len(raw), 1) * len(lines)) if lines else 0
    rows = []
    if fmt == "jsonl":
        for number, line in enumerate(lines[:PREVIEW_ROWS], 1):
            try:
                rows.append(parse_catalog_line(line, number))  # a byte-order mark is read there
            except ValueError:
                continue
    else:
        import io

        import pyarrow.csv as pacsv

        try:
            rows = pacsv.read_csv(io.BytesIO(b"\n".join(lines[:PREVIEW_ROWS + 1]) + b"\n")).to_pylist()
        except Exception:  # noqa: BLE001 - Ray Data's reader reports what is wrong with the file
            rows = []
    return max(estimate - (fmt == "csv"), 0), rows
