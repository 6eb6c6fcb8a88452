"""What the render job learns from a catalog's first bytes before Ray Data reads it: an estimate
of its rows (sizing the work units) and the shape its render actors warm up while the rows are
validated and sorted."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq

from rayimg.config import RenderJob, from_dict
from rayimg.run.catalog_source import catalog_preview
from rayimg.run.render import warm_shape
from rayimg.storage import Storage


def job(source: str) -> RenderJob:
    return from_dict(RenderJob, {"catalog": {"source": source}, "defaults": {"width": 512, "height": 512, "guidance_scale": 5.0},
                                 "limits": {"max_width": 1024, "max_height": 1024}})


def rows(n: int) -> list[dict]:
    # most rows at 768x512 (one at 1024², one with CFG off, one too wide), and prompts of varied length
    out = [{"prompt": "a red circle " * (i % 7 + 1), "seed": i, "width": 768} for i in range(n)]
    out[1]["width"], out[1]["height"] = 1024, 1024
    out[2]["guidance_scale"] = 1.0
    out[3]["width"] = 4096
    return out


def test_jsonl_estimate_and_the_shape_most_first_rows_share(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows(5000)))
    j = job(str(path))
    estimate, head = catalog_preview(j, Storage())
    assert 0.9 * 5000 <= estimate <= 1.1 * 5000  # from the first 64 KiB's mean line length
    assert 0 < len(head) <= 64 and head[0]["prompt"].startswith("a red circle")
    assert warm_shape(j, head) == (768, 512, 5.0)


def test_csv_and_parquet_previews(tmp_path):
    data = rows(300)
    csv = tmp_path / "c.csv"
    csv.write_text("prompt,seed,width\n" + "".join(f"{r['prompt']},{r['seed']},{r['width']}\n" for r in data))
    estimate, head = catalog_preview(job(str(csv)), Storage())
    assert 0.8 * 300 <= estimate <= 1.2 * 300 and warm_shape(job(str(csv)), head) == (768, 512, 5.0)

    parquet = tmp_path / "c.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": r["prompt"], "seed": r["seed"], "width": r["width"]} for r in data]), parquet)
    estimate, head = catalog_preview(job(str(parquet)), Storage())
    assert estimate == 300 and warm_shape(job(str(parquet)), head) == (768, 512, 5.0)  # the footer's count is exact


def test_no_valid_first_row_warms_the_defaults(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("not json\n" + json.dumps({"prompt": "x", "width": 4096}) + "\n")
    j = job(str(path))
    estimate, head = catalog_preview(j, Storage())
    assert estimate == 2 and warm_shape(j, head) == (512, 512, 5.0)
