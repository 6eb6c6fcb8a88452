"""The training loop, plain PyTorch: it runs in one process as it runs in each Ray Train worker.

::

    loop = Loop(job, model_cfg, records, model_key=key)   # seeds, builds trainee, data, optimizer
    loop.load(checkpoint_dir)                              # optional: resume
    loop.run(report)                                       # while step < total_steps: train_step, validate, save

Each rank draws its batches from (seed, epoch, rank) alone, so the data position is the step
count and a resumed run sees exactly the batches the uninterrupted run would have. A checkpoint
holds the trainable weights, optimizer, LR scheduler, EMA, step, losses and every rank's RNG
state, as safetensors and JSON (:mod:`rayimg.train.checkpoint`; nothing is unpickled on resume);
the final one also holds the exported adapter or model under ``export/``.

Gradients and optimizer state are the backend's business: :class:`TorchBackend` (one process,
or DDP when the caller wraps the module) lives here; the DeepSpeed one lives with the Ray wiring
(:mod:`rayimg.run.train`), the only place that imports DeepSpeed.
"""

from __future__ import annotations

import contextlib
import json
import random
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from rayimg.storage import Storage, join
from rayimg.train.batches import make_batches
from rayimg.train.checkpoint import load_state, save_state
from rayimg.train.optim import build_lr_scheduler, build_optimizer
from rayimg.train.sampler import batches_per_epoch, epoch_batches, position
from rayimg.train.tensorboard_log import TensorBoardLog

__all__ = ["Loop", "TorchBackend", "seed_all", "rng_state", "set_rng_state", "LOG_EVERY"]

LOG_EVERY = 10  # steps between progress reports that carry no checkpoint


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class TorchBackend:
    """Plain PyTorch: autocast (+ GradScaler for fp16), clipping and the optimizer step.

    ``model`` is the module the forward runs through: the trainee itself, or DDP around it
    (gradients of non-final micro-batches then stay local through ``no_sync``).

    A backend has ``model``, ``optimizer``, ``amp_dtype`` (autocast dtype of the forward, None
    for none) and ``partitions_weights`` (weights sharded across ranks: no validation images);
    ``accumulate(last)`` is the context of one micro-batch, ``backward(loss)`` and ``step()``
    train, ``save(dir, rank)`` / ``load(dir)`` keep its state in a checkpoint, and
    ``final_weights(rank)`` returns the trainable weights by name plus extra metrics.

    Its checkpoint part: ``trainable.safetensors`` (the trainable weights by name),
    ``optimizer.json`` + ``optimizer.safetensors`` and, with fp16, ``grad_scaler.json``."""

    partitions_weights = False

    def __init__(self, trainee, job, model: torch.nn.Module | None = None):
        self.trainee, self.model = trainee, model if model is not None else trainee
        self.params = trainee.trainable_parameters()
        self.optimizer = build_optimizer(trainee.param_groups(), job)  # two groups with lora.text_encoder_learning_rate
        self.max_grad_norm, self.accum = job.train.max_grad_norm, job.train.gradient_accumulation_steps
        mp = None if job.train.full_bf16 else job.train.mixed_precision
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mp)
        self.scaler = torch.amp.GradScaler(next(trainee.parameters()).device.type) if self.amp_dtype == torch.float16 else None

    def accumulate(self, last: bool):
        return contextlib.nullcontext() if last or not hasattr(self.model, "no_sync") else self.model.no_sync()

    def backward(self, loss: torch.Tensor) -> None:
        loss = loss / self.accum
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self) -> None:
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def save(self, d: Path, rank: int) -> None:
        from safetensors.torch import save_file

        if rank == 0:
            save_file(self.final_weights(rank)[0], str(d / "trainable.safetensors"))
            save_state(d, "optimizer", self.optimizer.state_dict())
            if self.scaler is not None:
                save_state(d, "grad_scaler", self.scaler.state_dict())

    def load(self, d: Path) -> None:
        from safetensors.torch import load_file

        if not (d / "trainable.safetensors").exists():
            raise FileNotFoundError(f"checkpoint {d}: no trainable.safetensors (pickled .pt checkpoints are never loaded)")
        params = dict(self.trainee.named_parameters())
        with torch.no_grad():
            for n, t in load_file(str(d / "trainable.safetensors")).items():
                params[n].copy_(t.to(params[n].device, params[n].dtype))
        self.optimizer.load_state_dict(load_state(d, "optimizer"))
        if self.scaler is not None and (d / "grad_scaler.json").exists():
            self.scaler.load_state_dict(load_state(d, "grad_scaler"))

    def final_weights(self, rank: int) -> tuple[dict[str, torch.Tensor], dict]:
        return {n: p.detach().cpu().clone() for n, p in self.trainee.named_parameters() if p.requires_grad}, {}


