"""The generation engine, fused LoRA adapters and ControlNet helpers, on the tiny models (CPU).

LoRA files are made here the way training makes them (peft adapters on the real tiny
modules, saved by diffusers), and the fused result is checked against diffusers' own peft
path. Latents (``output_type="latent"``) are compared where exactness matters: the tiny VAE's
random decoder squashes differences, latents do not.
"""

from __future__ import annotations

import io
import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from rayimg.config import EngineConfig, ModelConfig
from rayimg.models import load_model
from rayimg.render.adapters import FusedAdapters, LoraError, LoraLayer, LoraWeights, load_lora_file
from rayimg.render.controlnet import build_tiny_controlnet, canny, load_controlnet
from rayimg.render.engine import Engine, GenerationRequest, canonical_adapters
from rayimg.render.output import output_key, png_bytes
from rayimg.render.schedulers import SCHEDULER_TABLE, make_scheduler

SIZE = 64
ATTN = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT = ["q_proj", "k_proj", "v_proj", "out_proj"]


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


def _load(cache_dir: Path, name: str = "rayimg-tiny-sd"):
    return load_model(ModelConfig(pretrained=name, device="cpu", cache_dir=str(cache_dir)))


@pytest.fixture(scope="module")
def sd(cache_dir):
    return _load(cache_dir)


@pytest.fixture(scope="module")
def module_engine(sd):
    controlnet = build_tiny_controlnet(sd.pipeline.unet, seed=0)
    return Engine(sd.pipeline, controlnet=controlnet, controlnet_id="tiny-canny")


@pytest.fixture
def engine(module_engine):
    """The shared engine, put back to the base weights after each test."""
    yield module_engine
    module_engine.set_adapters([], [])


def _seeded_lora_b(model, seed: int, std: float) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def make_lora(out_dir: Path, family: str, seed: int, *, rank: int, alpha: float, unet_targets, text_targets=None,
              text_alpha: float = 2, kohya: bool = False, text_model_prefix: bool = False) -> Path:
    """Train-shaped LoRA files: peft adapters on a fresh tiny pipeline with seeded random
    weights, saved by diffusers in peft naming (``lora_A``/``lora_B``, alpha in diffusers'
    adapter metadata); text-encoder keys optionally with the older ``text_model.`` prefix;
    optionally a kohya file of the same weights."""
    import peft
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    from rayimg.models.tiny import build_tiny_sd, build_tiny_sdxl

    pipe = (build_tiny_sd if family == "sd" else build_tiny_sdxl)(0)
    encoders = ["text_encoder"] + (["text_encoder_2"] if family == "sdxl" else [])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet_cfg = peft.LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(unet_targets))
        pipe.unet.add_adapter(unet_cfg)
        _seeded_lora_b(pipe.unet, seed, 0.05)
        text_cfg = None
        if text_targets:
            text_cfg = peft.LoraConfig(r=2, lora_alpha=text_alpha, init_lora_weights="gaussian", target_modules=list(text_targets))
            for i, name in enumerate(encoders):
                getattr(pipe, name).add_adapter(text_cfg)
                _seeded_lora_b(getattr(pipe, name), seed + 1 + i, 0.05)
    peft_sds = {"unet": get_peft_model_state_dict(pipe.unet)}
    kwargs = {"unet_lora_layers": peft_sds["unet"], "unet_lora_adapter_metadata": unet_cfg.to_dict()}
    if text_cfg is not None:
        for name in encoders:
            peft_sds[name] = get_peft_model_state_dict(getattr(pipe, name))
            prefix = "text_model." if text_model_prefix else ""
            kwargs[f"{name}_lora_layers"] = {prefix + k: v for k, v in peft_sds[name].items()}
            kwargs[f"{name}_lora_adapter_metadata"] = text_cfg.to_dict()
    cls = StableDiffusionPipeline if family == "sd" else StableDiffusionXLPipeline
    cls.save_lora_weights(str(out_dir), **kwargs)
    if kohya:
        prefixed = {f"{c}.{k}": v for c, sd_ in peft_sds.items() for k, v in sd_.items()}
        kohya_sd = convert_state_dict_to_kohya(prefixed)
        for key in kohya_sd:
            if key.endswith(".alpha"):  # the converter writes alpha = rank; store the real alphas
                kohya_sd[key] = torch.tensor(float(alpha if key.startswith("lora_unet_") else text_alpha))
        save_file({k: v.contiguous() for k, v in kohya_sd.items()}, str(out_dir / "lora_kohya.safetensors"))
    return out_dir


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    a = make_lora(root / "a", "sd", 1, rank=4, alpha=8, unet_targets=ATTN + ["conv1"], text_targets=TEXT, text_alpha=1,
                  kohya=True, text_model_prefix=True)
    b = make_lora(root / "b", "sd", 2, rank=2, alpha=2, unet_targets=["to_k", "to_v", "proj_out"])
    return {"a": a, "b": b}


@pytest.fixture(scope="module")
def reference(cache_dir, loras):
    """A second copy of the tiny model with both LoRAs loaded by diffusers (peft layers)."""
    model = _load(cache_dir)
    model.pipeline.load_lora_weights(str(loras["a"]), adapter_name="a")
    model.pipeline.load_lora_weights(str(loras["b"]), adapter_name="b")
    return Engine(model.pipeline)


def req(**kw) -> GenerationRequest:
    base = dict(prompt="a red circle on a white background", negative_prompt="blurry", steps=3, guidance_scale=5.0,
                width=SIZE, height=SIZE, seed=7)
    return GenerationRequest(**{**base, **kw})


def square(fill=(255, 255, 255), background=(0, 0, 0), box=(16, 16, 47, 47)) -> Image.Image:
    image = Image.new("RGB", (SIZE, SIZE), background)
    ImageDraw.Draw(image).rectangle(box, fill=fill)
    return image


def latents(engine: Engine, requests) -> torch.Tensor:
    return torch.stack(engine.generate(list(requests), output_type="latent"))


def snapshot(pipe) -> dict[str, torch.Tensor]:
    return {f"{c}.{n}": p.detach().clone() for c in ("unet", "text_encoder") for n, p in getattr(pipe, c).named_parameters()}


