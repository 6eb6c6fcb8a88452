"""Rendered images stored by output key: ``<uri>/<key>.png``. The same key means the same image,
so a request whose key was rendered before is answered from storage.

A stored file is served only if it decodes as a PNG whose ``rayimg:key`` text (written by the
server and the render job) is its own key: a truncated, replaced or foreign file is ignored
(logged, counted in :attr:`ImageStore.rejected`) and the image is rendered again."""

from __future__ import annotations

import io
import logging
import re

from rayimg.storage import Storage, join

logger = logging.getLogger("ray.serve")

KEY_RE = re.compile(r"^[0-9a-f]{64}$")


def is_key(key: str) -> bool:
    return bool(KEY_RE.match(key))


class ImageStore:
    def __init__(self, storage: Storage, uri: str):
        self.storage = storage
        self.uri = uri
        self.rejected = 0

    def uri_of(self, key: str) -> str:
        if not is_key(key):
            raise ValueError(f"not an output key: {key!r}")
        return join(self.uri, f"{key}.png")

    def get(self, key: str) -> bytes | None:
        """The stored PNG of ``key`` once checked, or None (absent, or failing the check)."""
        uri = self.uri_of(key)
        try:
            png = self.storage.read_bytes(uri)
        except FileNotFoundError:
            return None
        problem = png_problem(png, key)
        if problem is not None:
            self.rejected += 1
            logger.warning("rayimg: ignoring the cached image %s: %s", uri, problem)
            return None
        return png

    def put(self, key: str, png: bytes) -> str:
        """Write (atomically) and return the image's URI."""
        uri = self.uri_of(key)
        self.storage.write_bytes(uri, png)
        return uri


def png_problem(png: bytes, key: str) -> str | None:
    """Why ``png`` is not the image of ``key`` (None: it is): it must decode completely as a PNG
    and carry ``rayimg:key`` = ``key``."""
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(png))
        if image.format != "PNG":
            return f"not a PNG ({image.format})"
        image.load()
    except Exception as e:  # PIL raises many types for damaged files
        return f"does not decode ({type(e).__name__}: {e})"
    recorded = getattr(image, "text", {}).get("rayimg:key")
    if recorded != key:
        return f"its rayimg:key is {recorded!r}, not its name"
    return None
