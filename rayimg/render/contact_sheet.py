"""The render job's contact sheet: a sample of the rendered catalog in one picture,
``<output>/contact_sheet.png``, each image captioned with its prompt."""

from __future__ import annotations

import io

from PIL import Image

from rayimg.storage import Storage, arrow_filesystem, join

__all__ = ["write_contact_sheet", "CONTACT_SHEET_NAME"]

CONTACT_SHEET_NAME = "contact_sheet.png"


def _spread(n: int, k: int) -> list[int]:
    """``k`` indices spread evenly over ``range(n)``, first and last included."""
    if n <= k:
        return list(range(n))
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)}) if k > 1 else [0]


def _sample_rows(storage: Storage, uri: str, sample: int) -> tuple[int, list[dict]]:
    """(rows in the manifest at ``uri``, the ``sample`` rows spread over it). The manifest is in
    row-id order, so only the row groups holding the picked rows are read: bounded memory on a
    catalog of any size."""
    import pyarrow.parquet as pq

    fs, path = arrow_filesystem(storage.config, uri)  # on S3: ranged reads of the footer and those row groups
    with pq.ParquetFile(fs.open_input_file(path) if fs else path) as f:
        total = f.metadata.num_rows
        wanted, picked, start = _spread(total, sample), [], 0
        for group in range(f.num_row_groups):
            size = f.metadata.row_group(group).num_rows
            here = [i - start for i in wanted if start <= i < start + size]
            if here:
                picked += f.read_row_group(group, columns=["row_id", "path", "prompt"]).take(here).to_pylist()
            start += size
    return total, picked


def _fit(image: Image.Image, cell: int) -> Image.Image:
    """``image`` scaled to fit a ``cell`` square (aspect kept, small renders scaled up crisply),
    centred on white."""
    scale = cell / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    scaled = image.resize(size, Image.LANCZOS if scale < 1 else Image.NEAREST)
    canvas = Image.new("RGB", (cell, cell), "white")
    canvas.paste(scaled, ((cell - size[0]) // 2, (cell - size[1]) // 2))
    return canvas


def write_contact_sheet(storage: Storage, root: str, *, sample: int = 24, columns: int = 6, cell: int = 128) -> str | None:
    """Lay out up to ``sample`` images of ``<root>/manifest.parquet`` (rows in row-id order,
    spread evenly over the catalog, so the same output gives the same sheet) in rows of
    ``columns``, and write ``<root>/contact_sheet.png``. Returns its URI; None when the
    manifest lists no image."""
    from rayimg.demo.contact_sheet import contact_sheet
    from rayimg.render.output import png_bytes

    total, picked = _sample_rows(storage, join(root, "manifest.parquet"), sample)
    if not picked:
        return None
    images: list[Image.Image | None] = []
    for r in picked:
        try:
            image = Image.open(io.BytesIO(storage.read_bytes(r["path"]))).convert("RGB")
        except (OSError, ValueError):  # deleted or unreadable since the manifest was written: an empty cell
            image = None
        images.append(_fit(image, cell) if image is not None else None)
    columns = max(1, min(columns, len(picked)))
    grid, captions, labels = [], [], []
    for start in range(0, len(picked), columns):
        chunk = picked[start:start + columns]
        pad = columns - len(chunk)
        grid.append(images[start:start + columns] + [None] * pad)
        captions.append([r["prompt"] or "" for r in chunk] + [""] * pad)
        labels.append(f"{start + 1}-{start + len(chunk)}")
    sheet = contact_sheet(grid, labels, [""] * columns, captions, cell=cell,
                          title=f"{len(picked)} of {total} image(s) in {root}")
    uri = join(root, CONTACT_SHEET_NAME)
    storage.write_bytes(uri, png_bytes(sheet, {"row_ids": [r["row_id"] for r in picked]}))
    return uri
