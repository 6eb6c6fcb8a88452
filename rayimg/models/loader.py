"""One loader for every base model: local diffusers dirs, s3:// prefixes, hub ids and the
project's tiny models.

Each source is first turned into a local diffusers-format dir (:func:`resolve_model_dir`),
then loaded the same way (:func:`load_pipeline`): the concrete StableDiffusionPipeline or
StableDiffusionXLPipeline class, safetensors only, moved to the configured device and dtype.

Cache layout (``model.cache_dir``, else ``$RAYIMG_CACHE/models``, else ``~/.cache/rayimg/models``)::

    s3/<sha(uri)>-<sha(listing)>/   an s3:// model, keyed by its URI and its objects' (key, size, etag)
    tiny/<name>-v1/                 the project's tiny models, built on first use
    hashes/<sha(dir)>.json          content hashes, reused while the files' sizes and mtimes hold

Every failure raises :class:`ModelLoadError` naming the source and, where a setting is wrong,
the config field.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from rayimg.models.tiny import PRETRAINED_MODELS, TINY_MODELS, ensure_tiny, pretrained_dir

if TYPE_CHECKING:
    from rayimg.config import ModelConfig, StorageConfig
    from rayimg.storage import Storage

__all__ = [
    "ModelLoadError", "LoadedModel", "models_cache_dir", "resolve_model_dir", "detect_family",
    "check_family", "resolve_device", "resolve_dtype", "load_pipeline", "load_model",
    "model_id_and_hash", "hash_model_dir", "pipeline_class",
]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
# Files that define a model; everything else in a dir (READMEs, images, .bin/.ckpt that are
# never loaded, hidden bookkeeping) stays out of its content hash.
_HASHED_SUFFIXES = (".json", ".txt", ".safetensors", ".model")
_SD_CLASS_RE = re.compile(r"^StableDiffusion(Img2Img|Inpaint|ControlNet|ControlNetImg2Img|ControlNetInpaint)?Pipeline$")
_SDXL_CLASS_RE = re.compile(r"^StableDiffusionXL(Img2Img|Inpaint|ControlNet|ControlNetImg2Img|ControlNetInpaint)?Pipeline$")


class ModelLoadError(ValueError):
    """A base model could not be found, fetched or loaded; the message names the source."""


@dataclass
class LoadedModel:
    """A loaded pipeline and where it came from (what adapters and output keys record)."""

    pipeline: Any
    family: str
    model_dir: Path
    model_id: str
    model_hash: str
    device: torch.device
    dtype: torch.dtype


# --------------------------------------------------------------------------- where models live
def models_cache_dir(cfg: "ModelConfig | None" = None) -> Path:
    """``model.cache_dir``, else ``$RAYIMG_CACHE/models``, else ``~/.cache/rayimg/models``."""
    if cfg is not None and cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    root = os.environ.get("RAYIMG_CACHE") or "~/.cache/rayimg"
    return Path(root).expanduser() / "models"


def _local_model_dir(path: Path, source: str) -> Path:
    if not path.exists():
        raise ModelLoadError(f"model.pretrained: model dir {source!r} does not exist ({path.absolute()})")
    if not path.is_dir():
        raise ModelLoadError(f"model.pretrained: {source!r} is a file, not a diffusers model dir ({path.absolute()})")
    if not (path / "model_index.json").is_file():
        raise ModelLoadError(f"model.pretrained: {path} has no model_index.json; it is not a diffusers-format model dir")
    return path.resolve()


def resolve_model_dir(cfg: "ModelConfig", storage: "Storage | StorageConfig | None" = None) -> Path:
    """The local diffusers-format dir of ``cfg.pretrained``, fetching or building it if needed.

    - ``rayimg-tiny-sd`` / ``rayimg-tiny-sdxl``: built once into the cache;
    - ``rayimg-tiny-shapes``: the trained shapes model committed under ``rayimg/models/pretrained/``;
    - a local dir or ``file://`` URI: that dir;
    - ``s3://bucket/prefix``: downloaded once per URI and content into the cache;
    - anything else is a Hugging Face hub id (refused when the hub is offline).
    """
    source = cfg.pretrained.strip()
    if not source:
        raise ModelLoadError("model.pretrained: empty; name a model dir, s3:// URI or hub id")
    if source in TINY_MODELS:
        return ensure_tiny(source, models_cache_dir(cfg))
    if source in PRETRAINED_MODELS:
        try:
            return pretrained_dir(source)
        except FileNotFoundError as e:
            raise ModelLoadError(f"model.pretrained: {e}") from e
    if source.startswith("file://"):
        return _local_model_dir(Path(source[len("file://"):]).expanduser(), source)
    if source.startswith("s3://"):
        return _s3_model_dir(source, cfg, storage)
    if "://" in source:
        raise ModelLoadError(f"model.pretrained: {source!r} has an unsupported URI scheme; use a local dir, file:// or s3://")
    path = Path(source).expanduser()
    if path.exists() or not _HUB_ID_RE.match(source):
        return _local_model_dir(path, source)
    return _hub_model_dir(source, cfg)


def _s3_model_dir(uri: str, cfg: "ModelConfig", storage: "Storage | StorageConfig | None") -> Path:
    from rayimg.storage import Storage, content_hash

    if storage is None or not isinstance(storage, Storage):
        storage = Storage(storage)
    prefix = uri.rstrip("/")
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not bucket or not key.strip("/"):
        raise ModelLoadError(f"model.pretrained: {uri!r} names no model prefix (expected s3://bucket/prefix)")
    try:
        infos = storage.list_info(prefix)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"model.pretrained: cannot list {prefix}: {e}") from e
    if not infos:
        raise ModelLoadError(f"model.pretrained: no objects under {prefix}")
    if not any(i.uri == prefix + "/model_index.json" for i in infos):
        raise ModelLoadError(f"model.pretrained: {prefix} has no model_index.json; it is not a diffusers-format model")

    entry = f"{_sha256(prefix.encode())[:16]}-{content_hash(infos)[:16]}"
    target = models_cache_dir(cfg) / "s3" / entry
    if (target / "model_index.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{entry}.", suffix=".tmp"))
    try:
        from rayimg.storage import dir_mode

        os.chmod(tmp, dir_mode())  # the cached model is readable like any directory the user makes
        try:
            storage.download_prefix(prefix, tmp)
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"model.pretrained: downloading {prefix} failed: {e}") from e
        for info in infos:
            local = tmp / info.uri[len(prefix) + 1:]
            if not local.is_file() or local.stat().st_size != info.size:
                raise ModelLoadError(f"model.pretrained: {info.uri} changed or vanished while {prefix} was downloaded; retry")
        _rename_into_place(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _rename_into_place(tmp: Path, target: Path) -> None:
    try:
        os.rename(tmp, target)
    except OSError as e:
        # Another process put the same content there first.
        if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise


def _hub_offline() -> bool:
    def true(name: str) -> bool:
        return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")

    if true("HF_HUB_OFFLINE") or true("TRANSFORMERS_OFFLINE"):
        return True
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(constants.HF_HUB_OFFLINE)


def _hub_patterns(variant: str | None) -> tuple[list[str], list[str]]:
    """Configs, tokenizers and the safetensors of one variant; never pickles or other frameworks."""
    allow = ["model_index.json", "*/*.json", "*/*.txt", "*/*.model"]
    if variant:
        return allow + [f"*/*.{variant}.safetensors", f"*/*.{variant}-*.safetensors"], []
    return allow + ["*/*.safetensors"], ["*.fp16.safetensors", "*.fp16-*.safetensors", "*.bf16.safetensors", "*.bf16-*.safetensors"]


def _hub_model_dir(repo_id: str, cfg: "ModelConfig") -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover - a dependency of diffusers
        raise ModelLoadError(f"model.pretrained: {repo_id!r} looks like a hub id but huggingface_hub is not installed") from e
    from huggingface_hub import constants as hub_constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    allow, ignore = _hub_patterns(cfg.variant)
    offline = _hub_offline()
    taken = f"model.pretrained: {repo_id!r} is not a local dir, so it was taken as a Hugging Face hub id"
    instead = "pass a local diffusers model dir or an s3:// URI as model.pretrained"
    try:
        path = snapshot_download(repo_id, revision=cfg.revision, allow_patterns=allow, ignore_patterns=ignore, local_files_only=offline)
    except Exception as e:
        if offline:
            raise ModelLoadError(
                f"{taken}, which cannot be fetched while the hub is offline (HF_HUB_OFFLINE) and is not in the local "
                f"hub cache ({hub_constants.HF_HUB_CACHE}); {instead}"
            ) from e
        if isinstance(e, LocalEntryNotFoundError):  # no connection to the hub, and nothing cached
            reason = str(e).splitlines()[0].removeprefix("Got: ")
            raise ModelLoadError(
                f"{taken}; the hub cannot be reached ({reason}) and the local hub cache ({hub_constants.HF_HUB_CACHE}) "
                f"does not hold it; {instead}"
            ) from e
        raise ModelLoadError(
            f"{taken}; fetching it (revision {cfg.revision or 'main'}) failed: {' '.join(str(e).split())}"
        ) from e
    return _local_model_dir(Path(path), repo_id)


# --------------------------------------------------------------------------- what a model is
def detect_family(model_dir: str | os.PathLike) -> str:
    """'sd' or 'sdxl', from the ``_class_name`` in ``model_index.json``."""
    index_path = Path(model_dir) / "model_index.json"
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelLoadError(f"{index_path} does not exist; not a diffusers-format model dir") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{index_path} cannot be read: {e}") from e
    class_name = index.get("_class_name") if isinstance(index, dict) else None
    if isinstance(class_name, str) and _SDXL_CLASS_RE.match(class_name):
        return "sdxl"
    if isinstance(class_name, str) and _SD_CLASS_RE.match(class_name):
        return "sd"
    raise ModelLoadError(
        f"{index_path}: pipeline class {class_name!r} is not supported; rayimg loads Stable Diffusion 1.x/2.x "
        "(StableDiffusion*Pipeline) and SDXL (StableDiffusionXL*Pipeline) models"
    )


def check_family(cfg: "ModelConfig", model_dir: str | os.PathLike) -> str:
    """The model's family; a ``model.family`` other than 'auto' must agree with it."""
    family = detect_family(model_dir)
    if cfg.family not in ("auto", family):
        raise ModelLoadError(
            f"model.family is {cfg.family!r} but {cfg.pretrained!r} is an {family!r} model "
            f"(model_index.json in {model_dir}); set model.family to {family!r} or 'auto'"
        )
    return family


