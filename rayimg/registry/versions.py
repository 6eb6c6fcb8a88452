"""The adapter registry: ``<root>/adapters/<name>/<version>/`` on local disk or s3://.

A version dir holds the weights (``pytorch_lora_weights.safetensors``, optionally
``lora_kohya.safetensors``, or ``learned_embeds.safetensors``) and ``adapter.json``, written
last: a version counts only once its ``adapter.json`` exists, so a reader that sees it sees
complete weights. Versions are never overwritten. ``latest`` is the highest integer version
(non-integer versions rank below integers, lexicographically among themselves).

adapter.json::

    {"format": 1, "name", "version", "created" (UTC ISO), "base_model": {"id", "hash", "family"},
     "method", "rank", "alpha", "target_modules", "train_text_encoder", "trigger_word",
     "placeholder_token", "num_vectors", "prediction_type", "steps",
     "weights": {filename: sha256}, "training_config": {...the TrainJob...}}
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path

from rayimg.config import ADAPTER_NAME_RE, to_dict
from rayimg.storage import Storage, join, local_path
from rayimg.train.export import file_sha256

__all__ = [
    "METADATA_NAME", "RegistryError", "AdapterNotFound", "AdapterCorrupt", "adapter_metadata", "publish_adapter", "list_adapters",
    "resolve_adapter", "adapter_uri", "check_name", "recorded_targets",
]

METADATA_NAME = "adapter.json"
REGISTRY_FORMAT = 1


class RegistryError(ValueError):
    """A registry operation was refused or found nothing; the message names the adapter."""


class AdapterNotFound(RegistryError, LookupError):
    """No such adapter or version in the registry (or a name no adapter can have)."""


class AdapterCorrupt(RegistryError):
    """A published version cannot be used as it is stored: its adapter.json is not a JSON object,
    its weights do not match the recorded sha256, are not a readable safetensors file, hold
    non-finite values, or are a link leaving the registry."""


def check_inside_registry(registry_root: str, uri: str, label: str) -> None:
    """Refuse ``uri`` (a file in a local registry) when it is a symlink, or under one, that
    resolves outside ``registry_root``: a registry entry cannot make a server read other files.
    Objects in s3:// have no links."""
    if "://" in str(registry_root) and not str(registry_root).startswith("file://"):
        return
    root = os.path.realpath(local_path(registry_root))
    path = local_path(uri)
    if not os.path.lexists(path):
        return
    real = os.path.realpath(path)
    if os.path.commonpath([root, real]) != root:
        raise AdapterCorrupt(f"{label}: {path.name} is a link to {real}, outside the registry {root}; refusing to read it")


def check_name(name: str, what: str = "adapter name", error: type[RegistryError] = RegistryError) -> str:
    name = str(name)
    if not ADAPTER_NAME_RE.match(name):
        raise error(f"{what} {name!r} is not allowed: it must match {ADAPTER_NAME_RE.pattern}")
    return name


def adapter_uri(registry_root: str, name: str, version: str | int) -> str:
    """``<root>/adapters/<name>/<version>`` (names checked)."""
    return join(registry_root, "adapters", check_name(name), check_name(str(version), f"version of adapter {name!r}"))


def adapter_metadata(job, *, model_id: str, model_hash: str, family: str, steps: int) -> dict:
    """adapter.json's fields that come from the job and the base model (``publish_adapter``
    adds name, version, weights and created)."""
    method = job.train.method
    uses_lora = method in ("lora", "dreambooth")
    ti = job.textual_inversion
    trigger = job.publish.trigger_word
    if trigger is None and method == "textual_inversion":
        trigger = ti.placeholder_token
    return {
        "base_model": {"id": model_id, "hash": model_hash, "family": family},
        "method": method,
        "rank": job.lora.rank if uses_lora else None,
        "alpha": (job.lora.alpha if job.lora.alpha is not None else job.lora.rank) if uses_lora else None,
        "target_modules": list(job.lora.target_modules) if uses_lora else None,
        "train_text_encoder": bool(job.lora.train_text_encoder) if uses_lora else False,
        "trigger_word": trigger,
        "placeholder_token": ti.placeholder_token if method == "textual_inversion" else None,
        "num_vectors": ti.num_vectors if method == "textual_inversion" else None,
        "prediction_type": job.train.prediction_type,
        "steps": int(steps),
        "training_config": to_dict(job),
    }


def _version_key(version: str):
    return (1, int(version), "") if version.isdigit() else (0, 0, version)


def _versions(storage: Storage, registry_root: str, name: str, complete_only: bool) -> list[str]:
    prefix = join(registry_root, "adapters", name)
    found = set()
    for uri in storage.list(prefix):
        rel = uri[len(prefix.rstrip("/")) + 1:]
        version, _, rest = rel.partition("/")
        if not rest or not ADAPTER_NAME_RE.match(version):
            continue
        if not complete_only or rest == METADATA_NAME:
            found.add(version)
    return sorted(found, key=_version_key)


