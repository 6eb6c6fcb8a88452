"""The render job's manifest.parquet and errors.jsonl, merged from the work units' parts in
bounded memory (issue 21: a catalog of ten million rows), and the contact sheet's sample of it."""

from __future__ import annotations

import io
import json
import random
import tracemalloc

import pyarrow as pa
import pyarrow.parquet as pq

from rayimg.render.contact_sheet import _sample_rows, _spread
from rayimg.run.manifest import finalize, manifest_schema, write_errors, write_manifest_part
from rayimg.storage import Storage, join


def row(i: int, seconds: float | None, tag: str = "") -> dict:
    return {"row_id": f"r{i:07d}", "key": f"k{i}{tag}", "path": f"images/k{i}.png", "prompt": f"prompt {i}", "seed": i,
            "adapters": "[]", "parameters": "{}", "seconds": seconds}


def manifest_rows(storage: Storage, root: str) -> list[dict]:
    return pq.read_table(io.BytesIO(storage.read_bytes(join(root, "manifest.parquet")))).to_pylist()


def test_parts_merge_into_one_manifest_by_row_id_in_any_number_of_passes(tmp_path):
    """Parts overlapping as re-runs and replaced actors leave them: per row id a rendered entry
    wins over a skipped one (else the first part listed), errors keep the last part's line, a part
    written unsorted (before parts were sorted) still merges, and merging two parts at a time (four
    passes) gives the same files as merging all at once."""
    storage, root = Storage(), str(tmp_path / "out")
    rng = random.Random(0)
    for part in range(12):
        write_manifest_part(storage, root, [row(i, rng.choice([None, 0.5 + part]), tag=f"-{part}") for i in rng.sample(range(300), 40)])
        write_errors(storage, root, [{"row_id": f"bad{i:03d}", "reason": f"part {part}"} for i in rng.sample(range(50), 5)])
    # parts from before parts were sorted, listed first
    legacy = [row(i, 9.0, tag="-legacy") for i in (299, 5, 150, 7)]
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(legacy, schema=manifest_schema()), buf)
    storage.write_bytes(join(root, "manifest", "part-0000-legacy.parquet"), buf.getvalue())
    storage.write_text(join(root, "errors", "0000-legacy.jsonl"), '{"reason": "legacy", "row_id": "bad999"}\n'
                                                                   '{"reason": "legacy", "row_id": "bad000"}\n')
    assert storage.list(join(root, "manifest"))[0].endswith("part-0000-legacy.parquet")
    expected: dict[str, dict] = {}  # what the merge must give, built naively in listing order
    for uri in storage.list(join(root, "manifest")):
        for r in pq.read_table(io.BytesIO(storage.read_bytes(uri))).to_pylist():
            old = expected.get(r["row_id"])
            if old is None or (old["seconds"] is None and r["seconds"] is not None):
                expected[r["row_id"]] = r
    assert all(expected[r["row_id"]] == r for r in legacy)
    errors: dict[str, dict] = {}
    for uri in storage.list(join(root, "errors")):
        for line in storage.read_text(uri).splitlines():
            e = json.loads(line)
            errors[e["row_id"]] = e

    once = finalize(storage, root)
    merged, merged_errors = manifest_rows(storage, root), storage.read_text(join(root, "errors.jsonl"))
    assert once == {"images": len(expected), "errors": len(errors)}
    assert merged == [expected[k] for k in sorted(expected)]
    assert [json.loads(line) for line in merged_errors.splitlines()] == [errors[k] for k in sorted(errors)]

    assert finalize(storage, root, fanout=2) == once
    assert manifest_rows(storage, root) == merged
    assert storage.read_text(join(root, "errors.jsonl")) == merged_errors


def test_finalize_of_an_empty_output_writes_empty_files(tmp_path):
    storage, root = Storage(), str(tmp_path / "out")
    assert finalize(storage, root) == {"images": 0, "errors": 0}
    assert manifest_rows(storage, root) == [] and storage.read_text(join(root, "errors.jsonl")) == ""
    assert pq.read_schema(join(root, "manifest.parquet")) == manifest_schema()


def test_finalize_memory_does_not_grow_with_the_catalog(tmp_path):
    """300,000 rows in 30 parts merge with Python's peak allocation far below what holding every
    row at once takes (the merge used to build one dict per row: about 1 KB each)."""
    storage, root = Storage(), str(tmp_path / "out")
    n, parts = 300_000, 30
    ids = list(range(n))
    random.Random(1).shuffle(ids)
    for p in range(parts):
        write_manifest_part(storage, root, [row(i, 1.0) for i in ids[p::parts]])
    tracemalloc.start()
    try:
        counts = finalize(storage, root)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert counts == {"images": n, "errors": 0}
    assert peak < 80 * 2**20, f"peak {peak / 2**20:.0f} MiB"
    f = pq.ParquetFile(join(root, "manifest.parquet"))
    assert f.metadata.num_rows == n and f.num_row_groups > 1
    first, last = f.read_row_group(0).column("row_id"), f.read_row_group(f.num_row_groups - 1).column("row_id")
    assert first[0].as_py() == "r0000000" and last[-1].as_py() == f"r{n - 1:07d}"


def test_contact_sheet_sample_reads_the_row_groups_it_needs(tmp_path, storage, s3_bucket):
    """The sample is the same rows, spread over the manifest, however its row groups fall, local
    and on S3."""
    rows = [row(i, 1.0) for i in range(100)]
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=manifest_schema()), buf, row_group_size=7)
    for uri in (str(tmp_path / "manifest.parquet"), f"s3://{s3_bucket}/out/manifest.parquet"):
        storage.write_bytes(uri, buf.getvalue())
        total, picked = _sample_rows(storage, uri, 24)
        assert total == 100
        assert [r["row_id"] for r in picked] == [rows[i]["row_id"] for i in _spread(100, 24)]