# --------------------------------------------------------------------------- modes and schedulers
def test_every_scheduler_runs(engine):
    seen = []
    for name in SCHEDULER_TABLE:
        (image,) = engine.generate([req(scheduler=name, steps=2)], output_type="np")
        assert image.shape == (SIZE, SIZE, 3) and np.isfinite(image).all(), name
        seen.append(name)
    assert set(seen) >= {"euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "ddim", "unipc", "pndm"}


def test_txt2img_img2img_controlnet_run_and_condition(engine):
    (pil,) = engine.generate([req()])
    assert isinstance(pil, Image.Image) and pil.size == (SIZE, SIZE)

    white, black = square(), square(fill=(0, 0, 0), background=(255, 255, 255))
    i2i = latents(engine, [req(mode="img2img", init_image=white, strength=0.5), req(mode="img2img", init_image=black, strength=0.5)])
    assert (i2i[0] - i2i[1]).abs().max() > 0.1, "img2img ignores its init image"
    # img2img shares the loaded modules: nothing is copied.
    assert engine.pipeline("img2img").unet is engine.pipe.unet and engine.pipeline("img2img").vae is engine.pipe.vae

    edges = canny(white)
    cn = latents(engine, [req(mode="controlnet", control_image=edges, controlnet="tiny-canny"),
                          req(mode="controlnet", control_image=Image.new("RGB", (SIZE, SIZE)), controlnet="tiny-canny")])
    assert (cn[0] - cn[1]).abs().max() > 1e-2, "ControlNet ignores its control image"
    assert engine.pipeline("controlnet").unet is engine.pipe.unet

    with pytest.raises(ValueError, match="controlnet"):
        engine.generate([req(mode="controlnet", control_image=edges, controlnet="other")])


def _png(image) -> bytes:
    return png_bytes(image, {})


@pytest.mark.parametrize("mode,scheduler", [("txt2img", "euler"), ("txt2img", "euler_a"), ("img2img", "euler_a")])
def test_same_image_alone_or_in_a_batch(engine, mode, scheduler):
    extra = {"mode": "img2img", "strength": 0.7} if mode == "img2img" else {}
    inits = [square(), square(fill=(200, 30, 30)), square(box=(8, 8, 30, 50))]
    batch = [
        req(prompt=p, seed=s, scheduler=scheduler, **extra, **({"init_image": inits[i]} if mode == "img2img" else {}))
        for i, (p, s) in enumerate([("a blue square", 11), ("a red circle on a white background", 12), ("a green cat", 13)])
    ]
    together = engine.generate(batch)
    for i in range(3):
        (alone,) = engine.generate([batch[i]])
        assert _png(alone) == _png(together[i]), f"image {i} differs between batch of 3 and alone"
    assert _png(together[0]) != _png(together[1])

    # A true batched call (batch_invariant=False) agrees up to kernel rounding.
    engine.batch_invariant = False
    try:
        batched = latents(engine, batch)
    finally:
        engine.batch_invariant = True
    assert torch.allclose(batched, latents(engine, batch), atol=1e-4)


# --------------------------------------------------------------------------- requests and keys
def test_request_params_keys_and_validation():
    image = square()
    r = req(mode="img2img", init_image=image, strength=0.6, adapters=[("style", 2, 0.5), {"name": "a", "version": "1", "scale": 1}])
    params = r.params()
    json.dumps(params)  # JSON-able
    assert re.fullmatch(r"[0-9a-f]{64}", params["init_image"])
    assert params["adapters"] == [{"name": "a", "version": "1", "scale": 1.0}, {"name": "style", "version": "2", "scale": 0.5}]
    assert r.adapters == (("a", "1", 1.0), ("style", "2", 0.5))
    assert "control_image" not in params and "strength" not in req().params()
    # The key covers the image's pixels.
    other = req(mode="img2img", init_image=square(fill=(254, 255, 255)), strength=0.6, adapters=r.adapters)
    assert output_key("m", "h", [], params) != output_key("m", "h", [], other.params())
    assert hash(r) == hash(req(mode="img2img", init_image=square(), strength=0.6, adapters=list(reversed(r.adapters))))
    # The batch key separates what one pipeline call cannot mix.
    assert r.batch_key() != req().batch_key()
    assert req(seed=1, prompt="x").batch_key() == req(seed=2, prompt="y").batch_key()
    assert req(adapters=[("a", "1", 1.0)]).batch_key() != req(adapters=[("a", "1", 0.5)]).batch_key()
    # Numbers from a Parquet/CSV catalog arrive as numpy scalars: stored as plain Python numbers.
    from_catalog = req(steps=np.int64(3), seed=np.int64(7), guidance_scale=np.float32(5.0), width=np.int32(SIZE))
    assert from_catalog == req() and type(from_catalog.steps) is int and json.dumps(from_catalog.params())

    for kwargs, field in [({"mode": "img2img"}, "init_image"), ({"mode": "controlnet"}, "control_image"),
                          ({"mode": "inpaint"}, "mode"), ({"scheduler": "lms"}, "scheduler"), ({"width": 60}, "width"),
                          ({"steps": 0}, "steps"), ({"steps": 2.5}, "steps"), ({"seed": "7"}, "seed"),
                          ({"init_image": square()}, "init_image"),
                          ({"mode": "img2img", "init_image": square(), "strength": 0.0}, "strength"),
                          ({"mode": "img2img", "init_image": Image.new("RGB", (32, 32))}, "init_image"),
                          ({"adapters": [("a", "1", 1.0), ("a", "1", 0.5)]}, "adapters")]:
        with pytest.raises(ValueError, match=field):
            req(**kwargs)


def test_engine_wiring(cache_dir):
    model = _load(cache_dir)
    models = [m for m in model.pipeline.components.values() if isinstance(m, torch.nn.Module)]
    assert any(p.requires_grad for p in model.pipeline.unet.parameters())  # as diffusers loads it
    model.pipeline.vae.train()
    engine = Engine.from_config(model.pipeline, EngineConfig(compile=True, vae_slicing=True))
    # inference only: a weight that requires grad changes the compiled graph (render run 8)
    assert len(models) == 3 and not any(p.requires_grad for m in models for p in m.parameters())
    assert not any(m.training for m in models)
    # Compiled in place (nothing runs here): the module and its parameter paths stay the same.
    assert engine.config.compile and model.pipeline.unet._compiled_call_impl is not None
    assert type(model.pipeline.unet).__name__ == "UNet2DConditionModel"
    assert model.pipeline.vae.use_slicing
    with pytest.raises(ValueError, match="no ControlNet"):
        engine.pipeline("controlnet")


# --------------------------------------------------------------------------- adapters: loading
def test_kohya_file_loads_to_the_same_deltas(loras):
    diffusers_lora = load_lora_file(loras["a"], name="a")
    kohya_lora = load_lora_file(loras["a"] / "lora_kohya.safetensors", name="a-kohya")
    assert set(diffusers_lora.layers) == {"unet", "text_encoder"}
    assert {c: set(m) for c, m in diffusers_lora.layers.items()} == {c: set(m) for c, m in kohya_lora.layers.items()}
    conv = [p for p in diffusers_lora.layers["unet"] if p.endswith("conv1")]
    assert conv and diffusers_lora.layers["unet"][conv[0]].down.ndim == 4  # conv LoRA
    q = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    assert diffusers_lora.layers["unet"][q].scale == 2.0  # alpha 8 / rank 4, from diffusers' metadata
    assert all(layer.scale == 0.5 for layer in diffusers_lora.layers["text_encoder"].values())  # alpha 1 / rank 2
    for component, path, layer in diffusers_lora.items():
        other = kohya_lora.layers[component][path]
        torch.testing.assert_close(other.delta(), layer.delta(), rtol=0, atol=1e-6, msg=f"{component}.{path}")
    assert diffusers_lora.fingerprint != kohya_lora.fingerprint and len(diffusers_lora.fingerprint) == 64


def test_only_safetensors_are_read(tmp_path, loras):
    torch.save({"x": torch.zeros(1)}, tmp_path / "lora.bin")
    with pytest.raises(LoraError, match="only .safetensors"):
        load_lora_file(tmp_path / "lora.bin")
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(LoraError, match="not a valid safetensors"):
        load_lora_file(tmp_path / "bad.safetensors", name="bad")


# --------------------------------------------------------------------------- adapters: the math
def test_fused_adapter_matches_diffusers(engine, reference, loras):
    lora_a = load_lora_file(loras["a"], name="a")
    base = latents(engine, [req(seed=3)])
    engine.set_adapters([(lora_a, 1.0)], [("a", "1", 1.0)])
    fused = latents(engine, [req(seed=3, adapters=[("a", "1", 1.0)])])
    reference.pipe.set_adapters(["a"], adapter_weights=[1.0])
    expected = latents(reference, [req(seed=3)])
    assert (expected - base).abs().max() > 0.05, "the LoRA should change the image"
    torch.testing.assert_close(fused, expected, rtol=0, atol=1e-4)


def test_two_adapters_with_scales_match_diffusers(engine, reference, loras):
    lora_a, lora_b = load_lora_file(loras["a"], name="a"), load_lora_file(loras["b"], name="b")
    # Listed in either order, the fused set is the same (sorted by name) and so is the image.
    engine.set_adapters([(lora_b, 1.0), (lora_a, 0.5)], [("b", "3", 1.0), ("a", "1", 0.5)])
    assert engine.adapter_identity == (("a", "1", 0.5), ("b", "3", 1.0))
    fused = latents(engine, [req(seed=4, adapters=[("a", "1", 0.5), ("b", "3", 1.0)])])
    reference.pipe.set_adapters(["a", "b"], adapter_weights=[0.5, 1.0])
    torch.testing.assert_close(fused, latents(reference, [req(seed=4)]), rtol=0, atol=1e-4)
    assert not engine.set_adapters([(lora_a, 0.5), (lora_b, 1.0)], [("a", "1", 0.5), ("b", "3", 1.0)])  # same set: no-op


def test_scale_zero_is_no_adapter_and_restore_is_exact(engine, loras):
    pipe = engine.pipe
    lora_a, lora_b = load_lora_file(loras["a"], name="a"), load_lora_file(loras["b"], name="b")
    before = snapshot(pipe)
    params = {n: (id(p), p.data_ptr()) for n, p in pipe.unet.named_parameters()}
    base = latents(engine, [req(seed=5)])

    engine.set_adapters([(lora_a, 0.0)], [("a", "1", 0.0)])
    assert torch.equal(latents(engine, [req(seed=5, adapters=[("a", "1", 0.0)])]), base)

    for combo in ([(lora_a, 1.0)], [(lora_b, -0.7)], [(lora_a, 0.3), (lora_b, 2.0)], [(lora_a, 1.0)]):
        engine.set_adapters(combo, [(w.name, "1", s) for w, s in combo])
    changed = [n for n, p in snapshot(pipe).items() if not torch.equal(p, before[n])]
    assert any(n.startswith("text_encoder.") for n in changed) and any(n.endswith("conv1.weight") for n in changed)
    # Parameters were rewritten in place: same objects, same storage (a compiled UNet keeps its graph).
    assert {n: (id(p), p.data_ptr()) for n, p in pipe.unet.named_parameters()} == params
    engine.set_adapters([], [])
    after = snapshot(pipe)
    assert all(torch.equal(after[n], before[n]) for n in before), "restore must give back the base weights bit for bit"
    assert torch.equal(latents(engine, [req(seed=5)]), base)


def test_adapter_identity_is_enforced(engine, loras):
    lora_a = load_lora_file(loras["a"], name="a")
    with pytest.raises(ValueError, match="call set_adapters"):
        engine.generate([req(adapters=[("a", "1", 1.0)])])
    engine.set_adapters([(lora_a, 1.0)], [("a", "1", 1.0)])
    with pytest.raises(ValueError, match="call set_adapters"):
        engine.generate([req()])
    with pytest.raises(ValueError, match="scale"):
        engine.set_adapters([(lora_a, 1.0)], [("a", "1", 0.5)])


def test_missing_module_names_adapter_and_module(engine, loras):
    pipe = engine.pipe
    before = snapshot(pipe)
    good = load_lora_file(loras["b"], name="b")
    bogus = LoraWeights(
        layers={"unet": {"down_blocks.0.attentions.7.to_q": LoraLayer(torch.zeros(2, 32), torch.zeros(32, 2), 2.0)}},
        fingerprint="0" * 64, name="broken",
    )
    with pytest.raises(LoraError, match=r"adapter 'broken'.*down_blocks\.0\.attentions\.7\.to_q"):
        engine.set_adapters([(good, 1.0), (bogus, 1.0)], [("b", "1", 1.0), ("broken", "1", 1.0)])
    wrong_shape = LoraWeights(
        layers={"unet": {"down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": LoraLayer(torch.zeros(2, 7), torch.zeros(64, 2), 2.0)}},
        fingerprint="1" * 64, name="misshapen",
    )
    with pytest.raises(LoraError, match="misshapen.*attn1.to_q"):
        engine.set_adapters([(wrong_shape, 1.0)], [("misshapen", "1", 1.0)])
    no_te2 = LoraWeights(layers={"text_encoder_2": {"encoder.layers.0.self_attn.q_proj": LoraLayer(torch.zeros(2, 32), torch.zeros(32, 2), 2.0)}},
                         fingerprint="2" * 64, name="xl-only")
    with pytest.raises(LoraError, match="no text_encoder_2"):
        engine.set_adapters([(no_te2, 1.0)], [("xl-only", "1", 1.0)])
    # Nothing was half-applied.
    after = snapshot(pipe)
    assert all(torch.equal(after[n], before[n]) for n in before)
    assert engine.adapter_identity == ()


def test_fused_qkv_projections_take_adapters(cache_dir, engine, loras):
    lora_a = load_lora_file(loras["a"], name="a")
    engine.set_adapters([(lora_a, 0.8)], [("a", "1", 0.8)])
    expected = latents(engine, [req(seed=6, adapters=[("a", "1", 0.8)])])

    model = _load(cache_dir)
    fused_engine = Engine(model.pipeline, EngineConfig(fuse_qkv=True))
    assert model.pipeline.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.fused_projections
    fused_engine.set_adapters([(lora_a, 0.8)], [("a", "1", 0.8)])
    got = latents(fused_engine, [req(seed=6, adapters=[("a", "1", 0.8)])])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


def test_textual_inversion(engine, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "learned_embeds.safetensors"
    save_file({"<shape>": torch.randn(1, 32, generator=torch.Generator().manual_seed(0))}, str(path),
              metadata={"format": "pt", "placeholder_token": "<shape>"})
    token = engine.load_textual_inversion(tmp_path, identity=("shape-ti", "1"))
    assert token == "<shape>"
    assert engine.load_textual_inversion(path) == token  # same file: no-op
    with_token = latents(engine, [req(prompt="a <shape> on a table", adapters=[("shape-ti", "1", 1.0)])])
    without = latents(engine, [req(prompt="a on a table")])
    assert (with_token - without).abs().max() > 1e-3


# --------------------------------------------------------------------------- SDXL
def test_sdxl_modes_and_adapter_matching_diffusers(cache_dir, tmp_path):
    lora_dir = make_lora(tmp_path / "xl", "sdxl", 3, rank=4, alpha=4, unet_targets=ATTN, text_targets=TEXT)
    xl = _load(cache_dir, "rayimg-tiny-sdxl")
    engine = Engine(xl.pipeline, controlnet=build_tiny_controlnet(xl.pipeline.unet, seed=0), controlnet_id="xl-canny")
    # The other modes build on the SDXL pipeline too.
    (i2i,) = engine.generate([req(steps=2, mode="img2img", init_image=square(), strength=0.5)])
    (cn,) = engine.generate([req(steps=2, mode="controlnet", control_image=canny(square()), controlnet="xl-canny")])
    assert i2i.size == cn.size == (SIZE, SIZE)
    assert engine.pipeline("img2img").text_encoder_2 is xl.pipeline.text_encoder_2
    lora = load_lora_file(lora_dir, name="xl")
    assert set(lora.layers) == {"unet", "text_encoder", "text_encoder_2"}
    engine.set_adapters([(lora, 1.0)], [("xl", "1", 1.0)])
    (pil,) = engine.generate([req(steps=2, adapters=[("xl", "1", 1.0)])])
    assert pil.size == (SIZE, SIZE)
    fused = latents(engine, [req(steps=2, adapters=[("xl", "1", 1.0)])])
    engine.set_adapters([], [])
    base = latents(engine, [req(steps=2)])

    xl.pipeline.load_lora_weights(str(lora_dir), adapter_name="xl")
    expected = latents(engine, [req(steps=2)])  # peft layers now active; nothing fused
    assert (expected - base).abs().max() > 0.05
    torch.testing.assert_close(fused, expected, rtol=0, atol=1e-4)


# --------------------------------------------------------------------------- ControlNet helpers
def test_canny_marks_the_square_border_only():
    edges = np.asarray(canny(square(), low=100, high=200))
    assert edges.shape == (SIZE, SIZE, 3) and set(np.unique(edges)) == {0, 255}
    on = np.argwhere(edges[..., 0] > 0)
    # Every edge pixel lies within one pixel of the square's border (rows/cols 16 and 47)...
    near_border = (np.minimum(np.abs(on - 16), np.abs(on - 47)).min(axis=1) <= 1) & (on >= 15).all(1) & (on <= 48).all(1)
    assert near_border.all()
    # ...and the border is closed: each side is marked along its whole length.
    rows, cols = edges[..., 0].any(axis=1), edges[..., 0].any(axis=0)
    assert rows[16:48].all() and cols[16:48].all()
    assert not rows[:15].any() and not rows[49:].any()
    assert not np.asarray(canny(Image.new("RGB", (SIZE, SIZE), (90, 90, 90)))).any()
    with pytest.raises(ValueError, match="low"):
        canny(square(), low=200, high=100)


def test_controlnet_save_and_load(sd, tmp_path):
    controlnet = build_tiny_controlnet(sd.pipeline.unet, seed=1)
    controlnet.save_pretrained(tmp_path / "cn", safe_serialization=True)
    loaded = load_controlnet(tmp_path / "cn")
    for (name, a), (_, b) in zip(controlnet.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_controlnet(tmp_path / "missing")


def test_canonical_adapters_accepts_dicts_and_tuples():
    assert canonical_adapters([{"name": "b", "version": 2, "scale": 1}, ("a", "x", 0.25)]) == (("a", "x", 0.25), ("b", "2", 1.0))
    with pytest.raises(ValueError, match="version"):
        canonical_adapters([{"name": "a"}])


def test_fused_adapters_standalone_chunks_and_identity(sd, loras):
    """FusedAdapters on its own: identity defaults to the file fingerprints and scales, and
    fusing module by module (tiny chunks) writes exactly what whole-group chunks write."""
    pipe = sd.pipeline
    lora_a, lora_b = load_lora_file(loras["a"], name="a"), load_lora_file(loras["b"], name="b")
    fused = FusedAdapters(pipe)
    try:
        assert fused.apply([(lora_a, 0.7), (lora_b, 1.3)])
        assert not fused.apply([(lora_a, 0.7), (lora_b, 1.3)])
        assert fused.identity == ((lora_a.fingerprint, 0.7), (lora_b.fingerprint, 1.3))
        assert fused.originals_nbytes > 0
        whole = snapshot(pipe)
        fused.restore()
        one_by_one = FusedAdapters(pipe, chunk_bytes=1)
        one_by_one.apply([(lora_a, 0.7), (lora_b, 1.3)])
        assert all(torch.equal(p, whole[n]) for n, p in snapshot(pipe).items())
        one_by_one.restore()
    finally:
        fused.restore()
    assert fused.identity == ()


def test_lora_weights_move_packed(loras):
    lora = load_lora_file(loras["a"], name="a")
    assert lora.to("cpu") is lora
    moved = lora.to("meta")
    assert moved.device.type == "meta" and moved.fingerprint == lora.fingerprint and moved.nbytes == lora.nbytes
    for (c, p, layer), (_, _, other) in zip(lora.items(), moved.items()):
        assert other.down.shape == layer.down.shape and other.up.shape == layer.up.shape and other.alpha == layer.alpha, f"{c}.{p}"
    packed = lora.packed()
    assert packed.flat and sum(f.numel() * f.element_size() for f in packed.flat.values()) == lora.nbytes
    for (c, p, layer), (_, _, other) in zip(lora.items(), packed.items()):
        assert torch.equal(other.down, layer.down) and torch.equal(other.up, layer.up), f"{c}.{p}"
        assert any(other.down.untyped_storage().data_ptr() == f.untyped_storage().data_ptr() for f in packed.flat.values())
    again = packed.to("meta")  # from the flat buffers: same layout on the other side
    assert again.flat and all(f.device.type == "meta" for f in again.flat.values())
    assert [tuple(l.up.shape) for _, _, l in again.items()] == [tuple(l.up.shape) for _, _, l in lora.items()]


def test_compiled_module_sees_swaps_without_recompiling():
    """Adapters change parameters in place, so a compiled module keeps its graph (one
    compilation) and computes with the new weights."""
    compilations = []

    def counting_backend(graph_module, example_inputs):
        compilations.append(graph_module)
        return graph_module.forward

    class TinyNet(torch.nn.Module):  # defined outside torch, like diffusers' UNet, so dynamo traces it
        def __init__(self):
            super().__init__()
            self.proj_in, self.proj_out = torch.nn.Linear(8, 8), torch.nn.Linear(8, 4)

        def forward(self, x):
            return self.proj_out(torch.nn.functional.gelu(self.proj_in(x)))

    class Holder:
        unet = TinyNet()

    holder = Holder()
    fused = FusedAdapters(holder)
    holder.unet.compile(backend=counting_backend)
    g = torch.Generator().manual_seed(0)
    lora = LoraWeights({"unet": {"proj_in": LoraLayer(torch.randn(2, 8, generator=g), torch.randn(8, 2, generator=g), 2.0)}}, "f" * 64, "tiny")
    x = torch.randn(3, 8, generator=g)
    with torch.no_grad():
        base = holder.unet(x)
        fused.apply([(lora, 1.0)])
        adapted = holder.unet(x)
        fused.apply([(lora, 0.5)])
        half = holder.unet(x)
        fused.restore()
        again = holder.unet(x)
    assert len(compilations) == 1
    assert not torch.allclose(adapted, base) and not torch.allclose(half, adapted)
    assert torch.equal(again, base)


def test_pil_output_has_diffusers_own_rounding(engine):
    """The engine rounds pixels on the device; the bytes equal diffusers' own "pil" output."""
    r = req(seed=11)
    (ours,) = engine.generate([r])
    pipe = engine.pipe
    pipe.scheduler = make_scheduler(r.scheduler, engine.base_scheduler_config)
    (theirs,) = pipe(prompt=[r.prompt], negative_prompt=[r.negative_prompt], num_inference_steps=r.steps,
                     guidance_scale=r.guidance_scale, width=r.width, height=r.height,
                     generator=[torch.Generator("cpu").manual_seed(r.seed)], output_type="pil").images
    assert ours.mode == theirs.mode == "RGB" and ours.size == theirs.size
    assert ours.tobytes() == theirs.tobytes()
    assert np.asarray(ours).std() > 0  # a real picture, not a constant


def test_render_stream_equals_render_and_sinks_in_order(cache_dir):
    from rayimg.config import EngineConfig
    from rayimg.render.renderer import Renderer

    model = _load(cache_dir)
    renderer = Renderer.from_pipeline(model.pipeline, model.model_id, model.model_hash, model.family,
                                      EngineConfig(batch_invariant=False, png_compress_level=9))
    batches = [[req(seed=s, steps=2) for s in (1, 2)], [], [req(seed=3, steps=2)]]
    sunk = []
    streamed = list(renderer.render_stream(batches, sink=lambda r, image: sunk.append((r.seed, image.key)) or r.seed))
    assert [[seed for _, seed in batch] for batch in streamed] == [[1, 2], [3]]
    assert sunk == [(seed, image.key) for batch in streamed for image, seed in batch]
    direct = renderer.render(batches[0]) + renderer.render(batches[2])
    assert [image.png for batch in streamed for image, _ in batch] == [image.png for image in direct]
    level1 = Renderer.from_pipeline(model.pipeline, model.model_id, model.model_hash, model.family,
                                    EngineConfig(batch_invariant=False, png_compress_level=1)).render(batches[2])[0]
    assert level1.key == direct[-1].key
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(level1.png))), np.asarray(Image.open(io.BytesIO(direct[-1].png))))


