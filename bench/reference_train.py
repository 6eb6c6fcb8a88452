"""The reference for bench/train_bench.py: diffusers' own ``train_text_to_image_lora_sdxl.py``,
run unchanged from the git-ignored ``ref/`` folder on the same synthetic data and batch sizes.

Subcommands (``bench/reference_train.sh`` runs them in order):

``deps``     install the wheels in ``ref/wheels`` whose modules the image lacks (datasets, dill,
             multiprocess, ftfy, wcwidth, xxhash) into a private folder (no index, no deps);
``prepare``  a ``save_pretrained`` SDXL dir with random weights (the real-size
             ``build_sdxl_pipeline`` in bf16, or ``--tiny``) and an imagefolder dataset of random
             JPEGs at the resolution with ``metadata.jsonl`` (``file_name``, ``text``);
``run``      runs the script in this process (``runpy``, as ``python script.py ARGS`` would),
             with one addition: ``Accelerator.backward`` is wrapped to synchronise the GPU and
             take a timestamp. Steps ``warmup`` .. ``warmup+steps`` give the steady-state rate
             (each interval between two backward ends holds exactly one whole iteration: data
             loading, VAE encode, text encoders, UNet forward/backward, clip, optimizer step);
             after the last measured step the process writes its result and exits, skipping
             the script's final LoRA save and pipeline reload (not part of a training step);
``compare``  the side-by-side table of train_bench.json (+ compile JSON) and reference_train.json.

The flags are those of the README_sdxl.md LoRA command (``--resolution=1024 --random_flip
--train_batch_size=1 --learning_rate=1e-04 --lr_scheduler=constant --lr_warmup_steps=0
--seed=42 --caption_column=text``, a separate VAE via ``--pretrained_vae_model_name_or_path``,
rank left at the script's default 4), minus validation, hub pushing and wandb; mixed precision
bf16 (documented: fp16) so both sides run the same precision. Both deviations (bf16, no
validation) can only make the reference faster, not slower.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START = time.perf_counter()
# wheel distribution name -> the module it provides
WHEEL_MODULES = {"datasets": "datasets", "dill": "dill", "multiprocess": "multiprocess", "ftfy": "ftfy",
                 "wcwidth": "wcwidth", "xxhash": "xxhash"}


def log(msg: str) -> None:
    print(f"[reference {time.perf_counter() - START:6.1f}s] {msg}", flush=True)


# --------------------------------------------------------------------------- deps
def _check_imports(target: str) -> tuple[bool, str]:
    """Import what the script needs in a fresh interpreter that sees ``target``; (ok, report)."""
    code = ("import importlib.metadata as m, datasets, dill, multiprocess, ftfy, torchvision, accelerate, peft, transformers;"
            "print(' '.join(f'{n}=' + m.version(n) for n in ('datasets', 'pyarrow', 'fsspec', 'huggingface_hub', 'dill',"
            " 'multiprocess', 'ftfy', 'torchvision', 'accelerate', 'peft', 'transformers', 'diffusers')))")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH", ""), target) if p)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    return proc.returncode == 0, (proc.stdout.strip() or proc.stderr.strip().splitlines()[-1:] and proc.stderr.strip().splitlines()[-1])


def _pip_install(target: str, wheels: list[Path]) -> int:
    Path(target).mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
           "--disable-pip-version-check", "--upgrade", "--target", target, *map(str, wheels)]
    return subprocess.call(cmd)


def cmd_deps(args) -> int:
    wheels = sorted(Path(args.wheels).glob("*.whl"))
    missing = []
    for wheel in wheels:
        dist = wheel.name.split("-")[0].lower().replace("_", "-")
        module = WHEEL_MODULES.get(dist, dist.replace("-", "_"))
        if importlib.util.find_spec(module) is None:
            missing.append(wheel)
    if missing:
        log(f"installing into {args.target}: {', '.join(w.name for w in missing)}")
        rc = _pip_install(args.target, missing)
        if rc:
            return rc
    else:
        log("every reference dependency is already importable")
    ok, report = _check_imports(args.target)
    if not ok:
        # datasets 5.x wants pyarrow >= 24; 4.8 (same dill/multiprocess pins) takes pyarrow >= 21
        fallback = sorted(Path(args.wheels, "fallback").glob("datasets-*.whl"))
        if fallback:
            log(f"import check failed ({report}); trying {fallback[-1].name}")
            _pip_install(args.target, [fallback[-1]])
            ok, report = _check_imports(args.target)
    log(("versions: " if ok else "import check FAILED: ") + report)
    return 0 if ok else 1


# --------------------------------------------------------------------------- prepare
def make_jpeg(job) -> str:
    path, seed, size = job
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, size=(max(2, size // 16), max(2, size // 16), 3), dtype=np.uint8)
    img = Image.fromarray(base).resize((size, size), Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(8):
        x, y = rng.integers(0, size, 2)
        r = int(rng.integers(max(1, size // 20), max(2, size // 5)))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    img.save(path, format="JPEG", quality=92)
    return path


def cmd_prepare(args) -> int:
    sys.path.insert(0, str(ROOT))
    import torch

    model_dir, data_dir = Path(args.model_dir), Path(args.data_dir)
    if (model_dir / "model_index.json").is_file() and not args.force:
        log(f"model dir {model_dir} exists; reusing it")
    else:
        t = time.perf_counter()
        if args.tiny:
            from rayimg.models.tiny import save_tiny

            save_tiny("sdxl", model_dir)
        else:
            from rayimg.models.real_size import build_sdxl_pipeline

            device = "cuda" if torch.cuda.is_available() else "cpu"
            torch.manual_seed(0)
            pipe = build_sdxl_pipeline(dtype=torch.bfloat16, device=device)
            pipe.save_pretrained(model_dir, safe_serialization=True)
            del pipe
        log(f"{'tiny' if args.tiny else 'real-size'} SDXL saved to {model_dir} in {time.perf_counter() - t:.1f}s")
    # the script loads both tokenizers with AutoTokenizer(use_fast=False): check they load here
    from transformers import AutoTokenizer

    for sub in ("tokenizer", "tokenizer_2"):
        tok = AutoTokenizer.from_pretrained(model_dir, subfolder=sub, use_fast=False)
        if tok.model_max_length != 77:
            raise SystemExit(f"{model_dir}/{sub}: model_max_length {tok.model_max_length}, expected 77")
    if (data_dir / "metadata.jsonl").is_file() and len(list(data_dir.glob("*.jpg"))) == args.images and not args.force:
        log(f"dataset {data_dir} exists; reusing it")
        return 0
    t = time.perf_counter()
    data_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(str(data_dir / f"{i:05d}.jpg"), i, args.resolution) for i in range(args.images)]
    with ProcessPoolExecutor(max(1, min(8, (os.cpu_count() or 2) - 1))) as pool:
        list(pool.map(make_jpeg, jobs, chunksize=4))
    (data_dir / "metadata.jsonl").write_text("".join(
        json.dumps({"file_name": Path(p).name, "text": f"a synthetic photo number {i}"}) + "\n" for p, i, _ in jobs))
    log(f"{args.images} JPEGs of {args.resolution}² written to {data_dir} in {time.perf_counter() - t:.1f}s")
    return 0


# --------------------------------------------------------------------------- run
def reference_argv(args) -> list[str]:
    model = str(Path(args.model_dir).resolve())
    argv = [
        f"--pretrained_model_name_or_path={model}",
        f"--pretrained_vae_model_name_or_path={model}/vae",
        f"--train_data_dir={Path(args.data_dir).resolve()}",
        "--caption_column=text",
        f"--resolution={args.resolution}",
        "--random_flip",
        f"--train_batch_size={args.batch}",
        f"--max_train_steps={args.warmup + args.steps + 1}",
        "--checkpointing_steps=1000000",
        "--learning_rate=1e-04",
        "--lr_scheduler=constant",
        "--lr_warmup_steps=0",
        f"--mixed_precision={args.mixed_precision}",
        "--seed=42",
        f"--output_dir={Path(args.work) / f'out-b{args.batch}'}",
        f"--cache_dir={Path(args.work) / 'hf-cache'}",
    ]
    return argv + list(args.extra)


def _merge_json(path: Path, row: dict) -> None:
    data = json.loads(path.read_text()) if path.is_file() else {"results": []}
    data["results"] = [r for r in data["results"] if r.get("batch") != row.get("batch")] + [row]
    data["results"].sort(key=lambda r: r.get("batch", 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


def cmd_run(args) -> int:
    for var, value in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"),
                       ("HF_HUB_DISABLE_TELEMETRY", "1"), ("WANDB_MODE", "disabled")):
        os.environ.setdefault(var, value)
    os.environ.setdefault("HF_HOME", str(Path(args.work) / "hf-home"))
    script = Path(args.script).resolve()
    if not script.is_file():
        raise SystemExit(f"{script}: the reference script is missing (see bench/README.md: fetch it into ref/)")
    import accelerate
    import torch

    cuda = torch.cuda.is_available()
    stamps: list[float] = []
    need = args.warmup + args.steps
    row = {"batch": args.batch, "resolution": args.resolution, "mixed_precision": args.mixed_precision,
           "warmup": args.warmup, "steps": args.steps, "script": str(script.relative_to(ROOT)) if script.is_relative_to(ROOT) else str(script),
           "argv": reference_argv(args), "device": torch.cuda.get_device_name(0) if cuda else "cpu",
           "torch": torch.__version__}

    def finish(status: str) -> None:
        row["status"] = status
        row["backward_calls"] = len(stamps)
        if len(stamps) >= need and args.steps > 0:
            window = stamps[need - 1] - stamps[args.warmup - 1] if args.warmup > 0 else stamps[need - 1] - stamps[0]
            n = args.steps if args.warmup > 0 else args.steps - 1
            row["images_per_s"] = round(args.batch * n / window, 4)
            row["step_s"] = round(window / n, 4)
        if stamps:
            row["startup_s"] = round(stamps[0] - START, 1)
        if cuda:
            row["peak_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        print("\nREFERENCE " + json.dumps(row), flush=True)
        if args.json:
            _merge_json(Path(args.json), row)

    original = accelerate.Accelerator.backward

    def timed_backward(self, loss, **kwargs):
        out = original(self, loss, **kwargs)
        if cuda:
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        if len(stamps) == need:
            finish("ok")
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)  # measured; skip the final LoRA save + pipeline reload
        return out

    accelerate.Accelerator.backward = timed_backward
    import runpy

    sys.argv = [str(script), *reference_argv(args)]
    sys.path.insert(0, str(script.parent))
    log(f"python {script.name} {' '.join(sys.argv[1:])}")
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as e:
        if e.code not in (0, None):
            finish(f"error: exit {e.code}")
            raise
    except BaseException as e:
        finish(f"error: {type(e).__name__}: {str(e)[:300]}")
        raise
    finish("ok" if len(stamps) >= need else f"ended after {len(stamps)} steps")
    return 0


# --------------------------------------------------------------------------- compare
def cmd_compare(args) -> int:
    ours: list[dict] = []
    for path in args.ours:
        if Path(path).is_file():
            ours += json.loads(Path(path).read_text()).get("results", [])
    ref = json.loads(Path(args.ref).read_text()).get("results", []) if Path(args.ref).is_file() else []
    # what-if rows (a "note": not what train.py does) are shown by train_bench, not counted here
    ok = [r for r in ours if r.get("status") == "ok" and r.get("method") == "lora" and not r.get("note")]
    rows = []
    for r in sorted(ref, key=lambda r: r["batch"]):
        b = r["batch"]
        asis = next((o for o in ok if o["config"] == "lora" and o["batch"] == b), None)
        at_b = [o for o in ok if o["batch"] == b]
        best = max(at_b, key=lambda o: o["images_per_s"]) if at_b else None
        ref_ips = r.get("images_per_s")
        rows.append({
            "batch": b, "reference_images_per_s": ref_ips, "reference_peak_mem_gb": r.get("peak_mem_gb"),
            "ours_trainpy_images_per_s": asis and asis["images_per_s"],
            "ours_best_config": best and best["config"], "ours_best_images_per_s": best and best["images_per_s"],
            "ours_best_peak_mem_gb": best and best.get("peak_mem_gb"), "ours_best_mfu": best and best.get("mfu"),
            "ratio_trainpy": round(asis["images_per_s"] / ref_ips, 2) if asis and ref_ips else None,
            "ratio_best": round(best["images_per_s"] / ref_ips, 2) if best and ref_ips else None,
        })
    overall = max(ok, key=lambda o: o["images_per_s"]) if ok else None
    documented = next((r for r in ref if r["batch"] == 1 and r.get("images_per_s")), None)
    summary = {
        "per_batch": rows,
        "ours_best_overall": overall and {k: overall.get(k) for k in ("config", "batch", "images_per_s", "peak_mem_gb", "mfu")},
        "reference_documented_batch1_images_per_s": documented and documented["images_per_s"],
        "ratio_best_vs_reference_documented": round(overall["images_per_s"] / documented["images_per_s"], 2)
        if overall and documented else None,
        "targets": {"lora_images_per_s": 20, "ratio_vs_reference": 2.5},
    }
    print("\nbatch | reference img/s | ours (train.py as is) | ours best (config) | ratio as-is | ratio best")
    for r in rows:
        print(f"{r['batch']:>5} | {r['reference_images_per_s']} | {r['ours_trainpy_images_per_s']} | "
              f"{r['ours_best_images_per_s']} ({r['ours_best_config']}) | {r['ratio_trainpy']} | {r['ratio_best']}")
    if overall:
        print(f"best overall: {overall['config']} at batch {overall['batch']}: {overall['images_per_s']:.2f} images/s "
              f"(target 20); vs the reference's documented batch 1: {summary['ratio_best_vs_reference_documented']}x (target 2.5x)")
    print("COMPARE " + json.dumps(summary), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("deps")
    p.add_argument("--wheels", default=str(ROOT / "ref" / "wheels"))
    p.add_argument("--target", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--model-dir", required=True)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--force", action="store_true")
    p = sub.add_parser("run")
    p.add_argument("--script", default=str(ROOT / "ref/diffusers/examples/text_to_image/train_text_to_image_lora_sdxl.py"))
    p.add_argument("--model-dir", required=True)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--mixed-precision", default="bf16", choices=["no", "fp16", "bf16"])
    p.add_argument("--json", default=None)
    p.add_argument("extra", nargs="*", help="more flags for the script, after --")
    p = sub.add_parser("compare")
    p.add_argument("--ours", nargs="+", required=True)
    p.add_argument("--ref", required=True)
    p.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    return {"deps": cmd_deps, "prepare": cmd_prepare, "run": cmd_run, "compare": cmd_compare}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
