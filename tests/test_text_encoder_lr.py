"""`lora.text_encoder_learning_rate`: the text encoders' LoRA in its own optimizer group, with its
own peak learning rate under the same schedule (the tiny SD model, no Ray)."""

from __future__ import annotations

import os

import pytest
import torch

from rayimg.config import ConfigError, ModelConfig, TrainJob, load_job
from rayimg.models import load_model
from rayimg.train.optim import build_lr_scheduler, build_optimizer
from rayimg.train.trainee import build_trainee

CAPTIONS = ["a red square", "a green square"]


@pytest.fixture(scope="module", autouse=True)
def _model_cache(tmp_path_factory):
    os.environ.setdefault("RAYIMG_CACHE", str(tmp_path_factory.mktemp("rayimg-cache")))


def lora_job(te_lr=None) -> TrainJob:
    job = TrainJob(cache="unused")
    job.train.method, job.train.mixed_precision = "lora", "no"
    job.train.learning_rate, job.train.lr_scheduler, job.train.lr_warmup_steps, job.train.max_steps = 1e-2, "cosine", 2, 10
    job.train.weight_decay = 0.0
    job.lora.rank, job.lora.train_text_encoder, job.lora.text_encoder_learning_rate = 4, True, te_lr
    return job


def test_text_encoder_lora_gets_its_own_learning_rate():
    loaded = load_model(ModelConfig(pretrained="rayimg-tiny-sd", device="cpu"))
    job = lora_job(te_lr=1e-9)
    torch.manual_seed(0)
    trainee = build_trainee(loaded, job)
    groups = trainee.param_groups()
    assert len(groups) == 2
    text_ids = {id(p) for p in trainee.text_encoders.parameters()}
    unet_ids = {id(p) for p in trainee.unet.parameters()}
    assert groups[1]["lr"] == 1e-9 and groups[1]["params"] and all(id(p) in text_ids for p in groups[1]["params"])
    assert groups[0]["params"] and all(id(p) in unet_ids for p in groups[0]["params"])
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(trainee.trainable_parameters())

    optimizer = build_optimizer(groups, job)
    scheduler = build_lr_scheduler(optimizer, job, job.train.max_steps)
    before = {id(p): p.detach().clone() for p in trainee.trainable_parameters()}
    batch = {"latents": torch.randn(2, 4, 8, 8), "captions": CAPTIONS}
    for _ in range(3):
        trainee(batch)["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
    # the schedule scales both peaks alike
    unet_lr, text_lr = (g["lr"] for g in optimizer.param_groups)
    assert 0 < unet_lr < 1e-2 and text_lr == pytest.approx(unet_lr * 1e-7)

    def moved(params) -> float:
        return max((p.detach() - before[id(p)]).abs().max().item() for p in params)

    # AdamW moves a weight by about its learning rate a step: the UNet's LoRA moves, the text encoder's barely
    assert moved(groups[0]["params"]) > 1e-3
    assert moved(groups[1]["params"]) < 1e-7


def test_without_it_one_group_at_the_train_learning_rate():
    loaded = load_model(ModelConfig(pretrained="rayimg-tiny-sd", device="cpu"))
    trainee = build_trainee(loaded, lora_job(te_lr=None))
    groups = trainee.param_groups()
    assert len(groups) == 1 and len(groups[0]["params"]) == len(trainee.trainable_parameters())
    optimizer = build_optimizer(groups, lora_job())
    assert [g["lr"] for g in optimizer.param_groups] == [1e-2]


def test_config_checks_it():
    job = load_job("train", None, ["cache=c", "train.method=lora", "lora.train_text_encoder=true", "lora.text_encoder_learning_rate=5e-4"])
    assert job.lora.text_encoder_learning_rate == 5e-4
    with pytest.raises(ConfigError, match="text_encoder_learning_rate"):
        load_job("train", None, ["cache=c", "lora.text_encoder_learning_rate=5e-4"])  # no text-encoder LoRA to apply it to
    with pytest.raises(ConfigError, match="text_encoder_learning_rate"):
        load_job("train", None, ["cache=c", "lora.train_text_encoder=true", "lora.text_encoder_learning_rate=0"])
