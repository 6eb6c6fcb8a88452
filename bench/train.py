"""Train headline: the training job a user runs — `python jobs/train.py --config
jobs/configs/sdxl_lora.yaml` (Ray Train, one worker, batch 8, rank-16 LoRA, bf16 weights,
regional compile) — against diffusers' `train_text_to_image_lora_sdxl.py` at the same batch on
the same images and model, in the same device call.

Both sides get a `save_pretrained` real-size SDXL dir (random init; cost per step equals the
published model's) and 64 random 1024² JPEGs with `metadata.jsonl`. Ours trains from the cache
`rayimg prepare` writes from them (run first, in this process; not timed); the job runs as a
subprocess with the shipped YAML and overrides only for paths, one worker and the step count.
The figure is the job's own `images/s` over its 10-step log windows after the first (which
holds the compile), combined as total images / total time. The reference is
`bench/reference_train.py run`: the script unchanged, its steady rate after 3 warm-up steps.
It lives in the git-ignored `ref/` (bench/README.md says how to fetch it); without it the
headline still runs and reports the reference as missing.

    python bench/train.py             # GPU (~6 min on an H100: model dir 1 min, job 3 min, reference 1.5 min)
    python bench/train.py --smoke     # CPU: tiny SDXL at 64², batch 2, no compile (~45 s)
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common
from reference_train import UNFIT as REF_DEPS_UNFIT

REF_SCRIPT = common.ROOT / "ref/diffusers/examples/text_to_image/train_text_to_image_lora_sdxl.py"
STEP_LINE = re.compile(r"\[train\] step (\d+): .*?([\d.]+) images/s")


def job_overrides(*, model_dir: Path, cache: Path, work: Path, batch: int, steps: int, smoke: bool) -> list[str]:
    """What differs from jobs/configs/sdxl_lora.yaml: paths, one worker, the step count, and
    (smoke) the CPU and the tiny model's resolution."""
    out = [f"model.pretrained={model_dir}", f"cache={cache}", f"train.batch_size={batch}", f"train.max_steps={steps}",
           "scaling.num_workers=1", f"checkpoint.storage_path={work / 'runs'}", f"checkpoint.run_name=bench-{int(time.time())}",
           "checkpoint.every_n_steps=1000000", "validation.prompts=[]", "validation.every_n_steps=0",
           f"publish.registry={work / 'registry'}", "publish.name=bench-lora"]
    if smoke:
        out += ["scaling.use_gpu=false", "scaling.cpus_per_worker=1", "cluster.num_cpus=2", "train.resolution=64", "train.compile=none"]
    else:
        out += ["scaling.cpus_per_worker=4", "cluster.num_gpus=1"]
    return out


def run_job(overrides: list[str], log_path: Path, timeout: float) -> dict:
    """The job as a user runs it; its step lines parsed from the log."""
    cmd = [sys.executable, "jobs/train.py", "--config", "jobs/configs/sdxl_lora.yaml", *overrides]
    env = common.job_env()
    t = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=common.ROOT, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout)
    wall = time.perf_counter() - t
    text = log_path.read_text(errors="replace")
    # Ray may forward a worker's line more than once: one window per step
    windows = sorted({int(m.group(1)): float(m.group(2)) for m in STEP_LINE.finditer(text)}.items())
    if proc.returncode != 0:
        raise RuntimeError(f"the train job failed (rc {proc.returncode}); last lines of {log_path}:\n" + "\n".join(text.splitlines()[-30:]))
    steady = windows[1:]
    rate = len(steady) / sum(1 / r for _, r in steady) if steady else None  # equal images per window: harmonic mean
    return {"command": " ".join(cmd[1:]), "wall_s": round(wall, 1), "windows_images_per_s": windows, "images_per_s": rate}


