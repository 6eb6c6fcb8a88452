"""Checks that need the model, the data or the machine but no Ray: run by ``rayimg <job>``
before the job starts Ray, so a wrong path or device is one line naming the field, in seconds.

- ``model.pretrained`` resolves to a diffusers dir (local, s3://, a tiny model, or a hub id
  that the local hub cache holds while the hub is offline) of the family ``model.family`` names;
- a GPU asked for (``model.device: cuda``, ``scaling.use_gpu``, ``*.num_gpus_per_actor``) exists
  when the job would start a local Ray cluster on this machine; on a cluster (``RAY_ADDRESS`` or
  ``cluster.address``) the driver may have no GPU, so the first worker reports it;
- the inputs (dataset, cache, catalog) exist and are readable, locally or on S3;
- inside ``ray job submit --working-dir``, outputs are not relative paths, which would land in
  Ray's temporary copy of the working dir.

Every failure is a :class:`ConfigError` naming the field.
"""

from __future__ import annotations

import json
import os
import re

from rayimg.config import ConfigError
from rayimg.storage import Storage, is_s3

# Fields each job writes (or, for the registry, that only other jobs wrote): a relative path
# there is never part of a submitted working dir.
OUTPUT_FIELDS = {
    "prepare": ("cache.output",),
    "train": ("checkpoint.storage_path", "publish.registry"),
    "render": ("output.uri", "registry", "engine.compile_cache"),
    "serve": ("registry", "image_cache.uri"),
    "demo": ("output_dir",),
}

_FIELD_PREFIX = re.compile(r"^(model\.[a-z_]+)(?::\s*|\s+(?=is\b))")


def check(job: str, cfg) -> None:
    """Run every check of ``job`` ('prepare', 'train', 'render', 'serve', 'demo') on ``cfg``."""
    check_outputs(job, cfg)
    if getattr(cfg, "model", None) is not None:
        check_devices(job, cfg)
    storage = Storage(getattr(cfg, "storage", None))
    check_inputs(job, cfg, storage)
    if getattr(cfg, "model", None) is not None:
        check_model(cfg.model, storage)


# --------------------------------------------------------------------------- the model
def model_config_error(e: Exception) -> ConfigError:
    """A loader error as ``model.<field>: <problem>`` on one line."""
    text = " ".join(str(e).split())
    m = _FIELD_PREFIX.match(text)
    if m:
        return ConfigError(m.group(1), text[m.end():])
    return ConfigError("model.pretrained", text)


def check_model(model_cfg, storage: Storage) -> None:
    """``model.pretrained`` is a diffusers dir of the configured family (fetched or built into
    the model cache if needed, as the job itself would)."""
    from rayimg.models.loader import ModelLoadError, check_family, resolve_model_dir

    try:
        check_family(model_cfg, resolve_model_dir(model_cfg, storage))
    except ModelLoadError as e:
        raise model_config_error(e) from None


# --------------------------------------------------------------------------- devices
def cluster_address(cfg) -> str | None:
    cluster = getattr(cfg, "cluster", None)
    return (cluster.address if cluster is not None else None) or os.environ.get("RAY_ADDRESS") or None


