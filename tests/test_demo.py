"""The README's main command: `rayimg demo` runs the whole flow on the trained tiny shapes model —
data, prepare, LoRA training, registry, catalog render, one served request, contact sheet — and
the new concept is judged from the PNGs it wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from rayimg.demo.judge import judge

def _demo_job(workdir: str):
    env = {**os.environ, "RAYIMG_CACHE": os.path.join(workdir, "cache"), "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    return [sys.executable, "-m", "rayimg.cli", "demo", f"output_dir={os.path.join(workdir, 'demo')}", "cluster.num_cpus=2"], env, None


BACKGROUND_JOBS = {"demo": _demo_job}  # started with the session (conftest.py)


@pytest.fixture(scope="module")
def demo(background):
    run = background.job("demo")
    rc, stdout, stderr = run.result(timeout=900)
    assert rc == 0, stdout[-4000:] + stderr[-4000:]
    out = Path(run.workdir) / "demo"
    return out, subprocess.CompletedProcess(run.proc.args, rc, stdout, stderr), json.loads((out / "summary.json").read_text())


def test_demo_runs_the_whole_flow(demo):
    out, proc, summary = demo
    assert summary["seconds"] > 0 and set(summary["timings_s"]) >= {"prepare", "train"}  # how long is the user's to read, not a test's
    for stage in ("1/7", "2/7", "3/7", "4/7", "5/7", "6/7", "7/7"):
        assert f"== {stage}" in proc.stdout  # progress is shown throughout

    # the adapter is in the registry, with its trigger word
    adapter = summary["adapter"]
    meta = json.loads((out / "registry" / "adapters" / adapter["name"] / str(adapter["version"]) / "adapter.json").read_text())
    assert meta["trigger_word"] == "sks" and meta["method"] == "lora"

    # one request went through the Serve app over HTTP
    assert summary["serve"]["status"].startswith("ok"), summary["serve"]
    assert Image.open(out / "served.png").size == (64, 64)

    sheet = Image.open(summary["contact_sheet"])
    assert sheet.width > 4 * 128 and sheet.height > len({r["prompt"] for r in summary["renders"]}) * 128
    assert "contact sheet:" in proc.stdout and str(out) in proc.stdout


def _concept_rate(rows):
    shapes = [judge(Image.open(r["path"].removeprefix("file://"))).shape for r in rows]
    return sum(s == "cross" for s in shapes) / len(shapes), shapes


def test_demo_judges_its_renders_consistently(demo):
    _out, _proc, summary = demo
    renders = summary["renders"]
    with_lora = [r for r in renders if r["trigger"] and r["adapter"]]
    without = [r for r in renders if r["trigger"] and not r["adapter"]]
    assert len(with_lora) >= 10 and len(without) == len(with_lora)
    # the summary's figures are the judge's verdicts on the PNGs on disk
    assert _concept_rate(with_lora)[0] == summary["concept_rate_with_adapter"]
    assert _concept_rate(without)[0] == summary["concept_rate_without_adapter"]
    # without the adapter the base model never draws the concept it never saw
    assert summary["concept_rate_without_adapter"] <= 0.10


def test_demo_lora_teaches_the_concept(demo):
    """Issue 7's target: the cross in >= 70% of the trigger renders with the adapter (a LoRA that
    learned nothing scores 0-10%), <= 10% without (checked above). The recipe in
    jobs/configs/demo_tiny.yaml measures 80% here and 84-87% on held-out seeds (docs/DEMO_MODEL.md),
    so one render more or less (another CPU's kernels) does not cross the target."""
    _out, _proc, summary = demo
    renders = summary["renders"]
    rate, shapes = _concept_rate([r for r in renders if r["trigger"] and r["adapter"]])
    assert rate >= 0.70, shapes
    # a prompt without the trigger still draws its own shape with the LoRA on
    plain = [r for r in renders if not r["trigger"] and r["adapter"]]
    assert plain and all(r["judged_shape"] != "cross" for r in plain), plain


def test_demo_yaml_spells_out_the_default():
    """jobs/configs/demo_tiny.yaml is what a bare `rayimg demo` runs."""
    from pathlib import Path

    from rayimg.config import DemoJob, load_job

    assert load_job("demo", Path(__file__).resolve().parents[1] / "jobs" / "configs" / "demo_tiny.yaml") == DemoJob()


def test_demo_overrides_keep_the_demo_defaults():
    """`rayimg demo generation.guidance_scale=7.5` changes that one field: the rest of the section
    stays the demo's (64x64, 20 steps), not GenerationConfig's class defaults (512x512)."""
    from rayimg.config import DemoJob, load_job

    job = load_job("demo", None, ["generation.guidance_scale=9.0", "train.max_steps=10"])
    assert job.generation.guidance_scale == 9.0 and job.train.max_steps == 10
    default = DemoJob()
    assert (job.generation.width, job.generation.steps, job.generation.scheduler) == (
        default.generation.width, default.generation.steps, default.generation.scheduler)
    assert (job.train.resolution, job.train.learning_rate) == (default.train.resolution, default.train.learning_rate)


def test_balanced_concept_pictures_cover_every_colour_and_background():
    """concept.balanced: colours x backgrounds instance pictures hold each pair once (random draws
    left the old 24-picture set without a yellow cross on any plain background)."""
    from rayimg.demo.shapes import COLORS, dataset_specs

    backgrounds = ("white", "black", "gray", "striped")
    specs = dataset_specs(len(COLORS) * len(backgrounds), 0, shapes=("cross",), backgrounds=backgrounds, radii=(17.0, 22.0), balanced=True)
    assert sorted((s.color, s.background) for s in specs) == sorted((c, b) for c in COLORS for b in backgrounds)
    assert all(s.shape == "cross" and 17.0 <= s.radius <= 22.0 for s in specs)
    assert len({(s.cx, s.cy) for s in specs}) == len(specs)  # positions stay random
    # deterministic, and a longer set extends a shorter one
    assert dataset_specs(7, 0, shapes=("cross",), backgrounds=backgrounds, radii=(17.0, 22.0), balanced=True) == specs[:7]
