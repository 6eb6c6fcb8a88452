"""`rayimg render` on a real Ray cluster: catalogs, adapters, bad rows, determinism, resume, S3."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import tempfile
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from rayimg.config import ModelConfig, RenderJob, from_dict
from rayimg.models.loader import load_model
from rayimg.run.render import run as render
from rayimg.storage import Storage


def make_adapter(registry: str, name: str, seed: int) -> None:
    """Publish a random rank-4 LoRA for the tiny SD model, through the project's own trainee and export."""
    import tempfile

    from rayimg.config import TrainJob
    from rayimg.train.export import lora_state_dicts, save_lora
    from rayimg.registry import publish_adapter
    from rayimg.train.trainee import build_trainee

    loaded = load_model(ModelConfig(device="cpu"))
    tj = from_dict(TrainJob, {"cache": "unused", "train": {"mixed_precision": "no"}, "lora": {"rank": 4}})
    trainee = build_trainee(loaded, tj)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in trainee.unet.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    with tempfile.TemporaryDirectory() as d:
        save_lora(d, "sd", lora_state_dicts(trainee)["unet"])
        publish_adapter(Storage(), registry, name, None, d, {"base_model": {"id": loaded.model_id, "hash": loaded.model_hash}, "method": "lora"})


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("registry"))
    make_adapter(root, "style-a", 1)
    make_adapter(root, "style-b", 2)
    return root


def job(catalog: str, out: str, registry: str, **kw) -> RenderJob:
    data = {"catalog": {"source": catalog}, "output": {"uri": out}, "registry": registry, "model": {"device": "cpu"},
            "defaults": {"steps": 2, "width": 64, "height": 64, "guidance_scale": 3.0},
            "limits": {"max_width": 128, "max_height": 128, "max_steps": 10}, "engine": {"batch_size": 2}}
    data.update(kw)
    return from_dict(RenderJob, data)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def manifest(out) -> list[dict]:
    return pq.read_table(io.BytesIO(Storage().read_bytes(f"{out}/manifest.parquet"))).to_pylist()


def pixels(storage, path) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(storage.read_bytes(path))).convert("RGB"))


GOOD = [
    {"id": "plain", "prompt": "a red circle", "seed": 1},
    {"id": "a1", "prompt": "a red circle", "seed": 1, "adapters": [{"name": "style-a", "scale": 1.0}]},
    {"id": "a0", "prompt": "a red circle", "seed": 1, "adapters": [{"name": "style-a", "scale": 0.0}]},
    {"id": "ab", "prompt": "a red circle", "seed": 1, "adapters": "style-a:0.5,style-b@1:1.0"},
    {"id": "sched", "prompt": "a blue square", "seed": 2, "scheduler": "dpmpp_2m_karras", "steps": 3, "width": 96},
]
BAD = [
    {"id": "no-prompt", "seed": 1},
    {"id": "odd-size", "prompt": "x", "width": 100},
    {"id": "too-big", "prompt": "x", "height": 256},
    {"id": "zero-steps", "prompt": "x", "steps": 0},
    {"id": "bad-sched", "prompt": "x", "scheduler": "nope"},
    {"id": "unknown-adapter", "prompt": "x", "adapters": [{"name": "missing"}]},
    {"id": "unknown-version", "prompt": "x", "adapters": [{"name": "style-a", "version": "9"}]},
]


def test_catalog_with_adapters_and_bad_rows(ray_cluster, registry, tmp_path):
    out = str(tmp_path / "out")
    summary = render(job(write_jsonl(tmp_path / "c.jsonl", GOOD + BAD), out, registry))
    assert summary["images"] == len(GOOD) and summary["errors"] == len(BAD)
    errors = {json.loads(line)["row_id"]: json.loads(line)["reason"] for line in open(f"{out}/errors.jsonl")}
    assert "missing prompt" in errors["no-prompt"] and "multiple of 8" in errors["odd-size"]
    assert "above the maximum" in errors["too-big"] and "unknown adapter 'missing'" in errors["unknown-adapter"]
    assert "no version '9'" in errors["unknown-version"] and "unknown scheduler" in errors["bad-sched"]
    rows = {r["row_id"]: r for r in manifest(out)}
    st = Storage()
    img = Image.open(io.BytesIO(st.read_bytes(rows["sched"]["path"])))
    assert img.size == (96, 64)
    params = json.loads(img.text["parameters"])
    assert params["scheduler"] == "dpmpp_2m_karras" and params["seed"] == 2 and img.text["rayimg:key"] == rows["sched"]["key"]
    assert json.loads(rows["ab"]["adapters"]) == [{"name": "style-a", "version": "1", "scale": 0.5}, {"name": "style-b", "version": "1", "scale": 1.0}]
    plain, a1, a0 = (pixels(st, rows[k]["path"]) for k in ("plain", "a1", "a0"))
    assert np.array_equal(plain, a0)  # scale 0 equals no adapter
    assert not np.array_equal(plain, a1)
    assert len({r["key"] for r in rows.values()}) == len(GOOD)


