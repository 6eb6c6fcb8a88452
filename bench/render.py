"""Render headline: the render engine's stream (`Renderer.render_stream`, what the render job's
actors run: each batch's PNG encoding overlaps the next batch's generation, PNGs included)
against a plain diffusers `StableDiffusionXLPipeline` call loop at the same batch size, in the
same process on the same weights.

Real-size SDXL architecture (random init, bf16) at 1024², 30 Euler steps, CFG 5.0. The engine
runs with the render job's speed settings (`--options`, default fused QKV, channels-last,
torch.compile with CUDA graphs, compiled VAE, float8 linears); `batch_invariant: false`. The
first call at a batch size compiles (about 2.5-3 min cold on an H100) and is not timed.

    python bench/render.py                       # GPU: batch 16, 8-call stream (~6 min on an H100)
    python bench/render.py --batch 1 --calls 5   # GPU: batch 1 (~4.5 min)
    python bench/render.py --smoke               # CPU: tiny SDXL at 64², 3 steps (~15 s)
"""

from __future__ import annotations

import argparse
import statistics
import time

import common

GPU_OPTIONS = "fuse_qkv,channels_last,compile,compile_vae,cudagraphs,fp8"


def build_pipeline(tiny: bool, device: str):
    import torch

    if tiny:
        from rayimg.models.tiny import build_tiny_sdxl

        pipe = build_tiny_sdxl(0).to(device)
    else:
        from sdxl_random import build_sdxl_pipeline

        pipe = build_sdxl_pipeline(torch.bfloat16, device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def engine_config(options: set[str], batch: int, **fields):
    """The render job's ``engine`` section for these speed options (``fields`` set the others;
    ``batch_invariant`` is false unless given)."""
    from rayimg.config import EngineConfig

    return EngineConfig(**{"batch_size": batch, "compile": "compile" in options, "compile_vae": "compile_vae" in options,
                           "fuse_qkv": "fuse_qkv" in options, "channels_last": "channels_last" in options, "fp8": "fp8" in options,
                           "batch_invariant": False, "compile_mode": "reduce-overhead" if "cudagraphs" in options else "default",
                           **fields})


def diffusers_loop(pipe, *, batch: int, calls: int, steps: int, size: int, guidance: float, device: str) -> dict:
    """The reference: ``StableDiffusionXLPipeline(**components)`` called as the diffusers docs
    show it (eager, SDPA attention, PIL output), same scheduler, steps, guidance and size."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    from rayimg.render.schedulers import make_scheduler

    ref = StableDiffusionXLPipeline(**pipe.components)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = make_scheduler("euler", pipe.scheduler.config)

    def call(start: int):
        gens = [torch.Generator("cpu").manual_seed(start + i) for i in range(batch)]
        ref(prompt=common.prompts(batch, start), negative_prompt=[""] * batch, num_inference_steps=steps, guidance_scale=guidance,
            width=size, height=size, generator=gens, output_type="pil")

    counter = iter(range(100, 10_000, batch))
    return common.measure(lambda: call(next(counter)), warmup=1, calls=calls, device=device, items_per_call=batch)


def engine_stream(renderer, *, batch: int, calls: int, steps: int, size: int, guidance: float, device: str) -> dict:
    """One untimed call (compiles this batch size), then a stream of ``calls`` batches through
    ``render_stream``. Batch k is yielded after batch k+1's generation, so the interval from the
    first to the next-to-last yield is the steady state of a long job; the figure is the whole
    stream's wall time (it also holds the last batch's unhidden PNG encode)."""
    from rayimg.render.request import GenerationRequest

    def requests(start: int):
        return [GenerationRequest(prompt=p, negative_prompt="", steps=steps, guidance_scale=guidance, width=size, height=size,
                                  scheduler="euler", seed=start + i) for i, p in enumerate(common.prompts(batch, start))]

    common.sync(device)
    t = time.perf_counter()
    renderer.render(requests(0))
    common.sync(device)
    first = time.perf_counter() - t
    common.log("render", f"engine batch {batch}: first call (compile) {first:.1f}s")
    common.reset_peak_memory(device)
    yields = []
    common.sync(device)
    t = time.perf_counter()
    for _ in renderer.render_stream([requests(200 + c * batch) for c in range(calls)]):
        yields.append(time.perf_counter())
    common.sync(device)
    wall = time.perf_counter() - t
    steady = batch * (calls - 2) / (yields[-2] - yields[0]) if calls >= 3 else None
    gaps = [b - a for a, b in zip(yields, yields[1:])]
    return {"first_call_s": round(first, 2), "calls": calls, "wall_s": round(wall, 3), "images_per_s": batch * calls / wall,
            "s_per_image": wall / (batch * calls), "steady_images_per_s": steady and round(steady, 4),
            "yield_intervals_s": [round(g, 4) for g in gaps], "median_interval_s": round(statistics.median(gaps), 4) if gaps else None,
            "peak_gpu_gib": common.peak_memory_gib(device)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny SDXL at 64², 3 steps: checks the code path, numbers meaningless")
    ap.add_argument("--batch", type=int, default=None, help="batch size of both sides (GPU default 16)")
    ap.add_argument("--calls", type=int, default=None, help="batches in the timed stream (GPU default 8 at batch > 1, 5 at batch 1)")
    ap.add_argument("--ref-calls", type=int, default=None, help="timed diffusers calls after one warm-up (default 1 at batch > 1, 3 at batch 1)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--options", default=None, help=f"engine speed options (GPU default {GPU_OPTIONS})")
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--json", default=None, help="write this headline's JSON here")
    args = ap.parse_args(argv)
    smoke = args.smoke
    device = "cpu" if smoke else "cuda"
    batch = args.batch or (2 if smoke else 16)
    calls = args.calls or (3 if smoke else 8 if batch > 1 else 5)
    ref_calls = args.ref_calls or (1 if smoke or batch > 1 else 3)
    steps = args.steps or (3 if smoke else 30)
    size = args.size or (64 if smoke else 1024)
    options = {o for o in (args.options if args.options is not None else ("fuse_qkv" if smoke else GPU_OPTIONS)).split(",") if o}
    t0 = time.perf_counter()
    env = common.device_info(device)

    import torch

    from rayimg.render.renderer import Renderer

    if common.is_cuda(device):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    t = time.perf_counter()
    pipe = build_pipeline(smoke, device)
    common.log("render", f"built {'tiny' if smoke else 'real-size'} SDXL in {time.perf_counter() - t:.1f}s")
    kw = dict(batch=batch, steps=steps, size=size, guidance=args.guidance, device=device)
    ref = None
    if not args.skip_reference:
        ref = diffusers_loop(pipe, calls=ref_calls, **kw)
        common.log("render", f"reference: diffusers loop {ref['items_per_s']:.3f} images/s at batch {batch}")
    cfg = engine_config(options, batch)
    renderer = Renderer.from_pipeline(pipe, "bench/sdxl-random", "0" * 64, "sdxl", cfg)
    with common.GpuSampler() as gpu:
        ours = engine_stream(renderer, calls=calls, **kw)
    common.log("render", f"engine stream: {ours['images_per_s']:.3f} images/s at batch {batch} (steady {ours['steady_images_per_s']})")
    details = {"batch": batch, "steps": steps, "size": size, "guidance": args.guidance, "options": sorted(options), "engine": ours,
               "reference_measure": ref, "s_per_image": round(ours["s_per_image"], 4),
               "reference_s_per_image": ref and round(1 / ref["items_per_s"], 4), "gpu_samples": gpu.summary()}
    result = common.headline(
        "render", figure=ours["images_per_s"], unit="images/s",
        what=f"Renderer.render_stream, batch {batch}, {calls} calls, {size}², {steps} steps, options {','.join(sorted(options)) or 'none'}",
        reference=ref and ref["items_per_s"], reference_what=f"diffusers StableDiffusionXLPipeline loop, batch {batch}, eager",
        device=env, command=common.command_line(), seconds=time.perf_counter() - t0, details=details)
    common.report(result, args.json)
    return result


if __name__ == "__main__":
    main()