def test_fp8_engine_stays_close_follows_swaps_and_changes_the_key(cache_dir, sd, loras):
    from rayimg.render.fp8 import Float8Linear, fp8_unavailable
    from rayimg.render.renderer import Renderer

    model = _load(cache_dir)  # its own copy: the conversion is in place
    keys_before = list(model.pipeline.unet.state_dict())
    engine = Engine(model.pipeline, EngineConfig(fp8=True))
    named = {n: m for n, m in model.pipeline.unet.named_modules() if isinstance(m, Float8Linear)}
    converted = list(named.values())
    assert converted and list(model.pipeline.unet.state_dict()) == keys_before
    # only the LayerNorm-fed linears: self-attention q/k/v, cross-attention q, the GEGLU proj
    ends = {n.split("transformer_blocks.")[1].split(".", 1)[1] for n in named}
    assert ends == {"attn1.to_q", "attn1.to_k", "attn1.to_v", "attn2.to_q", "ff.net.0.proj"}, ends
    exact = Engine(sd.pipeline)
    base8, base = latents(engine, [req(seed=5)]), latents(exact, [req(seed=5)])
    rel = float((base8 - base).norm() / base.norm())
    assert 0 < rel < 0.1, rel  # float8 products: close to the exact engine, not equal

    base_copies = {n: (m.w8.clone(), m.w_scale.clone()) for n, m in named.items()}

    def follows(m) -> bool:
        deq, w = m.w8.float() * m.w_scale.t(), m.weight.detach().float()
        return float((deq - w).abs().max()) <= float(w.abs().max()) / 8

    def at_base(name) -> bool:
        return all(torch.equal(t, b) for t, b in zip((named[name].w8, named[name].w_scale), base_copies[name]))

    lora_a, lora_b = load_lora_file(loras["a"], name="a"), load_lora_file(loras["b"], name="b")
    # b adapts to_k and to_v only: after a -> b the q projections are back at their base
    # weights and their float8 copies back at the base's, bit for bit; the others follow b
    engine.set_adapters([(lora_b, 1.0)], [("b", "1", 1.0)])
    engine.set_adapters([(lora_a, 1.0)], [("a", "1", 1.0)])
    engine.set_adapters([(lora_b, 1.0)], [("b", "1", 1.0)])
    queries = [n for n in named if n.endswith("to_q")]
    assert queries and all(at_base(n) for n in queries)
    assert all(follows(named[n]) for n in named) and not all(at_base(n) for n in named if n.endswith("to_k"))
    engine.set_adapters([(lora_a, 1.0)], [("a", "1", 1.0)])
    assert all(follows(m) for m in converted)  # the float8 copies follow the fused weights
    assert not any(at_base(n) for n in queries)
    adapted = latents(engine, [req(seed=5, adapters=[("a", "1", 1.0)])])
    exact.set_adapters([(lora_a, 1.0)], [("a", "1", 1.0)])
    adapted_exact = latents(exact, [req(seed=5, adapters=[("a", "1", 1.0)])])
    exact.set_adapters([], [])
    assert float((adapted - base8).norm()) > 0.5 * float((adapted_exact - base).norm())  # the adapter shows
    engine.set_adapters([], [])
    assert all(at_base(n) for n in named)  # restored: the base's float8 copies, bit for bit
    assert torch.equal(latents(engine, [req(seed=5)]), base8)

    r8 = Renderer.from_pipeline(model.pipeline, model.model_id, model.model_hash, model.family, EngineConfig(fp8=True))
    plain = Renderer.from_pipeline(sd.pipeline, sd.model_id, sd.model_hash, sd.family)
    assert r8.key(req()) != plain.key(req())
    assert "compute capability" not in (fp8_unavailable(torch.device("cpu"), torch.float32) or "")
    assert "not available on meta" in fp8_unavailable(torch.device("meta"), torch.bfloat16)


