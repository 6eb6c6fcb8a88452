"""Prompt-catalog rows -> validated generation requests (plain Python, shared by render and serve).

A row may carry: ``id``, ``prompt`` (required), ``negative_prompt``, ``seed``, ``width``, ``height``,
``steps``, ``guidance_scale`` (or ``guidance``), ``scheduler`` and ``adapters`` — a list of
``{"name", "version"?, "scale"?}`` or a string ``"name[@version][:scale],..."``. Missing fields
come from the job's defaults. A row without a seed gets one derived from its own content, never
from where it lands.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

from rayimg.config import ADAPTER_NAME_RE, SCHEDULERS, GenerationConfig, LimitsConfig


class RowError(ValueError):
    """A row that cannot be rendered; ``str()`` is the reason written to the errors file."""


@dataclass(frozen=True)
class AdapterRef:
    name: str
    version: str | None
    scale: float


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, str) and v.strip() == "")


def _int(row: dict, name: str, default: int) -> int:
    v = row.get(name)
    if _missing(v):
        return default
    if isinstance(v, bool):
        raise RowError(f"{name} must be an integer, got {v!r}")
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, str) and v.strip().lstrip("-").isdigit():
        return int(v)
    if not isinstance(v, int):
        raise RowError(f"{name} must be an integer, got {v!r}")
    return v


def _float(row: dict, names: tuple[str, ...], default: float) -> float:
    for name in names:
        v = row.get(name)
        if _missing(v):
            continue
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise RowError(f"{name} must be a number, got {v!r}") from None
        if math.isnan(f) or math.isinf(f):
            raise RowError(f"{name} must be a finite number, got {v!r}")
        return f
    return default


def parse_adapters(value) -> list[AdapterRef]:
    """``[{"name", "version", "scale"}]``, a JSON string of that, or ``"a@2:0.8,b"``."""
    if _missing(value):
        return []
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                raise RowError(f"adapters is not valid JSON: {e.msg}") from None
        else:
            value = []
            for part in text.split(","):
                part = part.strip()
                name, _, scale = part.partition(":")
                name, _, version = name.partition("@")
                value.append({"name": name, "version": version or None, "scale": scale if scale else 1.0})
    if hasattr(value, "tolist"):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise RowError(f"adapters must be a list, got {value!r}")
    refs = []
    for a in value:
        if isinstance(a, str):
            a = {"name": a}
        if not isinstance(a, dict) or not isinstance(a.get("name"), str):
            raise RowError(f"adapter entry {a!r} needs a name")
        name = a["name"]
        if not ADAPTER_NAME_RE.match(name):
            raise RowError(f"adapter name {name!r} is not valid (pattern {ADAPTER_NAME_RE.pattern})")
        version = a.get("version")
        version = None if _missing(version) else str(version)
        if version is not None and not ADAPTER_NAME_RE.match(version):
            raise RowError(f"adapter {name!r} version {version!r} is not valid")
        try:
            scale = 1.0 if _missing(a.get("scale")) else float(a["scale"])
        except (TypeError, ValueError):
            raise RowError(f"adapter {name!r} scale must be a number, got {a.get('scale')!r}") from None
        if not math.isfinite(scale):
            raise RowError(f"adapter {name!r} scale must be finite")
        refs.append(AdapterRef(name, version, scale))
    names = [r.name for r in refs]
    if len(set(names)) != len(names):
        raise RowError(f"adapter listed twice in {names}")
    return refs


def derived_seed(row: dict) -> int:
    """A seed from the row's own content (prompt and settings), stable across runs and workers."""
    blob = json.dumps({k: row.get(k) for k in sorted(row) if k not in ("seed", "id")}, sort_keys=True, default=str)
    return int(hashlib.sha256(blob.encode()).hexdigest()[:8], 16)


def row_id(row: dict) -> str:
    """The row's ``id`` if it has one, else a hash of its content."""
    if not _missing(row.get("id")):
        return str(row["id"])
    blob = json.dumps(row, sort_keys=True, default=str)
    return "sha-" + hashlib.sha256(blob.encode()).hexdigest()[:16]


def normalize_row(row: dict, defaults: GenerationConfig, limits: LimitsConfig) -> dict:
    """Validated generation settings of a row (raises RowError with the reason)."""
    prompt = row.get("prompt")
    if _missing(prompt) or not isinstance(prompt, str):
        raise RowError("missing prompt")
    negative = row.get("negative_prompt")
    negative = defaults.negative_prompt if _missing(negative) else str(negative)
    width = _int(row, "width", defaults.width)
    height = _int(row, "height", defaults.height)
    for name, v, limit in (("width", width, limits.max_width), ("height", height, limits.max_height)):
        if v <= 0 or v % 8:
            raise RowError(f"{name} {v} is not a positive multiple of 8")
        if v > limit:
            raise RowError(f"{name} {v} is above the maximum {limit}")
    steps = _int(row, "steps", defaults.steps)
    if steps <= 0:
        raise RowError(f"steps must be > 0, got {steps}")
    if steps > limits.max_steps:
        raise RowError(f"steps {steps} is above the maximum {limits.max_steps}")
    guidance = _float(row, ("guidance_scale", "guidance"), defaults.guidance_scale)
    if guidance < 0:
        raise RowError(f"guidance_scale must be >= 0, got {guidance}")
    scheduler = row.get("scheduler")
    scheduler = defaults.scheduler if _missing(scheduler) else str(scheduler)
    if scheduler not in SCHEDULERS:
        raise RowError(f"unknown scheduler {scheduler!r}; allowed: {', '.join(SCHEDULERS)}")
    seed = row.get("seed")
    seed = derived_seed(row) if _missing(seed) else _int(row, "seed", 0)
    if seed < 0 or seed >= 2**63:
        raise RowError(f"seed must be in [0, 2^63), got {seed}")
    return {
        "prompt": prompt, "negative_prompt": negative, "width": width, "height": height, "steps": steps,
        "guidance_scale": guidance, "scheduler": scheduler, "seed": seed, "adapters": parse_adapters(row.get("adapters")),
    }
