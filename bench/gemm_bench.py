"""The SDXL UNet's transformer linears alone (issue 5, engine.fp8): bf16 against float8 GEMMs.

For each linear shape of a SDXL transformer block (fused QKV) at 1024², at a CFG step's token
count (UNet batch × tokens), times one product in:

- ``bf16``: ``F.linear`` (cuBLAS);
- ``fp8_row``: ``torch._scaled_mm`` with one scale per activation row and per weight row
  (what :class:`rayimg.render.fp8.Float8Linear` runs), plain accumulation;
- ``fp8_row_fast``: the same with ``use_fast_accum``;
- ``fp8_tensor_fast``: one scale per tensor (cuBLASLt's float8 path), fast accumulation;
- ``quant_row``: the compiled per-row activation quantization alone (``fp8.quantize_rows``), the
  work the engine adds in front of each float8 product unless it fuses into the producer.

Each variant is captured in a CUDA graph of 20 products over rotating input sets (so weights come
from HBM as in the UNet) and replayed; the median replay / 20 is reported. A ``TOTAL`` row weighs
each shape by how often one UNet step runs it (10 blocks at 64², 60 at 32², per image).

    python bench/gemm_bench.py --batches 2,8
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# (name, tokens per image, K, N, uses per block, blocks per UNet forward)
SHAPES = [
    ("64:qkv", 4096, 640, 1920, 1, 10), ("64:out", 4096, 640, 640, 2, 10), ("64:q_cross", 4096, 640, 640, 1, 10),
    ("64:ff1", 4096, 640, 5120, 1, 10), ("64:ff2", 4096, 2560, 640, 1, 10), ("64:proj", 4096, 640, 640, 1, 10),
    ("32:qkv", 1024, 1280, 3840, 1, 60), ("32:out", 1024, 1280, 1280, 2, 60), ("32:q_cross", 1024, 1280, 1280, 1, 60),
    ("32:ff1", 1024, 1280, 10240, 1, 60), ("32:ff2", 1024, 5120, 1280, 1, 60), ("32:proj", 1024, 1280, 1280, 1, 60),
]
# proj_in + proj_out: 2 per transformer stack (2 blocks at 64², 10 at 32²), i.e. 1 per block at 64²
# and 0.2 per block at 32²: counted as 1 and 1 (a slight overcount at 32²)
REPS = 20


def time_graph(fn, reps: int = REPS) -> float:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(3):
            fn(i)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(reps):
            fn(i)
    times = []
    for _ in range(7):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / reps)
    return statistics.median(times[2:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="2,8", help="UNet batch sizes (2 × images under CFG)")
    args = ap.parse_args()
    from rayimg.render.fp8 import FP8_DTYPE, FP8_MAX, quantize_rows

    dev = "cuda"
    from rayimg.render.engine import _configure_compiler

    _configure_compiler()
    quant = torch.compile(quantize_rows, dynamic=False)
    result = {"gpu": torch.cuda.get_device_name(), "rows": []}
    sets = 3
    for ub in [int(x) for x in args.batches.split(",") if x]:
        totals: dict[str, float] = {}
        for name, tokens, K, N, per_block, blocks in SHAPES:
            M = ub * tokens
            xs = [torch.randn(M, K, device=dev, dtype=torch.bfloat16) for _ in range(sets)]
            ws = [torch.randn(N, K, device=dev, dtype=torch.bfloat16) / K ** 0.5 for _ in range(sets)]
            w8, wsc = [], []
            for w in ws:
                sc = w.float().abs().amax(dim=1, keepdim=True) / FP8_MAX
                w8.append((w.float() / sc).to(FP8_DTYPE))
                wsc.append(sc.t().contiguous())
            x8s, xsc = zip(*[quant(x) for x in xs])
            xt = [x.float().abs().amax() / FP8_MAX for x in xs]
            x8t = [(x.float() / s).to(FP8_DTYPE) for x, s in zip(xs, xt)]
            wt = [w.float().abs().amax() / FP8_MAX for w in ws]
            w8t = [(w.float() / s).to(FP8_DTYPE) for w, s in zip(ws, wt)]
            variants = {
                "bf16": lambda i: F.linear(xs[i % sets], ws[i % sets]),
                "fp8_row": lambda i: torch._scaled_mm(x8s[i % sets], w8[i % sets].t(), scale_a=xsc[i % sets], scale_b=wsc[i % sets],
                                                      out_dtype=torch.bfloat16),
                "fp8_row_fast": lambda i: torch._scaled_mm(x8s[i % sets], w8[i % sets].t(), scale_a=xsc[i % sets], scale_b=wsc[i % sets],
                                                           out_dtype=torch.bfloat16, use_fast_accum=True),
                "fp8_tensor_fast": lambda i: torch._scaled_mm(x8t[i % sets], w8t[i % sets].t(), scale_a=xt[i % sets], scale_b=wt[i % sets],
                                                              out_dtype=torch.bfloat16, use_fast_accum=True),
                "quant_row": lambda i: quant(xs[i % sets]),
            }
            row = {"batch": ub, "shape": name, "M": M, "K": K, "N": N}
            ref = F.linear(xs[0], ws[0]).float()
            for v, fn in variants.items():
                try:
                    t = time_graph(fn)
                except Exception as e:  # a variant this torch/GPU lacks
                    row[v] = f"error: {type(e).__name__}: {str(e)[:120]}"
                    continue
                row[v + "_us"] = round(t * 1e6, 2)
                if v != "quant_row":
                    row[v + "_tflops"] = round(2 * M * K * N / t / 1e12, 1)
                    if v != "bf16":
                        out = fn(0).float()
                        row[v + "_rel_err"] = round(float((out - ref).norm() / ref.norm()), 5)
                totals[v] = totals.get(v, 0.0) + t * per_block * blocks
            print("RESULT " + json.dumps(row), flush=True)
            result["rows"].append(row)
            del xs, ws, w8, x8s, x8t, w8t
            torch.cuda.empty_cache()
        total = {"batch": ub, "shape": "TOTAL per UNet step (ms)", **{k + "_ms": round(v * 1e3, 2) for k, v in totals.items()}}
        if "fp8_row_fast" in totals and "quant_row" in totals:
            total["fp8_row_fast_plus_quant_ms"] = round((totals["fp8_row_fast"] + totals["quant_row"]) * 1e3, 2)
        print("RESULT " + json.dumps(total), flush=True)
        result["rows"].append(total)
    out = Path(os.environ.get("OUT", "outputs/bench"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "gemm_bench.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
