"""JSON response bodies that carry base64 images.

A generated image travels from the generator replica to the client as base64 text inside a JSON
body (``b64_json``, A1111's ``images``). The replica hands it over as ``bytes`` (the output of
``base64.b64encode``), and :func:`json_bytes` writes such a value as a JSON string by copying
it into the body once: no ``str`` is made of it and ``json.dumps`` never scans it, which for a
1024² PNG (about 4 MB of base64) is most of the cost of encoding the answer.
"""

from __future__ import annotations

import json
import re
import secrets
import string

from fastapi.responses import Response

__all__ = ["JSONBody", "json_bytes"]

_BASE64 = (string.ascii_letters + string.digits + "+/=").encode()


def json_bytes(obj) -> bytes:
    """``obj`` as compact UTF-8 JSON, encoded as Starlette's ``JSONResponse`` encodes it (no NaN
    or infinity), where every ``bytes`` value is base64 text and becomes a JSON string of those
    characters. Raises ``ValueError`` for a ``bytes`` value that is not base64 text, and
    ``TypeError`` for a value JSON has no form for."""
    blobs: list[bytes] = []
    mark = f"\0{secrets.token_hex(8)}:"  # cannot occur in the rest of the body by chance

    def placeholder(value):
        if isinstance(value, (bytes, bytearray)):
            if value.translate(None, _BASE64):
                raise ValueError("json_bytes: a bytes value holds characters outside the base64 alphabet")
            blobs.append(bytes(value))
            return f"{mark}{len(blobs) - 1}\0"
        raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")

    text = json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"), default=placeholder)
    if not blobs:
        return text.encode("utf-8")
    quoted = re.compile('"' + re.escape(json.dumps(mark)[1:-1]) + r'(\d+)\\u0000"')
    pieces, start = [], 0
    for match in quoted.finditer(text):
        pieces += [text[start:match.start()].encode("utf-8"), b'"', blobs[int(match.group(1))], b'"']
        start = match.end()
    pieces.append(text[start:].encode("utf-8"))
    return b"".join(pieces)


class JSONBody(Response):
    """A JSON response whose content may hold base64 ``bytes`` values (:func:`json_bytes`)."""

    media_type = "application/json"

    def render(self, content) -> bytes:
        return json_bytes(content)
