"""Output keys and image files (the same key means the same image), and the pixels of a finished
pipeline call as PIL images, now or once their copy to the host is done."""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image, PngImagePlugin


def output_key(model_id: str, model_hash: str, adapters: list[dict], params: dict) -> str:
    """Hash of base model, adapters (name, version, scale), every generation parameter and the seed.

    ``adapters`` entries are ``{"name", "version", "scale"}``; their order does not matter.
    """
    canonical = {
        "model": {"id": model_id, "hash": model_hash},
        "adapters": sorted(({"name": a["name"], "version": str(a["version"]), "scale": float(a["scale"])} for a in adapters),
                           key=lambda a: (a["name"], a["version"])),
        "params": params,
    }
    blob = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(blob.encode()).hexdigest()


_PNG_PART_BYTES = 128 * 1024  # least filtered bytes per deflate part compressed on its own thread
_PNG_MAX_PARTS = 16
_PNG_COLOUR = {"L": (0, 1), "RGB": (2, 3), "RGBA": (6, 4)}  # mode: (PNG colour type, bytes per pixel)
_ZLIB_FLG = (0x01, 0x01, 0x5E, 0x5E, 0x5E, 0x5E, 0x9C, 0xDA, 0xDA, 0xDA)  # by level: FLEVEL, check bits for CMF 0x78
_png_pool: ThreadPoolExecutor | None = None
_png_pool_lock = threading.Lock()


def png_bytes(image: Image.Image, metadata: dict, compress_level: int = 6) -> bytes:
    """Encode ``image`` as PNG with ``metadata`` in text chunks (parameters as JSON), at zlib
    ``compress_level`` (PIL's default 6).

    8-bit L, RGB and RGBA images (what the pipelines give) are encoded here: each row with the
    Sub filter (the None filter at level 0), the rows deflated as one zlib stream in parts of
    at least 128 KiB on up to 16 threads (each part ends byte-aligned, as pigz does): several times
    faster than PIL's one-thread encoder at the same level, for a file of the same size. Other
    modes go through PIL.

    Encoding is deterministic: the same pixels, metadata and level give the same bytes.
    """
    texts = [(key, value if isinstance(value, str) else json.dumps(value, sort_keys=True)) for key, value in metadata.items()]
    if image.mode not in _PNG_COLOUR:
        info = PngImagePlugin.PngInfo()
        for key, value in texts:
            info.add_text(key, value)
        buf = io.BytesIO()
        image.save(buf, format="PNG", pnginfo=info, optimize=False, compress_level=compress_level)
        return buf.getvalue()
    colour, bpp = _PNG_COLOUR[image.mode]
    height, width = image.height, image.width
    rows = np.asarray(image, dtype=np.uint8).reshape(height, width * bpp)
    filtered = np.empty((height, width * bpp + 1), dtype=np.uint8)
    if compress_level == 0:
        filtered[:, 0] = 0
        filtered[:, 1:] = rows
    else:  # Sub: each byte minus the same channel of the pixel before it, modulo 256
        filtered[:, 0] = 1
        filtered[:, 1:bpp + 1] = rows[:, :bpp]
        np.subtract(rows[:, bpp:], rows[:, :-bpp], out=filtered[:, bpp + 1:])
    stream = _zlib_in_parts(filtered, compress_level)
    chunks = [_png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, colour, 0, 0, 0))]
    for key, value in texts:
        try:
            chunks.append(_png_chunk(b"tEXt", key.encode("latin-1") + b"\0" + value.encode("latin-1")))
        except UnicodeEncodeError:  # international text, as PIL writes it
            chunks.append(_png_chunk(b"iTXt", key.encode("latin-1") + b"\0\0\0\0\0" + value.encode("utf-8")))
    chunks += [_png_chunk(b"IDAT", stream), _png_chunk(b"IEND", b"")]
    return b"\x89PNG\r\n\x1a\n" + b"".join(chunks)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))


def _zlib_in_parts(data: np.ndarray, level: int) -> bytes:
    """One zlib stream of ``data``'s rows: the rows split into parts deflated independently and in
    parallel, every part but the last ending with a sync flush (byte-aligned, not final)."""
    global _png_pool
    parts = max(1, min(_PNG_MAX_PARTS, data.nbytes // _PNG_PART_BYTES, data.shape[0]))
    bounds = [data.shape[0] * i // parts for i in range(parts + 1)]

    def deflate(i: int) -> bytes:
        packer = zlib.compressobj(level, zlib.DEFLATED, -15)
        return packer.compress(memoryview(data[bounds[i]:bounds[i + 1]]).cast("B")) + packer.flush(
            zlib.Z_FINISH if i == parts - 1 else zlib.Z_SYNC_FLUSH)

    if parts == 1:
        body = [deflate(0)]
    else:
        with _png_pool_lock:
            if _png_pool is None:
                _png_pool = ThreadPoolExecutor(max_workers=min(_PNG_MAX_PARTS, os.cpu_count() or 1), thread_name_prefix="rayimg-png")
        body = list(_png_pool.map(deflate, range(parts)))
    return bytes((0x78, _ZLIB_FLG[level])) + b"".join(body) + struct.pack(">I", zlib.adler32(memoryview(data).cast("B")))


class _PendingPixels:
    """A batch's uint8 pixels ``(B, H, W, 3)`` being copied into pinned host memory, and the CUDA
    event that marks the end of the copy (None: already on the host)."""

    def __init__(self, host: torch.Tensor, event: "torch.cuda.Event | None"):
        self.host, self.event = host, event
        self.ready = time.perf_counter() if event is None else None
        self._lock = threading.Lock()

    def array(self):
        with self._lock:
            if self.ready is None:
                self.event.synchronize()
                self.ready = time.perf_counter()
        return self.host.numpy()


class PendingImage:
    """An image of :meth:`Engine.generate` ``output_type="pending"``: :meth:`result` waits for its
    pixels (the first wait of a batch waits for the copy of the whole batch) and gives the PIL image
    that ``"pil"`` gives; :attr:`ready_at` is when the batch's pixels reached the host
    (``time.perf_counter()``)."""

    __slots__ = ("_batch", "_index")

    def __init__(self, batch: _PendingPixels, index: int):
        self._batch, self._index = batch, index

    def result(self) -> Image.Image:
        return Image.fromarray(self._batch.array()[self._index])

    @property
    def ready_at(self) -> float:
        self._batch.array()
        return self._batch.ready


def to_pending(images: torch.Tensor) -> list[PendingImage]:
    """:func:`to_pil`'s rounding on the device, then an asynchronous copy into pinned memory."""
    pixels = (images.float() * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    if pixels.device.type == "cuda":
        host = torch.empty(pixels.shape, dtype=torch.uint8, pin_memory=True)
        host.copy_(pixels, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(pixels.device))
        batch = _PendingPixels(host, event)
    else:
        batch = _PendingPixels(pixels.cpu(), None)
    return [PendingImage(batch, i) for i in range(pixels.shape[0])]


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """``(B, 3, H, W)`` images in [0, 1] (any float dtype, any device) as RGB PIL images, rounded
    exactly as diffusers' ``numpy_to_pil`` rounds."""
    pixels = (images.float() * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu().numpy()
    return [Image.fromarray(p) for p in pixels]
