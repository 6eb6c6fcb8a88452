"""Output keys and image files: the same key means the same image."""

from __future__ import annotations

import hashlib
import io
import json

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
