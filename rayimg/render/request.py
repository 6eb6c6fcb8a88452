"""What determines one image: :class:`GenerationRequest` (fields, validation, output-key
parameters, batch key) and the canonical form of an adapter list."""

from __future__ import annotations

import hashlib
import json
import numbers
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from PIL import Image

from rayimg.render.schedulers import SCHEDULER_TABLE

__all__ = ["MODES", "AdapterId", "GenerationRequest", "canonical_adapters", "image_digest"]

MODES = ("txt2img", "img2img", "controlnet")

AdapterId = tuple[str, str, float]


def image_digest(image: Image.Image) -> str:
    """sha256 of an image's mode, size and pixels (what a request's key records for it)."""
    h = hashlib.sha256()
    h.update(f"{image.mode}:{image.width}x{image.height}:".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def canonical_adapters(adapters: Iterable[Any]) -> tuple[AdapterId, ...]:
    """``(name, version, scale)`` triples (tuples or ``{"name", "version", "scale"}`` dicts) as a
    sorted tuple of ``(str, str, float)``: the order adapters are listed in does not matter."""
    out = []
    for entry in adapters or ():
        if isinstance(entry, Mapping):
            try:
                name, version, scale = entry["name"], entry["version"], entry.get("scale", 1.0)
            except KeyError as e:
                raise ValueError(f"adapters: entry {dict(entry)!r} lacks {e.args[0]!r}") from None
        else:
            try:
                name, version, scale = entry
            except (TypeError, ValueError):
                raise ValueError(f"adapters: entry {entry!r} is not (name, version, scale)") from None
        out.append((str(name), str(version), float(scale)))
    out.sort(key=lambda a: (a[0], a[1]))
    seen = set()
    for name, version, _ in out:
        if (name, version) in seen:
            raise ValueError(f"adapters: {name!r} version {version!r} is listed twice")
        seen.add((name, version))
    return tuple(out)


def _number(name: str, value: Any, *, integer: bool = False, minimum: float | None = None) -> int | float:
    """``value`` as a plain int/float (numpy scalars from catalogs included), checked."""
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ValueError(f"{name}: must be {'an integer' if integer else 'a number'}, got {value!r}")
    value = int(value) if integer else float(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}: must be >= {minimum}, got {value!r}")
    return value


@dataclass(frozen=True)
class GenerationRequest:
    """Everything that determines one image (with the base model).

    ``adapters`` is the identity of the LoRA adapters (and textual inversions) in effect:
    ``(name, version, scale)`` triples, stored sorted. ``init_image`` (img2img) and
    ``control_image`` (controlnet) are PIL images of exactly ``width`` x ``height``; their
    sha256 stands for them in :meth:`params`. ``controlnet`` names the ControlNet model (the
    engine checks it matches its own).
    """

    prompt: str
    negative_prompt: str = ""
    steps: int = 30
    guidance_scale: float = 7.5
    width: int = 512
    height: int = 512
    scheduler: str = "euler"
    seed: int = 0
    mode: str = "txt2img"
    init_image: Image.Image | None = None
    strength: float = 0.8
    control_image: Image.Image | None = None
    controlnet_scale: float = 1.0
    controlnet: str = ""
    adapters: tuple[AdapterId, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "adapters", canonical_adapters(self.adapters))
        if self.mode not in MODES:
            raise ValueError(f"mode: unknown mode {self.mode!r}; one of {', '.join(MODES)}")
        if self.scheduler not in SCHEDULER_TABLE:
            raise ValueError(f"scheduler: unknown scheduler {self.scheduler!r}; allowed: {', '.join(SCHEDULER_TABLE)}")
        for name in ("prompt", "negative_prompt", "controlnet"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name}: must be a string, got {type(getattr(self, name)).__name__}")
        for name, minimum in (("steps", 1), ("seed", 0), ("width", 8), ("height", 8)):
            object.__setattr__(self, name, _number(name, getattr(self, name), integer=True, minimum=minimum))
        for name in ("width", "height"):
            if getattr(self, name) % 8:
                raise ValueError(f"{name}: must be a multiple of 8, got {getattr(self, name)}")
        for name in ("guidance_scale", "strength", "controlnet_scale"):
            object.__setattr__(self, name, _number(name, getattr(self, name), minimum=0))
        digests = {}
        for name, mode in (("init_image", "img2img"), ("control_image", "controlnet")):
            image = getattr(self, name)
            if image is None:
                if self.mode == mode:
                    raise ValueError(f"{name}: is required for mode {self.mode!r}")
                continue
            if self.mode != mode:
                raise ValueError(f"{name}: is only used in mode {mode!r}, not {self.mode!r}")
            if not isinstance(image, Image.Image):
                raise ValueError(f"{name}: must be a PIL image, got {type(image).__name__}")
            if image.size != (self.width, self.height):
                raise ValueError(f"{name}: is {image.width}x{image.height} but the request asks for {self.width}x{self.height}")
            digests[name] = image_digest(image)
        if self.mode == "img2img" and not 0.0 < self.strength <= 1.0:
            raise ValueError(f"strength: must be in (0, 1], got {self.strength}")
        object.__setattr__(self, "_digests", digests)

    def params(self) -> dict:
        """Every parameter that determines the image, JSON-able (images as their sha256).
        Fields a mode does not use are left out, so they cannot split keys."""
        params = {
            "mode": self.mode,
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "steps": self.steps,
            "guidance_scale": self.guidance_scale,
            "width": self.width,
            "height": self.height,
            "scheduler": self.scheduler,
            "seed": self.seed,
            "adapters": [{"name": n, "version": v, "scale": s} for n, v, s in self.adapters],
        }
        if self.mode == "img2img":
            params.update(init_image=self._digests["init_image"], strength=self.strength)
        if self.mode == "controlnet":
            params.update(control_image=self._digests["control_image"], controlnet_scale=self.controlnet_scale,
                          controlnet=self.controlnet)
        return params

    def batch_key(self) -> tuple:
        """Requests with equal keys can be generated in one batch (one pipeline call)."""
        return (
            self.mode, self.adapters, self.steps, self.guidance_scale, self.width, self.height, self.scheduler,
            self.strength if self.mode == "img2img" else None,
            (self.controlnet, self.controlnet_scale) if self.mode == "controlnet" else None,
        )

    def __hash__(self) -> int:
        return hash(json.dumps(self.params(), sort_keys=True))
