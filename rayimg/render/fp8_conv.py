"""Float8 convolutions for the UNet's ResNet blocks and upsamplers (``engine.fp8_convs``).

The convolutions are about a quarter of a 1024² SDXL UNet step. Torch has no float8 convolution,
so on CUDA these run through cuDNN's graph API (the optional ``nvidia-cudnn-frontend`` package,
Hopper GPUs): image and filter in float8 e4m3, products accumulated in float32, the output written
in bf16. Elsewhere (CPU tests) the same float8 operands are multiplied in float32 by ``F.conv2d``,
which is the same math up to the order of the sums.

Each converted ``nn.Conv2d`` keeps its ``weight`` Parameter (adapters fuse into it; ``state_dict``
unchanged) and a float8 copy with one scale per output channel, refreshed by
:func:`rayimg.render.fp8.requantize` after adapter swaps. How its input is scaled depends on what
feeds it, so that an image's pixels never depend on the other images of its batch:

- ``normed`` (``resnets.N.conv1`` / ``conv2``: the input is a GroupNorm + SiLU output, far inside
  e4m3's range): no scale, values clamped to ±448; under ``torch.compile`` the cast fuses into the
  norm's kernel, which then writes 1 byte per value instead of 2;
- ``sample`` (``upsamplers.0.conv``: an upsampled residual stream): one scale per image;
- ``rows`` (``conv_shortcut``, 1×1): a GEMM over the channels-last pixels with one scale per pixel
  (torch's float8 GEMM, as :class:`~rayimg.render.fp8.Float8Linear`).

Downsamplers, ``conv_in`` and ``conv_out`` stay in bf16 (small, or their input is not normalized).

cuDNN offers several plans per convolution, and on an H100 its heuristic first choice ran at about
half the bf16 rate where the fastest plan beat bf16 by up to 30 % (``bench/conv_fp8_bench.py``). A plan
changes the order of the sums, so the plan is never picked by timing at run time (two workers could
pick differently and render different bits): it comes from :data:`PLAN_TABLE` (device name, cuDNN
version, shape -> plan name; written by ``bench/conv_fp8_bench.py --tune``), which depends only on the
hardware and software. A CUDA convolution whose shape is not in the table runs in bf16 (see
:data:`UNTUNED`).
"""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rayimg.render.fp8 import FP8_DTYPE, FP8_MAX, quantize_rows

__all__ = ["Float8Conv2d", "PLAN_TABLE", "UNTUNED", "convert_convs", "fp8_conv2d", "fp8_conv_unavailable", "has_plan", "plan_key", "plan_timings"]

# which convolutions, and how their input is scaled (module-name patterns, tried in order)
_ROLES = (
    (re.compile(r"(^|\.)resnets\.\d+\.conv_shortcut$"), "rows"),
    (re.compile(r"(^|\.)resnets\.\d+\.conv[12]$"), "normed"),
    (re.compile(r"(^|\.)upsamplers\.\d+\.conv$"), "sample"),
)
PLAN_TABLE_PATH = Path(__file__).with_name("fp8_conv_plans.json")
PLAN_TABLE: dict = json.loads(PLAN_TABLE_PATH.read_text()) if PLAN_TABLE_PATH.exists() else {}

# a CUDA convolution whose shape has no PLAN_TABLE entry: "bf16" runs it as the bf16 model would
# (cuDNN's heuristic float8 plans ran at about half the bf16 rate on an H100, bench/conv_fp8_bench.py);
# "heuristic" in float8 with cuDNN's heuristic plan (tests on shapes no table covers)
UNTUNED = "bf16"

_LOCK = threading.Lock()
_GRAPHS: dict = {}
_HANDLES: dict = {}


def fp8_conv_unavailable(device: torch.device) -> str | None:
    """Why float8 convolutions cannot run on ``device`` (None: they can)."""
    if device.type == "cpu":
        return None  # the float32 reference path
    if device.type != "cuda":
        return f"float8 convolutions are not available on {device.type}"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (9, 0):
        return (f"float8 convolutions need cuDNN's float8 kernels, on an NVIDIA GPU of compute capability 9.0 or newer "
                f"(Hopper); {torch.cuda.get_device_name(device)} is {major}.{minor}")
    try:
        _cudnn()
    except ImportError as exc:
        return f"float8 convolutions need cuDNN's Python frontend: pip install nvidia-cudnn-frontend ({exc})"
    return None


