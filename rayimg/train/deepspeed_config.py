"""The DeepSpeed JSON config, built from the job config (a plain dict; DeepSpeed itself is not
imported here)."""

from __future__ import annotations

__all__ = ["build_deepspeed_config"]

_BUCKET = 500_000_000  # elements; DeepSpeed's default bucket sizes


def build_deepspeed_config(job, world_size: int, *, torch_adam: bool = True) -> dict:
    """ZeRO stage 2 or 3 from ``job.deepspeed`` with batch sizes, clipping, precision and AdamW
    from ``job.train``.

    ``train_batch_size`` = micro batch x accumulation x ``world_size``. There is no scheduler
    section: the training loop steps its own (``rayimg.train.optim.build_lr_scheduler``).
    ``torch_adam`` makes DeepSpeed use ``torch.optim.AdamW`` instead of its FusedAdam or CPU
    Adam ops, which are compiled on first use and fail where no matching compiler is present.
    With ``train.optimizer: adamw8bit`` no optimizer section is written: pass the bitsandbytes
    optimizer from ``build_optimizer`` to ``deepspeed.initialize``.
    """
    if world_size < 1:
        raise ValueError("scaling.num_workers: must be >= 1")
    train, ds = job.train, job.deepspeed
    if ds.stage not in (2, 3):
        raise ValueError(f"deepspeed.stage: {ds.stage!r} is not supported; use 2 or 3")
    if ds.offload_params and ds.stage != 3:
        raise ValueError("deepspeed.offload_params: needs stage 3")
    if ds.offload_optimizer and train.optimizer != "adamw":
        raise ValueError(f"deepspeed.offload_optimizer: runs the optimizer on the CPU, which train.optimizer {train.optimizer!r} cannot; use 'adamw'")

    zero: dict = {
        "stage": ds.stage,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": _BUCKET,
    }
    if ds.stage == 2:
        zero.update(allgather_partitions=True, allgather_bucket_size=_BUCKET, reduce_scatter=True)
    else:
        zero.update(
            stage3_prefetch_bucket_size=_BUCKET // 10,
            stage3_param_persistence_threshold=100_000,
            stage3_max_live_parameters=1_000_000_000,
            stage3_max_reuse_distance=1_000_000_000,
            # Saving gathers the real weights, not each rank's empty placeholders.
            stage3_gather_16bit_weights_on_model_save=True,
        )
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}

    config: dict = {
        "train_micro_batch_size_per_gpu": train.batch_size,
        "gradient_accumulation_steps": train.gradient_accumulation_steps,
        "train_batch_size": train.batch_size * train.gradient_accumulation_steps * world_size,
        "gradient_clipping": float(train.max_grad_norm),
        "bf16": {"enabled": train.mixed_precision == "bf16"},
        "fp16": {
            "enabled": train.mixed_precision == "fp16",
            "loss_scale": 0,  # dynamic
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        },
        "zero_optimization": zero,
        "steps_per_print": 1_000_000_000,  # the training loop reports progress
        "wall_clock_breakdown": False,
    }
    if train.optimizer == "adamw":
        config["optimizer"] = {
            "type": "AdamW",
            "params": {
                "lr": train.learning_rate,
                "betas": [0.9, 0.999],
                "eps": 1e-8,
                "weight_decay": train.weight_decay,
                "torch_adam": torch_adam,
            },
        }
    else:
        # A client optimizer DeepSpeed has not tested with ZeRO (bitsandbytes AdamW8bit).
        config["zero_allow_untested_optimizer"] = True
    return config
