"""`rayimg demo`: the whole flow on the tiny shapes model."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from rayimg.configbase import check, field
from rayimg.config.common import ADAPTER_NAME_RE, ClusterConfig, ModelConfig, _check_uri
from rayimg.config.train import LoraConfig, TrainConfig
from rayimg.config.render import GenerationConfig

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
