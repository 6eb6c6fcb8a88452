"""The thing being trained: one ``torch.nn.Module`` whose ``forward(batch)`` returns the loss.

:func:`build_trainee` takes a loaded base pipeline and a :class:`~rayimg.config.TrainJob` and sets
up the method the way diffusers' example scripts do:

- ``lora`` / ``dreambooth`` (train_text_to_image_lora.py, train_dreambooth_lora.py): everything
  frozen, a peft LoRA adapter added to the UNet (and optionally to the text encoders);
- ``textual_inversion`` (textual_inversion.py): new token(s) in the tokenizer(s), only the token
  embedding matrix trains, and every other row is put back after each optimizer step;
- ``full`` (train_text_to_image.py): the whole UNet trains, optionally with an EMA copy.

Because the loss is the module's output, DDP or a DeepSpeed engine wraps the :class:`Trainee`
as it is. Nothing here knows about Ray or DeepSpeed. The trainee takes over the pipeline's
modules: it changes their dtypes, adds adapters and tokens in place.

Batch (a dict of tensors already on the trainee's device):

``latents``                 (B, C, h, w), already scaled by the VAE's scaling factor; or
``pixels``                  (B, 3, H, W) in [-1, 1], encoded with the VAE here;
``prompt_embeds``           (B, 77, D) (+ ``pooled_prompt_embeds`` (B, P) for SDXL); or
``captions``                list[str], encoded here (required when the text encoders train);
``time_ids``                (B, 6) SDXL micro-conditioning: original_size + crop_top_left + target_size;
``is_class``                (B,) bool, DreamBooth prior-preservation rows.

All randomness (noise, timesteps, caption dropout, VAE sampling) comes from torch's global RNG
on the batch's device; the caller seeds it and checkpoints its state (``torch.get_rng_state()``
and, on GPUs, ``torch.cuda.get_rng_state_all()``).
"""

from __future__ import annotations

import contextlib
import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rayimg.models.regions import compile_regions
from rayimg.models.text import encode_prompts, pipeline_text_parts

__all__ = [
    "Trainee", "build_trainee", "build_noise_scheduler", "check_target_modules", "weight_dtype_of",
    "MIXED_PRECISION_DTYPES", "TEXT_ENCODER_LORA_TARGETS",
]

MIXED_PRECISION_DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TEXT_ENCODER_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def weight_dtype_of(mixed_precision: str) -> torch.dtype:
    """The dtype frozen weights are kept in for ``train.mixed_precision``."""
    if mixed_precision not in MIXED_PRECISION_DTYPES:
        raise ValueError(f"train.mixed_precision: unknown value {mixed_precision!r}; one of {', '.join(MIXED_PRECISION_DTYPES)}")
    return MIXED_PRECISION_DTYPES[mixed_precision]


def build_noise_scheduler(scheduler_config, prediction_type: str | None = None):
    """A DDPMScheduler with the base model's noise schedule (its scheduler config), as the
    training scripts' ``DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler")``;
    ``prediction_type`` overrides the configured one."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(scheduler_config)
    if prediction_type is not None:
        scheduler.register_to_config(prediction_type=prediction_type)
    if scheduler.config.prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(
            f"train.prediction_type: the model's scheduler predicts {scheduler.config.prediction_type!r}; "
            "training supports 'epsilon' and 'v_prediction' (set train.prediction_type)"
        )
    return scheduler


def _matches(name: str, target: str) -> bool:
    # peft's rule for a list of target names: the full name or a dotted suffix of it.
    return name == target or name.endswith("." + target)


def check_target_modules(model: nn.Module, targets, field: str = "lora.target_modules", what: str = "UNet") -> None:
    """Every requested target name must match at least one module of ``model``."""
    names = [n for n, _ in model.named_modules() if n]
    for target in targets:
        if not any(_matches(n, target) for n in names):
            raise ValueError(f"{field}: {target!r} matches no module of the {what} ({type(model).__name__}); pick names that exist in this model")


def _to_dtype(module: nn.Module, dtype: torch.dtype) -> None:
    """Cast ``module``'s floating weights, keeping diffusers' ``_keep_in_fp32_modules`` in float32.
    (diffusers' ``ModelMixin.to`` warns on every dtype cast, even with nothing to keep.)"""
    if not any(p.is_floating_point() and p.dtype != dtype for p in module.parameters()):
        return
    if getattr(module, "is_quantized", False):
        module.to(dtype=dtype)  # diffusers refuses this with a clear message
        return
    nn.Module.to(module, dtype=dtype)
    keep = getattr(module, "_keep_in_fp32_modules", None) or []
    if keep and dtype != torch.float32:
        for name, sub in module.named_modules():
            if any(k in name.split(".") for k in keep):
                nn.Module.to(sub, dtype=torch.float32)


def _lora_config(rank: int, alpha: float | None, dropout: float, targets):
    from peft import LoraConfig

    return LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else rank,
        lora_dropout=dropout,
        init_lora_weights="gaussian",
        target_modules=list(targets),
    )