def test_engine_pins_the_execution_device_and_defers_to_offload_hooks(cache_dir):
    """diffusers' _execution_device walks every submodule per call; the engine's pipelines answer
    with the model's device, keep their class name and isinstance, and ask diffusers again when a
    component carries an offload hook."""
    import types

    import diffusers

    model = _load(cache_dir)
    engine = Engine(model.pipeline)
    for mode in ("txt2img", "img2img"):
        pipe = engine.pipeline(mode)
        base = diffusers.StableDiffusionPipeline if mode == "txt2img" else diffusers.StableDiffusionImg2ImgPipeline
        assert type(pipe) is not base and isinstance(pipe, base) and type(pipe).__name__ == base.__name__
        assert pipe._execution_device == torch.device("cpu")
    Engine(model.pipeline)  # a second engine on the same pipeline: pinned again, not subclassed twice
    assert type(model.pipeline).__mro__[1] is diffusers.StableDiffusionPipeline
    hooked = [m for m in model.pipeline.components.values() if isinstance(m, torch.nn.Module)]
    for m in hooked:  # accelerate-style hooks that place execution on another device
        m._hf_hook = types.SimpleNamespace(execution_device="meta")
    try:
        assert model.pipeline._execution_device == torch.device("meta")
    finally:
        for m in hooked:
            del m._hf_hook
    assert model.pipeline._execution_device == torch.device("cpu")
    image = engine.generate([req(seed=3)])[0]
    assert image.size == (64, 64)


