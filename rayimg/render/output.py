"""Output keys and image files (the same key means the same image), and the pixels of a finished
pipeline call as PIL images, now or once their copy to the host is done."""

from __future__ import annotations

import hashlib
import io
import json
import threading
import time

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


def png_bytes(image: Image.Image, metadata: dict, compress_level: int = 6) -> bytes:
    """Encode ``image`` as PNG with ``metadata`` in text chunks (parameters as JSON), at zlib
    ``compress_level`` (PIL's default 6).

    Encoding is deterministic: the same pixels, metadata and level give the same bytes.
    """
    info = PngImagePlugin.PngInfo()
    for key, value in metadata.items():
        info.add_text(key, value if isinstance(value, str) else json.dumps(value, sort_keys=True))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info, optimize=False, compress_level=compress_level)
    return buf.getvalue()


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
