"""The training library without Ray: the Trainee and its methods on the tiny models, optimizers,
export formats loaded back through plain diffusers, the adapter registry and the DeepSpeed config."""

from __future__ import annotations

import json
import logging
import os
import warnings
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from PIL import Image

from rayimg.config import ModelConfig, TrainJob
from rayimg.models import load_model
from rayimg.models.loader import load_pipeline
from rayimg.models.text import encode_prompts, pipeline_text_parts
from rayimg.storage import Storage
from rayimg.train.deepspeed_config import build_deepspeed_config
from rayimg.train.export import (
    KOHYA_WEIGHT_NAME,
    LORA_WEIGHT_NAME,
    file_sha256,
    load_textual_inversion,
    lora_state_dicts,
    save_full,
    save_lora,
    save_textual_inversion,
    submodule_state_dict,
    textual_inversion_embeddings,
)
from rayimg.train.optim import build_lr_scheduler, build_optimizer
from rayimg.registry import RegistryError, adapter_metadata, list_adapters, publish_adapter, resolve_adapter
from rayimg.train.trainee import build_trainee

SD, SDXL = "rayimg-tiny-sd", "rayimg-tiny-sdxl"
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
CAPTIONS = ["a red square", "a green square", "a blue square", "a yellow square"]


@pytest.fixture(scope="module", autouse=True)
def _model_cache(tmp_path_factory):
    os.environ.setdefault("RAYIMG_CACHE", str(tmp_path_factory.mktemp("rayimg-cache")))


def load(name=SD):
    return load_model(ModelConfig(pretrained=name, device="cpu"))


def make_job(method="lora", **train) -> TrainJob:
    job = TrainJob(cache="unused")
    job.train.method = method
    job.train.mixed_precision = "no"
    for key, value in train.items():
        setattr(job.train, key, value)
    return job


def pixels(n=4) -> torch.Tensor:
    images = [np.asarray(Image.new("RGB", (64, 64), c), dtype=np.float32) for c in COLOURS[:n]]
    return torch.stack([torch.from_numpy(a).permute(2, 0, 1) / 127.5 - 1.0 for a in images])


@torch.no_grad()
def cached_batch(loaded, n=4) -> dict:
    """What the prepare cache holds for the coloured squares: scaled latents and text embeddings."""
    pipe = loaded.pipeline
    latents = pipe.vae.encode(pixels(n)).latent_dist.mean * pipe.vae.config.scaling_factor
    tokenizers, encoders = pipeline_text_parts(pipe)
    batch = {"latents": latents, **encode_prompts(loaded.family, tokenizers, encoders, CAPTIONS[:n])}
    if loaded.family == "sdxl":
        batch["time_ids"] = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * n)
    return batch


def train_steps(trainee, batch, steps, job, ema=False) -> list[float]:
    optimizer = build_optimizer(trainee.trainable_parameters(), job)
    losses = []
    for _ in range(steps):
        out = trainee(batch)
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        trainee.after_optimizer_step()
        if ema:
            trainee.ema_step()
        losses.append(out["loss"].item())
    return losses


