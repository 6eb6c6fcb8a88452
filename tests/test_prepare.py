"""`rayimg prepare` on a real local Ray cluster: every reader, bad input, resume, S3."""

from __future__ import annotations

import json

import pytest
import torch

from rayimg.config import ConfigError, PrepareJob, from_dict
from rayimg.data.cache import CacheError, CacheReader
from rayimg.run.prepare import run as prepare
from rayimg.storage import Storage

from tests import datasets


def job(source: str, output: str, **sections) -> PrepareJob:
    data = {"data": {"source": source, **sections.pop("data", {})}, "cache": {"output": output, "shard_size": 8, "batch_size": 4, **sections.pop("cache", {})},
            "transforms": {"resolution": 64, **sections.pop("transforms", {})}, "model": {"pretrained": "rayimg-tiny-sd", "device": "cpu"}}
    data.update(sections)
    return from_dict(PrepareJob, data)


def manifest(root) -> list[dict]:
    return [json.loads(line) for line in Storage().read_text(f"{root}/manifest.jsonl").splitlines()]


def test_imagefolder_with_every_bad_input(ray_cluster, tmp_path):
    src = datasets.imagefolder(tmp_path / "ds", 12)
    rows = [json.loads(line) for line in (src / "metadata.jsonl").read_text().splitlines()]
    for name, data in datasets.broken_files().items():
        (src / name).write_bytes(data)
        rows.append({"file_name": name, "text": "a broken file"})
    rows.append({"file_name": "img_00000.png", "text": rows[0]["text"]})  # the same path again
    (src / "copy.png").write_bytes((src / "img_00003.png").read_bytes())
    rows.append({"file_name": "copy.png", "text": "another caption"})  # the same bytes under another name
    (src / "nocap.png").write_bytes(datasets.shape_image(301)[0])
    rows.append({"file_name": "nocap.png"})  # no caption
    (src / "blank.png").write_bytes(datasets.shape_image(302)[0])
    rows.append({"file_name": "blank.png", "text": "   "})  # empty caption
    rows.append({"file_name": "missing.png", "text": "gone"})  # listed but absent
    (src / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "cache"
    report = prepare(job(str(src), str(out)))
    assert report["items"] == 12
    assert report["skipped_by_reason"] == {
        "corrupt_image": 1, "duplicate": 1, "duplicate_path": 1, "empty_caption": 1, "missing_caption": 1,
        "missing_file": 1, "too_small": 1, "truncated_image": 1, "unsupported_format": 1, "zero_byte": 1,
    }
    assert report["rows"] == len(rows) == report["items"] + report["skipped"]
    bad = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert {(b["image_uri"].rsplit("/", 1)[-1], b["reason"]) for b in bad} >= {("zero.png", "zero_byte"), ("small.png", "too_small")}
    assert {b["source"] for b in bad} == {str(src / "metadata.jsonl")}
    items = manifest(out)
    assert len({it["key"] for it in items}) == 12
    reader = CacheReader(Storage(), str(out))
    shard = reader.load_shard(items[0]["shard"])
    assert shard["latents"].shape[1:] == (4, 8, 8)
    assert torch.isfinite(shard["latents"]).all()


def test_captions_layouts_and_text_embeddings(ray_cluster, tmp_path):
    split = datasets.captions_split(tmp_path / "split", 5)
    (split / "captions" / "0001.txt").write_bytes(b"\xff\xfe bad utf8 \xc3\x28")
    report = prepare(job(str(split), str(tmp_path / "c1"), cache={"cache_text_embeddings": True}))
    assert report["items"] == 4 and report["skipped_by_reason"] == {"non_utf8_caption": 1}
    items = manifest(tmp_path / "c1")
    shard = CacheReader(Storage(), str(tmp_path / "c1")).load_shard(items[0]["shard"])
    assert shard["prompt_embeds"].shape[0] == shard["latents"].shape[0]
    assert shard["prompt_embeds"].shape[1] == 77
    beside = datasets.captions_beside(tmp_path / "beside", 3)
    (beside / "orphan.png").write_bytes(datasets.shape_image(99)[0])  # no caption file
    report = prepare(job(str(beside), str(tmp_path / "c2")))
    assert report["items"] == 3 and report["skipped_by_reason"] == {"missing_caption": 1}


def test_dreambooth_with_class_images(ray_cluster, tmp_path):
    inst = tmp_path / "inst"
    cls = tmp_path / "cls"
    inst.mkdir()
    cls.mkdir()
    for i in range(3):
        (inst / f"{i}.png").write_bytes(datasets.shape_image(i)[0])
        (cls / f"{i}.png").write_bytes(datasets.shape_image(50 + i)[0])
    prepare(job(str(inst), str(tmp_path / "c"), data={"instance_prompt": "a photo of sks shape",
                                                      "class_source": str(cls), "class_prompt": "a photo of a shape"}))
    items = manifest(tmp_path / "c")
    assert sorted(it["kind"] for it in items) == ["class"] * 3 + ["instance"] * 3
    assert {it["caption"] for it in items if it["kind"] == "instance"} == {"a photo of sks shape"}


def test_buckets_and_sdxl_conditioning(ray_cluster, tmp_path):
    src = datasets.imagefolder(tmp_path / "ds", 6, sizes=((160, 80), (80, 160), (96, 96)))
    cfg = job(str(src), str(tmp_path / "c"), transforms={"resolution": 64, "random_flip": True,
                                                         "buckets": {"enabled": True, "min_side": 32, "max_side": 128, "step": 32}},
              model={"pretrained": "rayimg-tiny-sdxl", "device": "cpu"})
    prepare(cfg)
    items = manifest(tmp_path / "c")
    by_name = {it["image_uri"].rsplit("/", 1)[-1]: it for it in items}
    wide, tall, square = by_name["img_00000.png"], by_name["img_00001.png"], by_name["img_00002.png"]
    assert wide["width"] > wide["height"] and tall["height"] > tall["width"] and square["width"] == square["height"]
    assert wide["original_size"] == [80, 160] and wide["target_size"] == [wide["height"], wide["width"]]
    assert tall["original_size"] == [160, 80]
    shard = CacheReader(Storage(), str(tmp_path / "c")).load_shard(wide["shard"])
    assert shard["latents"].shape[2:] == (wide["height"] // 8, wide["width"] // 8)
    assert any(it["flipped"] for it in items) or len(items) < 4  # about half flip


def test_s3_manifest_and_s3_cache(ray_cluster, storage, s3_bucket, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    names, captions = [], []
    for i in range(6):
        data, caption = datasets.shape_image(200 + i)
        storage.write_bytes(f"s3://{s3_bucket}/images/{i}.png", data)
        names.append(f"images/{i}.png")
        captions.append(caption)
    buf = pa.BufferOutputStream()
    pq.write_table(pa.table({"path": names, "prompt": captions}), buf)
    storage.write_bytes(f"s3://{s3_bucket}/manifest.parquet", buf.getvalue().to_pybytes())
    out = f"s3://{s3_bucket}/cache"
    report = prepare(job(f"s3://{s3_bucket}/manifest.parquet", out, data={"image_column": "path", "caption_column": "prompt"}))
    assert report["items"] == 6
    assert {it["caption"] for it in manifest(out)} == set(captions)
    with pytest.raises(ConfigError, match="caption_column='text'"):
        prepare(job(f"s3://{s3_bucket}/manifest.parquet", out, data={"image_column": "path"}))
    # JSONL manifest, local
    lines = "".join(json.dumps({"file_name": f"s3://{s3_bucket}/{n}", "text": c}) + "\n" for n, c in zip(names, captions))
    (tmp_path / "m.jsonl").write_text(lines)
    assert prepare(job(str(tmp_path / "m.jsonl"), str(tmp_path / "c")))["items"] == 6


def test_errors_before_any_work(ray_cluster, tmp_path, s3_server):
    with pytest.raises(ConfigError, match="does not exist"):
        prepare(job(str(tmp_path / "nope"), str(tmp_path / "c")))
    with pytest.raises(ConfigError, match="bucket does not exist"):
        prepare(job("s3://no-such-bucket-rayimg/data", str(tmp_path / "c")))
    src = datasets.imagefolder(tmp_path / "ds", 2, caption_column="caption")
    with pytest.raises(ConfigError, match="data.caption_column='text'"):
        prepare(job(str(src), str(tmp_path / "c")))
    # a cache built for another model is refused: checked on test_rerun_skips_finished_items' cache
    # nothing usable at all
    empty = tmp_path / "bad"
    empty.mkdir()
    (empty / "a.png").write_bytes(b"")
    (empty / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "x"}) + "\n")
    with pytest.raises(ConfigError, match=f"data.source: {empty}: no usable image"):
        prepare(job(str(empty), str(tmp_path / "c3")))
    assert json.loads((tmp_path / "c3" / "skipped.jsonl").read_text()) == {
        "source": str(empty / "metadata.jsonl"), "line": 1, "image_uri": str(empty / "a.png"), "reason": "zero_byte",
        "detail": "the file is empty (0 bytes)"}


def test_rerun_skips_finished_items(ray_cluster, tmp_path, capsys):
    """A second run over a grown dataset encodes only the new items and leaves old shards alone.
    Its cache (built for rayimg-tiny-sd) also shows that a job for another model is refused before
    any work."""
    src = datasets.imagefolder(tmp_path / "ds", 10)
    out = tmp_path / "c"
    prepare(job(str(src), str(out)))
    first = manifest(out)
    shards_before = sorted(p.name for p in (out / "shards").iterdir())
    datasets.imagefolder(tmp_path / "more", 4, seed=5)
    rows = (src / "metadata.jsonl").read_text()
    for p in (tmp_path / "more").glob("*.png"):
        (src / ("more_" + p.name)).write_bytes(p.read_bytes())
    extra = [json.loads(line) for line in (tmp_path / "more" / "metadata.jsonl").read_text().splitlines()]
    rows += "".join(json.dumps({"file_name": "more_" + r["file_name"], "text": r["text"]}) + "\n" for r in extra)
    (src / "metadata.jsonl").write_text(rows)
    capsys.readouterr()
    report = prepare(job(str(src), str(out)))
    assert "resuming: 10 item(s) already cached" in capsys.readouterr().out
    assert report["items"] == 14
    second = manifest(out)
    assert {it["key"] for it in first} < {it["key"] for it in second}
    assert set(shards_before) <= {p.name for p in (out / "shards").iterdir()}  # old shards untouched
    # a cache built for another model is refused
    with pytest.raises(CacheError, match="model_id"):
        prepare(job(str(src), str(out), model={"pretrained": "rayimg-tiny-sdxl", "device": "cpu"}))
