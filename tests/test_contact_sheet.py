"""The render job's contact sheet, from a render output folder (manifest.parquet + images), local
and on the loopback S3 server."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from rayimg.render.contact_sheet import write_contact_sheet
from rayimg.render.output import png_bytes
from rayimg.run.manifest import manifest_schema
from rayimg.storage import Storage, join

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255), (128, 0, 0), (0, 128, 0),
           (0, 0, 128), (128, 128, 0)]


def render_output(storage: Storage, root: str, n: int, size=(64, 64)) -> None:
    rows = []
    for i in range(n):
        path = join(root, "images", f"key{i:03d}.png")
        storage.write_bytes(path, png_bytes(Image.new("RGB", size, COLOURS[i % len(COLOURS)]), {}))
        rows.append({"row_id": f"r{i:03d}", "key": f"key{i:03d}", "path": path, "prompt": f"prompt number {i}", "seed": i,
                     "adapters": "[]", "parameters": "{}", "seconds": 0.1})
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=manifest_schema()), buf)
    storage.write_bytes(join(root, "manifest.parquet"), buf.getvalue())


def sheet_of(storage: Storage, uri: str) -> Image.Image:
    image = Image.open(io.BytesIO(storage.read_bytes(uri)))
    image.load()
    return image


def test_contact_sheet_samples_the_catalog_evenly(tmp_path):
    storage, root = Storage(), str(tmp_path / "out")
    render_output(storage, root, 10)
    uri = write_contact_sheet(storage, root, sample=4, columns=2, cell=32)
    assert uri == join(root, "contact_sheet.png")
    sheet = sheet_of(storage, uri)
    assert json.loads(sheet.text["row_ids"]) == ["r000", "r003", "r006", "r009"]
    pixels = np.asarray(sheet.convert("RGB"))
    for i in (0, 3, 6, 9):  # each sampled image fills a 32 x 32 cell
        assert (pixels == COLOURS[i]).all(axis=-1).sum() >= 32 * 32, i
    assert (pixels == COLOURS[1]).all(axis=-1).sum() == 0  # not sampled
    assert write_contact_sheet(storage, root, sample=4, columns=2, cell=32) == uri
    assert storage.read_bytes(uri) == png_bytes(sheet, {"row_ids": ["r000", "r003", "r006", "r009"]})  # the same sheet again


def test_contact_sheet_on_s3_keeps_aspect_and_tolerates_a_missing_image(storage, s3_bucket):
    root = f"s3://{s3_bucket}/render"
    render_output(storage, root, 3, size=(64, 32))
    storage.delete(join(root, "images", "key001.png"))
    sheet = sheet_of(storage, write_contact_sheet(storage, root, cell=64))
    pixels = np.asarray(sheet.convert("RGB"))
    assert (pixels == COLOURS[0]).all(axis=-1).sum() == 64 * 32  # 64 x 32 stays 2:1 in a 64 px cell
    assert (pixels == COLOURS[1]).all(axis=-1).sum() == 0
    assert (pixels == COLOURS[2]).all(axis=-1).sum() == 64 * 32


def test_no_sheet_for_an_empty_manifest(tmp_path):
    storage, root = Storage(), str(tmp_path / "out")
    render_output(storage, root, 0)
    assert write_contact_sheet(storage, root) is None
    assert not (tmp_path / "out" / "contact_sheet.png").exists()
