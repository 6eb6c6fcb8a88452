"""The reference of the train headline (bench/train.py): diffusers' own
``train_text_to_image_lora_sdxl.py``, run unchanged from the git-ignored ``ref/`` folder on the
model dir and images bench/train.py made.

Subcommands (bench/train.py runs them in order):

``deps``     install the wheels in ``ref/wheels`` whose modules the image lacks (datasets, dill,
             multiprocess, ftfy, wcwidth, xxhash) into a private folder (no index, no deps);
``run``      runs the script in this process (``runpy``, as ``python script.py ARGS`` would),
             with one addition: ``Accelerator.backward`` is wrapped to synchronise the GPU and
             take a timestamp. Steps ``warmup`` .. ``warmup+steps`` give the steady-state rate
             (each interval between two backward ends holds exactly one whole iteration: data
             loading, VAE encode, text encoders, UNet forward/backward, clip, optimizer step);
             after the last measured step the process writes its result and exits, skipping
             the script's final LoRA save and pipeline reload (not part of a training step).

The flags are those of the README_sdxl.md LoRA command (``--resolution=1024 --random_flip
--learning_rate=1e-04 --lr_scheduler=constant --lr_warmup_steps=0 --seed=42
--caption_column=text``, a separate VAE via ``--pretrained_vae_model_name_or_path``, rank left at
the script's default 4), minus validation, hub pushing and wandb; mixed precision bf16
(documented: fp16) so both sides run the same precision. Both deviations can only make the
reference faster.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
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


UNFIT = 3  # deps' exit status when ref/wheels was built for another Python or platform


def _fits_here(wheel: Path) -> bool:
    """Whether pip can install this wheel file on the running interpreter."""
    from packaging.tags import sys_tags
    from packaging.utils import parse_wheel_filename

    return not parse_wheel_filename(wheel.name)[3].isdisjoint(set(sys_tags()))


def missing_wheels(wheels_dir: str | Path) -> list[Path]:
    """The wheels in ``wheels_dir`` whose module this interpreter cannot import yet."""
    missing = []
    for wheel in sorted(Path(wheels_dir).glob("*.whl")):
        dist = wheel.name.split("-")[0].lower().replace("_", "-")
        module = WHEEL_MODULES.get(dist, dist.replace("-", "_"))
        if importlib.util.find_spec(module) is None:
            missing.append(wheel)
    return missing


def unfit_wheels(wheels: list[Path]) -> list[str]:
    """Names of ``wheels`` built for another Python or platform."""
    return [w.name for w in wheels if not _fits_here(w)]


def cmd_deps(args) -> int:
    missing = missing_wheels(args.wheels)
    unfit = unfit_wheels(missing)
    if unfit:
        log(f"no wheel for this Python ({sys.implementation.cache_tag}) in {args.wheels}: {', '.join(unfit)}")
        return UNFIT
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("deps")
    p.add_argument("--wheels", default=str(ROOT / "ref" / "wheels"))
    p.add_argument("--target", required=True)
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
    args = ap.parse_args(argv)
    return {"deps": cmd_deps, "run": cmd_run}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
