"""Serve headline: the Serve app (`serving.app.start`) over HTTP on 127.0.0.1 under many-adapter
traffic, against the render engine's bulk rate with the same engine settings, measured in the
same process before the app starts.

Load: ``--adapters`` random LoRAs (rank 16 on to_q/to_k/to_v/to_out.0 at real size) published to
a fresh local registry; ``--requests`` requests from ``--concurrency`` client threads, each naming
one adapter drawn from a Zipf law (rank k has probability proportional to 1/k^s; 10 % name
none) and its own seed (the image cache is off: every request renders). Reports throughput,
p50/p95/p99 latency, the adapter cache hit rate and swaps (from the app's /metrics). The
reference: `Renderer.render_stream` over batches of ``http.max_batch_size`` with the app's
engine settings, no adapters — what the same engine renders in bulk on this device.

    python bench/serve.py               # GPU: real-size SDXL (random init), 1024², 30 steps, eager engine (~5 min on an H100)
    python bench/serve.py --options compile,cudagraphs,fuse_qkv,fp8   # the app and the reference with the render speed-ups
    python bench/serve.py --smoke       # CPU: tiny SD at 64², 2 steps (~40 s)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import common

TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


# --------------------------------------------------------------------------- adapters
def lora_shapes(unet) -> dict[str, tuple[int, int]]:
    """``module path -> (out, in)`` of every attention projection LoRA targets (works on the meta device)."""
    import torch

    return {name: (m.out_features, m.in_features) for name, m in unet.named_modules()
            if isinstance(m, torch.nn.Linear) and any(name.endswith("." + t) for t in TARGETS)}


def random_lora(shapes: dict[str, tuple[int, int]], rank: int, seed: int) -> dict:
    """A diffusers/PEFT-format UNet LoRA state dict (``unet.<module>.lora_A/B.weight``), bf16."""
    import torch

    g = torch.Generator().manual_seed(seed)
    sd = {}
    for path, (out_features, in_features) in shapes.items():
        sd[f"unet.{path}.lora_A.weight"] = (torch.randn(rank, in_features, generator=g) / in_features ** 0.5).to(torch.bfloat16)
        sd[f"unet.{path}.lora_B.weight"] = (torch.randn(out_features, rank, generator=g) * 0.01).to(torch.bfloat16)
    return sd


def publish_random_adapters(registry: str, names: list[str], shapes: dict, rank: int, model_id: str, model_hash: str) -> None:
    from safetensors.torch import save_file

    from rayimg.registry import publish_adapter
    from rayimg.storage import Storage

    storage = Storage()
    for i, name in enumerate(names):
        with tempfile.TemporaryDirectory() as d:
            save_file(random_lora(shapes, rank, seed=1000 + i), str(Path(d) / "pytorch_lora_weights.safetensors"))
            publish_adapter(storage, registry, name, None, d, {"base_model": {"id": model_id, "hash": model_hash}, "method": "lora",
                                                              "rank": rank, "alpha": rank, "target_modules": list(TARGETS)})


def counters(url: str) -> dict[str, float]:
    """Sum over replicas (and labels) of each rayimg_* sample in /metrics."""
    import requests
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(requests.get(f"{url}/metrics", timeout=30).text):
        for sample in family.samples:
            if sample.name.startswith("rayimg_"):
                key = sample.name + (f"{{tier={sample.labels['tier']}}}" if "tier" in sample.labels else "")
                out[key] = out.get(key, 0.0) + sample.value
    return out


def zipf_weights(n: int, s: float) -> list[float]:
    w = [1.0 / (k ** s) for k in range(1, n + 1)]
    return [x / sum(w) for x in w]


# --------------------------------------------------------------------------- the two sides
def real_size_renderer(job, store):
    """Generator replicas build the real-size SDXL architecture (random init, bf16) on the GPU."""
    import os
    import sys

    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # a Serve replica runs this: bench/ for sdxl_random
    from sdxl_random import build_sdxl_pipeline

    from rayimg.render.renderer import Renderer

    pipe = build_sdxl_pipeline(torch.bfloat16, "cuda")
    return Renderer.from_pipeline(pipe, "sdxl-random-init", "random", "sdxl", job.engine, adapter_store=store)


def engine_bulk_rate(job, real: bool, *, calls: int, device: str) -> dict:
    """The reference: the app's engine settings at ``http.max_batch_size``, no adapters, in
    this process; a warm-up call, then a stream of ``calls`` batches."""
    import dataclasses

    import render as render_bench

    batch = job.http.max_batch_size
    cfg = dataclasses.replace(job.engine, batch_size=batch, batch_invariant=False)
    if real:
        from rayimg.render.renderer import Renderer

        pipe = render_bench.build_pipeline(False, device)
        renderer = Renderer.from_pipeline(pipe, "sdxl-random-init", "random", "sdxl", cfg)
    else:
        from rayimg.render.renderer import Renderer

        renderer = Renderer(job.model, cfg)
    d = job.defaults
    out = render_bench.engine_stream(renderer, batch=batch, calls=calls, steps=d.steps, size=d.width, guidance=d.guidance_scale, device=device)
    del renderer
    if common.is_cuda(device):
        import gc

        import torch

        gc.collect()
        torch.cuda.empty_cache()
    return out


def mixed_adapter_step(job, real: bool, *, batch: int, rank: int, device: str, calls: int = 10) -> dict:
    """One UNet step of ``batch`` samples (CFG: twice the rows) with the app's engine settings:
    the base UNet, then the same batch with ``batch`` different adapters in AdapterSlots (the
    step loop's per-sample LoRA). Issue 22's bar: the mixed batch within 1.10x of the base step."""
    import torch

    import render as render_bench
    from rayimg.render.adapters import lora_from_state_dict
    from rayimg.render.engine import Engine
    from rayimg.render.multi_lora import AdapterSlots, SlotConfig

    pipe = render_bench.build_pipeline(not real, device)
    engine = Engine(pipe, job.engine)
    unet = pipe.unet
    size = job.defaults.width // pipe.vae_scale_factor
    g = torch.Generator("cpu").manual_seed(0)
    dtype = unet.dtype
    sample = torch.randn(2 * batch, unet.config.in_channels, size, size, generator=g).to(device, dtype)
    t = torch.full((2 * batch,), 500.0, device=device)
    hidden = torch.randn(2 * batch, 77, unet.config.cross_attention_dim, generator=g).to(device, dtype)
    added = None
    if engine.family == "sdxl":
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        added = {"text_embeds": torch.randn(2 * batch, pooled, generator=g).to(device, dtype),
                 "time_ids": torch.tensor([[size * 8, size * 8, 0, 0, size * 8, size * 8]] * (2 * batch), device=device, dtype=dtype)}

    def step():
        with torch.no_grad():
            unet(sample, t, encoder_hidden_states=hidden, added_cond_kwargs=added, return_dict=False)

    base = common.measure(step, warmup=2, calls=calls, device=device)
    shapes = lora_shapes(unet)
    slots = AdapterSlots(pipe, SlotConfig(num_slots=batch, max_rank=rank, max_batch=batch, max_adapters=1, unet_targets=TARGETS, text_targets=()))
    t0 = time.perf_counter()
    pinned = [slots.acquire([(lora_from_state_dict(random_lora(shapes, rank, 100 + i), name=f"a{i}", fingerprint=f"{i:064d}",
                                                   unet_config=unet.config).to(device), 1.0)]) for i in range(batch)]
    common.sync(device)
    load_ms = 1000 * (time.perf_counter() - t0) / batch
    slots.set_batch(pinned, guidance=True)
    mixed = common.measure(step, warmup=2, calls=calls, device=device)
    out = {"batch": batch, "rank": rank, "base_step_s": base["s_per_call_median"], "mixed_step_s": mixed["s_per_call_median"],
           "ratio": round(mixed["s_per_call_median"] / base["s_per_call_median"], 3), "slot_load_ms_incl_first_image": round(load_ms, 2),
           "slot_bytes": slots.nbytes}
    del engine, pipe, slots, unet
    if common.is_cuda(device):
        import gc

        gc.collect()
        torch.cuda.empty_cache()
    return out


def load_test(url: str, plan: list[dict], concurrency: int, max_seconds: float) -> tuple[list[dict], float]:
    import requests

    results, lock, session = [], threading.Lock(), threading.local()
    deadline = time.perf_counter() + max_seconds

    def send(body):
        if time.perf_counter() > deadline:
            return
        s = getattr(session, "s", None) or requests.Session()
        session.s = s
        start = time.perf_counter()
        r = s.post(f"{url}/v1/generate", json=body, timeout=600)
        latency = time.perf_counter() - start
        try:
            timings = r.json().get("timings") or {}
        except ValueError:
            timings = {}
        with lock:
            results.append({"status": r.status_code, "latency": latency, "adapters": bool(body["adapters"]),
                            "tiers": timings.get("adapter_tiers", {}), "batch": (timings.get("batch_sizes") or [0])[0]})

    t = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(send, plan))
    return results, time.perf_counter() - t


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny SD at 64², 2 steps: checks the code path, numbers meaningless")
    ap.add_argument("--adapters", type=int, default=None, help="published adapters (GPU default 20)")
    ap.add_argument("--requests", type=int, default=None, help="requests sent (GPU default 48)")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent s")
    ap.add_argument("--no-adapter-share", type=float, default=0.1)
    ap.add_argument("--max-seconds", type=float, default=300.0, help="stop sending after this long")
    ap.add_argument("--max-batch-size", type=int, default=4, help="http.max_batch_size (also the reference's batch)")
    ap.add_argument("--options", default="", help="engine speed options of the app and the reference: compile,cudagraphs,fuse_qkv,channels_last,compile_vae,fp8")
    ap.add_argument("--ref-calls", type=int, default=None, help="batches in the reference stream (GPU default 6)")
    ap.add_argument("--batching", choices=("step", "request"), default="step",
                    help="the app's batching.mode: step-level with per-sample adapters (default), or request batches with fused adapters")
    ap.add_argument("--mixed-step", action="store_true", help="also time one UNet step of --max-batch-size samples with as many "
                                                                "different adapters against the base step (before the app starts)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write this headline's JSON here")
    args = ap.parse_args(argv)
    real = not args.smoke
    device = "cuda" if real else "cpu"
    steps, size, rank = (30, 1024, 16) if real else (2, 64, 4)
    adapters = args.adapters or (20 if real else 4)
    n_requests = args.requests or (48 if real else 12)
    concurrency = args.concurrency if real else min(args.concurrency, 2)
    ref_calls = args.ref_calls or (6 if real else 3)
    options = {o for o in args.options.split(",") if o}
    t0 = time.perf_counter()
    env = common.device_info(device)

    import ray
    import requests
    import torch

    from rayimg.config import ServeJob, from_dict
    from serving.app import start

    tmp = Path(tempfile.mkdtemp(prefix="rayimg-bench-serve-"))
    registry = str(tmp / "registry")
    names = [f"load-{i:03d}" for i in range(adapters)]
    port = 8000 + random.Random(os.getpid()).randrange(1000)
    import render as render_bench
    from rayimg.config import to_dict

    engine = to_dict(render_bench.engine_config(options, 1, batch_invariant=not real))
    job = from_dict(ServeJob, {
        "registry": registry, "model": {"device": device}, "app_name": "bench",
        "defaults": {"steps": steps, "width": size, "height": size, "guidance_scale": 5.0},
        "limits": {"max_width": size, "max_height": size, "max_steps": steps, "max_num_images": 1},
        "engine": engine,
        "http": {"host": "127.0.0.1", "port": port, "max_batch_size": args.max_batch_size, "batch_wait_timeout_s": 0.02,
                 "max_ongoing_requests": 8, "max_queued_requests": 4 * concurrency + 8, "request_timeout_s": 600.0},
        "autoscaling": {"min_replicas": 1, "max_replicas": 1},
        "batching": {"mode": args.batching, "max_batch": args.max_batch_size,
                     "pad_to": sorted({b for b in (1, 2, 4, 8, 16) if b < args.max_batch_size} | {args.max_batch_size}),
                     "num_slots": 16, "max_rank": rank},
        "adapter_cache": {"disk_dir": str(tmp / "adapter-cache"), "cpu_max_adapters": 16, "gpu_max_adapters": 4, "refresh_s": 30.0},
        "num_cpus_per_replica": 1.0 if real else 0.5, "num_gpus_per_replica": 1.0 if real else 0.0, "num_cpus_ingress": 0.25,
    })

    mixed = None
    if args.mixed_step:
        mixed = mixed_adapter_step(job, real, batch=args.max_batch_size, rank=rank, device=device)
        common.log("serve", f"mixed-adapter step: {json.dumps(mixed)}")
    ref = engine_bulk_rate(job, real, calls=ref_calls, device=device)
    common.log("serve", f"reference: engine bulk {ref['images_per_s']:.3f} images/s at batch {args.max_batch_size}")

    t = time.perf_counter()
    if real:
        from diffusers import UNet2DConditionModel

        from sdxl_random import sdxl_config

        with torch.device("meta"):
            unet = UNet2DConditionModel(**{k: v for k, v in sdxl_config("unet").items() if not k.startswith("_")})
        model_id, model_hash, factory = "sdxl-random-init", "random", real_size_renderer
    else:
        from rayimg.models.loader import load_model

        loaded = load_model(job.model)
        unet, model_id, model_hash, factory = loaded.pipeline.unet, loaded.model_id, loaded.model_hash, None
    publish_random_adapters(registry, names, lora_shapes(unet), rank, model_id, model_hash)
    common.log("serve", f"published {len(names)} rank-{rank} adapters in {time.perf_counter() - t:.1f}s")

    ray.init(num_cpus=os.cpu_count() if real else 2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    t = time.perf_counter()
    url = start(job, renderer_factory=factory)
    startup = time.perf_counter() - t
    assert url.startswith("http://127.0.0.1:"), url  # loopback only
    common.log("serve", f"app up at {url} in {startup:.1f}s")
    try:
        rng = random.Random(args.seed)
        weights = zipf_weights(len(names), args.zipf)
        plan = [{"prompt": f"a red circle, request {i}", "seed": 10_000 + i,
                 "adapters": [] if rng.random() < args.no_adapter_share else [{"name": rng.choices(names, weights)[0], "scale": 0.8}]}
                for i in range(n_requests)]
        requests.post(f"{url}/v1/generate", json={"prompt": "warm-up", "seed": 1}, timeout=900).raise_for_status()  # first-call costs
        before = counters(url)
        with common.GpuSampler() as gpu:
            results, elapsed = load_test(url, plan, concurrency, args.max_seconds)
        after = counters(url)
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()

    ok = [r for r in results if r["status"] == 200]
    lat = [r["latency"] for r in ok]
    with_adapters = [r for r in ok if r["adapters"]]
    hits = [r for r in with_adapters if all(t in ("resident", "device", "cpu") for t in r["tiers"].values())]
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    swaps = delta.get("rayimg_adapter_swaps_total", 0)
    throughput = len(ok) / elapsed if ok else None
    details = {
        "adapters": len(names), "zipf_s": args.zipf, "rank": rank, "size": size, "steps": steps, "options": sorted(options),
        "requests_sent": len(results), "ok": len(ok), "errors": {str(s): sum(r["status"] == s for r in results) for s in {r["status"] for r in results} - {200}},
        "concurrency": concurrency, "max_batch_size": args.max_batch_size, "seconds": round(elapsed, 2), "app_startup_s": round(startup, 1),
        "latency_s": {q: round(common.percentile(lat, p), 3) for q, p in (("p50", 50), ("p95", 95), ("p99", 99))},
        "adapter_cache_hit_rate": round(len(hits) / max(len(with_adapters), 1), 3),
        "adapter_file_loads": int(delta.get("rayimg_adapter_loads_total", 0)), "adapter_swaps": int(swaps),
        "mean_swap_ms": round(1000 * delta.get("rayimg_adapter_swap_seconds_total", 0) / max(swaps, 1), 2),
        "mean_batch_size": round(sum(r["batch"] for r in ok) / max(len(ok), 1), 2), "reference_measure": ref, "gpu_samples": gpu.summary(),
        "batching": args.batching, "mixed_adapter_step": mixed,
    }
    if args.batching == "step":  # samples per UNet call of the step loop
        details["mean_batch_size"] = round(delta.get("rayimg_denoise_samples_total", 0) / max(delta.get("rayimg_denoise_steps_total", 0), 1), 2)
    result = common.headline(
        "serve", figure=throughput, unit="images/s",
        what=f"Serve app over HTTP ({args.batching} batching), {concurrency} clients, {len(names)} adapters (Zipf {args.zipf}), {size}², {steps} steps, options {','.join(sorted(options)) or 'none'}",
        reference=ref["images_per_s"], reference_what=f"the render engine's bulk stream, same engine settings, batch {args.max_batch_size}, no adapters",
        device=env, command=common.command_line(), seconds=time.perf_counter() - t0, details=details)
    print(f"latency p50 {details['latency_s']['p50']} s, p95 {details['latency_s']['p95']} s; {details['adapter_swaps']} swaps, "
          f"mean batch {details['mean_batch_size']}", flush=True)
    common.report(result, args.json)
    return result


if __name__ == "__main__":
    main()
