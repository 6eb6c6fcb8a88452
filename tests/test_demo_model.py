"""The project's trained tiny base model (rayimg-tiny-shapes): it loads by name through the one
model loader, it is small, and it follows prompts — judged over a fixed grid of prompts x seeds.
Also the code that trained it, at toy size, and the synthetic data it was trained on."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from rayimg.config import DataConfig, ModelConfig
from rayimg.configbase import load
from rayimg.data.sources import list_items
from scripts.tiny_base import base_model as bm
from scripts.tiny_base.adherence import adherence_grid, measure_adherence
from rayimg.demo.shapes import BASE_SHAPES, COLORS, write_imagefolder
from rayimg.models.loader import load_model, resolve_model_dir
from rayimg.models.tiny import PRETRAINED_MODELS, load_tokenizer
from rayimg.storage import Storage

REPO = Path(__file__).resolve().parent.parent
MODEL = "rayimg-tiny-shapes"


def test_committed_model_loads_by_name_and_is_small():
    model_dir = resolve_model_dir(ModelConfig(pretrained=MODEL))
    assert model_dir == PRETRAINED_MODELS[MODEL]
    weights = sorted(model_dir.rglob("*.safetensors"))
    assert {w.parent.name for w in weights} == {"unet", "vae", "text_encoder"}
    assert sum(w.stat().st_size for w in weights) <= 20 * 2**20
    loaded = load_model(ModelConfig(pretrained=MODEL, device="cpu", dtype="float32"))
    assert loaded.family == "sd" and loaded.model_id == MODEL
    assert type(loaded.pipeline).__name__ == "StableDiffusionPipeline"
    assert loaded.pipeline.unet.dtype == torch.float32


@pytest.fixture(scope="module")
def adherence():
    result = measure_adherence(MODEL, batch=16)  # 4× faster than one by one; verdicts may differ now and then
    print(f"adherence: colour {result['color_accuracy']:.1%}, shape {result['shape_accuracy']:.1%} over {result['count']}")
    return result


def _misses(result):
    return [(r["prompt"], r["seed"], r["judged_color"], r["judged_shape"]) for r in result["rows"]
            if (r["judged_color"], r["judged_shape"]) != (r["color"], r["shape"])]


def test_base_model_follows_prompts_better_than_chance(adherence):
    """The committed model's measured floor (docs/DEMO_MODEL.md): far above chance (20% colour,
    25% shape) and no worse than what it was committed with, less a margin for CPU differences."""
    assert len(adherence_grid()) == adherence["count"] == len(COLORS) * len(BASE_SHAPES) * 2 * 2
    recorded = json.loads((PRETRAINED_MODELS[MODEL] / "training.json").read_text())["adherence"]
    assert adherence["color_accuracy"] >= max(0.40, recorded["color_accuracy"] - 0.05), _misses(adherence)
    assert adherence["shape_accuracy"] >= max(0.30, recorded["shape_accuracy"] - 0.05), _misses(adherence)
    # several shapes are drawn when asked, not one shape for every prompt
    assert len({r["judged_shape"] for r in adherence["rows"] if r["judged_shape"] == r["shape"]}) >= 2


def test_base_model_meets_the_adherence_target(adherence):
    """Issue 7's target on the fixed grid, rendered with GridSettings (20 steps of DPM++ 2M,
    guidance 7.5: the demo's settings too); docs/DEMO_MODEL.md has the figures."""
    assert adherence["settings"]["guidance_scale"] == 7.5 and adherence["settings"]["steps"] == 20
    assert adherence["color_accuracy"] >= 0.80, _misses(adherence)
    assert adherence["shape_accuracy"] >= 0.60, _misses(adherence)


def test_training_recipe_yaml_loads():
    job = load(bm.BaseModelJob, REPO / "scripts" / "train_tiny_base.yaml")
    assert job.vae.block_out_channels and job.denoiser_train.steps >= 1
    recorded = json.loads((PRETRAINED_MODELS[MODEL] / "training.json").read_text())
    assert recorded["config"]["unet"] == json.loads(json.dumps(job.unet.__dict__))


def test_synthetic_data_is_deterministic_and_reads_as_imagefolder(tmp_path):
    a = write_imagefolder(tmp_path / "a", 12, seed=3)
    b = write_imagefolder(tmp_path / "b", 12, seed=3)
    digest = lambda d: [hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.glob("*.png"))]  # noqa: E731
    assert digest(a) == digest(b)
    assert digest(a) != digest(write_imagefolder(tmp_path / "c", 12, seed=4))
    items = list_items(Storage(), DataConfig(source=str(a)))
    assert len(items) == 12
    rows = [json.loads(line) for line in (a / "metadata.jsonl").read_text().splitlines()]
    for item, row in zip(items, rows):
        assert item.caption == f"a {row['color']} {row['shape']} on a {row['background']} background"
        assert row["shape"] in BASE_SHAPES  # the demo's concept stays out of the base data


def test_training_code_at_toy_size_lowers_both_losses():
    """Both phases of scripts/train_tiny_base.py, a few dozen steps on 16 pictures."""
    torch.manual_seed(0)
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        write_imagefolder(d, 16, seed=0)
        pixels, captions = bm.load_pixels(d)
    assert pixels.shape == (16, 3, 64, 64) and pixels.min() >= -1 and pixels.max() <= 1
    vae = bm.build_vae(bm.VaeConfig(block_out_channels=[8, 16], norm_num_groups=4))
    vae_losses = bm.train_vae(vae, pixels, bm.PhaseConfig(steps=40, batch_size=4, learning_rate=2e-3, warmup_steps=5), log=lambda m: None)
    assert vae_losses[-1] < 0.7 * vae_losses[0], vae_losses
    latents = bm.encode_latents(vae, pixels)
    assert latents.shape == (16, 4, 32, 32)
    factor = bm.set_scaling_factor(vae, latents)
    assert vae.config.scaling_factor == pytest.approx(factor)
    tokenizer = load_tokenizer()
    text_encoder = bm.build_text_encoder(bm.TextEncoderConfig(hidden_size=32, intermediate_size=64), tokenizer)
    unet = bm.build_unet(bm.UnetConfig(block_out_channels=[16, 32], down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                                       up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], norm_num_groups=8), 32, 4, 32)
    pipe = bm.build_pipeline(vae, text_encoder, tokenizer, unet)
    embedding_before = text_encoder.get_input_embeddings().weight.detach().clone()
    losses = bm.train_denoiser(pipe, latents * factor, captions, bm.PhaseConfig(steps=60, batch_size=8, learning_rate=2e-3, warmup_steps=5),
                               log=lambda m: None)
    assert losses[-1] < losses[0], losses
    # the text encoder trained too (its EMA is what the pipeline holds now)
    assert not torch.equal(text_encoder.get_input_embeddings().weight, embedding_before)
    assert not any(p.requires_grad for p in pipe.unet.parameters())
