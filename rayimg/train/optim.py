"""Optimizer, learning-rate schedule and step count of a training job."""

from __future__ import annotations

import math

import torch

__all__ = ["build_optimizer", "build_lr_scheduler", "total_steps", "steps_per_epoch"]


def build_optimizer(params, job) -> torch.optim.Optimizer:
    """AdamW over ``params`` (tensors or param groups) with ``train.learning_rate`` and
    ``train.weight_decay``; ``train.optimizer: adamw8bit`` uses bitsandbytes' AdamW8bit."""
    params = list(params)
    if not params:
        raise ValueError("train.method: nothing to optimize (the trainee has no trainable parameters)")
    cfg = job.train
    kwargs = dict(lr=cfg.learning_rate, betas=(0.9, 0.999), weight_decay=cfg.weight_decay, eps=1e-8)
    if cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise ValueError("train.optimizer: 'adamw8bit' needs bitsandbytes, which is not installed; use 'adamw' or install it") from e
        return bnb.optim.AdamW8bit(params, **kwargs)
    if cfg.optimizer != "adamw":
        raise ValueError(f"train.optimizer: unknown optimizer {cfg.optimizer!r}; one of adamw, adamw8bit")
    tensors = [p for group in params for p in (group["params"] if isinstance(group, dict) else [group])]
    # The fused CUDA kernel is the fastest AdamW where every parameter lives on a GPU.
    fused = all(p.is_cuda for p in tensors)
    return torch.optim.AdamW(params, fused=fused or None, **kwargs)


def _torch_optimizer(optimizer):
    # A DeepSpeed ZeRO optimizer wraps the torch one (``.optimizer``) and shares its param groups.
    while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def build_lr_scheduler(optimizer, job, total_steps: int):
    """diffusers' ``get_scheduler(train.lr_scheduler)`` with ``train.lr_warmup_steps`` of warmup
    over ``total_steps`` optimizer steps. Step it once per optimizer step."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        job.train.lr_scheduler,
        optimizer=_torch_optimizer(optimizer),
        num_warmup_steps=job.train.lr_warmup_steps,
        num_training_steps=total_steps,
    )


def steps_per_epoch(job, items: int, world_size: int) -> int:
    """Optimizer steps in one pass over ``items`` shared by ``world_size`` workers: each worker
    gets ceil(items / world_size) items, in batches of ``train.batch_size`` (the last one may be
    short), and steps every ``train.gradient_accumulation_steps`` batches (the last group may be
    short) — the arithmetic of diffusers' scripts."""
    if items < 1:
        raise ValueError("cache: the dataset holds no items")
    if world_size < 1:
        raise ValueError("scaling.num_workers: must be >= 1")
    per_worker = math.ceil(items / world_size)
    batches = math.ceil(per_worker / job.train.batch_size)
    return math.ceil(batches / job.train.gradient_accumulation_steps)


def total_steps(job, items: int, world_size: int) -> int:
    """``train.max_steps`` when set, else ``train.num_epochs`` epochs of :func:`steps_per_epoch`."""
    if job.train.max_steps is not None:
        return int(job.train.max_steps)
    if job.train.num_epochs is None:
        raise ValueError("train.max_steps: set max_steps or num_epochs")
    return int(job.train.num_epochs) * steps_per_epoch(job, items, world_size)
