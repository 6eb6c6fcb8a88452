"""Shared timing for the headline benchmarks (bench/prepare.py, train.py, render.py, serve.py).

Every headline measures the product against its named reference in the same process or
device call and hands :func:`headline` a figure and a reference; :func:`write_result` writes
them, with the device description, as one JSON file. GPU timings synchronise the device
around every timed region (CUDA kernels run asynchronously); CPU runs take the same code path.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


# --------------------------------------------------------------------------- the device
def device_info(device: str = "cuda") -> dict:
    """GPU name and memory (or the CPU), torch / CUDA / cuDNN / diffusers versions, date."""
    import torch

    info = {"date": datetime.date.today().isoformat(), "time": datetime.datetime.now().isoformat(timespec="seconds"),
            "torch": torch.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count()}
    try:
        import diffusers

        info["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    if is_cuda(device) and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(kind="cuda", gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), gpu_count=torch.cuda.device_count(),
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
        info["name"] = props.name
    else:
        info.update(kind="cpu", name=f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)")
    return info


def slug(name: str) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``h100-80gb-hbm3``: a file-name part."""
    s = "".join(c if c.isalnum() else "-" for c in name.lower().replace("nvidia", "")).strip("-")
    while "--" in s:
        s = s.replace("--", "-")
    return s or "device"


def is_cuda(device) -> bool:
    return str(device).startswith("cuda")


# --------------------------------------------------------------------------- timing
def sync(device) -> None:
    """Wait for the device: a timer read before this measures launches, not work."""
    if is_cuda(device):
        import torch

        torch.cuda.synchronize()


def time_calls(fn, calls: int, device) -> list[float]:
    """Wall seconds of ``calls`` calls of ``fn``, each between two device syncs."""
    times = []
    for _ in range(calls):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return times


def measure(fn, *, warmup: int, calls: int, device, items_per_call: int = 1) -> dict:
    """``warmup`` untimed calls (compilation, caches, clocks), then ``calls`` timed ones:
    median and mean seconds per call and the steady items/s over the measured window."""
    sync(device)
    t = time.perf_counter()
    for _ in range(warmup):
        fn()
    sync(device)
    first = time.perf_counter() - t
    times = time_calls(fn, calls, device)
    window = sum(times)
    return {"warmup_s": round(first, 3), "calls": [round(x, 4) for x in times], "s_per_call_median": round(statistics.median(times), 4),
            "s_per_call_mean": round(window / len(times), 4), "items_per_s": round(items_per_call * len(times) / window, 4)}


def steady_rate(stamps: list[float], items_per_interval: float, skip: int = 1) -> float | None:
    """Items/s between timestamps ``stamps[skip]`` and ``stamps[-1]`` (one stamp per finished
    unit of ``items_per_interval`` items): the rate after the first ``skip`` units."""
    if len(stamps) < skip + 2:
        return None
    return items_per_interval * (len(stamps) - 1 - skip) / (stamps[-1] - stamps[skip])


def reset_peak_memory(device) -> None:
    if is_cuda(device):
        import torch

        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib(device) -> float | None:
    if is_cuda(device):
        import torch

        return round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return None


