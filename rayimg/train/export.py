"""Write what training produced in the formats other tools load.

The save functions take plain state dicts, so a caller can first gather them (DeepSpeed ZeRO-3,
rank 0) and then write them without the trainee.

- LoRA: ``pytorch_lora_weights.safetensors`` in diffusers format (``pipe.load_lora_weights(dir)``)
  and, optionally, ``lora_kohya.safetensors`` for kohya / AUTOMATIC1111 / ComfyUI.
- Textual inversion: ``learned_embeds.safetensors``. SD: ``{token: (num_vectors, D)}``, which
  ``pipe.load_textual_inversion(dir, token=...)`` loads. SDXL: ``{"clip_l": ..., "clip_g": ...}``
  (the community convention), loaded one encoder at a time::

      from safetensors.torch import load_file
      sd = load_file(f"{dir}/learned_embeds.safetensors")
      pipe.load_textual_inversion(sd["clip_l"], token=tok, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
      pipe.load_textual_inversion(sd["clip_g"], token=tok, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)

  (:func:`load_textual_inversion` does both).
- Full fine-tune: a diffusers-format model dir, the base model with the trained UNet.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

__all__ = [
    "LORA_WEIGHT_NAME", "KOHYA_WEIGHT_NAME", "TEXTUAL_INVERSION_WEIGHT_NAME", "lora_state_dicts", "save_lora",
    "textual_inversion_embeddings", "save_textual_inversion", "load_textual_inversion", "save_full",
    "submodule_state_dict", "file_sha256",
]

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
KOHYA_WEIGHT_NAME = "lora_kohya.safetensors"
TEXTUAL_INVERSION_WEIGHT_NAME = "learned_embeds.safetensors"
_TEXT_ENCODER_NAMES = {"sd": ("text_encoder",), "sdxl": ("text_encoder", "text_encoder_2")}
_SDXL_TI_KEYS = ("clip_l", "clip_g")


def _unwrap(module):
    # DDP and DeepSpeed engines hold the real module in ``.module``.
    while hasattr(module, "module") and isinstance(getattr(module, "module"), torch.nn.Module):
        module = module.module
    return module


def _to_cpu_float(state_dict: dict) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state_dict.items()}


def _check_family(family: str) -> None:
    if family not in _TEXT_ENCODER_NAMES:
        raise ValueError(f"model.family: unknown family {family!r}; one of {', '.join(_TEXT_ENCODER_NAMES)}")


# --------------------------------------------------------------------------- LoRA
def _peft_state_dict(module, fold_scaling: bool) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    state_dict = _to_cpu_float(get_peft_model_state_dict(module))
    if not fold_scaling:
        return state_dict
    # Each LoRA layer computes base(x) + scaling * B(A(x)); fold scaling (alpha/rank) into B.
    for name, layer in module.named_modules():
        scaling = getattr(layer, "scaling", None)
        key = f"{name}.lora_B.weight"
        if isinstance(scaling, dict) and "default" in scaling and key in state_dict and scaling["default"] != 1.0:
            state_dict[key] = state_dict[key] * float(scaling["default"])
    return state_dict


def lora_state_dicts(trainee, *, fold_scaling: bool = True) -> dict[str, dict[str, torch.Tensor]]:
    """peft-format LoRA state dicts (CPU, float32): ``{"unet": ..., "text_encoder": ...,
    "text_encoder_2": ...}`` — the text encoders only when they carry LoRA.

    With ``fold_scaling`` (the default, what :func:`save_lora` wants) each layer's scale
    alpha/rank is folded into its B (up) weights, so the dicts mean the same at alpha = rank,
    which is what loaders assume when a file carries no alpha."""
    trainee = _unwrap(trainee)
    if not getattr(trainee.unet, "peft_config", None):
        raise ValueError(f"train.method: the trainee ({trainee.method!r}) has no LoRA adapter to export")
    out = {"unet": _peft_state_dict(trainee.unet, fold_scaling)}
    for name, encoder in zip(_TEXT_ENCODER_NAMES[trainee.family], trainee.text_encoders):
        if getattr(encoder, "peft_config", None):
            out[name] = _peft_state_dict(encoder, fold_scaling)
    return out


def _bake_alpha(state_dict: dict[str, torch.Tensor], alpha: float | None) -> dict[str, torch.Tensor]:
    """Fold the LoRA scale alpha/rank into the up (B) weights, so the file means the same to
    every loader whether or not it reads an alpha (diffusers assumes alpha = rank)."""
    out = dict(state_dict)
    if alpha is None:
        return out
    for key, down in state_dict.items():
        if ".lora_A." not in key:
            continue
        up_key = key.replace(".lora_A.", ".lora_B.")
        rank = down.shape[0]
        if up_key in out and float(alpha) != float(rank):
            out[up_key] = out[up_key] * (float(alpha) / rank)
    return out


def _unet_to_diffusers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' UNet LoRA naming (``<module>.lora.down/up.weight``) for every key.
    ``convert_state_dict_to_diffusers`` renames only the attention projections; a file that mixes
    both namings loses one of them on load (the loader decides from the first key), so the
    remaining modules (convs, ff, proj_in/out, time_emb_proj) get the same naming here."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_diffusers

    converted = convert_state_dict_to_diffusers(state_dict)
    return {k.replace(".lora_A.", ".lora.down.").replace(".lora_B.", ".lora.up."): v for k, v in converted.items()}


def _with_text_model_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIP text encoder keys as every loader knows them (``text_model.encoder.layers...``).
    Recent transformers flatten CLIPTextModel (``encoder.layers...``); diffusers strips the
    prefix again when it loads into such a model, while older stacks and kohya tools need it."""
    return {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state_dict.items()}