def _cudnn():
    torch.backends.cudnn.version()  # torch loads libcudnn first; the frontend binds to the loaded library
    import cudnn

    return cudnn


def plan_key(x_shape, w_shape, stride: int, padding: int) -> str:
    """A shape's entry in :data:`PLAN_TABLE` (channels-last float8 image and filter, bf16 output)."""
    return f"x{'x'.join(map(str, x_shape))}_w{'x'.join(map(str, w_shape))}_s{stride}_p{padding}"


def table_section(device: torch.device) -> str:
    return f"{torch.cuda.get_device_name(device)}|cudnn {_cudnn().backend_version()}"


def has_plan(x_shape, w_shape, stride: int, padding: int, device: torch.device) -> bool:
    """Whether :data:`PLAN_TABLE` names a plan for this convolution on ``device``."""
    return plan_key(tuple(x_shape), tuple(w_shape), stride, padding) in PLAN_TABLE.get(table_section(device), {})


class _ConvGraph:
    """One cuDNN float8 convolution graph (one shape, stride and padding) and its plan: ``plan`` a
    plan name (or ``""``: every plan built, the first selected, for timing them), None: the
    :data:`PLAN_TABLE` entry or else cuDNN's heuristic choice."""

    def __init__(self, x8: torch.Tensor, w8: torch.Tensor, stride: int, padding: int, plan: str | None = None):
        cudnn = _cudnn()
        device = x8.device
        if device.index not in _HANDLES:
            with torch.cuda.device(device):
                _HANDLES[device.index] = cudnn.create_handle()
        self.handle = _HANDLES[device.index]
        dt = cudnn.data_type
        g = cudnn.pygraph(io_data_type=dt.BFLOAT16, intermediate_data_type=dt.FLOAT, compute_data_type=dt.FLOAT, handle=self.handle)
        self.X = g.tensor(name="X", dim=list(x8.shape), stride=list(x8.stride()), data_type=dt.FP8_E4M3)
        self.W = g.tensor(name="W", dim=list(w8.shape), stride=list(w8.stride()), data_type=dt.FP8_E4M3)
        self.Y = g.conv_fprop(image=self.X, weight=self.W, padding=[padding, padding], stride=[stride, stride],
                              dilation=[1, 1], compute_data_type=dt.FLOAT)
        self.Y.set_output(True).set_data_type(dt.BFLOAT16)
        g.validate()
        g.build_operation_graph()
        g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        g.check_support()
        self.graph = g
        self.key = plan_key(x8.shape, w8.shape, stride, padding)
        wanted = plan if plan is not None else PLAN_TABLE.get(table_section(device), {}).get(self.key)
        self.names: list[str] = []
        self.index = 0
        if wanted is None:
            g.build_plans()  # cuDNN's heuristic choice
            self.plan = "heuristic"
            self.workspace_size = g.get_workspace_size()
            return
        g.build_plans(cudnn.build_plan_policy.ALL)
        self.names = [g.get_plan_name_at_index(i) for i in range(g.get_execution_plan_count())]
        if wanted:
            if wanted not in self.names:
                raise RuntimeError(f"fp8 convolution {self.key}: cuDNN offers no plan {wanted!r} (it has {self.names})")
            self.index = self.names.index(wanted)
        self.plan = self.names[self.index]
        self.workspace_size = g.get_workspace_size_plan_at_index(self.index)

    def run(self, x8: torch.Tensor, w8: torch.Tensor, y: torch.Tensor, index: int | None = None) -> None:
        cudnn = _cudnn()
        cudnn.set_stream(handle=self.handle, stream=torch.cuda.current_stream(x8.device).cuda_stream)
        pack = {self.X: x8, self.W: w8, self.Y: y}
        if self.plan == "heuristic":
            workspace = torch.empty(max(self.workspace_size, 1), device=x8.device, dtype=torch.uint8)
            self.graph.execute(pack, workspace, handle=self.handle)
            return
        index = self.index if index is None else index
        size = self.workspace_size if index == self.index else self.graph.get_workspace_size_plan_at_index(index)
        workspace = torch.empty(max(size, 1), device=x8.device, dtype=torch.uint8)
        self.graph.execute_plan_at_index(pack, workspace, index, handle=self.handle)


