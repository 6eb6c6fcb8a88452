"""SDPA backends at the SDXL UNet's attention shapes (issue 5): self-attention at 64² latents
(4096 tokens, 10 heads) and 32² (1024 tokens, 20 heads), cross-attention to 77 text tokens,
head dim 64, bf16, CFG batch (2 × images), for q/k/v laid out as plain contiguous tensors or as
diffusers' fused-QKV processor makes them. One ``RESULT`` line per layout, backend and shape: mean
time of back-to-back calls and TFLOP/s (4·B·H·N·M·D), or the error when the backend refuses the
shape; for the engine's priority order (``cudnn_first``) also the kernels that really ran.

    python bench/attention_bench.py                 # GPU
    python bench/attention_bench.py --device cpu --batch 1 --iters 2   # smoke test
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

SHAPES = {"self64": (10, 4096, 4096), "self32": (20, 1024, 1024), "cross64": (10, 4096, 77), "cross32": (20, 1024, 77)}
BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "math": SDPBackend.MATH}
PRIORITY = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def make_qkv(layout: str, batch: int, heads: int, n: int, m: int, device, dtype, g):
    """q, k, v of shape (B, H, N|M, 64): ``contiguous``; ``fused_view`` as diffusers' fused
    processor makes them (views of one (B, N, 3C) projection, transposed); ``fused_contig`` the
    same projection permuted to (3, B, H, N, D) and made contiguous (one copy)."""
    c = heads * 64
    if layout == "contiguous" or n != m:
        return [torch.randn(batch, heads, t, 64, device=device, dtype=dtype, generator=g) for t in (n, m, m)]
    qkv = torch.randn(batch, n, 3 * c, device=device, dtype=dtype, generator=g)
    if layout == "fused_view":
        return [t.view(batch, n, heads, 64).transpose(1, 2) for t in qkv.split(c, dim=-1)]
    return list(qkv.view(batch, n, 3, heads, 64).permute(2, 0, 3, 1, 4).contiguous().unbind(0))


def kernel_names(fn) -> list[str]:
    """The CUDA kernels one call launches (which backend really ran)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sorted({e.key[:80] for e in prof.key_averages() if e.device_type.name == "CUDA"})[:4]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=2, help="UNet batch (2 × images under CFG)")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--backends", default="flash,cudnn,efficient,cudnn_first", help="cudnn_first: cuDNN first in the SDPA priority order, the kernels that ran listed")
    ap.add_argument("--layouts", default="contiguous,fused_view,fused_contig")
    args = ap.parse_args()
    cuda = torch.device(args.device).type == "cuda"
    dtype = torch.bfloat16
    for layout in args.layouts.split(","):
        for shape, (heads, n, m) in SHAPES.items():
            if layout != "contiguous" and n != m:
                continue  # cross-attention: q and k/v come from different projections
            g = torch.Generator(args.device).manual_seed(0)
            q, k, v = make_qkv(layout, args.batch, heads, n, m, args.device, dtype, g)
            ref = None
            for name in args.backends.split(","):
                row = {"shape": shape, "layout": layout, "backend": name, "batch": args.batch}
                try:
                    ctx = sdpa_kernel(PRIORITY, set_priority=True) if name == "cudnn_first" else sdpa_kernel([BACKENDS[name]])
                    with ctx:
                        out = F.scaled_dot_product_attention(q, k, v)
                        for _ in range(3):
                            F.scaled_dot_product_attention(q, k, v)
                        if cuda:
                            torch.cuda.synchronize()
                        t = time.perf_counter()
                        for _ in range(args.iters):
                            F.scaled_dot_product_attention(q, k, v)
                        if cuda:
                            torch.cuda.synchronize()
                        s = (time.perf_counter() - t) / args.iters
                        if cuda and name == "cudnn_first":
                            row["kernels"] = kernel_names(lambda: F.scaled_dot_product_attention(q, k, v))
                    ref = out.float() if ref is None else ref
                    row.update(ms=round(s * 1e3, 4), tflops=round(4 * args.batch * heads * n * m * 64 / s / 1e12, 1),
                               max_abs_diff_vs_first=round(float((out.float() - ref).abs().max()), 5))
                except Exception as e:  # a backend that refuses the shape: say why
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                print("RESULT " + json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
