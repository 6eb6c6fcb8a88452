"""`rayimg train`: :class:`rayimg.train.loop.Loop` on Ray Train (DDP for adapters, DeepSpeed
ZeRO for full fine-tunes).

The driver checks everything it can before any worker starts (model, cache or dataset, hardware
asks), then runs a TorchTrainer. Item records reach the workers through Ray Data; each worker
runs the loop with its rank and reports its checkpoints to Ray Train, which registers one only
once every rank has persisted its part. A run with the same ``checkpoint.run_name`` resumes from
its latest checkpoint, and ``checkpoint.max_failures`` restarts dead workers from it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from dataclasses import replace
from pathlib import Path

import torch

from rayimg.config import ConfigError, TrainJob, absolute_paths, to_dict
from rayimg.storage import Storage, arrow_filesystem, is_s3, join


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
    # A driver without CUDA may sit on a CPU head node; Ray itself checks for GPU nodes.
    cuda = torch.cuda.is_available()
    if not job.scaling.use_gpu and job.train.mixed_precision == "fp16":
        raise ConfigError("train.mixed_precision", "fp16 needs GPUs (scaling.use_gpu: true); use 'bf16' or 'no' on CPU")
    if job.scaling.use_gpu and cuda and job.train.mixed_precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise ConfigError("train.mixed_precision", f"bf16 is not supported on {torch.cuda.get_device_name(0)}; use 'fp16'")
    if job.deepspeed.enabled:
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise ConfigError("deepspeed.enabled", "DeepSpeed is not installed (pip install deepspeed)") from None


def _records(job: TrainJob, storage: Storage, model_id: str, model_hash: str) -> list[dict]:
    """The item records: from the cache, or the dataset's source items."""
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
        return [it.to_dict() for it in reader.items]
    try:
        fmt = check_source(storage, job.data)
        if fmt == "manifest":
            raise ConfigError("data.source", "a manifest dataset must be prepared into a cache first (`rayimg prepare`), then set `cache`")
        items = list_items(storage, job.data)
    except DatasetError as e:
        raise ConfigError("data.source", str(e)) from None
    return [it.to_row() for it in items]


def _class_images_to_generate(job: TrainJob, storage: Storage, model_id: str, model_hash: str) -> list:
    """DreamBooth prior preservation: the class images ``data.class_source`` lacks (checked
    before Ray starts: a folder that cannot be read, or no class image and none to generate, is a
    ConfigError)."""
    from rayimg.train.class_images import existing_class_images, missing_class_images

    if not (job.train.method == "dreambooth" and job.dreambooth.prior_preservation):
        return []
    try:
        have = len(existing_class_images(storage, job.data.class_source))
    except ValueError as e:
        raise ConfigError("data.class_source", str(e).split(": ", 1)[1]) from None
    if have == 0 and job.dreambooth.num_class_images == 0:
        raise ConfigError("dreambooth.num_class_images", f"is 0 and data.class_source {job.data.class_source!r} holds no image: "
                          "prior preservation has no class image; set num_class_images to have them generated")
    return missing_class_images(job, storage, model_id, model_hash)


