"""The request and answer shapes of APIs clients already speak, translated to and from
:class:`~serving.schema.GenerateBody`, so every route shares one path: the same checks, limits,
seeds, adapters, auth and ``{"error": ...}`` bodies.

- OpenAI ``POST /v1/images/generations``: ``prompt``, ``n``, ``size`` ``"WxH"``,
  ``response_format`` ``url`` (the default, as OpenAI's) or ``b64_json``, ``model`` naming the
  base model or an adapter (``name`` or ``name@version``, at scale 1), ``user`` (accepted, not
  used). Seeds are random, as OpenAI's images are. Answers ``{"created", "data": [{"url"} |
  {"b64_json"}]}``; a URL is ``GET /v1/images/<key>.png`` on this server.
- Automatic1111 ``POST /sdapi/v1/txt2img``, the common subset: ``prompt`` (``<lora:name:weight>``
  tags are taken out of it and applied as adapters), ``negative_prompt``, ``steps``,
  ``cfg_scale``, ``width``, ``height``, ``seed`` (-1, the default: random), ``sampler_name``
  (A1111's names, with ``scheduler`` "Karras" where A1111 splits it out), ``batch_size``,
  ``n_iter``. Answers ``{"images": [base64 PNG...], "parameters": {...}, "info": "<JSON>"}``.

Errors name the client's own fields (``size``, ``n``, ``cfg_scale``, ``batch_size``...).
"""

from __future__ import annotations

import json
import re
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rayimg.config import ADAPTER_NAME_RE
from serving.errors import ApiError
from serving.schema import MAX_ADAPTERS, GenerateBody

# --------------------------------------------------------------------------- OpenAI
SIZE_RE = re.compile(r"^([1-9][0-9]{0,4})x([1-9][0-9]{0,4})$")


class OpenAIImagesBody(BaseModel):
    """POST /v1/images/generations (OpenAI's Images API)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=4000, description="the prompt")
    model: Optional[str] = Field(None, max_length=200, description="the base model (its id, or omitted) or an adapter: 'name' or "
                                 "'name@version' (applied at scale 1)")
    n: int = Field(1, ge=1, description="images to generate (at most limits.max_num_images)")
    size: Optional[str] = Field(None, description="'WIDTHxHEIGHT', multiples of 8 (default: the server's default size)")
    response_format: Literal["url", "b64_json"] = Field("url", description="a URL on this server (GET /v1/images/<key>.png) or "
                                                        "the base64 PNG inline")
    user: Optional[str] = Field(None, max_length=256, description="an end-user id (accepted for compatibility, not used)")


class OpenAIImage(BaseModel):
    url: Optional[str] = Field(None, description="the PNG on this server (same auth as the API)")
    b64_json: Optional[str] = Field(None, description="base64 PNG")


class OpenAIImagesResponse(BaseModel):
    created: int = Field(description="unix time")
    data: list[OpenAIImage]


OPENAI_FIELDS = {"num_images": "n", "width": "size", "height": "size", "adapters": "model", "adapters.0.name": "model",
                 "adapters.0.version": "model"}


def parse_size(size: str) -> tuple[int, int]:
    m = SIZE_RE.match(size)
    if not m:
        raise ApiError(422, "invalid_request", f"size must be 'WIDTHxHEIGHT' (e.g. '512x512'), got {size!r}", field="size")
    width, height = int(m.group(1)), int(m.group(2))
    if width % 8 or height % 8:
        raise ApiError(422, "invalid_request", f"size {size!r}: width and height must be multiples of 8", field="size")
    return width, height


def model_adapters(model: str | None, base_names: set[str]) -> list[dict]:
    """The adapters ``model`` names: none for the base model, else one at scale 1."""
    if model is None or model in base_names:
        return []
    name, _, version = model.partition("@")
    if not ADAPTER_NAME_RE.match(name) or (version and not ADAPTER_NAME_RE.match(version)):
        raise ApiError(422, "invalid_request", f"model {model!r} is neither this server's base model ({', '.join(sorted(base_names))}) "
                       f"nor an adapter name ('name' or 'name@version', names matching {ADAPTER_NAME_RE.pattern})", field="model")
    return [{"name": name, "version": version or None, "scale": 1.0}]


def openai_to_generate(body: OpenAIImagesBody, base_names: set[str]) -> GenerateBody:
    fields: dict = {"prompt": body.prompt, "num_images": body.n, "seed": -1, "adapters": model_adapters(body.model, base_names),
                    "response_format": "uri" if body.response_format == "url" else "b64_json"}
    if body.size is not None:
        fields["width"], fields["height"] = parse_size(body.size)
    return to_generate_body(fields, OPENAI_FIELDS)


# --------------------------------------------------------------------------- Automatic1111
# A1111 sampler name (lower case) -> ours; "DPM++ 2M" with scheduler "Karras" is dpmpp_2m_karras.
A1111_SAMPLERS = {
    "euler": "euler",
    "euler a": "euler_a",
    "dpm++ 2m": "dpmpp_2m",
    "dpm++ 2m karras": "dpmpp_2m_karras",
    "ddim": "ddim",
    "unipc": "unipc",
    "plms": "pndm",
}
A1111_SCHEDULERS = ("automatic", "uniform", "karras")
LORA_TAG_RE = re.compile(r"<lora:([^<>]*)>", re.I)
OTHER_TAG_RE = re.compile(r"<(lyco|hypernet|embedding):[^<>]*>", re.I)


class A1111Txt2ImgBody(BaseModel):
    """POST /sdapi/v1/txt2img (Automatic1111's web UI API, the common subset)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=4000, description="the prompt; <lora:name:weight> tags (weight default 1, "
                        "name 'name' or 'name@version') apply registry adapters and are removed from the text")
    negative_prompt: str = Field("", max_length=4000, description="negative prompt")
    steps: Optional[int] = Field(None, ge=1, description="sampling steps (at most limits.max_steps; default the server's)")
    cfg_scale: Optional[float] = Field(None, ge=0.0, le=50.0, allow_inf_nan=False, description="classifier-free guidance scale")
    width: Optional[int] = Field(None, ge=8, multiple_of=8, description="image width, a multiple of 8 (at most limits.max_width)")
    height: Optional[int] = Field(None, ge=8, multiple_of=8, description="image height, a multiple of 8 (at most limits.max_height)")
    seed: int = Field(-1, ge=-1, lt=2**63, description="seed of the first image (image i uses seed + i); -1: random")
    sampler_name: Optional[str] = Field(None, max_length=100, description="one of: Euler, Euler a, DPM++ 2M, DPM++ 2M Karras, DDIM, "
                                        "UniPC, PLMS (default the server's)")
    scheduler: Optional[str] = Field(None, max_length=100, description="A1111's schedule type: Automatic, Uniform or Karras "
                                     "(Karras with DPM++ 2M only)")
    batch_size: int = Field(1, ge=1, description="images per batch")
    n_iter: int = Field(1, ge=1, description="batches; batch_size x n_iter images in all (at most limits.max_num_images)")
    send_images: bool = Field(True, description="must be true: the images are what this server answers with")
    save_images: bool = Field(False, description="accepted for compatibility; images are kept only in the image cache")


