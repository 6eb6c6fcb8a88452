"""Run the headline benchmarks and write ONE dated JSON result (what `make bench` runs).

Each headline runs in its own process (its GPU memory and Ray cluster end with it) and writes
its part; this driver merges the parts into ``<out>/<date>-<device>.json`` (``$OUT`` when set,
else ``bench/results``): per headline the figure, the reference measured in the same run,
their ratio, device, date and command. A headline that fails is recorded with its error; the
others still run.

    python bench/run.py                          # all four on the GPU (run them one per device call: 10-min limit)
    python bench/run.py --only render -- --batch 1
    python bench/run.py --smoke --only render,train   # CPU, tiny models
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import common

HEADLINES = ("prepare", "train", "render", "render_job", "serve")
TIMEOUT_S = {"prepare": 420, "train": 570, "render": 570, "render_job": 590, "serve": 570}  # each well under one 10-minute device call


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help=f"comma-separated subset of {','.join(HEADLINES)}")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny models: checks every code path in about a minute per headline")
    ap.add_argument("--out", default=None, help="result folder (default $OUT, else bench/results)")
    ap.add_argument("extra", nargs="*", help="after --: more flags for the headline script(s)")
    args = ap.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or list(HEADLINES)
    unknown = set(names) - set(HEADLINES)
    if unknown:
        ap.error(f"--only: unknown headline(s) {sorted(unknown)}; known: {', '.join(HEADLINES)}")
    out = Path(args.out) if args.out else common.out_dir()
    out.mkdir(parents=True, exist_ok=True)
    device = common.device_info("cpu" if args.smoke else "cuda")
    here = Path(__file__).resolve().parent
    env = common.job_env(OUT=str(out))
    headlines = {}
    for name in names:
        part = out / f"{name}.part.json"  # beside the logs: a call cut at its limit still returns it
        cmd = [sys.executable, str(here / f"{name}.py"), "--json", str(part), *(["--smoke"] if args.smoke else []), *args.extra]
        common.log("bench", f"{name}: {' '.join(cmd[1:])}")
        t = time.perf_counter()
        with open(out / f"{name}.log", "w") as log:
            try:
                rc = subprocess.run(cmd, cwd=common.ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    timeout=900 if args.smoke else TIMEOUT_S[name]).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        h = common.json.loads(part.read_text()) if part.is_file() else {"name": name}
        part.unlink(missing_ok=True)  # merged below
        if "figure" not in h:  # failed, or cut after writing a partial result (kept beside the error)
            tail = (out / f"{name}.log").read_text(errors="replace").splitlines()[-15:]
            h.update(error=f"rc {rc} after {time.perf_counter() - t:.0f}s", log_tail=tail)
        headlines[name] = h
        h = headlines[name]
        common.log("bench", f"{name}: " + (f"{h['figure']['value']} {h['figure']['unit']} vs reference {h['reference']['value']}: ratio {h['ratio']}"
                                           if "figure" in h else h["error"]))
    result = {"date": device["date"], "device": device, "smoke": args.smoke, "command": common.command_line(), "headlines": headlines}
    path = out / f"{device['date']}-{'smoke-cpu' if args.smoke else common.slug(device['name'])}.json"
    common.write_json(path, result)
    print(f"wrote {path}", flush=True)
    return path


if __name__ == "__main__":
    main()
