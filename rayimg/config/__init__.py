"""Typed job configs: one dataclass per job, nested per component.

Load with :func:`load_job` (YAML file + dotted overrides such as ``train.learning_rate=5e-5``).
Every field documents itself; ``rayimg <job> --help-config`` prints them. Validation runs on
load, before any Ray work; a :class:`ConfigError` names the dotted field.
"""

from __future__ import annotations

from pathlib import Path

from rayimg.configbase import ConfigError, absolute_paths, describe, from_dict, load, to_dict  # noqa: F401

from rayimg.config.common import ADAPTER_NAME_RE, ClusterConfig, DEFAULT_TINY_MODEL, Dtype, ModelConfig, SCHEDULERS, StorageConfig  # noqa: F401
from rayimg.config.prepare import BucketConfig, CacheConfig, DataConfig, PrepareJob, TransformConfig  # noqa: F401
from rayimg.config.train import CheckpointConfig, DeepSpeedConfig, DreamBoothConfig, LORA_TARGETS, LoraConfig, PublishConfig, ScalingConfig, TextualInversionConfig, TrainConfig, TrainJob, ValidationConfig  # noqa: F401
from rayimg.config.render import CatalogConfig, EngineConfig, GenerationConfig, LimitsConfig, RenderJob, RenderOutputConfig  # noqa: F401
from rayimg.config.serve import AdapterCacheConfig, AutoscalingConfig, HttpConfig, ImageCacheConfig, ServeJob  # noqa: F401
from rayimg.config.demo import DemoConceptConfig, DemoJob  # noqa: F401


JOBS: dict[str, type] = {
    "prepare": PrepareJob,
    "train": TrainJob,
    "render": RenderJob,
    "serve": ServeJob,
    "demo": DemoJob,
}


def load_job(job: str, path: str | Path | None = None, overrides: list[str] | None = None):
    """Load and validate the config of ``job`` ('prepare', 'train', 'render', 'serve', 'demo')."""
    if job not in JOBS:
        raise ConfigError("", f"unknown job {job!r}; one of {', '.join(JOBS)}")
    return load(JOBS[job], path, overrides)