class A1111Txt2ImgResponse(BaseModel):
    images: list[str] = Field(description="base64 PNGs")
    parameters: dict = Field(description="the request's parameters, defaults filled in")
    info: str = Field(description="a JSON string: prompt, seeds, size, sampler, steps, cfg scale, adapters, output keys")


A1111_FIELDS = {"num_images": "batch_size", "guidance": "cfg_scale", "scheduler": "sampler_name", "adapters": "prompt"}


def sampler(name: str | None, schedule: str | None) -> str | None:
    """Our scheduler for A1111's ``sampler_name`` (+ ``scheduler``); None: the server's default."""
    if schedule is not None and schedule.strip().lower() not in A1111_SCHEDULERS:
        raise ApiError(422, "invalid_request", f"scheduler {schedule!r} is not supported; one of: Automatic, Uniform, Karras", field="scheduler")
    karras = schedule is not None and schedule.strip().lower() == "karras"
    if name is None:
        if karras:
            raise ApiError(422, "invalid_request", "scheduler 'Karras' needs sampler_name 'DPM++ 2M'", field="scheduler")
        return None
    key = " ".join(name.strip().lower().split())
    if karras and not key.endswith(" karras"):
        key += " karras"
    if key not in A1111_SAMPLERS:
        known = "Euler, Euler a, DPM++ 2M, DPM++ 2M Karras, DDIM, UniPC, PLMS"
        what = f"sampler_name {name!r}" + (" with scheduler 'Karras'" if karras else "")
        raise ApiError(422, "invalid_request", f"{what} is not supported; one of: {known}", field="scheduler" if karras else "sampler_name")
    return A1111_SAMPLERS[key]


