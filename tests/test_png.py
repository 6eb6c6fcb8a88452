"""png_bytes: the PNG writer of every image the jobs and the server return."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from rayimg.render.output import png_bytes

META = {"rayimg:key": "ab" * 32, "parameters": {"prompt": "café 東京", "seed": 3}, "note": "東京"}


def chunks(png: bytes) -> list[tuple[bytes, bytes]]:
    """The file's chunks, each CRC checked."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    out, pos = [], 8
    while pos < len(png):
        (size,) = struct.unpack(">I", png[pos:pos + 4])
        kind, data = png[pos + 4:pos + 8], png[pos + 8:pos + 8 + size]
        assert struct.unpack(">I", png[pos + 8 + size:pos + 12 + size])[0] == zlib.crc32(kind + data), kind
        out.append((kind, data))
        pos += 12 + size
    return out


@pytest.mark.parametrize("mode, shape", [("RGB", (1024, 1024, 3)), ("RGBA", (37, 53, 4)), ("L", (300, 700)), ("RGB", (1, 1, 3))])
@pytest.mark.parametrize("level", [0, 1, 6])
def test_pixels_and_text_round_trip_through_pil_and_zlib(mode, shape, level):
    rng = np.random.default_rng(0)
    # half noise, half smooth: the parts of a large image deflate differently
    pixels = rng.integers(0, 256, shape, dtype=np.uint8)
    pixels[: shape[0] // 2] = np.arange(shape[1], dtype=np.uint8)[None, :, None] if len(shape) == 3 else np.arange(shape[1], dtype=np.uint8)
    image = Image.fromarray(pixels, mode)
    png = png_bytes(image, META, level)
    assert png == png_bytes(image, META, level)  # deterministic

    found = chunks(png)
    assert [k for k, _ in found][0] == b"IHDR" and [k for k, _ in found][-1] == b"IEND"
    raw = zlib.decompress(b"".join(d for k, d in found if k == b"IDAT"))  # checks the stream's adler32
    assert len(raw) == shape[0] * (shape[1] * (shape[2] if len(shape) == 3 else 1) + 1)

    back = Image.open(io.BytesIO(png))
    back.load()
    assert back.mode == mode and back.size == image.size
    assert np.array_equal(np.asarray(back), pixels)
    assert back.text == {"rayimg:key": META["rayimg:key"], "parameters": '{"prompt": "caf\\u00e9 \\u6771\\u4eac", "seed": 3}',
                         "note": "東京"}
    Image.open(io.BytesIO(png)).verify()


def test_level_1_file_is_no_larger_than_pils_and_other_modes_go_through_pil():
    rng = np.random.default_rng(1)
    y, x = np.mgrid[0:512, 0:512]
    smooth = np.stack([x // 2, y // 2, (x + y) // 4], -1).astype(np.int64) + rng.integers(-4, 5, (512, 512, 3))
    image = Image.fromarray(np.clip(smooth, 0, 255).astype(np.uint8))
    ours, pils = png_bytes(image, {}, 1), io.BytesIO()
    image.save(pils, format="PNG", compress_level=1)
    assert len(ours) <= len(pils.getvalue()) * 1.02, (len(ours), len(pils.getvalue()))

    palette = image.convert("P")
    png = png_bytes(palette, {"k": "v"}, 1)
    back = Image.open(io.BytesIO(png))
    assert back.mode == "P" and back.text == {"k": "v"} and np.array_equal(np.asarray(back), np.asarray(palette))
