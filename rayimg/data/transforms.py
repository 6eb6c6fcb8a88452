"""Per-item preprocessing: bytes in, a training-ready item (or a :class:`BadItem`) out.

The prepare pipeline calls :func:`process_item` once per (image, caption) pair. It reads
top to bottom: caption (decode, clean, trigger word), image (decode, EXIF orientation, RGB),
target size (bucket or square), flip decision, resize + crop + flip, content key.

Everything random is derived from the image's own bytes (crop offsets, flip), so an item
prepares identically on every run and every worker, and its content key names it exactly.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from rayimg.config import TransformConfig
from rayimg.data.buckets import make_buckets, target_size
from rayimg.data.captions import REASONS, BadItem, add_trigger, clean_caption, decode_caption

__all__ = [
    "REASONS", "BadItem", "PreparedItem", "decode_image", "to_rgb", "prepare_image",
    "content_key", "should_flip", "process_item", "CROPS",
]

CROPS = ("center", "random")
KEY_VERSION = "rayimg-item-v1"  # bump when the transform's output changes for the same inputs

Size = tuple[int, int]  # (width, height)


# --------------------------------------------------------------------------- decode
def decode_image(data: bytes, *, min_size: int) -> Image.Image:
    """Image file bytes -> an RGB PIL image, upright per its EXIF orientation.

    Raises :class:`BadItem` with reason ``zero_byte``, ``unsupported_format``,
    ``corrupt_image``, ``truncated_image`` or ``too_small`` (shorter side < ``min_size``).
    Pillow's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``) stays in force and
    truncated files are never silently padded (``LOAD_TRUNCATED_IMAGES`` is left off).
    """
    if not data:
        raise BadItem("zero_byte", "the file is empty (0 bytes)")
    data = bytes(data)
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise BadItem("corrupt_image", f"rejected as a decompression bomb: {e}") from None
    except UnidentifiedImageError:
        kind = _sniff_non_image(data)
        if kind is not None:
            raise BadItem("unsupported_format", f"{kind}, not an image format Pillow reads") from None
        image_format = _image_signature(data)
        if image_format is None:
            raise BadItem("corrupt_image", f"not a recognisable image (starts with {data[:8]!r})") from None
        raise _decode_failure(data, image_format, "header", None) from None
    except Exception as e:  # Pillow plugins raise SyntaxError, ValueError, struct.error... on bad headers
        raise _decode_failure(data, _image_signature(data) or "image", "header", e) from None

    width, height = img.size  # the shorter side does not change with EXIF rotation
    if min(width, height) < min_size:
        raise BadItem("too_small", f"{width}x{height}: shorter side {min(width, height)} < min_size {min_size}")

    image_format = img.format or "image"
    try:
        img.load()
    except Image.DecompressionBombError as e:
        raise BadItem("corrupt_image", f"rejected as a decompression bomb: {e}") from None
    except Exception as e:
        raise _decode_failure(data, image_format, "data", e) from None

    try:
        img = ImageOps.exif_transpose(img)
    except Exception as e:
        raise BadItem("corrupt_image", f"cannot apply the EXIF orientation: {type(e).__name__}: {e}") from None
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB. Transparency is composited on white (the usual backdrop of
    product shots and drawings; black would turn transparent line art into a black square).
    16/32-bit and float images are scaled to 8 bits, not clipped."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I") or mode == "F":
        return _high_bit_depth_to_rgb(img)
    if mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    try:
        return img.convert("RGB")  # P, L, 1, CMYK, YCbCr, RGBX, ...
    except ValueError as e:
        raise BadItem("unsupported_format", f"image mode {mode} cannot be converted to RGB: {e}") from None


def _high_bit_depth_to_rgb(img: Image.Image) -> Image.Image:
    # Pillow's own convert("L") clips I;16 at 255, which turns a 16-bit gradient white.
    values = np.asarray(img)
    if img.mode.startswith("I;16"):
        scaled = values.astype(np.float32) / 257.0  # 65535 -> 255 exactly
    else:
        values = np.nan_to_num(values.astype(np.float64))
        lo, hi = float(values.min()), float(values.max())
        if img.mode == "I" and lo >= 0 and hi <= 65535:
            scaled = values / 257.0  # 16-bit data opened as 32-bit ints (PNG, TIFF)
        elif img.mode == "F" and lo >= 0 and hi <= 1:
            scaled = values * 255.0
        else:  # arbitrary range: stretch to 0..255
            scaled = (values - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(values)
    gray = Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")
    return gray.convert("RGB")


def _decode_failure(data: bytes, image_format: str, part: str, error: Optional[Exception]) -> BadItem:
    """Classify a failed decode of a file that claims to be ``image_format``."""
    message = f" ({type(error).__name__}: {error})" if error is not None else ""
    # Pillow says "image file is truncated" / "Truncated File Read"; some decoders (WebP) only
    # fail, so the file's own length fields and end markers are checked too.
    if "truncated" in str(error).lower() or _looks_truncated(data, image_format):
        return BadItem("truncated_image", f"{image_format} file ends early, in its {part} ({len(data)} bytes){message}")
    return BadItem("corrupt_image", f"{image_format} {part} cannot be decoded{message}")


_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs", b"mif1", b"msf1"}


def _sniff_non_image(data: bytes) -> Optional[str]:
    """Name a recognisable file that is not an image Pillow reads; None for unknown bytes."""
    head = data[:32]
    if head.startswith(b"%PDF-"):
        return "PDF document"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in _HEIF_BRANDS:
            return "HEIC/HEIF image (needs the pillow-heif plugin)"
        if brand in (b"avif", b"avis"):
            return "AVIF image (this Pillow build cannot decode it)"
        return f"ISO media file (brand {brand.decode('latin-1')!r}; video or audio)"
    if head.startswith(b"\xff\x0a") or head.startswith(b"\x00\x00\x00\x0cJXL \r\n\x87\n"):
        return "JPEG XL image"
    for magic, kind in (
        (b"PK\x03\x04", "ZIP archive"), (b"\x1f\x8b", "gzip archive"), (b"Rar!\x1a\x07", "RAR archive"),
        (b"7z\xbc\xaf\x27\x1c", "7z archive"), (b"OggS", "Ogg media"), (b"ID3", "MP3 audio"),
        (b"fLaC", "FLAC audio"), (b"\x1aE\xdf\xa3", "Matroska/WebM video"),
    ):
        if head.startswith(magic):
            return kind
    if head.startswith(b"RIFF") and head[8:12] != b"WEBP":
        return f"RIFF container ({head[8:12].decode('latin-1')!r}; video or audio)"
    text = _as_text(data[:4096], whole=len(data) <= 4096)
    if text is not None:
        lowered = text.lower()
        if "<svg" in lowered:
            return "SVG (vector) image"
        if "<html" in lowered or "<!doctype html" in lowered:
            return "HTML document"
        return "text file"
    return None


def _as_text(chunk: bytes, whole: bool) -> Optional[str]:
    if b"\x00" in chunk:
        return None
    try:
        text = chunk.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        if whole or e.start < len(chunk) - 3:  # only a character cut at the chunk's end is forgiven
            return None
        text = chunk[:e.start].decode("utf-8-sig")
    if not text:
        return None
    printable = sum(ch.isprintable() or ch in "\t\n\r\f" for ch in text)
    return text if printable / len(text) >= 0.95 else None


def _image_signature(data: bytes) -> Optional[str]:
    for magic, name in (
        (b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
        (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"BM", "BMP"),
    ):
        if data.startswith(magic):
            return name
    if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def _looks_truncated(data: bytes, image_format: str) -> bool:
    """After a decode failure: does the file end before its format says it should?"""
    if image_format == "WEBP" and len(data) >= 8:
        return int.from_bytes(data[4:8], "little") + 8 > len(data)  # RIFF declares its length
    if image_format == "PNG":
        return b"IEND" not in data[-64:]
    if image_format in ("JPEG", "MPO"):
        return b"\xff\xd9" not in data
    if image_format == "GIF":
        return not data.rstrip(b"\x00").endswith(b";")
    return False


# --------------------------------------------------------------------------- resize, crop, flip
def prepare_image(
    img: Image.Image, *, target: Size, crop: str = "center", flip: bool = False, rng_seed: int = 0
) -> tuple[np.ndarray, dict]:
    """Resize ``img`` to cover ``target`` = (width, height), crop to it, optionally mirror it.

    Returns ``(pixels, cond)``: pixels are float32 CHW in [-1, 1]; ``cond`` holds SDXL
    micro-conditioning as diffusers' ``train_text_to_image_sdxl.py`` records it, all as
    (height, width)-ordered pairs -- ``original_size`` before resizing, ``crop_top_left`` in
    the resized (and, when flipped, mirrored) image, ``target_size`` -- plus ``flipped``.
    Random crops draw their offsets from ``random.Random(rng_seed)``.
    """
    if crop not in CROPS:
        raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")
    target_width, target_height = target
    if target_width <= 0 or target_height <= 0:
        raise ValueError(f"target size must be positive, got {target_width}x{target_height}")
    img = to_rgb(img)
    width, height = img.size

    scale = max(target_width / width, target_height / height)
    resized_width = max(target_width, round(width * scale))
    resized_height = max(target_height, round(height * scale))
    if (resized_width, resized_height) != (width, height):
        img = img.resize((resized_width, resized_height), Image.Resampling.LANCZOS, reducing_gap=3.0)

    if crop == "center":
        top = max(0, int(round((resized_height - target_height) / 2.0)))
        left = max(0, int(round((resized_width - target_width) / 2.0)))
    else:
        rng = random.Random(rng_seed)
        top = rng.randint(0, resized_height - target_height)
        left = rng.randint(0, resized_width - target_width)
    img = img.crop((left, top, left + target_width, top + target_height))

    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        # The crop's position in the mirrored image, as diffusers records it when flipping.
        left = resized_width - left - target_width

    pixels = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0
    cond = {
        "original_size": (height, width),
        "crop_top_left": (top, left),
        "target_size": (target_height, target_width),
        "flipped": bool(flip),
    }
    return np.ascontiguousarray(pixels), cond


# --------------------------------------------------------------------------- keys
def _sha256(data: Union[bytes, str]) -> str:
    return hashlib.sha256(data.encode("utf-8") if isinstance(data, str) else bytes(data)).hexdigest()


def should_flip(key_material: Union[bytes, str], random_flip: bool) -> bool:
    """Whether to mirror this item: about half of all items when ``random_flip`` is on,
    decided by a hash of ``key_material`` (the image bytes or their sha256), so the answer is
    the same on every run and every worker."""
    if not random_flip:
        return False
    material = key_material.encode("utf-8") if isinstance(key_material, str) else bytes(key_material)
    return hashlib.sha256(b"rayimg-flip\x00" + material).digest()[0] & 1 == 1


def _key(image_sha256: str, caption: str, model_id: str, bucket: Size, crop: str, flip: bool, extra: str) -> str:
    if crop not in CROPS:
        raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")
    # JSON quotes and escapes every string, so no two different tuples encode the same.
    fields = [KEY_VERSION, image_sha256, caption, model_id, [int(bucket[0]), int(bucket[1])], crop, bool(flip), extra]
    encoded = json.dumps(fields, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(encoded).hexdigest()


def content_key(
    image_bytes: bytes, caption: str, model_id: str, bucket: Size, crop: str, flip: bool, extra: str = ""
) -> str:
    """The item's cache key: sha256 hex over the image bytes, final caption, model id,
    target (width, height), crop mode, flip and ``extra``. A re-run finds the same key for
    the same item and skips it; change any input and the key changes."""
    return _key(_sha256(image_bytes), caption, model_id, bucket, crop, flip, extra)


# --------------------------------------------------------------------------- one item
@dataclass
class PreparedItem:
    """One training-ready item. Sizes are (width, height) for ``width``/``height`` and
    (height, width) pairs for the SDXL conditioning fields, as diffusers stores them."""

    key: str                        # content key (cache id)
    caption: str                    # cleaned caption, trigger word included
    pixels: np.ndarray              # float32 CHW in [-1, 1]
    width: int                      # target width
    height: int                     # target height
    original_size: tuple[int, int]  # (height, width) before resizing, after EXIF rotation
    crop_top_left: tuple[int, int]  # (top, left) in the resized image
    target_size: tuple[int, int]    # (height, width)
    flipped: bool
    image_sha256: str               # of the raw image bytes (duplicate detection)


def process_item(
    image_bytes: bytes,
    caption_raw: Union[bytes, str, None],
    *,
    cfg: TransformConfig,
    min_size: int,
    model_id: str,
    buckets: Optional[Sequence[Size]] = None,
) -> PreparedItem:
    """Turn one (image bytes, caption) pair into a :class:`PreparedItem` or raise
    :class:`BadItem`. ``buckets`` are used when ``cfg.buckets.enabled`` (computed from
    ``cfg`` when not given; pass them in to compute them once per worker)."""
    if caption_raw is None:
        raise BadItem("missing_caption", "no caption for this image")
    caption = clean_caption(decode_caption(caption_raw), strip=cfg.strip_caption)
    caption = add_trigger(caption, cfg.trigger_word)

    img = decode_image(image_bytes, min_size=min_size)
    image_sha256 = _sha256(image_bytes)

    if cfg.buckets.enabled and buckets is None:
        buckets = make_buckets(cfg.buckets, cfg.resolution)
    width, height = target_size(img.width, img.height, cfg.resolution, buckets if cfg.buckets.enabled else None)
    flip = should_flip(image_sha256, cfg.random_flip)
    pixels, cond = prepare_image(
        img, target=(width, height), crop=cfg.crop, flip=flip, rng_seed=int(image_sha256[:16], 16)
    )
    return PreparedItem(
        key=_key(image_sha256, caption, model_id, (width, height), cfg.crop, flip, ""),
        caption=caption,
        pixels=pixels,
        width=width,
        height=height,
        original_size=cond["original_size"],
        crop_top_left=cond["crop_top_left"],
        target_size=cond["target_size"],
        flipped=flip,
        image_sha256=image_sha256,
    )
