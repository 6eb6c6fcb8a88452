"""`rayimg prepare`: the dataset, its transforms and the latent cache."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from rayimg.configbase import check, field
from rayimg.config.common import ClusterConfig, ModelConfig, StorageConfig, _check_uri

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
    shard_size: int = field(256, doc="input rows per encode batch: each bucket of a batch is one shard file, so a shard holds at most this many items")
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
