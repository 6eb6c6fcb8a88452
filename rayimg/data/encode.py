"""Encoding prepared items into latents (and optionally text embeddings): plain PyTorch."""

from __future__ import annotations

import numpy as np
import torch

from rayimg.data.cache import uint8_to_pixels
from rayimg.models.text import encode_prompts, pipeline_text_parts


class Encoder:
    """The VAE encoder and text encoders of a loaded pipeline (``rayimg.models.load_model``)."""

    def __init__(self, loaded, *, cache_text_embeddings: bool):
        self.family = loaded.family
        self.device = loaded.device
        self.dtype = loaded.dtype
        pipe = loaded.pipeline
        self.vae = pipe.vae.eval().requires_grad_(False)
        # SDXL's VAE overflows in fp16; diffusers upcasts it (force_upcast). Follow the config.
        self.vae_dtype = torch.float32 if (self.dtype == torch.float16 and self.vae.config.get("force_upcast", False)) else self.dtype
        self.vae.to(dtype=self.vae_dtype)
        self.scaling_factor = float(self.vae.config.scaling_factor)
        self.latent_channels = int(self.vae.config.latent_channels)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.cache_text_embeddings = cache_text_embeddings
        self.tokenizers, self.text_encoders = pipeline_text_parts(pipe)
        for enc in self.text_encoders:
            enc.eval().requires_grad_(False)

    @torch.no_grad()
    def encode_latents(self, pixels_uint8: np.ndarray | list) -> torch.Tensor:
        """(B, 3, H, W) uint8 images -> (B, C, H/8, W/8) scaled latents (the distribution's mean)."""
        # Move uint8 to the device and convert there: a quarter of the bytes of float32 over PCIe.
        x = torch.stack([torch.as_tensor(np.asarray(p)) for p in pixels_uint8]).to(self.device, non_blocking=True)
        x = uint8_to_pixels(x).to(self.vae_dtype)
        latents = self.vae.encode(x).latent_dist.mean * self.scaling_factor
        return latents.to(self.dtype)

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> dict[str, torch.Tensor]:
        return encode_prompts(self.family, self.tokenizers, self.text_encoders, captions, device=self.device)
