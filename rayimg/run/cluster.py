"""Connecting a job to Ray: the cluster at RAY_ADDRESS, or a local one started in-process."""

from __future__ import annotations

import os

from rayimg.config import ClusterConfig


def connect(cfg: ClusterConfig) -> str:
    """Initialise Ray once; returns 'existing', 'remote' or 'local'."""
    import ray

    if ray.is_initialized():
        return "existing"
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return "remote"
    ray.init(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, include_dashboard=False, configure_logging=False)
    return "local"