def save_lora(
    out_dir: str | os.PathLike,
    family: str,
    unet_lora_sd: dict[str, torch.Tensor],
    text_encoder_lora_sds: dict[str, dict[str, torch.Tensor]] | None = None,
    *,
    alpha: float | None = None,
    kohya: bool = False,
) -> list[Path]:
    """Write ``pytorch_lora_weights.safetensors`` (diffusers format) and, with ``kohya``,
    ``lora_kohya.safetensors`` into ``out_dir``; returns the files written.

    The state dicts are peft format, from :func:`lora_state_dicts` (scale already folded in)
    or gathered elsewhere; ``text_encoder_lora_sds`` is keyed ``text_encoder`` /
    ``text_encoder_2``. Pass ``alpha`` (the training LoRA alpha) only for dicts whose scale is
    not folded in yet (``lora_state_dicts(..., fold_scaling=False)``): alpha/rank is then folded
    into the up weights here, so both files load at scale 1.
    """
    from diffusers.utils.state_dict_utils import convert_state_dict_to_diffusers

    from rayimg.models.loader import pipeline_class

    _check_family(family)
    text_encoder_lora_sds = dict(text_encoder_lora_sds or {})
    unknown = set(text_encoder_lora_sds) - set(_TEXT_ENCODER_NAMES[family])
    if unknown:
        raise ValueError(f"text encoder LoRA for {sorted(unknown)}: a {family!r} model has only {list(_TEXT_ENCODER_NAMES[family])}")
    if not unet_lora_sd:
        raise ValueError("the UNet LoRA state dict is empty (under ZeRO-3, gather it before saving)")
    peft_sds = {"unet": _bake_alpha(_to_cpu_float(unet_lora_sd), alpha)}
    for name, sd in text_encoder_lora_sds.items():
        if sd:
            peft_sds[name] = _bake_alpha(_with_text_model_prefix(_to_cpu_float(sd)), alpha)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    layers = {"unet_lora_layers": _unet_to_diffusers(peft_sds["unet"])}
    for name in _TEXT_ENCODER_NAMES[family]:
        if name in peft_sds:
            layers[f"{name}_lora_layers"] = convert_state_dict_to_diffusers(peft_sds[name])
    pipeline_class(family).save_lora_weights(out_dir, weight_name=LORA_WEIGHT_NAME, safe_serialization=True, **layers)
    written = [out_dir / LORA_WEIGHT_NAME]
    if kohya:
        written.append(_save_kohya(out_dir / KOHYA_WEIGHT_NAME, family, peft_sds))
    return written