def generate_class_images(job: TrainJob, model_cfg, todo: list) -> int:
    """Render the missing class images with the base model: Ray tasks on up to
    ``scaling.num_workers`` workers (a GPU each with ``scaling.use_gpu``), each through the
    render engine, writing into ``data.class_source``. Returns how many were written."""
    import ray

    t0 = time.perf_counter()
    batches = -(-len(todo) // job.dreambooth.class_batch_size)
    n = max(1, min(job.scaling.num_workers, batches))
    print(f"[train] generating {len(todo)} class image(s) of {job.data.class_prompt!r} into {job.data.class_source} "
          f"with the base model ({n} task(s){', a GPU each' if job.scaling.use_gpu else ''})", flush=True)
    resources = {"num_gpus": 1} if job.scaling.use_gpu else {"num_cpus": job.scaling.cpus_per_worker}
    # max_calls=1: the worker process exits after its task, so no cached GPU memory of the base
    # model is left held beside the training workers
    task = ray.remote(max_calls=1, **resources)(_render_class_images)
    written = sum(ray.get([task.remote(job, model_cfg, todo[i::n]) for i in range(n)]))
    print(f"[train] {written} class image(s) written in {time.perf_counter() - t0:.1f}s", flush=True)
    return written


def _render_class_images(job: TrainJob, model_cfg, images: list) -> int:
    from rayimg.config import EngineConfig
    from rayimg.render.renderer import Renderer
    from rayimg.train.class_images import render_class_images

    storage = Storage(job.storage)
    # batched calls for throughput: each image's noise comes from its own seed either way
    engine = EngineConfig(batch_size=job.dreambooth.class_batch_size, batch_invariant=False)
    return render_class_images(Renderer(model_cfg, engine, storage), job, storage, images)


def run(job: TrainJob) -> dict:
    import ray
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from rayimg.run.cluster import connect
    from rayimg.models.loader import check_family, model_id_and_hash, resolve_model_dir

    t0 = time.perf_counter()
    job = absolute_paths(job)  # workers do not share the driver's working directory
    storage = Storage(job.storage)
    check_hardware(job)
    model_dir = resolve_model_dir(job.model, storage)
    family = check_family(job.model, model_dir)
    model_id, model_hash = model_id_and_hash(job.model, model_dir)
    class_todo = _class_images_to_generate(job, storage, model_id, model_hash)
    # the class folder may be empty until its images are generated: check the rest of the data now
    records = _records(replace(job, data=replace(job.data, class_source=None)) if class_todo else job, storage, model_id, model_hash)
    connect(job.cluster)
    name = run_name(job)
    fs, storage_path = arrow_filesystem(job.storage, job.checkpoint.storage_path)
    if fs is None:
        storage_path = str(Path(storage_path).expanduser().resolve())
    print(f"[train] {job.train.method} on {model_id} ({family}), {len(records)} item(s), "
          f"{job.scaling.num_workers} worker(s){' with GPUs' if job.scaling.use_gpu else ''}; run {name} in {job.checkpoint.storage_path}", flush=True)

    model_cfg = job.model if is_s3(job.model.pretrained) else type(job.model)(**{**job.model.__dict__, "pretrained": str(model_dir)})
    generated = 0
    if class_todo:
        generated = generate_class_images(job, model_cfg, class_todo)
        records = _records(job, storage, model_id, model_hash)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"job": job, "model_cfg": model_cfg, "model_key": f"{model_id}@{model_hash[:16]}",
                           "run_dir": join(job.checkpoint.storage_path, name)},
        scaling_config=ScalingConfig(num_workers=job.scaling.num_workers, use_gpu=job.scaling.use_gpu,
                                     resources_per_worker={"CPU": job.scaling.cpus_per_worker}),
        run_config=RunConfig(
            name=name, storage_path=storage_path, storage_filesystem=fs,
            checkpoint_config=CheckpointConfig(num_to_keep=job.checkpoint.num_to_keep),
            failure_config=FailureConfig(max_failures=job.checkpoint.max_failures),
            # Ray Train's own INFO lines (worker group started, model moved and wrapped, each
            # report and checkpoint) stay in its log files; its warnings still reach the console
            logging_config=LoggingConfig(log_level="WARNING"),
            worker_runtime_env={"env_vars": _worker_env()},
        ),
        datasets={"items": ray.data.from_items(records)},
        resume_from_checkpoint=ray.train.Checkpoint(*arrow_filesystem(job.storage, job.checkpoint.resume_from)[::-1])
        if job.checkpoint.resume_from else None,
        # explicit options: Train's default ones copy the deprecated exclude_resources and warn
        dataset_config=ray.train.DataConfig(datasets_to_split=[], execution_options=ray.data.ExecutionOptions()),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    final = result.checkpoint
    with final.as_directory() as ckpt_dir:
        summary = _publish(job, storage, Path(ckpt_dir), model_id, model_hash, family)
    summary.update(run=name, checkpoint=final.path, seconds=round(time.perf_counter() - t0, 1), metrics=result.metrics)
    if job.train.method == "dreambooth" and job.dreambooth.prior_preservation:
        summary["class_images"] = {"generated": generated, "used": sum(r.get("kind") == "class" for r in records)}
    print(f"[train] done in {summary['seconds']}s: {summary.get('uri', summary.get('model_dir'))}", flush=True)
    return summary


