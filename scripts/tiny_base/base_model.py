"""The project's tiny base model that draws real pictures: an SD1.5-style pipeline trained from
scratch on :mod:`rayimg.demo.shapes`.

Two phases, both plain PyTorch (no Ray), on CPU or GPU:

1. :func:`train_vae`: an AutoencoderKL (64x64 pixels -> 4x16x16 latents) on reconstruction
   (MSE + L1) plus a small KL term; its ``scaling_factor`` is then set to 1/std of the latents.
2. :func:`train_denoiser`: the UNet and the CLIP text encoder together, through the project's own
   :class:`~rayimg.train.trainee.Trainee` (method ``full`` with trainable text encoder, caption
   dropout for classifier-free guidance, EMA of the UNet), on the VAE's cached latents.

``scripts/train_tiny_base.py`` runs both from ``scripts/train_tiny_base.yaml`` and saves the
pipeline in diffusers format; the committed result is ``rayimg/models/pretrained/rayimg-tiny-shapes``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from rayimg.configbase import check, field

__all__ = [
    "VaeConfig", "TextEncoderConfig", "UnetConfig", "PhaseConfig", "BaseModelJob", "build_vae", "build_text_encoder",
    "build_unet", "build_pipeline", "load_pixels", "train_vae", "set_scaling_factor", "encode_latents",
    "train_denoiser", "finetune_decoder", "save_pipeline",
]


# --------------------------------------------------------------------------- config
@dataclass
class VaeConfig:
    """The autoencoder: one down-sampling per block after the first."""

    block_out_channels: list[int] = field(default_factory=lambda: [16, 32, 64], doc="channels per level (3 levels: 4x down-sampling)")
    layers_per_block: int = field(1, doc="resnet layers per level")
    latent_channels: int = field(4, doc="latent channels")
    norm_num_groups: int = field(16, doc="group-norm groups")

    def validate(self) -> None:
        check(len(self.block_out_channels) >= 1, "block_out_channels", "must have at least one level")


@dataclass
class TextEncoderConfig:
    """The CLIP text encoder (the repo's tokenizer)."""

    hidden_size: int = field(64, doc="hidden size (= the UNet's cross_attention_dim)")
    intermediate_size: int = field(256, doc="MLP size")
    num_hidden_layers: int = field(2, doc="transformer layers")
    num_attention_heads: int = field(4, doc="attention heads")


@dataclass
class UnetConfig:
    """The denoiser."""

    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 64], doc="channels per level")
    down_block_types: list[str] = field(default_factory=lambda: ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], doc="down blocks")
    up_block_types: list[str] = field(default_factory=lambda: ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], doc="up blocks")
    layers_per_block: int = field(1, doc="resnet layers per level")
    attention_head_dim: int = field(8, doc="channels per attention head")
    norm_num_groups: int = field(16, doc="group-norm groups")


@dataclass
class PhaseConfig:
    """One optimisation phase."""

    steps: int = field(1000, doc="optimizer steps")
    batch_size: int = field(32, doc="images per step")
    learning_rate: float = field(1e-3, doc="peak learning rate (cosine decay to 10% after warmup)")
    warmup_steps: int = field(100, doc="linear warmup steps")
    kl_weight: float = field(1e-6, doc="VAE only: weight of the KL term")
    caption_dropout: float = field(0.1, doc="denoiser only: empty-caption probability (classifier-free guidance)")
    ema_decay: float = field(0.999, doc="denoiser only: EMA decay of the UNet weights")
    max_seconds: float = field(0.0, doc="denoiser only: stop after this many seconds of training even if steps remain (0: no limit)")

    def validate(self) -> None:
        check(self.steps >= 0, "steps", "must be >= 0")
        check(self.batch_size >= 1, "batch_size", "must be >= 1")
        check(self.max_seconds >= 0, "max_seconds", "must be >= 0")