def _save_kohya(path: Path, family: str, peft_sds: dict[str, dict[str, torch.Tensor]]) -> Path:
    """kohya/A1111 keys (``lora_unet_*``, ``lora_te*_*`` with ``lora_down``/``lora_up`` and an
    ``alpha`` per module) from diffusers' PEFT->kohya conversion; SD1.x/2.x text encoder keys use
    ``lora_te_`` as those tools expect (``lora_te1_``/``lora_te2_`` are SDXL's)."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
    from safetensors.torch import save_file

    prefixed = {f"{name}.{key}": value for name, sd in peft_sds.items() for key, value in sd.items()}
    kohya_sd = convert_state_dict_to_kohya(prefixed)
    out = {}
    for key, value in kohya_sd.items():
        if family == "sd" and key.startswith("lora_te1_"):
            key = "lora_te_" + key[len("lora_te1_"):]
        if key.endswith(".alpha"):
            # The scale is folded into the weights, so alpha = rank (scale 1); kohya stores it as a float.
            value = torch.tensor(float(value), dtype=torch.float32)
        out[key] = value.contiguous()
    save_file(out, str(path), metadata={"format": "pt", "ss_network_module": "networks.lora"})
    return path


# --------------------------------------------------------------------------- textual inversion
def textual_inversion_embeddings(trainee) -> dict[str, torch.Tensor]:
    """The learned vectors in the file's layout: SD ``{placeholder_token: (V, D)}``, SDXL
    ``{"clip_l": (V, D1), "clip_g": (V, D2)}`` (CPU, float32)."""
    return _unwrap(trainee).learned_embeddings()


def save_textual_inversion(out_dir: str | os.PathLike, family: str, embeddings: dict[str, torch.Tensor], *, token: str | None = None) -> Path:
    """Write ``learned_embeds.safetensors`` (layout of :func:`textual_inversion_embeddings`);
    ``token`` is recorded in the file's metadata."""
    from safetensors.torch import save_file

    _check_family(family)
    if family == "sd" and len(embeddings) != 1:
        raise ValueError(f"an SD textual inversion file holds one token's vectors, got keys {sorted(embeddings)}")
    if family == "sdxl" and set(embeddings) != set(_SDXL_TI_KEYS):
        raise ValueError(f"an SDXL textual inversion file holds 'clip_l' and 'clip_g', got keys {sorted(embeddings)}")
    tensors = {}
    for key, value in embeddings.items():
        value = value.detach().to("cpu", torch.float32).contiguous()
        tensors[key] = value if value.ndim == 2 else value.reshape(1, -1)
    if family == "sd" and token is None:
        token = next(iter(tensors))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / TEXTUAL_INVERSION_WEIGHT_NAME
    save_file(tensors, str(path), metadata={"format": "pt", **({"placeholder_token": token} if token else {})})
    return path


