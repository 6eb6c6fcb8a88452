"""The README's main command: `rayimg demo` on its embedded default writes real PNGs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from PIL import Image


def test_demo_writes_pngs(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "RAYIMG_CACHE": str(tmp_path / "cache"), "RAY_ADDRESS": ""}
    env.pop("RAY_ADDRESS")
    proc = subprocess.run(
        [sys.executable, "-m", "rayimg.cli", "demo", f"output_dir={out}", "cluster.num_cpus=1"],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for row in rows:
        img = Image.open(row["path"])
        assert img.size == (64, 64)
        assert img.text["rayimg:key"] == row["key"]
        assert len(set(img.getdata())) > 1  # not a flat image
    assert rows[0]["key"] != rows[1]["key"]
    assert "done: 2 image(s)" in proc.stdout
