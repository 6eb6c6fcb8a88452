"""Optimizer and learning-rate schedule of a training job."""

from __future__ import annotations

import torch

__all__ = ["build_optimizer", "build_lr_scheduler"]


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
