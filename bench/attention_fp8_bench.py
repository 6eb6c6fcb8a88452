"""Float8 attention through cuDNN's graph API (``nvidia-cudnn-frontend``: ``sdpa_fp8``) against the
bf16 attention the engine runs (torch SDPA, cuDNN backend), at the SDXL UNet's self-attention
shapes at 1024² (head dim 64; 4,096 tokens × 10 heads and 1,024 tokens × 20 heads), Q/K/V laid out
as diffusers passes them (batch, tokens, heads, dim). Float8 inputs are unscaled (descale 1), the
probabilities scaled by 256 into e4m3; the output in bf16 where cuDNN allows it, else float8.

One ``ATTN`` line per shape and variant (µs per call, TFLOP/s, relative error against bf16), then
``RESULT`` with the per-step totals (10 blocks at 4,096 tokens, 60 at 1,024 per UNet forward).

    python bench/attention_fp8_bench.py --batch 32
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

SHAPES = [(4096, 10, 10), (1024, 20, 60)]  # tokens, heads, blocks per UNet forward (SDXL at 1024²)


def time_us(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1000 / iters


def bshd(b, s, h, d, dtype):
    return torch.randn(b, s, h, d, device="cuda").to(dtype).transpose(1, 2)  # (b, h, s, d) view of (b, s, h, d)


def fp8_graph(cudnn, handle, q, k, v, out_dtype, bf16_graph: bool = False):
    dt = cudnn.data_type
    g = cudnn.pygraph(io_data_type=dt.BFLOAT16 if bf16_graph else dt.FP8_E4M3, intermediate_data_type=dt.FLOAT,
                      compute_data_type=dt.FLOAT, handle=handle)
    data_type = dt.BFLOAT16 if bf16_graph else dt.FP8_E4M3
    Q = g.tensor(name="Q", dim=list(q.shape), stride=list(q.stride()), data_type=data_type)
    K = g.tensor(name="K", dim=list(k.shape), stride=list(k.stride()), data_type=data_type)
    V = g.tensor(name="V", dim=list(v.shape), stride=list(v.stride()), data_type=data_type)
    scalars = {}
    if bf16_graph:
        O, _ = g.sdpa(q=Q, k=K, v=V, is_inference=True, attn_scale=q.shape[-1] ** -0.5, name="sdpa")
        outs = []
    else:
        for name in ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o"):
            scalars[name] = g.tensor(name=name, dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=dt.FLOAT)
        O, _, amax_s, amax_o = g.sdpa_fp8(q=Q, k=K, v=V, is_inference=True, attn_scale=q.shape[-1] ** -0.5, name="sdpa_fp8",
                                          **scalars)
        amax_s.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(dt.FLOAT)
        amax_o.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(dt.FLOAT)
        outs = [amax_s, amax_o]
    b, h, s, d = q.shape
    O.set_output(True).set_dim([b, h, s, d]).set_stride([s * h * d, d, h * d, 1]).set_data_type(
        dt.BFLOAT16 if out_dtype == torch.bfloat16 else dt.FP8_E4M3)
    g.validate()
    g.build_operation_graph()
    g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    g.check_support()
    g.build_plans()
    ws = torch.empty(max(g.get_workspace_size(), 1), device="cuda", dtype=torch.uint8)
    o = torch.empty(b, s, h, d, device="cuda", dtype=out_dtype).transpose(1, 2)
    pack = {Q: q, K: k, V: v, O: o}
    values = {"descale_q": 1.0, "descale_k": 1.0, "descale_v": 1.0, "descale_s": 1 / 256, "scale_s": 256.0, "scale_o": 1.0}
    for name, t in scalars.items():
        pack[t] = torch.full((1, 1, 1, 1), values[name], device="cuda", dtype=torch.float32)
    for t in outs:
        pack[t] = torch.zeros((1, 1, 1, 1), device="cuda", dtype=torch.float32)

    def run():
        cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream().cuda_stream)
        g.execute(pack, ws, handle=handle)

    return run, o


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    torch.backends.cudnn.version()
    import cudnn
    from torch.nn.attention import SDPBackend, sdpa_kernel

    handle = cudnn.create_handle()
    torch.manual_seed(0)
    totals: dict[str, float] = {}
    for s, h, blocks in SHAPES:
        b, d = args.batch, 64
        flop = 4 * b * h * s * s * d
        q, k, v = (bshd(b, s, h, d, torch.bfloat16) for _ in range(3))
        rows = {}
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            ref = F.scaled_dot_product_attention(q, k, v)
            rows["torch_cudnn_bf16"] = (time_us(lambda: F.scaled_dot_product_attention(q, k, v), args.iters), 0.0)
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            rows["torch_flash_bf16"] = (time_us(lambda: F.scaled_dot_product_attention(q, k, v), args.iters), 0.0)
        try:
            run, o = fp8_graph(cudnn, handle, q, k, v, torch.bfloat16, bf16_graph=True)
            run()
            rows["cudnn_fe_bf16"] = (time_us(run, args.iters), float((o.float() - ref.float()).norm() / ref.float().norm()))
        except Exception as exc:
            print(f"ATTN {json.dumps({'tokens': s, 'variant': 'cudnn_fe_bf16', 'error': str(exc)[:300]})}", flush=True)
        q8, k8, v8 = (t.to(torch.float8_e4m3fn) for t in (q, k, v))
        for out_dtype in (torch.bfloat16, torch.float8_e4m3fn):
            name = f"cudnn_fp8_out_{str(out_dtype).split('.')[-1]}"
            try:
                run, o = fp8_graph(cudnn, handle, q8, k8, v8, out_dtype)
                run()
                rows[name] = (time_us(run, args.iters), float((o.float() - ref.float()).norm() / ref.float().norm()))
            except Exception as exc:
                print(f"ATTN {json.dumps({'tokens': s, 'variant': name, 'error': str(exc)[:300]})}", flush=True)
        for name, (us, err) in rows.items():
            totals[name] = totals.get(name, 0.0) + us * blocks / 1000
            print("ATTN " + json.dumps({"tokens": s, "heads": h, "batch": b, "variant": name, "us": round(us, 1),
                                        "tflops": round(flop / us / 1e6, 1), "rel_err": round(err, 4)}), flush=True)
        del q, k, v, q8, k8, v8
    print("RESULT " + json.dumps({"batch": args.batch, "ms_per_forward": {k: round(v, 2) for k, v in totals.items()}}), flush=True)


if __name__ == "__main__":
    main()
