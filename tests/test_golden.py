"""Golden outputs: PNGs, output keys, loss values and exported weights.

Written before the engine/training/registry refactor and kept after it: any change to the
default numerics (or to what the jobs write) shows up here. The expected values live in
``tests/golden.json``; ``RAYIMG_WRITE_GOLDEN=1 pytest tests/test_golden.py`` rewrites them (only
for a change that is meant to alter outputs, said so in the commit).

Keys, PNG metadata and the weights' layout must match exactly. Pixels, losses and weight values
must match within float noise: float32 kernels round differently on different CPUs (AVX2 and
AVX-512 machines give PNGs that differ by a level in a few pixels), so a byte-identical PNG
passes at once and any other must have every 8×8 block's mean within ``BLOCK_TOL`` levels.
Kernels of other instruction sets move a block by at most 0.14 levels here; a LoRA scale of
0.78 instead of 0.8 moves one by 1.3.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file

from rayimg.config import EngineConfig, ModelConfig, PrepareJob, TrainJob, from_dict
from rayimg.models.loader import load_model
from rayimg.render.controlnet import build_tiny_controlnet, canny
from rayimg.render.engine import Engine, GenerationRequest
from rayimg.render.output import output_key, png_bytes
from rayimg.render.renderer import Renderer

from tests import datasets
from tests.test_render_engine import ATTN, TEXT, make_lora

GOLDEN = Path(__file__).with_name("golden.json")
WRITE = os.environ.get("RAYIMG_WRITE_GOLDEN") == "1"
SIZE = 64
BLOCK = 8  # pixels per side of the blocks whose means are kept
BLOCK_TOL = 0.5  # levels (of 255) a block's mean may move between CPUs (seen: up to 0.14, float8)
LOSS_RTOL = 1e-5
WEIGHT_RTOL, WEIGHT_ATOL = 1e-4, 1e-7


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def safetensors_digest(path: Path) -> dict:
    """A safetensors file's layout (metadata and every tensor's name, dtype and shape, in sorted
    order: the file's own bytes are not stable, safetensors writes its metadata from a hash map)
    and each tensor's L2 norm, in the same order."""
    from safetensors import safe_open

    h, norms = hashlib.sha256(), []
    with safe_open(str(path), framework="pt") as f:
        h.update(json.dumps(f.metadata() or {}, sort_keys=True).encode())
        for key in sorted(f.keys()):
            tensor = f.get_tensor(key)
            h.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)}:".encode())
            norms.append(float(f"{tensor.double().norm().item():.7g}"))
    return {"layout": h.hexdigest(), "norms": norms}


