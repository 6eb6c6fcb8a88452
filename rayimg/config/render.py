"""`rayimg render`: generation defaults and limits, the engine, the catalog and outputs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from rayimg.configbase import check, field
from rayimg.config.common import ClusterConfig, ModelConfig, SCHEDULERS, StorageConfig, _check_uri

# --------------------------------------------------------------------------- render / serve
@dataclass
class GenerationConfig:
    """Default generation parameters (a catalog row or request overrides each)."""

    negative_prompt: str = field("", doc="negative prompt")
    steps: int = field(30, doc="sampling steps")
    guidance_scale: float = field(7.5, doc="classifier-free guidance scale (<= 1 disables CFG)")
    width: int = field(512, doc="image width (multiple of 8)")
    height: int = field(512, doc="image height (multiple of 8)")
    scheduler: str = field("euler", doc=f"scheduler: {', '.join(SCHEDULERS)}")
    seed: int = field(0, doc="seed when a row has none")

    def validate(self) -> None:
        check(self.steps >= 1, "steps", f"must be >= 1, got {self.steps}")
        check(self.guidance_scale >= 0, "guidance_scale", "must be >= 0")
        for name in ("width", "height"):
            v = getattr(self, name)
            check(v >= 8 and v % 8 == 0, name, f"must be a positive multiple of 8, got {v}")
        check(self.scheduler in SCHEDULERS, "scheduler", f"unknown scheduler {self.scheduler!r}; allowed: {', '.join(SCHEDULERS)}")
        check(self.seed >= 0, "seed", "must be >= 0")


@dataclass
class LimitsConfig:
    """Bounds on what a row or request may ask for."""

    max_width: int = field(2048, doc="largest width")
    max_height: int = field(2048, doc="largest height")
    max_steps: int = field(100, doc="most sampling steps")
    max_num_images: int = field(4, doc="most images per request")
    max_init_image_pixels: int = field(4096 * 4096, doc="most pixels an init image may declare (width x height, read from its "
                                       "header before anything is decoded)")

    def validate(self) -> None:
        for name in ("max_width", "max_height", "max_steps", "max_num_images", "max_init_image_pixels"):
            check(getattr(self, name) >= 1, name, "must be >= 1")


def _check_defaults_within_limits(defaults: GenerationConfig, limits: LimitsConfig) -> None:
    check(defaults.width <= limits.max_width, "defaults.width", f"must be <= limits.max_width ({limits.max_width})")
    check(defaults.height <= limits.max_height, "defaults.height", f"must be <= limits.max_height ({limits.max_height})")
    check(defaults.steps <= limits.max_steps, "defaults.steps", f"must be <= limits.max_steps ({limits.max_steps})")


@dataclass
class EngineConfig:
    """The generation engine shared by render and serve (speed figures: docs/BENCHMARKS.md)."""

    batch_size: int = field(1, doc="images generated together")
    vae_slicing: bool = field(False, doc="decode the batch one image at a time (least decoder memory)")
    vae_tiling: bool = field(False, doc="decode in tiles (large images)")
    vae_batch: int = field(16, doc="the VAE decodes at most this many images at once (0: the whole batch): bounds the "
                                   "decoder's memory (and a compiled decoder's graphs) for large batches; pixels unchanged")
    attention_slicing: bool = field(False, doc="compute attention in slices (less memory, slower)")
    compile: bool = field(False, doc="torch.compile the UNet (adapters swap without recompiling); use on a GPU for long runs: the first call of each batch and image size compiles")
    compile_mode: Literal["default", "reduce-overhead", "max-autotune-no-cudagraphs"] = field(
        "default", doc="torch.compile mode of the UNet: 'reduce-overhead' replays CUDA graphs, which helps most at small batches, where the step is launch-bound (adapters still swap in place); with it, a prompt's encode by the text encoders replays a CUDA graph too (rayimg.render.text_graphs)")
    compile_vae: bool = field(False, doc="torch.compile the VAE decoder (one graph per batch and image size), with its GroupNorm statistics from cuBLAS products and its attention as float32-score GEMMs + softmax (rayimg.render.vae_decode); use on a GPU with large batches")
    fp8: bool = field(False, doc="float8 matmuls for the UNet's LayerNorm-fed linears (self-attention q/k/v, cross-attention q, feed-forward GEGLU proj; H100/Ada GPUs with a bfloat16 model, or CPU); faster with compile; pixels differ slightly from bf16, so the output key records it")
    fuse_qkv: bool = field(False, doc="fuse each attention's q/k/v projections into one matmul (adapters still apply)")
    channels_last: bool = field(False, doc="UNet in channels-last memory format: faster with compile, slower eager")
    batch_invariant: bool = field(True, doc="render each image in its own pipeline call so it is byte-identical whatever batch it lands in (GPU kernels pick algorithms by batch size); false batches for throughput")

    compile_cache: str = field("", doc="dir or s3:// prefix of the compiled-graph cache (rayimg.render.compile_cache): with compile or compile_vae, "
                                       "each batch and image size loads its compiled graphs from here, or compiles and saves them, so later actors and jobs start warm; "
                                       "empty: the render job uses <output.uri>/.compile-cache, the server <image_cache.uri>/.compile-cache", path=True)
    png_compress_level: int = field(1, doc="zlib level of the PNGs, 0-9: 1 encodes several times faster than 6 for files somewhat larger; the pixels are the same")

    def validate(self) -> None:
        check(self.batch_size >= 1, "batch_size", "must be >= 1")
        check(self.vae_batch >= 0, "vae_batch", f"must be >= 0 (0: the whole batch), got {self.vae_batch}")
        check(0 <= self.png_compress_level <= 9, "png_compress_level", f"must be 0-9, got {self.png_compress_level}")
        if self.compile_cache:
            _check_uri(self.compile_cache, "compile_cache")


@dataclass
class CatalogConfig:
    """The prompt catalog of a bulk render."""

    source: str = field("", doc="JSONL, CSV or Parquet file (local or s3://)", path=True)
    format: Literal["auto", "jsonl", "csv", "parquet"] = field("auto", doc="'auto' uses the file extension")

    def validate(self) -> None:
        if self.source:
            _check_uri(self.source, "source")


@dataclass
class RenderOutputConfig:
    """Where rendered images and the manifest go."""

    uri: str = field("outputs/render", doc="output dir or s3:// prefix", path=True)

    def validate(self) -> None:
        _check_uri(self.uri, "uri")


@dataclass
class RenderJob:
    """`rayimg render`: bulk offline rendering of a prompt catalog."""

    model: ModelConfig = field(default_factory=ModelConfig, doc="base model")
    storage: StorageConfig = field(default_factory=StorageConfig, doc="object storage settings")
    cluster: ClusterConfig = field(default_factory=ClusterConfig, doc="Ray cluster")
    registry: str = field("outputs/registry", doc="adapter registry root", path=True)
    catalog: CatalogConfig = field(default_factory=CatalogConfig, doc="prompt catalog")
    defaults: GenerationConfig = field(default_factory=GenerationConfig, doc="defaults for catalog rows")
    limits: LimitsConfig = field(default_factory=LimitsConfig, doc="bounds on rows")
    engine: EngineConfig = field(default_factory=EngineConfig, doc="generation engine")
    output: RenderOutputConfig = field(default_factory=RenderOutputConfig, doc="outputs")
    concurrency: int = field(1, doc="render actors")
    num_gpus_per_actor: float = field(0.0, doc="GPUs per render actor (1.0 on a GPU cluster)")
    actor_resources: dict[str, float] = field(default_factory=dict, doc="custom Ray resources per render actor (e.g. {'render_slot': 1}): places actors on the nodes that have them")
    unit_batches: int = field(4, doc="engine batches per work unit: the rows of one batch key are cut into units of this many batches, each handed to one actor")
    progress_interval_s: float = field(10.0, doc="seconds between progress lines (rows done / total, images/s, ETA, per-actor counts)")
    keep_warm_s: float = field(0.0, doc="on a running Ray cluster (RAY_ADDRESS, `ray job submit`): keep the render actors, their model "
                               "loaded and graphs compiled, this many idle seconds after the job, holding their GPUs, so the next job "
                               "with the same model, engine, registry and storage renders at once; 0: the actors end with the job "
                               "(a local cluster ends with the job anyway)")

    def validate(self) -> None:
        _check_uri(self.registry, "registry")
        check(bool(self.catalog.source), "catalog.source", "is required: the prompt catalog file")
        check(self.concurrency >= 1, "concurrency", "must be >= 1")
        check(self.num_gpus_per_actor >= 0, "num_gpus_per_actor", "must be >= 0")
        check(all(v >= 0 for v in self.actor_resources.values()), "actor_resources", "amounts must be >= 0")
        check(self.unit_batches >= 1, "unit_batches", "must be >= 1")
        check(self.progress_interval_s > 0, "progress_interval_s", "must be > 0")
        check(self.keep_warm_s >= 0, "keep_warm_s", "must be >= 0 (seconds)")
        _check_defaults_within_limits(self.defaults, self.limits)