def test_same_row_same_bytes_in_any_batch(ray_cluster, registry, tmp_path):
    row = {"id": "x", "prompt": "a green star", "seed": 7, "adapters": "style-b:0.7"}
    others = [{"id": f"o{i}", "prompt": f"filler {i}", "seed": i, "adapters": "style-b:0.7"} for i in range(3)]
    a = render(job(write_jsonl(tmp_path / "a.jsonl", [row]), str(tmp_path / "a"), registry, engine={"batch_size": 1}))
    b = render(job(write_jsonl(tmp_path / "b.jsonl", others + [row]), str(tmp_path / "b"), registry, engine={"batch_size": 4}))
    assert a["images"] == 1 and b["images"] == 4
    ra = {r["row_id"]: r for r in manifest(tmp_path / "a")}["x"]
    rb = {r["row_id"]: r for r in manifest(tmp_path / "b")}["x"]
    assert ra["key"] == rb["key"]
    assert open(ra["path"], "rb").read() == open(rb["path"], "rb").read()


def test_rerun_skips_and_killed_run_resumes_exactly_once(ray_cluster, registry, tmp_path):
    rows = [{"id": f"r{i:02d}", "prompt": f"shape {i}", "seed": i, "adapters": "style-a:1.0" if i % 2 else ""} for i in range(16)]
    catalog = write_jsonl(tmp_path / "c.jsonl", rows)
    out = tmp_path / "out"
    # a `ray start` left behind on this machine (its address file names a dead cluster) is not joined:
    # with no RAY_ADDRESS the job starts its own cluster
    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths live under it
    os.makedirs(os.path.join(ray_tmp, "ray"))
    with open(os.path.join(ray_tmp, "ray", "ray_current_cluster"), "w") as f:
        f.write("127.0.0.1:9")
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "RAY_TMPDIR": ray_tmp}
    log = open(tmp_path / "render.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "rayimg.cli", "render", f"catalog.source={catalog}", f"output.uri={out}", f"registry={registry}",
         "model.device=cpu", "defaults.steps=2", "defaults.width=64", "defaults.height=64", "defaults.guidance_scale=3.0",
         "limits.max_width=128", "limits.max_height=128", "limits.max_steps=10", "engine.batch_size=2", "cluster.num_cpus=1",
         "keep_warm_s=30"],
        env=env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
    images = out / "images"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if images.is_dir() and len(list(images.glob("*.png"))) >= 3:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = len(list(images.glob("*.png")))
    log.close()
    assert 3 <= before < 16, (before, (tmp_path / "render.log").read_text()[-3000:])
    # its own cluster ends with it: no actor can be kept, and the job says so
    assert "keep_warm_s=30 has no effect on a local cluster" in (tmp_path / "render.log").read_text()
    summary = render(job(catalog, str(out), registry))
    assert summary["images"] == 16 and summary["skipped_existing"] >= before - 2
    m = manifest(out)
    assert sorted(r["row_id"] for r in m) == [f"r{i:02d}" for i in range(16)]
    files = sorted(images.glob("*.png"))
    assert len(files) == 16  # exactly once: one file per key
    for f in files:
        Image.open(f).verify()  # none half-written
    again = render(job(catalog, str(out), registry))
    assert again["rendered"] == 0 and again["skipped_existing"] == 16


def test_s3_catalog_and_outputs(ray_cluster, registry, storage, s3_bucket, tmp_path):
    import pyarrow as pa

    buf = io.BytesIO()
    pq.write_table(pa.table({"prompt": ["a red circle", "a blue square"], "seed": [3, 4]}), buf)
    storage.write_bytes(f"s3://{s3_bucket}/catalog.parquet", buf.getvalue())
    out = f"s3://{s3_bucket}/renders"
    summary = render(job(f"s3://{s3_bucket}/catalog.parquet", out, registry))
    assert summary["images"] == 2
    m = manifest(out)
    assert all(r["path"].startswith(out + "/images/") and storage.exists(r["path"]) for r in m)
    with pytest.raises(Exception, match="catalog.source"):
        render(job(f"s3://{s3_bucket}/missing.parquet", out, registry))