class GpuSampler:
    """``nvidia-smi`` sampling SM clock, power, temperature and throttle reasons every
    ``period_ms`` while the block runs (a sustained GPU load settles at the power cap);
    :meth:`summary` gives the median clock and power. A no-op without nvidia-smi."""

    FIELDS = "timestamp,clocks.sm,power.draw,temperature.gpu,clocks_event_reasons.active"

    def __init__(self, period_ms: int = 500, csv_path: str | os.PathLike | None = None):
        self.period_ms, self.csv_path, self.proc, self.lines = period_ms, csv_path, None, []

    def __enter__(self) -> "GpuSampler":
        if shutil.which("nvidia-smi"):
            self.proc = subprocess.Popen(["nvidia-smi", f"--query-gpu={self.FIELDS}", "--format=csv,noheader,nounits", "-lms", str(self.period_ms)],
                                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            self.proc.terminate()
            out, _ = self.proc.communicate(timeout=10)
            self.lines = [line for line in out.splitlines() if line.strip()]
            if self.csv_path:
                Path(self.csv_path).write_text(self.FIELDS + "\n" + "\n".join(self.lines) + "\n")

    def summary(self) -> dict:
        clocks, power = [], []
        for line in self.lines:
            parts = [p.strip() for p in line.split(",")]
            try:
                clocks.append(float(parts[1]))
                power.append(float(parts[2]))
            except (IndexError, ValueError):
                continue
        if not clocks:
            return {}
        return {"samples": len(clocks), "sm_clock_mhz_median": statistics.median(clocks), "power_w_median": statistics.median(power),
                "power_w_max": max(power)}


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    v = sorted(values)
    k = (len(v) - 1) * q / 100.0
    lo, hi = int(k), min(int(k) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


# --------------------------------------------------------------------------- results
def headline(name: str, *, figure: float | None, unit: str, what: str, reference: float | None, reference_what: str,
             device: dict, command: str, seconds: float, details: dict | None = None, higher_is_better: bool = True) -> dict:
    """One headline row: the product's figure, the reference measured in the same run, and
    their ratio (> 1: the product is better; for times, reference / figure)."""
    ratio = None
    if figure and reference and math.isfinite(figure) and math.isfinite(reference):
        ratio = round(figure / reference if higher_is_better else reference / figure, 3)
    return {"name": name, "figure": {"value": None if figure is None else round(figure, 4), "unit": unit, "what": what},
            "reference": {"value": None if reference is None else round(reference, 4), "unit": unit, "what": reference_what},
            "ratio": ratio, "device": device.get("name"), "date": device.get("date"), "command": command, "seconds": round(seconds, 1),
            "environment": device, "details": details or {}}


def job_env(**extra: str) -> dict[str, str]:
    """The environment of a job or headline subprocess: unbuffered, offline, no usage stats, and
    the repo on PYTHONPATH (plus ``extra``)."""
    return {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0",
            "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p), **extra}


def report(result: dict, json_path: str | os.PathLike | None) -> None:
    """Print the ``HEADLINE`` line (name, figure, reference, ratio) and write the JSON, if asked."""
    print("HEADLINE " + json.dumps({k: result[k] for k in ("name", "figure", "reference", "ratio")}), flush=True)
    if json_path:
        write_json(json_path, result)


def out_dir() -> Path:
    """``$OUT`` when set (the GPU machine's returned folder), else ``bench/results``."""
    p = Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "bench" / "results"
    p.mkdir(parents=True, exist_ok=True)
    return p


def write_json(path: str | os.PathLike, data: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)
    return path


def command_line() -> str:
    return "python " + " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])


def log(tag: str, msg: str) -> None:
    print(f"[{tag} {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------- shared inputs
def make_jpeg(job) -> str:
    """A random ``size``² JPEG (smooth noise and a few discs: it compresses like a photo)."""
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


def write_image_folder(data_dir: str | os.PathLike, images: int, size: int) -> Path:
    """``images`` random JPEGs and a ``metadata.jsonl`` (``file_name``, ``text``): the layout both
    ``rayimg prepare`` and diffusers' training scripts (``--train_data_dir``) read. Reused when
    it already holds that many images."""
    from concurrent.futures import ProcessPoolExecutor

    data_dir = Path(data_dir)
    if (data_dir / "metadata.jsonl").is_file() and len(list(data_dir.glob("*.jpg"))) == images:
        return data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(str(data_dir / f"{i:06d}.jpg"), i, size) for i in range(images)]
    if images >= 64:
        with ProcessPoolExecutor(max(1, min(16, (os.cpu_count() or 2) - 1))) as pool:
            list(pool.map(make_jpeg, jobs, chunksize=8))
    else:
        for job in jobs:
            make_jpeg(job)
    (data_dir / "metadata.jsonl").write_text("".join(json.dumps({"file_name": Path(p).name, "text": f"a synthetic photo number {i}"}) + "\n"
                                                     for p, i, _ in jobs))
    return data_dir


def save_sdxl_dir(model_dir: str | os.PathLike, *, tiny: bool, device: str = "cuda") -> Path:
    """A ``save_pretrained`` SDXL dir: the real-size architecture with random init (bf16;
    costs per step equal the published model's) or the tiny SDXL. Reused when present."""
    model_dir = Path(model_dir)
    if (model_dir / "model_index.json").is_file():
        return model_dir
    import torch

    if tiny:
        from rayimg.models.tiny import save_tiny

        save_tiny("sdxl", model_dir)
    else:
        from sdxl_random import build_sdxl_pipeline

        torch.manual_seed(0)
        pipe = build_sdxl_pipeline(dtype=torch.bfloat16, device=device)
        pipe.save_pretrained(model_dir, safe_serialization=True)
        del pipe
        if is_cuda(device):
            torch.cuda.empty_cache()
    return model_dir


def prompts(n: int, start: int = 0) -> list[str]:
    subjects = ["a lighthouse at dusk", "a red fox in snow", "a bowl of ramen", "a city street in rain", "an old sailing ship"]
    return [f"{subjects[(start + i) % len(subjects)]}, photo {start + i}" for i in range(n)]
