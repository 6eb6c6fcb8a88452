"""Rendered images stored by output key: ``<uri>/<key>.png``. The same key means the same image,
so a request whose key was rendered before is answered from storage."""

from __future__ import annotations

from rayimg.storage import Storage, join


class ImageStore:
    def __init__(self, storage: Storage, uri: str):
        self.storage = storage
        self.uri = uri

    def uri_of(self, key: str) -> str:
        if not (len(key) == 64 and all(c in "0123456789abcdef" for c in key)):
            raise ValueError(f"not an output key: {key!r}")
        return join(self.uri, f"{key}.png")

    def get(self, key: str) -> bytes | None:
        try:
            return self.storage.read_bytes(self.uri_of(key))
        except FileNotFoundError:
            return None

    def put(self, key: str, png: bytes) -> str:
        """Write (atomically) and return the image's URI."""
        uri = self.uri_of(key)
        self.storage.write_bytes(uri, png)
        return uri