def load_textual_inversion(pipe, family: str, path: str | os.PathLike, token: str) -> None:
    """Load a file written by :func:`save_textual_inversion` into ``pipe`` under ``token``
    (safetensors only; both encoders for SDXL)."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        path = path / TEXTUAL_INVERSION_WEIGHT_NAME
    state_dict = load_file(str(path))
    if family == "sd":
        pipe.load_textual_inversion(state_dict, token=token)
        return
    _check_family(family)
    pipe.load_textual_inversion(state_dict["clip_l"], token=token, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(state_dict["clip_g"], token=token, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)


# --------------------------------------------------------------------------- full fine-tune
def save_full(
    out_dir: str | os.PathLike,
    loaded,
    unet_state_dict: dict[str, torch.Tensor],
    *,
    prediction_type: str | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """A diffusers-format model dir: the base model's files (``loaded.model_dir``) with the UNet
    replaced by ``unet_state_dict`` (safetensors). ``prediction_type`` is written into the
    scheduler config when training overrode it; ``dtype`` casts the saved UNet."""
    from diffusers import UNet2DConditionModel

    src = Path(loaded.model_dir)
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(f"{out_dir}: the output dir is not empty")
    if not unet_state_dict:
        raise ValueError("the UNet state dict is empty (under ZeRO-3, gather it before saving)")
    shutil.copytree(src, out_dir, dirs_exist_ok=True, ignore=lambda d, names: [
        n for n in names if n.startswith(".") or (Path(d) == src and n == "unet")
    ])

    config = UNet2DConditionModel.load_config(str(src / "unet"))
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    state = {k: v.detach().cpu() for k, v in unet_state_dict.items()}
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    missing, unexpected = unet.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise ValueError(f"the UNet state dict does not fit the base model's UNet: missing {missing[:5]}, unexpected {unexpected[:5]}")
    meta = [n for n, t in list(unet.named_parameters()) + list(unet.named_buffers()) if t.is_meta]
    if meta:
        raise ValueError(f"the UNet state dict leaves {meta[:5]} unset")
    unet.save_pretrained(str(out_dir / "unet"), safe_serialization=True)

    if prediction_type is not None:
        scheduler_config = out_dir / "scheduler" / "scheduler_config.json"
        data = json.loads(scheduler_config.read_text())
        if data.get("prediction_type") != prediction_type:
            data["prediction_type"] = prediction_type
            scheduler_config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return out_dir


def submodule_state_dict(state_dict: dict[str, torch.Tensor], prefix: str = "unet") -> dict[str, torch.Tensor]:
    """The entries of one submodule, without its prefix, from a whole-trainee state dict (e.g.
    DeepSpeed's gathered ZeRO-3 state dict of the engine's Trainee: ``unet.conv_in.weight`` ->
    ``conv_in.weight``)."""
    head = prefix.rstrip(".") + "."
    out = {k[len(head):]: v for k, v in state_dict.items() if k.startswith(head)}
    if not out:
        raise ValueError(f"the state dict has no {prefix!r} entries (under ZeRO-3, gather it on every rank first)")
    return out


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def export_trained(out: Path, job, trainee, loaded, weights: dict[str, torch.Tensor]) -> None:
    """Write what ``job.train.method`` trained into ``out``: LoRA files, a textual-inversion
    embedding, or (method ``full``) a whole model dir, with the EMA weights when ``train.ema``.
    ``weights`` are the trainable weights by trainee name (gathered under ZeRO-3)."""
    out.mkdir(parents=True, exist_ok=True)
    method = job.train.method
    if method in ("lora", "dreambooth"):
        sds = lora_state_dicts(trainee)
        save_lora(out, loaded.family, sds["unet"], {k: v for k, v in sds.items() if k != "unet"} or None, kohya=job.publish.kohya)
    elif method == "textual_inversion":
        save_textual_inversion(out, loaded.family, trainee.learned_embeddings())
    else:
        unet_sd = submodule_state_dict(weights, "unet")
        if trainee.has_ema:
            trainee.copy_ema_to_unet()
            unet_sd = {k: v.detach().cpu() for k, v in trainee.unet.state_dict().items()}
        save_full(out, loaded, unet_sd, prediction_type=job.train.prediction_type)
    from rayimg.storage import normalize_modes

    normalize_modes(out)  # the libraries' writers and a copy of a 0700 cache folder: the umask's modes
