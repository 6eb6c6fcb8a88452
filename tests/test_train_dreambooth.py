"""DreamBooth prior preservation on Ray with the tiny model: the missing class images are
generated with the base model into the class folder, a second run reuses them, and the prior
loss is in the metrics; impossible settings are config errors before any work."""

from __future__ import annotations

import io
import json
import math

import pytest
from PIL import Image

from rayimg.config import ConfigError, TrainJob, from_dict
from rayimg.run.train import run as train

from tests import datasets


def dreambooth_job(tmp_path, name: str, **dreambooth) -> TrainJob:
    return from_dict(TrainJob, {
        "model": {"device": "cpu"},
        "data": {"source": str(tmp_path / "inst"), "instance_prompt": "a sks shape", "class_source": str(tmp_path / "cls"),
                 "class_prompt": "a shape"},
        "transforms": {"resolution": 64},
        "train": {"method": "dreambooth", "resolution": 64, "batch_size": 2, "max_steps": 4, "learning_rate": 1e-3,
                  "mixed_precision": "no"},
        "dreambooth": {"prior_preservation": True, "num_class_images": 4, "class_inference_steps": 2, "class_batch_size": 2,
                       **dreambooth},
        "scaling": {"num_workers": 2},
        "checkpoint": {"storage_path": str(tmp_path / "runs"), "every_n_steps": 2, "run_name": name},
        "publish": {"registry": str(tmp_path / "registry"), "name": name, "trigger_word": "sks"},
    })


def instance_images(tmp_path, n=4):
    inst = tmp_path / "inst"
    inst.mkdir()
    for i in range(n):
        (inst / f"{i}.png").write_bytes(datasets.shape_image(i)[0])


def test_class_images_are_generated_once_and_the_prior_loss_is_reported(ray_cluster, tmp_path):
    instance_images(tmp_path)
    cls = tmp_path / "cls"
    cls.mkdir()
    (cls / "mine.png").write_bytes(datasets.shape_image(40)[0])  # one class image of the user's own

    first = train(dreambooth_job(tmp_path, "db-first"))
    generated = sorted(p for p in cls.iterdir() if p.name.startswith("class-"))
    assert len(generated) == 3 and first["class_images"] == {"generated": 3, "used": 4}
    seeds = []
    for path in generated:
        image = Image.open(io.BytesIO(path.read_bytes()))
        assert image.size == (64, 64)
        params = json.loads(image.text["parameters"])
        assert params["prompt"] == "a shape" and params["steps"] == 2
        seeds.append(params["seed"])
    assert seeds == [0, 1, 2]  # image i has seed class_seed + i, its name says which i
    assert first["metrics"]["prior_loss"] > 0 and math.isfinite(first["metrics"]["prior_loss"])
    assert first["metrics"]["instance_loss"] > 0
    meta = json.loads((tmp_path / "registry/adapters/db-first/1/adapter.json").read_text())
    assert meta["method"] == "dreambooth" and meta["trigger_word"] == "sks"

    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in cls.iterdir()}
    second = train(dreambooth_job(tmp_path, "db-second"))
    assert second["class_images"] == {"generated": 0, "used": 4}
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in cls.iterdir()} == before
    assert second["metrics"]["prior_loss"] > 0


def test_prior_preservation_without_class_images_or_a_way_to_get_them_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError) as err:
        from_dict(TrainJob, {"data": {"source": "inst", "instance_prompt": "a sks shape", "class_source": "cls"},
                             "train": {"method": "dreambooth"}, "dreambooth": {"prior_preservation": True}})
    assert err.value.field == "data.class_prompt"
    with pytest.raises(ConfigError) as err:
        from_dict(TrainJob, {"data": {"source": "inst", "instance_prompt": "a sks shape", "class_prompt": "a shape"},
                             "train": {"method": "dreambooth"}, "dreambooth": {"prior_preservation": True}})
    assert err.value.field == "data.class_source"
    with pytest.raises(ConfigError) as err:
        from_dict(TrainJob, {"cache": "c", "data": {"class_source": "cls", "class_prompt": "a shape"},
                             "dreambooth": {"prior_preservation": True}})
    assert err.value.field == "dreambooth.prior_preservation"
    instance_images(tmp_path)
    (tmp_path / "cls").mkdir()
    with pytest.raises(ConfigError) as err:  # raised on the driver, before Ray is asked for anything
        train(dreambooth_job(tmp_path, "db-none", num_class_images=0))
    assert err.value.field == "dreambooth.num_class_images"
