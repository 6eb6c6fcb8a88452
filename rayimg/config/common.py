"""Config pieces every job shares: storage, model, cluster, names and URIs."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, Optional

from rayimg.configbase import ConfigError, check, field

ADAPTER_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
SCHEDULERS = ("euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "ddim", "unipc", "pndm")
DEFAULT_TINY_MODEL = "rayimg-tiny-sd"

Dtype = Literal["auto", "float32", "float16", "bfloat16"]


def _check_uri(value: str, name: str) -> None:
    check(isinstance(value, str) and value.strip() != "", name, "must be a non-empty path or URI")
    if "://" not in value and re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:/", value):
        raise ConfigError(name, f"{value!r} looks like a URI but lacks '://' (e.g. s3://bucket/prefix)")
    if "://" in value:
        scheme = value.split("://", 1)[0]
        check(scheme in ("s3", "file"), name, f"URI scheme {scheme!r} is not supported; use a local path, file:// or s3://")
        if scheme == "s3":
            check(len(value) > 5 and value[5] != "/", name, f"{value!r} has no bucket name (expected s3://bucket/prefix)")


# --------------------------------------------------------------------------- shared components
@dataclass
class StorageConfig:
    """How to reach object storage. Unset fields fall back to the standard AWS environment
    (AWS_ENDPOINT_URL, AWS_REGION/AWS_DEFAULT_REGION, AWS_ACCESS_KEY_ID, AWS_PROFILE, ...)."""

    endpoint_url: Optional[str] = field(None, doc="S3 endpoint, e.g. http://127.0.0.1:9000 for an S3-compatible store; default AWS_ENDPOINT_URL or AWS S3")
    region: Optional[str] = field(None, doc="S3 region; default AWS_REGION / AWS_DEFAULT_REGION or us-east-1")
    profile: Optional[str] = field(None, doc="named AWS profile from ~/.aws/credentials; default the standard chain")
    addressing_style: Literal["auto", "path", "virtual"] = field("auto", doc="S3 addressing style; 'path' for most self-hosted stores")
    multipart_threshold_mb: int = field(64, doc="objects at least this large upload as multipart (completed atomically)")

    def validate(self) -> None:
        if self.endpoint_url is not None:
            check(self.endpoint_url.startswith(("http://", "https://")), "endpoint_url", f"must start with http:// or https://, got {self.endpoint_url!r}")
        check(self.multipart_threshold_mb >= 5, "multipart_threshold_mb", "must be >= 5 (the S3 minimum part size)")


@dataclass
class ModelConfig:
    """The base model: one loader for local diffusers dirs, s3:// prefixes and hub ids."""

    pretrained: str = field(DEFAULT_TINY_MODEL, doc=f"local diffusers-format dir, s3://bucket/prefix, or a hub id; '{DEFAULT_TINY_MODEL}' / 'rayimg-tiny-sdxl' are the project's tiny models", path=True)
    family: Literal["auto", "sd", "sdxl"] = field("auto", doc="pipeline family; 'auto' reads model_index.json")
    dtype: Dtype = field("auto", doc="weights dtype; 'auto' is bfloat16 on GPUs that support it, else float32")
    device: Literal["auto", "cpu", "cuda"] = field("auto", doc="'auto' uses CUDA when available")
    revision: Optional[str] = field(None, doc="hub revision (hub ids only)")
    variant: Optional[str] = field(None, doc="weights variant, e.g. 'fp16'")
    cache_dir: Optional[str] = field(None, doc="where s3:// models are downloaded; default ~/.cache/rayimg/models or RAYIMG_CACHE", path=True)

    def validate(self) -> None:
        check(self.pretrained.strip() != "", "pretrained", "must name a model dir, s3:// URI or hub id")
        if "://" in self.pretrained:
            _check_uri(self.pretrained, "pretrained")


@dataclass
class ClusterConfig:
    """Which Ray cluster runs the job."""

    address: Optional[str] = field(None, doc="Ray address; default RAY_ADDRESS, else a local cluster started in-process")
    num_cpus: Optional[int] = field(None, doc="CPUs for a local in-process cluster (default: all)")
    num_gpus: Optional[int] = field(None, doc="GPUs for a local in-process cluster (default: all)")

    def validate(self) -> None:
        for name in ("num_cpus", "num_gpus"):
            v = getattr(self, name)
            check(v is None or v >= 0, name, "must be >= 0")