def _worker_env() -> dict[str, str]:
    """Environment of the training workers: Ray Train's print patch off, unless the user set it.
    The patch sends a worker's print both to stdout and to the root logger's console handler
    whenever sys.stdout is wrapped, as Ray wraps it in every worker: each line twice. Unpatched,
    a print reaches the driver once, through Ray's log forwarding."""
    return {} if "RAY_TRAIN_ENABLE_PRINT_PATCH" in os.environ else {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


def _publish(job: TrainJob, storage: Storage, ckpt_dir: Path, model_id: str, model_hash: str, family: str) -> dict:
    from rayimg.registry import publish_adapter

    export = ckpt_dir / "export"
    state = json.loads((ckpt_dir / "state.json").read_text())
    if job.train.method == "full":
        target = f"{job.publish.registry.rstrip('/')}/models/{job.publish.name}"
        storage.upload_dir(export, target)
        return {"model_dir": target, "steps": state["step"], "losses": state["losses"]}
    metadata = {
        "base_model": {"id": model_id, "hash": model_hash, "family": family},
        "method": job.train.method,
        "rank": job.lora.rank if job.train.method != "textual_inversion" else None,
        "alpha": (job.lora.alpha or job.lora.rank) if job.train.method != "textual_inversion" else None,
        "target_modules": job.lora.target_modules if job.train.method != "textual_inversion" else None,
        "trigger_word": job.publish.trigger_word or (job.textual_inversion.placeholder_token if job.train.method == "textual_inversion" else None),
        "placeholder_token": job.textual_inversion.placeholder_token if job.train.method == "textual_inversion" else None,
        "training_config": to_dict(job),
        "steps": state["step"],
    }
    uri, version = publish_adapter(storage, job.publish.registry, job.publish.name, job.publish.version, export, metadata)
    return {"uri": uri, "version": version, "steps": state["step"], "losses": state["losses"]}


# --------------------------------------------------------------------------- the workers
def train_loop(config: dict) -> None:
    import ray.data
    import ray.train
    import ray.train.torch

    from rayimg.run.cluster import quiet_driver
    from rayimg.train.loop import Loop, TorchBackend

    job: TrainJob = config["job"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    # this worker executes its dataset shard: Ray Data's progress output and notices off here too
    quiet_driver()
    # Ray Train logs each report at INFO through a logger named by its file, outside the
    # ray.train logger that LoggingConfig sets; the root logger passes it to the console
    logging.getLogger().setLevel(logging.WARNING)
    records = list(ray.train.get_dataset_shard("items").iter_rows())
    if job.deepspeed.enabled:
        backend = lambda trainee, job: DeepSpeedBackend(trainee, job, world)  # noqa: E731
    else:  # prepare_model moves the trainee to the device, and wraps it in DDP when world > 1
        backend = lambda trainee, job: TorchBackend(trainee, job, ray.train.torch.prepare_model(trainee))  # noqa: E731
    loop = Loop(job, config["model_cfg"], records, model_key=config["model_key"], rank=rank, world=world,
                device=ray.train.torch.get_device(), backend=backend, run_dir=config["run_dir"])
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            loop.load(Path(d))
        if rank == 0:
            print(f"[train] resumed at step {loop.step} from {checkpoint.path}", flush=True)

    def report(metrics: dict, checkpoint_dir: Path | None) -> None:
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None)

    loop.run(report)


class DeepSpeedBackend:
    """The loop's backend for ``deepspeed.enabled``: the engine owns precision, accumulation,
    clipping and the optimizer; its own checkpoint (``deepspeed/``, torch.save files) holds the
    (sharded) weights and optimizer. Those files are read back with ``weights_only=True``
    (:func:`_weights_only_checkpoint_engine`): tensors, plain containers and the few DeepSpeed
    data classes they hold, nothing else is unpickled."""

    amp_dtype = None  # the engine casts the module itself

    def __init__(self, trainee, job: TrainJob, world: int):
        import deepspeed

        from rayimg.train.deepspeed_config import build_deepspeed_config

        self.trainee = trainee
        self.model, self.optimizer, _, _ = deepspeed.initialize(
            model=trainee, model_parameters=trainee.trainable_parameters(), config=build_deepspeed_config(job, world))
        self.model.checkpoint_engine = _weights_only_checkpoint_engine(self.model)
        self.partitions_weights = self.model.zero_optimization_stage() == 3

    def accumulate(self, last: bool):
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.model.backward(loss)
        self.model.step()  # steps the optimizer at accumulation boundaries only

    def step(self) -> None:
        pass

    def save(self, d: Path, rank: int) -> None:
        self.model.save_checkpoint(str(d / "deepspeed"), tag="zero")

    def load(self, d: Path) -> None:
        self.model.load_checkpoint(str(d / "deepspeed"), tag="zero", load_module_strict=False)

    def final_weights(self, rank: int) -> tuple[dict[str, torch.Tensor], dict]:
        """The trainable weights (every rank joins the ZeRO-3 gather), checked equal on every rank
        before any export; the metrics carry each rank's digest."""
        import deepspeed

        params = {n: p for n, p in self.trainee.named_parameters() if p.requires_grad}
        gather = deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None) \
            if self.partitions_weights else contextlib.nullcontext()
        with gather:
            weights = {n: p.detach().cpu().clone() for n, p in params.items()}
        return weights, {"weights_sha256": _same_weights_on_every_rank(weights, rank)}


