"""SDXL's GEGLU projection with the GEGLU in the float8 GEMM's epilogue (issue 5).

Today (``engine.fp8``) the projection ``ff.net.0.proj`` is a cuBLAS float8 GEMM writing the
``M x 2N`` bf16 output, then an inductor kernel reads it back for ``value * gelu(gate)`` (7.0 ms
of a UNet step at batch 8, render run 6). :func:`rayimg.render.fp8.geglu_mm_launch` computes both
halves in one Triton GEMM and writes only the product.

Per level and UNet batch, each captured in a CUDA graph over rotating inputs:

- ``cublas_geglu``: ``torch._scaled_mm`` (fast accumulation) + the compiled bias add and GEGLU;
- ``cublas_gemm``: the GEMM alone;
- ``triton_BMxBNxBK_wW_sS_gG``: the fused kernel, per tile config.

``tflops`` counts the projection (2·M·2N·K). Errors are relative to float32 math on the same
float8 inputs.

    python bench/geglu_mm_bench.py --batches 8,2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

LEVELS = [("64", 4096, 640, 2560, 10), ("32", 1024, 1280, 5120, 60)]  # (name, tokens/image, C=K, inner N, blocks)
CONFIGS = [(128, 128, 128, 8, 3, 8), (128, 128, 128, 8, 4, 8), (128, 64, 128, 4, 4, 8), (128, 64, 128, 8, 4, 8),
           (64, 128, 128, 4, 4, 8), (128, 128, 64, 8, 4, 8), (128, 128, 64, 8, 5, 8), (128, 128, 128, 8, 3, 16)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="8,2", help="UNet batch sizes (2 × images under CFG)")
    args = ap.parse_args()
    from gemm_bench import time_graph

    from rayimg.render.engine import _configure_compiler
    from rayimg.render.fp8 import FP8_DTYPE, FP8_MAX, geglu_mm_launch, quantize_rows

    _configure_compiler()
    dev, sets = "cuda", 3

    def geglu_bias(h, b):
        a, g = (h + b).chunk(2, dim=-1)
        return a * F.gelu(g)

    geglu_c = torch.compile(geglu_bias, dynamic=False)
    result = {"gpu": torch.cuda.get_device_name(), "rows": []}
    for ub in [int(x) for x in args.batches.split(",") if x]:
        totals: dict[str, float] = {}
        for name, tokens, k, n, blocks in LEVELS:
            m = ub * tokens
            xs = [quantize_rows(torch.randn(m, k, device=dev, dtype=torch.bfloat16)) for _ in range(sets)]
            ws = []
            for _ in range(sets):
                w = torch.randn(2 * n, k, device=dev) / k ** 0.5
                sc = w.abs().amax(dim=1, keepdim=True) / FP8_MAX
                ws.append(((w / sc).to(FP8_DTYPE), sc.t().contiguous()))
            bias = 0.1 * torch.randn(2 * n, device=dev, dtype=torch.bfloat16)

            def cublas(i):
                (x8, sx), (w8, sw) = xs[i % sets], ws[i % sets]
                return torch._scaled_mm(x8, w8.t(), scale_a=sx, scale_b=sw, out_dtype=torch.bfloat16, use_fast_accum=True)

            variants = {"cublas_geglu": lambda i: geglu_c(cublas(i), bias), "cublas_gemm": cublas}
            for cfg in CONFIGS:
                bm, bn, bk, warps, stages, gm = cfg
                variants[f"triton_{bm}x{bn}x{bk}_w{warps}_s{stages}_g{gm}"] = (
                    lambda i, cfg=cfg: geglu_mm_launch(*xs[i % sets], *ws[i % sets], bias, cfg))
            (x8, sx), (w8, sw) = xs[0], ws[0]
            ref = geglu_bias((x8.float() * sx) @ (w8.float() * sw.t()).t(), bias.float())
            row = {"batch": ub, "level": name, "M": m, "K": k, "N": n}
            flops = 2 * m * 2 * n * k
            for v, fn in variants.items():
                try:
                    if v != "cublas_gemm":
                        row[v + "_rel_err"] = round(float((fn(0).float() - ref).norm() / ref.norm()), 5)
                    t = time_graph(fn)
                except Exception as e:  # a config that does not fit (shared memory): report, go on
                    row[v + "_error"] = f"{type(e).__name__}: {str(e)[:160]}"
                    continue
                row[v + "_us"] = round(t * 1e6, 2)
                row[v + "_tflops"] = round(flops / t / 1e12)
                totals[v] = totals.get(v, 0.0) + t * blocks
            print("RESULT " + json.dumps(row), flush=True)
            result["rows"].append(row)
            del xs, ws
            torch.cuda.empty_cache()
        total = {"batch": ub, "level": "TOTAL per UNet step (ms)", **{k_ + "_ms": round(v * 1e3, 3) for k_, v in totals.items()}}
        print("RESULT " + json.dumps(total), flush=True)
        result["rows"].append(total)
    out = Path(os.environ.get("OUT", "outputs/bench"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "geglu_mm_bench.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
