"""Real-size SDXL components with random weights, for GPU benchmarks.

Built from the published SDXL configs in ``bench/sdxl_configs/``. Construction
happens directly on the target device and in the target dtype, so a 2.6 B-parameter UNet is
never materialised in float32 on the CPU first; on the ``meta`` device nothing is allocated
at all (how the tests count parameters).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch

CONFIG_DIR = Path(__file__).resolve().parent / "sdxl_configs"


def sdxl_config(component: str) -> dict:
    """The published config of ``component``: 'unet', 'vae', 'text_encoder' or 'text_encoder_2'."""
    path = CONFIG_DIR / f"{component}_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no SDXL config for component {component!r}")
    return json.loads(path.read_text(encoding="utf-8"))


@contextmanager
def _building(device: str | torch.device, dtype: torch.dtype):
    """Create parameters on ``device`` in ``dtype``. The default dtype is process-global, so
    do not build models from several threads at once."""
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def _in_dtype(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast any floating tensor the default dtype missed (most are already in ``dtype``)."""
    tensors = list(model.parameters()) + list(model.buffers())
    if any(t.is_floating_point() and t.dtype != dtype for t in tensors):
        model = model.to(dtype=dtype)
    return model


def build_sdxl_unet(dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu"):
    """The SDXL base UNet (2,567,463,684 parameters), randomly initialised."""
    from diffusers import UNet2DConditionModel

    config = {k: v for k, v in sdxl_config("unet").items() if not k.startswith("_")}
    with _building(device, dtype):
        return _in_dtype(UNet2DConditionModel(**config), dtype)


def build_sdxl_vae(dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu"):
    """The SDXL VAE (83,653,863 parameters), randomly initialised."""
    from diffusers import AutoencoderKL

    config = {k: v for k, v in sdxl_config("vae").items() if not k.startswith("_")}
    with _building(device, dtype):
        return _in_dtype(AutoencoderKL(**config), dtype)


def build_sdxl_text_encoders(dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu"):
    """SDXL's (CLIPTextModel, CLIPTextModelWithProjection): 123,060,480 and 694,659,840
    parameters, randomly initialised."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config_1 = CLIPTextConfig(**sdxl_config("text_encoder"))
    config_2 = CLIPTextConfig(**sdxl_config("text_encoder_2"))
    with _building(device, dtype):
        text_encoder = _in_dtype(CLIPTextModel(config_1), dtype)
        text_encoder_2 = _in_dtype(CLIPTextModelWithProjection(config_2), dtype)
    return text_encoder, text_encoder_2


def build_sdxl_pipeline(dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu"):
    """A real-size StableDiffusionXLPipeline with random weights and the project's tokenizer
    (its ids all fit the real 49,408-token embedding tables)."""
    from diffusers import StableDiffusionXLPipeline

    from rayimg.models.tiny import load_tokenizer, sd_scheduler

    text_encoder, text_encoder_2 = build_sdxl_text_encoders(dtype, device)
    return StableDiffusionXLPipeline(
        vae=build_sdxl_vae(dtype, device),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=load_tokenizer(),
        tokenizer_2=load_tokenizer(pad_token="!"),
        unet=build_sdxl_unet(dtype, device),
        scheduler=sd_scheduler(),
        add_watermarker=False,
    )
