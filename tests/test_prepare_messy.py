"""`rayimg prepare` on messy datasets, on the session's real Ray cluster: no row stops the job;
every input row is kept or skipped with its reason, file and line; duplicates are reported; shard
names never collide; nothing usable is exit 2 naming the dataset; files get the umask's mode."""

from __future__ import annotations

import json

import torch

from rayimg.cli import main as cli
from rayimg.config import PrepareJob, from_dict
from rayimg.data.cache import CacheReader
from rayimg.run.prepare import run as prepare
from rayimg.storage import Storage, current_umask

from tests import datasets


def job(source, output, **sections) -> PrepareJob:
    data = {"data": {"source": str(source), **sections.pop("data", {})},
            "cache": {"output": str(output), "shard_size": 8, "batch_size": 4, **sections.pop("cache", {})},
            "transforms": {"resolution": 64}, "model": {"pretrained": "rayimg-tiny-sd", "device": "cpu"}}
    data.update(sections)
    return from_dict(PrepareJob, data)


def cli_args(source, output, *extra) -> list[str]:
    return ["prepare", f"data.source={source}", f"cache.output={output}", "cache.shard_size=8", "cache.batch_size=4",
            "transforms.resolution=64", "model.pretrained=rayimg-tiny-sd", "model.device=cpu", *extra]


def jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Storage().read_text(str(path)).splitlines() if line.strip()]


def write_images(root, n: int, seed: int = 0) -> list[tuple[str, str]]:
    """n distinct images in ``root``: [(file name, caption)]."""
    root.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        data, caption = datasets.shape_image(seed * 1000 + i, (80 + i, 80))  # sizes differ: bytes differ
        (root / f"img_{i}.png").write_bytes(data)
        out.append((f"img_{i}.png", caption))
    return out


