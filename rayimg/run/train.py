"""`rayimg train`: the training loop on Ray Train (DDP for adapters, DeepSpeed ZeRO for full fine-tunes).

The driver checks everything it can before any worker starts (model, cache or dataset, hardware
asks), then runs a TorchTrainer. Item records reach the workers through Ray Data; each worker
draws its batches deterministically from (seed, epoch, rank), so the data position is a step
count and a resumed run sees exactly the batches the uninterrupted run would have.

Checkpoints (every ``checkpoint.every_n_steps``) hold the trainable weights, optimizer,
LR scheduler, step and every rank's RNG state; Ray Train registers one only once all of it is
persisted. A run with the same ``checkpoint.run_name`` resumes from its latest checkpoint, and
``checkpoint.max_failures`` restarts dead workers from it.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import tempfile
import time
from pathlib import Path

import torch

from rayimg.config import ConfigError, TrainJob, absolute_paths, to_dict
from rayimg.storage import Storage, arrow_filesystem, is_s3

LOG_EVERY = 10


# --------------------------------------------------------------------------- driver-side checks
def run_name(job: TrainJob) -> str:
    """``checkpoint.run_name``, else the adapter name + a hash of the training config: the same
    config resumes its own run, a changed one starts a new run."""
    if job.checkpoint.run_name:
        return job.checkpoint.run_name
    cfg = to_dict(job)
    for volatile in ("cluster", "checkpoint", "publish"):
        cfg.pop(volatile, None)
    digest = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:8]
    return f"{job.publish.name}-{digest}"


def check_hardware(job: TrainJob) -> None:
    cuda = torch.cuda.is_available()
    if job.scaling.use_gpu and not cuda:
        # The driver may sit on a CPU head node; Ray then needs GPU nodes, which it checks itself.
        pass
    if not job.scaling.use_gpu and job.train.mixed_precision == "fp16":
        raise ConfigError("train.mixed_precision", "fp16 needs GPUs (scaling.use_gpu: true); use 'bf16' or 'no' on CPU")
    if job.scaling.use_gpu and cuda and job.train.mixed_precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise ConfigError("train.mixed_precision", f"bf16 is not supported on {torch.cuda.get_device_name(0)}; use 'fp16'")
    if job.deepspeed.enabled:
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise ConfigError("deepspeed.enabled", "DeepSpeed is not installed (pip install deepspeed)") from None


def _records(job: TrainJob, storage: Storage, model_id: str, model_hash: str) -> tuple[list[dict], dict | None]:
    """(item records, cache header) — from the cache, or the dataset's source items."""
    from rayimg.data.cache import CacheError, CacheReader
    from rayimg.data.sources import DatasetError, check_source, list_items

    if job.cache:
        try:
            reader = CacheReader(storage, job.cache)
            reader.check_model(model_id, model_hash)
        except CacheError as e:
            raise ConfigError("cache", str(e)) from None
        res = reader.header["transforms"]["resolution"]
        if res != job.train.resolution:
            raise ConfigError("train.resolution", f"is {job.train.resolution} but the cache {job.cache} was prepared at {res}")
        if not reader.items:
            raise ConfigError("cache", f"{job.cache} holds no items")
        return [it.to_dict() for it in reader.items], reader.header
    try:
        fmt = check_source(storage, job.data)
        if fmt == "manifest":
            raise ConfigError("data.source", "a manifest dataset must be prepared into a cache first (`rayimg prepare`), then set `cache`")
        items = list_items(storage, job.data)
    except DatasetError as e:
        raise ConfigError("data.source", str(e)) from None
    return [it.to_row() for it in items], None


