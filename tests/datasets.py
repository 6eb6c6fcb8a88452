"""Small captioned datasets made by the tests (seeded), in every layout prepare reads; and the
file modes of what a job wrote."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLORS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square")


def shape_image(seed: int, size: tuple[int, int] = (80, 80)) -> tuple[bytes, str]:
    """(PNG bytes, caption) of a coloured shape on white."""
    rng = random.Random(seed)
    color, shape = rng.choice(sorted(COLORS)), rng.choice(SHAPES)
    img = Image.new("RGB", size, (255, 255, 255))
    d = ImageDraw.Draw(img)
    w, h = size
    r = rng.randint(min(w, h) // 6, min(w, h) // 3)
    cx, cy = rng.randint(r, w - r), rng.randint(r, h - r)
    box = (cx - r, cy - r, cx + r, cy + r)
    (d.ellipse if shape == "circle" else d.rectangle)(box, fill=COLORS[color])
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue(), f"a {color} {shape} on a white background"


def imagefolder(root: Path, n: int, *, seed: int = 0, sizes=((80, 80),), caption_column: str = "text") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        data, caption = shape_image(seed * 100003 + i, sizes[i % len(sizes)])
        (root / f"img_{i:05d}.png").write_bytes(data)
        rows.append({"file_name": f"img_{i:05d}.png", caption_column: caption})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def captions_split(root: Path, n: int, *, seed: int = 0) -> Path:
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "captions").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        data, caption = shape_image(seed * 100003 + i)
        (root / "images" / f"{i:04d}.png").write_bytes(data)
        (root / "captions" / f"{i:04d}.txt").write_text(caption)
    return root


def captions_beside(root: Path, n: int, *, seed: int = 0) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        data, caption = shape_image(seed * 100003 + i)
        (root / f"{i:04d}.png").write_bytes(data)
        (root / f"{i:04d}.txt").write_text(caption)
    return root


def broken_files() -> dict[str, bytes]:
    """name -> bytes of files that must each be skipped with a known reason."""
    good, _ = shape_image(7)
    buf = io.BytesIO()
    Image.new("RGB", (80, 80), (10, 200, 10)).save(buf, format="JPEG")
    jpeg = buf.getvalue()
    tiny = io.BytesIO()
    Image.new("RGB", (16, 16), (0, 0, 0)).save(tiny, format="PNG")
    return {
        "zero.png": b"",
        "garbage.png": random.Random(3).randbytes(2000),
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "document.png": b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\n",
        "small.png": tiny.getvalue(),
    }


def file_modes(root: Path) -> tuple[dict[str, str], dict[str, str]]:
    """(files, directories) under ``root``: each path relative to it -> its permission bits as
    ``oct()`` gives them ('0o664')."""
    files, dirs = {}, {}
    for p in sorted(Path(root).rglob("*")):
        (dirs if p.is_dir() else files)[str(p.relative_to(root))] = oct(p.stat().st_mode & 0o777)
    return files, dirs