@contextmanager
def captured_warnings():
    """Log records of diffusers/peft/transformers plus Python warnings, as strings."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    handler = Collect(level=logging.WARNING)
    loggers = [logging.getLogger(n) for n in ("diffusers", "peft", "transformers")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield messages
        messages.extend(str(w.message) for w in caught)
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


def assert_clean_load(messages):
    # "No LoRA keys associated to CLIPTextModel" is diffusers' note that a file has no text
    # encoder LoRA; anything about missing, unexpected or inconsistent keys is a broken file.
    bad = [m for m in messages if not m.startswith("No LoRA keys associated to CLIPTextModel")
           and any(w in m.lower() for w in ("unexpected", "missing", "inconsisten", "not found in"))]
    assert not bad, bad


def render(pipe) -> np.ndarray:
    return pipe(
        "a red square", num_inference_steps=2, height=64, width=64, guidance_scale=1.0,
        generator=torch.Generator().manual_seed(0), output_type="np",
    ).images[0]


@torch.no_grad()
def unet_out(unet, cond, family):
    torch.manual_seed(123)
    x = torch.randn(1, 4, 8, 8)
    kwargs = {}
    if family == "sdxl":
        kwargs["added_cond_kwargs"] = {"text_embeds": cond["pooled_prompt_embeds"][:1], "time_ids": cond["time_ids"][:1]}
    return unet(x, torch.tensor([500]), encoder_hidden_states=cond["prompt_embeds"][:1], **kwargs).sample


# --------------------------------------------------------------------------- LoRA
def test_lora_sd_learns_exports_and_loads_in_plain_diffusers(tmp_path):
    loaded = load(SD)
    batch = cached_batch(loaded)
    job = make_job(learning_rate=1e-2)
    job.lora.rank, job.lora.alpha = 4, 8.0  # alpha != rank: the export must keep the scale
    job.lora.target_modules = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                               "conv1", "conv2", "conv_shortcut", "time_emb_proj"]
    torch.manual_seed(0)
    trainee = build_trainee(loaded, job)
    frozen_before = {n: p.detach().clone() for n, p in trainee.named_parameters() if "lora_" not in n}
    assert all(not p.requires_grad for n, p in trainee.named_parameters() if "lora_" not in n)
    assert all(p.dtype == torch.float32 for p in trainee.trainable_parameters())

    losses = train_steps(trainee, batch, 30, job)
    assert all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < 0.75 * np.mean(losses[:5]), losses
    for name, param in trainee.named_parameters():
        if "lora_" not in name:
            assert torch.equal(param, frozen_before[name]), name

    sds = lora_state_dicts(trainee)
    assert set(sds) == {"unet"} and all(v.dtype == torch.float32 and v.device.type == "cpu" for v in sds["unet"].values())
    written = save_lora(tmp_path, "sd", sds["unet"], kohya=True)
    assert {p.name for p in written} == {LORA_WEIGHT_NAME, KOHYA_WEIGHT_NAME}

    trainee.eval()
    want = unet_out(trainee.unet, batch, "sd")
    base = load_pipeline(ModelConfig(pretrained=SD, device="cpu"))
    before = render(base)
    assert not torch.allclose(unet_out(base.unet, batch, "sd"), want, atol=1e-3)
    with captured_warnings() as messages:
        base.load_lora_weights(str(tmp_path))
    assert_clean_load(messages)
    torch.testing.assert_close(unet_out(base.unet, batch, "sd"), want, atol=1e-5, rtol=1e-5)
    after = render(base)
    assert np.abs(after - before).mean() > 1e-3, "the LoRA does not change the image"

    kohya = load_pipeline(ModelConfig(pretrained=SD, device="cpu"))
    with captured_warnings() as messages:
        kohya.load_lora_weights(str(tmp_path), weight_name=KOHYA_WEIGHT_NAME)
    assert_clean_load(messages)
    torch.testing.assert_close(unet_out(kohya.unet, batch, "sd"), want, atol=1e-5, rtol=1e-5)


def test_lora_sdxl_step_with_time_ids_and_pooled_embeds_exports(tmp_path):
    loaded = load(SDXL)
    batch = cached_batch(loaded, n=2)
    job = make_job(learning_rate=1e-2)
    job.lora.rank, job.lora.alpha = 4, 12.0
    torch.manual_seed(0)
    trainee = build_trainee(loaded, job)
    losses = train_steps(trainee, batch, 2, job)
    assert all(np.isfinite(losses))

    sds = lora_state_dicts(trainee)
    # Unfolded dicts plus the training alpha give the same file.
    save_lora(tmp_path, "sdxl", lora_state_dicts(trainee, fold_scaling=False)["unet"], alpha=job.lora.alpha, kohya=True)
    trainee.eval()
    want = unet_out(trainee.unet, batch, "sdxl")
    for weight_name in (LORA_WEIGHT_NAME, KOHYA_WEIGHT_NAME):
        pipe = load_pipeline(ModelConfig(pretrained=SDXL, device="cpu"))
        with captured_warnings() as messages:
            pipe.load_lora_weights(str(tmp_path), weight_name=weight_name)
        assert_clean_load(messages)
        torch.testing.assert_close(unet_out(pipe.unet, batch, "sdxl"), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", [SD, SDXL])
def test_text_encoder_lora_trains_from_captions_and_exports(tmp_path, name):
    loaded = load(name)
    family = loaded.family
    cached = cached_batch(loaded, n=2)
    batch = {"latents": cached["latents"], "captions": CAPTIONS[:2], **({"time_ids": cached["time_ids"]} if family == "sdxl" else {})}
    embeds_dim = cached["prompt_embeds"].shape[-1]
    job = make_job(learning_rate=1e-2)
    job.lora.rank, job.lora.alpha, job.lora.train_text_encoder = 4, 2.0, True
    torch.manual_seed(0)
    trainee = build_trainee(loaded, job)
    with pytest.raises(ValueError, match="captions"):
        cached_embeds = {k: v for k, v in batch.items() if k != "captions"}
        trainee({**cached_embeds, "prompt_embeds": torch.zeros(2, 77, embeds_dim)})
    train_steps(trainee, batch, 2, job)

    sds = lora_state_dicts(trainee)
    encoders = ["text_encoder", "text_encoder_2"] if family == "sdxl" else ["text_encoder"]
    assert set(sds) == {"unet", *encoders}
    save_lora(tmp_path, family, sds["unet"], {k: sds[k] for k in encoders}, kohya=True)
    from safetensors import safe_open

    with safe_open(str(tmp_path / KOHYA_WEIGHT_NAME), "pt") as f:
        prefixes = {k.split("_text_model")[0] for k in f.keys() if k.startswith("lora_te")}
    assert prefixes == ({"lora_te1", "lora_te2"} if family == "sdxl" else {"lora_te"})
    trainee.eval()
    with torch.no_grad():
        want = encode_prompts(family, trainee.tokenizers, list(trainee.text_encoders), ["a red square"])
    for weight_name in (LORA_WEIGHT_NAME, KOHYA_WEIGHT_NAME):
        pipe = load_pipeline(ModelConfig(pretrained=name, device="cpu"))
        with captured_warnings() as messages:
            pipe.load_lora_weights(str(tmp_path), weight_name=weight_name)
        assert_clean_load(messages)
        tokenizers, encoders = pipeline_text_parts(pipe)
        with torch.no_grad():
            got = encode_prompts(family, tokenizers, encoders, ["a red square"])
        for key in want:
            torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=1e-5)


def test_unknown_target_module_is_refused_naming_the_field():
    job = make_job()
    job.lora.target_modules = ["to_q", "not_a_module"]
    with pytest.raises(ValueError, match=r"lora\.target_modules.*'not_a_module'"):
        build_trainee(load(SD), job)


# --------------------------------------------------------------------------- textual inversion
def ti_job(**ti) -> TrainJob:
    job = make_job("textual_inversion", learning_rate=5e-2)
    job.textual_inversion.placeholder_token = "<shape>"
    job.textual_inversion.initializer_token = "square"
    for key, value in ti.items():
        setattr(job.textual_inversion, key, value)
    return job


def test_textual_inversion_sd_learns_only_the_new_rows_and_loads_in_diffusers(tmp_path):
    loaded = load(SD)
    batch = {"latents": cached_batch(loaded)["latents"], "captions": [f"a <shape> {c}" for c in ("red", "green", "blue", "yellow")]}
    job = ti_job(num_vectors=2)
    torch.manual_seed(0)
    trainee = build_trainee(loaded, job)
    (ids,) = trainee.placeholder_token_ids()
    assert len(ids) == 2
    [param] = trainee.trainable_parameters()
    before = param.detach().clone()
    square = trainee.tokenizers[0].encode("square", add_special_tokens=False)[0]
    torch.testing.assert_close(before[ids], before[square].expand(2, -1))

    train_steps(trainee, batch, 3, job)
    after = param.detach()
    others = torch.ones(after.shape[0], dtype=torch.bool)
    others[ids] = False
    assert torch.equal(after[others], before[others])  # weight decay and Adam left them alone
    assert not torch.allclose(after[ids], before[ids])

    embeddings = textual_inversion_embeddings(trainee)
    assert list(embeddings) == ["<shape>"] and embeddings["<shape>"].shape == (2, 32)
    save_textual_inversion(tmp_path, "sd", embeddings)

    pipe = load_pipeline(ModelConfig(pretrained=SD, device="cpu"))
    pipe.load_textual_inversion(str(tmp_path), token="<shape>")
    new_ids = pipe.tokenizer.convert_tokens_to_ids(["<shape>", "<shape>_1"])
    torch.testing.assert_close(pipe.text_encoder.get_input_embeddings().weight[new_ids], embeddings["<shape>"])
    image = pipe("a <shape> on white", num_inference_steps=1, height=64, width=64, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert np.isfinite(image).all()


def test_textual_inversion_sdxl_trains_both_encoders_and_loads(tmp_path):
    loaded = load(SDXL)
    cached = cached_batch(loaded, n=2)
    batch = {"latents": cached["latents"], "captions": ["a <shape> in red", "a <shape> in green"], "time_ids": cached["time_ids"]}
    job = ti_job()
    torch.manual_seed(0)
    trainee = build_trainee(loaded, job)
    params = trainee.trainable_parameters()
    assert len(params) == 2
    before = [p.detach().clone() for p in params]
    train_steps(trainee, batch, 2, job)
    for p, b, ids in zip(params, before, trainee.placeholder_token_ids()):
        assert not torch.allclose(p[ids], b[ids])

    embeddings = textual_inversion_embeddings(trainee)
    assert set(embeddings) == {"clip_l", "clip_g"}
    path = save_textual_inversion(tmp_path, "sdxl", embeddings, token="<shape>")
    pipe = load_pipeline(ModelConfig(pretrained=SDXL, device="cpu"))
    load_textual_inversion(pipe, "sdxl", path, token="<shape>")
    for key, tokenizer, encoder in (("clip_l", pipe.tokenizer, pipe.text_encoder), ("clip_g", pipe.tokenizer_2, pipe.text_encoder_2)):
        row = encoder.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids("<shape>")]
        torch.testing.assert_close(row, embeddings[key][0])


@pytest.mark.parametrize(
    "ti, match",
    [
        ({"initializer_token": "a red square"}, r"textual_inversion\.initializer_token"),
        ({"placeholder_token": "square"}, r"textual_inversion\.placeholder_token"),
    ],
)
def test_textual_inversion_bad_tokens_are_refused(ti, match):
    with pytest.raises(ValueError, match=match):
        build_trainee(load(SD), ti_job(**ti))


# --------------------------------------------------------------------------- full fine-tune
def test_full_fine_tune_with_ema_and_export(tmp_path):
    loaded = load(SD)
    batch = cached_batch(loaded)
    job = make_job("full", learning_rate=1e-3, ema=True, ema_decay=0.99, gradient_checkpointing=True,
                   prediction_type="v_prediction")
    torch.manual_seed(0)
    trainee = build_trainee(loaded, job)
    assert trainee.has_ema and not any("shadow" in n for n, _ in trainee.named_parameters())
    assert {id(p) for p in trainee.trainable_parameters()} == {id(p) for p in trainee.unet.parameters()}
    start = {n: p.detach().clone() for n, p in trainee.unet.named_parameters()}

    train_steps(trainee, batch, 1, job, ema=True)
    assert any(not torch.equal(p, start[n]) for n, p in trainee.unet.named_parameters())
    train_steps(trainee, batch, 2, job, ema=True)
    ema = trainee.ema_unet_state_dict()
    trained = dict(trainee.unet.named_parameters())
    assert any(not torch.allclose(ema[n], trained[n]) for n in trained)

    state = trainee.ema_state_dict()
    assert state["optimization_step"] == 3
    trainee.load_ema_state_dict(state)
    assert build_trainee(load(SD), make_job("full")).ema_state_dict() is None

    # What a DeepSpeed engine's state dict of the whole trainee gives, cut down to the UNet.
    assert submodule_state_dict(trainee.state_dict(), "unet").keys() == trainee.unet.state_dict().keys()
    out = save_full(tmp_path / "model", loaded, ema, prediction_type=job.train.prediction_type)
    reloaded = load_pipeline(ModelConfig(pretrained=str(out), device="cpu"))
    for name, value in reloaded.unet.state_dict().items():
        torch.testing.assert_close(value, ema[name].float())
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "v_prediction"
    trainee.copy_ema_to_unet()
    for name, param in trainee.unet.named_parameters():
        torch.testing.assert_close(param, ema[name])


# --------------------------------------------------------------------------- loss options
OPTIONS = {
    "v_prediction": ({"prediction_type": "v_prediction"}, {}),
    "snr_gamma": ({"snr_gamma": 5.0}, {}),
    "v_prediction_snr": ({"prediction_type": "v_prediction", "snr_gamma": 5.0}, {}),
    "noise_offset": ({"noise_offset": 0.1}, {}),
    "caption_dropout_embeds": ({"caption_dropout": 0.5}, {}),
    "caption_dropout_captions": ({"caption_dropout": 0.5}, {"captions": True}),
    "prior_preservation": ({}, {"method": "dreambooth"}),
    "pixels_on_the_fly": ({}, {"pixels": True}),
    "bf16": ({"mixed_precision": "bf16"}, {}),
    "bf16_lora_weights": ({"mixed_precision": "bf16"}, {"trainable_dtype": torch.bfloat16}),
    "gradient_checkpointing": ({"gradient_checkpointing": True}, {}),
    "text_encoder_lora_checkpointed": ({"gradient_checkpointing": True}, {"captions": True, "train_text_encoder": True}),
}


@pytest.mark.parametrize("option", list(OPTIONS))
def test_loss_options_give_a_finite_loss(option):
    train, extra = OPTIONS[option]
    loaded = load(SD)
    batch = cached_batch(loaded)
    if extra.get("captions"):
        batch = {"latents": batch["latents"], "captions": CAPTIONS}
    if extra.get("pixels"):
        batch = {"pixels": pixels(), "prompt_embeds": batch["prompt_embeds"]}
    job = make_job(extra.get("method", "lora"), **train)
    job.lora.train_text_encoder = extra.get("train_text_encoder", False)
    if job.train.method == "dreambooth":
        job.dreambooth.prior_preservation = True
        batch["is_class"] = torch.tensor([False, False, True, True])
    torch.manual_seed(0)
    trainee = build_trainee(loaded, job, trainable_dtype=extra.get("trainable_dtype", torch.float32))
    if "trainable_dtype" in extra:
        assert all(p.dtype == torch.bfloat16 for p in trainee.trainable_parameters())
    out = trainee(batch)
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainee.trainable_parameters())
    if job.train.method == "dreambooth":
        assert {"instance_loss", "prior_loss"} <= set(out)


def test_prior_loss_covers_only_class_rows():
    loaded = load(SD)
    batch = cached_batch(loaded)
    batch["is_class"] = torch.tensor([False, False, True, True])
    job = make_job("dreambooth")
    job.dreambooth.prior_preservation, job.dreambooth.prior_loss_weight = True, 0.5
    trainee = build_trainee(loaded, job)

    def run(b):
        torch.manual_seed(7)
        with torch.no_grad():
            return trainee(b)

    base = run(batch)
    torch.testing.assert_close(base["loss"], base["instance_loss"] + 0.5 * base["prior_loss"])
    changed_instances = dict(batch, latents=batch["latents"].clone())
    changed_instances["latents"][:2] += 3.0
    out = run(changed_instances)
    torch.testing.assert_close(out["prior_loss"], base["prior_loss"])
    assert not torch.allclose(out["instance_loss"], base["instance_loss"])
    changed_classes = dict(batch, latents=batch["latents"].clone())
    changed_classes["latents"][2:] += 3.0
    out = run(changed_classes)
    torch.testing.assert_close(out["instance_loss"], base["instance_loss"])
    assert not torch.allclose(out["prior_loss"], base["prior_loss"])


def test_min_snr_weights_are_one_when_gamma_exceeds_every_snr():
    # Epsilon: weight = min(snr, gamma) / snr, so a huge gamma must reproduce the plain MSE.
    loaded = load(SD)
    batch = cached_batch(loaded)
    trainee = build_trainee(loaded, make_job())
    losses = []
    for gamma in (None, 1e12):
        trainee.snr_gamma = gamma
        torch.manual_seed(3)
        with torch.no_grad():
            losses.append(trainee(batch)["loss"])
    torch.testing.assert_close(losses[0], losses[1])


def test_caption_dropout_swaps_in_the_empty_caption_embedding():
    loaded = load(SD)
    batch = cached_batch(loaded)
    trainee = build_trainee(loaded, make_job(caption_dropout=0.5))
    torch.manual_seed(1)
    cond = trainee._conditioning(batch, 4, torch.device("cpu"))["prompt_embeds"]
    empty = trainee._empty_cond["prompt_embeds"][0]
    dropped = [torch.equal(row, empty) for row in cond]
    kept = [torch.equal(row, orig) for row, orig in zip(cond, batch["prompt_embeds"])]
    assert all(d or k for d, k in zip(dropped, kept)) and any(dropped) and any(kept)


def test_trainee_runs_under_ddp():
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    loaded = load(SD)
    batch = cached_batch(loaded, n=2)
    job = make_job()
    trainee = build_trainee(loaded, job)
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        model = DistributedDataParallel(trainee)
        optimizer = build_optimizer(trainee.trainable_parameters(), job)
        out = model(batch)
        out["loss"].backward()
        optimizer.step()
        assert torch.isfinite(out["loss"])
        assert set(lora_state_dicts(model)) == {"unet"}
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------- optimizer and schedule
def test_optimizer_and_schedule():
    job = make_job(learning_rate=1e-3, lr_scheduler="linear", lr_warmup_steps=2, max_steps=None, num_epochs=3,
                   batch_size=2, gradient_accumulation_steps=2)
    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = build_optimizer([param], job)
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["weight_decay"] == job.train.weight_decay
    scheduler = build_lr_scheduler(optimizer, job, 10)
    lrs = []
    for _ in range(4):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == 0.0 and lrs[1] == pytest.approx(5e-4) and lrs[2] == pytest.approx(1e-3) and lrs[3] < 1e-3


def test_adamw8bit_without_bitsandbytes_names_the_field():
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("bitsandbytes is installed")
    with pytest.raises(ValueError, match=r"train\.optimizer"):
        build_optimizer([torch.nn.Parameter(torch.zeros(2))], make_job(optimizer="adamw8bit"))


# --------------------------------------------------------------------------- registry
def _adapter_dir(tmp_path, content: bytes):
    d = tmp_path / f"adapter-{len(content)}"
    d.mkdir()
    (d / LORA_WEIGHT_NAME).write_bytes(content)
    (d / KOHYA_WEIGHT_NAME).write_bytes(content[::-1])
    return d


def _metadata():
    job = make_job()
    job.publish.trigger_word = "sks"
    return adapter_metadata(job, model_id=SD, model_hash="abc", family="sd", steps=30)


def test_registry_publishes_versions_and_resolves_latest(tmp_path):
    storage, root = Storage(), str(tmp_path / "registry")
    first = _adapter_dir(tmp_path, b"one")
    uri1, v1 = publish_adapter(storage, root, "my-style", None, first, _metadata())
    uri2, v2 = publish_adapter(storage, root, "my-style", None, _adapter_dir(tmp_path, b"second"), _metadata())
    assert (v1, v2) == ("1", "2")
    assert uri1.endswith("adapters/my-style/1")

    meta = json.loads(storage.read_text(f"{uri1}/adapter.json"))
    assert meta["weights"] == {LORA_WEIGHT_NAME: file_sha256(first / LORA_WEIGHT_NAME), KOHYA_WEIGHT_NAME: file_sha256(first / KOHYA_WEIGHT_NAME)}
    assert meta["weights"][LORA_WEIGHT_NAME] == file_sha256(tmp_path / "registry/adapters/my-style/1" / LORA_WEIGHT_NAME)
    assert meta["base_model"] == {"id": SD, "hash": "abc", "family": "sd"}
    assert (meta["method"], meta["rank"], meta["alpha"], meta["trigger_word"], meta["steps"]) == ("lora", 16, 16, "sks", 30)
    assert meta["training_config"]["train"]["method"] == "lora" and meta["created"].endswith("+00:00")

    version, uri, latest = resolve_adapter(storage, root, "my-style")
    assert (version, uri, latest["version"]) == ("2", uri2, "2")
    assert resolve_adapter(storage, root, "my-style", 1)[0] == "1"
    assert list_adapters(storage, root) == {"my-style": ["1", "2"]}

    with pytest.raises(RegistryError, match="already exists"):
        publish_adapter(storage, root, "my-style", "2", first, _metadata())
    for bad in ("../x", "UPPER", "a/b"):
        with pytest.raises(ValueError, match="adapter name"):
            publish_adapter(storage, root, bad, None, first, _metadata())
        with pytest.raises(ValueError, match="adapter name"):
            resolve_adapter(storage, root, bad)
    with pytest.raises(RegistryError, match="no published version"):
        resolve_adapter(storage, root, "other")
    # A version whose adapter.json is missing (a publish that died) is neither latest nor reused.
    (tmp_path / "registry/adapters/my-style/3").mkdir()
    (tmp_path / "registry/adapters/my-style/3" / LORA_WEIGHT_NAME).write_bytes(b"partial")
    assert resolve_adapter(storage, root, "my-style")[0] == "2"
    assert publish_adapter(storage, root, "my-style", None, first, _metadata())[1] == "4"


def test_registry_on_s3(storage, s3_bucket, tmp_path):
    root = f"s3://{s3_bucket}/registry"
    uri, version = publish_adapter(storage, root, "s3-style", None, _adapter_dir(tmp_path, b"weights"), _metadata())
    assert version == "1" and uri == f"s3://{s3_bucket}/registry/adapters/s3-style/1"
    got_version, got_uri, meta = resolve_adapter(storage, root, "s3-style")
    assert (got_version, got_uri) == ("1", uri)
    assert meta["weights"][LORA_WEIGHT_NAME] == file_sha256(tmp_path / "adapter-7" / LORA_WEIGHT_NAME)
    assert storage.read_bytes(f"{uri}/{LORA_WEIGHT_NAME}") == b"weights"


# --------------------------------------------------------------------------- DeepSpeed config
def test_deepspeed_config_from_the_job():
    job = make_job("full", batch_size=2, gradient_accumulation_steps=3, mixed_precision="bf16", max_grad_norm=0.5)
    job.deepspeed.enabled = True
    config = build_deepspeed_config(job, world_size=4)
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"], config["train_batch_size"]) == (2, 3, 24)
    assert config["gradient_clipping"] == 0.5
    assert config["bf16"]["enabled"] and not config["fp16"]["enabled"]
    zero = config["zero_optimization"]
    assert zero["stage"] == 2 and zero["overlap_comm"] and zero["contiguous_gradients"]
    assert "offload_optimizer" not in zero and "offload_param" not in zero
    assert "stage3_gather_16bit_weights_on_model_save" not in zero
    assert config["optimizer"] == {"type": "AdamW", "params": {"lr": job.train.learning_rate, "betas": [0.9, 0.999], "eps": 1e-8,
                                                              "weight_decay": job.train.weight_decay, "torch_adam": True}}
    assert "scheduler" not in config and "zero_allow_untested_optimizer" not in config

    job.deepspeed.stage, job.deepspeed.offload_optimizer, job.deepspeed.offload_params = 3, True, True
    job.train.mixed_precision = "fp16"
    config = build_deepspeed_config(job, world_size=2)
    zero = config["zero_optimization"]
    assert zero["stage"] == 3 and zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert zero["offload_param"] == {"device": "cpu", "pin_memory": True}
    assert config["fp16"]["enabled"] and not config["bf16"]["enabled"] and config["train_batch_size"] == 12
    json.dumps(config)

    job.deepspeed.stage, job.deepspeed.offload_params = 2, True
    with pytest.raises(ValueError, match=r"deepspeed\.offload_params"):
        build_deepspeed_config(job, world_size=2)


def test_cached_batches_use_embeddings_only_when_text_encoders_are_frozen():
    from rayimg.train.batches import CachedBatches

    g = torch.Generator().manual_seed(0)
    shard = {"latents": torch.randn(3, 4, 8, 8, generator=g), "prompt_embeds": torch.randn(3, 77, 32, generator=g),
             "pooled_prompt_embeds": torch.randn(3, 32, generator=g)}
    records = [{"shard": "s0", "index": i, "caption": f"c{i}", "width": 64, "height": 64, "original_size": [64, 64],
                "crop_top_left": [0, 0], "target_size": [64, 64]} for i in range(3)]
    frozen = CachedBatches(records, lambda sid: shard, "sdxl").batch([2, 0], "cpu")
    assert "captions" not in frozen
    assert torch.equal(frozen["prompt_embeds"], shard["prompt_embeds"][[2, 0]])
    assert torch.equal(frozen["pooled_prompt_embeds"], shard["pooled_prompt_embeds"][[2, 0]])
    training = CachedBatches(records, lambda sid: shard, "sdxl", use_embeddings=False).batch([2, 0], "cpu")
    assert training["captions"] == ["c2", "c0"] and "prompt_embeds" not in training
    no_embeds = CachedBatches(records, lambda sid: {"latents": shard["latents"]}, "sd").batch([1], "cpu")
    assert no_embeds["captions"] == ["c1"]


@pytest.mark.parametrize("train, match", [
    ({"full_bf16": True, "mixed_precision": "no"}, "full_bf16.*bf16"),
    ({"full_bf16": True, "method": "full"}, "full_bf16.*lora"),
])
def test_full_bf16_is_checked_naming_the_field(train, match):
    from rayimg.config import ConfigError, from_dict

    with pytest.raises(ConfigError, match=match):
        from_dict(TrainJob, {"cache": "unused", "train": train})


def test_compile_unet_regional_compiles_the_repeated_blocks_in_place():
    from rayimg.models.regions import REGIONAL_BLOCKS
    from rayimg.train.trainee import compile_unet

    unet = load(SD).pipeline.unet
    names = [n for n, _ in unet.named_parameters()]
    expected = sum(type(m).__name__ in REGIONAL_BLOCKS for m in unet.modules())
    assert expected > 0
    assert compile_unet(unet, "regional") == expected
    compiled = [m for m in unet.modules() if type(m).__name__ in REGIONAL_BLOCKS]
    assert all(m._compiled_call_impl is not None for m in compiled)
    assert [n for n, _ in unet.named_parameters()] == names  # exports see the same parameter names
    assert compile_unet(unet, "none") == 0
    with pytest.raises(ValueError, match="compile: unknown mode 'fast'"):
        compile_unet(unet, "fast")
