"""Render throughput (issue 5): the real-size SDXL architecture (random init, bf16) at 1024²,
30 steps, CFG — OUR engine (`rayimg.render.renderer.Renderer`, the class the render job's actors
run) side by side, in the same process and on the same weights, with a plain diffusers
``StableDiffusionXLPipeline`` call loop.

Rows (one ``RESULT`` line each; ``$OUT/render_bench.json`` rewritten after each):

- ``diffusers b1`` / ``diffusers bN``: ``StableDiffusionXLPipeline(**components)(prompt=[...])``,
  eager, as the diffusers docs show it (bf16, SDPA attention), Euler;
- ``ours b1`` / ``ours bN``: ``Renderer`` with the engine options in ``--options`` (default fused
  QKV + channels-last + ``torch.compile`` of the UNet), same scheduler, steps, guidance and size;
  the first call at each batch size (compile) is reported apart and not timed;
- ``ours bN 20 adapters``: a catalog spread over ``--adapters`` rank-16 LoRAs (to_q/to_k/to_v/
  to_out.0 of every attention, published to a local registry and read back through the
  AdapterStore), sorted by adapter set as the render job sorts it, rendered at batch N;
  compared with ``ours bN`` (no adapter). Adapter swaps (fuse in place) are inside the timing;
  the cold (from storage) and warm (from CPU) swap times are reported too.

    python bench/render_bench.py                          # GPU, real size
    python bench/render_bench.py --tiny --device cpu --resolution 64 --steps 2 --no-compile   # smoke test
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS: dict = {"rows": [], "notes": {}}


def out_dir() -> Path:
    p = Path(os.environ.get("OUT", "outputs/bench"))
    p.mkdir(parents=True, exist_ok=True)
    return p


def record(row: dict) -> None:
    RESULTS["rows"].append(row)
    print("RESULT " + json.dumps(row), flush=True)
    (out_dir() / "render_bench.json").write_text(json.dumps(RESULTS, indent=1))


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def prompts(n: int, start: int = 0) -> list[str]:
    subjects = ["a lighthouse at dusk", "a red fox in snow", "a bowl of ramen", "a city street in rain", "an old sailing ship"]
    return [f"{subjects[(start + i) % len(subjects)]}, photo {start + i}" for i in range(n)]


def lora_state_dict(unet, rank: int, seed: int) -> dict[str, torch.Tensor]:
    """A peft-format rank-``rank`` LoRA on to_q/to_k/to_v/to_out.0 of every attention module."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and (name.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v") or name.endswith("to_out.0")):
            sd[f"{name}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=g) / module.in_features ** 0.5
            sd[f"{name}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=g) * 0.01
    return sd


def publish_adapters(pipe, registry: str, count: int, rank: int, model_id: str, model_hash: str) -> list[str]:
    from rayimg.storage import Storage
    from rayimg.train.export import save_lora
    from rayimg.train.registry import publish_adapter

    names = []
    storage = Storage()
    for i in range(count):
        name = f"style-{i:02d}"
        with tempfile.TemporaryDirectory() as d:
            save_lora(d, "sdxl", lora_state_dict(pipe.unet, rank, 1000 + i))
            publish_adapter(storage, registry, name, None, d, {"base_model": {"id": model_id, "hash": model_hash}, "method": "lora", "rank": rank})
        names.append(name)
    return names


def build(args):
    if args.tiny:
        from rayimg.models.tiny import build_tiny_sdxl

        pipe = build_tiny_sdxl(0).to(args.device)
    else:
        from rayimg.models.real_size import build_sdxl_pipeline

        pipe = build_sdxl_pipeline(torch.bfloat16, args.device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def compare_unets(args, opts: set, pipe, n: int, inputs, engine_unet_s: float, device) -> None:
    """``--unet-compare``: why the engine's UNet may step slower than ``unet_step_bench.py``'s.
    In this process, with the same inputs: the engine's UNet with the timestep as a fresh 0-d
    tensor (the step bench's) instead of a view of the scheduler's timesteps; the host time of
    one call; and a UNet built and compiled the way ``unet_step_bench.py`` builds it (a second
    cold compile), timed alternately with the engine's. One ``RESULT`` row."""
    lat, tt, emb, added = inputs
    unet = pipe.unet
    t500 = torch.tensor(float(tt), device=device)

    def five(model, t):
        return lambda: [model(lat, t, encoder_hidden_states=emb, added_cond_kwargs=added, return_dict=False) for _ in range(5)]

    row = {"name": f"unet compare b{n}", "engine_unet_s": round(engine_unet_s, 5)}
    with torch.no_grad():
        for _ in range(2):
            five(unet, t500)()
        row["engine_unet_fresh_timestep_s"] = round(statistics.median(time_calls(five(unet, t500), 3, device)) / 5, 5)
        sync(device)
        t = time.perf_counter()
        unet(lat, tt, encoder_hidden_states=emb, added_cond_kwargs=added, return_dict=False)
        row["engine_unet_host_s"] = round(time.perf_counter() - t, 5)
        sync(device)
        from rayimg.models.real_size import build_sdxl_unet
        from rayimg.render.fp8 import convert_unet

        if args.tiny:
            from rayimg.models.tiny import build_tiny_sdxl

            fresh = build_tiny_sdxl(0).unet.to(device=device, dtype=unet.dtype)
        else:
            fresh = build_sdxl_unet(unet.dtype, device)
        fresh.eval().requires_grad_(False)
        if "fuse_qkv" in opts:
            fresh.fuse_qkv_projections()
        if "channels_last" in opts:
            fresh.to(memory_format=torch.channels_last)
        if "fp8" in opts:
            convert_unet(fresh, "norm_fed")
        if "compile" in opts:
            fresh.compile(mode="reduce-overhead" if "cudagraphs" in opts else None, dynamic=False)
        t = time.perf_counter()
        for _ in range(3):
            five(fresh, tt)()
        sync(device)
        row["fresh_unet_warmup_s"] = round(time.perf_counter() - t, 1)
        engine_times, fresh_times = [], []
        for _ in range(3):  # alternately, so that clocks and heat are shared
            engine_times += time_calls(five(unet, tt), 1, device)
            fresh_times += time_calls(five(fresh, tt), 1, device)
        row["engine_unet_alternating_s"] = round(statistics.median(engine_times) / 5, 5)
        row["fresh_unet_alternating_s"] = round(statistics.median(fresh_times) / 5, 5)
        if torch.device(device).type == "cuda":
            # the same 5 calls of each under the profiler: is it the kernels (which?) or the gaps
            ek, fk = kernel_times(five(unet, tt)), kernel_times(five(fresh, tt))
            for tag, k in (("engine", ek), ("fresh", fk)):
                row[f"{tag}_kernel_ms_per_call"] = round(sum(v[0] for v in k.values()) / 5, 3)
                row[f"{tag}_kernels_per_call"] = sum(v[1] for v in k.values()) / 5
            diffs = sorted(((name, round((ek.get(name, (0, 0))[0] - fk.get(name, (0, 0))[0]) / 5, 4),
                             ek.get(name, (0, 0))[1] // 5, fk.get(name, (0, 0))[1] // 5) for name in set(ek) | set(fk)),
                           key=lambda d: -abs(d[1]))
            row["kernel_diffs_ms_per_call"] = [(n[:90], d, ce, cf) for n, d, ce, cf in diffs[:20]]
            RESULTS["notes"][f"unet_compare_b{n}_kernels"] = {"engine": ek, "fresh": fk}  # full tables, in the json
            cats: dict[str, list[float]] = {}
            for tag, k in ((0, ek), (1, fk)):
                for name, (ms, _) in k.items():
                    cats.setdefault(kernel_category(name), [0.0, 0.0])[tag] += ms / 5
            row["category_ms_per_call_engine_fresh"] = {c: [round(a, 3), round(b, 3)] for c, (a, b) in cats.items()}
    del fresh
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    record(row)


def kernel_times(fn) -> dict[str, tuple[float, int]]:
    """GPU kernel name -> (total ms, count) over one ``fn()`` (CUDA-graph replays included)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return {e.key: (e.device_time_total / 1e3, e.count) for e in prof.key_averages() if e.device_type.name == "CUDA"}


def time_calls(fn, calls: int, device) -> list[float]:
    times = []
    for _ in range(calls):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return times


def kernel_category(name: str) -> str:
    """A GPU kernel's family, from its name (cuBLAS/cuDNN/Triton naming; inductor names its
    Triton kernels after the ops they fuse, so a float8 scaling fused into a LayerNorm reads
    ``triton_per_fused__scaled_mm_..._native_layer_norm``)."""
    low = name.lower()
    if "memcpy" in low or "memset" in low:
        return "copies"
    if low.startswith("triton"):
        if "geglu" in low:
            return "geglu_fp8 (triton)"
        if "layer_norm" in low:
            return "triton layer norm (+ float8 scaling)"
        if "group_norm" in low:
            return "triton group norm (+ SiLU, conv epilogues)"
        if "gelu" in low:
            return "triton GEGLU"
        return "triton pointwise" if low.startswith("triton_poi") else "triton reduction"
    if "sdpa" in low or "fmha" in low or "flash" in low or "attention" in low:
        return "attention"
    if "fprop" in low or "conv" in low or "implicit" in low or "winograd" in low:
        return "convolution"
    # cuBLAS's nvjet kernels name float8 inputs "qq" (e.g. nvjet_sm90_qqtst_...)
    if "e4m3" in low or "f8" in low or "fp8" in low or "scaled_mm" in low or low.startswith("nvjet_sm90_qq"):
        return "gemm fp8"
    if "gemm" in low or "nvjet" in low or "cutlass" in low or "xmma" in low:
        return "gemm bf16"
    return "other"


def profile_generate(engine, reqs, n: int) -> None:
    """One generate() under the profiler: wall time against the GPU's kernel and copy time (the
    gap is time the GPU waited on the host), the copies, and the top kernels."""
    from torch.profiler import ProfilerActivity, profile

    engine.generate(reqs)
    sync("cuda")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        engine.generate(reqs)
        sync("cuda")
        wall = time.perf_counter() - t
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    gpu = sum(e.device_time_total for e in events) / 1e6
    copies = [(e.key[:60], round(e.device_time_total / 1e3, 3), e.count) for e in events if "memcpy" in e.key.lower() or "memset" in e.key.lower()]
    events.sort(key=lambda e: -e.device_time_total)
    categories: dict[str, float] = {}
    for e in events:
        categories[kernel_category(e.key)] = categories.get(kernel_category(e.key), 0.0) + e.device_time_total / 1e3
    row = {"batch": n, "steps": reqs[0].steps, "wall_s": round(wall, 4), "gpu_kernel_s": round(gpu, 4), "gpu_idle_s": round(wall - gpu, 4),
           "copies_ms": copies, "categories_ms": {k: round(v, 2) for k, v in sorted(categories.items(), key=lambda kv: -kv[1])},
           "top_kernels_ms": [(e.key[:100], round(e.device_time_total / 1e3, 3), e.count) for e in events[:30]]}
    RESULTS.setdefault("profiles", []).append(row)
    print("PROFILE " + json.dumps(row), flush=True)
    import gzip
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        tag = "fp8" if engine.fp8 else "bf16"
        (out_dir() / f"trace_b{n}_{tag}.json.gz").write_bytes(gzip.compress(Path(f.name).read_bytes()))


CLOCK_LOG = None


def start_clock_log() -> None:
    """``nvidia-smi`` sampling SM clock, power, temperature and throttle reasons every 500 ms into
    ``$OUT/clocks.csv`` (when there is one): whether a sustained stream runs at lower clocks than
    a short burst. :func:`phase` marks what ran when (wall clock, in the notes)."""
    global CLOCK_LOG
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return
    fields = "timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_event_reasons.active"
    CLOCK_LOG = subprocess.Popen(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader,nounits", "-lms", "500"],
                                 stdout=open(out_dir() / "clocks.csv", "w"), stderr=subprocess.DEVNULL)


def phase(name: str) -> None:
    RESULTS["notes"].setdefault("phases", []).append([name, time.strftime("%H:%M:%S"), round(time.time(), 2)])
    print(f"[bench] phase {name}", flush=True)


def profile_stream(renderer, batches, n: int) -> None:
    """A render_stream over ``batches`` with the profiler recording GPU activity only (no host-side
    op records, which would slow the launching thread): from the first to the last GPU activity,
    the time some kernel or copy ran (the union over streams), the idle time by gap length, and the
    largest gaps with the activity before and after each (where the GPU waits for the host)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        for _ in renderer.render_stream(batches):
            pass
        torch.cuda.synchronize()
        wall = time.perf_counter() - t
    t = time.perf_counter()
    events = [(e.start_ns(), e.end_ns(), e.name(), e.device_resource_id()) for e in prof.profiler.kineto_results.events()
              if e.device_type().name == "CUDA" and e.duration_ns() > 0]
    if not events:
        print("[bench] profile_stream: no GPU activity recorded", flush=True)
        return
    events.sort()
    busy, gaps, streams = 0, [], {}
    cur_start, cur_end, prev_name = events[0][0], events[0][1], events[0][2]
    for start, end, name, stream in events:
        streams.setdefault(stream, [0, 0.0])
        streams[stream][0] += 1
        streams[stream][1] += (end - start) / 1e6
        if start > cur_end:
            busy += cur_end - cur_start
            gaps.append((start - cur_end, cur_end - events[0][0], prev_name, name))
            cur_start = start
        if end >= cur_end:
            cur_end, prev_name = end, name
    busy += cur_end - cur_start
    span = cur_end - events[0][0]
    buckets = {"<10us": 0.0, "10-100us": 0.0, "0.1-1ms": 0.0, "1-10ms": 0.0, ">10ms": 0.0}
    for g, *_ in gaps:
        key = "<10us" if g < 1e4 else "10-100us" if g < 1e5 else "0.1-1ms" if g < 1e6 else "1-10ms" if g < 1e7 else ">10ms"
        buckets[key] += g / 1e6
    gaps.sort(key=lambda g: -g[0])
    row = {"batch": n, "calls": len(batches), "wall_s": round(wall, 3), "gpu_span_s": round(span / 1e9, 3),
           "gpu_busy_s": round(busy / 1e9, 3), "gpu_idle_s": round((span - busy) / 1e9, 3),
           "idle_ms_by_gap": {k: round(v, 2) for k, v in buckets.items()}, "gaps": len(gaps), "activities": len(events),
           "streams_count_ms": {str(k): [v[0], round(v[1], 1)] for k, v in streams.items()},
           "largest_gaps": [[round(g / 1e6, 3), round(at / 1e9, 4), before[:70], after[:70]] for g, at, before, after in gaps[:25]],
           "analysis_s": round(time.perf_counter() - t, 1)}
    RESULTS.setdefault("profiles", []).append(row)
    print("STREAM_PROFILE " + json.dumps(row), flush=True)
    (out_dir() / "render_bench.json").write_text(json.dumps(RESULTS, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--resolution", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--batch", type=int, default=4, help="the bulk batch size")
    ap.add_argument("--b1-images", type=int, default=4)
    ap.add_argument("--bulk-calls", type=int, default=3)
    ap.add_argument("--stream-calls", type=int, default=5, help="calls in the timed render_stream (at least the calls above)")
    ap.add_argument("--adapters", type=int, default=20)
    ap.add_argument("--rows-per-adapter", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--options", default="fuse_qkv,channels_last,compile,compile_vae")
    ap.add_argument("--png-level", type=int, default=1, help="engine.png_compress_level")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--unet-compare", action="store_true",
                    help="also time the engine's UNet against one built as unet_step_bench.py builds it (a second cold compile)")
    ap.add_argument("--stream-variants", nargs="?", const="all", default="",
                    help="also stream these variants (comma-separated; bare flag: all): no_prefetch (each call encodes its prompts), again, "
                         "prefetch_steps (step-wise prefetch), prefetch_thread (prefetch in a worker thread), prefetch_low_priority (side stream at default priority), png_1_thread, no_png")
    ap.add_argument("--vae-cl-compare", action="store_true", help="also time the VAE decode with the decoder in channels-last")
    ap.add_argument("--sizes", default="", help="batch sizes of the 'ours' rows (default: 1 and --batch)")
    ap.add_argument("--profile-step", action="store_true",
                    help="profile one 4-step generate per size: GPU kernel time vs wall, copies, top kernels")
    ap.add_argument("--ref-sizes", default="", help="batch sizes of the diffusers rows (default: --sizes)")
    ap.add_argument("--no-probe", action="store_true", help="skip the float8-vs-bf16 latent check (an eager bf16 generate at the first size)")
    ap.add_argument("--breakdown-calls", type=int, default=2, help="timed generate() calls per point of the time breakdown")
    ap.add_argument("--profile-stream", type=int, default=0,
                    help="after the rows: a stream of this many calls (at the last size) under the profiler (GPU activity only): "
                         "busy and idle time of the GPU, the largest gaps and what surrounds them")
    ap.add_argument("--vae-batch", type=int, default=16, help="engine.vae_batch")
    ap.add_argument("--compile-cache", default="", help="torch.compiler cache artifacts to load first (a file from an earlier run)")
    ap.add_argument("--save-compile-cache", action="store_true", help="write $OUT/compile_cache.bin at the end")
    args = ap.parse_args()
    sizes = [int(x) for x in args.sizes.split(",") if x] or [1, args.batch]
    ref_sizes = [int(x) for x in args.ref_sizes.split(",") if x] or sizes
    start_clock_log()
    if args.compile_cache and Path(args.compile_cache).is_file():
        t = time.perf_counter()
        info = torch.compiler.load_cache_artifacts(Path(args.compile_cache).read_bytes())
        print(f"[bench] loaded compile cache {args.compile_cache} in {time.perf_counter() - t:.1f}s: "
              f"{ {k: len(v) for k, v in vars(info).items() if isinstance(v, list)} if info else None }", flush=True)

    from diffusers import StableDiffusionXLPipeline

    from rayimg.config import EngineConfig
    from rayimg.render.adapter_store import AdapterStore
    from rayimg.render.engine import Engine, GenerationRequest
    from rayimg.render.output import png_bytes
    from rayimg.render.renderer import Renderer
    from rayimg.render.schedulers import make_scheduler
    from rayimg.storage import Storage

    device = args.device
    if torch.device(device).type == "cuda":
        RESULTS["notes"]["gpu"] = torch.cuda.get_device_name()
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    # compile settings: the engine's own (rayimg.render.engine._configure_compiler, static graphs)
    RESULTS["notes"].update(vars(args))
    t0 = time.perf_counter()
    pipe = build(args)
    sync(device)
    print(f"[bench] built {'tiny' if args.tiny else 'real-size'} SDXL in {time.perf_counter() - t0:.1f}s", flush=True)
    R, B, S = args.resolution, args.batch, args.steps
    px = R * R

    # ---------------------------------------------------------------- reference: plain diffusers
    if not args.skip_reference:
        ref = StableDiffusionXLPipeline(**pipe.components)
        ref.set_progress_bar_config(disable=True)
        ref.scheduler = make_scheduler("euler", pipe.scheduler.config)

        def ref_call(n, start):
            gens = [torch.Generator("cpu").manual_seed(start + i) for i in range(n)]
            ref(prompt=prompts(n, start), negative_prompt=[""] * n, num_inference_steps=S, guidance_scale=args.guidance,
                width=R, height=R, generator=gens, output_type="pil")

        for n in ref_sizes:
            calls = args.b1_images if n == 1 else args.bulk_calls
            phase(f"diffusers b{n}")
            ref_call(n, 0)  # warm-up
            times = time_calls(lambda: ref_call(n, 100), calls, device)
            per_call = statistics.median(times)
            record({"name": f"diffusers b{n}", "batch": n, "s_per_call": round(per_call, 4), "s_per_image": round(per_call / n, 4),
                    "images_per_s": round(n / per_call, 3), "calls": [round(t, 4) for t in times]})

    # ---------------------------------------------------------------- ours
    opts = {o for o in args.options.split(",") if o}
    if args.no_compile:
        opts.discard("compile")
    cfg = EngineConfig(batch_size=B, compile="compile" in opts, compile_vae="compile_vae" in opts, fuse_qkv="fuse_qkv" in opts,
                       channels_last="channels_last" in opts, fp8="fp8" in opts or "fp8ff" in opts or "fp8ff128" in opts, batch_invariant=False,
                       fp8_linears="norm_fed+ff" if "fp8ff" in opts else "norm_fed+ff128" if "fp8ff128" in opts else "norm_fed",
                       compile_mode="reduce-overhead" if "cudagraphs" in opts else "default",
                       png_compress_level=args.png_level, vae_batch=args.vae_batch)
    # the fp8 check runs at the first batch size measured, so that it compiles no graph of its own
    probe = [GenerationRequest(prompt=p, negative_prompt="", steps=S, guidance_scale=args.guidance, width=R, height=R,
                               scheduler="euler", seed=7 + i) for i, p in enumerate(prompts(sizes[0], 7))]
    exact_latent = None
    if cfg.fp8 and not args.no_probe:
        # the final latents of the probe batch with the exact (bf16) engine, before the UNet is converted
        exact_latent = torch.stack(Engine(pipe, batch_invariant=False).generate(probe, output_type="latent")).float()
    registry = tempfile.mkdtemp(prefix="rayimg-bench-registry-")
    t = time.perf_counter()
    names = publish_adapters(pipe, registry, args.adapters, args.rank, "bench/sdxl-random", "0" * 64) if args.adapters else []
    print(f"[bench] published {len(names)} adapter(s) in {time.perf_counter() - t:.1f}s", flush=True)
    store = AdapterStore(Storage(), registry, disk_dir=tempfile.mkdtemp(prefix="rayimg-bench-adapters-"), refresh_s=1e9,
                         unet_config=pipe.unet.config)
    renderer = Renderer.from_pipeline(pipe, "bench/sdxl-random", "0" * 64, "sdxl", cfg, adapter_store=store)
    RESULTS["notes"]["engine"] = {k: getattr(cfg, k) for k in ("compile", "compile_mode", "compile_vae", "fuse_qkv", "channels_last", "fp8", "fp8_linears", "batch_invariant",
                                                                "png_compress_level", "vae_batch")}
    if exact_latent is not None:
        fp8_latent = torch.stack(renderer.engine.generate(probe, output_type="latent")).float()
        RESULTS["notes"]["fp8_final_latent_rel_diff"] = round(float((fp8_latent - exact_latent).norm() / exact_latent.norm()), 5)
        print(f"[bench] fp8 vs bf16 final latents: relative difference {RESULTS['notes']['fp8_final_latent_rel_diff']}", flush=True)

    def requests(n, start, adapters=()):
        return [GenerationRequest(prompt=p, negative_prompt="", steps=S, guidance_scale=args.guidance, width=R, height=R,
                                  scheduler="euler", seed=start + i, adapters=tuple(adapters)) for i, p in enumerate(prompts(n, start))]

    for n in sizes:
        calls = args.b1_images if n == 1 else args.bulk_calls
        sync(device)
        phase(f"ours b{n} first call")
        t = time.perf_counter()
        renderer.render(requests(n, 0))  # warm-up (compiles at this batch size)
        sync(device)
        warm = time.perf_counter() - t
        print(f"[bench] ours b{n}: first call {warm:.1f}s", flush=True)
        # one render() call at a time, PNGs encoded in the call: a request's latency
        times = time_calls(lambda: renderer.render(requests(n, 100)), calls, device)
        latency = statistics.median(times)
        # a stream of calls as the render job's actors run them (render_stream: each batch's PNG
        # encoding overlaps the next batch's generation): the job's throughput
        # batch k is yielded right after batch k+1's generation, the last one after its own
        # encode: the interval between the 2nd and the next-to-last yield is the steady state of a
        # long job (the wall time also holds one unhidden encode, the last batch's)
        streamed = max(calls, args.stream_calls)

        def stream(start):
            renderer.stream_stats.update({k: 0 for k in renderer.stream_stats})
            renderer.engine.prefetch_wait_s = 0.0
            sync(device)
            t = time.perf_counter()
            yields, gen_s = [], []
            for batch in renderer.render_stream([requests(n, start + c * n) for c in range(streamed)]):
                yields.append(time.perf_counter())
                gen_s.append(batch[0][0].seconds * n)  # the generate() call of this batch, wall
            sync(device)
            phases[start] = {**{k: round(v, 3) for k, v in renderer.stream_stats.items()},
                             "prefetch_wait_s": round(renderer.engine.prefetch_wait_s, 3)}
            return (time.perf_counter() - t) / streamed, (yields[-2] - yields[0]) / (streamed - 2), statistics.median(gen_s[1:])

        phases: dict = {}

        phase(f"ours b{n} stream")
        per_call, steady, stream_gen = stream(200)
        phase(f"ours b{n} breakdown")
        variants = {}
        wanted = {v for v in args.stream_variants.split(",") if v}
        if "all" in wanted:
            wanted = {"no_prefetch", "again", "prefetch_steps", "prefetch_thread", "prefetch_low_priority", "png_1_thread", "no_png"}
        if "no_prefetch" in wanted:
            # the same stream without the background prompt encoding (each call encodes its own)
            renderer.engine.prefetch_text = False
            variants["no_prefetch"] = [round(x, 4) for x in stream(600)]
            renderer.engine.prefetch_text = torch.device(device).type == "cuda"
        if "again" in wanted:
            variants["again"] = [round(x, 4) for x in stream(700)]
        if "prefetch_steps" in wanted:
            # prompts encoded on this thread, one per step callback (Engine.prefetch_mode "steps")
            mode, renderer.engine.prefetch_mode = renderer.engine.prefetch_mode, "steps"
            variants["prefetch_steps"] = [round(x, 4) for x in stream(750)]
            renderer.engine.prefetch_mode = mode
        if "prefetch_thread" in wanted:
            # prompts encoded in a worker thread (Engine.prefetch_mode "thread"; the default is "steps")
            mode, renderer.engine.prefetch_mode = renderer.engine.prefetch_mode, "thread"
            variants["prefetch_thread"] = [round(x, 4) for x in stream(760)]
            renderer.engine.prefetch_mode = mode
        if "prefetch_low_priority" in wanted:
            # the background encoding's side stream at the default priority (the engine's is high)
            renderer.engine.prefetch_priority = 0
            variants["prefetch_low_priority"] = [round(x, 4) for x in stream(780)]
            renderer.engine.prefetch_priority = -1
        if "png_1_thread" in wanted:
            # PNGs encoded by one thread instead of the pool
            from concurrent.futures import ThreadPoolExecutor

            pool, renderer._png_pool = renderer._png_pool, ThreadPoolExecutor(max_workers=1)
            variants["png_1_thread"] = [round(x, 4) for x in stream(800)]
            renderer._png_pool = pool
        if "no_png" in wanted:
            # no PNGs at all (the floor)
            from rayimg.render.renderer import RenderedImage

            renderer._encode_and_sink = lambda reqs, images, seconds, sink: [(RenderedImage("", b"", {}, seconds), None) for _ in images]
            variants["no_png"] = [round(x, 4) for x in stream(900)]
            del renderer._encode_and_sink
        if variants:
            print("[bench] stream variants (per call, steady, generate) " + json.dumps(variants), flush=True)
        # where the time goes: generation at S and at 2 steps (no PNG) -> per-step and fixed cost;
        # the VAE decode alone; one PNG encode
        gen = {}
        for steps in (S, 2):
            reqs = [dataclasses.replace(r, steps=steps) for r in requests(n, 300)]
            gen[steps] = statistics.median(time_calls(lambda: renderer.engine.generate(reqs), args.breakdown_calls, device))
        step_s = (gen[S] - gen[2]) / (S - 2)
        latents = torch.randn(n, 4, R // 8, R // 8, device=device, dtype=pipe.vae.dtype)
        with torch.no_grad():
            vae_s = statistics.median(time_calls(lambda: pipe.vae.decode(latents / pipe.vae.config.scaling_factor), 3, device))
            vae_cl = {}
            if args.vae_cl_compare:
                # a second VAE with the same weights, its decoder in channels-last and compiled
                # as the engine compiles it (a module's layout cannot change under its compiled graph)
                vae2 = type(pipe.vae).from_config(pipe.vae.config).to(device=device, dtype=pipe.vae.dtype)
                if vae2 is not None:
                    if any(".to_qkv." in k for k in pipe.vae.state_dict()):
                        vae2.fuse_qkv_projections()
                    vae2.load_state_dict(pipe.vae.state_dict())
                    vae2.eval().requires_grad_(False)
                    vae2.decoder.to(memory_format=torch.channels_last)
                    vae2.decoder.compile(dynamic=False)
                    ref_img = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample.float()
                    t = time.perf_counter()
                    cl_img = vae2.decode(latents / pipe.vae.config.scaling_factor).sample.float()
                    sync(device)
                    vae_cl = {"first_call_s": round(time.perf_counter() - t, 1),
                              "rel_diff": round(float((cl_img - ref_img).norm() / ref_img.norm()), 6),
                              "vae_decode_channels_last_s": round(statistics.median(
                                  time_calls(lambda: vae2.decode(latents / pipe.vae.config.scaling_factor), 3, device)), 4),
                              "vae_decode_again_s": round(statistics.median(
                                  time_calls(lambda: pipe.vae.decode(latents / pipe.vae.config.scaling_factor), 3, device)), 4)}
                    print("[bench] VAE channels-last " + json.dumps(vae_cl), flush=True)
                    del ref_img, cl_img, vae2
        # the UNet alone at this batch (CFG doubles it), same shapes as in the pipeline: the
        # compiled graph is reused; step minus this is the pipeline's own per-step overhead
        unet = pipe.unet
        lat = torch.randn(2 * n, 4, R // 8, R // 8, device=device, dtype=unet.dtype)
        emb = torch.randn(2 * n, 77, unet.config.cross_attention_dim, device=device, dtype=unet.dtype)
        added = {"text_embeds": torch.randn(2 * n, pipe.text_encoder_2.config.projection_dim, device=device, dtype=unet.dtype),
                 "time_ids": torch.tensor([[R, R, 0, 0, R, R]] * (2 * n), device=device, dtype=unet.dtype)}
        tt = pipe.scheduler.timesteps[5] if len(pipe.scheduler.timesteps) > 5 else torch.tensor(500.0, device=device)
        with torch.no_grad():
            unet_s = statistics.median(time_calls(lambda: [unet(lat, tt, encoder_hidden_states=emb, added_cond_kwargs=added, return_dict=False)
                                                          for _ in range(5)], 3, device)) / 5
            # the same UNet fed a real batch's text embeddings (negative first, as the pipeline
            # stacks them) instead of random ones, timed alternately with the random inputs: under
            # the GPU's power cap the data can change the clock (render run 11)
            real = renderer.engine._prompt_embeds(requests(n, 500))
            if "negative_prompt_embeds" in real and real.get("pooled_prompt_embeds") is not None:
                emb_real = torch.cat([real["negative_prompt_embeds"], real["prompt_embeds"]]).to(unet.dtype)
                added_real = {"text_embeds": torch.cat([real["negative_pooled_prompt_embeds"], real["pooled_prompt_embeds"]]).to(unet.dtype),
                              "time_ids": added["time_ids"]}
                rand_t, real_t = [], []
                for _ in range(3):
                    rand_t += time_calls(lambda: [unet(lat, tt, encoder_hidden_states=emb, added_cond_kwargs=added, return_dict=False)
                                                  for _ in range(5)], 1, device)
                    real_t += time_calls(lambda: [unet(lat, tt, encoder_hidden_states=emb_real, added_cond_kwargs=added_real, return_dict=False)
                                                  for _ in range(5)], 1, device)
                real_inputs = {"random_embeds_s": round(statistics.median(rand_t) / 5, 5), "real_embeds_s": round(statistics.median(real_t) / 5, 5)}
                print("[bench] UNet alone, random vs real text embeddings " + json.dumps(real_inputs), flush=True)
            else:
                real_inputs = {}
        if args.unet_compare:
            compare_unets(args, opts, pipe, n, (lat, tt, emb, added), unet_s, device)
        # the text encoders as a diffusers call runs them (n prompts + n negative prompts, each
        # through both encoders), one text at a time as the engine encodes (cache bypassed)
        texts = [r.prompt for r in requests(n, 500)] + [""] * n
        text_s = statistics.median(time_calls(lambda: [renderer.engine._encode_text(x) for x in texts], 3, device))
        image = renderer.engine.generate(requests(n, 400))[0]  # this batch size: no graph of another size to compile
        png_s = statistics.median(time_calls(lambda: png_bytes(image, {"k": "v"}, args.png_level), 3, "cpu"))
        record({"name": f"ours b{n}", "batch": n, "first_call_s": round(warm, 2), "s_per_call": round(per_call, 4),
                "s_per_image": round(per_call / n, 4), "images_per_s": round(n / per_call, 3), "streamed_calls": streamed,
                "steady_s_per_image": round(steady / n, 4), "steady_images_per_s": round(n / steady, 3),
                "stream_generate_s_per_call": round(stream_gen, 4), "stream_phases_s": phases, "stream_variants_s_per_call_steady_generate": variants,
                "latency_s_per_call": round(latency, 4), "latency_calls": [round(t, 4) for t in times],
                "breakdown": {"generate_s": round(gen[S], 4), "unet_step_s": round(step_s, 5), "unet_forward_alone_s": round(unet_s, 5), "unet_alone_inputs": real_inputs,
                              "fixed_s": round(gen[2] - 2 * step_s, 4), "vae_decode_s": round(vae_s, 4),
                              "vae_channels_last": vae_cl, "png_encode_s_per_image": round(png_s, 4), "text_encoders_s_per_call_uncached": round(text_s, 4)},
                "text_stats": dict(renderer.engine.text_stats)})

    if args.save_compile_cache:
        t = time.perf_counter()
        saved = torch.compiler.save_cache_artifacts()
        if saved:
            (out_dir() / "compile_cache.bin").write_bytes(saved[0])
            RESULTS["notes"]["compile_cache_bytes"] = len(saved[0])
            print(f"[bench] saved compile cache: {len(saved[0]) / 2**20:.1f} MiB in {time.perf_counter() - t:.1f}s", flush=True)

    if names:
        # swap times: cold = registry -> disk -> CPU -> fused; warm = CPU -> fused
        cold, warm = [], []
        for name in names[:3]:
            sync(device)
            t = time.perf_counter()
            renderer.use_adapters(((name, "1", 1.0),))
            sync(device)
            cold.append(time.perf_counter() - t)
        for name in names[:3]:
            sync(device)
            t = time.perf_counter()
            renderer.use_adapters(((name, "1", 0.8),))
            sync(device)
            warm.append(time.perf_counter() - t)
        renderer.use_adapters(())
        record({"name": "adapter swap", "rank": args.rank, "cold_s": [round(x, 4) for x in cold], "warm_s": [round(x, 4) for x in warm]})
        store.clear_cpu() if hasattr(store, "clear_cpu") else None
        # the catalog: rows_per_adapter rows per adapter, grouped by adapter set as the job sorts them
        rows = [(names[i % len(names)], i) for i in range(len(names) * args.rows_per_adapter)]
        rows.sort()
        batches = []
        for name in names:
            mine = [seed for n_, seed in rows if n_ == name]
            for s in range(0, len(mine), B):
                batches.append([GenerationRequest(prompt=prompts(1, seed)[0], negative_prompt="", steps=S, guidance_scale=args.guidance,
                                                  width=R, height=R, scheduler="euler", seed=seed, adapters=((name, "1", 1.0),))
                                for seed in mine[s:s + B]])
        images = sum(len(b) for b in batches)
        sync(device)
        t = time.perf_counter()
        for _ in renderer.render_stream(batches):  # as the render job's actors run a sorted catalog
            pass
        sync(device)
        with_adapters = time.perf_counter() - t
        renderer.use_adapters(())
        base = next(r for r in RESULTS["rows"] if r["name"] == f"ours b{B}")
        ips = images / with_adapters
        record({"name": f"ours b{B} {len(names)} adapters", "batch": B, "images": images, "seconds": round(with_adapters, 3),
                "images_per_s": round(ips, 3), "no_adapter_images_per_s": base["images_per_s"],
                "ratio_to_no_adapter": round(ips / base["images_per_s"], 4), "prefetched_adapters": renderer.prefetched_adapters, "prefetch": dict(renderer.prefetch_stats),
                "while_busy": {"parts": renderer.engine.busy_stats["parts"], "seconds": round(renderer.engine.busy_stats["seconds"], 3),
                               "lead_steps_median": statistics.median(renderer.engine.busy_stats["lead_steps"] or [0]),
                               "lead_steps_min": min(renderer.engine.busy_stats["lead_steps"] or [0])},
                "text_stats": dict(renderer.engine.text_stats), "store": store.stats.as_dict() if hasattr(store, "stats") else None})

    if args.profile_stream and torch.device(device).type == "cuda":
        phase("profile stream")
        n = sizes[-1]
        profile_stream(renderer, [requests(n, 1000 + c * n) for c in range(args.profile_stream)], n)
    phase("end")
    if args.profile_step and torch.device(device).type == "cuda":
        # last: a profile of a large batch can take minutes to collect, and must not cost the rows above
        for n in sizes:
            profile_generate(renderer.engine, [dataclasses.replace(r, steps=2) for r in requests(n, 800)], n)
            (out_dir() / "render_bench.json").write_text(json.dumps(RESULTS, indent=1))
    if torch.device(device).type == "cuda":
        RESULTS["notes"]["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    by = {r["name"]: r for r in RESULTS["rows"]}
    summary = {}
    for n in sizes:
        if f"diffusers b{n}" in by:
            summary[f"b{n}_speedup"] = round(by[f"ours b{n}"]["images_per_s"] / by[f"diffusers b{n}"]["images_per_s"], 3)
        summary[f"ours_b{n}_s_per_image"] = by[f"ours b{n}"]["s_per_image"]
        summary[f"ours_b{n}_images_per_s"] = by[f"ours b{n}"]["images_per_s"]
    refs = [r for r in RESULTS["rows"] if r["name"].startswith("diffusers b") and r["batch"] > 1]
    if refs and any(n > 1 for n in sizes):
        # the bulk ratio: our best batch against the reference's best batch, both measured here
        best_ref = max(refs, key=lambda r: r["images_per_s"])
        best = max((by[f"ours b{n}"] for n in sizes if n > 1), key=lambda r: r["images_per_s"])
        summary["bulk_best_vs_reference_best"] = {"ours": best["name"], "reference": best_ref["name"],
                                                  "ratio": round(best["images_per_s"] / best_ref["images_per_s"], 3)}
    if CLOCK_LOG is not None:
        CLOCK_LOG.terminate()
    RESULTS["summary"] = summary
    try:  # CUDA graphs (compile_mode reduce-overhead): graphs skipped, inputs copied at each replay
        from torch._dynamo.utils import counters

        RESULTS["notes"]["cudagraph_counters"] = {k: v for k, v in counters["inductor"].items() if "cudagraph" in k}
        # graphs dynamo made, and why it broke any (a break splits a forward into several graphs)
        RESULTS["notes"]["dynamo_counters"] = {"stats": dict(counters["stats"]), "graph_breaks": {k[:200]: v for k, v in counters["graph_break"].items()}}
        print("COUNTERS " + json.dumps({**RESULTS["notes"]["cudagraph_counters"], **RESULTS["notes"]["dynamo_counters"]}), flush=True)
    except Exception:  # noqa: BLE001 - a diagnostic only
        pass
    print("SUMMARY " + json.dumps(summary), flush=True)
    (out_dir() / "render_bench.json").write_text(json.dumps(RESULTS, indent=1))


if __name__ == "__main__":
    main()
