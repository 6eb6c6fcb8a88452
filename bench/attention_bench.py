"""SDPA backends at the SDXL UNet's attention shapes (issue 5): self-attention at 64² latents
(4096 tokens, 10 heads) and 32² (1024 tokens, 20 heads), cross-attention to 77 text tokens,
head dim 64, bf16, CFG batch (2 × images). One ``RESULT`` line per backend and shape: mean time
of back-to-back calls and TFLOP/s (4·B·H·N·M·D), or the error when the backend refuses the shape.

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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=2, help="UNet batch (2 × images under CFG)")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--backends", default="flash,cudnn,efficient")
    args = ap.parse_args()
    cuda = torch.device(args.device).type == "cuda"
    dtype = torch.bfloat16
    for shape, (heads, n, m) in SHAPES.items():
        g = torch.Generator(args.device).manual_seed(0)
        q = torch.randn(args.batch, heads, n, 64, device=args.device, dtype=dtype, generator=g)
        k = torch.randn(args.batch, heads, m, 64, device=args.device, dtype=dtype, generator=g)
        v = torch.randn(args.batch, heads, m, 64, device=args.device, dtype=dtype, generator=g)
        ref = None
        for name in args.backends.split(","):
            row = {"shape": shape, "backend": name, "batch": args.batch}
            try:
                with sdpa_kernel([BACKENDS[name]]):
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
                ref = out.float() if ref is None else ref
                row.update(ms=round(s * 1e3, 4), tflops=round(4 * args.batch * heads * n * m * 64 / s / 1e12, 1),
                           max_abs_diff_vs_first=round(float((out.float() - ref).abs().max()), 5))
            except Exception as e:  # a backend that refuses the shape: say why
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            print("RESULT " + json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
