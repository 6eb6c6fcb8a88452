"""Render-job headline: the bulk render a user runs — `python jobs/render.py` end to end (Ray Data,
one GPU render actor, PNGs, manifest) — against the engine's stream (`Renderer.render_stream`,
what the job's actor runs inside) in the same device call.

Real-size SDXL (random init, saved as a diffusers dir) at 1024², 30 Euler steps, CFG 5.0, a
catalog of ``--rows`` prompts, batch 16 with the render speed settings (fused QKV, channels-last,
torch.compile with CUDA graphs, compiled VAE, float8 linears). The job runs twice, each in its
own process as a user would run it:

1. **cold**: an empty compile cache: the actor compiles the UNet and VAE graphs and saves them;
2. **warm**: a new output folder, the same compile cache: the actor loads the stored graphs
   (``--warm-rows``, default 32: its figure is the time to the first image);
3. **submitted** (``--submitted``): the warm run again, on a Ray cluster already running
   (``ray start --head``), the way ``ray job submit`` runs a job's entrypoint (RAY_ADDRESS set):
   the job's start without starting Ray;
4. **kept** (``--keep-warm``): with ``--submitted``, both jobs on that cluster set ``keep_warm_s``:
   the second renders on the actor the first one left warm (model loaded, graphs compiled).

Each run reports its wall time (the process, Ray start included), the time from job start to
the first image written, and its steady rate (images after the first written batch / time to the
last). The reference, after both: the engine stream in this process, warm from the same cache,
over the same number of batches.

    python bench/render_job.py            # GPU: 64 rows cold, 32 warm (about 8 min on an H100)
    python bench/render_job.py --smoke    # CPU: tiny SDXL at 64², 5 steps, 30 rows (~1 min)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common
import render as render_bench

from rayimg.config import to_dict

DONE_LINE = re.compile(r"\[render\] done: (\d+) image\(s\) \((\d+) rendered, (\d+) already there\) in ([\d.]+)s"
                       r"(?:; first image after ([\d.]+)s)?(?:, then ([\d.]+) images/s)?")


def job_config(*, model_dir: Path, work: Path, out: str, rows_file: Path, batch: int, steps: int, size: int, guidance: float,
               options: set[str], smoke: bool, keep_warm_s: float = 0.0) -> dict:
    cfg = {
        "model": {"pretrained": str(model_dir), "family": "sdxl", "dtype": "float32" if smoke else "bfloat16", "device": "cpu" if smoke else "cuda"},
        "registry": str(work / "registry"),
        "catalog": {"source": str(rows_file)},
        "defaults": {"steps": steps, "width": size, "height": size, "guidance_scale": guidance, "scheduler": "euler", "negative_prompt": ""},
        "engine": to_dict(render_bench.engine_config(options, batch, compile_cache=str(work / "compile-cache"))),
        "output": {"uri": out},
        "concurrency": 1,
        "num_gpus_per_actor": 0.0 if smoke else 1.0,
        "cluster": {"num_cpus": 2} if smoke else {"num_gpus": 1},
    }
    if keep_warm_s:
        cfg["keep_warm_s"] = keep_warm_s
    return cfg


def run_job(config: dict, path: Path, log_path: Path, timeout: float, **env_extra: str) -> dict:
    import yaml

    path.write_text(yaml.safe_dump(config, sort_keys=False))
    cmd = [sys.executable, "jobs/render.py", "--config", str(path)]
    env = common.job_env(**env_extra)
    t = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=common.ROOT, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout)
    wall = time.perf_counter() - t
    text = log_path.read_text(errors="replace")
    m = DONE_LINE.search(text)
    if proc.returncode != 0 or m is None:
        raise RuntimeError(f"the render job failed (rc {proc.returncode}); last lines of {log_path}:\n" + "\n".join(text.splitlines()[-30:]))
    cache = re.search(r"\[render\] compile cache: (.*)", text)
    progress = [line for line in text.splitlines() if re.match(r"\[render\] \d+/\d+ rows done \(", line)]
    kept = re.search(r"\[render\] render actors: (\d+) kept warm", text)
    return {"command": " ".join(cmd[1:]), "wall_s": round(wall, 1), "job_s": float(m.group(4)), "images": int(m.group(1)),
            "rendered": int(m.group(2)), "first_image_s": m.group(5) and float(m.group(5)),
            "steady_images_per_s": m.group(6) and float(m.group(6)), "compile_cache": cache and cache.group(1),
            "progress_lines": len(progress), "warm_actors": int(kept.group(1)) if kept else 0}


# the bench's own loopback cluster: no token to hand around (`ray start` enables token auth by default)
CLUSTER_ENV = {"RAY_AUTH_MODE": "disabled"}


@contextlib.contextmanager
def running_cluster(resources: dict, log_path: Path):
    """A `ray start --head --block` of its own on free ports (stopped by signalling that process,
    which stops what it started, never `ray stop`); yields its GCS address."""
    from rayimg.run.cluster import _free_port

    port = _free_port()  # below the ephemeral range, which Ray's own processes draw from while it starts
    # its own temp dir (short: Ray's socket paths live under it): its address file stays there, so
    # no later ray.init() on this machine takes it for the current cluster
    temp_dir = tempfile.mkdtemp(prefix="rjb-", dir="/tmp")
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", f"--temp-dir={temp_dir}", "--head", "--block", f"--port={port}", "--include-dashboard=false", "--disable-usage-stats",
           f"--num-cpus={resources.get('num_cpus', os.cpu_count())}", f"--num-gpus={resources.get('num_gpus', 0)}"]
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=common.job_env(**CLUSTER_ENV), start_new_session=True)
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while "Ray runtime started" not in log_path.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("`ray start --head` did not start:\n" + log_path.read_text(errors="replace")[-3000:])
            time.sleep(0.5)
        yield address
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny SDXL at 64², 3 steps: checks the code path, numbers meaningless")
    ap.add_argument("--rows", type=int, default=None, help="catalog rows (GPU default 64; 96 for the issue-21 wall figure)")
    ap.add_argument("--warm-rows", type=int, default=None, help="catalog rows of the warm run (GPU default 32)")
    ap.add_argument("--ref-calls", type=int, default=None, help="batches in the reference stream (GPU default 4)")
    ap.add_argument("--batch", type=int, default=None, help="engine batch (GPU default 16)")
    ap.add_argument("--options", default=None, help=f"engine speed options (GPU default {render_bench.GPU_OPTIONS})")
    ap.add_argument("--submitted", action="store_true", help="a third, warm run on a running `ray start --head` cluster (RAY_ADDRESS set)")
    ap.add_argument("--keep-warm", action="store_true", help="with --submitted: both jobs on the running cluster keep their actor "
                    "warm (keep_warm_s), and a fourth run renders on the actor the third left")
    ap.add_argument("--skip-warm", action="store_true", help="no warm run on a local cluster (with --submitted, to save device time)")
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None, help="write this headline's JSON here")
    args = ap.parse_args(argv)
    smoke = args.smoke
    device = "cpu" if smoke else "cuda"
    batch = args.batch or (2 if smoke else 16)
    rows = args.rows or (30 if smoke else 64)  # smoke: enough batches to span the steady window (>= 1 s)
    warm_rows = args.warm_rows or (4 if smoke else 32)
    ref_calls = args.ref_calls or (3 if smoke else 4)
    steps, size, guidance = (5, 64, 5.0) if smoke else (30, 1024, 5.0)
    options = {o for o in (args.options if args.options is not None else ("fuse_qkv" if smoke else render_bench.GPU_OPTIONS)).split(",") if o}
    t0 = time.perf_counter()
    env = common.device_info(device)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="rayimg-bench-render-job-"))
    work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    model_dir = common.save_sdxl_dir(work / "sdxl", tiny=smoke, device=device)
    common.log("render_job", f"model dir {model_dir} in {time.perf_counter() - t:.1f}s")
    kw = dict(model_dir=model_dir, work=work, batch=batch, steps=steps, size=size, guidance=guidance, options=options, smoke=smoke)
    runs = {}
    plan = [("cold", rows, 400)] + ([] if args.skip_warm else [("warm", warm_rows, 200)])
    submitted = [("submitted", warm_rows, 200)] + ([("kept", warm_rows, 200)] if args.keep_warm else [])

    def run(name: str, n: int, timeout: float, address: str | None) -> None:
        rows_file = work / f"catalog-{name}.jsonl"
        rows_file.write_text("".join(json.dumps({"id": f"{name}-{i:05d}", "prompt": p, "seed": 1000 + i}) + "\n"
                                     for i, p in enumerate(common.prompts(n))))
        cfg = job_config(out=str(work / f"out-{name}"), rows_file=rows_file, keep_warm_s=120.0 if args.keep_warm and address else 0.0, **kw)
        runs[name] = run_job(cfg, work / f"{name}.yaml", common.out_dir() / f"render_job_{name}.log", timeout=600 if smoke else timeout,
                             **({"RAY_ADDRESS": address, **CLUSTER_ENV} if address else {}))
        common.log("render_job", f"{name}: {json.dumps(runs[name])}")
        if args.json:  # what is measured so far, in case the call is cut before the end
            common.write_json(args.json, {"name": "render_job", "partial": True, "runs": runs, "device": env})

    for name, n, timeout in plan:
        run(name, n, timeout, None)
    if args.submitted:  # one running cluster for the submitted runs (the kept actor lives in it)
        with running_cluster(job_config(out="-", rows_file=work, **kw)["cluster"], work / "ray-head.log") as address:
            for name, n, timeout in submitted:
                run(name, n, timeout, address)
    ref = None
    if not args.skip_reference:
        from rayimg.config import ModelConfig
        from rayimg.render.renderer import Renderer
        from rayimg.storage import Storage

        # torch's global settings as the job's actor has them (no TF32 switch; one intra-op thread, as
        # Ray gives an actor that reserves no CPU): the same numerics, and inductor's cache key matches
        # (it holds the thread count wherever a graph has CPU code), so the stream loads the graphs the
        # cold job saved
        import torch

        torch.set_num_threads(1)
        engine = render_bench.engine_config(options, batch, compile_cache=str(work / "compile-cache"))
        renderer = Renderer(ModelConfig(pretrained=str(model_dir), family="sdxl", dtype="float32" if smoke else "bfloat16", device=device),
                            engine, Storage())
        ref = render_bench.engine_stream(renderer, batch=batch, calls=ref_calls, steps=steps, size=size, guidance=guidance, device=device)
        ref["compile_cache"] = [e["action"] for e in renderer.compile_cache_status]
        common.log("render_job", f"reference: engine stream {ref['images_per_s']:.3f} images/s (steady {ref['steady_images_per_s']})")
    cold = runs["cold"]
    warm = runs.get("warm") or runs.get("submitted") or {}
    figure = cold["steady_images_per_s"]
    reference = ref and ref["steady_images_per_s"]
    details = {"rows": rows, "warm_rows": warm_rows, "batch": batch, "steps": steps, "size": size, "options": sorted(options), "cold": cold, "warm": warm,
               "submitted": runs.get("submitted"), "kept": runs.get("kept"), "engine_stream": ref, "baseline_96_rows_wall_s": 286,
               "targets": {"steady_vs_stream": 0.95, "warm_first_image_s": 30}}
    result = common.headline(
        "render_job", figure=figure, unit="images/s",
        what=f"jobs/render.py end to end, {rows} rows, batch {batch}, {size}², {steps} steps, 1 GPU actor: steady rate "
             f"(cold run: wall {cold['wall_s']} s, first image {cold['first_image_s']} s; warm run: wall {warm.get('wall_s')} s, first image {warm.get('first_image_s')} s"
             + (f"; on a kept actor: first image {runs['kept']['first_image_s']} s" if "kept" in runs else "") + ")",
        reference=reference, reference_what=f"Renderer.render_stream steady rate, batch {batch}, same process after the jobs",
        device=env, command=common.command_line(), seconds=time.perf_counter() - t0, details=details)
    common.report(result, args.json)
    return result


if __name__ == "__main__":
    main()