def test_messy_metadata_jsonl_skips_rows_with_their_line(ray_cluster, tmp_path, capsys):
    """Malformed, incomplete and duplicate lines, missing and broken files: the job exits 0 and
    skipped.jsonl names each bad line of metadata.jsonl with its reason; the report counts every row."""
    src = tmp_path / "ds"
    images = write_images(src, 6)
    (src / "same_bytes.png").write_bytes((src / "img_2.png").read_bytes())
    (src / "zero.png").write_bytes(b"")
    lines = [json.dumps({"file_name": n, "text": c}).encode() for n, c in images]   # lines 1-6
    lines += [
        b'{"file_name": "img_0.png", "text": "cut off',                             # 7 malformed JSON
        b'["img_1.png", "a list"]',                                                 # 8 not an object
        json.dumps({"text": "no file name"}).encode(),                              # 9 no image column
        json.dumps({"file_name": None, "text": "null name"}).encode(),              # 10 null image
        json.dumps({"file_name": "img_3.png", "text": 42}).encode(),                # 11 caption not text
        b'{"file_name": "other.png", "text": "caf\xe9"}',                           # 12 not UTF-8
        b"",                                                                        # 13 blank: not a row
        json.dumps({"file_name": "gone.png", "text": "missing file"}).encode(),     # 14 missing file
        json.dumps({"file_name": "img_1.png", "text": "listed twice"}).encode(),    # 15 same path again
        json.dumps({"file_name": "same_bytes.png", "text": "copy"}).encode(),       # 16 same bytes as img_2
        json.dumps({"file_name": "zero.png", "text": "empty file"}).encode(),       # 17 zero bytes
        json.dumps({"file_name": "img_5.png"}).encode(),                            # 18 same path, no caption
    ]
    (src / "metadata.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "cache"
    assert cli(cli_args(src, out)) == 0
    printed = capsys.readouterr().out
    assert "17 row(s) read, 6 kept" in printed, printed

    meta = str(src / "metadata.jsonl")
    skipped = jsonl(out / "skipped.jsonl")
    assert {(s["source"], s["line"], s["reason"]) for s in skipped} == {
        (meta, 7, "malformed_line"), (meta, 8, "malformed_line"), (meta, 9, "missing_image_path"),
        (meta, 10, "missing_image_path"), (meta, 11, "malformed_line"), (meta, 12, "malformed_line"),
        (meta, 14, "missing_file"), (meta, 15, "duplicate_path"), (meta, 16, "duplicate"), (meta, 17, "zero_byte"),
        (meta, 18, "missing_caption"),  # a row's own reason comes first; duplicates are among usable rows
    }
    by_line = {s["line"]: s for s in skipped}
    assert "line 2" in by_line[15]["detail"] and by_line[15]["image_uri"] == str(src / "img_1.png")
    assert "img_2.png" in by_line[16]["detail"] and "line 3" in by_line[16]["detail"]
    assert "not valid JSON" in by_line[7]["detail"] and "not UTF-8" in by_line[12]["detail"]
    report = json.loads((out / "report.json").read_text())
    assert report["rows"] == 18 - 1 == report["items"] + report["skipped"]  # 18 lines, one blank
    assert report["items"] == 6 and report["encoded"] == 8  # rows 16 and 18 were encoded, then found duplicates
    assert sum(report["skipped_by_reason"].values()) == len(skipped) == 11
    items = jsonl(out / "manifest.jsonl")
    assert sorted((it["line"], it["image_uri"].rsplit("/", 1)[-1]) for it in items) == [
        (i + 1, name) for i, (name, _) in enumerate(images)]
    assert all(it["source"] == meta and len(it["image_sha256"]) == 64 for it in items)

    # A second run over the same input: nothing re-encoded, the same decisions.
    report2 = prepare(job(src, out))
    assert (report2["encoded"], report2["already_cached"]) == (0, 8)
    assert jsonl(out / "skipped.jsonl") == skipped
    assert [(it["key"], it["line"]) for it in jsonl(out / "manifest.jsonl")] == [(it["key"], it["line"]) for it in items]


def test_metadata_csv_with_broken_records(ray_cluster, tmp_path):
    """Broken CSV records are skipped with their line. The cache's files also follow the umask of the
    session cluster's workers and this driver."""
    src = tmp_path / "ds"
    images = write_images(src, 4, seed=1)
    rows = ["file_name,text"] + [f'{n},"{c}, seen closely"' for n, c in images]
    rows += ["img_0.png", "img_1.png,too,many,fields", ",no file name", ""]  # lines 6-8 broken, 9 blank
    (src / "metadata.csv").write_text("\n".join(rows) + "\n")
    report = prepare(job(src, tmp_path / "cache"))
    assert (report["rows"], report["items"]) == (7, 4)
    meta = str(src / "metadata.csv")
    assert [(s["source"], s["line"], s["reason"]) for s in jsonl(tmp_path / "cache" / "skipped.jsonl")] == [
        (meta, 6, "malformed_line"), (meta, 7, "malformed_line"), (meta, 8, "missing_image_path")]
    assert {it["caption"] for it in jsonl(tmp_path / "cache" / "manifest.jsonl")} == {f"{c}, seen closely" for _, c in images}
    assert_files_follow_umask_in_process(tmp_path / "cache")


def test_manifests_on_s3_with_malformed_rows(ray_cluster, storage, s3_bucket, tmp_path):
    """A JSONL manifest on the loopback S3 server (read by Ray Data line by line) and a Parquet one:
    bad rows are skipped with their line / row number, the rest is cached."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    names, captions = [], []
    for i in range(5):
        data, caption = datasets.shape_image(400 + i, (80, 80 + i))
        storage.write_bytes(f"s3://{s3_bucket}/images/{i}.png", data)
        names.append(f"images/{i}.png")
        captions.append(caption)
    lines = [json.dumps({"file_name": n, "text": c}) for n, c in zip(names, captions)]  # lines 1-5
    lines += ["not json at all", json.dumps({"file_name": "images/404.png", "text": "absent"}),
              json.dumps({"text": "no image"}), json.dumps({"file_name": "images/0.png", "text": "again"})]
    manifest = f"s3://{s3_bucket}/m.jsonl"
    storage.write_text(manifest, "\n".join(lines) + "\n")
    out = f"s3://{s3_bucket}/cache"
    report = prepare(job(manifest, out))
    assert (report["rows"], report["items"]) == (9, 5)
    assert [(s["source"], s["line"], s["reason"]) for s in jsonl(out + "/skipped.jsonl")] == [
        (manifest, 6, "malformed_line"), (manifest, 7, "missing_file"), (manifest, 8, "missing_image_path"),
        (manifest, 9, "duplicate_path")]

    buf = pa.BufferOutputStream()
    pq.write_table(pa.table({"path": names[:3] + [None, names[3]], "prompt": captions[:3] + ["x", None]}), buf)
    storage.write_bytes(f"s3://{s3_bucket}/m.parquet", buf.getvalue().to_pybytes())
    report = prepare(job(f"s3://{s3_bucket}/m.parquet", tmp_path / "pq",
                         data={"image_column": "path", "caption_column": "prompt"}))
    assert (report["rows"], report["items"]) == (5, 3)
    assert [(s["line"], s["reason"]) for s in jsonl(tmp_path / "pq" / "skipped.jsonl")] == [
        (4, "missing_image_path"), (5, "missing_caption")]


def test_small_shards_never_share_a_name(ray_cluster, tmp_path):
    """shard_size 1 with paths listed twice: every encoded row gets its own shard file, none is
    overwritten, and every kept item's tensors load from its shard."""
    src = tmp_path / "ds"
    images = write_images(src, 4, seed=2)
    rows = [{"file_name": n, "text": c} for n, c in images] + [{"file_name": n, "text": c} for n, c in images[:2]]
    (src / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "cache"
    report = prepare(job(src, out, cache={"shard_size": 1}))
    assert (report["rows"], report["items"], report["skipped_by_reason"]) == (6, 4, {"duplicate_path": 2})
    shard_records = sorted((out / "shards").glob("*.json"))
    assert len(shard_records) == report["encoded"] == 6  # the two repeats were encoded too, into shards of their own
    assert len(list((out / "shards").glob("*.safetensors"))) == 6
    for record in shard_records:
        assert len(json.loads(record.read_text())["items"]) == 1
    reader = CacheReader(Storage(), str(out))
    for item in reader.items:
        assert torch.isfinite(reader.load_shard(item.shard)["latents"][item.index]).all()


def test_nothing_usable_is_exit_2_naming_the_dataset(ray_cluster, tmp_path, capsys):
    # every metadata line malformed: refused before any Ray work
    bad_lines = tmp_path / "lines"
    bad_lines.mkdir()
    (bad_lines / "metadata.jsonl").write_text("{oops\n[1, 2]\n")
    assert cli(cli_args(bad_lines, tmp_path / "c1")) == 2
    (err,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert err.startswith(f"error: {bad_lines / 'metadata.jsonl'}: no readable row") and "line 1" in err, err
    assert not (tmp_path / "c1").exists()
    # every file broken: found by the workers, reported, then exit 2
    broken = tmp_path / "broken"
    broken.mkdir()
    rows = []
    for name, data in datasets.broken_files().items():
        (broken / name).write_bytes(data)
        rows.append({"file_name": name, "text": "a broken file"})
    (broken / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli(cli_args(broken, tmp_path / "c2")) == 2
    stderr = capsys.readouterr().err
    (err,) = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert err.startswith(f"error: data.source: {broken}: no usable image: all 5 row(s) were skipped"), err
    assert "Traceback" not in stderr
    assert len(jsonl(tmp_path / "c2" / "skipped.jsonl")) == 5


def assert_files_follow_umask_in_process(out) -> None:
    """The session cluster's workers and this driver share the test process's umask (022 here):
    shards (written by workers), header, manifest, report all get 0o666 & ~umask. Called on the
    output of an in-process prepare on the session cluster (test_metadata_csv_with_broken_records)."""
    files, _ = datasets.file_modes(out)
    assert {"cache.json", "manifest.jsonl", "skipped.jsonl", "report.json"} <= set(files)
    assert any(k.endswith(".safetensors") for k in files)
    assert set(files.values()) == {oct(0o666 & ~current_umask())}, files