def run_reference(*, model_dir: Path, data_dir: Path, work: Path, batch: int, resolution: int, warmup: int, steps: int,
                  timeout: float) -> dict:
    """diffusers' script through ``reference_train.py`` (deps from ref/wheels, then the timed run)."""
    if not REF_SCRIPT.is_file():
        return {"missing": f"{REF_SCRIPT.relative_to(common.ROOT)} is not there: fetch it into ref/ as bench/README.md says"}
    here = Path(__file__).resolve().parent
    site = work / "ref-site"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (os.environ.get("PYTHONPATH", ""), str(site)) if p)}
    log_path = common.out_dir() / "reference_train.log"
    json_path = work / "reference_train.json"
    t = time.perf_counter()
    with open(log_path, "w") as log:
        deps = subprocess.run([sys.executable, str(here / "reference_train.py"), "deps", "--target", str(site)],
                              stdout=log, stderr=subprocess.STDOUT, cwd=common.ROOT)
        if deps.returncode == REF_DEPS_UNFIT:
            return {"missing": f"ref/wheels was built for another Python or platform; see {log_path}"}
        if deps.returncode != 0:
            return {"error": f"reference deps failed; see {log_path}"}
        proc = subprocess.run([sys.executable, str(here / "reference_train.py"), "run", "--model-dir", str(model_dir), "--data-dir", str(data_dir),
                               "--work", str(work / "ref-work"), "--batch", str(batch), "--resolution", str(resolution), "--warmup", str(warmup),
                               "--steps", str(steps), "--json", str(json_path)],
                              stdout=log, stderr=subprocess.STDOUT, cwd=common.ROOT, env=env, timeout=timeout)
    rows = common.json.loads(json_path.read_text())["results"] if json_path.is_file() else []
    row = next((r for r in rows if r.get("batch") == batch), {})
    row["wall_s"] = round(time.perf_counter() - t, 1)
    if proc.returncode != 0 or not row.get("images_per_s"):
        row["error"] = f"reference run failed (rc {proc.returncode}); see {log_path}"
    return row


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny SDXL at 64²: checks the code path, numbers meaningless")
    ap.add_argument("--batch", type=int, default=None, help="images per step, both sides (GPU default 8)")
    ap.add_argument("--steps", type=int, default=None, help="job steps (GPU default 50: 4 log windows, the first holds the compile)")
    ap.add_argument("--images", type=int, default=None)
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None, help="write this headline's JSON here")
    args = ap.parse_args(argv)
    smoke = args.smoke
    device = "cpu" if smoke else "cuda"
    batch = args.batch or (2 if smoke else 8)
    steps = args.steps or (30 if smoke else 50)
    resolution = 64 if smoke else 1024
    images = args.images or (16 if smoke else 64)
    t0 = time.perf_counter()
    env = common.device_info(device)

    import ray

    import prepare as prepare_bench
    from rayimg.run.prepare import run as prepare

    work = Path(args.workdir or tempfile.mkdtemp(prefix="rayimg-bench-train-"))
    t = time.perf_counter()
    model_dir = common.save_sdxl_dir(work / "sdxl", tiny=smoke, device=device)
    data_dir = common.write_image_folder(work / f"data-{resolution}", images, resolution)
    cache = work / f"cache-{resolution}"
    prepare(prepare_bench.prepare_job(model_dir, data_dir, cache, batch=8, resolution=resolution, device=device,
                                      dtype="float32" if smoke else "bfloat16", text=False, shard_size=32))
    ray.shutdown()
    setup_s = time.perf_counter() - t
    common.log("train", f"model dir, {images} images and their cache ready in {setup_s:.1f}s")

    overrides = job_overrides(model_dir=model_dir, cache=cache, work=work, batch=batch, steps=steps, smoke=smoke)
    with common.GpuSampler() as gpu:
        ours = run_job(overrides, common.out_dir() / "train_job.log", timeout=600 if smoke else 480)
    common.log("train", f"job: {ours['images_per_s']} images/s (windows {ours['windows_images_per_s']}) in {ours['wall_s']}s")
    ref = {"skipped": True} if args.skip_reference else run_reference(
        model_dir=model_dir, data_dir=data_dir, work=work, batch=batch, resolution=resolution,
        warmup=1 if smoke else 3, steps=3 if smoke else 10, timeout=600 if smoke else 300)
    common.log("train", f"reference: {ref}")
    details = {"batch": batch, "resolution": resolution, "job_steps": steps, "setup_s": round(setup_s, 1), "job": ours, "reference_run": ref,
               "gpu_samples": gpu.summary()}
    result = common.headline(
        "train", figure=ours["images_per_s"], unit="images/s",
        what=f"jobs/train.py with jobs/configs/sdxl_lora.yaml, 1 worker, batch {batch}, {resolution}², steady log windows",
        reference=ref.get("images_per_s"), reference_what=f"diffusers train_text_to_image_lora_sdxl.py (v0.40.0), batch {batch}, bf16"
        + (" — missing: " + ref["missing"] if "missing" in ref else ""),
        device=env, command=common.command_line(), seconds=time.perf_counter() - t0, details=details)
    common.report(result, args.json)
    return result


if __name__ == "__main__":
    main()
