"""Base models: one loader for local dirs, s3:// prefixes, hub ids and the project's tiny
models (see :mod:`rayimg.models.loader`), the tiny model family itself
(:mod:`rayimg.models.tiny`). Plain PyTorch/diffusers: nothing here imports Ray.
"""

from rayimg.models.loader import (
    LoadedModel,
    ModelLoadError,
    check_family,
    detect_family,
    hash_model_dir,
    load_model,
    load_pipeline,
    model_id_and_hash,
    models_cache_dir,
    pipeline_class,
    resolve_device,
    resolve_dtype,
    resolve_model_dir,
)
from rayimg.models.tiny import TINY_MODELS, build_tiny_sd, build_tiny_sdxl, ensure_tiny, load_tokenizer, save_tiny

__all__ = [
    "LoadedModel", "ModelLoadError", "check_family", "detect_family", "hash_model_dir", "load_model",
    "load_pipeline", "model_id_and_hash", "models_cache_dir", "pipeline_class", "resolve_device",
    "resolve_dtype", "resolve_model_dir", "TINY_MODELS", "build_tiny_sd", "build_tiny_sdxl",
    "ensure_tiny", "load_tokenizer", "save_tiny",
]