def _weights_only_checkpoint_engine(engine):
    """DeepSpeed's torch checkpoint engine with loads restricted to ``weights_only=True``, allowing
    only the DeepSpeed classes its ZeRO checkpoints hold (loss scalers, the ZeRO stage enum, bf16
    fragment addresses) besides tensors and plain containers. DeepSpeed's own engine loads with
    full unpickling, which would run any code a checkpoint file carries."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    if type(engine.checkpoint_engine) is not TorchCheckpointEngine:
        raise ValueError(f"deepspeed.enabled: checkpoint engine {type(engine.checkpoint_engine).__name__} is not supported; "
                         "rayimg loads DeepSpeed checkpoints through its torch engine with weights_only=True")
    allowed = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location=map_location, weights_only=True)

    return WeightsOnlyCheckpointEngine(engine._config)


def weights_sha256(weights: dict[str, torch.Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of ``weights`` in name order."""
    h = hashlib.sha256()
    for name in sorted(weights):
        t = weights[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _same_weights_on_every_rank(weights: dict[str, torch.Tensor], rank: int) -> list[str]:
    """Every rank's digest of the weights it would save, in rank order. Raises on every rank unless
    each rank's weights are non-empty and all digests are equal: rank 0 exports its copy, so a rank
    that trained different weights, or an empty ZeRO-3 placeholder, would otherwise go unnoticed."""
    import torch.distributed as dist

    empty = [n for n, t in weights.items() if t.numel() == 0]
    problem = "no trainable weights" if not weights else (f"{len(empty)} empty tensor(s), e.g. {empty[:3]}" if empty else None)
    mine = None if problem else weights_sha256(weights)
    digests = [mine]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        digests = [None] * dist.get_world_size()
        dist.all_gather_object(digests, mine)  # every rank gets here, also one with a problem
    if problem:
        raise RuntimeError(f"rank {rank}: the weights to save hold {problem}")
    if None in digests:
        raise RuntimeError(f"rank(s) {[r for r, d in enumerate(digests) if d is None]}: the weights to save are empty (see that rank's error)")
    if len(set(digests)) > 1:
        raise RuntimeError("the weights to save differ across ranks: " + ", ".join(f"rank {r} sha256 {d[:16]}" for r, d in enumerate(digests)))
    return digests