def lora_tags(prompt: str) -> tuple[str, list[dict]]:
    """(the prompt without its ``<lora:name:weight>`` tags, the adapters they name)."""
    if OTHER_TAG_RE.search(prompt):
        raise ApiError(422, "invalid_request", f"prompt: {OTHER_TAG_RE.search(prompt).group(0)} is not supported (only <lora:name:weight>)",
                       field="prompt")
    adapters = []
    for tag in LORA_TAG_RE.finditer(prompt):
        parts = tag.group(1).split(":")
        if len(parts) > 2:
            raise ApiError(422, "invalid_request", f"prompt: {tag.group(0)}: write <lora:name> or <lora:name:weight>", field="prompt")
        name, _, version = parts[0].strip().partition("@")
        if not ADAPTER_NAME_RE.match(name) or (version and not ADAPTER_NAME_RE.match(version)):
            raise ApiError(422, "invalid_request", f"prompt: {tag.group(0)}: adapter names match {ADAPTER_NAME_RE.pattern} "
                           "('name' or 'name@version')", field="prompt")
        try:
            scale = float(parts[1]) if len(parts) == 2 else 1.0
        except ValueError:
            raise ApiError(422, "invalid_request", f"prompt: {tag.group(0)}: the weight must be a number", field="prompt") from None
        if not -4.0 <= scale <= 4.0:
            raise ApiError(422, "invalid_request", f"prompt: {tag.group(0)}: the weight must be within -4 and 4", field="prompt")
        if any(a["name"] == name for a in adapters):
            raise ApiError(422, "invalid_request", f"prompt: adapter {name!r} is tagged twice", field="prompt")
        adapters.append({"name": name, "version": version or None, "scale": scale})
    if len(adapters) > MAX_ADAPTERS:
        raise ApiError(422, "invalid_request", f"prompt: at most {MAX_ADAPTERS} <lora:...> tags", field="prompt")
    text = " ".join(LORA_TAG_RE.sub(" ", prompt).split())
    text = re.sub(r"\s+([,.;])", r"\1", text).strip(" ,")
    return text, adapters


def a1111_to_generate(body: A1111Txt2ImgBody) -> GenerateBody:
    if not body.send_images:
        raise ApiError(422, "invalid_request", "send_images must be true: this server answers with the images", field="send_images")
    prompt, adapters = lora_tags(body.prompt)
    if not prompt:
        raise ApiError(422, "invalid_request", "prompt holds nothing but <lora:...> tags", field="prompt")
    fields = {"prompt": prompt, "negative_prompt": body.negative_prompt, "steps": body.steps, "guidance": body.cfg_scale,
              "width": body.width, "height": body.height, "seed": body.seed, "scheduler": sampler(body.sampler_name, body.scheduler),
              "adapters": adapters, "num_images": body.batch_size * body.n_iter, "response_format": "b64_json"}
    return to_generate_body({k: v for k, v in fields.items() if v is not None}, A1111_FIELDS)


def a1111_answer(body: A1111Txt2ImgBody, settings: dict, result: dict, model_id: str) -> dict:
    """A1111's answer: ``parameters`` echoes the request with the values used; ``info`` is the
    JSON string A1111 clients parse for seeds and settings."""
    images = result["images"]
    seeds = [image["seed"] for image in images]
    sampler_name = next((k for k, v in A1111_SAMPLERS.items() if v == settings["scheduler"]), settings["scheduler"])
    parameters = body.model_dump()
    parameters.update(seed=seeds[0], steps=settings["steps"], cfg_scale=settings["guidance_scale"], width=settings["width"],
                      height=settings["height"], sampler_name=sampler_name)
    info = {"prompt": body.prompt, "all_prompts": [body.prompt] * len(images), "negative_prompt": settings["negative_prompt"],
            "all_negative_prompts": [settings["negative_prompt"]] * len(images), "seed": seeds[0], "all_seeds": seeds,
            "width": settings["width"], "height": settings["height"], "sampler_name": sampler_name, "cfg_scale": settings["guidance_scale"],
            "steps": settings["steps"], "batch_size": body.batch_size, "n_iter": body.n_iter, "sd_model_name": model_id,
            "extra_generation_params": {"adapters": result["adapters"]}, "keys": [image["key"] for image in images]}
    return {"images": [image["b64_json"] for image in images], "parameters": parameters, "info": json.dumps(info)}


# --------------------------------------------------------------------------- shared
def to_generate_body(fields: dict, names: dict) -> GenerateBody:
    try:
        return GenerateBody.model_validate(fields)
    except ValidationError as e:
        first = e.errors()[0]
        field = ".".join(str(p) for p in first.get("loc", ()))
        raise rename_field(ApiError(422, "invalid_request", f"{field}: {first.get('msg')}", field=field or None), names) from None


def rename_field(error: ApiError, names: dict) -> ApiError:
    """``error`` with its field in the client's own terms, and a message starting with the field
    too where the rename is one to one (``width`` stays in the message of a ``size`` error)."""
    if error.field in names:
        theirs = names[error.field]
        if error.message.startswith(error.field) and list(names.values()).count(theirs) == 1:
            error.message = theirs + error.message[len(error.field):]
        error.field = theirs
    return error
