"""Training-step throughput of the real-size SDXL UNet (random init) at 1024², from cached latents.

Times OUR step — the one ``rayimg/run/train.py``'s worker loop runs: ``build_trainee`` +
``build_optimizer`` + ``build_lr_scheduler``, batches drawn by ``epoch_batches`` from
``CachedBatches`` (CPU shard tensors -> device), ``torch.autocast`` forward of the Trainee,
backward, ``clip_grad_norm_``, optimizer/scheduler steps, ``after_optimizer_step`` and the
per-step ``float(loss)``. The data are synthetic cache rows: bf16 latents 4×128×128,
prompt_embeds 77×2048, pooled 1280, time_ids (1024, 1024, 0, 0, 1024, 1024).

Configurations (one RESULT line each — full JSON with ``--json-lines`` — a table at the end, and
``$OUT/train_bench.json`` rewritten after every row):

- ``lora``            train.py as it is (fp32 LoRA params under bf16 autocast, fused AdamW);
- ``lora+bf16``       LoRA params kept in bf16 (``build_trainee(trainable_dtype=torch.bfloat16)``);
- ``lora+bf16+<opt>`` one speed option at a time on top of it: ``tf32``, ``cudnn_benchmark``,
                      ``channels_last``, ``cudnn_sdpa`` (cuDNN attention first, flash as fallback);
- ``lora+best``       bf16 plus every option that gained > 1 % alone;
- ``full``            full fine-tune with gradient checkpointing (fp32 master weights, as train.py
                      loads them; AdamW fused, and AdamW8bit when bitsandbytes is installed);
                      ``full+best`` with the LoRA-best options;
- ``--compile full|regional`` (last; cold compile takes minutes): ``lora+best`` with
  ``rayimg.train.trainee.compile_unet``: ``full`` (whole UNet) or ``regional`` (each transformer/ResNet block and sampler).

Real size, the Trainee gets the published SDXL text encoders (random init, bf16): CachedBatches
puts the captions in every batch and the Trainee encodes captions when present, so train.py runs
both text encoders every step even with cached embeddings. The bench times that as it is, notes
it (``notes.uses_cached_embeddings``) and adds a what-if row ``lora+best+cached_embeds`` with the
captions dropped from the batch (excluded from the comparison with the reference).

Fused QKV projections are checked first on the tiny SDXL UNet: with LoRA on to_q/to_k/to_v the
fused processor bypasses the LoRA'd projections (the output changes), so that config is skipped
with the evidence recorded.

FLOPs per image are measured, not assumed: ``FlopCounterMode`` over one batch-1 forward+backward
of the same Trainee (model FLOPs with gradient checkpointing off; recompute counted separately
as hardware FLOPs). MFU = images/s × model FLOPs per image / peak (989 TFLOP/s: H100 dense bf16).

    python bench/train_bench.py --batch 1,8,16 --methods lora,full          # GPU, ~3 min
    python bench/train_bench.py --compile-only full                          # GPU, compile run (reads $OUT/train_bench.json)
    python bench/train_bench.py --tiny --device cpu --batch 1,2 --steps 2    # CPU smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

PEAK_TFLOPS_H100_BF16 = 989.0
SPEED_OPTIONS = ("tf32", "cudnn_benchmark", "channels_last", "cudnn_sdpa")
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[bench {time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


# --------------------------------------------------------------------------- model and data
def make_job(method: str, batch: int, *, rank: int, grad_ckpt: bool, optimizer: str = "adamw"):
    from rayimg.config import TrainJob

    job = TrainJob()
    job.cache = "synthetic"
    job.train.method = method
    job.train.batch_size = batch
    job.train.mixed_precision = "bf16"
    job.train.gradient_checkpointing = grad_ckpt
    job.train.optimizer = optimizer
    job.train.max_steps = 1000
    job.lora.rank = rank
    job.lora.target_modules = list(LORA_TARGETS)
    return job


def build_unet(args, dtype: torch.dtype, device: torch.device):
    torch.manual_seed(0)
    if args.tiny:
        from rayimg.models.tiny import build_tiny_sdxl

        return torch.nn.Module.to(build_tiny_sdxl(seed=0).unet, device=device, dtype=dtype)
    from rayimg.models.real_size import build_sdxl_unet

    return build_sdxl_unet(dtype=dtype, device=device)


def make_loaded(args, unet, device: torch.device, dtype: torch.dtype):
    """A LoadedModel around ``unet``. Real size: the published SDXL text encoders (random init, bf16)
    with the repo's CLIP tokenizers, because train.py's batches carry captions and the Trainee
    encodes them when present; the tiny SDXL's VAE (unused: the batches carry cached latents)
    and scheduler. ``--tiny``: the whole tiny SDXL."""
    from diffusers import StableDiffusionXLPipeline

    from rayimg.models.loader import LoadedModel
    from rayimg.models.tiny import build_tiny_sdxl

    tiny = build_tiny_sdxl(seed=0)
    text_encoder, text_encoder_2 = tiny.text_encoder, tiny.text_encoder_2
    if not args.tiny:
        from rayimg.models.real_size import build_sdxl_text_encoders

        torch.manual_seed(1)
        text_encoder, text_encoder_2 = build_sdxl_text_encoders(dtype=torch.bfloat16, device=device)
    pipe = StableDiffusionXLPipeline(
        vae=tiny.vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tiny.tokenizer,
        tokenizer_2=tiny.tokenizer_2, unet=unet, scheduler=tiny.scheduler, add_watermarker=False,
    )
    return LoadedModel(pipeline=pipe, family="sdxl", model_dir=Path("."), model_id="sdxl-random-init",
                       model_hash="0" * 64, device=device, dtype=dtype)


def unet_dims(unet, resolution: int) -> dict:
    cfg = unet.config
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    side = resolution // 8  # the SDXL VAE's latents are 1/8 of the image side
    return {"latent": (cfg.in_channels, side, side),
            "embed": (77, cfg.cross_attention_dim), "pooled": pooled}


def synthetic_cache(dims: dict, items: int, resolution: int):
    """(records, shard tensors) shaped like a prepared cache (``rayimg prepare`` in bf16)."""
    g = torch.Generator().manual_seed(1234)
    c, h, w = dims["latent"]
    shard = {
        "latents": torch.randn(items, c, h, w, generator=g).to(torch.bfloat16),
        "prompt_embeds": torch.randn(items, *dims["embed"], generator=g).to(torch.bfloat16),
        "pooled_prompt_embeds": torch.randn(items, dims["pooled"], generator=g).to(torch.bfloat16),
    }
    records = [{"shard": "s0", "index": i, "width": resolution, "height": resolution, "caption": f"synthetic {i}",
                "kind": "instance", "original_size": [resolution, resolution], "crop_top_left": [0, 0],
                "target_size": [resolution, resolution]} for i in range(items)]
    return records, shard


# --------------------------------------------------------------------------- the step (train.py's)
class Runner:
    """Trainee + optimizer + scheduler + batches, stepping exactly as train.py's worker loop."""

    def __init__(self, args, method: str, *, trainable_dtype: torch.dtype, optimizer: str = "adamw", batch: int = 1,
                 full_bf16: bool = False):
        from rayimg.train.optim import build_lr_scheduler, build_optimizer
        from rayimg.train.trainee import build_trainee

        self.args = args
        self.device = torch.device(args.device)
        self.method = method
        grad_ckpt = method == "full"
        # train.py loads the model in float32; build_trainee casts the frozen UNet to bf16 for LoRA
        # and keeps float32 (master) weights for a full fine-tune. Build straight in that dtype.
        unet_dtype = torch.bfloat16 if method == "lora" else torch.float32
        self.job = make_job(method, batch, rank=args.rank, grad_ckpt=grad_ckpt, optimizer=optimizer)
        unet = build_unet(args, unet_dtype, self.device)
        self.dims = unet_dims(unet, args.resolution)
        loaded = make_loaded(args, unet, self.device, unet_dtype)
        torch.manual_seed(0)
        # full_bf16 (train.full_bf16): bf16 LoRA params and no autocast anywhere, as train.py runs it
        self.trainee = build_trainee(loaded, self.job, trainable_dtype=trainable_dtype, autocast=not full_bf16)
        self.trainee.to(self.device)  # ray.train.torch.prepare_model(trainee) with one worker
        self.params = self.trainee.trainable_parameters()
        self.optimizer = build_optimizer(self.params, self.job)
        self.lr_scheduler = build_lr_scheduler(self.optimizer, self.job, self.job.train.max_steps)
        self.model = self.trainee
        self.amp_dtype = torch.bfloat16
        self.use_amp = not full_bf16
        self.step_no = 0
        self.losses: list[float] = []
        self.trainable = sum(p.numel() for p in self.params)
        self.attn_processor = type(next(iter(self.trainee.unet.attn_processors.values()))).__name__
        self.fused_optimizer = bool(self.optimizer.defaults.get("fused")) if hasattr(self.optimizer, "defaults") else None
        self._data_for: dict[int, tuple] = {}
        self.drop_captions = False  # True only for the 'cached embeddings' what-if config

    def uses_cached_embeddings(self) -> bool:
        """Does the Trainee use the batch's cached prompt embeddings (rather than encoding the
        captions CachedBatches also puts in every batch)?"""
        data, _, _ = self.data(1)
        batch = data.batch([0], self.device)
        try:
            with torch.no_grad(), torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.use_amp):
                cond = self.trainee._conditioning(batch, 1, self.device)
        except Exception:  # noqa: BLE001 - a private method; its absence only loses this note
            return None
        return cond["prompt_embeds"].data_ptr() == batch["prompt_embeds"].data_ptr()

    def data(self, batch: int):
        from rayimg.train.batches import CachedBatches
        from rayimg.train.sampler import batches_per_epoch

        if batch not in self._data_for:
            items = max(64, 4 * batch)
            records, shard = synthetic_cache(self.dims, items, self.args.resolution)
            data = CachedBatches(records, lambda sid: shard, "sdxl")
            buckets = data.buckets()
            self._data_for[batch] = (data, buckets, batches_per_epoch(buckets, batch, 1))
        return self._data_for[batch]

    def step(self, batch_size: int) -> float:
        """One optimizer step, the code of train.py's ``while step < total_steps`` body (one
        worker: no DDP/no_sync, no DeepSpeed, bf16 so no GradScaler; no checkpoint/validation)."""
        from rayimg.train.sampler import epoch_batches, position

        job, device = self.job, self.device
        data, buckets, per_epoch = self.data(batch_size)
        accum = job.train.gradient_accumulation_steps
        micro_losses = []
        for micro in range(accum):
            epoch, bi = position(self.step_no * accum + micro, per_epoch)
            indices = epoch_batches(buckets, batch_size, job.train.seed, epoch, 0, 1)[bi]
            batch = data.batch(indices, device)
            if self.drop_captions:
                batch.pop("captions", None)
            with torch.autocast(device.type, dtype=self.amp_dtype, enabled=self.use_amp):
                out = self.model(batch)
            loss = out["loss"]
            scaled = loss / accum
            scaled.backward()
            micro_losses.append(loss.detach().float())
        if job.train.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, job.train.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.lr_scheduler.step()
        self.trainee.after_optimizer_step()
        self.step_no += 1
        step_loss = torch.stack(micro_losses).mean()
        self.losses.append(float(step_loss))
        return self.losses[-1]

    def probe_loss(self, batch_size: int = 2) -> float:
        """The loss of a fixed batch with fixed noise and timesteps, weights unchanged (forward
        only, grad mode on so a compiled UNet reuses its training graph): run with and without a
        speed option to show it keeps the math."""
        data, _, _ = self.data(batch_size)
        batch = data.batch(list(range(batch_size)), self.device)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(4321)
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.use_amp):
                loss = self.model(batch)["loss"]
            return float(loss.detach())

    def count_flops(self, *, grad_ckpt: bool | None = None) -> float:
        """FLOPs of one batch-1 forward+backward of the Trainee (no optimizer step: its FLOPs are
        negligible), with gradient checkpointing forced on/off when ``grad_ckpt`` is given."""
        from torch.utils.flop_counter import FlopCounterMode

        unet = self.trainee.unet
        was = getattr(unet, "is_gradient_checkpointing", None)
        if grad_ckpt is not None and was is not None and grad_ckpt != was:
            unet.enable_gradient_checkpointing() if grad_ckpt else unet.disable_gradient_checkpointing()
        data, buckets, per_epoch = self.data(1)
        batch = data.batch([0], self.device)
        counter = FlopCounterMode(display=False)
        try:
            with counter:
                with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.use_amp):
                    loss = self.model(batch)["loss"]
                loss.backward()
        finally:
            self.optimizer.zero_grad(set_to_none=True)
            if grad_ckpt is not None and was is not None and grad_ckpt != was:
                unet.enable_gradient_checkpointing() if was else unet.disable_gradient_checkpointing()
        return float(counter.get_total_flops())