def image_digest(key: str, png: bytes) -> dict:
    """The output key, the PNG's sha256, its text chunks' sha256 and its 8×8 block means."""
    image = Image.open(io.BytesIO(png))
    info = {k: v for k, v in image.info.items() if isinstance(v, str)}
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    h, w, c = pixels.shape
    blocks = pixels.reshape(h // BLOCK, BLOCK, w // BLOCK, BLOCK, c).mean(axis=(1, 3))
    return {"key": key, "png": sha(png), "info": sha(json.dumps(info, sort_keys=True).encode()),
            "blocks": " ".join(f"{v:.2f}" for v in blocks.reshape(-1))}


def mismatch(expected, got) -> str | None:
    """Why ``got`` is not ``expected`` (see the module doc for what must match exactly), or None."""
    if isinstance(expected, dict) and isinstance(got, dict) and "blocks" in expected:
        for field in ("key", "info"):
            if expected[field] != got.get(field):
                return f"{field} changed"
        if expected["png"] == got.get("png"):
            return None
        a, b = (np.array([float(v) for v in d["blocks"].split()]) for d in (expected, got))
        if a.shape != b.shape:
            return f"image size changed ({a.size} blocks, now {b.size})"
        worst = float(np.abs(a - b).max())
        return None if worst <= BLOCK_TOL else f"pixels changed: an 8×8 block's mean moved {worst:.2f} levels (allowed {BLOCK_TOL})"
    if isinstance(expected, dict) and isinstance(got, dict) and "norms" in expected:
        if expected["layout"] != got.get("layout"):
            return "layout changed (metadata, tensor names, dtypes or shapes)"
        moved = [f"#{i} {x:g} -> {y:g}" for i, (x, y) in enumerate(zip(expected["norms"], got["norms"]))
                 if not math.isclose(x, y, rel_tol=WEIGHT_RTOL, abs_tol=WEIGHT_ATOL)]
        return "weights changed: " + ", ".join(moved)[:1000] if moved else None
    if isinstance(expected, float) and isinstance(got, float):
        return None if math.isclose(expected, got, rel_tol=LOSS_RTOL) else f"{expected!r} -> {got!r}"
    return None if expected == got else f"{expected!r} -> {got!r}"


def check(section: str, got: dict) -> None:
    golden = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
    if WRITE:
        golden[section] = got
        GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
        return
    assert section in golden, f"no golden values for {section!r}: run with RAYIMG_WRITE_GOLDEN=1 once"
    expected = golden[section]
    missing = sorted(set(expected) ^ set(got))
    assert not missing, f"{section}: outputs added or gone: {missing}"
    diff = {k: why for k in sorted(expected) if (why := mismatch(expected[k], got[k]))}
    assert not diff, f"{section}: outputs changed: {json.dumps(diff, indent=1)[:4000]}"


def square() -> Image.Image:
    image = Image.new("RGB", (SIZE, SIZE), (0, 0, 0))
    ImageDraw.Draw(image).rectangle((16, 16, 47, 47), fill=(255, 255, 255))
    return image


def req(**kw) -> GenerationRequest:
    base = dict(prompt="a red circle on a white background", negative_prompt="blurry", steps=3, guidance_scale=5.0,
                width=SIZE, height=SIZE, seed=7)
    return GenerationRequest(**{**base, **kw})


def png_digest(image, request: GenerationRequest, model_id: str, model_hash: str, numerics: str | None = None) -> dict:
    params = request.params()
    if numerics:
        params["numerics"] = numerics
    key = output_key(model_id, model_hash, [{"name": n, "version": v, "scale": s} for n, v, s in request.adapters], params)
    png = png_bytes(image, {"rayimg:key": key, "rayimg:model": model_id, "parameters": request.params()}, 1)
    return image_digest(key, png)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    from rayimg.render.adapters import load_lora_file

    root = tmp_path_factory.mktemp("golden-loras")
    a = make_lora(root / "a", "sd", 11, rank=4, alpha=8, unet_targets=ATTN + ["conv1", "ff.net.2"], text_targets=TEXT, text_alpha=2)
    b = make_lora(root / "b", "sd", 12, rank=2, alpha=2, unet_targets=["to_k", "to_v", "proj_out"])
    ti = root / "ti"
    ti.mkdir()
    save_file({"<shape>": torch.randn(1, 32, generator=torch.Generator().manual_seed(5))}, str(ti / "learned_embeds.safetensors"),
              metadata={"format": "pt", "placeholder_token": "<shape>"})
    return {"a": load_lora_file(a, name="a"), "b": load_lora_file(b, name="b"), "ti": ti}


def test_golden_renders(tmp_path, adapters):
    """txt2img (three schedulers), two LoRAs with scales (attention, conv, feed-forward and text-encoder
    layers), a textual-inversion token, img2img, ControlNet, a batched call, the stream path
    (pending output, PNGs through Renderer) and the CPU float8 engine: keys, PNG metadata and pixels."""
    got = {}
    loaded = load_model(ModelConfig(pretrained="rayimg-tiny-sd", device="cpu", cache_dir=str(tmp_path / "models")))
    mid, mhash = loaded.model_id, loaded.model_hash
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the ControlNet's biases keep diffusers' default (global-RNG) init
        controlnet = build_tiny_controlnet(loaded.pipeline.unet, seed=0)
    engine = Engine(loaded.pipeline, controlnet=controlnet, controlnet_id="tiny-canny")

    def render(name, requests, **kw):
        for i, (request, image) in enumerate(zip(requests, engine.generate(requests, **kw))):
            got[f"{name}/{i}"] = png_digest(image, request, mid, mhash)

    render("plain", [req()])
    render("euler_a", [req(scheduler="euler_a", seed=3)])
    render("dpmpp", [req(scheduler="dpmpp_2m_karras", steps=4, seed=4, width=96)])
    render("img2img", [req(mode="img2img", init_image=square(), strength=0.6)])
    render("controlnet", [req(mode="controlnet", control_image=canny(square()), controlnet="tiny-canny")])
    identity = [("a", "1", 0.8), ("b", "1", 0.5)]
    engine.set_adapters([(adapters["a"], 0.8), (adapters["b"], 0.5)], identity)
    render("two-loras", [req(adapters=identity), req(adapters=identity, seed=8, prompt="a blue square")])
    render("two-loras-img2img", [req(mode="img2img", init_image=square(), strength=0.5, adapters=identity)])
    engine.set_adapters([], [])
    render("plain-again", [req()])
    engine.load_textual_inversion(adapters["ti"], identity=("shape-ti", "1"))
    render("textual-inversion", [req(prompt="a <shape> on a white background", adapters=[("shape-ti", "1", 1.0)])])
    engine.batch_invariant = False
    render("batched", [req(seed=s, prompt=p) for s, p in ((1, "a red circle"), (2, "a green square"))])
    check("renders", got)


def test_golden_render_stream_and_fp8(tmp_path):
    """The Renderer's stream (pending pixels, prefetch) and the CPU float8 engine, keys and PNGs as written."""
    got = {}
    cfg = ModelConfig(pretrained="rayimg-tiny-sd", device="cpu", cache_dir=str(tmp_path / "models"))
    renderer = Renderer(cfg, EngineConfig(batch_size=2))
    batches = [[req(seed=s), req(seed=s + 1, prompt="a yellow circle")] for s in (1, 3)]
    for b, out in enumerate(renderer.render_stream(batches)):
        for i, (image, _) in enumerate(out):
            got[f"stream/{b}/{i}"] = image_digest(image.key, image.png)
    fp8 = Renderer(cfg, EngineConfig(fp8=True))
    for i, image in enumerate(fp8.render([req(seed=5)])):
        got[f"fp8/{i}"] = image_digest(image.key, image.png)
    xl = Renderer(ModelConfig(pretrained="rayimg-tiny-sdxl", device="cpu", cache_dir=str(tmp_path / "models")))
    for i, image in enumerate(xl.render([req(seed=9, steps=2)])):
        got[f"sdxl/{i}"] = image_digest(image.key, image.png)
    check("stream", got)


def test_golden_lora_training_run(ray_cluster, tmp_path):
    """A short LoRA run through the train job (Ray Train, 2 CPU workers, from a prepared cache):
    every loss value and the exported weights (layout exactly, values within float noise)."""
    from rayimg.run.prepare import run as prepare
    from rayimg.run.train import run as train

    src = datasets.imagefolder(tmp_path / "ds", 8)
    prepare(from_dict(PrepareJob, {"data": {"source": str(src)}, "cache": {"output": str(tmp_path / "cache")},
                                   "transforms": {"resolution": 64}, "model": {"device": "cpu"}}))
    job = from_dict(TrainJob, {
        "model": {"device": "cpu"}, "cache": str(tmp_path / "cache"),
        "train": {"resolution": 64, "batch_size": 2, "max_steps": 6, "learning_rate": 5e-3, "mixed_precision": "no",
                  "lr_scheduler": "cosine", "lr_warmup_steps": 2, "max_grad_norm": 1.0},
        "scaling": {"num_workers": 2},
        "checkpoint": {"storage_path": str(tmp_path / "runs"), "every_n_steps": 3},
        "publish": {"registry": str(tmp_path / "registry"), "name": "golden"},
        "lora": {"rank": 4, "target_modules": ["to_q", "to_k", "to_v", "to_out.0", "ff.net.2"]},
    })
    result = train(job)
    adapter = tmp_path / "registry" / "adapters" / "golden" / "1"
    got = {f"loss/{i}": float(x) for i, x in enumerate(result["losses"])}
    for name in ("pytorch_lora_weights.safetensors", "lora_kohya.safetensors"):
        if (adapter / name).exists():
            got[f"weights/{name}"] = safetensors_digest(adapter / name)
    check("lora-train", got)