@dataclass
class BaseModelJob:
    """`scripts/train_tiny_base.py`: data, architecture and both training phases."""

    out_dir: str = field("outputs/tiny-shapes", doc="where the data, checkpoints and the model go", path=True)
    num_images: int = field(20000, doc="synthetic pictures generated for training")
    vae_images: int = field(4000, doc="how many of them the VAE trains on")
    data_seed: int = field(0, doc="seed of the synthetic data")
    seed: int = field(0, doc="seed of init and training")
    threads: int = field(2, doc="torch CPU threads")
    device: str = field("cpu", doc="where the denoiser phases (2, 2c) train: 'cpu' or 'cuda'")
    continue_from: str = field("", doc="phase 2c: model to continue from (a name such as rayimg-tiny-shapes, or a dir), copied to <out_dir>/model first; empty: <out_dir>/model as it is")
    vae: VaeConfig = field(default_factory=VaeConfig, doc="autoencoder architecture")
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig, doc="text encoder architecture")
    unet: UnetConfig = field(default_factory=UnetConfig, doc="UNet architecture")
    vae_train: PhaseConfig = field(default_factory=lambda: PhaseConfig(steps=3000, batch_size=16, learning_rate=1e-3), doc="phase 1: the VAE")
    denoiser_train: PhaseConfig = field(default_factory=lambda: PhaseConfig(steps=8000, batch_size=64, learning_rate=1e-3), doc="phase 2: UNet + text encoder")
    continue_train: PhaseConfig = field(default_factory=lambda: PhaseConfig(steps=0, batch_size=32, learning_rate=5e-4), doc="phase 2c: more UNet + text-encoder steps from the saved model")
    continue_images: int = field(8000, doc="phase 2c: how many pictures' latents it trains on")
    decoder_train: PhaseConfig = field(default_factory=lambda: PhaseConfig(steps=0, batch_size=16, learning_rate=5e-4), doc="phase 2b (may run beside phase 2): the VAE decoder alone, encoder frozen")

    def validate(self) -> None:
        check(1 <= self.vae_images <= self.num_images, "vae_images", "must be in [1, num_images]")
        check(self.device in ("cpu", "cuda"), "device", f"must be 'cpu' or 'cuda', got {self.device!r}")
        check(1 <= self.continue_images <= self.num_images, "continue_images", "must be in [1, num_images]")


# --------------------------------------------------------------------------- architecture
def build_vae(cfg: VaeConfig, resolution: int = 64):
    from diffusers import AutoencoderKL

    n = len(cfg.block_out_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.block_out_channels), layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels, norm_num_groups=cfg.norm_num_groups, sample_size=resolution,
        scaling_factor=1.0,
    )


def build_text_encoder(cfg: TextEncoderConfig, tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        max_position_embeddings=tokenizer.model_max_length, hidden_act="quick_gelu", projection_dim=cfg.hidden_size,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))


