"""`keep_warm_s`: render actors kept between jobs on a running cluster (rayimg.run.resident).

The session's Ray cluster is a running one for the job (connect() finds Ray initialised), so kept
actors outlive each job here as on a `ray start` cluster."""

from __future__ import annotations

import threading
import time

import pytest
from PIL import Image

from rayimg.run.render import run as render
from rayimg.run.resident import NAMESPACE
from test_render_job import job, manifest, write_jsonl

pytestmark = pytest.mark.slow


def kept() -> list[str]:
    import ray

    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == NAMESPACE)


def rows(prefix: str, n: int) -> list[dict]:
    return [{"id": f"{prefix}{i:02d}", "prompt": f"shape {i}", "seed": i} for i in range(n)]


def wait_until(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return predicate()


def test_the_next_job_renders_on_the_kept_actor_which_ends_when_idle(ray_cluster, tmp_path):
    registry = str(tmp_path / "registry")
    first = render(job(write_jsonl(tmp_path / "a.jsonl", rows("a", 6)), str(tmp_path / "out-a"), registry, keep_warm_s=60))
    assert first["images"] == 6 and first["warm_actors"] == 0
    names = kept()
    assert len(names) == 1 and names[0].endswith("-0"), names
    label = list(first["actors"])

    second = render(job(write_jsonl(tmp_path / "b.jsonl", rows("b", 4)), str(tmp_path / "out-b"), registry, keep_warm_s=1))
    assert second["images"] == 4 and second["rendered"] == 4 and second["warm_actors"] == 1
    assert list(second["actors"]) == label  # the same actor rendered both jobs
    assert kept() == names
    assert sorted(r["row_id"] for r in manifest(tmp_path / "out-b")) == [f"b{i:02d}" for i in range(4)]

    # other engine settings: another actor (the kept one holds other graphs and pixels)
    other = render(job(write_jsonl(tmp_path / "c.jsonl", rows("c", 2)), str(tmp_path / "out-c"), registry, keep_warm_s=1,
                       engine={"batch_size": 2, "png_compress_level": 3}))
    assert other["warm_actors"] == 0 and other["images"] == 2

    # idle for keep_warm_s (the last job's, 1 s): each ends and gives its resources back
    assert wait_until(lambda: not kept(), 60), kept()


def test_a_kept_actor_killed_mid_job_is_replaced_and_every_image_written_once(ray_cluster, tmp_path):
    import ray

    n = 40
    out = tmp_path / "out"
    catalog = write_jsonl(tmp_path / "c.jsonl", rows("k", n))
    killed: list[str] = []

    def kill_one() -> None:  # at the first image, one of the job's two actors dies
        images = out / "images"
        if wait_until(lambda: images.is_dir() and any(images.glob("*.png")), 240):
            name = kept()[0]
            ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=True)
            killed.append(name)

    killer = threading.Thread(target=kill_one, daemon=True)
    killer.start()
    summary = render(job(catalog, str(out), str(tmp_path / "registry"), keep_warm_s=1, concurrency=2, unit_batches=1,
                         defaults={"steps": 8, "width": 64, "height": 64, "guidance_scale": 3.0}))
    killer.join(timeout=10)
    assert killed, "no image appeared to time the kill"
    assert summary["images"] == n and summary["errors"] == 0
    assert sorted(r["row_id"] for r in manifest(out)) == [f"k{i:02d}" for i in range(n)]
    files = sorted((out / "images").glob("*.png"))
    assert len(files) == n  # exactly once: one file per key
    for f in files:
        Image.open(f).verify()
    assert wait_until(lambda: not kept(), 60), kept()


def test_keep_warm_must_not_be_negative():
    from rayimg.config import RenderJob, from_dict

    with pytest.raises(ValueError, match="keep_warm_s"):
        from_dict(RenderJob, {"catalog": {"source": "c.jsonl"}, "keep_warm_s": -1})


def test_idle_kept_actors_give_way_to_a_job_that_needs_their_resources(ray_cluster, tmp_path):
    """A render actor asking for 0.6 of this node's own resource: one fits at a time. A kept actor
    that waited for its 600 s would hold the next job's actor back that long."""
    from concurrent.futures import ThreadPoolExecutor

    import ray

    one = {f"node:{ray.util.get_node_ip_address()}": 0.6}
    registry = str(tmp_path / "registry")
    pool = ThreadPoolExecutor(1)

    def run(name: str, **kw) -> dict:  # bounded: a job stuck behind an idle actor fails the test
        return pool.submit(render, job(write_jsonl(tmp_path / f"{name}.jsonl", rows(name, 2)), str(tmp_path / f"out-{name}"), registry,
                                       actor_resources=one, **kw)).result(timeout=240)

    try:
        first = run("a", keep_warm_s=600)
        assert first["images"] == 2 and len(kept()) == 1
        held = kept()
        # another kind of actor (other engine settings): the idle one ends so it can start
        second = run("b", keep_warm_s=600, engine={"batch_size": 2, "png_compress_level": 3})
        assert second["images"] == 2 and second["warm_actors"] == 0
        assert len(kept()) == 1 and kept() != held
        # a job on Ray Data's actor pool (no keep_warm_s) needs the same: the kept actor ends again
        third = run("c")
        assert third["images"] == 2 and kept() == []
    finally:
        pool.shutdown(wait=False)
        import ray as _ray

        for name in kept():  # nothing kept for 600 s beyond this test
            _ray.kill(_ray.get_actor(name, namespace=NAMESPACE), no_restart=True)


def test_an_actor_that_cannot_start_holds_no_unit_back(ray_cluster, tmp_path):
    """Two kept actors asked for, room for one (0.6 of this node's own resource each): the job
    renders everything on the one that starts, and the other is not kept waiting for room."""
    from concurrent.futures import ThreadPoolExecutor

    import ray

    one = {f"node:{ray.util.get_node_ip_address()}": 0.6}
    pool = ThreadPoolExecutor(1)
    try:
        summary = pool.submit(render, job(write_jsonl(tmp_path / "c.jsonl", rows("n", 12)), str(tmp_path / "out"), str(tmp_path / "registry"),
                                          keep_warm_s=1, concurrency=2, unit_batches=1, actor_resources=one)).result(timeout=240)
    finally:
        pool.shutdown(wait=False)
    assert summary["images"] == 12 and summary["rendered"] == 12 and len(summary["actors"]) == 1, summary["actors"]
    assert sorted(r["row_id"] for r in manifest(tmp_path / "out")) == [f"n{i:02d}" for i in range(12)]
    assert wait_until(lambda: not kept(), 60), kept()  # the one that never started is gone too