def test_ddim_from_a_config_without_clip_sample_does_not_clip_latents():
    from diffusers import EulerDiscreteScheduler

    euler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    assert make_scheduler("ddim", euler.config).config.clip_sample is False
    ddim_cfg = {**make_scheduler("ddim", euler.config).config, "clip_sample": True}  # a config that asks for it keeps it
    assert make_scheduler("ddim", ddim_cfg).config.clip_sample is True


# --------------------------------------------------------------------------- prompt cache and prefetch
def in_place_latents(pipe, request: GenerationRequest) -> torch.Tensor:
    """The plain diffusers call on the same pipeline (weights as they are now): the pipeline
    encodes the prompt and negative prompt itself."""
    pipe.scheduler = make_scheduler(request.scheduler, pipe.scheduler.config)
    return pipe(prompt=[request.prompt], negative_prompt=[request.negative_prompt], num_inference_steps=request.steps,
                guidance_scale=request.guidance_scale, width=request.width, height=request.height,
                generator=[torch.Generator().manual_seed(request.seed)], output_type="latent").images


def test_prompt_cache_and_prefetch_equal_encoding_in_place(cache_dir, loras, tmp_path):
    """Cached and background-encoded prompts give the latents of diffusers encoding in place,
    bit for bit, and stay right across text-encoder LoRA swaps (also one landing while a
    background encoding is in flight) and a textual inversion loaded after its token was seen."""
    from safetensors.torch import save_file

    pipe = _load(cache_dir).pipeline
    engine = Engine(pipe)
    engine.prompts.prefetch = True  # the default on CUDA; the same code path on CPU
    r1, r2 = req(seed=1, prompt="a red circle"), req(seed=2, prompt="a blue square")
    first = latents(engine, [r1])
    assert engine.prompts.stats == {"encoded": 2, "prefetched": 0, "hits": 0}
    assert engine.prefetch([r2])  # the negative prompt is cached already: only r2's prompt is queued
    assert torch.equal(latents(engine, [r1]), first)  # the background encoding starts during this call
    assert torch.equal(latents(engine, [r2]), in_place_latents(pipe, r2))
    assert engine.prompts.stats == {"encoded": 2, "prefetched": 1, "hits": 4}
    assert torch.equal(first, in_place_latents(pipe, r1))

    lora_a = load_lora_file(loras["a"], name="a")  # has text-encoder layers
    assert engine.prefetch([req(seed=3, prompt="a green star")])
    latents(engine, [r1])  # encoding "a green star" with the base text encoder, in the background
    engine.set_adapters([(lora_a, 1.0)], [("a", "1", 1.0)])  # waits for it, then drops every encoded text
    with_a = req(seed=3, prompt="a green star", adapters=[("a", "1", 1.0)])
    assert torch.equal(latents(engine, [with_a]), in_place_latents(pipe, with_a))
    assert not engine.prefetch([req(seed=4)])  # not the fused adapters: nothing is queued
    engine.set_adapters([], [])
    assert torch.equal(latents(engine, [r2]), in_place_latents(pipe, r2))

    path = tmp_path / "learned_embeds.safetensors"
    save_file({"<tok>": torch.randn(1, 32, generator=torch.Generator().manual_seed(1))}, str(path),
              metadata={"format": "pt", "placeholder_token": "<tok>"})
    seen = req(seed=5, prompt="a <tok> on a table")
    latents(engine, [seen])  # cached while "<tok>" is plain text
    engine.load_textual_inversion(path)
    assert torch.equal(latents(engine, [seen]), in_place_latents(pipe, seen))
    engine.prompts.size = 1
    latents(engine, [r1])
    assert len(engine.prompts._cache) == 1