def run(job: TrainJob) -> dict:
    import ray
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from rayimg.cluster import connect
    from rayimg.models.loader import check_family, model_id_and_hash, resolve_model_dir

    t0 = time.perf_counter()
    job = absolute_paths(job)  # workers do not share the driver's working directory
    storage = Storage(job.storage)
    check_hardware(job)
    model_dir = resolve_model_dir(job.model, storage)
    family = check_family(job.model, model_dir)
    model_id, model_hash = model_id_and_hash(job.model, model_dir)
    records, header = _records(job, storage, model_id, model_hash)
    connect(job.cluster)
    name = run_name(job)
    fs, storage_path = arrow_filesystem(job.storage, job.checkpoint.storage_path)
    if fs is None:
        storage_path = str(Path(storage_path).expanduser().resolve())
    print(f"[train] {job.train.method} on {model_id} ({family}), {len(records)} item(s), "
          f"{job.scaling.num_workers} worker(s){' with GPUs' if job.scaling.use_gpu else ''}; run {name} in {job.checkpoint.storage_path}", flush=True)

    model_cfg = job.model if is_s3(job.model.pretrained) else type(job.model)(**{**job.model.__dict__, "pretrained": str(model_dir)})
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"job": job, "model_cfg": model_cfg, "family": family, "model_id": model_id,
                           "model_hash": model_hash, "from_cache": bool(job.cache), "fault": _fault_plan(),
                           "run_name": name},
        scaling_config=ScalingConfig(num_workers=job.scaling.num_workers, use_gpu=job.scaling.use_gpu,
                                     resources_per_worker={"CPU": job.scaling.cpus_per_worker}),
        run_config=RunConfig(
            name=name, storage_path=storage_path, storage_filesystem=fs,
            checkpoint_config=CheckpointConfig(num_to_keep=job.checkpoint.num_to_keep),
            failure_config=FailureConfig(max_failures=job.checkpoint.max_failures),
        ),
        datasets={"items": ray.data.from_items(records)},
        resume_from_checkpoint=ray.train.Checkpoint(*arrow_filesystem(job.storage, job.checkpoint.resume_from)[::-1])
        if job.checkpoint.resume_from else None,
        dataset_config=ray.train.DataConfig(datasets_to_split=[]),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    final = result.checkpoint
    with final.as_directory() as ckpt_dir:
        summary = _publish(job, storage, Path(ckpt_dir), model_id, model_hash)
    summary.update(run=name, checkpoint=final.path, seconds=round(time.perf_counter() - t0, 1), metrics=result.metrics)
    print(f"[train] done in {summary['seconds']}s: {summary.get('uri', summary.get('model_dir'))}", flush=True)
    return summary


def _publish(job: TrainJob, storage: Storage, ckpt_dir: Path, model_id: str, model_hash: str) -> dict:
    from rayimg.train.registry import publish_adapter

    export = ckpt_dir / "export"
    state = json.loads((ckpt_dir / "state.json").read_text())
    if job.train.method == "full":
        target = f"{job.publish.registry.rstrip('/')}/models/{job.publish.name}"
        storage.upload_dir(export, target)
        return {"model_dir": target, "steps": state["step"], "losses": state["losses"]}
    metadata = {
        "base_model": {"id": model_id, "hash": model_hash},
        "method": job.train.method,
        "rank": job.lora.rank if job.train.method != "textual_inversion" else None,
        "alpha": (job.lora.alpha or job.lora.rank) if job.train.method != "textual_inversion" else None,
        "target_modules": job.lora.target_modules if job.train.method != "textual_inversion" else None,
        "trigger_word": job.publish.trigger_word or (job.textual_inversion.placeholder_token if job.train.method == "textual_inversion" else None),
        "training_config": to_dict(job),
        "steps": state["step"],
    }
    uri, version = publish_adapter(storage, job.publish.registry, job.publish.name, job.publish.version, export, metadata)
    return {"uri": uri, "version": version, "steps": state["step"], "losses": state["losses"]}