def test_catalog_check_reads_only_its_head_and_takes_any_utf8(ray_cluster, tmp_path):
    """The up-front check of a JSONL catalog reads its first 64 KiB (a huge catalog is Ray Data's to
    read): a character cut by that boundary, a first line longer than it, or a byte-order mark is
    not an error; an empty or non-JSON catalog fails before any work with its reason."""
    from rayimg.config import ConfigError
    from rayimg.run.render import read_catalog

    storage = Storage()
    # rows of Japanese prompts whose 3-byte characters straddle byte 65536 somewhere in the head
    rows = [{"id": f"r{i}", "prompt": "赤い四角" * (i % 7 + 1), "seed": i} for i in range(3000)]
    for pad in range(3):  # shift the text by 0-2 ASCII bytes until the cut lands inside a character
        rows[0]["prompt"] = "x" * pad + "赤い四角"
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
        if (data[1 << 16] & 0xC0) == 0x80:  # a continuation byte right after the cut
            break
    path = tmp_path / "utf8.jsonl"
    path.write_bytes(data)
    assert len(data) > 1 << 16
    with pytest.raises(UnicodeDecodeError):
        data[:1 << 16].decode("utf-8")  # the cut falls inside a character: the old whole-head decode failed here
    assert read_catalog(job(str(path), str(tmp_path / "o1"), str(tmp_path / "reg")), storage).count() == 3000

    long_first = tmp_path / "long.jsonl"
    write_jsonl(long_first, [{"id": "a", "prompt": "x" * 100_000, "seed": 1}, {"id": "b", "prompt": "y", "seed": 2}])
    assert read_catalog(job(str(long_first), str(tmp_path / "o2"), str(tmp_path / "reg")), storage).count() == 2

    bom = tmp_path / "bom.jsonl"  # Windows' "UTF-8 with BOM"
    bom.write_text('\ufeff{"id": "r1", "prompt": "a red square", "seed": 1}\n', encoding="utf-8")
    assert read_catalog(job(str(bom), str(tmp_path / "o4"), str(tmp_path / "reg")), storage).count() == 1

    for name, text, reason in [("empty.jsonl", "\n  \n", "is empty"), ("junk.jsonl", "not json\n", "cannot be read as jsonl")]:
        (tmp_path / name).write_text(text)
        with pytest.raises(ConfigError, match=reason):
            read_catalog(job(str(tmp_path / name), str(tmp_path / "o3"), str(tmp_path / "reg")), storage)


def test_malformed_lines_are_bad_rows_and_the_rest_renders(ray_cluster, registry, tmp_path):
    """A JSON Lines catalog with a line that is not JSON, one that is not an object, one that is not
    UTF-8, a truncated last line (a catalog cut mid-upload), Windows line ends and a byte-order
    mark: every good row renders, each bad line is in errors.jsonl naming its line, and the job
    ends normally (Ray Data's JSON reader failed the whole job on the first of these)."""
    good = [{"id": f"g{i}", "prompt": f"a red square {i}", "seed": i} for i in range(3)]
    lines = [b"\xef\xbb\xbf" + json.dumps(good[0]).encode(), b"{not json", json.dumps(good[1]).encode(), b"[1, 2]", b"",
             json.dumps({"id": "latin", "prompt": "caf\xe9"}).encode().replace(b"\\u00e9", b"\xe9"), json.dumps(good[2]).encode(),
             b'{"id": "cut", "prom']
    path = tmp_path / "messy.jsonl"
    path.write_bytes(b"\r\n".join(lines))
    out = str(tmp_path / "out")
    summary = render(job(str(path), out, registry))
    assert summary["images"] == 3 and summary["errors"] == 4, summary
    assert {r["row_id"] for r in manifest(out)} == {"g0", "g1", "g2"}
    errors = {e["row_id"]: e for e in map(json.loads, open(f"{out}/errors.jsonl"))}
    assert set(errors) == {"messy.jsonl:2", "messy.jsonl:4", "messy.jsonl:6", "messy.jsonl:8"}
    assert errors["messy.jsonl:2"]["reason"].startswith("line 2: not valid JSON")
    assert errors["messy.jsonl:4"]["reason"] == "line 4: expected a JSON object, got list"  # as rayimg prepare words it
    assert errors["messy.jsonl:6"]["reason"].startswith("line 6: not UTF-8 (invalid byte at column ")
    assert errors["messy.jsonl:8"]["reason"].startswith("line 8: not valid JSON") and errors["messy.jsonl:8"]["row"]["text"] == '{"id": "cut", "prom'