def test_render_stream_prefetches_the_next_batch(cache_dir):
    from rayimg.render.renderer import Renderer

    model = _load(cache_dir)
    renderer = Renderer.from_pipeline(model.pipeline, model.model_id, model.model_hash, model.family,
                                      EngineConfig(batch_invariant=False))
    renderer.engine.prompts.prefetch = True
    batches = [[req(seed=s, steps=2, prompt=f"prompt {s}") for s in range(2 * b, 2 * b + 2)] for b in range(4)]
    streamed = [image.png for batch in renderer.render_stream(batches) for image, _ in batch]
    # batch 1 warms the batch key; the prompts of batches 3 and 4 are encoded in the background
    assert renderer.engine.prompts.stats["prefetched"] == 4
    fresh = Renderer.from_pipeline(model.pipeline, model.model_id, model.model_hash, model.family,
                                   EngineConfig(batch_invariant=False))
    assert streamed == [image.png for batch in batches for image in fresh.render(batch)]


def test_step_wise_prefetch_encodes_one_text_per_step(cache_dir):
    """The step-wise prefetch: the next batch's prompts are encoded on the calling thread, one
    per denoising-step callback (never two between UNet calls), and the stream's PNGs are those of
    plain render() calls."""
    from rayimg.render.renderer import Renderer

    model = _load(cache_dir)
    renderer = Renderer.from_pipeline(model.pipeline, model.model_id, model.model_hash, model.family,
                                      EngineConfig(batch_invariant=False))
    renderer.engine.prompts.prefetch = True
    prompts = ["p0", "p1", "p0", "p1", "p2", "p3", "p4", "p5"]  # batch 2 repeats batch 1: all cached
    batches = [[req(seed=s, steps=2, prompt=prompts[s]) for s in range(2 * b, 2 * b + 2)] for b in range(4)]
    events: list[str] = []
    hooks = [model.pipeline.unet.register_forward_hook(lambda *_: events.append("U")),
             model.pipeline.text_encoder.register_forward_hook(lambda *_: events.append("T"))]
    try:
        streamed = [image.png for batch in renderer.render_stream(batches) for image, _ in batch]
    finally:
        for hook in hooks:
            hook.remove()
    # batch 1 encodes its 3 texts in place; batches 3 and 4 are encoded during batches 2 and 3
    assert renderer.engine.prompts.stats["prefetched"] == 4
    after_first_step = "".join(events[events.index("U"):])
    assert "TT" not in after_first_step and after_first_step.count("T") == 4, events
    assert renderer.engine.prompts._steps is None and renderer.engine.prompts._result is None
    fresh = Renderer.from_pipeline(model.pipeline, model.model_id, model.model_hash, model.family,
                                   EngineConfig(batch_invariant=False))
    assert streamed == [image.png for batch in batches for image in fresh.render(batch)]


