"""`rayimg render` across a two-node Ray cluster on one machine: balanced work units, an actor
lost with its node mid-job, live progress. The cluster runs in a subprocess
(tests/render_cluster_run.py): this session's own Ray cluster is already up in-process."""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from rayimg.storage import Storage

ROWS = 40
BATCH = 1
UNIT = 4 * BATCH  # unit_batches (default 4) x engine.batch_size


def job(catalog: str, out: str, registry: str) -> dict:
    return {"catalog": {"source": catalog}, "output": {"uri": out}, "registry": registry, "model": {"device": "cpu"},
            "defaults": {"steps": 2, "width": 64, "height": 64, "guidance_scale": 3.0},
            "limits": {"max_width": 128, "max_height": 128, "max_steps": 10}, "engine": {"batch_size": BATCH},
            "concurrency": 2, "num_gpus_per_actor": 1, "progress_interval_s": 1.0}


def catalog(path: Path, tag: str) -> str:
    path.write_text("".join(json.dumps({"id": f"{tag}{i:02d}", "prompt": f"{tag} shape {i}", "seed": i}) + "\n" for i in range(ROWS)))
    return str(path)


def _two_nodes_job(workdir: str):
    """Both jobs in one cluster (starting one costs most of the time): 'balance' undisturbed,
    'remove' losing a node (and its actor) after its first images."""
    d = Path(workdir)
    registry = d / "registry"
    registry.mkdir()
    runs = [["balance", job(catalog(d / "a.jsonl", "a"), str(d / "out-a"), str(registry)), 0],
            ["remove", job(catalog(d / "b.jsonl", "b"), str(d / "out-b"), str(registry)), 4]]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["HF_HUB_OFFLINE"] = "1"
    script = Path(__file__).with_name("render_cluster_run.py")
    return [sys.executable, str(script), json.dumps({"runs": runs})], env, str(Path(__file__).parent.parent)


BACKGROUND_JOBS = {"render_two_nodes": _two_nodes_job}  # started with the session (conftest.py)


@pytest.fixture(scope="module")
def two_nodes(background):
    run = background.job("render_two_nodes")
    rc, stdout, stderr = run.result(timeout=240)
    lines = stdout.splitlines()
    result = next((json.loads(line[len("RESULT "):]) for line in lines if line.startswith("RESULT ")), None)
    assert rc == 0 and result and len(result) == 2, (rc, stdout[-4000:], stderr[-6000:])
    return {"dir": Path(run.workdir), "result": result, "lines": lines}


def _manifest(out: Path) -> list[dict]:
    return pq.read_table(io.BytesIO(Storage().read_bytes(f"{out}/manifest.parquet"))).to_pylist()


def test_two_actors_share_the_catalog(two_nodes):
    s = two_nodes["result"]["balance"]["summary"]
    assert s["images"] == ROWS and s["rendered"] == ROWS and s["units"] == ROWS // UNIT
    counts = sorted(s["actors"].values())
    assert len(counts) == 2 and sum(counts) == ROWS, s["actors"]
    # Units come from one queue, so a faster actor takes more of them; on a shared 2-core machine
    # the two nodes' actors differ in speed (24 / 16 rows seen once), so the bound is that both
    # take a real share: at least a quarter of the units each.
    assert counts[0] >= ROWS // 4, s["actors"]
    assert len(list((two_nodes["dir"] / "out-a" / "images").glob("*.png"))) == ROWS


def test_node_removed_mid_job_every_image_exactly_once(two_nodes):
    r = two_nodes["result"]["remove"]
    assert r["images_before_removal"] < ROWS, r  # removed mid-job
    assert r["summary"]["images"] == ROWS and r["summary"]["errors"] == 0
    out = two_nodes["dir"] / "out-b"
    m = _manifest(out)
    assert sorted(row["row_id"] for row in m) == [f"b{i:02d}" for i in range(ROWS)]
    files = sorted((out / "images").glob("*.png"))
    assert len(files) == ROWS and {f.stem for f in files} == {row["key"] for row in m}  # one PNG per key
    assert not list((out / "images").glob("*.tmp*"))


def test_progress_lines_before_the_job_ends(two_nodes):
    lines = two_nodes["lines"]
    done = next(i for i, line in enumerate(lines) if line.startswith("[render] done:"))
    live = [line for line in lines[:done] if "rows done" in line and "; actors " in line]
    assert live, lines[:done]
    first = live[0]
    assert int(first.split("]")[1].split("/")[0]) < ROWS and "images/s" in first and "ETA" in first
    # where the time to the first image went: Ray, the catalog, each actor's start-up
    assert any(line.startswith("[render] catalog ") and "Ray ready " in line for line in lines[:done])
    assert any(line.startswith("[render] ") and " work unit(s) " in line and "s after the job started" in line for line in lines[:done])
    started = [line for line in lines if "[render actor " in line and "model loaded in " in line and "s after the job started)" in line]
    assert started, lines