def plan_timings(x8: torch.Tensor, w8: torch.Tensor, stride: int, padding: int, iters: int = 10) -> tuple[str, list[tuple[str, float]]]:
    """Every plan cuDNN offers for this convolution, timed (CUDA events, µs per call, fastest
    first), and the name of the heuristics' choice (the first of the ranked list): what
    ``bench/conv_fp8_bench.py --tune`` writes into :data:`PLAN_TABLE`."""
    graph = _ConvGraph(x8, w8, stride, padding, plan="")
    y = torch.empty(_out_shape(x8.shape, w8.shape, stride, padding), device=x8.device, dtype=torch.bfloat16,
                    memory_format=torch.channels_last)
    times = []
    for i, name in enumerate(graph.names):
        try:
            for _ in range(2):
                graph.run(x8, w8, y, index=i)
            torch.cuda.synchronize(x8.device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                graph.run(x8, w8, y, index=i)
            end.record()
            end.synchronize()
            times.append((name, start.elapsed_time(end) * 1000 / iters))
        except Exception:  # a plan that does not run here
            continue
    return graph.names[0], sorted(times, key=lambda t: t[1])


def _graph(x8: torch.Tensor, w8: torch.Tensor, stride: int, padding: int) -> _ConvGraph:
    key = (x8.device.index, tuple(x8.shape), tuple(x8.stride()), tuple(w8.shape), tuple(w8.stride()), stride, padding)
    graph = _GRAPHS.get(key)
    if graph is None:
        with _LOCK:
            graph = _GRAPHS.get(key)
            if graph is None:
                graph = _GRAPHS[key] = _ConvGraph(x8, w8, stride, padding)
    return graph


def _out_shape(x_shape, w_shape, stride: int, padding: int) -> tuple[int, int, int, int]:
    n, _, h, w = x_shape
    k, _, r, s = w_shape
    return n, k, (h + 2 * padding - r) // stride + 1, (w + 2 * padding - s) // stride + 1


@torch.library.custom_op("rayimg::fp8_conv2d", mutates_args=())
def fp8_conv2d(x8: torch.Tensor, w8: torch.Tensor, stride: int, padding: int, out_dtype: torch.dtype) -> torch.Tensor:
    """``conv2d(x8, w8)`` of float8 e4m3 operands (unscaled), accumulated in float32, written in
    ``out_dtype``, channels last. On CUDA one cuDNN graph (bf16 output); elsewhere ``F.conv2d`` of the
    operands in float32."""
    if x8.device.type != "cuda":
        y = F.conv2d(x8.float(), w8.float(), stride=stride, padding=padding)
        return y.to(out_dtype).contiguous(memory_format=torch.channels_last)
    if out_dtype != torch.bfloat16:
        raise ValueError(f"float8 convolutions on CUDA write bfloat16, not {out_dtype}")
    x8 = x8.contiguous(memory_format=torch.channels_last)
    w8 = w8.contiguous(memory_format=torch.channels_last)
    y = torch.empty(_out_shape(x8.shape, w8.shape, stride, padding), device=x8.device, dtype=out_dtype,
                    memory_format=torch.channels_last)
    _graph(x8, w8, stride, padding).run(x8, w8, y)
    return y


@fp8_conv2d.register_fake
def _(x8, w8, stride, padding, out_dtype):
    return torch.empty(_out_shape(x8.shape, w8.shape, stride, padding), device=x8.device, dtype=out_dtype,
                       memory_format=torch.channels_last)


class Float8Conv2d(nn.Conv2d):
    """An ``nn.Conv2d`` (converted in place by :func:`convert_convs`) whose product runs in float8;
    ``fp8_role`` says how its input is scaled (see the module docstring)."""

    w8: torch.Tensor
    w_scale: torch.Tensor
    fp8_role: str

    def quantize_weight(self) -> None:
        """(Re)build the float8 copy of ``weight`` (one scale per output channel): in place when it exists."""
        with torch.no_grad():
            w = self.weight.detach().float()
            scale = w.flatten(1).abs().amax(dim=1).clamp(min=1e-12) / FP8_MAX  # (out,)
            q = (w / scale[:, None, None, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
            if self.fp8_role == "rows":
                q, scale = q.flatten(1), scale[None, :]  # (out, in): .t() is the column-major mat2; (1, out)
            else:
                q = q.contiguous(memory_format=torch.channels_last)
            if getattr(self, "w8", None) is None:
                self.register_buffer("w8", q, persistent=False)
                self.register_buffer("w_scale", scale.contiguous(), persistent=False)
            else:
                self.w8.copy_(q)
                self.w_scale.copy_(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias
        if self.fp8_role == "rows":
            n, c, h, w = x.shape
            # a view when x is channels last; a copy otherwise (a plain reshape of a contiguous
            # batch of one would be a column-major view, which float8 GEMMs do not take)
            x2 = x.permute(0, 2, 3, 1).contiguous().view(-1, c)
            x8, scale = quantize_rows(x2)
            y = torch._scaled_mm(x8, self.w8.t(), scale_a=scale, scale_b=self.w_scale, out_dtype=x.dtype, use_fast_accum=x.is_cuda)
            if bias is not None:
                y = y + bias
            return y.reshape(n, h, w, -1).permute(0, 3, 1, 2)
        stride, padding = self.stride[0], self.padding[0]
        if x.is_cuda and UNTUNED == "bf16" and not has_plan(x.shape, self.w8.shape, stride, padding, x.device):
            return F.conv2d(x, self.weight, self.bias, self.stride, self.padding)
        w_scale = self.w_scale[None, :, None, None]
        if self.fp8_role == "sample":
            x_scale = x.abs().amax(dim=(1, 2, 3), keepdim=True).float().clamp(min=1e-12) / FP8_MAX  # (N, 1, 1, 1)
            x8 = (x.float() / x_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
            out_scale = x_scale * w_scale
        else:
            x8 = x.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
            out_scale = w_scale
        y = fp8_conv2d(x8, self.w8, stride, padding, x.dtype)
        y = y.float() * out_scale
        if bias is not None:
            y = y + bias.float()[None, :, None, None]
        return y.to(x.dtype)

    @staticmethod
    def fits(module: nn.Module) -> bool:
        if type(module) is not nn.Conv2d or module.groups != 1 or module.padding_mode != "zeros":
            return False
        k, s, p, d = module.kernel_size, module.stride, module.padding, module.dilation
        if isinstance(p, str) or k[0] != k[1] or s[0] != s[1] or p[0] != p[1] or d != (1, 1):
            return False
        return module.in_channels % 16 == 0 and module.out_channels % 16 == 0


def convert_convs(unet: nn.Module, roles: tuple[str, ...] = ("normed", "rows", "sample")) -> dict[str, int]:
    """Convert the UNet's ResNet and upsampler convolutions (those of ``roles``) to
    :class:`Float8Conv2d` in place (module identity, parameter names and state dict unchanged);
    returns how many per role. Convolutions whose channels are not multiples of 16 stay as they are."""
    model = getattr(unet, "_orig_mod", unet)
    counts: dict[str, int] = {}
    for name, module in list(model.named_modules()):
        if isinstance(module, Float8Conv2d) or not Float8Conv2d.fits(module):
            continue
        role = next((r for pattern, r in _ROLES if pattern.search(name)), None)
        if role is None or role not in roles or (role == "rows" and module.kernel_size != (1, 1)):
            continue
        module.__class__ = Float8Conv2d
        module.fp8_role = role
        module.quantize_weight()
        counts[role] = counts.get(role, 0) + 1
    return counts
