"""`rayimg train`: the training loop, the method (LoRA, DreamBooth, textual inversion, full), scaling, checkpoints, publishing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Union

from rayimg.configbase import check, field
from rayimg.config.common import ADAPTER_NAME_RE, ClusterConfig, ModelConfig, StorageConfig, _check_uri
from rayimg.config.prepare import DataConfig, TransformConfig

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
    num_class_images: int = field(100, doc="class images wanted in data.class_source: when it holds fewer, the train job first generates the rest with the base model (data.class_prompt) on the cluster's GPUs and writes them there, for later runs too")
    class_inference_steps: int = field(30, doc="sampling steps of each generated class image")
    class_guidance_scale: float = field(7.5, doc="classifier-free guidance of the generated class images")
    class_negative_prompt: str = field("", doc="negative prompt of the generated class images")
    class_batch_size: int = field(4, doc="class images generated together (one batch per pipeline call)")
    class_seed: int = field(0, doc="class image i is generated with seed class_seed + i")

    def validate(self) -> None:
        check(self.prior_loss_weight >= 0, "prior_loss_weight", "must be >= 0")
        check(self.num_class_images >= 0, "num_class_images", "must be >= 0")
        check(self.class_inference_steps >= 1, "class_inference_steps", "must be >= 1")
        check(self.class_guidance_scale >= 0, "class_guidance_scale", "must be >= 0")
        check(self.class_batch_size >= 1, "class_batch_size", "must be >= 1")
        check(self.class_seed >= 0, "class_seed", "must be >= 0")


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
            check(self.train.method == "dreambooth", "dreambooth.prior_preservation", f"applies to method 'dreambooth', not {self.train.method!r}")
            check(bool(self.data.class_source), "data.class_source", "is required with dreambooth.prior_preservation: the folder of class "
                  "images, where the missing ones (up to dreambooth.num_class_images) are generated")
        if self.train.ema:
            check(self.train.method == "full", "train.ema", "EMA applies to method 'full'")
