"""Captions: decode, clean up, insert the trigger word.

This module is also the home of :class:`BadItem`, the one exception every per-item check
raises (images included): it is the lowest layer of ``rayimg.data``, so readers, transforms
and the prepare job can all import it without cycles. ``rayimg.data.transforms`` re-exports it.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Optional, Union

__all__ = ["REASONS", "BadItem", "decode_caption", "clean_caption", "add_trigger"]

#: Why an item was skipped. The prepare report counts items per reason, so these codes are
#: part of its format: add, never rename.
REASONS = (
    "zero_byte",          # the image file is empty
    "corrupt_image",      # the bytes claim or look like an image that cannot be decoded
    "truncated_image",    # the image data ends early
    "unsupported_format", # a recognisable file that is not an image Pillow reads (PDF, HEIC, text...)
    "too_small",          # shorter side below data.min_size
    "missing_caption",    # no caption for the image
    "empty_caption",      # caption empty after cleanup
    "non_utf8_caption",   # caption bytes are not valid UTF-8
    "duplicate",          # same image bytes (sha256) as a row kept earlier, under another name
    "unreadable",         # I/O error reading the image or caption
)
# Reasons of whole input rows, decided by the readers and the prepare job rather than by
# BadItem: see rayimg.data.sources.ROW_REASONS.


class BadItem(Exception):
    """An item that cannot be used. ``reason`` is one of :data:`REASONS` (a short code for
    counting), ``detail`` a human-readable explanation for the report."""

    def __init__(self, reason: str, detail: str = ""):
        if reason not in REASONS:
            raise ValueError(f"unknown BadItem reason {reason!r}; one of {', '.join(REASONS)}")
        # Both go to Exception.__init__ so the exception pickles (Ray ships it between processes).
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}" if self.detail else self.reason


_WHITESPACE = re.compile(r"\s+")


def decode_caption(raw: Union[bytes, bytearray, memoryview, str]) -> str:
    """Caption file bytes -> text. Strict UTF-8 (a leading BOM is accepted and dropped);
    anything else raises ``BadItem("non_utf8_caption")`` instead of guessing an encoding."""
    if isinstance(raw, str):
        return raw[1:] if raw.startswith("\ufeff") else raw
    try:
        return bytes(raw).decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise BadItem("non_utf8_caption", f"invalid UTF-8 at byte {e.start}: {bytes(raw)[e.start:e.start + 4]!r}") from None


def _is_removed(ch: str, keep_whitespace: bool) -> bool:
    if keep_whitespace and ch in "\t\n\r":
        return False
    # Cc: NUL and other C0/C1 controls; U+FEFF: a BOM or zero-width no-break space mid-text.
    return unicodedata.category(ch) == "Cc" or ch == "\ufeff"


def clean_caption(text: str, strip: bool = True) -> str:
    """Remove NUL/control characters; with ``strip`` also collapse whitespace runs into one
    space and strip the ends. Raises ``BadItem("empty_caption")`` when nothing is left."""
    if strip:
        # Controls become spaces first so "a\x00b" does not glue two words together.
        text = "".join(" " if _is_removed(ch, False) else ch for ch in text)
        text = _WHITESPACE.sub(" ", text).strip()
    else:
        text = "".join(ch for ch in text if not _is_removed(ch, True))
    if not text.strip():
        raise BadItem("empty_caption", "caption is empty after cleanup")
    return text


def _trigger_pattern(trigger: str) -> re.Pattern:
    # Lookarounds instead of \b so triggers with punctuation ("<sks>") still match whole words.
    return re.compile(r"(?<!\w)" + re.escape(trigger) + r"(?!\w)", re.IGNORECASE)


def add_trigger(caption: str, trigger: Optional[str]) -> str:
    """Prepend ``"<trigger>, "`` unless the trigger already appears as a whole word.

    The match ignores case because the CLIP tokenizer lowercases text: "SKS" and "sks" are
    the same token to the model."""
    if trigger is None or not trigger.strip():
        return caption
    trigger = trigger.strip()
    if _trigger_pattern(trigger).search(caption):
        return caption
    return f"{trigger}, {caption}"
