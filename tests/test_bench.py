"""The headline benchmarks' code path on CPU (tiny models): `bench/run.py --smoke` writes one
JSON with a figure, a reference and a finite positive ratio per headline. Keeps bench/ from
rotting; the numbers themselves mean nothing at this size."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench_job(only: str):
    def spec(workdir: str):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0", "OUT": workdir}
        return [sys.executable, "bench/run.py", "--smoke", "--only", only, "--out", workdir], env, str(ROOT)
    return spec


# started with the session (conftest.py)
BACKGROUND_JOBS = {"bench_render_serve_prepare": _bench_job("render,render_job,serve,prepare"), "bench_train": _bench_job("train")}


def run_bench(background, name):
    run = background.job(name)
    rc, stdout, stderr = run.result(timeout=1200)
    assert rc == 0, stdout[-3000:] + stderr[-3000:]
    [path] = Path(run.workdir).glob("*-smoke-cpu.json")
    return json.loads(path.read_text())


def check_headline(h, *, reference=True):
    assert "error" not in h, f"{h.get('name')}: {h['error']}\n" + "\n".join(h.get("log_tail", []))
    for key in ("name", "figure", "reference", "ratio", "device", "date", "command"):
        assert key in h, key
    why = f"{h['name']}: reference {h['reference'].get('what')!r}, skipped {h['details'].get('skip_reasons')}, failed {h['details'].get('failed')}"
    assert h["figure"]["unit"] == h["reference"]["unit"] == "images/s"
    assert h["figure"]["value"] is not None and math.isfinite(h["figure"]["value"]) and h["figure"]["value"] > 0, why
    if reference:
        assert h["reference"]["value"] is not None, why
        assert math.isfinite(h["reference"]["value"]) and h["reference"]["value"] > 0
        assert math.isfinite(h["ratio"]) and h["ratio"] > 0
        assert h["ratio"] == pytest.approx(h["figure"]["value"] / h["reference"]["value"], rel=1e-2)


def test_bench_smoke_render_serve_prepare(background):
    result = run_bench(background, "bench_render_serve_prepare")
    assert result["smoke"] and result["device"]["kind"] == "cpu"
    assert set(result["headlines"]) == {"render", "render_job", "serve", "prepare"}
    for h in result["headlines"].values():
        check_headline(h)
    job = result["headlines"]["render_job"]["details"]
    assert job["cold"]["rendered"] == job["rows"] and job["warm"]["rendered"] == job["warm_rows"]
    assert job["cold"]["first_image_s"] > 0 and job["cold"]["wall_s"] >= job["cold"]["job_s"]
    serve = result["headlines"]["serve"]["details"]
    assert serve["ok"] == serve["requests_sent"] > 0 and not serve["errors"]
    assert serve["app_warmup_split_s"]["denoise_s"] > 0 and serve["app_warmup_split_s"]["generator_s"] > 0  # one request alone, split
    assert not serve["partial"] and not serve["skipped"] and set(serve["levels"]) == {"2", "3"}
    for clients, level in serve["levels"].items():
        assert level["concurrency"] == int(clients) and level["ok"] == level["requests_sent"] > 0 and not level["errors"]
    assert serve["levels"]["2"]["images_per_s"] == pytest.approx(result["headlines"]["serve"]["figure"]["value"], rel=1e-3)
    single = serve["single_request_s"]
    assert single["ok"] == 2 and single["p50"] > 0 and single["p50_no_adapter"] > 0 and single["p50_adapter"] > 0
    # alone in the step loop, the adapter request has its adapter fused (batching.fuse_alone): one swap
    assert single["adapter_swaps"] == 1 and single["mean_swap_ms"] > 0
    assert serve["mixed_adapter_step"]["slot_load_ms_warm"] > 0 and serve["mixed_adapter_step"]["ratio"] > 0
    assert set(serve["phases"]) == {"mixed_step", "reference", "app", "single", "level 2", "level 3"}


def test_bench_smoke_train(background):
    """The train job through jobs/train.py with the shipped sdxl_lora.yaml; the reference script
    lives in the git-ignored ref/, so it may be missing here, or its wheels built for another
    Python: then it is reported, not faked."""
    result = run_bench(background, "bench_train")
    h = result["headlines"]["train"]
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from reference_train import missing_wheels, unfit_wheels
    finally:
        sys.path.remove(str(ROOT / "bench"))
    has_ref = ((ROOT / "ref/diffusers/examples/text_to_image/train_text_to_image_lora_sdxl.py").is_file()
               and not unfit_wheels(missing_wheels(ROOT / "ref/wheels")))
    check_headline(h, reference=has_ref)
    if not has_ref:
        assert h["reference"]["value"] is None and h["ratio"] is None and "missing" in h["details"]["reference_run"]
    assert len(h["details"]["job"]["windows_images_per_s"]) >= 2


def test_bench_serve_deadline_skips(tmp_path):
    """A deadline too short for any phase: each is skipped and recorded, and the JSON is written
    (no figure, no reference) without starting a model or Ray."""
    path = tmp_path / "serve.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0", "OUT": str(tmp_path)}
    proc = subprocess.run([sys.executable, "bench/serve.py", "--smoke", "--deadline-s", "1", "--json", str(path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    h = json.loads(path.read_text())
    assert h["figure"]["value"] is None and h["reference"]["value"] is None and h["ratio"] is None
    details = h["details"]
    assert details["skipped"] == ["mixed_step", "reference", "app", "single", "level 2", "level 3"]
    assert not details["levels"] and not details["phases"] and not details["partial"]