def pipeline_class(family: str):
    """The concrete diffusers pipeline class of a family."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    classes = {"sd": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}
    if family not in classes:
        raise ModelLoadError(f"model.family: unknown family {family!r}; one of {', '.join(classes)}")
    return classes[family]


# --------------------------------------------------------------------------- where it runs
def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """'auto' is CUDA when available, else the CPU; asking for CUDA without one is an error."""
    if isinstance(name, torch.device):
        name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise ModelLoadError(f"model.device: {name!r} is not a device; use 'auto', 'cpu' or 'cuda'") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"model.device is {name!r} but CUDA is not available on this machine ({socket.gethostname()}); "
                             "use 'auto' or 'cpu', or run where a GPU is")
    if device.type not in ("cpu", "cuda"):
        raise ModelLoadError(f"model.device: {name!r} is not supported; use 'auto', 'cpu' or 'cuda'")
    return device


def resolve_dtype(name: str | torch.dtype, device: str | torch.device) -> torch.dtype:
    """'auto' is bfloat16 on CUDA GPUs that support it, else float32; float16 needs CUDA."""
    device = torch.device(device)
    if isinstance(name, torch.dtype):
        dtype = name
    elif name == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    elif name in _DTYPES:
        dtype = _DTYPES[name]
    else:
        raise ModelLoadError(f"model.dtype: unknown dtype {name!r}; one of auto, {', '.join(_DTYPES)}")
    if dtype == torch.float16 and device.type == "cpu":
        raise ModelLoadError("model.dtype is float16, which the CPU does not run well (many ops lack half kernels); use float32 or bfloat16 on CPU")
    if dtype not in _DTYPES.values():
        raise ModelLoadError(f"model.dtype: {dtype} is not supported; one of {', '.join(_DTYPES)}")
    return dtype


# --------------------------------------------------------------------------- loading
def load_model(cfg: "ModelConfig", storage: "Storage | StorageConfig | None" = None) -> LoadedModel:
    """Resolve, check and load ``cfg``'s pipeline, with its id and content hash."""
    model_dir = resolve_model_dir(cfg, storage)
    family = check_family(cfg, model_dir)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    pipe = _from_pretrained(cfg, model_dir, family, device, dtype)
    model_id, model_hash = model_id_and_hash(cfg, model_dir)
    return LoadedModel(pipe, family, model_dir, model_id, model_hash, device, dtype)


