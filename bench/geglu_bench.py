"""The SDXL feed-forward after its GEGLU projection (issue 5, ``engine.fp8_linears: norm_fed+ff``).

At SDXL's two transformer levels (64² tokens: inner 2560, width 640, 10 blocks per UNet forward;
32²: inner 5120, width 1280, 60 blocks), from the projection output ``h (M, 2N)`` to the block's
feed-forward output, each variant captured in a CUDA graph over rotating inputs
(``gemm_bench.time_graph``):

- ``bf16``: the GEGLU (compiled, as inductor fuses it in the UNet) and a bf16 ``ff.net.2``;
- ``inductor_fp8``: the GEGLU and its per-row float8 scaling compiled together, then a float8
  ``ff.net.2`` (what ``engine.fp8_linears: all`` ran);
- ``triton_fp8``: :func:`rayimg.render.fp8.geglu_rows_fp8` (one Triton kernel) and the float8
  product, as :class:`rayimg.render.fp8.Float8FeedForward` runs it;
- ``blk_fp8``: the GEGLU and its float8 scaling per 1×128 block compiled together, then the
  block-scaled float8 ``ff.net.2`` (``engine.fp8_linears: norm_fed+ff128``; cuBLAS, no fast
  accumulation);
- ``geglu_bf16`` / ``inductor_quant`` / ``triton_kernel`` / ``blk_quant``: the pointwise part alone;
- ``mm_bf16`` / ``mm_row`` / ``mm_row_slow`` / ``mm_blk``: the product alone (bf16; float8 per row
  with and without fast accumulation; float8 per 1×128 block).

Errors are relative to a float32 GEGLU and product. A ``TOTAL`` row sums one UNet step.

    python bench/geglu_bench.py --batches 2,8
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

LEVELS = [("64", 4096, 2560, 640, 10), ("32", 1024, 5120, 1280, 60)]  # (name, tokens/image, inner N, width C, blocks)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="2,8", help="UNet batch sizes (2 × images under CFG)")
    ap.add_argument("--variants", default="", help="comma-separated subset of the variants (default: all)")
    args = ap.parse_args()
    from gemm_bench import time_graph

    from rayimg.render.engine import _configure_compiler
    from rayimg.render.fp8 import FP8_DTYPE, FP8_MAX, blockwise_mm, geglu_rows_fp8, quantize_blocks, quantize_rows

    _configure_compiler()
    dev, sets = "cuda", 3

    def geglu(h):
        a, g = h.chunk(2, dim=-1)
        return a * F.gelu(g)

    geglu_c = torch.compile(geglu, dynamic=False)
    quant_c = torch.compile(lambda h: quantize_rows(geglu(h)), dynamic=False)
    blk_quant_c = torch.compile(lambda h: quantize_blocks(geglu(h)), dynamic=False)
    blk_c = torch.compile(lambda h, w8, ws: blockwise_mm(*quantize_blocks(geglu(h)), w8, ws, torch.bfloat16), dynamic=False)
    result = {"gpu": torch.cuda.get_device_name(), "rows": []}
    for ub in [int(x) for x in args.batches.split(",") if x]:
        totals: dict[str, float] = {}
        for name, tokens, n, c, blocks in LEVELS:
            m = ub * tokens
            hs = [torch.randn(m, 2 * n, device=dev, dtype=torch.bfloat16) * 2 for _ in range(sets)]
            ws = [torch.randn(c, n, device=dev, dtype=torch.bfloat16) / n ** 0.5 for _ in range(sets)]
            w8, wsc = [], []
            for w in ws:
                sc = w.float().abs().amax(dim=1, keepdim=True) / FP8_MAX
                w8.append((w.float() / sc).to(FP8_DTYPE))
                wsc.append(sc.t().contiguous())

            wb = [quantize_blocks(w) for w in ws]
            wb = [(q, sc.t().contiguous()) for q, sc in wb]
            ys = [geglu_c(h) for h in hs]
            rows = [quantize_rows(y) for y in ys]
            blks = [quantize_blocks(y) for y in ys]

            def mm8(x8, s, i):
                return torch._scaled_mm(x8, w8[i % sets].t(), scale_a=s, scale_b=wsc[i % sets], out_dtype=torch.bfloat16,
                                        use_fast_accum=True)

            variants = {
                "bf16": lambda i: F.linear(geglu_c(hs[i % sets]), ws[i % sets]),
                "inductor_fp8": lambda i: mm8(*quant_c(hs[i % sets]), i),
                "triton_fp8": lambda i: mm8(*geglu_rows_fp8(hs[i % sets]), i),
                "geglu_bf16": lambda i: geglu_c(hs[i % sets]),
                "inductor_quant": lambda i: quant_c(hs[i % sets]),
                "triton_kernel": lambda i: geglu_rows_fp8(hs[i % sets]),
                "blk_fp8": lambda i: blk_c(hs[i % sets], *wb[i % sets]),
                "blk_quant": lambda i: blk_quant_c(hs[i % sets]),
                "mm_bf16": lambda i: F.linear(ys[i % sets], ws[i % sets]),
                "mm_row": lambda i: mm8(*rows[i % sets], i),
                "mm_row_slow": lambda i: torch._scaled_mm(rows[i % sets][0], w8[i % sets].t(), scale_a=rows[i % sets][1],
                                                          scale_b=wsc[i % sets], out_dtype=torch.bfloat16, use_fast_accum=False),
                "mm_blk": lambda i: blockwise_mm(*blks[i % sets], *wb[i % sets], torch.bfloat16),
            }
            only = {v for v in args.variants.split(",") if v}
            if only:
                variants = {k: v for k, v in variants.items() if k in only}
            row = {"batch": ub, "level": name, "M": m, "N": n, "C": c}
            ref = F.linear(geglu(hs[0].float()), ws[0].float())
            x8r, sr = quantize_rows(geglu(hs[0]))
            x8t, st = geglu_rows_fp8(hs[0])
            row["triton_vs_torch_scale_max_rel"] = float(((st - sr).abs() / sr).max())
            row["triton_vs_torch_fp8_mismatch_frac"] = float((x8t.float() != x8r.float()).float().mean())
            for v, fn in variants.items():
                t = time_graph(fn)
                row[v + "_us"] = round(t * 1e6, 2)
                totals[v] = totals.get(v, 0.0) + t * blocks
                if v in ("bf16", "inductor_fp8", "triton_fp8", "blk_fp8"):
                    row[v + "_rel_err"] = round(float((fn(0).float() - ref).norm() / ref.norm()), 5)
            print("RESULT " + json.dumps(row), flush=True)
            result["rows"].append(row)
            del hs, ws, w8, wb, ys, rows, blks
            torch.cuda.empty_cache()
        total = {"batch": ub, "level": "TOTAL per UNet step (ms)", **{k + "_ms": round(v * 1e3, 3) for k, v in totals.items()}}
        print("RESULT " + json.dumps(total), flush=True)
        result["rows"].append(total)
    out = Path(os.environ.get("OUT", "outputs/bench"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "geglu_bench.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
