"""Full fine-tune scaling of the real-size SDXL UNet (random init) at 1024² from cached latents,
through Ray Train + DeepSpeed ZeRO: ZeRO-2 on 1 worker (1 GPU), then on 2 workers (2 GPUs), and
ZeRO-3 on 2 GPUs when the budget allows. Target: 2 GPUs >= 1.8x one GPU (issue 4).

Each row is one ``TorchTrainer.fit`` whose workers run train.py's DeepSpeed path: the model is
loaded in float32 as train.py loads it (here built with random init from the published configs,
``bench/train_bench.py``'s ``build_unet``/``make_loaded``), ``build_trainee``, ``compile_unet``,
``build_deepspeed_config`` + ``deepspeed.initialize`` (bf16, torch AdamW, gradient clipping 1.0),
``build_lr_scheduler``, batches from ``CachedBatches`` drawn by ``epoch_batches`` for the
worker's (rank, world), and the body of train.py's ``while step < total_steps`` for DeepSpeed:
``engine(batch)``, ``engine.backward``, ``engine.step``, scheduler step, ``after_optimizer_step``,
the cross-rank loss all-reduce and ``float(loss)`` (a sync). Left out: checkpoints (a full
fine-tune's DeepSpeed checkpoint is 12 bytes per parameter, 31 GB at real size) and validation.
The cache rows are synthetic, in the format ``rayimg prepare`` writes (bf16 latents 4×128×128,
prompt_embeds 77×2048, pooled 1280, SDXL time ids), as in train_bench.py.

Timing: ``--warmup`` steps, a barrier, then ``--steps`` timed steps on every rank;
images/s = micro batch × world × steps / the slowest rank's time. Per rank: peak GPU memory
(allocated and reserved, whole run; and allocated during the timed steps). One ``RESULT`` line per row, a table at the end, and
``$OUT/zero_bench.json`` rewritten after every row (a kill loses only the row in flight).

    python bench/zero_bench.py                          # GPU: zero2x1, zero2x2, zero3x2 at batch 8 per GPU
    python bench/zero_bench.py --tiny                   # CPU smoke test: tiny SDXL, gloo, 2 CPU workers
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import torch  # noqa: E402

T0 = time.perf_counter()
TARGET_SCALING = 1.8
ROWS = {"zero2x1": (2, 1), "zero2x2": (2, 2), "zero3x2": (3, 2)}  # name: (ZeRO stage, workers)


def log(msg: str) -> None:
    print(f"[zero-bench {time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


# --------------------------------------------------------------------------- the worker
def worker_loop(cfg: dict) -> None:
    """One Ray Train worker: build, ``deepspeed.initialize``, warm up, time; rank 0 reports the
    gathered figures of every rank."""
    sys.path[:0] = [cfg["root"], str(Path(cfg["root"]) / "bench")]
    import argparse as _argparse

    import deepspeed
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    from rayimg.run.train import _seed_all
    from rayimg.train.batches import CachedBatches
    from rayimg.train.deepspeed_config import build_deepspeed_config
    from rayimg.train.optim import build_lr_scheduler
    from rayimg.train.sampler import batches_per_epoch, epoch_batches, position
    from rayimg.train.trainee import build_trainee, compile_unet
    from train_bench import build_unet, make_job, make_loaded, synthetic_cache, unet_dims

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    cuda = device.type == "cuda"
    args = _argparse.Namespace(tiny=cfg["tiny"], device=str(device), resolution=cfg["resolution"])
    batch_size, warmup, steps = cfg["batch"], cfg["warmup"], cfg["steps"]

    t_build = time.perf_counter()
    job = make_job("full", batch_size, rank=16, grad_ckpt=True)
    job.train.max_steps = warmup + steps
    job.deepspeed.enabled = True
    job.deepspeed.stage = cfg["stage"]
    if not cuda:
        job.train.mixed_precision = "no"  # as on CPU in tests/test_train.py
    _seed_all(job.train.seed * 1000 + rank)
    # train.py loads the model in float32; DeepSpeed casts the module to bf16 and keeps fp32
    # master weights in the optimizer. The random init is seeded, so every rank builds the same.
    unet = build_unet(args, torch.float32, device)
    dims = unet_dims(unet, args.resolution)
    loaded = make_loaded(args, unet, device, torch.float32)
    trainee = build_trainee(loaded, job, trainable_dtype=torch.float32, autocast=True)
    compile_unet(trainee.unet, job.train.compile)
    params = trainee.trainable_parameters()
    engine, optimizer, _, _ = deepspeed.initialize(model=trainee, model_parameters=params,
                                                   config=build_deepspeed_config(job, world))
    lr_scheduler = build_lr_scheduler(optimizer, job, job.train.max_steps)
    records, shard = synthetic_cache(dims, max(64, 4 * batch_size * world), args.resolution)
    data = CachedBatches(records, lambda sid: shard, "sdxl", use_embeddings=not trainee.train_text_encoders)
    buckets = data.buckets()
    per_epoch = batches_per_epoch(buckets, batch_size, world)
    accum = job.train.gradient_accumulation_steps
    build_s = time.perf_counter() - t_build

    def train_step(step: int) -> float:
        micro_losses = []
        for micro in range(accum):
            epoch, bi = position(step * accum + micro, per_epoch)
            indices = epoch_batches(buckets, batch_size, job.train.seed, epoch, rank, world)[bi]
            out = engine(data.batch(indices, device))
            loss = out["loss"]
            engine.backward(loss)
            engine.step()
            micro_losses.append(loss.detach().float())
        lr_scheduler.step()
        trainee.after_optimizer_step()
        step_loss = torch.stack(micro_losses).mean()
        if world > 1:
            dist.all_reduce(step_loss, op=dist.ReduceOp.AVG if cuda else dist.ReduceOp.SUM)
            if not cuda:
                step_loss /= world
        return float(step_loss)

    engine.train()
    losses = [train_step(s) for s in range(warmup)]
    if world > 1:
        dist.barrier()
    peak_alloc = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else 0.0  # build + init + warm-up
    peak_reserved = torch.cuda.max_memory_reserved(device) / 2**30 if cuda else 0.0
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    step_times = []
    t_start = time.perf_counter()
    for s in range(warmup, warmup + steps):
        t = time.perf_counter()
        losses.append(train_step(s))
        step_times.append(time.perf_counter() - t)
    elapsed = time.perf_counter() - t_start

    steps_alloc = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else 0.0
    peak_alloc = max(peak_alloc, steps_alloc)
    peak_reserved = max(peak_reserved, torch.cuda.max_memory_reserved(device) / 2**30 if cuda else 0.0)
    mine = torch.tensor([elapsed, peak_alloc, peak_reserved, build_s, steps_alloc], dtype=torch.float64, device=device)
    every = [torch.zeros_like(mine) for _ in range(world)]
    if world > 1:
        dist.all_gather(every, mine)
    else:
        every = [mine]
    every = [e.cpu().tolist() for e in every]
    slowest = max(e[0] for e in every)
    images = batch_size * accum * world * steps
    metrics = {
        "stage": cfg["stage"], "workers": world, "batch_per_gpu": batch_size, "steps": steps, "warmup": warmup,
        "images_per_s": round(images / slowest, 3),
        "images_per_s_per_gpu": round(images / slowest / world, 3),
        "s_per_step": round(slowest / steps, 4),
        "step_s_rank0": [round(x, 4) for x in step_times],
        "peak_mem_gb": [round(e[1], 2) for e in every],
        "peak_reserved_gb": [round(e[2], 2) for e in every],
        "peak_mem_timed_steps_gb": [round(e[4], 2) for e in every],
        "build_s": [round(e[3], 1) for e in every],
        "losses": [round(x, 5) for x in losses],
        "trainable_params": sum(p.numel() for p in params),
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "deepspeed": deepspeed.__version__,
    }
    # Ray Train hands the driver only metrics that came with a checkpoint: rank 0 attaches a
    # small one holding them (no weights)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            (Path(tmp) / "metrics.json").write_text(json.dumps(metrics))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)


# --------------------------------------------------------------------------- driver
def run_row(args, name: str, stage: int, workers: int, storage: str) -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg = {"root": str(ROOT), "tiny": args.tiny, "resolution": args.resolution, "batch": args.batch,
           "warmup": args.warmup, "steps": args.steps, "stage": stage}
    trainer = TorchTrainer(
        worker_loop, train_loop_config=cfg,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=not args.tiny,
                                     resources_per_worker={"CPU": args.cpus_per_worker}),
        run_config=RunConfig(name=f"zero-bench-{name}", storage_path=storage),
    )
    t = time.perf_counter()
    result = trainer.fit()
    if result.error:
        raise result.error
    return {"name": name, **result.metrics, "fit_s": round(time.perf_counter() - t, 1)}


def summarise(rows: list[dict], args) -> dict:
    by = {r["name"]: r for r in rows if "images_per_s" in r}
    out: dict = {"target_scaling": TARGET_SCALING}
    if "zero2x1" in by and "zero2x2" in by:
        ratio = by["zero2x2"]["images_per_s"] / by["zero2x1"]["images_per_s"]
        out["zero2_scaling"] = round(ratio, 3)
        out["zero2_scaling_efficiency"] = round(ratio / 2, 3)
        out["target_met"] = ratio >= TARGET_SCALING
    return out


def write(rows: list[dict], args, out_dir: Path) -> None:
    doc = {"bench": "zero_bench", "args": vars(args), "rows": rows, "summary": summarise(rows, args)}
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "zero_bench.json.tmp"
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(out_dir / "zero_bench.json")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny SDXL, gloo, 2 CPU workers")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma list of {list(ROWS)}")
    ap.add_argument("--batch", type=int, default=None, help="micro batch per GPU (default 8; --tiny 2)")
    ap.add_argument("--resolution", type=int, default=None, help="image side (default 1024; --tiny 64)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--cpus-per-worker", type=float, default=None, help="default 4; --tiny 1")
    ap.add_argument("--budget-s", type=float, default=0,
                    help="skip a row once this many seconds have passed since start (0: no budget)")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    args = ap.parse_args()
    args.batch = args.batch or (2 if args.tiny else 8)
    args.resolution = args.resolution or (64 if args.tiny else 1024)
    args.cpus_per_worker = args.cpus_per_worker or (1 if args.tiny else 4)
    names = [n.strip() for n in args.rows.split(",") if n.strip()]
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        ap.error(f"--rows: unknown {unknown}; known {list(ROWS)}")
    if not args.tiny and not torch.cuda.is_available():
        ap.error("no CUDA device: use --tiny for the CPU smoke test")
    need = max(ROWS[n][1] for n in names)
    if not args.tiny and torch.cuda.device_count() < need:
        ap.error(f"--rows {names} need {need} GPUs; {torch.cuda.device_count()} visible")

    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    num_cpus = max(2, int(need * args.cpus_per_worker) + 1) if args.tiny else None
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True, configure_logging=False)
    out_dir = Path(args.out)
    rows: list[dict] = []
    log(f"rows {names}, batch {args.batch}/GPU, {args.resolution}², {args.warmup}+{args.steps} steps, "
        f"{'tiny SDXL on CPU (gloo)' if args.tiny else f'{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}'}")
    with tempfile.TemporaryDirectory(prefix="zero-bench-") as storage:
        for name in names:
            stage, workers = ROWS[name]
            if args.budget_s and time.perf_counter() - T0 > args.budget_s:
                log(f"{name}: skipped, budget {args.budget_s:.0f}s spent")
                rows.append({"name": name, "skipped": "budget"})
                write(rows, args, out_dir)
                continue
            log(f"{name}: ZeRO-{stage} on {workers} worker(s)")
            try:
                row = run_row(args, name, stage, workers, storage)
            except Exception as e:  # noqa: BLE001 - one failed row must not lose the others
                traceback.print_exc()
                row = {"name": name, "error": f"{type(e).__name__}: {str(e)[:2000]}"}
            rows.append(row)
            write(rows, args, out_dir)
            brief = {k: row.get(k) for k in ("name", "stage", "workers", "batch_per_gpu", "images_per_s",
                                               "images_per_s_per_gpu", "s_per_step", "peak_mem_gb", "peak_reserved_gb",
                                               "peak_mem_timed_steps_gb", "build_s", "fit_s", "error")}
            print("RESULT " + json.dumps(brief), flush=True)
    summary = summarise(rows, args)
    print(f"\n| row | ZeRO | GPUs | batch/GPU | images/s | images/s/GPU | s/step | peak alloc GB (per rank) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "images_per_s" in r:
            print(f"| {r['name']} | {r['stage']} | {r['workers']} | {r['batch_per_gpu']} | {r['images_per_s']} | "
                  f"{r['images_per_s_per_gpu']} | {r['s_per_step']} | {r['peak_mem_gb']} |")
        else:
            print(f"| {r['name']} | — | — | — | {r.get('error') or r.get('skipped')} | | | |")
    print("SUMMARY " + json.dumps(summary), flush=True)
    ray.shutdown()
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