# --------------------------------------------------------------------------- speed options
@contextlib.contextmanager
def speed_options(runner: Runner, options) -> None:
    """Apply speed options that keep the math; restore everything afterwards."""
    options = set(options)
    unknown = options - set(SPEED_OPTIONS)
    if unknown:
        raise ValueError(f"unknown speed option(s) {sorted(unknown)}; known: {SPEED_OPTIONS}")
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    unet = runner.trainee.unet
    stack = contextlib.ExitStack()
    try:
        if "tf32" in options:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if "cudnn_benchmark" in options:
            torch.backends.cudnn.benchmark = True
        if "channels_last" in options:
            torch.nn.Module.to(unet, memory_format=torch.channels_last)
        if "cudnn_sdpa" in options:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            backends = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
            try:
                stack.enter_context(sdpa_kernel(backends, set_priority=True))
            except TypeError:  # older torch: no priorities; cuDNN alone
                stack.enter_context(sdpa_kernel([SDPBackend.CUDNN_ATTENTION]))
        with stack:
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = saved
        if "channels_last" in options:
            torch.nn.Module.to(unet, memory_format=torch.contiguous_format)


# --------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def time_steps(runner: Runner, batch: int, warmup: int, steps: int) -> dict:
    """``warmup`` steps, then ``steps`` timed ones (each ends in train.py's ``float(loss)``, a sync)."""
    device = runner.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(100 + batch)
    step_times = []
    for i in range(warmup + steps):
        if i == warmup:
            sync(device)
            t0 = time.perf_counter()
        t = time.perf_counter()
        runner.step(batch)
        step_times.append(time.perf_counter() - t)
    sync(device)
    measured = time.perf_counter() - t0
    timed = sorted(step_times[warmup:])
    losses = runner.losses[-(warmup + steps):]
    out = {
        "images_per_s": batch * steps / measured,
        "step_s": measured / steps,
        "step_s_median": timed[len(timed) // 2],
        "first_step_s": step_times[0],
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "finite": all(math.isfinite(x) for x in losses),
    }
    if device.type == "cuda":
        out["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        out["peak_reserved_gb"] = torch.cuda.max_memory_reserved(device) / 2**30
    return out


class Bench:
    def __init__(self, args):
        self.args = args
        self.results: list[dict] = []
        self.flops: dict[str, dict] = {}
        self.notes: dict[str, object] = {}
        self.out_path = Path(args.out) / args.json_name if args.out else None
        self.peak = args.peak_tflops * 1e12 if torch.device(args.device).type == "cuda" else None

    def over_budget(self) -> bool:
        return self.args.budget_s is not None and time.perf_counter() - T0 > self.args.budget_s

    def record(self, row: dict) -> None:
        flops = self.flops.get(row.get("method"), {})
        if row.get("status") == "ok":
            ips = row["images_per_s"]
            if flops.get("model"):
                row["model_tflop_per_image"] = flops["model"] / 1e12
                row["achieved_tflops"] = ips * flops["model"] / 1e12
                if self.peak:
                    row["mfu"] = ips * flops["model"] / self.peak
            if flops.get("hardware") and flops["hardware"] != flops.get("model") and self.peak:
                row["hfu"] = ips * flops["hardware"] / self.peak
        clean = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}
        self.results.append(clean)
        if self.args.json_lines:
            print("RESULT " + json.dumps(clean), flush=True)
        else:
            mfu = f" mfu {clean['mfu']:.1%}" if isinstance(clean.get("mfu"), float) else ""
            ips = f" {clean['images_per_s']:.2f} images/s, step {clean['step_s']:.3f}s" if "images_per_s" in clean else ""
            mem = f", peak {clean['peak_mem_gb']:.1f} GiB" if "peak_mem_gb" in clean else ""
            check = f", math rel diff {clean['math_check'].get('rel_diff', float('nan')):.1e}" if isinstance(clean.get("math_check"), dict) and "rel_diff" in clean["math_check"] else ""
            print(f"RESULT {clean.get('config')} batch {clean.get('batch')}: {clean.get('status')}{ips}{mem}{mfu}{check}", flush=True)
        self.write()

    def write(self) -> None:
        if not self.out_path:
            return
        self.out_path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"env": environment(self.args), "flops_per_image": self.flops, "notes": self.notes, "results": self.results}
        tmp = self.out_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(payload, indent=2))
        tmp.replace(self.out_path)

    def run(self, runner: Runner, config: str, batches, options=(), extra: dict | None = None) -> list[dict]:
        rows = []
        for batch in batches:
            row = {"config": config, "method": runner.method, "batch": batch, "options": sorted(options),
                   "trainable_params": runner.trainable, "trainable_dtype": str(runner.params[0].dtype).replace("torch.", ""),
                   "attn_processor": runner.attn_processor, "fused_adamw": runner.fused_optimizer, **(extra or {})}
            if self.over_budget():
                row["status"] = "skipped: time budget"
                self.record(row)
                continue
            try:
                if options and batch == batches[0] and "math_check" not in row:
                    plain = runner.probe_loss()
                    with speed_options(runner, options):
                        with_options = runner.probe_loss()
                    row["math_check"] = {"probe_loss_plain": plain, "probe_loss_with_options": with_options,
                                         "rel_diff": abs(with_options - plain) / max(abs(plain), 1e-12)}
                with speed_options(runner, options):
                    row.update(time_steps(runner, batch, self.args.warmup, self.args.steps))
                row["status"] = "ok"
            except Exception as e:  # noqa: BLE001 - one failed config must not end the run
                runner.optimizer.zero_grad(set_to_none=True)
                row["status"] = "oom" if is_oom(e) else f"error: {type(e).__name__}: {str(e)[:300]}"
                if not is_oom(e):
                    traceback.print_exc()
            free_memory()
            self.record(row)
            rows.append(row)
        return rows

    def measure_flops(self, runner: Runner, key: str) -> None:
        if key in self.flops:
            return
        t = time.perf_counter()
        entry = {}
        try:
            entry["model"] = runner.count_flops(grad_ckpt=False)
            if runner.method == "full":
                entry["hardware"] = runner.count_flops(grad_ckpt=True)
            else:
                entry["hardware"] = entry["model"]
        except Exception as e:  # noqa: BLE001
            entry["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            runner.optimizer.zero_grad(set_to_none=True)
        entry["seconds"] = round(time.perf_counter() - t, 1)
        free_memory()
        self.flops[key] = entry
        log(f"FLOPs per image ({key}, batch-1 forward+backward): "
            + ", ".join(f"{k} {v / 1e12:.2f} TFLOP" for k, v in entry.items() if k in ("model", "hardware")))


def environment(args) -> dict:
    import diffusers
    import peft

    env = {"torch": torch.__version__, "diffusers": diffusers.__version__, "peft": peft.__version__,
           "device": args.device, "tiny": args.tiny, "resolution": args.resolution, "rank": args.rank,
           "lora_targets": LORA_TARGETS, "warmup": args.warmup, "steps": args.steps,
           "peak_tflops": args.peak_tflops, "seconds": round(time.perf_counter() - T0, 1)}
    if torch.device(args.device).type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


# --------------------------------------------------------------------------- fused QKV check
def check_fused_qkv() -> dict:
    """Does ``unet.fuse_qkv_projections()`` keep LoRA on to_q/to_k/to_v? Tiny SDXL UNet, CPU:
    count LoRA calls on to_q and compare the outputs before and after fusing."""
    from peft import LoraConfig

    from rayimg.models.tiny import build_tiny_sdxl

    torch.manual_seed(0)
    unet = build_tiny_sdxl(seed=0).unet
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=LORA_TARGETS))
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    calls = [0]
    for name, module in unet.named_modules():
        if name.endswith("to_q.lora_A.default"):
            module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    dims = unet_dims(unet, 64)
    x = torch.randn(1, *dims["latent"])
    kw = dict(encoder_hidden_states=torch.randn(1, *dims["embed"]),
              added_cond_kwargs={"text_embeds": torch.randn(1, dims["pooled"]), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])})
    t = torch.tensor([500])
    with torch.no_grad():
        before = unet(x, t, **kw).sample
        calls_before, calls[0] = calls[0], 0
        try:
            unet.fuse_qkv_projections()
        except Exception as e:  # noqa: BLE001
            return {"compatible": False, "reason": f"fuse_qkv_projections failed with LoRA: {type(e).__name__}: {e}"}
        after = unet(x, t, **kw).sample
    diff = (before - after).abs().max().item()
    compatible = calls[0] == calls_before and diff < 1e-4
    return {"compatible": compatible, "lora_to_q_calls_before": calls_before, "lora_to_q_calls_after": calls[0],
            "max_abs_output_change": diff,
            "reason": None if compatible else "the fused to_qkv/to_kv projections bypass the LoRA layers on to_q/to_k/to_v "
                                              "(fewer LoRA calls, different output): not the same math; skipped"}


