"""SDXL's GEGLU projection with the GEGLU in the float8 GEMM's epilogue (issue 5).

Today (``engine.fp8``) the projection ``ff.net.0.proj`` is a cuBLAS float8 GEMM writing the
``M x 2N`` bf16 output, then an inductor kernel reads it back for ``value * gelu(gate)`` (7.0 ms
of a UNet step at batch 8, render run 6). :func:`geglu_mm_launch` (below) computes both halves in
one Triton GEMM and writes only the product. It was slower than cuBLAS + the GEGLU kernel at every
config tried (render run 7), so the engine does not use it.

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

FP8_DTYPE = torch.float8_e4m3fn

_GEGLU_MM_KERNEL = None
GEGLU_MM_CONFIG = (128, 128, 128, 8, 3, 8)  # BM, BN, BK, warps, stages, GROUP_M


def _geglu_mm_kernel():
    """A Triton kernel (built on first use; CUDA, compute capability 9.0+): the GEGLU projection
    as one float8 GEMM whose epilogue applies the GEGLU. A program computes a ``BM x BN`` tile of
    the value half and the same tile of the gate half (two accumulators over the same row block of
    ``x``), scales both (row scale x column scale), adds the biases, rounds each to bf16 (as the
    projection's output would be) and writes ``value * gelu(gate)`` (exact GELU): the projection's
    ``M x 2N`` output never reaches memory."""
    global _GEGLU_MM_KERNEL
    if _GEGLU_MM_KERNEL is None:
        import triton
        import triton.language as tl

        @triton.jit
        def geglu_mm_fp8(a_desc, w_desc, sa_ptr, sw_ptr, bias_ptr, out_ptr, M, N, K, stride_om,
                         BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                         HAS_BIAS: tl.constexpr):
            pid = tl.program_id(0)
            num_m = tl.cdiv(M, BM)
            num_n = tl.cdiv(N, BN)
            in_group = GROUP_M * num_n
            first_m = (pid // in_group) * GROUP_M
            group_m = min(num_m - first_m, GROUP_M)
            pid_m = first_m + (pid % in_group) % group_m
            pid_n = (pid % in_group) // group_m
            om = pid_m * BM
            on = pid_n * BN
            acc_v = tl.zeros((BM, BN), dtype=tl.float32)
            acc_g = tl.zeros((BM, BN), dtype=tl.float32)
            for k in range(0, K, BK):  # pipelined over the launch's num_stages
                a = a_desc.load([om, k])
                wv = w_desc.load([on, k])
                wg = w_desc.load([N + on, k])
                acc_v = tl.dot(a, wv.T, acc_v, max_num_imprecise_acc=BK)
                acc_g = tl.dot(a, wg.T, acc_g, max_num_imprecise_acc=BK)
            rows = om + tl.arange(0, BM)
            cols = on + tl.arange(0, BN)
            rmask = rows < M
            cmask = cols < N
            sa = tl.load(sa_ptr + rows, mask=rmask, other=0.0)[:, None]
            v = acc_v * sa * tl.load(sw_ptr + cols, mask=cmask, other=0.0)[None, :]
            g = acc_g * sa * tl.load(sw_ptr + N + cols, mask=cmask, other=0.0)[None, :]
            if HAS_BIAS:
                v += tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
                g += tl.load(bias_ptr + N + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
            v = v.to(tl.bfloat16).to(tl.float32)
            g = g.to(tl.bfloat16).to(tl.float32)
            y = v * (0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476)))
            offs = rows.to(tl.int64)[:, None] * stride_om + cols[None, :]
            tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])

        _GEGLU_MM_KERNEL = geglu_mm_fp8
    return _GEGLU_MM_KERNEL


def geglu_mm_launch(x8: torch.Tensor, x_scale: torch.Tensor, w8: torch.Tensor, w_scale: torch.Tensor,
                    bias: torch.Tensor | None, config: tuple | None = None) -> torch.Tensor:
    """``value * gelu(gate)`` of the float8 projection ``x8 @ w8.T`` (row scales ``x_scale (M, 1)``,
    column scales ``w_scale (1, 2N)``, optional ``bias (2N,)``), in bf16 ``(M, N)``: one Triton
    kernel (:func:`_geglu_mm_kernel`)."""
    import triton
    from triton.tools.tensor_descriptor import TensorDescriptor

    bm, bn, bk, warps, stages, group_m = config or GEGLU_MM_CONFIG
    m, k = x8.shape
    n = w8.shape[0] // 2
    out = torch.empty((m, n), device=x8.device, dtype=torch.bfloat16)
    a_desc = TensorDescriptor.from_tensor(x8, [bm, bk])
    w_desc = TensorDescriptor.from_tensor(w8, [bn, bk])
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    _geglu_mm_kernel()[grid](a_desc, w_desc, x_scale, w_scale, bias if bias is not None else w_scale, out, m, n, k,
                             out.stride(0), BM=bm, BN=bn, BK=bk, GROUP_M=group_m,
                             HAS_BIAS=bias is not None, num_warps=warps, num_stages=stages)
    return out


LEVELS = [("64", 4096, 640, 2560, 10), ("32", 1024, 1280, 5120, 60)]  # (name, tokens/image, C=K, inner N, blocks)
CONFIGS = [(128, 128, 128, 8, 3, 8), (128, 128, 128, 8, 4, 8), (128, 64, 128, 4, 4, 8), (128, 64, 128, 8, 4, 8),
           (64, 128, 128, 4, 4, 8), (128, 128, 64, 8, 4, 8), (128, 128, 64, 8, 5, 8), (128, 128, 128, 8, 3, 16)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="8,2", help="UNet batch sizes (2 × images under CFG)")
    args = ap.parse_args()
    from gemm_bench import time_graph

    from rayimg.render.engine import _configure_compiler
    from rayimg.render.fp8 import FP8_MAX, quantize_rows

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