def load_pipeline(cfg: "ModelConfig", storage: "Storage | StorageConfig | None" = None):
    """The StableDiffusionPipeline or StableDiffusionXLPipeline of ``cfg``, on its device and dtype."""
    model_dir = resolve_model_dir(cfg, storage)
    family = check_family(cfg, model_dir)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    return _from_pretrained(cfg, model_dir, family, device, dtype)


def _from_pretrained(cfg: "ModelConfig", model_dir: Path, family: str, device: torch.device, dtype: torch.dtype):
    cls = pipeline_class(family)
    kwargs: dict[str, Any] = {}
    if family == "sd":
        # The safety checker is a separate 1.2 GB model that rendering here does not use.
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    if os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS", "").strip().lower() in ("1", "true", "yes", "on"):
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()  # diffusers' own bars ignore the hub's setting
    try:
        pipe = cls.from_pretrained(
            str(model_dir), dtype=dtype, use_safetensors=True, variant=cfg.variant, local_files_only=True, **kwargs
        )
    except Exception as e:
        raise ModelLoadError(f"model.pretrained: loading {cfg.pretrained!r} from {model_dir} as {cls.__name__} failed: {e}") from e
    return pipe.to(device)


# --------------------------------------------------------------------------- identity
def _model_id(cfg: "ModelConfig") -> str:
    """A stable name for the model source: the tiny name, the s3:// URI, the hub id (with
    @revision) or the local dir's absolute path; ``#variant`` when a variant is chosen."""
    source = cfg.pretrained.strip()
    if source in TINY_MODELS or source in PRETRAINED_MODELS:
        out = source
    elif source.startswith("s3://"):
        out = source.rstrip("/")
    elif source.startswith("file://"):
        out = str(Path(source[len("file://"):]).expanduser().resolve())
    elif Path(source).expanduser().exists() or not _HUB_ID_RE.match(source):
        out = str(Path(source).expanduser().resolve())
    else:
        out = source + (f"@{cfg.revision}" if cfg.revision else "")
    return out + (f"#{cfg.variant}" if cfg.variant else "")