# --------------------------------------------------------------------------- the worker loop
def _seed_all(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    import random

    import numpy as np

    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _fault_plan() -> dict | None:
    """Fault injection for tests, read on the driver: RAYIMG_FAULT_AT_STEP=N and
    RAYIMG_FAULT_MARKER=path make the last worker SIGKILL itself once when it reaches step N."""
    at, marker = os.environ.get("RAYIMG_FAULT_AT_STEP"), os.environ.get("RAYIMG_FAULT_MARKER")
    return {"step": int(at), "marker": marker} if at and marker else None


def _maybe_inject_fault(plan: dict | None, step: int, rank: int, world: int) -> None:
    if not plan or step != plan["step"] or rank != world - 1 or Path(plan["marker"]).exists():
        return
    Path(plan["marker"]).write_text(str(os.getpid()))
    os.kill(os.getpid(), signal.SIGKILL)


def _load_pixel_items(job: TrainJob, records: list[dict], model_key: str) -> list:
    """On-the-fly path: read and transform every item in this worker (bad items are skipped)."""
    from rayimg.data.buckets import make_buckets
    from rayimg.data.transforms import BadItem, process_item

    storage = Storage(job.storage)
    buckets = make_buckets(job.transforms.buckets, job.transforms.resolution) if job.transforms.buckets.enabled else None
    items = []
    for r in records:
        try:
            caption = r["caption"] if isinstance(r.get("caption"), str) else (
                storage.read_bytes(r["caption_uri"]) if isinstance(r.get("caption_uri"), str) else None)
            item = process_item(storage.read_bytes(r["image_uri"]), caption, cfg=job.transforms, min_size=job.data.min_size,
                                model_id=model_key, buckets=buckets)
        except (BadItem, OSError):
            continue
        item.kind = r.get("kind", "instance")
        items.append(item)
    if not items:
        raise ValueError(f"data.source {job.data.source!r}: no usable item")
    return items


def train_loop(config: dict) -> None:
    import ray.data
    import ray.train
    import ray.train.torch

    from rayimg.data.cache import CacheReader
    from rayimg.models.loader import load_model
    from rayimg.train.batches import CachedBatches, PixelBatches
    from rayimg.train.export import lora_state_dicts, save_full, save_lora, save_textual_inversion
    from rayimg.train.optim import build_lr_scheduler, build_optimizer
    from rayimg.train.sampler import batches_per_epoch, epoch_batches, position
    from rayimg.train.trainee import build_trainee, compile_unet

    job: TrainJob = config["job"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    _seed_all(job.train.seed * 1000 + rank)

    model_cfg = type(config["model_cfg"])(**{**config["model_cfg"].__dict__, "device": device.type,
                                             "dtype": "float32"})
    storage = Storage(job.storage)
    loaded = load_model(model_cfg, storage)
    full_bf16 = job.train.full_bf16
    trainee = build_trainee(loaded, job, trainable_dtype=torch.bfloat16 if full_bf16 else torch.float32, autocast=not full_bf16)
    compile_unet(trainee.unet, job.train.compile)  # in place: parameter names and exports are unchanged

    ray.data.DataContext.get_current().enable_progress_bars = False
    records = list(ray.train.get_dataset_shard("items").iter_rows())
    if config["from_cache"]:
        reader_root = job.cache
        data = CachedBatches(records, lambda sid: CacheReader.load_shard_from(storage, reader_root, sid), config["family"],
                             use_embeddings=not trainee.train_text_encoders)
    else:
        data = PixelBatches(_load_pixel_items(job, records, f"{config['model_id']}@{config['model_hash'][:16]}"), config["family"])
    buckets = data.buckets()
    per_epoch = batches_per_epoch(buckets, job.train.batch_size, world)
    accum = job.train.gradient_accumulation_steps
    if job.train.max_steps is not None:
        total_steps = job.train.max_steps
    else:
        total_steps = max(1, (per_epoch * job.train.num_epochs) // accum)

    params = trainee.trainable_parameters()
    use_ds = job.deepspeed.enabled
    if use_ds:
        import deepspeed

        from rayimg.train.deepspeed_config import build_deepspeed_config

        ds_config = build_deepspeed_config(job, world)
        engine, optimizer, _, _ = deepspeed.initialize(model=trainee, model_parameters=params, config=ds_config)
        lr_scheduler = build_lr_scheduler(optimizer, job, total_steps)
        model = engine
    else:
        optimizer = build_optimizer(trainee.param_groups(), job)  # one group, or two with lora.text_encoder_learning_rate
        lr_scheduler = build_lr_scheduler(optimizer, job, total_steps)
        model = ray.train.torch.prepare_model(trainee)  # moves to the device; DDP when world > 1

    step, losses = 0, []
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            step, losses = _load_checkpoint(Path(d), trainee, model if use_ds else None, optimizer, lr_scheduler, rank)
        if rank == 0:
            print(f"[train] resumed at step {step} from {ckpt.path}", flush=True)

    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(job.train.mixed_precision)
    use_amp = amp_dtype is not None and not use_ds and not full_bf16
    scaler = torch.amp.GradScaler(device.type) if (use_amp and amp_dtype == torch.float16) else None
    t_last, imgs_since = time.perf_counter(), 0
    model.train()
    while step < total_steps:
        _maybe_inject_fault(config.get("fault"), step, rank, world)
        micro_losses = []
        for micro in range(accum):
            epoch, bi = position(step * accum + micro, per_epoch)
            indices = epoch_batches(buckets, job.train.batch_size, job.train.seed, epoch, rank, world)[bi]
            batch = data.batch(indices, device)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                out = model(batch)
            loss = out["loss"]
            if use_ds:
                model.backward(loss)
                model.step()
            else:
                scaled = loss / accum
                sync_ctx = model.no_sync() if (world > 1 and micro < accum - 1 and hasattr(model, "no_sync")) else _nullcontext()
                with sync_ctx:
                    (scaler.scale(scaled) if scaler else scaled).backward()
            micro_losses.append(loss.detach().float())
            imgs_since += len(indices)
        if not use_ds:
            if scaler:
                scaler.unscale_(optimizer)
            if job.train.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, job.train.max_grad_norm)
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        lr_scheduler.step()
        trainee.after_optimizer_step()
        step += 1
        step_loss = torch.stack(micro_losses).mean()
        if world > 1:
            import torch.distributed as dist

            dist.all_reduce(step_loss, op=dist.ReduceOp.AVG if device.type == "cuda" else dist.ReduceOp.SUM)
            if device.type != "cuda":
                step_loss /= world
        losses.append(float(step_loss))
        last = step == total_steps
        val = job.validation
        if rank == 0 and val.prompts and val.every_n_steps and (step % val.every_n_steps == 0 or last):
            _validate(job, loaded.pipeline, step, config["run_name"], device, amp_dtype if use_amp else None,
                      zero3=use_ds and job.deepspeed.stage == 3)
        if step % job.checkpoint.every_n_steps == 0 or last:
            _checkpoint(job, trainee, model if use_ds else None, optimizer, lr_scheduler, step, losses, rank, last, loaded, config)
        elif step % LOG_EVERY == 0:
            now = time.perf_counter()
            ray.train.report(_metrics(step, losses, lr_scheduler, imgs_since * world / (now - t_last), device))
            t_last, imgs_since = now, 0


def _validate(job: TrainJob, pipe, step: int, run: str, device, amp_dtype, zero3: bool) -> None:
    """Render the validation prompts with the weights as they are now; PNGs go next to the run."""
    from rayimg.render.output import png_bytes
    from rayimg.storage import join

    if zero3:
        print(f"[train] step {step}: validation images skipped under ZeRO-3 (weights are partitioned)", flush=True)
        return
    val = job.validation
    out = join(job.checkpoint.storage_path, run, "validation", f"step-{step:06d}")
    storage = Storage(job.storage)
    was_training = pipe.unet.training
    pipe.unet.eval()
    pipe.set_progress_bar_config(disable=True)
    try:
        with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            for i, prompt in enumerate(val.prompts):
                gen = torch.Generator("cpu").manual_seed(val.seed + i)
                image = pipe(prompt, num_inference_steps=val.num_inference_steps, width=job.train.resolution,
                             height=job.train.resolution, generator=gen).images[0]
                storage.write_bytes(join(out, f"{i:02d}.png"), png_bytes(image, {"prompt": prompt, "step": step, "seed": val.seed + i}))
    finally:
        pipe.unet.train(was_training)
    print(f"[train] step {step}: {len(val.prompts)} validation image(s) in {out}", flush=True)


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _metrics(step: int, losses: list[float], lr_scheduler, images_per_s: float, device) -> dict:
    m = {"step": step, "loss": losses[-1], "lr": lr_scheduler.get_last_lr()[0], "images_per_s": round(images_per_s, 3)}
    if device.type == "cuda":
        m["gpu_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print(f"[train] step {step}: loss {m['loss']:.4f}, lr {m['lr']:.2e}, {m['images_per_s']} images/s", flush=True)
    return m


def _trainable_state(trainee, engine) -> dict[str, torch.Tensor]:
    """The trainable weights, gathered from ZeRO-3 partitions when DeepSpeed shards them."""
    names = [n for n, p in trainee.named_parameters() if p.requires_grad]
    params = dict(trainee.named_parameters())
    if engine is not None and getattr(engine, "zero_optimization_stage", lambda: 0)() == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters([params[n] for n in names], modifier_rank=None):
            return {n: params[n].detach().cpu().clone() for n in names}
    return {n: params[n].detach().cpu().clone() for n in names}


def _checkpoint(job, trainee, engine, optimizer, lr_scheduler, step, losses, rank, final, loaded, config) -> None:
    import ray.train

    from rayimg.train.export import lora_state_dicts, save_full, save_lora, save_textual_inversion

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        torch.save(_rng_state(), d / f"rng_rank{rank}.pt")
        weights = None
        if engine is not None:
            # DeepSpeed's own checkpoint holds the (sharded) weights and optimizer state
            engine.save_checkpoint(str(d / "deepspeed"), tag="zero")
            if final:
                weights = _trainable_state(trainee, engine)  # every rank joins the ZeRO-3 gather
                digests = _same_weights_on_every_rank(weights, rank, engine.device)  # fails before any export
        else:
            weights = _trainable_state(trainee, None)
        if rank == 0:
            if engine is None:
                torch.save(weights, d / "trainable.pt")
            if engine is None:
                torch.save(optimizer.state_dict(), d / "optimizer.pt")
            torch.save(lr_scheduler.state_dict(), d / "lr_scheduler.pt")
            if hasattr(trainee, "ema_state_dict") and trainee.ema_state_dict() is not None:
                torch.save(trainee.ema_state_dict(), d / "ema.pt")
            (d / "state.json").write_text(json.dumps({"step": step, "losses": losses}))
            if final:
                _export(job, trainee, weights, loaded, d / "export")
        metrics = {"step": step, "loss": losses[-1], "lr": lr_scheduler.get_last_lr()[0]}
        if final and engine is not None:
            metrics["weights_sha256"] = digests
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def weights_sha256(weights: dict[str, torch.Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of ``weights`` in name order."""
    h = hashlib.sha256()
    for name in sorted(weights):
        t = weights[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _same_weights_on_every_rank(weights: dict[str, torch.Tensor], rank: int, device) -> list[str]:
    """Every rank's digest of the weights it would save (under ZeRO-3 the gathered ones), in rank
    order. Raises on every rank unless each rank's weights are non-empty and all digests are equal:
    rank 0 exports its copy, so a rank that trained different weights, or an empty ZeRO-3
    placeholder, would otherwise go unnoticed."""
    import torch.distributed as dist

    empty = [n for n, t in weights.items() if t.numel() == 0]
    problem = "no trainable weights" if not weights else (f"{len(empty)} empty tensor(s), e.g. {empty[:3]}" if empty else None)
    mine = torch.zeros(33, dtype=torch.uint8)
    if problem is None:
        mine[0] = 1
        mine[1:] = torch.frombuffer(bytearray.fromhex(weights_sha256(weights)), dtype=torch.uint8)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        # every rank reaches the gather, also one with a problem, so none is left waiting
        gathered = [torch.zeros(33, dtype=torch.uint8, device=device) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, mine.to(device))
        gathered = [g.cpu() for g in gathered]
    else:
        gathered = [mine]
    if problem is not None:
        raise RuntimeError(f"rank {rank}: the weights to save hold {problem}")
    bad = [r for r, g in enumerate(gathered) if g[0] != 1]
    if bad:
        raise RuntimeError(f"rank(s) {bad}: the weights to save are empty (see that rank's error)")
    digests = [bytes(g[1:].tolist()).hex() for g in gathered]
    if len(set(digests)) > 1:
        raise RuntimeError("the weights to save differ across ranks: "
                           + ", ".join(f"rank {r} sha256 {d[:16]}" for r, d in enumerate(digests)))
    return digests


def _export(job: TrainJob, trainee, weights: dict, loaded, out: Path) -> None:
    from rayimg.train.export import lora_state_dicts, save_full, save_lora, save_textual_inversion

    out.mkdir(parents=True, exist_ok=True)
    method = job.train.method
    if method in ("lora", "dreambooth"):
        sds = lora_state_dicts(trainee)
        save_lora(out, loaded.family, sds["unet"], {k: v for k, v in sds.items() if k != "unet"} or None, kohya=job.publish.kohya)
    elif method == "textual_inversion":
        save_textual_inversion(out, loaded.family, trainee.learned_embeddings())
    else:
        unet_sd = {k[len("unet."):]: v for k, v in weights.items() if k.startswith("unet.")}
        if trainee.ema_state_dict() is not None:
            trainee.copy_ema_to_unet()
            unet_sd = {k: v.detach().cpu() for k, v in trainee.unet.state_dict().items()}
        save_full(out, loaded, unet_sd)


def _load_checkpoint(d: Path, trainee, engine, optimizer, lr_scheduler, rank: int) -> tuple[int, list[float]]:
    if engine is None:
        weights = torch.load(d / "trainable.pt", map_location="cpu")
        params = dict(trainee.named_parameters())
        with torch.no_grad():
            for n, t in weights.items():
                params[n].copy_(t.to(params[n].device, params[n].dtype))
    if engine is not None:
        engine.load_checkpoint(str(d / "deepspeed"), tag="zero", load_module_strict=False)
    else:
        optimizer.load_state_dict(torch.load(d / "optimizer.pt", map_location="cpu"))
    lr_scheduler.load_state_dict(torch.load(d / "lr_scheduler.pt", map_location="cpu"))
    if (d / "ema.pt").exists():
        trainee.load_ema_state_dict(torch.load(d / "ema.pt", map_location="cpu"))
    rng = d / f"rng_rank{rank}.pt"
    if rng.exists():
        _set_rng_state(torch.load(rng, map_location="cpu", weights_only=False))
    state = json.loads((d / "state.json").read_text())
    return state["step"], state["losses"]
