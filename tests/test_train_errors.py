"""Bad training input fails on the driver, before any Ray Train worker starts, naming the field."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from rayimg.config import ConfigError, PrepareJob, TrainJob, from_dict
from rayimg.run.prepare import run as prepare
from rayimg.run.train import run as train

from tests import datasets


def job(tmp_path, **sections):
    data = {"model": {"device": "cpu"}, "train": {"resolution": 64, "mixed_precision": "no", "max_steps": 2},
            "checkpoint": {"storage_path": str(tmp_path / "runs")}, "publish": {"registry": str(tmp_path / "reg")}}
    for k, v in sections.items():
        data[k] = {**data.get(k, {}), **v} if isinstance(v, dict) else v
    return from_dict(TrainJob, data)


def test_missing_dataset_and_cache(ray_cluster, tmp_path):
    with pytest.raises(ConfigError, match="data.source.*does not exist"):
        train(job(tmp_path, data={"source": str(tmp_path / "nope")}))
    with pytest.raises(ConfigError, match="cache.*no cache.json"):
        train(job(tmp_path, cache=str(tmp_path / "no-cache")))


def test_cache_for_another_model_or_resolution(ray_cluster, tmp_path):
    src = datasets.imagefolder(tmp_path / "ds", 2)
    prepare(from_dict(PrepareJob, {"data": {"source": str(src)}, "cache": {"output": str(tmp_path / "c")},
                                   "transforms": {"resolution": 64}, "model": {"device": "cpu"}}))
    with pytest.raises(ConfigError, match="built for model 'rayimg-tiny-sd'"):
        train(job(tmp_path, cache=str(tmp_path / "c"), model={"pretrained": "rayimg-tiny-sdxl"}))
    with pytest.raises(ConfigError, match="train.resolution: is 128 but the cache"):
        train(job(tmp_path, cache=str(tmp_path / "c"), train={"resolution": 128}))


def test_hardware_asks_are_checked(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks the CPU-only refusal")
    with pytest.raises(ConfigError, match="train.mixed_precision: fp16 needs GPUs"):
        train(job(tmp_path, data={"source": str(tmp_path)}, train={"mixed_precision": "fp16"}))


def test_cli_exits_2_naming_the_field(tmp_path):
    cfg = tmp_path / "t.yaml"
    cfg.write_text(json.dumps({"data": {"source": str(tmp_path / "missing")}, "model": {"device": "cpu"},
                               "train": {"resolution": 64, "mixed_precision": "no"}}))
    proc = subprocess.run([sys.executable, "-m", "rayimg.cli", "train", "--config", str(cfg)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "data.source" in proc.stderr and "does not exist" in proc.stderr