# --------------------------------------------------------------------------- textual inversion
def placeholder_tokens(token: str, num_vectors: int) -> list[str]:
    """``<tok>``, ``<tok>_1``, ... — the names diffusers' ``load_textual_inversion`` gives the
    vectors of a multi-vector embedding, so prompts expand the same way at inference."""
    return [token] + [f"{token}_{i}" for i in range(1, num_vectors)]


def _add_placeholder_tokens(tokenizer, text_encoder, placeholder: str, initializer: str, num_vectors: int) -> list[int]:
    """Add the placeholder token(s), resize the embeddings and copy the initializer's row into
    the new rows (textual_inversion.py). Returns the new token ids."""
    tokens = placeholder_tokens(placeholder, num_vectors)
    vocab = tokenizer.get_vocab()
    for token in tokens:
        pieces = tokenizer.tokenize(token)
        if token in vocab or (len(pieces) == 1 and pieces[0] in vocab):
            raise ValueError(
                f"textual_inversion.placeholder_token: {token!r} is already a token of the tokenizer; "
                "choose a new one such as '<my-concept>'"
            )
    init_ids = tokenizer.encode(initializer, add_special_tokens=False)
    if len(init_ids) != 1:
        raise ValueError(
            f"textual_inversion.initializer_token: {initializer!r} encodes to {len(init_ids)} tokens; "
            "it must be exactly one existing token"
        )
    added = tokenizer.add_tokens(tokens)
    if added != len(tokens):
        raise ValueError(f"textual_inversion.placeholder_token: the tokenizer already holds some of {tokens}")
    ids = tokenizer.convert_tokens_to_ids(tokens)
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    weight = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        weight[ids] = weight[init_ids[0]].clone()
    return ids


