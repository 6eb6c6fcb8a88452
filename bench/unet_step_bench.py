"""The render engine's UNet step alone (issue 5): the real-size SDXL UNet (random init, bf16,
fused QKV) at 1024², compiled as the engine compiles it (``nn.Module.compile``, default mode),
called with the shapes a CFG pipeline step passes (batch = 2 × images).

Per variant (``bf16`` / ``fp8`` (:mod:`rayimg.render.fp8`; ``:all`` every attention-block linear in float8, not only the LayerNorm-fed ones; ``:ff`` / ``:ff128`` also ``ff.net.2``, per row through the Triton GEGLU kernel / per 1×128 block); flags ``:cl`` a channels-last UNet,
``:cudnn`` cuDNN attention first, ``:conv`` the ResNet and upsampler convolutions in float8
(:mod:`rayimg.render.fp8_conv`, as ``engine.fp8_convs``; ``:convn`` only the GroupNorm-fed ones, ``:convns`` those and the upsamplers), ``:loop`` inductor's own persistent-reduction limit (1,024) instead of the engine's 4,096 (``RAYIMG_PERSISTENT_ROWS``), ``:cdt`` coordinate-descent tuning, ``:pdl`` programmatic dependent launch of inductor's Triton kernels, ``:cdtall`` the same in all directions without epilogue fusion, ``:bench`` a second row of the same graph with ``cudnn.benchmark``, ``:eager`` no compile, ``:ro`` compiled in mode reduce-overhead as ``engine.compile_mode``
does, so its forward replays CUDA graph trees and no manual graph is taken) and
batch, one ``RESULT`` line:

- ``compile_s``: the first call (cold compile at this batch);
- ``forward_s``: mean of back-to-back calls (the GPU queue stays full unless the CPU is slower);
- ``launch_s``: CPU time of one call (return without sync), after a sync; close to or above
  ``forward_s`` means the step is launch-bound;
- ``graph_s``: the same compiled forward captured once in a CUDA graph and replayed (what
  ``engine.compile_mode: reduce-overhead`` buys, measured without a second compile);
- ``sustained_s`` (``--sustain-s``): the step (graph replay, or the ``:ro`` forward) over the
  second half of that many seconds back to back;
- ``tflops``: achieved, from the model FLOPs (6.76 TFLOP per image forward at 1024², counted).

    python bench/unet_step_bench.py --variants bf16,fp8 --batches 2,8
    python bench/unet_step_bench.py --tiny --device cpu --batches 2 --variants bf16   # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FLOP_PER_SAMPLE = 6.76e12  # real-size SDXL UNet forward at 1024² (bench/README.md)
RESULTS: dict = {"rows": []}


def out_dir() -> Path:
    p = Path(os.environ.get("OUT", "outputs/bench"))
    p.mkdir(parents=True, exist_ok=True)
    return p


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def build_unet(args, variant: str):
    if args.tiny:
        from rayimg.models.tiny import build_tiny_sdxl

        unet = build_tiny_sdxl(0).unet.to(args.device)
    else:
        from rayimg.models.real_size import build_sdxl_unet

        unet = build_sdxl_unet(torch.bfloat16, args.device)
    unet.eval().requires_grad_(False)
    unet.fuse_qkv_projections()
    flags = set(variant.split(":")[1:])
    if "cl" in flags:
        unet.to(memory_format=torch.channels_last)
    if variant.startswith("fp8"):
        from rayimg.render.fp8 import convert_unet

        RESULTS.setdefault("notes", {})[f"fp8_linears_{variant}"] = convert_unet(
            unet, "all" if "all" in flags else "norm_fed+ff" if "ff" in flags else "norm_fed+ff128" if "ff128" in flags else "norm_fed")
    if flags & {"conv", "convn", "convns"}:
        from rayimg.render.fp8_conv import convert_convs

        roles = ("normed",) if "convn" in flags else ("normed", "sample") if "convns" in flags else ("normed", "rows", "sample")
        RESULTS.setdefault("notes", {})[f"fp8_convs_{variant}"] = convert_convs(unet, roles)
    if "eager" not in flags:
        from rayimg.render.engine import _configure_compiler

        _configure_compiler(persistent_rows=False if "loop" in flags else None)
        import torch._inductor.config as inductor_config

        # ``:cdt``: inductor's coordinate-descent tuning of its Triton kernels (longer compile)
        inductor_config.coordinate_descent_tuning = "cdt" in flags
        # ``:pdl``: programmatic dependent launch for inductor's Triton kernels (Hopper: a kernel's
        # launch overlaps the tail of the one before it; same math)
        if hasattr(inductor_config.triton, "enable_pdl"):
            inductor_config.triton.enable_pdl = "pdl" in flags
        elif "pdl" in flags:
            raise SystemExit(f"this torch ({torch.__version__}) has no torch._inductor.config.triton.enable_pdl")
        # ``:cdtall``: the published diffusers recipe (coordinate descent in all directions, no epilogue fusion)
        inductor_config.coordinate_descent_check_all_directions = "cdtall" in flags
        if "cdtall" in flags:
            inductor_config.coordinate_descent_tuning = True
            inductor_config.epilogue_fusion = False
        # as the engine compiles it (``:ro``: engine.compile_mode reduce-overhead, CUDA graph trees)
        unet.compile(mode="reduce-overhead" if "ro" in flags else None, dynamic=False)
    return unet


def sdpa_context(variant: str):
    """``:cudnn``: cuDNN attention first (flash as fallback), as set around tracing and calls."""
    import contextlib

    if "cudnn" not in variant.split(":")[1:]:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
                       set_priority=True)


ENERGY: dict = {}  # variant@batch -> joules per step, watts and SM clock over the sustained window


def gpu_reading() -> dict | None:
    """The GPU's energy counter since the driver loaded (J), power draw (W), SM clock (MHz) and
    active clock-event reasons (0x4: the software power cap), from ``nvidia-smi``; None without it."""
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return None
    out = subprocess.run(["nvidia-smi", "--query-gpu=total_energy_consumption,power.draw,clocks.sm,clocks_event_reasons.active",
                          "--format=csv,noheader,nounits", "-i", str(torch.cuda.current_device())], capture_output=True, text=True).stdout
    try:
        energy, power, clock, reasons = [x.strip() for x in out.strip().splitlines()[0].split(",")]
    except (ValueError, IndexError):
        return None

    def number(x):
        try:
            return float(x)
        except ValueError:  # "[N/A]": not reported by this GPU or driver
            return None

    joules = number(energy)
    return {"joules": joules / 1e3 if joules is not None else None, "watts": number(power), "mhz": number(clock), "reasons": reasons}


def sustained(step, dev, seconds: float) -> float | None:
    """Mean time of ``step`` over the second half of ``seconds`` of back-to-back runs (clocks
    settle under a sustained load: a render runs for minutes, a timing loop for a second). On an
    H100 that load runs into the 700 W power cap (clock-event reason 0x4) and the SM clock drops
    to 1.4-1.7 GHz (render run 11), so the energy of a step decides its sustained time: the GPU's
    energy counter is read around the second half too (``ENERGY["last"]``: J per step, mean W, the
    SM clock sampled along the way)."""
    if seconds <= 0:
        return None
    times, clocks, watts = [], [], []
    start = time.perf_counter()
    end = start + seconds
    first = None
    while time.perf_counter() < end:
        if first is None and time.perf_counter() >= start + seconds / 2 and torch.device(dev).type == "cuda":
            first = (gpu_reading(), len(times))
            t_first = time.perf_counter()
        t0 = time.perf_counter()
        for _ in range(5):
            step()
        sync(dev)
        times.append((time.perf_counter() - t0) / 5)
        if first is not None and len(times) % 4 == 0:
            reading = gpu_reading()
            if reading and reading["mhz"] is not None:
                clocks.append(reading["mhz"])
                watts.append(reading["watts"])
    last = gpu_reading() if first is not None else None
    if first is not None and first[0] and last and first[0]["joules"] is not None and last["joules"] is not None:
        steps = 5 * (len(times) - first[1])
        wall = time.perf_counter() - t_first
        ENERGY["last"] = {"joules_per_step": round((last["joules"] - first[0]["joules"]) / steps, 2),
                          "watts": round((last["joules"] - first[0]["joules"]) / wall, 1),
                          "mhz_mean": round(sum(clocks) / len(clocks)) if clocks else None, "reasons": last["reasons"]}
        half = times[first[1]:]
    elif clocks:  # no energy counter: the sampled power and clock
        ENERGY["last"] = {"watts_sampled": round(sum(w for w in watts if w) / max(1, len(watts)), 1),
                          "mhz_mean": round(sum(clocks) / len(clocks)), "reasons": last["reasons"] if last else None}
        half = times[first[1]:] if first is not None else times[len(times) // 2:]
    else:
        half = times[len(times) // 2:]
    return sum(half) / len(half)


def measure(call, dev, iters: int, graphs: bool = True, sustain_s: float = 0.0):
    """(mean back-to-back forward, CPU launch times, CUDA-graph replay or None, graph vs eager
    max diff, sustained step or None). ``graphs=False``: no manual CUDA graph (a ``:ro`` variant,
    whose compiled forward replays CUDA graphs itself); the sustained step is then its forward."""
    for _ in range(3):
        call()
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(iters):
        call()
    sync(dev)
    forward_s = (time.perf_counter() - t0) / iters
    launches = []
    for _ in range(3):
        sync(dev)
        t0 = time.perf_counter()
        call()
        launches.append(time.perf_counter() - t0)
    sync(dev)
    graph_s = graph_diff = sustain = None
    if not graphs:
        sustain = sustained(call, dev, sustain_s)
    if graphs and torch.device(dev).type == "cuda":
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                call()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = call()
        graph.replay()
        sync(dev)
        ref = call()
        graph_diff = float((static_out.float() - ref.float()).abs().max())
        t0 = time.perf_counter()
        for _ in range(iters):
            graph.replay()
        sync(dev)
        graph_s = (time.perf_counter() - t0) / iters
        sustain = sustained(graph.replay, dev, sustain_s)
        del graph, static_out
    return forward_s, launches, graph_s, graph_diff, sustain


def profile_kernels(call, variant: str, batch: int) -> None:
    """One forward under the profiler: the top kernels by CUDA time, and every attention kernel."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    total = sum(e.device_time_total for e in events)
    events.sort(key=lambda e: -e.device_time_total)
    top = [(e.key[:90], round(e.device_time_total / 1e3, 3), e.count) for e in events[:25]]
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from render_bench import kernel_category

    categories: dict[str, list] = {}
    for e in events:
        c = categories.setdefault(kernel_category(e.key), [0.0, 0])
        c[0] += e.device_time_total / 1e3
        c[1] += e.count
    attention = [(e.key[:90], round(e.device_time_total / 1e3, 3), e.count) for e in events
                 if any(w in e.key.lower() for w in ("sdpa", "flash", "fmha", "attention", "attn"))]
    row = {"variant": variant, "batch": batch, "profile_total_ms": round(total / 1e3, 2),
           "categories_ms_calls": {k: [round(v[0], 2), v[1]] for k, v in sorted(categories.items(), key=lambda kv: -kv[1][0])}, "top_kernels_ms": top, "attention_kernels_ms": attention}
    RESULTS.setdefault("profiles", []).append(row)
    print("PROFILE " + json.dumps(row), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--resolution", type=int, default=1024)
    ap.add_argument("--batches", default="2,8", help="UNet batch sizes (2 × images under CFG)")
    ap.add_argument("--variants", default="bf16,fp8")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--sustain-s", type=float, default=0.0, help="also time steps back to back for this long (sustained_s)")
    ap.add_argument("--profile", action="store_true", help="print the top CUDA kernels of one forward per variant")
    ap.add_argument("--budget-s", type=float, default=1e9, help="start no new row after this many seconds")
    ap.add_argument("--save-compile-cache", action="store_true", help="write $OUT/compile_cache.bin (torch.compiler artifacts) at the end")
    ap.add_argument("--compile-cache", default="", help="torch.compiler artifacts to load first")
    args = ap.parse_args()
    if torch.device(args.device).type == "cuda":
        RESULTS["gpu"] = torch.cuda.get_device_name()
    if args.compile_cache and Path(args.compile_cache).is_file():
        torch.compiler.load_cache_artifacts(Path(args.compile_cache).read_bytes())
    t_start = time.perf_counter()
    R = args.resolution // 8
    for variant in [v for v in args.variants.split(",") if v]:
        if time.perf_counter() - t_start > args.budget_s:
            break
        unet = build_unet(args, variant)
        flags = set(variant.split(":")[1:])
        cfg = unet.config
        for b in [int(x) for x in args.batches.split(",") if x]:
            if time.perf_counter() - t_start > args.budget_s:
                print(f"[unet] budget spent, skipping {variant} b{b}", flush=True)
                continue
            dev, dt = args.device, unet.dtype
            lat = torch.randn(b, cfg.in_channels, R, R, device=dev, dtype=dt)
            emb = torch.randn(b, 77, cfg.cross_attention_dim, device=dev, dtype=dt)
            proj = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
            added = {"text_embeds": torch.randn(b, proj, device=dev, dtype=dt),
                     "time_ids": torch.tensor([[1024, 1024, 0, 0, 1024, 1024]] * b, device=dev, dtype=dt)}
            t = torch.tensor(500.0, device=dev)

            def call():
                return unet(lat, t, encoder_hidden_states=emb, added_cond_kwargs=added, return_dict=False)[0]

            with torch.no_grad(), sdpa_context(variant):
                sync(dev)
                t0 = time.perf_counter()
                call()
                sync(dev)
                compile_s = time.perf_counter() - t0
                runs = [(variant, measure(call, dev, args.iters, graphs="ro" not in flags, sustain_s=args.sustain_s))]
                if args.profile and torch.device(dev).type == "cuda":
                    profile_kernels(call, variant, b)
                if "bench" in flags and torch.device(dev).type == "cuda":
                    # the same compiled graph with cuDNN picking convolution algorithms by timing
                    torch.backends.cudnn.benchmark = True
                    for _ in range(3):
                        call()
                    runs.append((variant + "+cudnn_benchmark", measure(call, dev, args.iters, graphs="ro" not in flags)))
                    torch.backends.cudnn.benchmark = False
            for name, (forward_s, launches, graph_s, graph_diff, sustain) in runs:
                n_img = b / 2
                row = {"variant": name, "batch": b, "images": n_img, "compile_s": round(compile_s, 1), "forward_s": round(forward_s, 5),
                       "launch_s": round(min(launches), 5), "graph_s": round(graph_s, 5) if graph_s else None,
                       "graph_max_abs_diff": graph_diff if graph_s else None,
                       "sustained_s": round(sustain, 5) if sustain else None,
                       "sustained_energy": ENERGY.pop("last", None) if sustain else None,
                       "tflops_forward": round(b * FLOP_PER_SAMPLE / forward_s / 1e12, 1) if not args.tiny else None,
                       "tflops_graph": round(b * FLOP_PER_SAMPLE / graph_s / 1e12, 1) if graph_s and not args.tiny else None}
                RESULTS["rows"].append(row)
                print("RESULT " + json.dumps(row), flush=True)
                (out_dir() / "unet_step_bench.json").write_text(json.dumps(RESULTS, indent=1))
        del unet
        torch._dynamo.reset()
        if torch.device(args.device).type == "cuda":
            torch.cuda.empty_cache()

    if args.save_compile_cache:
        saved = torch.compiler.save_cache_artifacts()
        if saved:
            (out_dir() / "compile_cache.bin").write_bytes(saved[0])
            print(f"[unet] saved compile cache: {len(saved[0]) / 2**20:.1f} MiB", flush=True)


if __name__ == "__main__":
    main()
