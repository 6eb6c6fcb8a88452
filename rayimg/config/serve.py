"""`rayimg serve`: autoscaling, the adapter and image caches, HTTP."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, Optional

from rayimg.configbase import check, field
from rayimg.config.common import ClusterConfig, ModelConfig, StorageConfig, _check_uri
from rayimg.config.render import EngineConfig, GenerationConfig, LimitsConfig, _check_defaults_within_limits

@dataclass
class BatchingConfig:
    """How a generator replica batches txt2img requests."""

    mode: Literal["step", "request"] = field("step", doc="'step': a request joins the running batch at the next denoising step and "
                                                         "leaves after its own steps, with its own adapters and scales (per-sample LoRA "
                                                         "from GPU adapter slots; base weights untouched); 'request': requests with the "
                                                         "same adapter set are batched and the set is fused into the weights. img2img "
                                                         "always takes the 'request' path")
    max_batch: int = field(8, doc="images denoised together in step mode")
    pad_to: list[int] = field(default_factory=lambda: [1, 2, 4, 8],
                              doc="batch sizes a step is padded up to, so a compiled UNet sees a few static shapes (empty: no padding)")
    num_slots: int = field(16, doc="adapters held in GPU slots at once in step mode (least recently used unpinned one is replaced)")
    max_rank: int = field(32, doc="largest LoRA rank a slot takes; an adapter of a larger rank is refused (422)")
    max_adapters: int = field(2, doc="most adapters one request combines in step mode")
    slot_targets: Optional[list[str]] = field(
        None, doc="UNet module names (as in train.lora.target_modules) that get adapter slots in step mode; a request whose adapters "
                  "adapt any other module takes the fused path instead. null: the target_modules the registry's adapters record "
                  "(adapter.json) when the replica starts, or every module type when one records none or the registry is empty. "
                  "Fewer targets: less GPU memory per slot and less work per denoising step")
    shared_graph: bool = field(False, doc="step mode with engine.compile: one compiled UNet step graph for every pad_to size (the "
                                          "batch dimension traced as dynamic), so a replica compiles once instead of once per size "
                                          "and records a CUDA graph per size; off: one static graph per size. Slots on convolutions "
                                          "(slot_targets naming conv layers) pin the batch, and each size compiles as when off. The "
                                          "one graph takes about twice as long to compile as one per-size graph, so it pays from "
                                          "three sizes on; its step time against per-size graphs is not yet measured")
    fuse_alone: bool = field(True, doc="step mode: a step with one request in it, run at batch 1 (pad_to holds 1), renders with "
                                       "that request's adapters fused into the UNet weights and the base model's step instead of "
                                       "the adapter slots' per-sample products; the next step with more requests restores the base "
                                       "weights (one adapter swap each way). Adapters that touch the text encoders keep the slots")
    warm_up: bool = field(True, doc="at replica start, compile (or load from the compile cache) the step loop's graphs for every "
                                    "pad_to size at the default width/height and guidance, so no request waits on a compile; "
                                    "only with engine.compile or engine.compile_vae")

    def validate(self) -> None:
        for name in ("max_batch", "num_slots", "max_rank", "max_adapters"):
            check(getattr(self, name) >= 1, name, "must be >= 1")
        check(all(isinstance(b, int) and b >= 1 for b in self.pad_to), "pad_to", "must be positive integers")
        check(not self.pad_to or max(self.pad_to) >= self.max_batch, "pad_to", f"the largest size must be >= max_batch ({self.max_batch})")
        if self.slot_targets is not None:
            from rayimg.config.train import LORA_TARGETS

            check(len(self.slot_targets) > 0, "slot_targets", "must name at least one module (null: what the registry's adapters record)")
            for t in self.slot_targets:
                check(t in LORA_TARGETS, "slot_targets", f"unknown module {t!r}; allowed: {', '.join(LORA_TARGETS)}")


@dataclass
class AutoscalingConfig:
    """Ray Serve autoscaling of the generator replicas on queue depth: Serve adds replicas while
    the requests per replica (ongoing at the replicas plus queued at the ingress waiting for
    one, averaged over ``look_back_period_s``) stay above ``target_ongoing_requests`` for
    ``upscale_delay_s``, and removes them while they stay below for ``downscale_delay_s``."""

    min_replicas: int = field(1, doc="fewest replicas (0 allows scale to zero)")
    max_replicas: int = field(1, doc="most replicas")
    target_ongoing_requests: Optional[float] = field(
        None, doc="requests per replica (ongoing plus queued) autoscaling aims for; default: a full batch, i.e. batching.max_batch "
                  "in step mode or http.max_batch_size in request mode, at most http.max_ongoing_requests")
    upscale_delay_s: float = field(10.0, doc="how long the load must stay above the target before replicas are added (a GPU replica "
                                             "takes a while to start, so a short burst should not start one)")
    downscale_delay_s: float = field(300.0, doc="how long the load must stay below the target before replicas are removed")
    look_back_period_s: float = field(30.0, doc="window over which the requests per replica are averaged; longer than Serve's "
                                                "metrics push interval (RAY_SERVE_*_AUTOSCALING_METRIC_PUSH_INTERVAL_S, 10 s by default)")

    def validate(self) -> None:
        check(self.min_replicas >= 0, "min_replicas", "must be >= 0")
        check(self.max_replicas >= max(1, self.min_replicas), "max_replicas", "must be >= min_replicas and >= 1")
        check(self.target_ongoing_requests is None or self.target_ongoing_requests > 0, "target_ongoing_requests", "must be > 0")
        for name in ("upscale_delay_s", "downscale_delay_s"):
            check(getattr(self, name) >= 0, name, "must be >= 0")
        check(self.look_back_period_s > 0, "look_back_period_s", "must be > 0")


@dataclass
class RoutingConfig:
    """How the ingress picks a generator replica (serving/routing.py)."""

    affinity_slack: int = field(2, doc="a replica holding a request's adapters gets it while its ongoing requests exceed the least "
                                       "loaded replica's by at most this many; past that the least loaded replica takes it (and "
                                       "loads the adapters), so a popular adapter spreads over replicas instead of queueing on "
                                       "one. 0: strict load balance, affinity only breaks ties")

    def validate(self) -> None:
        check(self.affinity_slack >= 0, "affinity_slack", "must be >= 0")


@dataclass
class AdapterCacheConfig:
    """Per-replica adapter cache tiers (storage -> disk -> CPU -> GPU), LRU in each."""

    disk_dir: Optional[str] = field(None, doc="local disk tier; default ~/.cache/rayimg/adapters", path=True)
    disk_max_adapters: int = field(1000, doc="adapters kept on local disk")
    disk_max_bytes: int = field(20 * 2**30, doc="disk tier bound in bytes")
    cpu_max_adapters: int = field(32, doc="adapters held as CPU tensors")
    cpu_max_bytes: int = field(8 * 2**30, doc="CPU tier bound in bytes")
    gpu_max_adapters: int = field(4, doc="adapter sets resident on the GPU (the multiplexed models per replica); also bounds single adapters held there")
    gpu_max_bytes: int = field(2 * 2**30, doc="GPU tier bound in bytes (adapter weights copied to the device)")
    refresh_s: float = field(30.0, doc="how often 'latest' versions are re-resolved from the registry")

    def validate(self) -> None:
        for name in ("disk_max_adapters", "disk_max_bytes", "cpu_max_adapters", "cpu_max_bytes", "gpu_max_adapters", "gpu_max_bytes"):
            check(getattr(self, name) >= 1, name, "must be >= 1")
        check(self.refresh_s >= 0, "refresh_s", "must be >= 0")


@dataclass
class ImageCacheConfig:
    """Answer repeated requests from storage by output key."""

    enabled: bool = field(False, doc="look up and store rendered images by output key")
    uri: str = field("outputs/image-cache", doc="cache dir or s3:// prefix", path=True)

    def validate(self) -> None:
        _check_uri(self.uri, "uri")


@dataclass
class HttpConfig:
    """HTTP front end."""

    host: str = field("127.0.0.1", doc="bind address")
    port: int = field(8000, doc="port")
    route_prefix: str = field("/", doc="route prefix of the app")
    api_key_env: Optional[str] = field(None, doc="env var holding the Bearer API key; unset disables auth")
    max_batch_size: int = field(4, doc="compatible requests batched together")
    batch_wait_timeout_s: float = field(0.05, doc="how long a batch waits to fill")
    max_ongoing_requests: int = field(8, doc="requests a replica works on at once")
    max_queued_requests: int = field(16, doc="requests queued for the generator replicas before 503")
    retry_after_s: int = field(5, doc="Retry-After (seconds) sent with a 503 when the queue is full")
    request_timeout_s: float = field(120.0, doc="per-request timeout: 504 after it, and the request's rendering stops at the next "
                                     "denoising step; a request may ask for less with timeout_s")

    def validate(self) -> None:
        check(1 <= self.port <= 65535, "port", f"must be in 1..65535, got {self.port}")
        check(self.route_prefix.startswith("/"), "route_prefix", "must start with '/'")
        for name in ("max_batch_size", "max_ongoing_requests", "max_queued_requests"):
            check(getattr(self, name) >= 1, name, "must be >= 1")
        check(self.batch_wait_timeout_s >= 0, "batch_wait_timeout_s", "must be >= 0")
        check(self.request_timeout_s > 0, "request_timeout_s", "must be > 0")
        check(self.retry_after_s >= 0, "retry_after_s", "must be >= 0")
        check(self.api_key_env is None or bool(re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", self.api_key_env)), "api_key_env",
              f"must be an environment variable name, got {self.api_key_env!r}")
        check(self.max_ongoing_requests >= self.max_batch_size, "max_ongoing_requests",
              f"must be >= max_batch_size ({self.max_batch_size}), or batches can never fill")


@dataclass
class ServeJob:
    """`rayimg serve`: the HTTP endpoint on Ray Serve."""

    model: ModelConfig = field(default_factory=ModelConfig, doc="base model")
    storage: StorageConfig = field(default_factory=StorageConfig, doc="object storage settings")
    cluster: ClusterConfig = field(default_factory=ClusterConfig, doc="Ray cluster")
    registry: str = field("outputs/registry", doc="adapter registry root", path=True)
    defaults: GenerationConfig = field(default_factory=GenerationConfig, doc="defaults for requests")
    limits: LimitsConfig = field(default_factory=lambda: LimitsConfig(max_width=1024, max_height=1024, max_steps=50, max_num_images=4),
                                 doc="bounds on requests (defaults sized for one GPU per replica; lower them for CPU replicas)")
    engine: EngineConfig = field(default_factory=EngineConfig, doc="generation engine")
    http: HttpConfig = field(default_factory=HttpConfig, doc="HTTP front end")
    batching: BatchingConfig = field(default_factory=BatchingConfig, doc="how replicas batch requests (step-level, per-sample adapters)")
    autoscaling: AutoscalingConfig = field(default_factory=AutoscalingConfig, doc="replica autoscaling on queue depth")
    routing: RoutingConfig = field(default_factory=RoutingConfig, doc="which replica a request goes to (adapter affinity, load)")
    adapter_cache: AdapterCacheConfig = field(default_factory=AdapterCacheConfig, doc="adapter cache tiers")
    image_cache: ImageCacheConfig = field(default_factory=ImageCacheConfig, doc="image cache by output key")
    num_gpus_per_replica: float = field(0.0, doc="GPUs per generator replica (1.0 on a GPU cluster)")
    num_cpus_per_replica: float = field(1.0, doc="CPUs per generator replica")
    num_cpus_ingress: float = field(0.25, doc="CPUs of the HTTP ingress replica (parses, checks and routes requests)")
    app_name: str = field("rayimg", doc="Ray Serve application name")

    def validate(self) -> None:
        _check_uri(self.registry, "registry")
        check(self.num_gpus_per_replica >= 0, "num_gpus_per_replica", "must be >= 0")
        check(self.num_cpus_per_replica > 0, "num_cpus_per_replica", "must be > 0")
        check(self.num_cpus_ingress > 0, "num_cpus_ingress", "must be > 0")
        check(bool(re.match(r"^[A-Za-z0-9_-]+$", self.app_name)), "app_name", f"must be letters, digits, '_' or '-', got {self.app_name!r}")
        _check_defaults_within_limits(self.defaults, self.limits)
        target = self.autoscaling.target_ongoing_requests
        check(target is None or target <= self.http.max_ongoing_requests, "autoscaling.target_ongoing_requests",
              f"must be <= http.max_ongoing_requests ({self.http.max_ongoing_requests}): a replica never holds more, so the target "
              "would be reached only by queueing at the ingress")

    def autoscaling_target(self) -> float:
        """autoscaling.target_ongoing_requests, or its default: a full batch per replica."""
        if self.autoscaling.target_ongoing_requests is not None:
            return self.autoscaling.target_ongoing_requests
        batch = self.batching.max_batch if self.batching.mode == "step" else self.http.max_batch_size
        return float(min(batch, self.http.max_ongoing_requests))
