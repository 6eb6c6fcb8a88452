"""Float8 convolutions through cuDNN's graph API (the ``nvidia-cudnn-frontend`` wheel) against
torch's bf16 convolutions, at the shapes of the real-size SDXL UNet's (or the VAE decoder's)
convolutions at 1024² (issue 5: the UNet's convolutions are about a quarter of a step).

The shapes come from forward pre-hooks on every ``nn.Conv2d`` during one forward at batch 1;
each distinct shape is then timed at ``--batch`` (the UNet batch: 2 × images with CFG), channels
last, with CUDA events:

- ``bf16``: ``F.conv2d`` in bf16 (what the engine runs), with and without ``cudnn.benchmark``;
- ``fp8``: a cuDNN graph, image and filter in float8 e4m3, fp32 accumulation, bf16 output; the
  filter is scaled per output channel and the image is not scaled (a GroupNorm + SiLU output,
  which is what feeds most of these convolutions, is far inside e4m3's range); the
  per-channel scale and the bias then apply to the bf16 output;
- ``fp8_epi``: the same graph with the per-channel scale and the bias fused into it;
- ``fp8_best``: every plan cuDNN offers for the ``fp8`` graph, timed, the fastest kept.

Per shape one ``SHAPE`` line (times in µs, the relative error of the float8 output against the
bf16 convolution on the same data), then ``RESULT`` with the totals weighted by how often each
shape occurs in one forward (what a step would spend in convolutions at this batch), and a
CUDA-graph check (the fp8 graph captured in a torch CUDA graph and replayed gives the eager bits).

    python bench/conv_fp8_bench.py --batch 32            # the UNet at batch-16 CFG
    python bench/conv_fp8_bench.py --model vae --batch 16
    python bench/conv_fp8_bench.py --tune 2,8,32 --iters 5 --write-table   # the plan table the engine reads
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FP8_MAX = 448.0


def out_dir() -> Path:
    p = Path(os.environ.get("OUT", "outputs/bench"))
    p.mkdir(parents=True, exist_ok=True)
    return p


def conv_shapes(model: str) -> Counter:
    """(Cin, H, W, Cout, kernel, stride, padding) -> count in one forward at batch 1."""
    from rayimg.models.real_size import build_sdxl_unet, build_sdxl_vae

    dev, dt = "cuda", torch.bfloat16
    shapes: Counter = Counter()

    def hook(mod, inputs):
        x = inputs[0]
        shapes[(x.shape[1], x.shape[2], x.shape[3], mod.out_channels, mod.kernel_size[0], mod.stride[0], mod.padding[0])] += 1

    with torch.no_grad():
        if model == "unet":
            net = build_sdxl_unet(dt, dev).eval()
            handles = [m.register_forward_pre_hook(hook) for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
            added = {"text_embeds": torch.randn(1, 1280, device=dev, dtype=dt),
                     "time_ids": torch.tensor([[1024, 1024, 0, 0, 1024, 1024]], device=dev, dtype=dt)}
            net(torch.randn(1, 4, 128, 128, device=dev, dtype=dt), torch.tensor([500], device=dev),
                encoder_hidden_states=torch.randn(1, 77, 2048, device=dev, dtype=dt), added_cond_kwargs=added)
        else:
            net = build_sdxl_vae(dt, dev).eval()
            handles = [m.register_forward_pre_hook(hook) for m in net.decoder.modules() if isinstance(m, torch.nn.Conv2d)]
            net.decode(torch.randn(1, 4, 128, 128, device=dev, dtype=dt))
            shapes[(4, 128, 128, 4, 1, 1, 0)] += 1  # post_quant_conv runs outside the decoder
        for h in handles:
            h.remove()
    del net
    torch.cuda.empty_cache()
    return shapes


def tune(batches: list[int], iters: int, write_table: bool) -> None:
    """Time every cuDNN plan of each float8 convolution the engine runs (``engine.fp8_convs``: the
    converted ResNet convolutions and upsamplers of the real-size SDXL UNet at 1024², not the 1×1
    shortcuts, which are GEMMs) at each UNet batch; write the fastest per shape as a
    :data:`rayimg.render.fp8_conv.PLAN_TABLE` section, for the shapes where it beats the bf16
    convolution (the others are left out, so the engine runs them in bf16)."""
    from rayimg.models.real_size import build_sdxl_unet
    from rayimg.render import fp8_conv

    dev, dt = "cuda", torch.bfloat16
    net = build_sdxl_unet(dt, dev).eval().requires_grad_(False)
    net.to(memory_format=torch.channels_last)
    fp8_conv.convert_convs(net)
    shapes: Counter = Counter()
    weights = {}

    def hook(mod, inputs):
        if mod.fp8_role != "rows":
            x = inputs[0]
            key = (tuple(x.shape[1:]), tuple(mod.w8.shape), mod.stride[0], mod.padding[0])
            shapes[key] += 1
            weights[key] = mod.w8

    handles = [m.register_forward_pre_hook(hook) for m in net.modules() if isinstance(m, fp8_conv.Float8Conv2d)]
    with torch.no_grad():
        added = {"text_embeds": torch.randn(1, 1280, device=dev, dtype=dt),
                 "time_ids": torch.tensor([[1024, 1024, 0, 0, 1024, 1024]], device=dev, dtype=dt)}
        net(torch.randn(1, 4, 128, 128, device=dev, dtype=dt).to(memory_format=torch.channels_last), torch.tensor([500], device=dev),
            encoder_hidden_states=torch.randn(1, 77, 2048, device=dev, dtype=dt), added_cond_kwargs=added)
    for h in handles:
        h.remove()
    section = fp8_conv.table_section(torch.device(dev))
    table = {section: dict(fp8_conv.PLAN_TABLE.get(section, {}))}
    print(f"[bench] tune: {sum(shapes.values())} float8 convolutions, {len(shapes)} shapes, section {section!r}", flush=True)
    for n in batches:
        totals = Counter()
        for (chw, wshape, stride, pad), count in shapes.items():
            w8 = weights[(chw, wshape, stride, pad)]
            x8 = torch.randn(n, *chw, device=dev).to(memory_format=torch.channels_last).to(torch.float8_e4m3fn)
            heuristic, timings = fp8_conv.plan_timings(x8, w8, stride, pad, iters)
            if not timings:
                print(f"TUNE {json.dumps({'batch': n, 'x': list(x8.shape), 'error': 'no plan ran'})}", flush=True)
                continue
            t = dict(timings)
            best_name, best_us = timings[0]
            xb = torch.randn(n, *chw, device=dev, dtype=dt).to(memory_format=torch.channels_last)
            wb = torch.randn(*wshape, device=dev, dtype=dt).to(memory_format=torch.channels_last)
            bf16 = time_us(lambda: F.conv2d(xb, wb, stride=stride, padding=pad), iters)
            key = fp8_conv.plan_key(x8.shape, w8.shape, stride, pad)
            if best_us < bf16:  # only where float8 wins: the others stay bf16 (fp8_conv.UNTUNED)
                table[section][key] = best_name
            else:
                table[section].pop(key, None)
            totals["best"] += best_us * count
            totals["kept"] += min(best_us, bf16) * count
            totals["heuristic"] += t.get(heuristic, float("nan")) * count
            totals["bf16"] += bf16 * count
            print("TUNE " + json.dumps({"batch": n, "x": list(x8.shape), "w": list(wshape), "stride": stride, "count": count,
                                        "best": best_name, "best_us": round(best_us, 1), "heuristic": heuristic,
                                        "heuristic_us": round(t.get(heuristic, float("nan")), 1), "bf16_us": round(bf16, 1),
                                        "plans": len(timings)}), flush=True)
            del x8, xb, wb
        print("TUNED " + json.dumps({"batch": n, "ms_per_forward": {k: round(v / 1000, 3) for k, v in totals.items()}}), flush=True)
    text = json.dumps(table, indent=1, sort_keys=True) + "\n"
    (out_dir() / "fp8_conv_plans.json").write_text(text)
    if write_table:
        fp8_conv.PLAN_TABLE_PATH.write_text(text)
        print(f"[bench] wrote {fp8_conv.PLAN_TABLE_PATH}", flush=True)


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


class Fp8Conv:
    """One cuDNN float8 convolution graph for one shape (NHWC image and filter)."""

    def __init__(self, cudnn, handle, x8, w8, stride: int, padding: int, out_shape, epilogue: bool, plan: str = "heuristic"):
        self.cudnn, self.handle = cudnn, handle
        dt = cudnn.data_type
        g = cudnn.pygraph(io_data_type=dt.BFLOAT16, intermediate_data_type=dt.FLOAT, compute_data_type=dt.FLOAT, handle=handle)
        self.X = g.tensor(name="X", dim=list(x8.shape), stride=list(x8.stride()), data_type=dt.FP8_E4M3)
        self.W = g.tensor(name="W", dim=list(w8.shape), stride=list(w8.stride()), data_type=dt.FP8_E4M3)
        y = g.conv_fprop(image=self.X, weight=self.W, padding=[padding, padding], stride=[stride, stride],
                         dilation=[1, 1], compute_data_type=dt.FLOAT)
        self.S = self.B = None
        if epilogue:
            k = out_shape[1]
            self.S = g.tensor(name="S", dim=[1, k, 1, 1], stride=[k, 1, k, k], data_type=dt.FLOAT)
            self.B = g.tensor(name="B", dim=[1, k, 1, 1], stride=[k, 1, k, k], data_type=dt.FLOAT)
            y = g.bias(name="bias", input=g.mul(name="scale", a=y, b=self.S), bias=self.B)
        y.set_output(True).set_data_type(dt.BFLOAT16)
        self.Y = y
        g.validate()
        g.build_operation_graph()
        g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        g.check_support()
        if plan == "heuristic":
            g.build_plans()
        else:
            g.build_plans(cudnn.build_plan_policy.ALL)
        self.g = g
        self.ws = torch.empty(max(g.get_workspace_size(), 1), device="cuda", dtype=torch.uint8)

    def __call__(self, x8, w8, y, s=None, b=None):
        cudnn = self.cudnn
        cudnn.set_stream(handle=self.handle, stream=torch.cuda.current_stream().cuda_stream)
        pack = {self.X: x8, self.W: w8, self.Y: y}
        if self.S is not None:
            pack.update({self.S: s, self.B: b})
        self.g.execute(pack, self.ws, handle=self.handle)

    def best_plan(self, x8, w8, y, iters: int) -> tuple[float, int, int]:
        """Time every built plan; select the fastest. -> (µs, index, plan count)."""
        cudnn = self.cudnn
        cudnn.set_stream(handle=self.handle, stream=torch.cuda.current_stream().cuda_stream)
        count = self.g.get_execution_plan_count()
        best = (float("inf"), -1)
        for i in range(count):
            try:
                ws = torch.empty(max(self.g.get_workspace_size_plan_at_index(i), 1), device="cuda", dtype=torch.uint8)
                t = time_us(lambda: self.g.execute_plan_at_index({self.X: x8, self.W: w8, self.Y: y}, ws, i, handle=self.handle), iters)
            except Exception:  # a plan that did not build
                continue
            best = min(best, (t, i))
        return best[0], best[1], count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["unet", "vae"], default="unet")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--no-best", action="store_true", help="skip timing every cuDNN plan")
    ap.add_argument("--tune", default="", help="UNet batches (e.g. 2,8,32): time every plan of the engine's float8 "
                    "convolutions (engine.fp8_convs) and write the fastest to $OUT/fp8_conv_plans.json")
    ap.add_argument("--write-table", action="store_true", help="with --tune: also into rayimg/render/fp8_conv_plans.json")
    args = ap.parse_args()
    if args.tune:
        tune([int(b) for b in args.tune.split(",")], args.iters, args.write_table)
        return

    torch.backends.cudnn.version()  # torch loads libcudnn; the frontend binds to the loaded library
    import cudnn

    torch.manual_seed(0)
    print(f"[bench] cudnn frontend {getattr(cudnn, '__version__', '?')}, backend {cudnn.backend_version_string()}, "
          f"torch cuDNN {torch.backends.cudnn.version()}, {torch.cuda.get_device_name()}", flush=True)
    handle = cudnn.create_handle()
    shapes = conv_shapes(args.model)
    print(f"[bench] {sum(shapes.values())} convolutions, {len(shapes)} shapes", flush=True)
    n = args.batch
    rows, totals = [], Counter()
    for (cin, h, w, cout, k, stride, pad), count in sorted(shapes.items(), key=lambda kv: -kv[0][0] * kv[0][1] * kv[0][2] * kv[0][3] * kv[0][4] ** 2):
        row = {"cin": cin, "h": h, "w": w, "cout": cout, "k": k, "stride": stride, "count": count}
        x = torch.randn(n, cin, h, w, device="cuda", dtype=torch.bfloat16).to(memory_format=torch.channels_last)
        weight = (torch.randn(cout, cin, k, k, device="cuda") / (cin * k * k) ** 0.5).to(torch.bfloat16).to(memory_format=torch.channels_last)
        bias = torch.randn(cout, device="cuda", dtype=torch.bfloat16) * 0.1
        flop = 2 * n * cout * cin * k * k * (h // stride) * (w // stride)
        torch.backends.cudnn.benchmark = False
        ref = F.conv2d(x, weight, bias, stride=stride, padding=pad)
        row["bf16_us"] = time_us(lambda: F.conv2d(x, weight, bias, stride=stride, padding=pad), args.iters)
        torch.backends.cudnn.benchmark = True
        row["bf16_bench_us"] = time_us(lambda: F.conv2d(x, weight, bias, stride=stride, padding=pad), args.iters)
        torch.backends.cudnn.benchmark = False
        w_scale = weight.float().abs().amax(dim=(1, 2, 3)).clamp(min=1e-12) / FP8_MAX
        w8 = (weight.float() / w_scale[:, None, None, None]).to(torch.float8_e4m3fn).contiguous(memory_format=torch.channels_last)
        x8 = x.to(torch.float8_e4m3fn)  # channels last kept
        y = torch.empty_like(ref)
        s32, b32 = w_scale.contiguous(), bias.float().contiguous()
        try:
            conv = Fp8Conv(cudnn, handle, x8, w8, stride, pad, ref.shape, epilogue=False)
            conv(x8, w8, y)
            out = (y.float() * w_scale[None, :, None, None] + bias.float()[None, :, None, None])
            row["fp8_rel_err"] = ((out - ref.float()).norm() / ref.float().norm()).item()
            row["fp8_us"] = time_us(lambda: conv(x8, w8, y), args.iters)
            if not args.no_best:
                best = Fp8Conv(cudnn, handle, x8, w8, stride, pad, ref.shape, epilogue=False, plan="all")
                row["fp8_best_us"], row["fp8_best_plan"], row["fp8_plans"] = best.best_plan(x8, w8, y, args.iters)
        except Exception as exc:  # report and go on: one shape's failure must not hide the rest
            row["fp8_error"] = f"{type(exc).__name__}: {exc}"[:300]
        try:
            epi = Fp8Conv(cudnn, handle, x8, w8, stride, pad, ref.shape, epilogue=True)
            y2 = torch.empty_like(ref)
            epi(x8, w8, y2, s32.view(1, -1, 1, 1), b32.view(1, -1, 1, 1))
            row["fp8_epi_rel_err"] = ((y2.float() - ref.float()).norm() / ref.float().norm()).item()
            row["fp8_epi_us"] = time_us(lambda: epi(x8, w8, y2, s32.view(1, -1, 1, 1), b32.view(1, -1, 1, 1)), args.iters)
        except Exception as exc:
            row["fp8_epi_error"] = f"{type(exc).__name__}: {exc}"[:300]
        row["tflops_bf16"] = flop / row["bf16_us"] / 1e6
        if "fp8_us" in row:
            row["tflops_fp8"] = flop / row["fp8_us"] / 1e6
        for key in ("bf16_us", "bf16_bench_us", "fp8_us", "fp8_epi_us", "fp8_best_us"):
            if key in row and row[key] != float("inf"):
                totals[key] += row[key] * count
        rows.append(row)
        print("SHAPE " + json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
        del x, weight, ref, y, x8, w8

    # the float8 graph inside a torch CUDA graph: replays must give the eager bits
    graph_check: dict = {}
    try:
        cin, h, w, cout, k, stride, pad = max(shapes, key=lambda s: s[0] * s[1] * s[2] * s[3])
        x8 = torch.randn(n, cin, h, w, device="cuda").to(memory_format=torch.channels_last).to(torch.float8_e4m3fn)
        w8 = (torch.randn(cout, cin, k, k, device="cuda") * 8).to(memory_format=torch.channels_last).to(torch.float8_e4m3fn)
        y_eager = torch.empty(n, cout, h // stride, w // stride, device="cuda", dtype=torch.bfloat16).to(memory_format=torch.channels_last)
        conv = Fp8Conv(cudnn, handle, x8, w8, stride, pad, y_eager.shape, epilogue=False)
        conv(x8, w8, y_eager)
        y_graph = torch.empty_like(y_eager)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            conv(x8, w8, y_graph)  # warm on the capture stream
        torch.cuda.current_stream().wait_stream(side)
        cg = torch.cuda.CUDAGraph()
        y_graph.zero_()
        with torch.cuda.graph(cg):
            conv(x8, w8, y_graph)
        cg.replay()
        torch.cuda.synchronize()
        graph_check = {"shape": [n, cin, h, w, cout, k], "equal": bool(torch.equal(y_graph, y_eager))}
    except Exception as exc:
        graph_check = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    print("GRAPH " + json.dumps(graph_check), flush=True)
    result = {"model": args.model, "batch": n, "device": torch.cuda.get_device_name(),
              "totals_ms": {k: round(v / 1000, 3) for k, v in totals.items()}, "cuda_graph": graph_check}
    print("RESULT " + json.dumps(result), flush=True)
    (out_dir() / f"conv_fp8_{args.model}_b{n}.json").write_text(json.dumps({"result": result, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
