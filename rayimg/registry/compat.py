"""Whether a published adapter can be applied to the model a job renders with.

One check, used wherever adapters are resolved (render job rows, the server's requests):

- the adapter must be a LoRA (a textual-inversion embedding is not applied by catalogs or the
  server);
- it must come from the same model family ('sd': SD 1.x/2.x, 'sdxl'). Another base model of the
  same family (a fine-tune, another hash) is allowed: LoRAs transfer across fine-tunes of one
  family, so that is only a warning.

The family is ``base_model.family`` in ``adapter.json``. Adapters published before it was
recorded get it inferred: from the train job's ``model.family`` when that was set, from the
weights (``text_encoder_2`` keys, or the cross-attention width 768/1024 vs 2048 of the
``attn2.to_k``/``to_v`` down projections), then from the base model's id. When nothing tells,
the adapter is let through and the load-time check against the UNet's shapes decides.
"""

from __future__ import annotations

import json
import re
import struct
from typing import Mapping, Sequence

from rayimg.registry.versions import METADATA_NAME, RegistryError, adapter_uri, resolve_adapter
from rayimg.render.adapters import LORA_WEIGHT_NAME
from rayimg.storage import Storage, join

__all__ = ["AdapterIncompatible", "FAMILY_NAMES", "adapter_family", "check_adapter", "check_published", "weight_shapes"]

FAMILY_NAMES = {"sd": "an SD 1.5-family model", "sdxl": "an SDXL base model"}
_SDXL_CROSS_DIMS = {2048}
_SD_CROSS_DIMS = {768, 1024}
_SDXL_ID_RE = re.compile(r"(^|[^a-z0-9])(sdxl|sd-?xl|stable-diffusion-xl)|xl-base|xl-refiner|[-_]xl([-_./]|$)", re.I)
_SD_ID_RE = re.compile(r"stable-diffusion-(v-?)?[12]([-_.]|$)|(^|[^a-z0-9])sd-?(v-?)?(1[-_.]?[45]|2[-_.]?1?)([^0-9]|$)", re.I)


class AdapterIncompatible(RegistryError):
    """The adapter cannot be applied to this job's model (another family, or not a LoRA)."""


def _label(metadata: Mapping) -> str:
    return f"adapter {str(metadata.get('name', '?'))!r} version {str(metadata.get('version', '?'))!r}"


def _recorded_family(metadata: Mapping) -> str | None:
    """The family ``adapter.json`` records: ``base_model.family``, else the train job's
    ``model.family`` when it was not 'auto'."""
    base = metadata.get("base_model") if isinstance(metadata.get("base_model"), Mapping) else {}
    if base.get("family") in FAMILY_NAMES:
        return base["family"]
    config = metadata.get("training_config")
    model = config.get("model") if isinstance(config, Mapping) else None
    if isinstance(model, Mapping) and model.get("family") in FAMILY_NAMES:
        return model["family"]
    return None


def adapter_family(metadata: Mapping, shapes: Mapping[str, Sequence[int]] | None = None) -> str | None:
    """'sd', 'sdxl' or None (unknown) for a published adapter; ``shapes`` (key -> shape of its
    LoRA weights, see :func:`weight_shapes`) is used when ``adapter.json`` does not tell."""
    recorded = _recorded_family(metadata)
    if recorded is not None:
        return recorded
    if shapes:
        if any(k.startswith(("text_encoder_2.", "lora_te2_")) for k in shapes):
            return "sdxl"
        for key, shape in shapes.items():
            cross = ("attn2.to_k" in key or "attn2.to_v" in key or "attn2_to_k" in key or "attn2_to_v" in key) and \
                ("lora_A" in key or "lora_down" in key or "lora.down" in key)
            if cross and len(shape) == 2:
                if shape[1] in _SDXL_CROSS_DIMS:
                    return "sdxl"
                if shape[1] in _SD_CROSS_DIMS:
                    return "sd"
    base = metadata.get("base_model") if isinstance(metadata.get("base_model"), Mapping) else {}
    model_id = str(base.get("id") or "")
    if _SDXL_ID_RE.search(model_id):
        return "sdxl"
    if _SD_ID_RE.search(model_id):
        return "sd"
    return None