def build_unet(cfg: UnetConfig, latent_size: int, latent_channels: int, cross_attention_dim: int):
    from diffusers import UNet2DConditionModel

    heads = tuple(max(1, c // cfg.attention_head_dim) for c in cfg.block_out_channels)
    return UNet2DConditionModel(
        sample_size=latent_size, in_channels=latent_channels, out_channels=latent_channels,
        down_block_types=tuple(cfg.down_block_types), up_block_types=tuple(cfg.up_block_types),
        block_out_channels=tuple(cfg.block_out_channels), layers_per_block=cfg.layers_per_block,
        attention_head_dim=heads, norm_num_groups=cfg.norm_num_groups, cross_attention_dim=cross_attention_dim,
    )


def build_pipeline(vae, text_encoder, tokenizer, unet):
    from diffusers import StableDiffusionPipeline

    from rayimg.models.tiny import sd_scheduler

    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=sd_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


# --------------------------------------------------------------------------- data
def load_pixels(data_dir: str | Path, limit: int | None = None) -> tuple[torch.Tensor, list[str]]:
    """(N, 3, H, W) pixels in [-1, 1] and the captions of an ImageFolder dataset, read through
    rayimg's dataset reader (the same one ``rayimg prepare`` uses)."""
    from PIL import Image

    from rayimg.config import DataConfig
    from rayimg.data.sources import list_items
    from rayimg.storage import Storage

    items = list_items(Storage(), DataConfig(source=str(data_dir), format="imagefolder"))
    items = items[:limit] if limit else items
    arrays = [np.asarray(Image.open(item.image_uri.removeprefix("file://")).convert("RGB")) for item in items]
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return pixels, [item.caption for item in items]


# --------------------------------------------------------------------------- schedule
def _lr_lambda(phase: PhaseConfig, started: float | None = None) -> Callable[[int], float]:
    """Linear warmup, then cosine decay to 10% over ``phase.steps`` — or over ``phase.max_seconds``
    from ``started`` (a perf_counter time) when that budget runs out first."""
    def f(step: int) -> float:
        if step < phase.warmup_steps:
            return (step + 1) / phase.warmup_steps
        progress = (step - phase.warmup_steps) / max(1, phase.steps - phase.warmup_steps)
        if phase.max_seconds and started is not None:
            progress = max(progress, (time.perf_counter() - started) / phase.max_seconds)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


def _log_every(steps: int) -> int:
    return max(1, min(100, steps // 20))


# --------------------------------------------------------------------------- phase 1: VAE
def train_vae(vae, pixels: torch.Tensor, phase: PhaseConfig, *, seed: int = 0, log=print) -> list[float]:
    """Train ``vae`` in place on ``pixels`` ([-1, 1]); returns the loss per logged interval."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=phase.learning_rate, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(phase))
    every, window, history, t0 = _log_every(phase.steps), [], [], time.perf_counter()
    for step in range(phase.steps):
        x = pixels[torch.randint(0, len(pixels), (phase.batch_size,), generator=gen)]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        rec = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x)
        loss = rec + phase.kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        window.append(rec.item())
        if (step + 1) % every == 0 or step + 1 == phase.steps:
            history.append(float(np.mean(window)))
            log(f"vae step {step + 1}/{phase.steps} recon {history[-1]:.4f} lr {sched.get_last_lr()[0]:.2e} ({time.perf_counter() - t0:.0f}s)")
            window = []
    vae.eval().requires_grad_(False)
    return history


def finetune_decoder(vae, pixels: torch.Tensor, phase: PhaseConfig, *, seed: int = 0, log=print) -> list[float]:
    """Train only the VAE's decoder (and post-quant conv) on reconstruction, the encoder frozen:
    the latents, and so a UNet trained on them, stay valid while the pictures get sharper."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    vae.eval().requires_grad_(False)
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for p in params:
        p.requires_grad_(True)
    vae.decoder.train()
    opt = torch.optim.AdamW(params, lr=phase.learning_rate, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(phase))
    every, window, history, t0 = _log_every(phase.steps), [], [], time.perf_counter()
    for step in range(phase.steps):
        x = pixels[torch.randint(0, len(pixels), (phase.batch_size,), generator=gen)]
        with torch.no_grad():
            z = vae.encode(x).latent_dist.sample()
        recon = vae.decode(z).sample
        loss = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        window.append(loss.item())
        if (step + 1) % every == 0 or step + 1 == phase.steps:
            history.append(float(np.mean(window)))
            log(f"decoder step {step + 1}/{phase.steps} recon {history[-1]:.4f} lr {sched.get_last_lr()[0]:.2e} ({time.perf_counter() - t0:.0f}s)")
            window = []
    vae.eval().requires_grad_(False)
    return history


@torch.no_grad()
def encode_latents(vae, pixels: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Unscaled latent means of ``pixels`` (computed on the VAE's device, returned on the CPU)."""
    device = next(vae.parameters()).device
    return torch.cat([vae.encode(pixels[i:i + batch_size].to(device)).latent_dist.mean.cpu() for i in range(0, len(pixels), batch_size)])


def set_scaling_factor(vae, latents: torch.Tensor) -> float:
    """Set the VAE's ``scaling_factor`` to 1/std of ``latents`` (unit-variance latents, as SD's 0.18215 does)."""
    factor = float(1.0 / latents.float().std())
    vae.register_to_config(scaling_factor=factor)
    return factor


# --------------------------------------------------------------------------- phase 2: UNet + text encoder
def _denoiser_job(phase: PhaseConfig, seed: int):
    from rayimg.config import TrainConfig, TrainJob

    return TrainJob(
        data=TrainJob().data.__class__(source="unused"),
        train=TrainConfig(
            method="full", resolution=64, batch_size=phase.batch_size, learning_rate=phase.learning_rate,
            max_steps=phase.steps, mixed_precision="no", caption_dropout=phase.caption_dropout, ema=True,
            ema_decay=phase.ema_decay, seed=seed, weight_decay=0.0,
        ),
    )


def train_denoiser(pipe, latents: torch.Tensor, captions: list[str], phase: PhaseConfig, *, seed: int = 0, log=print,
                   checkpoint: Callable[[int], None] | None = None, checkpoint_every: int = 0,
                   device: str | torch.device = "cpu") -> list[float]:
    """Train ``pipe``'s UNet and text encoder in place on scaled ``latents`` + ``captions`` with
    the project's Trainee (method ``full``, text encoder trainable); at the end the UNet holds its
    EMA weights. ``checkpoint(step)`` is called every ``checkpoint_every`` steps with EMA weights
    swapped in and back out. On ``device`` 'cuda' the pipeline and the latents move to the GPU
    first; ``phase.max_seconds`` ends training early (the learning-rate schedule stays the one of
    ``phase.steps``)."""
    from rayimg.models.loader import LoadedModel
    from rayimg.train.trainee import build_trainee

    device = torch.device(device)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    job = _denoiser_job(phase, seed)
    pipe.to(device)
    latents = latents.to(device)
    loaded = LoadedModel(pipe, "sd", Path("."), "rayimg-tiny-shapes", "", device, torch.float32)
    trainee = build_trainee(loaded, job, train_text_encoders=True)
    params = trainee.trainable_parameters()
    # The UNet's EMA lives in the trainee; the text encoder's is kept here so both sides match.
    text_params = list(pipe.text_encoder.parameters())
    text_ema = [p.detach().clone() for p in text_params]
    opt = torch.optim.AdamW(params, lr=phase.learning_rate, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(phase, started=time.perf_counter()))
    every, window, history, t0 = _log_every(phase.steps), [], [], time.perf_counter()
    for step in range(phase.steps):
        idx = torch.randint(0, len(latents), (phase.batch_size,), generator=gen)
        batch = {"latents": latents[idx.to(device)], "captions": [captions[i] for i in idx.tolist()]}
        loss = trainee(batch)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        trainee.after_optimizer_step()
        trainee.ema_step()
        decay = min(phase.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(text_ema, [p.detach() for p in text_params], 1 - decay)
        window.append(loss.detach())
        out_of_time = bool(phase.max_seconds) and time.perf_counter() - t0 > phase.max_seconds
        if (step + 1) % every == 0 or step + 1 == phase.steps or out_of_time:
            history.append(float(torch.stack(window).mean()))
            log(f"denoiser step {step + 1}/{phase.steps} loss {history[-1]:.4f} lr {sched.get_last_lr()[0]:.2e} ({time.perf_counter() - t0:.0f}s)")
            window = []
        if checkpoint is not None and checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < phase.steps:
            saved = [p.detach().clone() for p in trainee.unet.parameters()] + [p.detach().clone() for p in text_params]
            _swap_in_ema(trainee, text_params, text_ema)
            trainee.eval()
            checkpoint(step + 1)
            with torch.no_grad():
                for p, v in zip(list(trainee.unet.parameters()) + text_params, saved):
                    p.copy_(v)
            trainee.train()
        if out_of_time:
            log(f"denoiser: max_seconds {phase.max_seconds:.0f} reached after {step + 1} of {phase.steps} steps")
            break
    _swap_in_ema(trainee, text_params, text_ema)
    trainee.eval()
    for module in (pipe.unet, pipe.text_encoder):
        module.requires_grad_(False)
    return history


@torch.no_grad()
def _swap_in_ema(trainee, text_params, text_ema) -> None:
    trainee.copy_ema_to_unet()
    for p, e in zip(text_params, text_ema):
        p.copy_(e)


def save_pipeline(pipe, out_dir: str | Path, dtype: torch.dtype = torch.float16) -> Path:
    """Save ``pipe`` in diffusers format (safetensors) with weights in ``dtype``; ``pipe`` is left as it was."""
    import copy

    out = Path(out_dir)
    copy.deepcopy(pipe).to(dtype=dtype).save_pretrained(out, safe_serialization=True)
    return out