class Loop:
    """One rank's training: the trainee, its batches, the backend and the LR schedule.

    Args:
        model_cfg: the base model (loaded here in float32 on ``device``).
        records: item records, from the cache (``job.cache``) or the dataset's source items.
        model_key: ``<model id>@<hash prefix>``, recorded in items encoded on the fly.
        backend: ``backend(trainee, job) -> Backend``; default :class:`TorchBackend` on the
            bare trainee. The Ray wiring passes DDP or DeepSpeed here.
        run_dir: where validation images go (``<run_dir>/validation/step-NNNNNN/``).
    """

    def __init__(self, job, model_cfg, records: list[dict], *, model_key: str, rank: int = 0, world: int = 1,
                 device: torch.device = torch.device("cpu"), backend: Callable | None = None, run_dir: str = ""):
        from rayimg.models.loader import load_model
        from rayimg.train.trainee import build_trainee, compile_unet

        self.job, self.rank, self.world, self.device, self.run_dir = job, rank, world, device, run_dir
        seed_all(job.train.seed * 1000 + rank)
        self.storage = Storage(job.storage)
        cfg = type(model_cfg)(**{**model_cfg.__dict__, "device": device.type, "dtype": "float32"})
        self.loaded = load_model(cfg, self.storage)
        full_bf16 = job.train.full_bf16
        self.trainee = build_trainee(self.loaded, job, trainable_dtype=torch.bfloat16 if full_bf16 else torch.float32,
                                     autocast=not full_bf16)
        compile_unet(self.trainee.unet, job.train.compile)  # in place: parameter names and exports are unchanged
        self.data = make_batches(job, records, self.storage, self.loaded.family, model_key,
                                 use_embeddings=not self.trainee.train_text_encoders)
        self.buckets = self.data.buckets()
        self.per_epoch = batches_per_epoch(self.buckets, job.train.batch_size, world)
        self.accum = job.train.gradient_accumulation_steps
        if job.train.max_steps is not None:
            self.total_steps = job.train.max_steps
        else:
            self.total_steps = max(1, self.per_epoch * job.train.num_epochs // self.accum)
        self.backend = (backend or TorchBackend)(self.trainee, job)
        self.lr_scheduler = build_lr_scheduler(self.backend.optimizer, job, self.total_steps)
        self.step, self.losses = 0, []
        self.started, self.start_step = time.perf_counter(), 0  # for the ETA; run() sets them when it starts
        self.images = 0  # images seen by this rank since the last progress report
        # DreamBooth prior preservation: (prior loss sum, class rows, instance loss sum, instance
        # rows) over every rank since the last report, for the mean prior and instance losses
        self.loss_parts = torch.zeros(4, dtype=torch.float64)
        self.board = TensorBoardLog(self.storage, run_dir) if rank == 0 and run_dir else None

    # ------------------------------------------------------------------ one optimizer step
    def train_step(self) -> float:
        """Forward and backward over ``gradient_accumulation_steps`` micro-batches, one optimizer
        and LR step; returns the step's loss averaged over micro-batches and ranks."""
        job, backend, amp = self.job, self.backend, self.backend.amp_dtype
        micro_losses, parts = [], torch.zeros(4, dtype=torch.float64)
        for micro in range(self.accum):
            epoch, index = position(self.step * self.accum + micro, self.per_epoch)
            indices = epoch_batches(self.buckets, job.train.batch_size, job.train.seed, epoch, self.rank, self.world)[index]
            batch = self.data.batch(indices, self.device)
            with backend.accumulate(last=micro == self.accum - 1):
                with torch.autocast(self.device.type, dtype=amp, enabled=amp is not None):
                    out = backend.model(batch)
                    loss = out["loss"]
                backend.backward(loss)
            micro_losses.append(loss.detach().float())
            if "prior_loss" in out:
                n_class = int(batch["is_class"].sum())
                n_instance = len(indices) - n_class
                parts += torch.tensor([float(out["prior_loss"]) * n_class, n_class, float(out["instance_loss"]) * n_instance, n_instance],
                                      dtype=torch.float64)
            self.images += len(indices)
        backend.step()
        self.lr_scheduler.step()
        self.trainee.after_optimizer_step()
        if self.trainee.has_ema:
            self.trainee.ema_step()
        self.step += 1
        step_loss = torch.stack(micro_losses).mean()
        if self.world > 1:
            import torch.distributed as dist

            # gloo has no AVG
            dist.all_reduce(step_loss, op=dist.ReduceOp.AVG if self.device.type == "cuda" else dist.ReduceOp.SUM)
            if self.device.type != "cuda":
                step_loss /= self.world
            if self.trainee.prior_preservation:  # the same on every rank, so every rank joins
                reduced = parts.to(self.device, torch.float32)
                dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
                parts = reduced.cpu().double()
        self.losses.append(float(step_loss))
        self.loss_parts += parts
        if self.board is not None:
            self.board.scalars(self.step, {"train/loss": self.losses[-1], "train/lr": self.lr_scheduler.get_last_lr()[0],
                                           **{f"train/{k}": v for k, v in self._mean_parts(parts).items()}})
        return self.losses[-1]

    @staticmethod
    def _mean_parts(parts: torch.Tensor) -> dict[str, float]:
        """Mean prior and instance losses from (sum, rows, sum, rows); a loss without rows is left out."""
        out = {}
        if parts[1] > 0:
            out["prior_loss"] = float(parts[0] / parts[1])
        if parts[3] > 0:
            out["instance_loss"] = float(parts[2] / parts[3])
        return out

    def _take_loss_parts(self) -> dict[str, float]:
        """The mean prior and instance losses since the last report (empty without prior preservation)."""
        out = self._mean_parts(self.loss_parts)
        self.loss_parts.zero_()
        return out

    # ------------------------------------------------------------------ the loop
    def run(self, report: Callable[[dict, Path | None], None] = lambda metrics, checkpoint: None) -> None:
        """Train to ``total_steps``. ``report(metrics, checkpoint_dir)`` gets every checkpoint
        (a temporary dir, gone after the call) and, every ``LOG_EVERY`` steps, progress (dir None).
        Rank 0 prints one progress line at each report."""
        val, every = self.job.validation, self.job.checkpoint.every_n_steps
        self.started, self.start_step = time.perf_counter(), self.step
        t_last = self.started
        self.backend.model.train()
        while self.step < self.total_steps:
            self.train_step()
            last = self.step == self.total_steps
            if self.rank == 0 and val.prompts and val.every_n_steps and (self.step % val.every_n_steps == 0 or last):
                self.validate()
            if self.step % every == 0 or last:
                now = time.perf_counter()
                progress = self.progress(self.images * self.world / (now - t_last))
                t_last, self.images = now, 0
                with tempfile.TemporaryDirectory() as tmp:
                    report({**progress, **self.save(Path(tmp), final=last)}, Path(tmp))
                if self.board is not None:
                    self.board.flush()
            elif self.step % LOG_EVERY == 0:
                now = time.perf_counter()
                report(self.progress(self.images * self.world / (now - t_last)), None)
                t_last, self.images = now, 0
        if self.rank == 0:
            self.write_pictures()

    def progress(self, images_per_s: float) -> dict:
        """The metrics of a report (loss, prior and instance losses since the last report, lr,
        images/s); rank 0 also prints them as one line with the steps done and the ETA."""
        m = {"step": self.step, "loss": self.losses[-1], **self._take_loss_parts(), "lr": self.lr_scheduler.get_last_lr()[0],
             "images_per_s": round(images_per_s, 3)}
        if self.device.type == "cuda":
            m["gpu_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        if self.board is not None:
            self.board.scalars(self.step, {"train/images_per_s": images_per_s})
        if self.rank == 0:
            # the ETA from the steps timed in this process (not a resumed run's earlier ones)
            done = self.step - self.start_step
            eta = (time.perf_counter() - self.started) / done * (self.total_steps - self.step) if done else 0.0
            prior = f", prior loss {m['prior_loss']:.4f}" if "prior_loss" in m else ""
            gpu = f", {m['gpu_mem_gb']} GB GPU memory" if "gpu_mem_gb" in m else ""
            print(f"[train] step {self.step}: loss {m['loss']:.4f}{prior}, lr {m['lr']:.2e}, {m['images_per_s']} images/s{gpu}; "
                  f"{self.step}/{self.total_steps} steps ({100 * self.step // self.total_steps}%), ETA {eta:.0f}s", flush=True)
        return m

    # ------------------------------------------------------------------ checkpoint state in and out
    def save(self, d: Path, final: bool = False) -> dict:
        """Write this rank's part of a checkpoint into ``d`` (every rank calls it); with ``final``
        rank 0 also exports the trained adapter or model into ``d/export``. Returns the metrics."""
        from rayimg.train.export import export_trained

        save_state(d, f"rng_rank{self.rank}", rng_state())
        self.backend.save(d, self.rank)
        weights, metrics = self.backend.final_weights(self.rank) if final else (None, {})  # a collective under ZeRO-3
        if self.rank == 0:
            save_state(d, "lr_scheduler", self.lr_scheduler.state_dict())
            if self.trainee.has_ema:
                save_state(d, "ema", self.trainee.ema_state_dict())
            epoch, index = position(self.step * self.accum, self.per_epoch)
            # the data position follows from the step; epoch and batch are recorded for people
            (d / "state.json").write_text(json.dumps({
                "step": self.step, "losses": self.losses,
                "data_position": {"micro_batches": self.step * self.accum, "epoch": epoch, "batch_in_epoch": index}}))
            if final:
                export_trained(d / "export", self.job, self.trainee, self.loaded, weights)
        return {"step": self.step, "loss": self.losses[-1], "lr": self.lr_scheduler.get_last_lr()[0], **metrics}

    def load(self, d: Path) -> None:
        """Resume from checkpoint dir ``d``: weights, optimizer, schedule, EMA, RNG, step, losses."""
        self.backend.load(d)
        self.lr_scheduler.load_state_dict(load_state(d, "lr_scheduler"))
        if (d / "ema.json").exists():
            self.trainee.load_ema_state_dict(load_state(d, "ema"))
        if (d / f"rng_rank{self.rank}.json").exists():  # absent when resuming with more ranks than saved
            set_rng_state(load_state(d, f"rng_rank{self.rank}"))
        state = json.loads((d / "state.json").read_text())
        self.step, self.losses = state["step"], state["losses"]

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Render ``validation.prompts`` with the weights as they are now, into
        ``<run_dir>/validation/step-NNNNNN/``."""
        from rayimg.render.output import png_bytes

        if self.backend.partitions_weights:
            print(f"[train] step {self.step}: validation images skipped under ZeRO-3 (weights are partitioned)", flush=True)
            return
        val, pipe, amp = self.job.validation, self.loaded.pipeline, self.backend.amp_dtype
        out = join(self.run_dir, "validation", f"step-{self.step:06d}")
        was_training = pipe.unet.training
        pipe.unet.eval()
        pipe.set_progress_bar_config(disable=True)
        try:
            with torch.no_grad(), torch.autocast(self.device.type, dtype=amp, enabled=amp is not None):
                for i, prompt in enumerate(val.prompts):
                    gen = torch.Generator("cpu").manual_seed(val.seed + i)
                    image = pipe(prompt, num_inference_steps=val.num_inference_steps, width=self.job.train.resolution,
                                 height=self.job.train.resolution, generator=gen).images[0]
                    meta = {"prompt": prompt, "step": self.step, "seed": val.seed + i}
                    self.storage.write_bytes(join(out, f"{i:02d}.png"), png_bytes(image, meta))
                    if self.board is not None:
                        self.board.image(f"validation/{i:02d}", image, self.step)
        finally:
            pipe.unet.train(was_training)
        print(f"[train] step {self.step}: {len(val.prompts)} validation image(s) in {out}", flush=True)

    # ------------------------------------------------------------------ pictures at the end
    def write_pictures(self) -> None:
        """Rank 0, after the last step: ``<run_dir>/loss.png`` (every step's loss, a resumed run's
        earlier steps included), ``<run_dir>/validation_grid.png`` (each validation step's
        images, one column per prompt) and the TensorBoard files' last flush."""
        from rayimg.render.output import png_bytes
        from rayimg.train.plots import loss_plot, validation_grid

        if not self.run_dir:
            return
        if self.board is not None:
            self.board.close()
            self.board = None
        name = self.job.publish.name
        self.storage.write_bytes(join(self.run_dir, "loss.png"), png_bytes(loss_plot(self.losses, title=name), {"steps": self.step}))
        rows = self._validation_rows()
        if rows:
            grid = validation_grid(rows, self.job.validation.prompts, title=f"{name}: validation images by step")
            self.storage.write_bytes(join(self.run_dir, "validation_grid.png"), png_bytes(grid, {"steps": [s for s, _ in rows]}))
        print(f"[train] pictures: {join(self.run_dir, 'loss.png')}" + (", validation_grid.png" if rows else "")
              + f", TensorBoard events in {join(self.run_dir, 'tensorboard')}", flush=True)

    def _validation_rows(self, max_rows: int = 8) -> list[tuple[int, list]]:
        """(step, images by prompt index) of the validation steps on storage, at most ``max_rows``
        of them spread over the run (the last always)."""
        import io
        import re

        from PIL import Image

        prompts = self.job.validation.prompts
        if not prompts:
            return []
        steps = sorted({int(m.group(1)) for uri in self.storage.list(join(self.run_dir, "validation"))
                        if (m := re.search(r"step-(\d+)/\d+\.png$", uri))})
        if len(steps) > max_rows:
            steps = [steps[round(i * (len(steps) - 1) / (max_rows - 1))] for i in range(max_rows)]
        rows = []
        for step in steps:
            images = []
            for i in range(len(prompts)):
                uri = join(self.run_dir, "validation", f"step-{step:06d}", f"{i:02d}.png")
                images.append(Image.open(io.BytesIO(self.storage.read_bytes(uri))).convert("RGB") if self.storage.exists(uri) else None)
            rows.append((step, images))
        return rows
