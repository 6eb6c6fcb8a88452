"""The SDXL VAE decode alone (issue 5): the real-size VAE (random init, bf16) decoding 1024²
latents, per variant: ``eager``, ``compiled`` (the decoder compiled as ``engine.compile_vae``
does), ``compiled_cl`` (the same on a channels-last decoder), each with the same decode call the
pipeline makes (``vae.decode(latents / scaling_factor)``). One ``RESULT`` line per (variant,
batch): first call, then the median of back-to-back decodes and of CUDA-graph replays.

    python bench/vae_bench.py --batches 1,4 --variants eager,compiled,compiled_cl
    python bench/vae_bench.py --batches 16 --variants compiled --profile     # where the decode's time goes
    python bench/vae_bench.py --batches 16 --variants compiled,compiled:gn:attn --profile
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def timed(fn, n: int) -> float:
    times = []
    for _ in range(n):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def profile(call) -> dict:
    """Kernel families (ms, calls) and the top 15 kernels of one ``call()``."""
    from render_bench import kernel_category
    from torch.profiler import ProfilerActivity, profile as torch_profile

    with torch.no_grad(), torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    events = sorted((e for e in prof.key_averages() if e.device_type.name == "CUDA"), key=lambda e: -e.device_time_total)
    families: dict[str, list] = {}
    for e in events:
        f = families.setdefault(kernel_category(e.key), [0.0, 0])
        f[0] += e.device_time_total / 1e3
        f[1] += e.count
    return {"families_ms_calls": {k: [round(v[0], 2), v[1]] for k, v in sorted(families.items(), key=lambda kv: -kv[1][0])},
            "top_kernels_ms": [(e.key[:90], round(e.device_time_total / 1e3, 3), e.count) for e in events[:15]]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--variants", default="eager,compiled,compiled_cl")
    ap.add_argument("--resolution", type=int, default=1024)
    ap.add_argument("--budget-s", type=float, default=1e9)
    ap.add_argument("--profile", action="store_true", help="kernel families and the top kernels of one decode per row")
    args = ap.parse_args()
    from rayimg.models.real_size import build_sdxl_vae
    from rayimg.render.engine import _configure_compiler

    t_start = time.perf_counter()
    result = {"gpu": torch.cuda.get_device_name(), "rows": []}
    R = args.resolution // 8
    first_images: dict = {}
    for variant in args.variants.split(","):
        torch.manual_seed(0)  # the same random weights for every variant: their outputs compare
        vae = build_sdxl_vae(torch.bfloat16, "cuda").eval().requires_grad_(False)
        flags = set(variant.split(":")[1:])
        if variant.split(":")[0].endswith("_cl"):
            vae.to(memory_format=torch.channels_last)
        if flags & {"gn", "attn"}:
            from rayimg.render.vae_decode import speed_up_decoder

            result.setdefault("notes", {})[variant] = speed_up_decoder(vae, group_norms="gn" in flags, attention="attn" in flags)
        if variant.startswith("compiled"):
            _configure_compiler()
            vae.decoder.compile(dynamic=False)
        for b in [int(x) for x in args.batches.split(",") if x]:
            if time.perf_counter() - t_start > args.budget_s:
                print(f"[vae] budget spent, skipping {variant} b{b}", flush=True)
                continue
            torch.manual_seed(0)
            z = torch.randn(b, 4, R, R, device="cuda", dtype=torch.bfloat16)

            def call():
                return vae.decode(z / vae.config.scaling_factor, return_dict=False)[0]

            with torch.no_grad():
                first = timed(call, 1)
                decode = timed(call, 5)
                s = torch.cuda.Stream()
                s.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(s):
                    call()
                torch.cuda.current_stream().wait_stream(s)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    call()
                graph = timed(g.replay, 5)
                del g
            row = {"variant": variant, "batch": b, "first_s": round(first, 2), "decode_s": round(decode, 5), "graph_s": round(graph, 5)}
            with torch.no_grad():
                image = call().float()
            if b not in first_images:
                first_images[b] = (variant, image)
            else:  # the same latents through the first variant's decoder
                base_variant, base = first_images[b]
                row["rel_diff_vs_" + base_variant] = float((image - base).norm() / base.norm())
            del image
            if args.profile:
                row["profile"] = profile(call)
            print("RESULT " + json.dumps(row), flush=True)
            result["rows"].append(row)
        del vae
        torch._dynamo.reset()
        torch.cuda.empty_cache()
    out = Path(os.environ.get("OUT", "outputs/bench"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "vae_bench.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