# --------------------------------------------------------------------------- main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="the tiny SDXL UNet (CPU smoke test) instead of the real-size one")
    ap.add_argument("--resolution", type=int, default=None, help="image side; default 1024 (64 with --tiny)")
    ap.add_argument("--batch", default="1,8,16", help="batch sizes of the 'lora+best' sweep (and of 'lora' unless --asis-batch)")
    ap.add_argument("--asis-batch", default=None, help="batch sizes of the 'lora' (train.py as it is) sweep; default --batch")
    ap.add_argument("--option-batch", type=int, default=None, help="batch of the one-option runs (default: 8, or the largest --batch below 8)")
    ap.add_argument("--full-batch", default="8", help="batch sizes of the full fine-tune")
    ap.add_argument("--methods", default="lora", help="comma list of lora, full")
    ap.add_argument("--options", default=",".join(SPEED_OPTIONS), help="speed options tried one at a time (empty: none)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10, help="measured steps")
    ap.add_argument("--compile", choices=["none", "full", "regional"], default="none",
                    help="after everything else: time lora+best with torch.compile (cold compile: minutes)")
    ap.add_argument("--compile-only", choices=["full", "regional"], default=None,
                    help="run only the compile configuration (with --best-options, else bf16 + all options)")
    ap.add_argument("--compile-batch", type=int, default=None, help="batch of the compile run (default: best eager batch, else 8)")
    ap.add_argument("--best-options", default=None, help="comma list: skip the option search, use these for lora+best")
    ap.add_argument("--best-from", default=None,
                    help="--compile-only: take the best options and batch from this train_bench.json (default $OUT/train_bench.json if present)")
    ap.add_argument("--full-bf16", type=lambda v: v.lower() in ("1", "true", "yes"), default=None,
                    help="--compile-only: bf16 everywhere without autocast (default: whatever was faster in train_bench.json)")
    ap.add_argument("--json-lines", action="store_true", help="print each result as a full JSON line")
    ap.add_argument("--peak-tflops", type=float, default=PEAK_TFLOPS_H100_BF16)
    ap.add_argument("--budget-s", type=float, default=None, help="skip configurations that would start after this many seconds")
    ap.add_argument("--out", default=os.environ.get("OUT"), help="folder for the JSON (default $OUT)")
    ap.add_argument("--json-name", default=None)
    args = ap.parse_args(argv)
    args.batches = [int(b) for b in args.batch.split(",") if b.strip()]
    args.asis_batches = [int(b) for b in (args.asis_batch or args.batch).split(",") if b.strip()]
    args.full_batches = [int(b) for b in args.full_batch.split(",") if b.strip()]
    args.method_list = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.option_list = [o.strip() for o in args.options.split(",") if o.strip()]
    if args.resolution is None:
        args.resolution = 64 if args.tiny else 1024
    if args.option_batch is None:
        below = [b for b in args.batches if b <= 8]
        args.option_batch = 8 if 8 in args.batches or not below else max(below)
    if args.json_name is None:
        args.json_name = "train_bench_compile.json" if args.compile_only else "train_bench.json"
    for m in args.method_list:
        if m not in ("lora", "full"):
            ap.error(f"--methods: unknown method {m!r}")
    return args


def run_compile(bench: Bench, runner: Runner, mode: str, batch: int, options, tag: str = "") -> None:
    """Compile the UNet in place (the module object and its state_dict keys stay the same, so
    export code is unaffected) and time it; the probe loss before/after shows the math kept."""
    with speed_options(runner, options):
        eager_loss = runner.probe_loss(batch)
    free_memory()
    t = time.perf_counter()
    try:
        import torch._dynamo

        from rayimg.train.trainee import compile_unet

        compile_unet(runner.trainee.unet, mode)  # what train.py runs for train.compile
    except Exception as e:  # noqa: BLE001
        bench.record({"config": f"lora+best+compile_{mode}", "method": "lora", "batch": batch,
                      "status": f"error: {type(e).__name__}: {str(e)[:300]}"})
        return
    try:
        with speed_options(runner, options):
            compiled_loss = runner.probe_loss(batch)  # compiles forward+backward graphs (the cold compile)
        check = {"probe_loss_eager": eager_loss, "probe_loss_compiled": compiled_loss,
                 "rel_diff": abs(compiled_loss - eager_loss) / max(abs(eager_loss), 1e-12)}
    except Exception as e:  # noqa: BLE001
        check = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    compile_s = time.perf_counter() - t
    log(f"first compiled forward after {compile_s:.1f}s; {check}")
    free_memory()
    bench.run(runner, f"lora+best{tag}+compile_{mode}", [batch], options,
              extra={"compile": mode, "compile_first_forward_s": round(compile_s, 1), "math_check": check})


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU here (use --tiny --device cpu for the smoke test)")
    bench = Bench(args)
    log(f"torch {torch.__version__}, device {args.device}{' (' + torch.cuda.get_device_name(0) + ')' if device.type == 'cuda' else ''}, "
        f"{'tiny' if args.tiny else 'real-size'} SDXL UNet at {args.resolution}², warmup {args.warmup}, measure {args.steps}")

    # ---- compile-only (a separate process, so a long cold compile cannot cost the other results)
    if args.compile_only:
        best_from = args.best_from or (str(Path(args.out) / "train_bench.json") if args.out else None)
        notes = {}
        if best_from and Path(best_from).is_file():
            notes = json.loads(Path(best_from).read_text()).get("notes", {})
        if args.best_options is not None:
            options = [o for o in args.best_options.split(",") if o]
        elif "best_options" in notes:
            options = list(notes["best_options"])
        else:
            options = list(args.option_list)
        batch = args.compile_batch or (notes.get("best_lora") or {}).get("batch") or 8
        log(f"compile {args.compile_only} at batch {batch} with options {options or 'none'}"
            + (f" (from {best_from})" if notes else ""))
        fb16 = args.full_bf16 if args.full_bf16 is not None else bool(notes.get("full_bf16_faster"))
        log(f"compile with full_bf16={fb16}")
        runner = Runner(args, "lora", trainable_dtype=torch.bfloat16, batch=batch, full_bf16=fb16)
        bench.measure_flops(runner, "lora")
        run_compile(bench, runner, args.compile_only, batch, options, tag="+full_bf16" if fb16 else "")
        print_table(bench.results)
        return 0

    bench.notes["fused_qkv"] = fqkv = check_fused_qkv()
    log(f"fused QKV with LoRA on to_q/to_k/to_v: {'compatible' if fqkv['compatible'] else 'NOT compatible'} "
        f"(LoRA to_q calls {fqkv.get('lora_to_q_calls_before')} -> {fqkv.get('lora_to_q_calls_after')}, "
        f"max output change {fqkv.get('max_abs_output_change', float('nan')):.3g})")
    bench.write()

    best_options: list[str] = []
    best_batch = None
    if "lora" in args.method_list:
        # 1. train.py as it is: float32 LoRA params under bf16 autocast
        t = time.perf_counter()
        runner = Runner(args, "lora", trainable_dtype=torch.float32, batch=args.asis_batches[0])
        log(f"lora trainee built in {time.perf_counter() - t:.1f}s: {runner.trainable:,} trainable params, {runner.attn_processor}")
        bench.measure_flops(runner, "lora")
        bench.notes["uses_cached_embeddings"] = cached = runner.uses_cached_embeddings()
        if cached is False:
            log("NOTE: the Trainee re-encodes the captions that CachedBatches puts in every batch, so the cached "
                "prompt embeddings go unused and both text encoders run every step (timed as train.py runs it)")
        bench.run(runner, "lora", args.asis_batches)
        del runner
        free_memory()

        # 2. bf16 LoRA params, then one speed option at a time
        t = time.perf_counter()
        runner = Runner(args, "lora", trainable_dtype=torch.bfloat16, batch=args.option_batch)
        log(f"lora (bf16 params) trainee built in {time.perf_counter() - t:.1f}s")
        base = bench.run(runner, "lora+bf16", [args.option_batch])
        base_ips = base[0].get("images_per_s") if base and base[0].get("status") == "ok" else None
        if args.best_options is not None:
            best_options = [o for o in args.best_options.split(",") if o]
        else:
            for option in args.option_list:
                rows = bench.run(runner, f"lora+bf16+{option}", [args.option_batch], [option])
                ips = rows[0].get("images_per_s") if rows and rows[0].get("status") == "ok" else None
                if ips and base_ips and ips > 1.01 * base_ips:
                    best_options.append(option)
        bench.notes["best_options"] = best_options
        log(f"options kept for lora+best: {best_options or 'none'}")
        # 3. the best combination across batch sizes
        best_rows = bench.run(runner, "lora+best", args.batches, best_options)
        ok = [r for r in best_rows if r.get("status") == "ok"]
        if ok:
            best = max(ok, key=lambda r: r["images_per_s"])
            best_batch = best["batch"]
            bench.notes["best_lora"] = {"batch": best_batch, "images_per_s": best["images_per_s"], "options": best_options}
            if bench.notes.get("uses_cached_embeddings") is False:
                # what-if: batches without captions, so the Trainee takes the cached embeddings
                runner.drop_captions = True
                bench.run(runner, "lora+best+cached_embeds", [best_batch], best_options,
                          extra={"note": "captions dropped from the batch so the cached prompt embeddings are used "
                                         "(not what train.py does today)"})
                runner.drop_captions = False
        del runner
        free_memory()
        # 4. train.full_bf16: bf16 LoRA params and no autocast (norms and softmax in bf16 too)
        if best_batch and not bench.over_budget():
            runner = Runner(args, "lora", trainable_dtype=torch.bfloat16, batch=best_batch, full_bf16=True)
            rows = bench.run(runner, "lora+full_bf16+best", [best_batch], best_options,
                             extra={"full_bf16": True, "math_note": "no autocast: a different (bf16) numerics recipe, not checked bit-for-bit"})
            ok16 = [r for r in rows if r.get("status") == "ok"]
            bench.notes["full_bf16_faster"] = bool(ok16 and ok16[0]["images_per_s"] > bench.notes["best_lora"]["images_per_s"])
            del runner
            free_memory()

    if "full" in args.method_list and not bench.over_budget():
        optimizers = ["adamw"]
        try:
            import bitsandbytes  # noqa: F401

            optimizers.append("adamw8bit")
        except ImportError:
            bench.notes["adamw8bit"] = "skipped: bitsandbytes is not installed"
        for opt in optimizers:
            runner = None
            try:
                t = time.perf_counter()
                runner = Runner(args, "full", trainable_dtype=torch.float32, optimizer=opt, batch=args.full_batches[0])
                log(f"full trainee ({opt}) built in {time.perf_counter() - t:.1f}s")
                bench.measure_flops(runner, "full")
                name = "full" if opt == "adamw" else f"full+{opt}"
                extra = {"gradient_checkpointing": True, "optimizer": opt}
                bench.run(runner, name, args.full_batches, (), extra=extra)  # as train.py runs it
                if best_options and opt == "adamw":
                    bench.run(runner, f"{name}+best", args.full_batches, best_options, extra=extra)
            except Exception as e:  # noqa: BLE001
                bench.record({"config": f"full+{opt}", "method": "full", "status": f"error: {type(e).__name__}: {str(e)[:300]}"})
                traceback.print_exc()
            del runner
            free_memory()

    if args.compile != "none" and "lora" in args.method_list and not bench.over_budget():
        batch = args.compile_batch or best_batch or 8
        runner = Runner(args, "lora", trainable_dtype=torch.bfloat16, batch=batch)
        run_compile(bench, runner, args.compile, batch, best_options)

    bench.notes["total_s"] = round(time.perf_counter() - T0, 1)
    bench.write()
    print_table(bench.results)
    if bench.out_path:
        log(f"wrote {bench.out_path}")
    return 0


def print_table(results: list[dict]) -> None:
    cols = [("config", 34), ("batch", 5), ("images_per_s", 12), ("step_s", 8), ("peak_mem_gb", 11), ("mfu", 6), ("status", 8)]
    print("\n" + " ".join(f"{name:>{w}}" if name != "config" else f"{name:<{w}}" for name, w in cols))
    for r in results:
        cells = []
        for name, w in cols:
            v = r.get(name)
            if isinstance(v, float):
                v = f"{v:.1%}" if name == "mfu" else f"{v:.2f}" if name != "step_s" else f"{v:.3f}"
            v = "" if v is None else str(v)
            cells.append(f"{v:<{w}}" if name in ("config", "status") else f"{v:>{w}}")
        print(" ".join(cells))
    print(flush=True)


if __name__ == "__main__":
    sys.exit(main())
