"""Request bodies of the HTTP API and their checks against the configured limits.

The pydantic models check types and ranges (FastAPI answers 422 naming the field); then
:func:`settings_for` fills defaults from the job's ``defaults``, checks ``limits`` (422 naming the
field) and sets seeds (given; -1: random; omitted: derived from the request). Adapter names and versions must match the registry pattern, so no
request can name a path outside the registry.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import secrets
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from rayimg.config import ADAPTER_NAME_RE, SCHEDULERS, GenerationConfig, LimitsConfig
from serving.errors import ApiError

MAX_ADAPTERS = 8
NAME_PATTERN = ADAPTER_NAME_RE.pattern


class AdapterSpec(BaseModel):
    """One LoRA adapter to apply."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN, description=f"adapter name in the registry ({NAME_PATTERN})")
    version: Optional[Union[str, int]] = Field(None, description="registry version; default the latest (re-resolved every adapter_cache.refresh_s)")
    scale: float = Field(1.0, ge=-4.0, le=4.0, allow_inf_nan=False, description="LoRA scale")

    @field_validator("version")
    @classmethod
    def _version(cls, v):
        if v is None:
            return None
        v = str(v)
        if not ADAPTER_NAME_RE.match(v):
            raise ValueError(f"must match {NAME_PATTERN}")
        return v


class GenerateBody(BaseModel):
    """POST /v1/generate. Unset fields take the server's configured defaults."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=4000, description="the prompt")
    negative_prompt: Optional[str] = Field(None, max_length=4000, description="negative prompt")
    steps: Optional[int] = Field(None, ge=1, description="sampling steps (at most limits.max_steps)")
    guidance: Optional[float] = Field(None, ge=0.0, le=50.0, allow_inf_nan=False, description="classifier-free guidance scale")
    width: Optional[int] = Field(None, ge=8, multiple_of=8, description="image width, a multiple of 8 (at most limits.max_width)")
    height: Optional[int] = Field(None, ge=8, multiple_of=8, description="image height, a multiple of 8 (at most limits.max_height)")
    seed: Optional[int] = Field(None, ge=-1, lt=2**63, description="seed of the first image (image i uses seed + i). -1: a random seed "
                                "(the one used is in the answer). Omitted: derived from the request's own settings, so the same "
                                "request gives the same images (and is answered from the image cache when enabled)")
    scheduler: Optional[Literal[SCHEDULERS]] = Field(None, description="sampler")
    adapters: list[AdapterSpec] = Field(default_factory=list, max_length=MAX_ADAPTERS, description="LoRA adapters with scales")
    num_images: int = Field(1, ge=1, description="images to generate (at most limits.max_num_images)")
    response_format: Literal["b64_json", "uri"] = Field("b64_json", description="base64 PNGs inline, or storage URIs (written under image_cache.uri)")
    timeout_s: Optional[float] = Field(None, gt=0, allow_inf_nan=False, description="give up after this many seconds (504); at most http.request_timeout_s")

    @field_validator("adapters")
    @classmethod
    def _unique(cls, adapters):
        names = [a.name for a in adapters]
        if len(set(names)) != len(names):
            raise ValueError(f"an adapter is listed twice: {names}")
        return adapters


class Img2ImgBody(GenerateBody):
    """POST /v1/img2img: ``init_image`` is a base64 PNG/JPEG/WebP (a ``data:`` URL is fine).
    ``width``/``height`` default to the image's size; when given, the image is resized to them."""

    init_image: str = Field(min_length=1, description="base64-encoded PNG, JPEG or WebP image (line breaks and a data: URL prefix "
                            "are accepted); at most limits.max_init_image_pixels pixels, checked from its header before decoding")
    strength: float = Field(0.8, gt=0.0, le=1.0, description="how far from the init image (1 ignores it); img2img runs "
                            "int(steps x strength) denoising steps, which must be at least 1")


class GeneratedImage(BaseModel):
    key: str = Field(description="output key: sha256 of the model, adapters and every setting (the same key, the same image)")
    seed: int = Field(description="the seed this image used")
    cached: bool = Field(description="answered from the image cache")
    b64_json: Optional[str] = Field(None, description="base64 PNG (response_format b64_json)")
    uri: Optional[str] = Field(None, description="storage URI of the PNG (response_format uri)")


class ResolvedAdapter(BaseModel):
    name: str
    version: str
    scale: float


class GenerateResponse(BaseModel):
    """The answer of /v1/generate and /v1/img2img."""

    images: list[GeneratedImage]
    adapters: list[ResolvedAdapter] = Field(description="the adapters applied, versions resolved")
    model: str = Field(description="the base model's id")
    replica: str = Field(description="the generator replica that answered")
    timings: dict = Field(description="seconds spent: adapter loading, swaps, the engine; batch sizes; for images through the step loop, "
                          "`images`: each one's queue_s, denoise_s, decode_s (and gpu_denoise_s, gpu_decode_s on a GPU) and png_s")
    warnings: Optional[list[str]] = Field(None, description="e.g. an adapter trained on another base model of the same family")


def _limit(field: str, value: int, maximum: int) -> None:
    if value > maximum:
        raise ApiError(422, "limit_exceeded", f"{field} {value} is above the maximum {maximum}", field=field)


def decode_base64(data: str, field: str) -> bytes:
    """The bytes of a base64 string: a ``data:`` URL prefix and whitespace (line breaks, as
    ``base64`` tools wrap at 76 columns) are accepted; anything else outside the alphabet is not."""
    if data.startswith("data:"):
        data = data.split(",", 1)[-1]
    data = "".join(data.split())
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, "invalid_request", f"{field} is not valid base64", field=field) from None


