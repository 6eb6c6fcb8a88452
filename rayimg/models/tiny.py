"""The project's tiny models: SD1.5-style and SDXL-style pipelines at test size.

Built from configs with seeded random init, the way diffusers' own tests build theirs: real
classes, a few hundred thousand parameters, 64x64 images in a fraction of a second on a CPU.
The VAE downsamples by 8 like the real ones, so latent shapes follow the same arithmetic
(64x64 pixels -> 4x8x8 latents). The tokenizer is the committed cut of the real CLIP
vocabulary (``rayimg/models/tokenizer/``, made by ``scripts/make_tokenizer.py``).

``ensure_tiny`` saves a model once under a cache dir so the loader reads it back exactly as it
reads a real checkpoint.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

TOKENIZER_DIR = Path(__file__).resolve().parent / "tokenizer"
# Trained models committed with the repo (diffusers format), loaded by name like the tiny ones:
# rayimg-tiny-shapes draws coloured shapes from prompts (scripts/tiny_base/base_model.py, docs/DEMO_MODEL.md).
PRETRAINED_ROOT = Path(__file__).resolve().parent / "pretrained"
PRETRAINED_MODELS = {"rayimg-tiny-shapes": PRETRAINED_ROOT / "rayimg-tiny-shapes"}
# Bump when the architecture or init changes: cached tiny models live in a dir named by it.
TINY_VERSION = "v1"
TINY_MODELS = {"rayimg-tiny-sd": "sd", "rayimg-tiny-sdxl": "sdxl"}
TINY_RESOLUTION = 64

_LATENT_SIZE = TINY_RESOLUTION // 8
_TIME_EMBED_DIM = 8  # SDXL's addition_time_embed_dim (256 in the real model)
_PROJECTION_DIM = 32  # text_encoder_2 projection (1280 in the real model)


@contextmanager
def _seeded(seed: int):
    """Seed torch's CPU generator for the block without disturbing the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def load_tokenizer(pad_token: str | None = None):
    """The committed CLIP tokenizer; SDXL's second tokenizer pads with ``"!"`` as released."""
    from transformers import CLIPTokenizer

    kwargs = {"pad_token": pad_token} if pad_token is not None else {}
    return CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR), **kwargs)


def sd_scheduler():
    from diffusers import EulerDiscreteScheduler

    # The noise schedule of SD1.5 and SDXL.
    return EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        steps_offset=1,
        timestep_spacing="leading",
    )


def _vae(scaling_factor: float):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=TINY_RESOLUTION,
        scaling_factor=scaling_factor,
    )


def _text_config(tokenizer, pad_token_id: int, hidden_act: str, projection_dim: int = 32):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        hidden_act=hidden_act,
        projection_dim=projection_dim,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=pad_token_id,
    )


def _unet(**extra):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=_LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=2,
        attention_head_dim=(2, 4),
        norm_num_groups=32,
        **extra,
    )


def build_tiny_sd(seed: int = 0):
    """A tiny SD1.5-style StableDiffusionPipeline (random weights, fixed by ``seed``)."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    tokenizer = load_tokenizer()
    with _seeded(seed):
        unet = _unet(cross_attention_dim=32)
        vae = _vae(scaling_factor=0.18215)
        text_encoder = CLIPTextModel(_text_config(tokenizer, tokenizer.pad_token_id, "quick_gelu"))
    return StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=sd_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_tiny_sdxl(seed: int = 0):
    """A tiny SDXL-style StableDiffusionXLPipeline (random weights, fixed by ``seed``).

    Two text encoders (hidden 32 each, so cross_attention_dim 64) and the ``text_time``
    added conditioning: 6 time ids x ``addition_time_embed_dim`` + the pooled projection.
    """
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = load_tokenizer()
    tokenizer_2 = load_tokenizer(pad_token="!")
    with _seeded(seed):
        unet = _unet(
            cross_attention_dim=64,
            transformer_layers_per_block=(1, 2),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=_TIME_EMBED_DIM,
            projection_class_embeddings_input_dim=6 * _TIME_EMBED_DIM + _PROJECTION_DIM,
        )
        vae = _vae(scaling_factor=0.13025)
        text_encoder = CLIPTextModel(_text_config(tokenizer, tokenizer.pad_token_id, "quick_gelu"))
        text_encoder_2 = CLIPTextModelWithProjection(
            _text_config(tokenizer_2, tokenizer_2.pad_token_id, "gelu", projection_dim=_PROJECTION_DIM)
        )
    return StableDiffusionXLPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        text_encoder_2=text_encoder_2.eval(),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet.eval(),
        scheduler=sd_scheduler(),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


BUILDERS = {"sd": build_tiny_sd, "sdxl": build_tiny_sdxl}


def save_tiny(family: str, out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Build the tiny ``family`` ('sd' or 'sdxl') pipeline and save it in diffusers format
    (safetensors) to ``out_dir``."""
    if family not in BUILDERS:
        raise ValueError(f"unknown tiny model family {family!r}; one of {', '.join(BUILDERS)}")
    out = Path(out_dir)
    BUILDERS[family](seed).save_pretrained(out, safe_serialization=True)
    from rayimg.storage import normalize_modes

    normalize_modes(out)  # save_pretrained writes some files 0600
    return out


def pretrained_dir(name: str) -> Path:
    """The committed dir of the trained model ``name`` (one of :data:`PRETRAINED_MODELS`)."""
    if name not in PRETRAINED_MODELS:
        raise ValueError(f"unknown committed model {name!r}; one of {', '.join(PRETRAINED_MODELS)}")
    path = PRETRAINED_MODELS[name]
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"{path} holds no model_index.json; the committed model {name!r} is missing from this checkout")
    return path


def ensure_tiny(name: str, cache_root: str | os.PathLike) -> Path:
    """The saved dir of tiny model ``name`` under ``<cache_root>/tiny/``, built on first use.

    The model is written to a temp dir beside the target and renamed into place, so a reader
    never sees half a model; when two processes build at once, the first rename wins and the
    other discards its copy.
    """
    if name not in TINY_MODELS:
        raise ValueError(f"unknown tiny model {name!r}; one of {', '.join(TINY_MODELS)}")
    target = Path(cache_root).expanduser() / "tiny" / f"{name}-{TINY_VERSION}"
    if (target / "model_index.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        save_tiny(TINY_MODELS[name], tmp)  # with the umask's modes
        try:
            os.rename(tmp, target)
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            # Another process finished first; its copy is identical.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not (target / "model_index.json").is_file():
        raise FileNotFoundError(f"{target} exists but holds no model_index.json; delete it to rebuild the tiny model")
    return target