def check_adapter(metadata: Mapping, *, family: str, model_id: str, model_hash: str | None = None,
                  shapes: Mapping[str, Sequence[int]] | None = None) -> str | None:
    """Raise :class:`AdapterIncompatible` when the adapter of ``metadata`` (its ``adapter.json``)
    cannot be applied to the model ``model_id`` of ``family``; return a warning (or None) when it
    can. ``shapes``: the LoRA file's key -> shape, to infer the family of adapters whose
    ``adapter.json`` does not record it."""
    if not isinstance(metadata, Mapping):
        raise AdapterIncompatible(f"adapter.json is not a JSON object (got {type(metadata).__name__})")
    label = _label(metadata)
    method = metadata.get("method")
    weights = metadata.get("weights") if isinstance(metadata.get("weights"), Mapping) else {}
    if method == "textual_inversion" or (LORA_WEIGHT_NAME not in weights and any("learned_embeds" in w for w in weights)):
        token = metadata.get("placeholder_token") or metadata.get("trigger_word")
        what = f"an embedding for token {token!r}" if token else "an embedding"
        raise AdapterIncompatible(
            f"{label} is a textual inversion ({what}), not a LoRA; catalogs and the server apply LoRA adapters only "
            "(a textual-inversion embedding can be loaded in Python with Engine.load_textual_inversion)")
    if method not in (None, "lora", "dreambooth"):
        raise AdapterIncompatible(f"{label} was trained with method {method!r}; only LoRA adapters (methods 'lora', 'dreambooth') can be applied")
    if weights and LORA_WEIGHT_NAME not in weights:
        raise AdapterIncompatible(f"{label} publishes no LoRA weights ({LORA_WEIGHT_NAME}); it has {', '.join(sorted(weights))}")
    base = metadata.get("base_model") if isinstance(metadata.get("base_model"), Mapping) else {}
    if model_hash is not None and base.get("hash") == model_hash:
        return None  # trained on this very model
    adapter_fam = adapter_family(metadata, shapes)
    base_id = base.get("id") or "an unrecorded model"
    if adapter_fam is not None and adapter_fam != family:
        raise AdapterIncompatible(
            f"{label} was trained for {FAMILY_NAMES[adapter_fam]} ({base_id!r}), this job renders "
            f"{FAMILY_NAMES.get(family, repr(family))} ({model_id!r}); use an adapter trained on a {family} model")
    if base.get("hash") and model_hash is not None:
        return (f"{label} was trained on {base_id!r} (another {adapter_fam or 'unknown-family'} base model than {model_id!r}); "
                "applying it anyway (LoRAs transfer across fine-tunes of one family)")
    return None


def weight_shapes(storage: Storage, uri: str) -> dict[str, list[int]]:
    """Key -> shape of a safetensors file, from its header (no tensor is parsed)."""
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError:
        raise RegistryError(f"{uri} is missing") from None
    try:
        (size,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + size])
        return {k: list(v.get("shape", [])) for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)}
    except (struct.error, ValueError, AttributeError) as e:
        raise RegistryError(f"{uri}: not a valid safetensors file: {e}") from None


def check_published(storage: Storage, registry: str, name: str, version: str, *, family: str, model_id: str,
                    model_hash: str | None = None, metadata: Mapping | None = None) -> str | None:
    """:func:`check_adapter` for a published version, reading its ``adapter.json`` (unless given)
    and, only when that does not record the family, its LoRA file's header."""
    if metadata is None:
        _version, _uri, metadata = resolve_adapter(storage, registry, name, version)
    if not isinstance(metadata, Mapping):
        raise AdapterIncompatible(f"adapter {name!r} version {version!r}: {METADATA_NAME} is not a JSON object")
    metadata = {**metadata, "name": metadata.get("name", name), "version": metadata.get("version", version)}
    warning = check_adapter(metadata, family=family, model_id=model_id, model_hash=model_hash)
    base = metadata.get("base_model") if isinstance(metadata.get("base_model"), Mapping) else {}
    same_model = model_hash is not None and base.get("hash") == model_hash
    if same_model or _recorded_family(metadata) is not None:
        return warning
    shapes = weight_shapes(storage, join(adapter_uri(registry, name, version), LORA_WEIGHT_NAME))
    return check_adapter(metadata, family=family, model_id=model_id, model_hash=model_hash, shapes=shapes)