def publish_adapter(
    storage: Storage,
    registry_root: str,
    name: str,
    version: str | int | None,
    local_dir: str | os.PathLike,
    metadata: dict,
) -> tuple[str, str]:
    """Copy ``local_dir`` to ``<root>/adapters/<name>/<version>/`` with ``adapter.json`` last;
    returns (uri, version). ``version`` None is the next integer after the highest one
    ("1" first). An existing version (even a partly written one) is never overwritten."""
    check_name(name)
    local_dir = Path(local_dir)
    files = sorted(p for p in local_dir.rglob("*") if p.is_file() and not p.name.startswith(".") and p.name != METADATA_NAME)
    weights = [p for p in files if p.suffix == ".safetensors"]
    if not weights:
        raise RegistryError(f"adapter {name!r}: {local_dir} holds no .safetensors weights to publish")

    existing = _versions(storage, registry_root, name, complete_only=False)
    if version is None:
        numbers = [int(v) for v in existing if v.isdigit()]
        version = str(max(numbers, default=0) + 1)
    version = check_name(str(version), f"version of adapter {name!r}")
    uri = adapter_uri(registry_root, name, version)
    if version in existing:
        raise RegistryError(f"adapter {name!r} version {version!r} already exists at {uri}; versions are never overwritten")

    record = dict(metadata)
    record.update(
        format=REGISTRY_FORMAT,
        name=name,
        version=version,
        weights={p.relative_to(local_dir).as_posix(): file_sha256(p) for p in weights},
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    )
    for path in files:
        storage.upload_file(path, join(uri, path.relative_to(local_dir).as_posix()))
    storage.write_text(join(uri, METADATA_NAME), json.dumps(record, indent=2, sort_keys=True) + "\n")
    return uri, version


def list_adapters(storage: Storage, registry_root: str) -> dict[str, list[str]]:
    """Every published adapter and its complete versions (oldest first)."""
    prefix = join(registry_root, "adapters")
    found: dict[str, set[str]] = {}
    for uri in storage.list(prefix):
        parts = uri[len(prefix.rstrip("/")) + 1:].split("/")
        if len(parts) == 3 and parts[2] == METADATA_NAME and ADAPTER_NAME_RE.match(parts[0]) and ADAPTER_NAME_RE.match(parts[1]):
            found.setdefault(parts[0], set()).add(parts[1])
    return {name: sorted(versions, key=_version_key) for name, versions in sorted(found.items())}


def recorded_targets(storage: Storage, registry_root: str) -> list[str] | None:
    """The union of the UNet ``target_modules`` that the LoRA adapters of the registry (every
    complete version) record in their adapter.json, sorted; None when the registry has no LoRA
    adapter or one of them records none (e.g. weights trained elsewhere), i.e. nothing is known.
    Textual-inversion adapters adapt no module and are skipped; an unreadable adapter.json is
    skipped too (requests naming it get its own error)."""
    from concurrent.futures import ThreadPoolExecutor

    def targets(name: str, version: str):
        try:
            _v, _uri, meta = resolve_adapter(storage, registry_root, name, version)
        except RegistryError:
            return ()
        if meta.get("method") == "textual_inversion":
            return ()
        found = meta.get("target_modules")
        return tuple(found) if isinstance(found, list) and all(isinstance(t, str) for t in found) else None

    pairs = [(name, version) for name, versions in list_adapters(storage, registry_root).items() for version in versions]
    with ThreadPoolExecutor(max_workers=16) as pool:  # one small read each; on S3 a round trip each
        found = list(pool.map(lambda p: targets(*p), pairs))
    if any(t is None for t in found) or not any(found):
        return None
    return sorted({t for ts in found for t in ts})


def resolve_adapter(storage: Storage, registry_root: str, name: str, version: str | int | None = None) -> tuple[str, str, dict]:
    """(version, uri, metadata) of ``name`` at ``version``, or its latest complete version;
    :class:`AdapterNotFound` when there is none."""
    check_name(name, error=AdapterNotFound)
    if version is None:
        versions = _versions(storage, registry_root, name, complete_only=True)
        if not versions:
            raise AdapterNotFound(f"adapter {name!r} has no published version under {join(registry_root, 'adapters')}")
        version = versions[-1]
    version = check_name(str(version), f"version of adapter {name!r}", AdapterNotFound)
    uri = adapter_uri(registry_root, name, version)
    label = f"adapter {name!r} version {version!r}"
    check_inside_registry(registry_root, join(uri, METADATA_NAME), label)
    try:
        text = storage.read_text(join(uri, METADATA_NAME))
    except FileNotFoundError:
        raise AdapterNotFound(f"{label} is not published (no {METADATA_NAME} at {uri})") from None
    try:
        metadata = json.loads(text)
    except ValueError as e:
        raise AdapterCorrupt(f"{label}: {METADATA_NAME} is not valid JSON ({e})") from None
    if not isinstance(metadata, dict):
        raise AdapterCorrupt(f"{label}: {METADATA_NAME} is not a JSON object (it holds a {type(metadata).__name__})")
    weights = metadata.get("weights")
    if weights is not None and not (isinstance(weights, dict) and all(isinstance(v, str) for v in weights.values())):
        raise AdapterCorrupt(f"{label}: {METADATA_NAME} 'weights' must map file names to sha256 strings")
    return version, uri, metadata
