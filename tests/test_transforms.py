"""Transforms and bad input: real images made here with PIL (seeded), real broken files."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
from PIL import Image

from rayimg.config import BucketConfig, TransformConfig
from rayimg.data.buckets import make_buckets, pick_bucket
from rayimg.data.captions import add_trigger, clean_caption, decode_caption
from rayimg.data.transforms import (
    REASONS, BadItem, PreparedItem, content_key, decode_image, prepare_image, process_item,
    should_flip, to_rgb,
)

MODEL = "rayimg-tiny-sd"


def encode(img: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def coordinates(width: int, height: int) -> Image.Image:
    """Red channel = x, green = y: a crop's pixels tell where the crop was taken."""
    ys, xs = np.mgrid[0:height, 0:width]
    return Image.fromarray(np.stack([xs, ys, np.zeros_like(xs)], axis=-1).astype(np.uint8))


def thirds(width: int, height: int) -> Image.Image:
    """Left third red, middle green, right third blue."""
    arr = np.zeros((height, width, 3), dtype=np.uint8)
    arr[:, : width // 3, 0] = 255
    arr[:, width // 3: 2 * width // 3, 1] = 255
    arr[:, 2 * width // 3:, 2] = 255
    return Image.fromarray(arr)


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """CHW [-1, 1] -> HWC uint8."""
    return np.rint((pixels.transpose(1, 2, 0) + 1.0) * 127.5).astype(np.uint8)


def reason_of(data: bytes, min_size: int = 8) -> str:
    with pytest.raises(BadItem) as info:
        decode_image(data, min_size=min_size)
    assert info.value.detail
    return info.value.reason


# --------------------------------------------------------------------------- crops, flip, SDXL cond
def test_sdxl_conditioning_for_a_known_image():
    pixels, cond = prepare_image(thirds(300, 200), target=(128, 128), crop="center", flip=False, rng_seed=0)
    assert pixels.shape == (3, 128, 128) and pixels.dtype == np.float32
    assert pixels.min() >= -1.0 and pixels.max() <= 1.0
    # resized to 192x128 (shorter side to 128), center crop starts 32 px in
    assert cond == {"original_size": (200, 300), "crop_top_left": (0, 32), "target_size": (128, 128), "flipped": False}
    rgb = to_uint8(pixels)
    # resized thirds are 64 px wide: crop columns 0-31 red, 32-95 green, 96-127 blue
    assert tuple(rgb[64, 10]) == pytest.approx((255, 0, 0), abs=3)
    assert tuple(rgb[64, 64]) == pytest.approx((0, 255, 0), abs=3)
    assert tuple(rgb[64, 118]) == pytest.approx((0, 0, 255), abs=3)


def test_center_crop_offsets():
    _, cond = prepare_image(coordinates(100, 64), target=(64, 64), crop="center")
    assert cond["crop_top_left"] == (0, 18)  # round((100 - 64) / 2)
    pixels, cond = prepare_image(coordinates(64, 150), target=(64, 64), crop="center")
    assert cond["crop_top_left"] == (43, 0)
    assert to_uint8(pixels)[0, 0, 1] == 43  # green = y of the first row
    # a non-square target from a bucket: (w, h) in, (h, w) out
    _, cond = prepare_image(coordinates(200, 100), target=(96, 64), crop="center")
    assert cond["target_size"] == (64, 96) and cond["original_size"] == (100, 200)
    assert cond["crop_top_left"] == (0, 16)  # resized to 128x64


def test_random_crop_is_reproducible_per_seed():
    img = coordinates(250, 64)  # no resize needed; left can be 0..186
    p0, c0 = prepare_image(img, target=(64, 64), crop="random", rng_seed=0)
    p0_again, c0_again = prepare_image(img, target=(64, 64), crop="random", rng_seed=0)
    p1, c1 = prepare_image(img, target=(64, 64), crop="random", rng_seed=1)
    assert c0 == c0_again and np.array_equal(p0, p0_again)
    assert c0["crop_top_left"] != c1["crop_top_left"] and not np.array_equal(p0, p1)
    for pixels, cond in ((p0, c0), (p1, c1)):
        top, left = cond["crop_top_left"]
        assert top == 0 and 0 <= left <= 250 - 64
        assert to_uint8(pixels)[0, 0, 0] == left  # the crop really starts at the recorded offset
    lefts = {prepare_image(img, target=(64, 64), crop="random", rng_seed=s)[1]["crop_top_left"][1] for s in range(20)}
    assert len(lefts) > 10


def test_flip_mirrors_pixels_and_crop_offset():
    img = coordinates(250, 80)
    plain, c_plain = prepare_image(img, target=(64, 64), crop="random", flip=False, rng_seed=5)
    flipped, c_flip = prepare_image(img, target=(64, 64), crop="random", flip=True, rng_seed=5)
    assert np.array_equal(flipped, plain[:, :, ::-1])
    top, left = c_plain["crop_top_left"]
    resized_width = 200  # 250x80 -> 200x64
    assert c_flip["crop_top_left"] == (top, resized_width - left - 64)
    assert c_flip["flipped"] is True and c_plain["flipped"] is False
    assert c_flip["original_size"] == c_plain["original_size"] == (80, 250)


def test_flip_of_center_crop_on_thirds():
    pixels, cond = prepare_image(thirds(300, 200), target=(128, 128), crop="center", flip=True)
    rgb = to_uint8(pixels)
    assert tuple(rgb[64, 10]) == pytest.approx((0, 0, 255), abs=3)
    assert tuple(rgb[64, 118]) == pytest.approx((255, 0, 0), abs=3)
    assert cond["crop_top_left"] == (0, 192 - 32 - 128)


def test_prepare_rejects_unknown_crop():
    with pytest.raises(ValueError, match="crop"):
        prepare_image(noise(64, 64), target=(64, 64), crop="top")


# --------------------------------------------------------------------------- decode: orientation and RGB
def test_exif_orientation_is_applied():
    arr = np.zeros((40, 80, 3), dtype=np.uint8)
    arr[:, :40] = (255, 0, 0)  # left half red as stored
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    decoded = decode_image(encode(img, "JPEG", exif=exif, quality=95), min_size=8)
    assert decoded.size == (40, 80) and decoded.mode == "RGB"
    top = np.asarray(decoded)[5, 20]
    bottom = np.asarray(decoded)[75, 20]
    assert top[0] > 200 and top[1] < 60  # the stored left half is now on top
    assert bottom[0] < 60
    assert decode_image(encode(img, "JPEG"), min_size=8).size == (80, 40)


def test_rgba_is_composited_on_white():
    arr = np.zeros((16, 16, 4), dtype=np.uint8)
    arr[:, :8] = (255, 0, 0, 255)   # opaque red
    arr[:, 8:12] = (0, 0, 0, 0)     # fully transparent (black underneath)
    arr[:, 12:] = (0, 0, 0, 128)    # half-transparent black
    decoded = np.asarray(decode_image(encode(Image.fromarray(arr, "RGBA")), min_size=8))
    assert tuple(decoded[0, 0]) == (255, 0, 0)
    assert tuple(decoded[0, 9]) == (255, 255, 255)
    assert all(abs(int(v) - 127) <= 2 for v in decoded[0, 13])


def test_la_and_palette_with_transparency_are_composited_on_white():
    la = Image.fromarray(np.array([[[0, 0], [0, 255]]] * 2, dtype=np.uint8).repeat(8, 0).repeat(8, 1), "LA")
    decoded = np.asarray(decode_image(encode(la), min_size=8))
    assert tuple(decoded[0, 0]) == (255, 255, 255) and tuple(decoded[0, 15]) == (0, 0, 0)

    pal = Image.new("P", (16, 16), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.paste(1, (8, 0, 16, 16))
    decoded = np.asarray(decode_image(encode(pal, transparency=0), min_size=8))
    assert tuple(decoded[0, 0]) == (255, 255, 255)  # index 0 is transparent
    assert tuple(decoded[0, 12]) == (255, 0, 0)


def test_palette_gray_bilevel_and_cmyk_convert_to_rgb():
    pal = Image.new("P", (16, 16), 2)
    pal.putpalette([0, 0, 0, 10, 20, 30, 200, 100, 50] + [0] * 759)
    assert tuple(np.asarray(decode_image(encode(pal), min_size=8))[3, 3]) == (200, 100, 50)

    gray = Image.new("L", (16, 16), 77)
    assert tuple(np.asarray(decode_image(encode(gray), min_size=8))[3, 3]) == (77, 77, 77)

    bilevel = Image.new("1", (16, 16), 0)
    bilevel.paste(1, (8, 0, 16, 16))
    decoded = np.asarray(decode_image(encode(bilevel), min_size=8))
    assert tuple(decoded[0, 0]) == (0, 0, 0) and tuple(decoded[0, 15]) == (255, 255, 255)

    cmyk = Image.new("CMYK", (16, 16), (255, 0, 0, 0))  # pure cyan
    decoded = decode_image(encode(cmyk, "TIFF"), min_size=8)
    assert decoded.mode == "RGB" and tuple(np.asarray(decoded)[3, 3]) == (0, 255, 255)
    jpeg = np.asarray(decode_image(encode(Image.new("CMYK", (16, 16), (0, 0, 0, 0)), "JPEG"), min_size=8))
    assert jpeg.min() > 240  # no ink = white


def _assert_full_range_gradient(row: np.ndarray):
    assert (np.diff(row.astype(int)) >= 0).all()
    assert row[0] == 0 and row[-1] == 255
    assert len(np.unique(row)) > 200  # still a gradient, not clipped to a step


def test_16_bit_gradient_stays_a_gradient():
    ramp = np.tile(np.linspace(0, 65535, 256).round().astype(np.uint16), (8, 1))
    png = Image.fromarray(ramp)
    assert png.mode == "I;16"
    decoded = np.asarray(decode_image(encode(png), min_size=8))
    _assert_full_range_gradient(decoded[0, :, 0])
    assert (decoded[..., 0] == decoded[..., 2]).all()
    big_endian = Image.fromarray(ramp.astype(">u2"))
    assert big_endian.mode == "I;16B"
    _assert_full_range_gradient(np.asarray(to_rgb(big_endian))[0, :, 1])
    _assert_full_range_gradient(np.asarray(to_rgb(Image.fromarray(ramp.astype(np.int32))))[0, :, 0])  # mode I
    floats = Image.fromarray(np.tile(np.linspace(0, 1, 256, dtype=np.float32), (8, 1)))
    _assert_full_range_gradient(np.asarray(to_rgb(floats))[0, :, 0])  # mode F


# --------------------------------------------------------------------------- bad input
def test_reasons_are_the_documented_codes():
    assert REASONS == (
        "zero_byte", "corrupt_image", "truncated_image", "unsupported_format", "too_small",
        "missing_caption", "empty_caption", "non_utf8_caption", "duplicate", "unreadable",
    )
    with pytest.raises(ValueError, match="reason"):
        BadItem("broken")
    err = pickle.loads(pickle.dumps(BadItem("duplicate", "same as a.png")))
    assert (err.reason, err.detail, str(err)) == ("duplicate", "same as a.png", "duplicate: same as a.png")


def test_zero_byte_and_random_bytes():
    assert reason_of(b"") == "zero_byte"
    rng = np.random.default_rng(1234)
    assert reason_of(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()) == "corrupt_image"
    assert reason_of(b"\x89PNG\r\n\x1a\n" + rng.integers(0, 256, 512, dtype=np.uint8).tobytes() + b"IEND\xaeB`\x82") == "corrupt_image"


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF"])
def test_truncated_files(fmt):
    data = encode(noise(96, 80, seed=3), fmt)
    assert decode_image(data, min_size=8).size == (96, 80)
    assert reason_of(data[: len(data) // 2]) == "truncated_image"


def test_damaged_image_data_is_corrupt():
    data = bytearray(encode(noise(96, 80, seed=4), "PNG"))
    start = data.find(b"IDAT") + 40
    data[start:start + 64] = bytes(64)  # wreck the compressed stream, keep the length
    assert reason_of(bytes(data)) == "corrupt_image"


@pytest.mark.parametrize("data,kind", [
    (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog >>\nendobj\n", "PDF"),
    (b"a photo of a cat on a mat\n", "text"),
    (b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', "SVG"),
    (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64), "HEIC"),
])
def test_unsupported_formats(data, kind):
    with pytest.raises(BadItem) as info:
        decode_image(data, min_size=8)
    assert info.value.reason == "unsupported_format" and kind in info.value.detail


def test_too_small():
    assert reason_of(encode(noise(16, 16)), min_size=64) == "too_small"
    assert reason_of(encode(noise(300, 40)), min_size=64) == "too_small"
    assert decode_image(encode(noise(64, 300)), min_size=64).size == (64, 300)


def test_decompression_bomb_is_rejected(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(BadItem) as info:
        decode_image(encode(noise(100, 100)), min_size=8)
    assert info.value.reason == "corrupt_image" and "decompression bomb" in info.value.detail


def test_bad_captions():
    png = encode(noise(80, 80))
    cfg = TransformConfig(resolution=64)
    for caption, reason in [(None, "missing_caption"), ("  \n\t ", "empty_caption"), (b"\x00 \x07", "empty_caption"),
                            (b"caf\xe9 au lait", "non_utf8_caption"), (b"\xff\xfea\x00", "non_utf8_caption")]:
        with pytest.raises(BadItem) as info:
            process_item(png, caption, cfg=cfg, min_size=8, model_id=MODEL)
        assert info.value.reason == reason, caption


# --------------------------------------------------------------------------- captions
def test_caption_cleanup():
    assert clean_caption("  a\tcat \n\n on\x00a   mat \x07 ") == "a cat on a mat"
    assert clean_caption("line one\nline\x00 two ", strip=False) == "line one\nline two "
    assert decode_caption("\ufeffa cat".encode("utf-8")) == "a cat"
    assert decode_caption("ünïcödé 猫".encode("utf-8")) == "ünïcödé 猫"
    with pytest.raises(BadItem):
        clean_caption("\u00a0\u2003")  # unicode spaces only


def test_trigger_insertion():
    assert add_trigger("a photo of a dog", "sks") == "sks, a photo of a dog"
    assert add_trigger("a photo of sks dog", "sks") == "a photo of sks dog"
    assert add_trigger("SKS, a dog", "sks") == "SKS, a dog"
    assert add_trigger("a photo of sksdog", "sks") == "sks, a photo of sksdog"
    assert add_trigger("a <tok> toy", "<tok>") == "a <tok> toy"
    assert add_trigger("a toy", None) == add_trigger("a toy", "  ") == "a toy"


# --------------------------------------------------------------------------- keys and flips
def test_content_key_changes_with_every_component():
    base = dict(image_bytes=b"img", caption="a cat", model_id=MODEL, bucket=(512, 512), crop="center", flip=False, extra="")
    key = content_key(**base)
    assert len(key) == 64 and key == content_key(**base)
    changes = dict(image_bytes=b"img2", caption="a dog", model_id="other", bucket=(576, 448), crop="random", flip=True, extra="v2")
    keys = {key}
    for name, value in changes.items():
        keys.add(content_key(**{**base, name: value}))
    assert len(keys) == 1 + len(changes)
    # no ambiguity at the boundaries between fields
    assert content_key(b"img", "a", "bc", (1, 23), "center", False) != content_key(b"img", "ab", "c", (12, 3), "center", False)


def test_should_flip_is_deterministic_and_about_half():
    materials = [f"{i:064x}" for i in range(400)]
    decisions = [should_flip(m, True) for m in materials]
    assert decisions == [should_flip(m, True) for m in materials]
    assert 150 < sum(decisions) < 250
    assert not any(should_flip(m, False) for m in materials)
    assert should_flip(b"raw bytes", True) == should_flip(b"raw bytes", True)


# --------------------------------------------------------------------------- process_item
def test_process_item_square():
    png = encode(thirds(300, 200))
    item = process_item(png, b"  a red, green\nand blue flag ", cfg=TransformConfig(resolution=128, trigger_word="zwx"),
                        min_size=64, model_id=MODEL)
    assert isinstance(item, PreparedItem)
    assert item.caption == "zwx, a red, green and blue flag"
    assert (item.width, item.height) == (128, 128) and item.pixels.shape == (3, 128, 128)
    assert item.original_size == (200, 300) and item.crop_top_left == (0, 32) and item.target_size == (128, 128)
    assert item.flipped is False
    assert item.key == content_key(png, item.caption, MODEL, (128, 128), "center", False)
    assert len(item.image_sha256) == 64


def test_process_item_buckets_random_crop_and_flip_are_deterministic():
    cfg = TransformConfig(resolution=128, crop="random", random_flip=True,
                          buckets=BucketConfig(enabled=True, min_side=64, max_side=256, step=32))
    buckets = make_buckets(cfg.buckets, cfg.resolution)
    images = [encode(noise(150 + 7 * i, 100, seed=i)) for i in range(12)]
    first = [process_item(data, "a thing", cfg=cfg, min_size=64, model_id=MODEL, buckets=buckets) for data in images]
    again = [process_item(data, "a thing", cfg=cfg, min_size=64, model_id=MODEL) for data in images]
    for a, b, data in zip(first, again, images):
        assert a.key == b.key and a.crop_top_left == b.crop_top_left and a.flipped == b.flipped
        assert np.array_equal(a.pixels, b.pixels)
        assert (a.width, a.height) == pick_bucket(*Image.open(io.BytesIO(data)).size, buckets)
        assert a.pixels.shape == (3, a.height, a.width) and a.target_size == (a.height, a.width)
    assert (first[0].width, first[0].height) == (160, 96)  # 150x100 (1.5:1) -> the 5:3 bucket
    assert any(item.flipped for item in first) and not all(item.flipped for item in first)
    assert len({item.key for item in first}) == len(first)
    # buckets off: the square resolution, whatever the aspect
    square = process_item(images[0], "a thing", cfg=TransformConfig(resolution=128), min_size=64, model_id=MODEL)
    assert (square.width, square.height) == (128, 128)
    assert square.key != first[0].key