def model_id_and_hash(cfg: "ModelConfig", model_dir: str | os.PathLike) -> tuple[str, str]:
    """(model id, sha256 of the model dir's configs, tokenizer files and weights)."""
    return _model_id(cfg), hash_model_dir(model_dir, models_cache_dir(cfg) / "hashes")


def _hashed_files(root: Path) -> list[tuple[str, Path]]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith(".") or not name.endswith(_HASHED_SUFFIXES):
                continue
            path = Path(dirpath) / name
            out.append((path.relative_to(root).as_posix(), path))
    return sorted(out)


def hash_model_dir(model_dir: str | os.PathLike, memo_dir: str | os.PathLike | None = None) -> str:
    """sha256 over the sorted relative paths and sha256s of the files that define the model.

    With ``memo_dir``, the result is remembered there and reused while every file keeps its
    size and mtime, so a multi-GB checkpoint is hashed once.
    """
    root = Path(model_dir).resolve()
    files = _hashed_files(root)
    if not files:
        raise ModelLoadError(f"{root}: no model files (configs, tokenizer files, safetensors) to hash")
    stats = [(rel, path.stat()) for rel, path in files]
    fingerprint = _sha256("".join(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n" for rel, st in stats).encode())
    memo = Path(memo_dir) / f"{_sha256(str(root).encode())[:32]}.json" if memo_dir is not None else None
    if memo is not None:
        try:
            saved = json.loads(memo.read_text())
            if saved.get("dir") == str(root) and saved.get("fingerprint") == fingerprint:
                return saved["sha256"]
        except (OSError, ValueError, KeyError, AttributeError):
            pass
    digest = hashlib.sha256()
    for rel, path in files:
        digest.update(f"{rel}\0{_file_sha256(path)}\n".encode())
    result = digest.hexdigest()
    if memo is not None:
        _write_json_atomic(memo, {"dir": str(root), "fingerprint": fingerprint, "sha256": result})
    return result


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        from rayimg.storage import file_mode

        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except OSError:
        # The memo only saves time; a read-only cache just means hashing again.
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
