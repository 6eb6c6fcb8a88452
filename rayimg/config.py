"""Typed job configs: one dataclass per job, nested per component.

Load with :func:`load_job` (YAML file + dotted overrides such as ``train.learning_rate=5e-5``).
Every field documents itself; ``rayimg <job> --help-config`` prints them. Validation runs on
load, before any Ray work; a :class:`ConfigError` names the dotted field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Union

from rayimg.configbase import ConfigError, absolute_paths, check, describe, field, from_dict, load, to_dict

__all__ = [
    "ConfigError", "StorageConfig", "ModelConfig", "ClusterConfig", "DataConfig", "BucketConfig",
    "TransformConfig", "CacheConfig", "TrainConfig", "LoraConfig", "DreamBoothConfig",
    "TextualInversionConfig", "DeepSpeedConfig", "ScalingConfig", "CheckpointConfig",
    "ValidationConfig", "PublishConfig", "GenerationConfig", "EngineConfig", "CatalogConfig",
    "RenderOutputConfig", "LimitsConfig", "AutoscalingConfig", "AdapterCacheConfig",
    "ImageCacheConfig", "HttpConfig", "PrepareJob", "TrainJob", "RenderJob", "ServeJob", "DemoConceptConfig", "DemoJob",
    "JOBS", "load_job", "absolute_paths", "describe", "to_dict", "from_dict", "ADAPTER_NAME_RE", "SCHEDULERS",
]

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


# --------------------------------------------------------------------------- prepare
@dataclass
class DataConfig:
    """Where the captioned images come from."""

    source: str = field("", doc="dataset dir or s3:// prefix (ImageFolder, images/+captions/, DreamBooth), or a .parquet/.jsonl manifest", path=True)
    format: Literal["auto", "imagefolder", "captions", "dreambooth", "manifest"] = field("auto", doc="dataset layout; 'auto' detects it")
    caption_column: str = field("text", doc="caption column in metadata.jsonl or the manifest ('text'; 'prompt' is also common)")
    image_column: str = field("file_name", doc="image path/URI column in metadata.jsonl or the manifest")
    instance_prompt: Optional[str] = field(None, doc="DreamBooth: prompt with the trigger token, e.g. 'a photo of sks dog'")
    class_source: Optional[str] = field(None, doc="DreamBooth: dir of class images for prior preservation", path=True)
    class_prompt: Optional[str] = field(None, doc="DreamBooth: prompt of the class images, e.g. 'a photo of a dog'")
    min_size: int = field(64, doc="images whose shorter side is below this are skipped (reason 'too_small')")

    def validate(self) -> None:
        if self.source:
            _check_uri(self.source, "source")
        if self.format == "dreambooth":
            check(bool(self.instance_prompt), "instance_prompt", "is required when format is 'dreambooth'")
        if self.class_source:
            _check_uri(self.class_source, "class_source")
            check(bool(self.class_prompt), "class_prompt", "is required when class_source is set")
        check(self.min_size >= 1, "min_size", "must be >= 1")


@dataclass
class BucketConfig:
    """Aspect-ratio buckets of about equal pixel area (sides multiples of ``step``)."""

    enabled: bool = field(False, doc="bucket by aspect ratio instead of cropping to squares")
    min_side: int = field(256, doc="smallest bucket side in pixels")
    max_side: int = field(2048, doc="largest bucket side in pixels")
    step: int = field(64, doc="bucket sides are multiples of this")
    max_aspect: float = field(4.0, doc="largest long/short side ratio of a bucket")

    def validate(self) -> None:
        check(self.step > 0 and self.step % 8 == 0, "step", "must be a positive multiple of 8")
        check(self.min_side > 0 and self.min_side % self.step == 0, "min_side", f"must be a positive multiple of step ({self.step})")
        check(self.max_side >= self.min_side and self.max_side % self.step == 0, "max_side", f"must be >= min_side and a multiple of step ({self.step})")
        check(self.max_aspect >= 1.0, "max_aspect", "must be >= 1.0")


@dataclass
class TransformConfig:
    """Image and caption preprocessing."""

    resolution: int = field(512, doc="target side (square) or target pixel area side (buckets); multiple of 8")
    crop: Literal["center", "random"] = field("center", doc="how to crop to the target size")
    random_flip: bool = field(False, doc="randomly flip half the images horizontally (decided by the item's content hash)")
    buckets: BucketConfig = field(default_factory=BucketConfig, doc="aspect-ratio bucketing")
    trigger_word: Optional[str] = field(None, doc="prepended to every caption when set (and not already present)")
    strip_caption: bool = field(True, doc="collapse whitespace and strip captions")

    def validate(self) -> None:
        check(self.resolution >= 8 and self.resolution % 8 == 0, "resolution", f"must be a positive multiple of 8, got {self.resolution}")


@dataclass
class CacheConfig:
    """The latent / text-embedding cache written by prepare and read by train."""

    output: str = field("", doc="cache dir or s3:// prefix (shards + manifest)", path=True)
    cache_text_embeddings: bool = field(False, doc="also cache text-encoder outputs (worth it when captions repeat)")
    shard_size: int = field(256, doc="items per shard file")
    batch_size: int = field(8, doc="images per encode batch")
    concurrency: int = field(1, doc="encoder actors")
    num_gpus_per_actor: float = field(0.0, doc="GPUs per encoder actor (1.0 on a GPU cluster)")

    def validate(self) -> None:
        if self.output:
            _check_uri(self.output, "output")
        for name in ("shard_size", "batch_size", "concurrency"):
            check(getattr(self, name) >= 1, name, "must be >= 1")
        check(self.num_gpus_per_actor >= 0, "num_gpus_per_actor", "must be >= 0")


@dataclass
class PrepareJob:
    """`rayimg prepare`: captioned images -> latent/embedding cache."""

    model: ModelConfig = field(default_factory=ModelConfig, doc="base model whose VAE/text encoders encode the cache")
    storage: StorageConfig = field(default_factory=StorageConfig, doc="object storage settings")
    cluster: ClusterConfig = field(default_factory=ClusterConfig, doc="Ray cluster")
    data: DataConfig = field(default_factory=DataConfig, doc="input dataset")
    transforms: TransformConfig = field(default_factory=TransformConfig, doc="preprocessing")
    cache: CacheConfig = field(default_factory=CacheConfig, doc="output cache")

    def validate(self) -> None:
        check(bool(self.data.source), "data.source", "is required: the dataset dir, s3:// prefix or manifest")
        check(bool(self.cache.output), "cache.output", "is required: where the cache is written")


# --------------------------------------------------------------------------- train
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2", "conv_shortcut", "time_emb_proj")


@dataclass
class TrainConfig:
    """The optimisation loop (:class:`rayimg.train.loop.Loop`)."""

    method: Literal["lora", "dreambooth", "textual_inversion", "full"] = field("lora", doc="what is trained: 'lora' a style or subject adapter, 'dreambooth' a subject from a few images (data.instance_prompt), 'textual_inversion' a new token, 'full' the whole UNet (large data; DeepSpeed for big models)")
    resolution: int = field(512, doc="training resolution (multiple of 8); match the base model's (512 SD 1.x, 1024 SDXL) and the cache's")
    batch_size: int = field(1, doc="images per worker per micro-batch; raise until the GPU memory is full")
    gradient_accumulation_steps: int = field(1, doc="micro-batches per optimizer step: a larger effective batch without more memory")
    learning_rate: float = field(1e-4, doc="peak learning rate (LoRA: around 1e-4; full fine-tune: around 1e-5)")
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = field("constant_with_warmup", doc="learning-rate schedule over max_steps; 'cosine' or 'linear' decay to 0")
    lr_warmup_steps: int = field(0, doc="steps the learning rate ramps up from 0; a few hundred steadies full fine-tunes")
    max_steps: Optional[int] = field(1000, doc="optimizer steps; null to train num_epochs instead")
    num_epochs: Optional[int] = field(None, doc="passes over the data when max_steps is null")
    optimizer: Literal["adamw", "adamw8bit"] = field("adamw", doc="'adamw8bit' (bitsandbytes) keeps optimizer state in 8 bits: for full fine-tunes short of memory")
    weight_decay: float = field(1e-2, doc="AdamW weight decay")
    max_grad_norm: float = field(1.0, doc="clip the gradient norm to this (0 disables); guards against loss spikes")
    mixed_precision: Literal["no", "fp16", "bf16"] = field("bf16", doc="precision of the forward pass and frozen weights: 'bf16' on recent GPUs, 'fp16' on GPUs without bf16 (loss-scaled), 'no' (float32) on CPU")
    gradient_checkpointing: bool = field(False, doc="recompute UNet activations in the backward pass: much less memory, a slower step; for large resolutions or full fine-tunes")
    full_bf16: bool = field(False, doc="LoRA/DreamBooth: bf16 trainable weights and no autocast, so the whole step (norms included) runs in bf16 (kohya's --full_bf16): a faster step, slightly less precise updates")
    compile: Literal["none", "regional", "full"] = field("none", doc="torch.compile the UNet for a faster step on GPUs: 'regional' compiles each repeated block (transformer and ResNet blocks, samplers; quick to compile), 'full' the whole UNet (minutes cold); worth it for long runs")
    snr_gamma: Optional[float] = field(None, doc="min-SNR loss weighting gamma (5.0 is typical): faster convergence; null disables")
    noise_offset: float = field(0.0, doc="noise offset; 0.05-0.1 lets the model learn very dark or bright images")
    prediction_type: Optional[Literal["epsilon", "v_prediction"]] = field(None, doc="override the scheduler's prediction type (e.g. to fine-tune a model into v-prediction); null keeps the model's")
    caption_dropout: float = field(0.0, doc="probability of training on an empty caption; 0.05-0.1 keeps classifier-free guidance working after a full fine-tune")
    ema: bool = field(False, doc="full fine-tune: keep an exponential moving average of the UNet and export it (smoother weights for long runs)")
    ema_decay: float = field(0.9999, doc="EMA decay per step; lower (0.999) for short runs")
    seed: int = field(0, doc="seed of initial weights, noise and data order: the same seed and config give the same run")

    def validate(self) -> None:
        check(self.resolution >= 8 and self.resolution % 8 == 0, "resolution", f"must be a positive multiple of 8, got {self.resolution}")
        check(self.batch_size >= 1, "batch_size", "must be >= 1")
        check(self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps", "must be >= 1")
        check(self.learning_rate > 0, "learning_rate", f"must be > 0, got {self.learning_rate}")
        check(self.lr_warmup_steps >= 0, "lr_warmup_steps", "must be >= 0")
        check(self.max_steps is not None or self.num_epochs is not None, "max_steps", "set max_steps or num_epochs")
        check(self.max_steps is None or self.max_steps >= 1, "max_steps", "must be >= 1")
        check(self.num_epochs is None or self.num_epochs >= 1, "num_epochs", "must be >= 1")
        check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        check(self.max_grad_norm >= 0, "max_grad_norm", "must be >= 0")
        check(self.snr_gamma is None or self.snr_gamma > 0, "snr_gamma", "must be > 0 or null")
        check(0.0 <= self.noise_offset <= 1.0, "noise_offset", "must be in [0, 1]")
        check(0.0 <= self.caption_dropout < 1.0, "caption_dropout", "must be in [0, 1)")
        check(0.0 < self.ema_decay < 1.0, "ema_decay", "must be in (0, 1)")
        check(not self.full_bf16 or self.mixed_precision == "bf16", "full_bf16", f"needs mixed_precision 'bf16', got {self.mixed_precision!r}")
        check(not self.full_bf16 or self.method in ("lora", "dreambooth"), "full_bf16", f"applies to the lora and dreambooth methods, not {self.method!r}")


@dataclass
class LoraConfig:
    """LoRA adapter shape (methods lora and dreambooth)."""

    rank: int = field(16, doc="LoRA rank: capacity and file size; 4-8 for a style or subject, 32+ for many concepts")
    alpha: Optional[float] = field(None, doc="LoRA alpha (the update is scaled by alpha/rank); default equal to rank (scale 1)")
    dropout: float = field(0.0, doc="LoRA dropout; 0.05-0.1 against overfitting a small dataset")
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"], doc=f"UNet module names to adapt (attention by default; add feed-forward and conv layers for more capacity); allowed: {', '.join(LORA_TARGETS)}")
    train_text_encoder: bool = field(False, doc="also put LoRA on the text encoder(s): helps a new subject's trigger word; needs captions, not cached text embeddings")
    text_encoder_learning_rate: Optional[float] = field(None, doc="peak learning rate of the text encoders' LoRA (same schedule as "
                                                        "the UNet's); null: train.learning_rate. Needs train_text_encoder")

    def validate(self) -> None:
        check(self.rank >= 1, "rank", f"must be >= 1, got {self.rank}")
        check(self.alpha is None or self.alpha > 0, "alpha", "must be > 0")
        check(self.text_encoder_learning_rate is None or self.text_encoder_learning_rate > 0, "text_encoder_learning_rate",
              f"must be > 0, got {self.text_encoder_learning_rate}")
        check(self.text_encoder_learning_rate is None or self.train_text_encoder, "text_encoder_learning_rate",
              "applies to the text encoders' LoRA; set train_text_encoder: true (or leave it null)")
        check(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")
        check(len(self.target_modules) > 0, "target_modules", "must name at least one module")
        for t in self.target_modules:
            check(t in LORA_TARGETS, "target_modules", f"unknown module {t!r}; allowed: {', '.join(LORA_TARGETS)}")


@dataclass
class DreamBoothConfig:
    """DreamBooth loss settings (the prompts and image dirs live in ``data``)."""

    prior_preservation: bool = field(False, doc="also train on class images (data.class_source) so the model keeps what the class looks like; use when the subject's class must stay generic")
    prior_loss_weight: float = field(1.0, doc="weight of the class images' loss against the subject's")
    num_class_images: int = field(100, doc="class images wanted; not generated by the train job: put at least this many in data.class_source")

    def validate(self) -> None:
        check(self.prior_loss_weight >= 0, "prior_loss_weight", "must be >= 0")
        check(self.num_class_images >= 0, "num_class_images", "must be >= 0")


@dataclass
class TextualInversionConfig:
    """Textual inversion: a new token whose embedding is learned; the models stay unchanged."""

    placeholder_token: str = field("<concept>", doc="the new token, used in prompts, e.g. '<cat-toy>'; must not exist in the tokenizer")
    initializer_token: str = field("object", doc="an existing single token the embedding starts from; pick the concept's nearest word")
    num_vectors: int = field(1, doc="vectors behind the token: more capture a complex concept, at the cost of prompt length")

    def validate(self) -> None:
        check(self.placeholder_token.strip() != "", "placeholder_token", "must not be empty")
        check(self.num_vectors >= 1, "num_vectors", "must be >= 1")


@dataclass
class DeepSpeedConfig:
    """DeepSpeed ZeRO for full fine-tunes; the JSON config is built from these fields and ``train``."""

    enabled: bool = field(False, doc="train through DeepSpeed: for full fine-tunes whose optimizer state does not fit one GPU")
    stage: Literal[2, 3] = field(2, doc="ZeRO stage: 2 shards optimizer state and gradients; 3 also the weights (largest models, slower, no validation images)")
    offload_optimizer: bool = field(False, doc="keep optimizer state in CPU memory: fits larger models, slows the step")
    offload_params: bool = field(False, doc="keep parameters in CPU memory (stage 3 only): the last resort for memory")

    def validate(self) -> None:
        check(not self.offload_params or self.stage == 3, "offload_params", "needs stage 3")


@dataclass
class ScalingConfig:
    """Ray Train workers: data-parallel ranks of one run."""

    num_workers: int = field(1, doc="training workers (one per GPU); each sees batch_size images a micro-batch")
    use_gpu: bool = field(False, doc="give each worker a GPU; false trains on CPU (tests, tiny models)")
    cpus_per_worker: float = field(1.0, doc="CPUs reserved per worker; more when images are encoded on the fly (no cache)")

    def validate(self) -> None:
        check(self.num_workers >= 1, "num_workers", "must be >= 1")
        check(self.cpus_per_worker > 0, "cpus_per_worker", "must be > 0")


@dataclass
class CheckpointConfig:
    """Checkpoints and fault tolerance."""

    storage_path: str = field("outputs/runs", doc="where runs keep checkpoints and validation images (local dir or s3://; shared storage on a multi-node cluster)", path=True)
    run_name: Optional[str] = field(None, doc="run name; a run of the same name resumes from its latest checkpoint. Default the adapter name plus a hash of the training config, so a changed config starts afresh")
    every_n_steps: int = field(500, doc="checkpoint interval in optimizer steps: the work lost to a failure")
    num_to_keep: int = field(2, doc="checkpoints kept")
    max_failures: int = field(2, doc="worker failures tolerated, each restarting the workers from the last checkpoint (-1: unlimited; 0 for fail-fast)")
    resume_from: Optional[str] = field(None, doc="checkpoint to start from, e.g. another run's; default the run's own latest", path=True)

    def validate(self) -> None:
        _check_uri(self.storage_path, "storage_path")
        check(self.every_n_steps >= 1, "every_n_steps", "must be >= 1")
        check(self.num_to_keep >= 1, "num_to_keep", "must be >= 1")
        check(self.max_failures >= -1, "max_failures", "must be >= -1 (-1 = unlimited)")


@dataclass
class ValidationConfig:
    """Validation images rendered by rank 0 during training, to watch a run learn."""

    prompts: list[str] = field(default_factory=list, doc="prompts to render (with the trigger word or token)")
    every_n_steps: int = field(0, doc="interval in steps, and at the last step (0 disables); each render pauses training")
    num_inference_steps: int = field(25, doc="sampling steps for validation images")
    seed: int = field(0, doc="seed of prompt i's image is seed + i, so steps compare like for like")

    def validate(self) -> None:
        check(self.every_n_steps >= 0, "every_n_steps", "must be >= 0")
        check(self.num_inference_steps >= 1, "num_inference_steps", "must be >= 1")


@dataclass
class PublishConfig:
    """Where the trained adapter or model goes (full fine-tunes: <registry>/models/<name>/)."""

    registry: str = field("outputs/registry", doc="adapter registry root (local dir or s3://); adapters land in <registry>/adapters/<name>/<version>/", path=True)
    name: str = field("my-adapter", doc="adapter name: [a-z0-9][a-z0-9._-]{0,63}")
    version: Optional[Union[str, int]] = field(None, doc="version; default the next integer")
    trigger_word: Optional[str] = field(None, doc="trigger word recorded in adapter.json, for users of the adapter")
    kohya: bool = field(True, doc="also write a kohya/A1111-format LoRA file, for ComfyUI and AUTOMATIC1111")

    def validate(self) -> None:
        _check_uri(self.registry, "registry")
        check(bool(ADAPTER_NAME_RE.match(self.name)), "name", f"{self.name!r} must match {ADAPTER_NAME_RE.pattern}")
        if self.version is not None:
            self.version = str(self.version)
            check(bool(ADAPTER_NAME_RE.match(self.version)), "version", f"{self.version!r} must match {ADAPTER_NAME_RE.pattern}")


@dataclass
class TrainJob:
    """`rayimg train`: a training job on Ray Train."""

    model: ModelConfig = field(default_factory=ModelConfig, doc="base model")
    storage: StorageConfig = field(default_factory=StorageConfig, doc="object storage settings")
    cluster: ClusterConfig = field(default_factory=ClusterConfig, doc="Ray cluster")
    data: DataConfig = field(default_factory=DataConfig, doc="raw dataset (encoded on the fly) when cache is empty")
    cache: str = field("", doc="prepared cache (from `rayimg prepare`) to train from; empty encodes data.source on the fly", path=True)
    transforms: TransformConfig = field(default_factory=TransformConfig, doc="preprocessing for on-the-fly encoding")
    train: TrainConfig = field(default_factory=TrainConfig, doc="optimisation loop")
    lora: LoraConfig = field(default_factory=LoraConfig, doc="LoRA shape (lora and dreambooth methods)")
    dreambooth: DreamBoothConfig = field(default_factory=DreamBoothConfig, doc="DreamBooth settings")
    textual_inversion: TextualInversionConfig = field(default_factory=TextualInversionConfig, doc="textual inversion settings")
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig, doc="DeepSpeed ZeRO")
    scaling: ScalingConfig = field(default_factory=ScalingConfig, doc="Ray Train workers")
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig, doc="checkpoints and faults")
    validation: ValidationConfig = field(default_factory=ValidationConfig, doc="validation images")
    publish: PublishConfig = field(default_factory=PublishConfig, doc="outputs")

    def validate(self) -> None:
        check(bool(self.cache) or bool(self.data.source), "cache", "set cache (a prepared cache) or data.source (encode on the fly)")
        if self.cache:
            _check_uri(self.cache, "cache")
        if self.deepspeed.enabled:
            check(self.train.method == "full", "deepspeed.enabled", "DeepSpeed is for method 'full'; adapters train with DDP")
        if self.train.method == "dreambooth":
            check(bool(self.data.instance_prompt), "data.instance_prompt", "is required for method 'dreambooth'")
        if self.dreambooth.prior_preservation:
            check(bool(self.data.class_prompt), "data.class_prompt", "is required with dreambooth.prior_preservation")
        if self.train.ema:
            check(self.train.method == "full", "train.ema", "EMA applies to method 'full'")


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

    def validate(self) -> None:
        for name in ("max_width", "max_height", "max_steps", "max_num_images"):
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
        "default", doc="torch.compile mode of the UNet: 'reduce-overhead' replays CUDA graphs, which helps most at small batches, where the step is launch-bound (adapters still swap in place)")
    compile_vae: bool = field(False, doc="torch.compile the VAE decoder (one graph per batch and image size), with its GroupNorm statistics from cuBLAS products and its attention as float32-score GEMMs + softmax (rayimg.render.vae_decode); use on a GPU with large batches")
    fp8: bool = field(False, doc="float8 matmuls for the UNet's LayerNorm-fed linears (self-attention q/k/v, cross-attention q, feed-forward GEGLU proj; H100/Ada GPUs with a bfloat16 model, or CPU); faster with compile; pixels differ slightly from bf16, so the output key records it")
    fuse_qkv: bool = field(False, doc="fuse each attention's q/k/v projections into one matmul (adapters still apply)")
    channels_last: bool = field(False, doc="UNet in channels-last memory format: faster with compile, slower eager")
    batch_invariant: bool = field(True, doc="render each image in its own pipeline call so it is byte-identical whatever batch it lands in (GPU kernels pick algorithms by batch size); false batches for throughput")

    png_compress_level: int = field(1, doc="zlib level of the PNGs, 0-9: 1 encodes several times faster than PIL's default 6 for files somewhat larger; the pixels are the same")

    def validate(self) -> None:
        check(self.batch_size >= 1, "batch_size", "must be >= 1")
        check(self.vae_batch >= 0, "vae_batch", f"must be >= 0 (0: the whole batch), got {self.vae_batch}")
        check(0 <= self.png_compress_level <= 9, "png_compress_level", f"must be 0-9, got {self.png_compress_level}")


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

    def validate(self) -> None:
        _check_uri(self.registry, "registry")
        check(bool(self.catalog.source), "catalog.source", "is required: the prompt catalog file")
        check(self.concurrency >= 1, "concurrency", "must be >= 1")
        check(self.num_gpus_per_actor >= 0, "num_gpus_per_actor", "must be >= 0")
        _check_defaults_within_limits(self.defaults, self.limits)


@dataclass
class AutoscalingConfig:
    """Ray Serve autoscaling."""

    min_replicas: int = field(1, doc="fewest replicas (0 allows scale to zero)")
    max_replicas: int = field(1, doc="most replicas")
    target_ongoing_requests: float = field(2.0, doc="ongoing requests per replica that autoscaling aims for")

    def validate(self) -> None:
        check(self.min_replicas >= 0, "min_replicas", "must be >= 0")
        check(self.max_replicas >= max(1, self.min_replicas), "max_replicas", "must be >= min_replicas and >= 1")
        check(self.target_ongoing_requests > 0, "target_ongoing_requests", "must be > 0")


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
    request_timeout_s: float = field(300.0, doc="per-request timeout (504 after it); a request may ask for less with timeout_s")

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
    limits: LimitsConfig = field(default_factory=LimitsConfig, doc="bounds on requests")
    engine: EngineConfig = field(default_factory=EngineConfig, doc="generation engine")
    http: HttpConfig = field(default_factory=HttpConfig, doc="HTTP front end")
    autoscaling: AutoscalingConfig = field(default_factory=AutoscalingConfig, doc="replica autoscaling")
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


# --------------------------------------------------------------------------- demo
@dataclass
class DemoConceptConfig:
    """The new concept `rayimg demo` teaches the base model: a shape it never saw, named by a trigger token."""

    shape: Literal["cross"] = field("cross", doc="the shape drawn in the instance pictures (kept out of the base model's data)")
    trigger: str = field("sks", doc="trigger token that stands for the concept in captions and prompts")
    num_images: int = field(30, doc="instance pictures generated")
    backgrounds: list[str] = field(default_factory=lambda: ["white", "black", "gray", "striped", "dotted", "grid"],
                                   doc="backgrounds the instance pictures are drawn on")
    radii: list[float] = field(default_factory=lambda: [17.0, 22.0], doc="range of the shape's half-extent in the instance pictures, "
                               "pixels of 64 (the base data's range is 11-22)")
    balanced: bool = field(True, doc="instance pictures cycle through every colour x background pair (colours x backgrounds "
                                     "pictures cover each once) instead of drawing colour and background at random")
    num_prior_images: int = field(24, doc="pictures of the base model's own shapes, with their own captions, mixed into the "
                                         "training set (prior preservation: the LoRA keeps drawing circles for 'circle')")
    seed: int = field(0, doc="seed of the generated pictures")

    def validate(self) -> None:
        check(bool(re.match(r"^[a-z]+$", self.trigger)), "trigger", f"must be one lowercase word, got {self.trigger!r}")
        check(self.num_images >= 1, "num_images", "must be >= 1")
        check(len(self.radii) == 2 and 4.0 <= self.radii[0] <= self.radii[1] <= 30.0, "radii", f"must be [low, high] within 4-30, got {self.radii}")
        check(self.num_prior_images >= 0, "num_prior_images", "must be >= 0")
        from rayimg.demo.shapes import BACKGROUNDS

        check(len(self.backgrounds) >= 1, "backgrounds", "must name at least one background")
        for b in self.backgrounds:
            check(b in BACKGROUNDS, "backgrounds", f"unknown background {b!r}; one of {', '.join(BACKGROUNDS)}")


@dataclass
class DemoJob:
    """`rayimg demo`: the whole flow on a laptop CPU with the project's tiny shapes model: generate a
    DreamBooth-style set of a new concept, prepare it, train a LoRA on Ray Train, publish it, render a
    catalog with and without it, serve one request, and write a contact sheet."""

    output_dir: str = field("outputs/demo", doc="where the demo writes everything", path=True)
    model: ModelConfig = field(default_factory=lambda: ModelConfig(pretrained="rayimg-tiny-shapes", family="sd", dtype="float32", device="cpu"),
                               doc="base model (the project's trained tiny shapes model by default)")
    cluster: ClusterConfig = field(default_factory=ClusterConfig, doc="Ray cluster")
    concept: DemoConceptConfig = field(default_factory=DemoConceptConfig, doc="the concept the LoRA learns")
    train: TrainConfig = field(default_factory=lambda: TrainConfig(method="lora", resolution=64, batch_size=4, learning_rate=2e-3, lr_scheduler="cosine",
                                                                   lr_warmup_steps=20, max_steps=600, snr_gamma=5.0, mixed_precision="no", seed=0),
                               doc="LoRA training loop (batch_size is per worker)")
    lora: LoraConfig = field(default_factory=lambda: LoraConfig(rank=16, target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2"],
                                                               train_text_encoder=True, text_encoder_learning_rate=5e-3),
                             doc="LoRA shape")
    num_workers: int = field(2, doc="Ray Train workers (one CPU each)")
    adapter_name: str = field("demo-cross", doc="name of the adapter in the demo's registry")
    prompts: list[str] = field(default_factory=lambda: [
        "a red {trigger} on a white background", "a blue {trigger} on a black background",
        "a yellow {trigger} on a gray background", "a green {trigger} on a white background",
        "a purple {trigger} on a black background", "a blue circle on a white background",
    ], doc="catalog prompts, rendered with and without the adapter; {trigger} becomes concept.trigger")
    seeds: list[int] = field(default_factory=lambda: [0, 1], doc="seeds each prompt is rendered with")
    generation: GenerationConfig = field(default_factory=lambda: GenerationConfig(steps=20, width=64, height=64, guidance_scale=7.5, scheduler="dpmpp_2m"),
                                         doc="generation settings of the catalog and the served request")
    serve: bool = field(True, doc="start the Serve app and make one HTTP request")

    def validate(self) -> None:
        _check_uri(self.output_dir, "output_dir")
        check(len(self.prompts) >= 1, "prompts", "must hold at least one prompt")
        check(len(self.seeds) >= 1, "seeds", "must hold at least one seed")
        check(self.num_workers >= 1, "num_workers", "must be >= 1")
        check(self.train.method == "lora", "train.method", "the demo trains a LoRA ('lora')")
        check(bool(ADAPTER_NAME_RE.match(self.adapter_name)), "adapter_name", f"{self.adapter_name!r} must match {ADAPTER_NAME_RE.pattern}")


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