def check_devices(job: str, cfg) -> None:
    """On a local cluster, whatever runs the model runs on this machine: a GPU asked for must be
    here. On a remote cluster the driver cannot tell, so nothing is checked."""
    import torch

    if cluster_address(cfg) or torch.cuda.is_available():
        return
    from rayimg.models.loader import ModelLoadError, resolve_dtype

    here = "this machine has no CUDA GPU and the job would start a local Ray cluster on it"
    if cfg.model.device == "cuda":
        raise ConfigError("model.device", f"is 'cuda' but {here}; use 'auto' or 'cpu', or submit the job to a GPU cluster (RAY_ADDRESS)")
    try:
        resolve_dtype(cfg.model.dtype, "cpu")
    except ModelLoadError as e:
        raise model_config_error(e) from None
    if cfg.cluster.num_gpus:  # GPUs declared by hand: Ray schedules on them as told
        return
    if job == "train" and cfg.scaling.use_gpu:
        name, value = "scaling.use_gpu", "true"
    elif job == "render" and cfg.num_gpus_per_actor > 0:
        name, value = "num_gpus_per_actor", cfg.num_gpus_per_actor
    elif job == "prepare" and cfg.cache.num_gpus_per_actor > 0:
        name, value = "cache.num_gpus_per_actor", cfg.cache.num_gpus_per_actor
    elif job == "serve" and cfg.num_gpus_per_replica > 0:
        name, value = "num_gpus_per_replica", cfg.num_gpus_per_replica
    else:
        return
    raise ConfigError(name, f"is {value} but {here}, so no worker could ever be placed; ask for CPUs, or submit the job "
                            "to a GPU cluster (RAY_ADDRESS)")


# --------------------------------------------------------------------------- inputs
def _input_fields(job: str, cfg) -> list[tuple[str, str, str]]:
    """(field, uri, what) of the inputs a job reads; what is 'file', 'dir' or 'any'."""
    if job == "prepare":
        out = [("data.source", cfg.data.source, "any")]
        if cfg.data.class_source:
            out.append(("data.class_source", cfg.data.class_source, "dir"))
        return out
    if job == "train":
        # data.class_source may not exist yet: the job generates its class images there
        return [("cache", cfg.cache, "dir")] if cfg.cache else [("data.source", cfg.data.source, "any")]
    if job == "render":
        return [("catalog.source", cfg.catalog.source, "file")]
    return []


def check_inputs(job: str, cfg, storage: Storage) -> None:
    for name, uri, what in _input_fields(job, cfg):
        problem = _unreadable(storage, uri, what)
        if problem:
            raise ConfigError(name, f"{uri}: {problem}")


def _unreadable(storage: Storage, uri: str, what: str) -> str | None:
    """Why ``uri`` cannot be read (None: it can)."""
    if is_s3(uri):
        try:
            if what != "dir" and storage.exists(uri):
                return None
            if what != "file" and storage.list_info(uri.rstrip("/")):
                return None
        except (OSError, ValueError) as e:
            return " ".join(f"cannot be read: {e}".split())
        return "no such object" if what == "file" else "no such object or prefix"
    path = os.path.expanduser(uri[len("file://"):] if uri.startswith("file://") else uri)
    where = f" (relative to {os.getcwd()})" if not os.path.isabs(path) else ""
    if not os.path.exists(path):
        return f"does not exist{where}"
    if what == "file" and not os.path.isfile(path):
        return "is a directory, not a file"
    if what == "dir" and not os.path.isdir(path):
        return "is a file, not a directory"
    if not os.access(path, os.R_OK | (os.X_OK if os.path.isdir(path) else 0)):
        return "is not readable by this user"
    return None


# --------------------------------------------------------------------------- outputs under `ray job submit`
def submitted_working_dir() -> str | None:
    """The working dir of the `ray job submit` this process runs as, if any."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return None
    try:
        runtime_env = json.loads(raw).get("runtime_env") or {}
    except (ValueError, AttributeError):
        return None
    return runtime_env.get("working_dir") or None


def check_outputs(job: str, cfg) -> None:
    if not submitted_working_dir():
        return
    for name in OUTPUT_FIELDS.get(job, ()):
        if name == "image_cache.uri" and not cfg.image_cache.enabled:
            continue
        value = cfg
        for part in name.split("."):
            value = getattr(value, part, None)
        if not isinstance(value, str) or not value or "://" in value or os.path.isabs(os.path.expanduser(value)):
            continue
        raise ConfigError(name, f"{value!r} is a relative path, and this job runs in Ray's temporary copy of the submitted "
                                f"working dir ({os.getcwd()}), which Ray deletes; pass an absolute path or an s3:// URI")