def test_while_busy_runs_once_after_the_last_step_is_queued(engine):
    """The host work of a call runs once, after the last denoising step, before the decode; the
    images are those of a call without it."""
    calls, seen = [0], []
    hook = engine.pipe.unet.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        plain = latents(engine, [req(seed=4), req(seed=5)])
        calls[0] = 0
        busy = torch.stack(engine.generate([req(seed=4), req(seed=5)], output_type="latent",
                                           while_busy=lambda: seen.append(calls[0])))
    finally:
        hook.remove()
    assert torch.equal(busy, plain)
    assert seen == [2 * 3]  # one call per request (batch invariant): in the second one, after its 3 steps

    def parts(n):  # a generator: one part per step callback, what is left after the call
        for _ in range(n - 1):
            seen.append(calls[0])
            yield
        seen.append(calls[0])

    seen.clear()
    hook = engine.pipe.unet.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        calls[0] = 0
        in_parts = latents_with(engine, [req(seed=4)], parts(5))
    finally:
        hook.remove()
    assert torch.equal(in_parts, plain[:1])
    assert seen == [1, 2, 3, 3, 3]

    def failing():
        yield
        raise RuntimeError("part two failed")

    with pytest.raises(RuntimeError, match="part two failed"):  # a caller's bug is not swallowed
        latents_with(engine, [req(seed=4)], failing())
    assert torch.equal(latents(engine, [req(seed=4)]), plain[:1])  # and the engine is still usable


def latents_with(engine: Engine, requests, work) -> torch.Tensor:
    return torch.stack(engine.generate(list(requests), output_type="latent", while_busy=work))


def test_render_stream_loads_the_next_batchs_adapters_while_a_batch_denoises(cache_dir, loras, tmp_path):
    """A stream over batches with different adapters: each batch's adapters reach the store's CPU
    tier during the batch before it; when the swap leaves the text encoders alone, the prompts are
    encoded ahead too. PNGs are those of batch-by-batch renders."""
    from rayimg.registry import AdapterNotFound, AdapterStore
    from rayimg.render.renderer import Renderer
    from rayimg.storage import Storage
    from rayimg.registry import publish_adapter

    model = _load(cache_dir)
    registry = str(tmp_path / "registry")
    for name in ("a", "b"):  # a has text-encoder layers, b only UNet ones
        publish_adapter(Storage(), registry, name, None, loras[name], {"base_model": {"id": model.model_id}, "method": "lora"})

    def renderer(tag: str) -> Renderer:
        store = AdapterStore(Storage(), registry, disk_dir=str(tmp_path / tag))
        made = Renderer.from_pipeline(model.pipeline, model.model_id, model.model_hash, model.family,
                                      EngineConfig(batch_invariant=False), adapter_store=store)
        made.engine.prompts.prefetch = True  # the default on CUDA; the same code path on CPU
        return made

    streaming = renderer("stream")
    batches = [[req(seed=1, steps=2, prompt="one")],
               [req(seed=2, steps=2, prompt="two", adapters=[("b", "1", 1.0)])],
               [req(seed=3, steps=2, prompt="three", adapters=[("a", "1", 0.7)])],
               [req(seed=4, steps=2, prompt="four")]]
    streamed = [[image.png for image, _ in batch] for batch in streaming.render_stream(batches)]
    store = streaming.adapter_store
    assert streaming.prefetched_adapters == 2 and store.stats.loads == 2
    assert store.stats.cpu.hits >= 2  # each swap found its adapter loaded already
    # "two" was encoded during batch 1 (b leaves the text encoders alone); "three" was not (a
    # changes them), nor "four" (the swap back from a changes them)
    assert streaming.engine.prompts.stats["prefetched"] == 1
    fresh = renderer("fresh")
    assert streamed == [[image.png for image in fresh.render(batch)] for batch in batches]

    # an adapter that cannot be loaded ahead leaves the batch before it alone; its own batch fails
    sunk, received = [], []
    broken = [[req(seed=5, steps=2)], [req(seed=6, steps=2, adapters=[("missing", "1", 1.0)])]]
    with pytest.raises(AdapterNotFound, match="missing"):
        for batch in renderer("broken").render_stream(broken, sink=lambda r, image: sunk.append(r.seed) or r.seed):
            received += [seed for _, seed in batch]
    assert sunk == received == [5]  # the batch before the failing one was written and handed over


def test_adapter_store_loads_in_parts_and_cleans_up_when_abandoned(cache_dir, loras, tmp_path):
    from rayimg.registry import WEIGHT_FILE, AdapterCorrupt, AdapterStore
    from rayimg.storage import Storage
    from rayimg.registry import publish_adapter

    registry = str(tmp_path / "registry")
    for name in ("a", "b"):
        publish_adapter(Storage(), registry, name, None, loras[name], {"base_model": {"id": "tiny"}, "method": "lora"})
    disk = tmp_path / "disk"
    store = AdapterStore(Storage(), registry, disk_dir=str(disk))
    assert len(list(store.load_steps("b"))) == 4  # resolve | download | check | parse | pack
    assert (store.stats.downloads, store.stats.loads) == (1, 1)
    version, weights = store.get("b")
    assert version == "1" and store.stats.cpu.hits == 1 and store.stats.loads == 1
    assert list(store.load_steps("b")) == []  # in the CPU tier already: nothing to do

    parts = store.load_steps("a")
    next(parts), next(parts)  # resolved and downloaded, not yet checked
    parts.close()
    assert not list(disk.rglob("*.download")) and ("a", "1") not in store.cpu_keys()

    with open(Path(registry) / "adapters" / "a" / "1" / WEIGHT_FILE, "ab") as f:
        f.write(b"tampered")
    with pytest.raises(AdapterCorrupt, match="sha256"):
        list(store.load_steps("a"))
    assert not list(disk.rglob("*.download")) and ("a", "1") not in store.cpu_keys()