# --------------------------------------------------------------------------- the module
class Trainee(nn.Module):
    """UNet, VAE and text encoders plus the loss of one training method.

    ``forward(batch)`` returns ``{"loss": scalar}`` (plus detached ``instance_loss`` and
    ``prior_loss`` with DreamBooth prior preservation). Call :meth:`after_optimizer_step`
    after every optimizer step and, with EMA, :meth:`ema_step`.

    Build it with :func:`build_trainee`; the constructor takes the prepared parts.

    Args:
        trainable_dtype: dtype of the trained parameters. float32 (diffusers'
            ``cast_training_params``) by default; bfloat16 keeps LoRA weights in bf16, which
            is faster on GPUs at some cost in precision.
        autocast: run the forward pass under ``torch.autocast`` in the frozen weights' dtype
            when mixed precision is on. A DeepSpeed engine that casts the module itself may
            turn it off.
    """

    def __init__(
        self,
        *,
        family: str,
        method: str,
        unet: nn.Module,
        vae: nn.Module,
        tokenizers: list,
        text_encoders: list,
        noise_scheduler,
        job,
        weight_dtype: torch.dtype = torch.float32,
        train_text_encoders: bool = False,
        placeholder_ids: list[list[int]] | None = None,
        trainable_dtype: torch.dtype = torch.float32,
        autocast: bool = True,
    ):
        super().__init__()
        self.family = family
        self.method = method
        self.unet = unet
        self.vae = vae
        self.text_encoders = nn.ModuleList(text_encoders)
        # Plain attributes: not modules, never in state_dict or DDP's parameter list.
        self.tokenizers = list(tokenizers)
        self.noise_scheduler = noise_scheduler
        self.job = job
        self.weight_dtype = weight_dtype
        self.trainable_dtype = trainable_dtype
        self.use_autocast = autocast
        self.train_text_encoders = train_text_encoders or method == "textual_inversion"
        self.snr_gamma = job.train.snr_gamma
        self.noise_offset = float(job.train.noise_offset)
        self.caption_dropout = float(job.train.caption_dropout)
        self.prior_preservation = method == "dreambooth" and job.dreambooth.prior_preservation
        self.prior_loss_weight = float(job.dreambooth.prior_loss_weight)

        for p in self.trainable_parameters():
            p.data = p.data.to(trainable_dtype)

        # Textual inversion: which rows of each token-embedding matrix train, and the values of
        # the others. Plain tensors, not buffers (DDP would broadcast a vocab-sized buffer every
        # step); they follow the weights' device when the trainee is moved after building.
        self._placeholder_ids = placeholder_ids or []
        self._frozen_rows: list[dict[str, torch.Tensor]] = []
        if method == "textual_inversion":
            for index, (encoder, ids) in enumerate(zip(self.text_encoders, self._placeholder_ids)):
                weight = encoder.get_input_embeddings().weight
                frozen = torch.ones(weight.shape[0], dtype=torch.bool, device=weight.device)
                frozen[ids] = False
                self._frozen_rows.append({"frozen": frozen, "original": weight.detach().clone(), "grad_mask": (~frozen).unsqueeze(1)})
                weight.register_hook(lambda grad, index=index: grad * self._rows(index, grad.device)["grad_mask"].to(grad.dtype))

        self._ema = None
        if method == "full" and job.train.ema:
            from diffusers import UNet2DConditionModel
            from diffusers.training_utils import EMAModel

            self._ema = EMAModel(
                list(unet.parameters()), decay=job.train.ema_decay, model_cls=UNet2DConditionModel,
                model_config=unet.config, foreach=True,
            )
            self._ema.to(dtype=torch.float32)  # a 0.9999 decay is lost in bf16 shadow weights

        # The empty caption's conditioning, for caption dropout with cached embeddings. Computed
        # once here (all ranks alike, before any sharding) with the frozen text encoders.
        self._empty_cond: dict[str, torch.Tensor] | None = None
        if self.caption_dropout > 0 and not self.train_text_encoders:
            with torch.no_grad():
                cond = encode_prompts(family, self.tokenizers, list(self.text_encoders), [""])
            self._empty_cond = {k: v.detach().float() for k, v in cond.items()}

    # ------------------------------------------------------------------ what trains
    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters the optimizer gets."""
        return [p for p in self.parameters() if p.requires_grad]

    def param_groups(self) -> list[dict]:
        """The optimizer's parameter groups: one of every trainable parameter, or, with
        ``lora.text_encoder_learning_rate`` set, the text encoders' LoRA weights in a second group
        with that peak learning rate (the schedule scales both groups alike)."""
        te_lr = self.job.lora.text_encoder_learning_rate if self.method in ("lora", "dreambooth") else None
        if te_lr is None or not self.train_text_encoders:
            return [{"params": self.trainable_parameters()}]
        in_text = {id(p) for p in self.text_encoders.parameters()}
        rest = [p for p in self.trainable_parameters() if id(p) not in in_text]
        text = [p for p in self.trainable_parameters() if id(p) in in_text]
        return [{"params": rest}, {"params": text, "lr": float(te_lr)}]

    def placeholder_token_ids(self) -> list[list[int]]:
        """Textual inversion: the new token ids, per tokenizer."""
        return [list(ids) for ids in self._placeholder_ids]

    def _rows(self, index: int, device: torch.device) -> dict[str, torch.Tensor]:
        rows = self._frozen_rows[index]
        if rows["frozen"].device != device:
            rows = self._frozen_rows[index] = {k: v.to(device) for k, v in rows.items()}
        return rows

    def learned_embeddings(self) -> dict[str, torch.Tensor]:
        """Textual inversion: the learned vectors in the file layout of
        :func:`rayimg.train.export.save_textual_inversion` — SD ``{placeholder_token: (V, D)}``,
        SDXL ``{"clip_l": (V, D1), "clip_g": (V, D2)}`` (CPU, float32)."""
        if self.method != "textual_inversion":
            raise ValueError(f"train.method: the trainee ({self.method!r}) learned no token embeddings")
        vectors = []
        for encoder, ids in zip(self.text_encoders, self._placeholder_ids):
            weight = encoder.get_input_embeddings().weight
            vectors.append(weight[ids].detach().to("cpu", torch.float32).clone())
        if self.family == "sd":
            return {self.job.textual_inversion.placeholder_token: vectors[0]}
        return {"clip_l": vectors[0], "clip_g": vectors[1]}

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Textual inversion: put back every embedding row except the placeholders' (weight decay
        and the optimizer would otherwise move them). A no-op for the other methods."""
        for index, encoder in enumerate(self.text_encoders[: len(self._frozen_rows)]):
            weight = encoder.get_input_embeddings().weight
            rows = self._rows(index, weight.device)
            weight[rows["frozen"]] = rows["original"][rows["frozen"]].to(weight.dtype)

    # ------------------------------------------------------------------ EMA (full fine-tune)
    @property
    def has_ema(self) -> bool:
        return self._ema is not None

    def ema_step(self) -> None:
        """Update the EMA weights from the UNet's (after the optimizer step)."""
        if self._ema is None:
            raise RuntimeError("this trainee keeps no EMA; set train.ema (method 'full')")
        params = list(self.unet.parameters())
        if self._ema.shadow_params[0].device != params[0].device:
            self._ema.to(device=params[0].device)
        self._ema.step(params)

    def ema_state_dict(self) -> dict[str, Any] | None:
        """The EMA's own state (diffusers' ``EMAModel.state_dict``) for checkpoints; None
        without EMA."""
        return None if self._ema is None else self._ema.state_dict()

    def load_ema_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._ema is None:
            raise RuntimeError("this trainee keeps no EMA; set train.ema (method 'full')")
        device = next(self.unet.parameters()).device
        self._ema.load_state_dict(state_dict)
        self._ema.to(device=device, dtype=torch.float32)

    @torch.no_grad()
    def copy_ema_to_unet(self) -> None:
        """Overwrite the UNet's weights with the EMA ones (before a final export, as diffusers'
        train_text_to_image.py does; training does not go on from there)."""
        if self._ema is None:
            raise RuntimeError("this trainee keeps no EMA; set train.ema (method 'full')")
        for param, shadow in zip(self.unet.parameters(), self._ema.shadow_params):
            param.copy_(shadow.to(device=param.device, dtype=param.dtype))

    def ema_unet_state_dict(self) -> dict[str, torch.Tensor]:
        """The UNet's state dict with the EMA weights in place of the trained ones (for export)."""
        if self._ema is None:
            raise RuntimeError("this trainee keeps no EMA; set train.ema (method 'full')")
        out = dict(self.unet.state_dict())
        for (name, _), shadow in zip(self.unet.named_parameters(), self._ema.shadow_params):
            out[name] = shadow.detach()
        return out

    # ------------------------------------------------------------------ the loss
    def _autocast(self, device: torch.device):
        if not self.use_autocast or self.weight_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.weight_dtype)

    def _latents(self, batch: dict) -> torch.Tensor:
        if "latents" in batch:
            return batch["latents"].float()
        if "pixels" not in batch:
            raise ValueError("batch needs 'latents' (from the cache) or 'pixels' (encoded on the fly)")
        pixels = batch["pixels"]
        with torch.no_grad():
            latents = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist.sample()
            shift = getattr(self.vae.config, "shift_factor", None)
            if shift is not None:
                latents = latents - shift
            latents = latents * self.vae.config.scaling_factor
        return latents.float()

    def _expand_placeholders(self, captions: list[str]) -> list[str]:
        # A multi-vector token stands for all its vectors, as load_textual_inversion expands it.
        if self.method != "textual_inversion" or self.job.textual_inversion.num_vectors == 1:
            return captions
        token = self.job.textual_inversion.placeholder_token
        expanded = " ".join(placeholder_tokens(token, self.job.textual_inversion.num_vectors))
        pattern = re.compile(re.escape(token) + r"(?!_\d)")
        return [pattern.sub(expanded, c) for c in captions]

    def _conditioning(self, batch: dict, batch_size: int, device: torch.device) -> dict[str, torch.Tensor]:
        drop = None
        if self.caption_dropout > 0:
            drop = torch.rand(batch_size, device=device) < self.caption_dropout
        if "captions" in batch:
            captions = list(batch["captions"])
            if len(captions) != batch_size:
                raise ValueError(f"batch has {len(captions)} captions for {batch_size} images")
            if drop is not None:
                captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
            captions = self._expand_placeholders(captions)
            grad = torch.enable_grad() if self.train_text_encoders else torch.no_grad()
            with grad, self._autocast(device):
                return encode_prompts(self.family, self.tokenizers, list(self.text_encoders), captions, device=device)
        if self.train_text_encoders:
            raise ValueError(
                f"method {self.method!r} trains the text encoders, so batches need 'captions', not cached "
                "'prompt_embeds' (build the cache without text embeddings)"
            )
        if "prompt_embeds" not in batch:
            raise ValueError("batch needs 'prompt_embeds' (from the cache) or 'captions'")
        cond = {"prompt_embeds": batch["prompt_embeds"]}
        if self.family == "sdxl":
            if "pooled_prompt_embeds" not in batch:
                raise ValueError("SDXL batches with 'prompt_embeds' also need 'pooled_prompt_embeds'")
            cond["pooled_prompt_embeds"] = batch["pooled_prompt_embeds"]
        if drop is not None:
            for key, value in cond.items():
                if self._empty_cond[key].device != value.device:
                    self._empty_cond[key] = self._empty_cond[key].to(value.device)
                empty = self._empty_cond[key].to(value.dtype)
                mask = drop.view(-1, *([1] * (value.ndim - 1)))
                cond[key] = torch.where(mask, empty.expand_as(value), value)
        return cond

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        latents = self._latents(batch)
        batch_size, channels = latents.shape[:2]
        device = latents.device
        cond = self._conditioning(batch, batch_size, device)

        noise = torch.randn_like(latents)
        if self.noise_offset:
            noise = noise + self.noise_offset * torch.randn((batch_size, channels, 1, 1), device=device, dtype=latents.dtype)
        num_timesteps = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, num_timesteps, (batch_size,), device=device, dtype=torch.long)
        noisy_latents = self.noise_scheduler.add_noise(latents, noise, timesteps)
        prediction_type = self.noise_scheduler.config.prediction_type
        target = noise if prediction_type == "epsilon" else self.noise_scheduler.get_velocity(latents, noise, timesteps)

        input_dtype = self.unet.conv_in.weight.dtype
        added_cond = None
        if self.family == "sdxl":
            if "time_ids" not in batch:
                raise ValueError("SDXL batches need 'time_ids' (B, 6): original_size + crop_top_left + target_size")
            added_cond = {
                "text_embeds": cond["pooled_prompt_embeds"].to(input_dtype),
                "time_ids": batch["time_ids"].to(device=device, dtype=input_dtype),
            }
        with self._autocast(device):
            model_pred = self.unet(
                noisy_latents.to(input_dtype), timesteps, encoder_hidden_states=cond["prompt_embeds"].to(input_dtype),
                added_cond_kwargs=added_cond, return_dict=False,
            )[0]

        per_sample = F.mse_loss(model_pred.float(), target.float(), reduction="none")
        per_sample = per_sample.mean(dim=list(range(1, per_sample.ndim)))
        weighted = per_sample
        if self.snr_gamma is not None:
            # Min-SNR weighting (https://arxiv.org/abs/2303.09556), as in diffusers' scripts.
            from diffusers.training_utils import compute_snr

            snr = compute_snr(self.noise_scheduler, timesteps)
            weights = torch.stack([snr, self.snr_gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
            if prediction_type == "epsilon":
                weights = weights / snr
            else:  # v_prediction
                weights = weights / (snr + 1)
            weighted = per_sample * weights

        if not self.prior_preservation or "is_class" not in batch:
            return {"loss": weighted.mean()}
        # DreamBooth: the (weighted) instance loss plus the plain MSE on the class rows.
        is_class = batch["is_class"].to(device=device, dtype=torch.bool)
        instance = (~is_class).float()
        prior = is_class.float()
        instance_loss = (weighted * instance).sum() / instance.sum().clamp(min=1)
        prior_loss = (per_sample * prior).sum() / prior.sum().clamp(min=1)
        loss = instance_loss + self.prior_loss_weight * prior_loss
        return {"loss": loss, "instance_loss": instance_loss.detach(), "prior_loss": prior_loss.detach()}


# --------------------------------------------------------------------------- set-up per method
def build_trainee(
    loaded, job, *, trainable_dtype: torch.dtype = torch.float32, autocast: bool = True, train_text_encoders: bool = False
) -> Trainee:
    """Set up ``job.train.method`` on the loaded pipeline's modules and wrap them in a Trainee.

    ``train_text_encoders`` (method ``full`` only) trains the text encoders with the UNet, as when
    a model is trained from scratch (scripts/tiny_base/base_model.py); batches then need captions."""
    if train_text_encoders and job.train.method != "full":
        raise ValueError(f"train_text_encoders: only method 'full' trains whole text encoders (method is {job.train.method!r}); LoRA uses lora.train_text_encoder")
    pipe = loaded.pipeline
    family = loaded.family
    method = job.train.method
    weight_dtype = weight_dtype_of(job.train.mixed_precision)
    if method == "full" and job.train.ema and job.deepspeed.enabled and job.deepspeed.stage == 3:
        raise ValueError("train.ema: EMA is not supported with DeepSpeed ZeRO-3 (parameters are sharded); use stage 2 or no EMA")

    unet, vae = pipe.unet, pipe.vae
    tokenizers, text_encoders = pipeline_text_parts(pipe)
    for module in (unet, vae, *text_encoders):
        module.requires_grad_(False)
    noise_scheduler = build_noise_scheduler(pipe.scheduler.config, job.train.prediction_type)

    # A VAE that overflows in fp16 (SDXL's) stays in float32, as the pipelines do.
    vae_dtype = torch.float32 if weight_dtype == torch.float16 and getattr(vae.config, "force_upcast", False) else weight_dtype
    _to_dtype(vae, vae_dtype)

    full_text_encoders = train_text_encoders
    train_text_encoders = False
    placeholder_ids = None
    if method in ("lora", "dreambooth"):
        _to_dtype(unet, weight_dtype)
        check_target_modules(unet, job.lora.target_modules)
        unet.add_adapter(_lora_config(job.lora.rank, job.lora.alpha, job.lora.dropout, job.lora.target_modules))
        for encoder in text_encoders:
            _to_dtype(encoder, weight_dtype)
        if job.lora.train_text_encoder:
            train_text_encoders = True
            for encoder in text_encoders:
                check_target_modules(encoder, TEXT_ENCODER_LORA_TARGETS, "lora.train_text_encoder", "text encoder")
                encoder.add_adapter(_lora_config(job.lora.rank, job.lora.alpha, job.lora.dropout, TEXT_ENCODER_LORA_TARGETS))
    elif method == "textual_inversion":
        _to_dtype(unet, weight_dtype)
        ti = job.textual_inversion
        placeholder_ids = []
        for tokenizer, encoder in zip(tokenizers, text_encoders):
            # The text encoders stay in float32 (textual_inversion.py); only the token embeddings train.
            _to_dtype(encoder, torch.float32)
            placeholder_ids.append(_add_placeholder_tokens(tokenizer, encoder, ti.placeholder_token, ti.initializer_token, ti.num_vectors))
            encoder.get_input_embeddings().weight.requires_grad_(True)
    elif method == "full":
        for encoder in text_encoders:
            # Trained text encoders keep float32 weights, like the UNet (cast_training_params).
            _to_dtype(encoder, torch.float32 if full_text_encoders else weight_dtype)
            encoder.requires_grad_(full_text_encoders)
        train_text_encoders = full_text_encoders
        unet.requires_grad_(True)
    else:
        raise ValueError(f"train.method: unknown method {method!r}")

    if job.train.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if train_text_encoders:
            for encoder in text_encoders:
                encoder.gradient_checkpointing_enable()

    trainee = Trainee(
        family=family, method=method, unet=unet, vae=vae, tokenizers=tokenizers, text_encoders=text_encoders,
        noise_scheduler=noise_scheduler, job=job, weight_dtype=weight_dtype, train_text_encoders=train_text_encoders,
        placeholder_ids=placeholder_ids, trainable_dtype=trainable_dtype, autocast=autocast,
    )
    trainee.train()
    return trainee


def compile_unet(unet: nn.Module, mode: str) -> int:
    """``torch.compile`` the UNet in place: ``"regional"`` compiles each repeated block (transformer
    and ResNet blocks, down/up-samplers; :func:`rayimg.models.regions.compile_regions`) — one graph
    per distinct shape, a fraction of the cold compile of ``"full"``, the whole UNet in one graph.
    In place (``nn.Module.compile``), so parameter names, state dicts and exports are unchanged.
    Returns how many modules were compiled."""
    if mode == "none":
        return 0
    _quiet_dynamo()
    if mode == "full":
        unet.compile()
        return 1
    if mode != "regional":
        raise ValueError(f"compile: unknown mode {mode!r}; one of none, regional, full")
    try:
        return compile_regions(unet, dynamic=False)
    except ValueError as e:
        raise ValueError(f"compile: 'regional' {e}") from None


def _quiet_dynamo() -> None:
    """Dynamo's own warnings (recompiles of a block at another shape, graph breaks inside
    diffusers or peft code) off: the compiled UNet runs either way and none of them is the user's
    to act on. Errors still show; ``TORCH_LOGS`` set by the user wins."""
    import logging
    import os

    if "TORCH_LOGS" not in os.environ:
        torch._logging.set_logs(dynamo=logging.ERROR)
