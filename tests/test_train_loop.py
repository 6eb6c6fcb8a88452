"""The training loop without Ray: one process, the tiny model, images encoded on the fly."""

from __future__ import annotations

import shutil

import numpy as np
from safetensors.torch import load_file

from rayimg.config import TrainJob, from_dict
from rayimg.data.sources import list_items
from rayimg.storage import Storage
from rayimg.train.loop import Loop

from tests import datasets


def test_the_loop_trains_checkpoints_resumes_and_exports_without_ray(tmp_path):
    src = datasets.imagefolder(tmp_path / "ds", 4)
    job = from_dict(TrainJob, {
        "model": {"device": "cpu"}, "data": {"source": str(src)}, "transforms": {"resolution": 64},
        "train": {"resolution": 64, "batch_size": 2, "max_steps": None, "num_epochs": 2, "learning_rate": 5e-3,
                  "mixed_precision": "no", "lr_scheduler": "cosine", "lr_warmup_steps": 1},
        "checkpoint": {"storage_path": str(tmp_path / "runs"), "every_n_steps": 2},
        "validation": {"prompts": ["a red circle"], "every_n_steps": 4, "num_inference_steps": 2},
        "lora": {"rank": 4},
    })
    records = [item.to_row() for item in list_items(Storage(job.storage), job.data)]

    def new_loop() -> Loop:
        return Loop(job, job.model, records, model_key="rayimg-tiny-sd@test", run_dir=str(tmp_path / "run"))

    loop = new_loop()
    assert loop.total_steps == 4  # 4 items in batches of 2: 2 steps an epoch, 2 epochs
    reports = []

    def report(metrics, checkpoint_dir):
        reports.append(metrics)
        if checkpoint_dir is not None:
            shutil.copytree(checkpoint_dir, tmp_path / f"ckpt-{metrics['step']}")

    loop.run(report)
    assert [m["step"] for m in reports] == [2, 4]
    assert len(loop.losses) == 4 and all(np.isfinite(loop.losses))
    assert (tmp_path / "run" / "validation" / "step-000004" / "00.png").exists()
    weights = load_file(str(tmp_path / "ckpt-4" / "export" / "pytorch_lora_weights.safetensors"))
    assert any(float(v.abs().max()) > 0 for k, v in weights.items() if "lora_B" in k or ".up." in k)
    assert not (tmp_path / "ckpt-2" / "export").exists()  # only the final checkpoint exports
    assert sorted(p.name for p in (tmp_path / "ckpt-2").iterdir()) == [
        "lr_scheduler.json", "optimizer.json", "optimizer.safetensors", "rng_rank0.json", "rng_rank0.safetensors",
        "state.json", "trainable.safetensors"]  # nothing pickled
    assert (tmp_path / "run" / "loss.png").exists() and (tmp_path / "run" / "validation_grid.png").exists()

    resumed = new_loop()
    resumed.load(tmp_path / "ckpt-2")
    assert resumed.step == 2
    resumed.run()
    np.testing.assert_allclose(resumed.losses, loop.losses, rtol=1e-6)
    # nothing here started Ray; tests/test_boundaries.py checks that rayimg/train never imports it