def decode_image(data: str, limits: LimitsConfig):
    """The RGB PIL image of a base64 (or data URL) string. The pixel count its header declares is
    checked against ``limits.max_init_image_pixels`` before any pixel is decoded. Slow for large
    images: callers on an event loop run it in a thread."""
    from PIL import Image, UnidentifiedImageError

    raw = decode_base64(data, "init_image")
    try:
        image = Image.open(io.BytesIO(raw))
        if image.format not in ("PNG", "JPEG", "WEBP"):
            raise ApiError(422, "invalid_request", f"init_image must be PNG, JPEG or WebP, got {image.format}", field="init_image")
        if image.width * image.height > limits.max_init_image_pixels:
            raise ApiError(422, "limit_exceeded", f"init_image is {image.width}x{image.height} ({image.width * image.height} pixels), "
                           f"above the maximum of {limits.max_init_image_pixels} pixels", field="init_image")
        image.load()
        return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError, SyntaxError):
        raise ApiError(422, "invalid_request", "init_image is not a readable image", field="init_image") from None


def random_seed() -> int:
    """A fresh random seed (32 bits, as A1111 prints and accepts them)."""
    return secrets.randbelow(2**32)


def settings_for(body: GenerateBody, defaults: GenerationConfig, limits: LimitsConfig, *, max_timeout_s: float) -> dict:
    """The request's generation settings with defaults filled in, limits checked and seeds set.

    Adapters are left as given (``{"name", "version" | None, "scale"}``); the caller resolves
    versions. ``init_image`` (img2img) is a PIL image of exactly ``width`` x ``height``.
    """
    width = body.width if body.width is not None else None
    height = body.height if body.height is not None else None
    init_image = None
    if isinstance(body, Img2ImgBody):
        init_image = decode_image(body.init_image, limits)
        if width is None and height is None and (init_image.width % 8 or init_image.height % 8):
            raise ApiError(422, "invalid_request", f"init_image is {init_image.width}x{init_image.height}: its sides must be "
                           "multiples of 8, or give width and height to resize it", field="init_image")
        width = width or init_image.width
        height = height or init_image.height
        if width % 8 or height % 8:
            raise ApiError(422, "invalid_request", f"width and height must be multiples of 8, got {width}x{height}",
                           field="width" if width % 8 else "height")
    width = width or defaults.width
    height = height or defaults.height
    _limit("width", width, limits.max_width)
    _limit("height", height, limits.max_height)
    steps = body.steps if body.steps is not None else defaults.steps
    _limit("steps", steps, limits.max_steps)
    _limit("num_images", body.num_images, limits.max_num_images)
    if body.timeout_s is not None:
        _limit_float("timeout_s", body.timeout_s, max_timeout_s)
    if init_image is not None and int(steps * body.strength) < 1:
        raise ApiError(422, "invalid_request", f"img2img runs int(steps x strength) denoising steps: int({steps} x {body.strength:g}) "
                       "is 0; raise strength or steps", field="strength")
    if init_image is not None and init_image.size != (width, height):
        from PIL import Image

        init_image = init_image.resize((width, height), Image.Resampling.LANCZOS)
    settings = {
        "prompt": body.prompt,
        "negative_prompt": body.negative_prompt if body.negative_prompt is not None else defaults.negative_prompt,
        "steps": steps,
        "guidance_scale": body.guidance if body.guidance is not None else defaults.guidance_scale,
        "width": width,
        "height": height,
        "scheduler": body.scheduler or defaults.scheduler,
        "adapters": [{"name": a.name, "version": a.version, "scale": float(a.scale)} for a in body.adapters],
        "num_images": body.num_images,
        "mode": "txt2img",
    }
    if init_image is not None:
        settings.update(mode="img2img", init_image=init_image, strength=body.strength)
    if body.seed == -1:
        settings["seed"] = random_seed()
    else:
        settings["seed"] = body.seed if body.seed is not None else derived_seed(settings, init_image)
    return settings


def _limit_float(field: str, value: float, maximum: float) -> None:
    if value > maximum:
        raise ApiError(422, "limit_exceeded", f"{field} {value:g} is above the maximum {maximum:g}", field=field)


def derived_seed(settings: dict, init_image=None) -> int:
    """A seed from the request's own content: the same request, the same images (and output key)."""
    content = {k: v for k, v in settings.items() if k != "init_image"}
    blob = json.dumps(content, sort_keys=True, default=str).encode()
    h = hashlib.sha256(blob)
    if init_image is not None:
        h.update(init_image.tobytes())
    return int(h.hexdigest()[:12], 16)


def adapter_set_id(adapters: list[dict]) -> str:
    """The multiplexing key of resolved adapters: ``name@version`` sorted, comma-joined ('' for
    none). Scales are not part of it: one resident set serves every scale."""
    return ",".join(sorted(f"{a['name']}@{a['version']}" for a in adapters))


def parse_adapter_set_id(set_id: str) -> list[tuple[str, str]]:
    out = []
    for part in filter(None, set_id.split(",")):
        name, _, version = part.partition("@")
        if not (ADAPTER_NAME_RE.match(name) and ADAPTER_NAME_RE.match(version)):
            raise ValueError(f"bad adapter set id {set_id!r}")
        out.append((name, version))
    return out