def test_engine_compile_settings_keep_rows_up_to_4096_persistent(monkeypatch):
    """``speedups.configure_compiler`` installs the engine's inductor heuristics (process-wide, and on this
    thread): inner reductions of up to 4,096 elements (SDXL's LayerNorm rows of 1,280) run
    persistent, where inductor's own limit is 1,024; wider rows and other reductions keep
    inductor's choice; ``RAYIMG_PERSISTENT_ROWS=0`` restores inductor's heuristics."""
    import types

    import sympy
    import torch._inductor.config as iconfig
    from torch._inductor.choices import InductorChoices
    from torch._inductor.runtime.hints import ReductionHint
    from torch._inductor.sizevars import SizeVarAllocator
    from torch._inductor.virtualized import V

    from rayimg.render import speedups

    if not hasattr(iconfig, "inductor_choices_class"):
        pytest.skip("this torch has no inductor_choices_class")
    saved = iconfig.inductor_choices_class
    try:
        monkeypatch.delenv("RAYIMG_PERSISTENT_ROWS", raising=False)
        speedups.configure_compiler()
        assert iconfig.inductor_choices_class is speedups._persistent_rows_choices
        assert type(V.choices).__name__ == "PersistentRowsChoices"
        choices = iconfig.inductor_choices_class()
        assert choices.uuid() == "rayimg-persistent-rows-4096"  # the compile cache keys on it

        def features(rnumel: int, hint=ReductionHint.INNER):
            return types.SimpleNamespace(reduction_numel=sympy.Integer(rnumel), numel=sympy.Integer(8192),
                                         get_reduction_hint=lambda: hint)

        with V.set_graph_handler(types.SimpleNamespace(sizevars=SizeVarAllocator())):
            ours = {n: choices.should_use_persistent_reduction(features(n), False) for n in (640, 1280, 4096, 5120)}
            theirs = {n: InductorChoices.should_use_persistent_reduction(features(n), False) for n in (640, 1280, 4096, 5120)}
            assert ours == {640: True, 1280: True, 4096: True, 5120: False}
            assert theirs == {640: True, 1280: False, 4096: False, 5120: False}
            # reductions along strided dimensions (e.g. GroupNorm statistics) keep inductor's choice
            assert not choices.should_use_persistent_reduction(features(1280, ReductionHint.OUTER), False)
            # a cooperative reduction keeps inductor's choice too
            assert (choices.should_use_persistent_reduction(features(1280), True)
                    == InductorChoices.should_use_persistent_reduction(features(1280), True))

        monkeypatch.setenv("RAYIMG_PERSISTENT_ROWS", "0")
        speedups.configure_compiler()
        assert iconfig.inductor_choices_class is None
        assert type(V.choices) is InductorChoices
    finally:
        iconfig.inductor_choices_class = saved
        V.set_choices_handler(saved() if saved else InductorChoices())


def test_vae_decoder_speedups_keep_the_decoders_output(cache_dir):
    """engine.compile_vae converts the VAE decoder (GroupNorms with per-channel statistics, the
    mid-block attention as GEMMs + softmax; parameters and state dict unchanged, the encoder left
    alone), and the converted decoder decodes what diffusers' does, to float32 rounding."""
    import copy

    from diffusers.models.attention_processor import AttnProcessor2_0

    from rayimg.render.vae_decode import ChannelStatsGroupNorm, ScoresAttnProcessor, attention_scores, speed_up_decoder

    model = _load(cache_dir, "rayimg-tiny-sdxl")
    vae = model.pipeline.vae
    plain = copy.deepcopy(vae)
    keys = list(vae.state_dict())
    Engine(model.pipeline, EngineConfig(compile_vae=True))
    norms = [m for m in vae.decoder.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(type(m) is ChannelStatsGroupNorm for m in norms)
    assert all(type(m) is torch.nn.GroupNorm for m in vae.encoder.modules() if isinstance(m, torch.nn.GroupNorm))
    procs = [m.processor for m in vae.decoder.modules() if hasattr(m, "processor")]
    assert procs and all(isinstance(p, ScoresAttnProcessor) for p in procs)
    assert list(vae.state_dict()) == keys
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    decoder = getattr(vae.decoder, "_orig_mod", vae.decoder)
    with torch.no_grad():
        ours = decoder(z / vae.config.scaling_factor)
        ref = plain.decoder(z / vae.config.scaling_factor)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    assert speed_up_decoder(plain, group_norms=False) == {"group_norms": 0, "attentions": 1}

    # the attention alone, against SDPA, with the scores in chunks of (image, head) pairs
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, 40, 16, generator=g) for _ in range(3))
    import rayimg.render.vae_decode as vd

    saved = vd.SCORES_BYTES
    try:
        for budget in (40 * 40 * 4 * 2, 100):  # two pairs per chunk (3 chunks); no pair fits: SDPA
            vd.SCORES_BYTES = budget
            torch.testing.assert_close(attention_scores(q, k, v), torch.nn.functional.scaled_dot_product_attention(q, k, v))
    finally:
        vd.SCORES_BYTES = saved
    assert isinstance(ScoresAttnProcessor().fallback, AttnProcessor2_0)


def test_pending_output_and_the_first_step_index_give_the_same_images(engine):
    """output_type="pending" returns images whose result() is the "pil" image; starting the
    scheduler at index 0 (no lookup of the first timestep) gives the latents of a plain diffusers
    call (which looks it up), for every scheduler."""
    from rayimg.render.engine import PendingImage

    batch = [req(seed=3), req(seed=4, prompt="a green cat")]
    pending = engine.generate(batch, output_type="pending")
    assert all(isinstance(p, PendingImage) for p in pending)
    assert [_png(p.result()) for p in pending] == [_png(im) for im in engine.generate(batch)]
    assert pending[0].ready_at <= time.perf_counter()
    for name in SCHEDULER_TABLE:
        request = req(scheduler=name, steps=3)
        assert torch.equal(latents(engine, [request]), in_place_latents(engine.pipe, request)), name


def test_vae_batch_decodes_in_chunks_with_the_same_pixels(cache_dir):
    """engine.vae_batch: the VAE decodes at most that many images at once (the decoder never sees
    more), and a batch's images are those of one whole-batch decode; bad values are refused."""
    from rayimg.render.speedups import VaeDecode

    model = _load(cache_dir)
    vae = model.pipeline.vae
    z = torch.randn(5, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        whole = vae.decode(z).sample
        seen: list[int] = []
        hook = vae.decoder.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
        try:
            VaeDecode.install(vae, 2)
            chunked = vae.decode(z)
            chunked_tuple = vae.decode(z, return_dict=False)
            small = vae.decode(z[:2], False)
        finally:
            hook.remove()
    assert seen == [2, 2, 1, 2, 2, 1, 2]
    torch.testing.assert_close(chunked.sample, whole, rtol=1e-5, atol=1e-5)
    assert isinstance(chunked_tuple, tuple) and torch.equal(chunked_tuple[0], chunked.sample)
    assert isinstance(small, tuple) and torch.equal(small[0], chunked.sample[:2])

    batch = [req(seed=s, prompt=f"a red circle {s}") for s in range(3)]
    fresh = _load(cache_dir)
    plain = Engine(fresh.pipeline).generate(batch, output_type="np")
    chunked_engine = Engine.from_config(fresh.pipeline, EngineConfig(vae_batch=2, batch_invariant=False))
    assert chunked_engine.config.vae_batch == 2 and fresh.pipeline.vae.decode.images == 2
    for a, b in zip(plain, chunked_engine.generate(batch, output_type="np")):
        np.testing.assert_allclose(a, b, atol=1e-5)
    with pytest.raises(ValueError, match="vae_batch"):
        Engine(fresh.pipeline, EngineConfig(vae_batch=-1))
    with pytest.raises(ValueError, match="vae_batch"):
        EngineConfig(vae_batch=-1).validate()
