"""Pictures of a training run: TensorBoard event files (read back with TensorBoard's own
EventAccumulator), loss.png and the validation grid; and the render job's contact sheet."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rayimg.config import TrainJob, from_dict
from rayimg.run.train import run as train
from rayimg.storage import Storage
from rayimg.train.plots import loss_plot, smoothed, validation_grid
from rayimg.train.tensorboard_log import TensorBoardLog, summary_writer_class

from tests import datasets


def events(logdir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def png(path: Path) -> Image.Image:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


@pytest.mark.parametrize("backend", ["torch", "tensorboardX"])
def test_either_writer_makes_events_tensorboard_reads(tmp_path, backend):
    log = TensorBoardLog(Storage(), str(tmp_path / "run"), writer_class=summary_writer_class(backend))
    for step, loss in enumerate([0.5, 0.25, 0.125], 1):
        log.scalars(step, {"train/loss": loss, "train/skipped": None})
    log.image("validation/00", Image.new("RGB", (16, 8), (255, 0, 0)), 3)
    log.close()
    acc = events(tmp_path / "run" / "tensorboard")
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 0.5), (2, 0.25), (3, 0.125)]
    assert "train/skipped" not in acc.Tags()["scalars"]
    (img,) = acc.Images("validation/00")
    assert (img.step, img.width, img.height) == (3, 16, 8)
    assert Image.open(io.BytesIO(img.encoded_image_string)).getpixel((0, 0))[:3] == (255, 0, 0)


def test_tensorboard_events_reach_an_s3_run_dir(s3_bucket, storage, tmp_path):
    log = TensorBoardLog(storage, f"s3://{s3_bucket}/runs/r1")
    log.scalars(1, {"train/loss": 1.0})
    log.flush()
    log.scalars(2, {"train/loss": 2.0})
    log.close()
    (uri,) = storage.list(f"s3://{s3_bucket}/runs/r1/tensorboard")
    local = tmp_path / "tb"
    local.mkdir()
    (local / uri.rsplit("/", 1)[1]).write_bytes(storage.read_bytes(uri))
    assert [e.value for e in events(local).Scalars("train/loss")] == [1.0, 2.0]


def test_loss_plot_draws_the_curve_and_gaps():
    image = loss_plot([1.0, 0.8, float("nan"), 0.5, 0.4, 0.45], title="t")
    assert image.size == (800, 400)
    pixels = np.asarray(image)
    dark = (pixels[..., 2] > 120) & (pixels[..., 0] < 60)  # the smoothed curve's colour
    assert dark[:, 70:780].any(axis=0).sum() > 500  # it spans the plot from left to right
    assert smoothed([1.0, float("nan"), 3.0], 0.5) == [1.0, 1.0, pytest.approx((0.25 + 1.5) / 0.75)]
    with pytest.raises(ValueError, match="no losses"):
        loss_plot([])


def test_validation_grid_has_a_row_per_step():
    red, blue = Image.new("RGB", (64, 64), (255, 0, 0)), Image.new("RGB", (64, 64), (0, 0, 255))
    one = validation_grid([(2, [red, blue])], ["a", "b"])
    three = validation_grid([(2, [red, blue]), (4, [red, None]), (6, [blue, red])], ["a", "b"])
    assert three.width == one.width and three.height > 2.5 * (one.height - 40)
    assert (np.asarray(three) == (255, 0, 0)).all(axis=-1).sum() >= 3 * 128 * 128  # upscaled to 128 px cells


def test_a_train_run_writes_tensorboard_loss_png_and_validation_grid(ray_cluster, tmp_path):
    src = datasets.imagefolder(tmp_path / "ds", 4)
    job = from_dict(TrainJob, {
        "model": {"device": "cpu"}, "data": {"source": str(src)}, "transforms": {"resolution": 64},
        "train": {"resolution": 64, "batch_size": 1, "max_steps": 4, "learning_rate": 1e-3, "mixed_precision": "no"},
        "scaling": {"num_workers": 2},
        "checkpoint": {"storage_path": str(tmp_path / "runs"), "every_n_steps": 2, "run_name": "pictures"},
        "validation": {"prompts": ["a red circle", "a blue square"], "every_n_steps": 2, "num_inference_steps": 2},
        "publish": {"registry": str(tmp_path / "registry"), "name": "pictures"},
    })
    r = train(job)
    run = tmp_path / "runs" / "pictures"
    event_files = list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert len(event_files) == 1, event_files  # rank 0 alone writes
    acc = events(run / "tensorboard")
    losses = acc.Scalars("train/loss")
    assert [e.step for e in losses] == [1, 2, 3, 4]
    assert [e.value for e in losses] == pytest.approx(r["losses"], rel=1e-6)
    assert [e.step for e in acc.Scalars("train/lr")] == [1, 2, 3, 4]
    assert all(e.value > 0 and math.isfinite(e.value) for e in acc.Scalars("train/images_per_s"))
    assert [e.step for e in acc.Images("validation/01")] == [2, 4]
    loss_png = png(run / "loss.png")
    assert loss_png.size == (800, 400)
    grid = png(run / "validation_grid.png")
    assert grid.width > 2 * 128 and grid.height > 2 * 128  # two prompts by two validation steps
    assert json.loads(grid.text["steps"]) == [2, 4]
