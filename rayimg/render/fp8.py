"""FP8 matmuls for the UNet's transformer linears that read a LayerNorm (``engine.fp8``).

Each converted ``nn.Linear`` keeps its bf16 ``weight`` Parameter (the one adapters are fused
into, the one ``state_dict`` shows) and a cached float8 (e4m3) copy with one scale per output
row. At each call the activations are scaled per row (per token) to float8 on the fly and the
product runs in ``torch._scaled_mm`` (float8 tensor cores: twice the bf16 rate on H100; fast
accumulation on CUDA), accumulated in float32 and written in the activations' dtype.

Only the linears that read a LayerNorm's output are converted (:data:`TARGETS`): under
``torch.compile`` their per-row scaling fuses into the norm's kernel. Elsewhere (attention
output, the GEGLU output, proj_in/out) the scaling is a kernel of its own that costs more than
the float8 product saves (``bench/gemm_bench.py``: at batch 1 the scaling alone is 4.8 ms per
step, the float8 products save 3.9 ms).

The cached copy must follow the weight: :func:`requantize` rewrites it in place (same storage,
so a compiled UNet keeps its graph) and the engine calls it after every adapter swap.

Pixels differ from bf16 (about 3 significant bits less in each product's inputs; the final
latents of a 30-step render are about 1 % apart), so the render output key records it and the
set of converted linears (see ``Renderer.key``).

``norm_fed+ff`` (``engine.fp8_linears``) also converts each GEGLU feed-forward's output linear:
:func:`geglu_rows_fp8` (one Triton kernel on CUDA) turns the projection output into the GEGLU
product in float8 with its row scales, so that product's scaling is fused too. On an H100 its part
alone saves 0.9 ms per UNet step at UNet batch 8 and costs 0.3 ms at batch 2 (the kernel reaches
1.7 TB/s; ``bench/geglu_bench.py``, render run 6), but the whole UNet step at UNet batch 8 was 4.9 ms
slower with it than without (render run 7), so it is not the default.

Measured on an H100 (docs/BENCHMARKS.md, render run 5), compiled with CUDA graphs, 1024² CFG
step in the pipeline: 29.9 vs 32.6 ms (bf16) at batch 1, 112 vs 123-126 ms at batch 4. Converting every attention
block linear instead was slower than bf16 at batch 1 (32.8 ms) and gained 4 % at batch 4.
"""

from __future__ import annotations

import re
from typing import Iterable

import torch
from torch import nn

__all__ = ["FP8_MAX", "Float8BlockLinear", "Float8Linear", "blockwise_mm", "fp8_unavailable", "convert_unet", "geglu_reference",
           "geglu_rows_fp8", "quantize_blocks", "quantize_rows", "requantize"]

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
# Which linears multiply in float8. ``norm_fed`` (the default): the ones whose input is a
# LayerNorm's output (self-attention to_q/k/v or the fused to_qkv, cross-attention to_q, the
# feed-forward's GEGLU proj), where the per-row activation scaling fuses into the norm's kernel.
# ``all``: every linear of the attention blocks (also to_out.0, ff.net.2, proj_in/out, cross
# to_k/v); their scaling runs as a kernel of its own, which on an H100 costs more than the float8
# product saves (bench/gemm_bench.py, docs/BENCHMARKS.md render run 5).
# ``norm_fed+ff``: also the feed-forward's output linear ``ff.net.2``, whose input (the GEGLU
# product) comes to it in float8 from one Triton kernel (:func:`geglu_rows_fp8`), so there the
# scaling is fused too.
_NORM_FED = re.compile(r"(^|\.)attentions\.\d+\.transformer_blocks\.\d+\."
                       r"(attn1\.(to_qkv|to_q|to_k|to_v)|attn2\.to_q|ff\.net\.0\.proj)$")
# ``norm_fed+ff128``: ``ff.net.2`` too, in float8 with one scale per 1×128 block of its input
# (each row's 128-column slices; weights likewise, per output row and 128 inputs): the GEGLU and
# this scaling are a plain (row-local) reduction that inductor fuses into one kernel at memory
# speed, where a whole-row maximum could not be (:func:`quantize_blocks`, :func:`blockwise_mm`).
TARGETS = {
    "norm_fed": _NORM_FED,
    "norm_fed+ff": _NORM_FED,
    "norm_fed+ff128": _NORM_FED,
    "all": re.compile(r"(^|\.)attentions\.\d+\."),
}
BLOCK = 128  # the block width of ``norm_fed+ff128`` (what cuBLAS's block-scaled float8 GEMM takes)
_FEED_FORWARD = re.compile(r"(^|\.)attentions\.\d+\.transformer_blocks\.\d+\.ff$")


def fp8_unavailable(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why float8 matmuls cannot run for weights on ``device`` in ``dtype`` (None: they can)."""
    if not hasattr(torch, "_scaled_mm"):
        return f"this torch ({torch.__version__}) has no torch._scaled_mm"
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            return (f"float8 matmuls need an NVIDIA GPU of compute capability 8.9 or newer (Ada, Hopper); "
                    f"{torch.cuda.get_device_name(device)} is {major}.{minor}")
        if dtype != torch.bfloat16:
            return f"on CUDA the model must be bfloat16 (model.dtype), not {str(dtype).replace('torch.', '')}"
    elif device.type != "cpu":
        return f"float8 matmuls are not available on {device.type}"
    return None


def quantize_rows(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A 2-D tensor to float8 with one float32 scale per row: ``(x8 (M, K), scale (M, 1))``.
    The row maximum is taken in the input's dtype (exact), so under ``torch.compile`` the
    reduction and the scaling form one kernel with the op that produced ``x2``."""
    scale = x2.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
    x8 = (x2.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return x8, scale


def quantize_blocks(x2: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """A 2-D tensor ``(M, K)`` to float8 with one float32 scale per ``1 × block`` slice of each row:
    ``(x8 (M, K), scale (M, K / block))``, the scale outer-dim-major (strides ``(1, M)``), as cuBLAS's
    block-scaled GEMM reads it. Each block's maximum is taken in the input's dtype (exact); under
    ``torch.compile`` it fuses with the op that produced ``x2`` (a reduction over 128 contiguous
    elements, no whole-row pass)."""
    m, k = x2.shape
    xb = x2.reshape(m, k // block, block)
    scale = xb.abs().amax(dim=2).float().clamp(min=1e-12) / FP8_MAX  # (M, K / block)
    x8 = (xb.float() / scale.unsqueeze(2)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).reshape(m, k)
    return x8, scale.t().contiguous().t()


def blockwise_mm(x8: torch.Tensor, x_scale: torch.Tensor, w8: torch.Tensor, w_scale: torch.Tensor, out_dtype: torch.dtype,
                 block: int = BLOCK) -> torch.Tensor:
    """``x @ w.t()`` from 1×``block``-scaled float8 operands: ``x8 (M, K)`` with ``x_scale (M, K/block)``
    (outer-dim-major), ``w8 (N, K)`` with ``w_scale (K/block, N)``. On CUDA one cuBLAS block-scaled
    GEMM (fp32 accumulation; cuBLAS has no fast accumulation for block scales); elsewhere the same
    product from the dequantized operands in float32."""
    if x8.is_cuda:
        return torch._scaled_mm(x8, w8.t(), scale_a=x_scale, scale_b=w_scale, out_dtype=out_dtype, use_fast_accum=False)
    m, k = x8.shape
    x = (x8.float().reshape(m, k // block, block) * x_scale.unsqueeze(2)).reshape(m, k)
    w = (w8.float().reshape(w8.shape[0], k // block, block) * w_scale.t().unsqueeze(2)).reshape(w8.shape)
    return (x @ w.t()).to(out_dtype)


def geglu_reference(h2: torch.Tensor) -> torch.Tensor:
    """diffusers' GEGLU on a projection output ``(M, 2N)``: ``h[:, :N] * gelu(h[:, N:])`` (exact
    GELU), computed in float32 and rounded once to ``h2``'s dtype."""
    a, g = h2.float().chunk(2, dim=-1)
    return (a * torch.nn.functional.gelu(g)).to(h2.dtype)


def _geglu_rows_reference(h2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize_rows(geglu_reference(h2))


_GEGLU_KERNEL = None


def _geglu_kernel():
    """The Triton kernel (built on first use; CUDA only): one program per row reads the row's
    ``2N`` projection outputs once, and writes the GEGLU product in float8 with the row's scale:
    the float32 product is rounded to the input dtype first, as :func:`geglu_reference` does."""
    global _GEGLU_KERNEL
    if _GEGLU_KERNEL is None:
        import triton
        import triton.language as tl

        @triton.jit
        def geglu_rows_fp8(h_ptr, x8_ptr, scale_ptr, n, stride_h, stride_x, fp8_max, BLOCK: tl.constexpr):
            row = tl.program_id(0).to(tl.int64)
            cols = tl.arange(0, BLOCK)
            mask = cols < n
            base = h_ptr + row * stride_h
            a = tl.load(base + cols, mask=mask, other=0.0)
            g = tl.load(base + n + cols, mask=mask, other=0.0).to(tl.float32)
            y = a.to(tl.float32) * (0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476)))
            y = y.to(a.dtype).to(tl.float32)
            scale = tl.maximum(tl.max(tl.abs(y), axis=0), 1e-12) / fp8_max
            q = tl.clamp(y / scale, -fp8_max, fp8_max)
            tl.store(x8_ptr + row * stride_x + cols, q.to(x8_ptr.dtype.element_ty), mask=mask)
            tl.store(scale_ptr + row, scale)

        _GEGLU_KERNEL = geglu_rows_fp8
    return _GEGLU_KERNEL


@torch.library.custom_op("rayimg::geglu_rows_fp8", mutates_args=())
def geglu_rows_fp8(h2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GEGLU of a projection output ``(M, 2N)`` straight to float8 with one scale per row:
    ``(x8 (M, N), scale (M, 1) float32)``, the input of a float8 ``ff.net.2``. On CUDA one Triton
    kernel (the row is read once; inductor's fusion of the same math reads it twice and was 3.5×
    slower than the scaling alone); elsewhere :func:`quantize_rows` of :func:`geglu_reference`."""
    if h2.device.type != "cuda":
        return _geglu_rows_reference(h2)
    import triton

    h2 = h2.contiguous()
    m, n2 = h2.shape
    n = n2 // 2
    x8 = torch.empty((m, n), device=h2.device, dtype=FP8_DTYPE)
    scale = torch.empty((m, 1), device=h2.device, dtype=torch.float32)
    block = triton.next_power_of_2(n)
    _geglu_kernel()[(m,)](h2, x8, scale, n, h2.stride(0), x8.stride(0), FP8_MAX, BLOCK=block,
                          num_warps=min(max(block // 512, 4), 16))
    return x8, scale


@geglu_rows_fp8.register_fake
def _(h2):
    m, n2 = h2.shape
    return h2.new_empty((m, n2 // 2), dtype=FP8_DTYPE), h2.new_empty((m, 1), dtype=torch.float32)


class Float8Linear(nn.Linear):
    """An ``nn.Linear`` (converted in place by :func:`convert_unet`) whose product runs in float8."""

    w8: torch.Tensor
    w_scale: torch.Tensor

    def quantize_weight(self) -> None:
        """(Re)build the float8 copy of ``weight``: in place when it exists."""
        with torch.no_grad():
            w = self.weight.detach().float()
            scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / FP8_MAX  # (out, 1)
            q = (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
            if getattr(self, "w8", None) is None:
                self.register_buffer("w8", q, persistent=False)  # (out, in): .t() is the column-major mat2
                self.register_buffer("w_scale", scale.t().contiguous(), persistent=False)  # (1, out)
            else:
                self.w8.copy_(q)
                self.w_scale.copy_(scale.t())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        x8, scale = quantize_rows(x2)
        # fast accumulation (CUDA): the tensor cores' own accumulator between the periodic fp32
        # promotions, as float8 inference kernels run (it is ignored on CPU)
        y = torch._scaled_mm(x8, self.w8.t(), scale_a=scale, scale_b=self.w_scale, out_dtype=x.dtype,
                             use_fast_accum=x.is_cuda)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], y.shape[-1])


class Float8BlockLinear(Float8Linear):
    """A :class:`Float8Linear` with 1×128 block scales (``norm_fed+ff128``'s ``ff.net.2``): ``w8``
    with ``w_scale (K/128, N)``, one scale per output row and 128 inputs; its input is scaled per
    1×128 block too (:func:`quantize_blocks`), and the product is :func:`blockwise_mm`."""

    def quantize_weight(self) -> None:
        with torch.no_grad():
            w = self.weight.detach()
            q, scale = quantize_blocks(w)  # scale (out, in/128), outer-dim-major
            scale = scale.t().contiguous()  # (in/128, out): the layout of a block-scaled mat2's scales
            if getattr(self, "w8", None) is None:
                self.register_buffer("w8", q, persistent=False)
                self.register_buffer("w_scale", scale, persistent=False)
            else:
                self.w8.copy_(q)
                self.w_scale.copy_(scale)

    @staticmethod
    def fits(module: nn.Module) -> bool:
        return _convertible(module) and module.in_features % BLOCK == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x8, scale = quantize_blocks(x.reshape(-1, shape[-1]))
        y = blockwise_mm(x8, scale, self.w8, self.w_scale, x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], y.shape[-1])


_FF_CLASSES: dict[tuple[type, type], type] = {}


def _convertible(module: nn.Module) -> bool:
    return type(module) is nn.Linear and module.in_features % 16 == 0 and module.out_features % 16 == 0


def convert_unet(unet: nn.Module, targets: str = "norm_fed") -> int:
    """Convert the UNet's ``targets`` linears (see :data:`TARGETS`) to :class:`Float8Linear` in
    place (module identity, parameter names and state dict unchanged); returns how many. Linears
    whose sizes are not multiples of 16 (a float8 GEMM requirement) stay as they are. With
    ``norm_fed+ff`` the GEGLU feed-forwards become :class:`Float8FeedForward` too."""
    if targets not in TARGETS:
        raise ValueError(f"fp8 targets must be one of {sorted(TARGETS)}, not {targets!r}")
    pattern = TARGETS[targets]
    model = getattr(unet, "_orig_mod", unet)
    count = 0
    for name, module in list(model.named_modules()):
        if _convertible(module) and pattern.search(name):
            module.__class__ = Float8Linear
            module.quantize_weight()
            count += 1
        elif (targets.endswith(("+ff", "+ff128")) and _FEED_FORWARD.search(name) and not isinstance(module, Float8FeedForward)
              and Float8FeedForward.fits(module)):
            blocks = targets.endswith("+ff128")
            out = module.net[2]
            if not (Float8BlockLinear.fits(out) if blocks else _convertible(out)):
                continue
            out.__class__ = Float8BlockLinear if blocks else Float8Linear
            out.quantize_weight()
            count += 1
            base, mixin = type(module), Float8BlockFeedForward if blocks else Float8FeedForward
            if (base, mixin) not in _FF_CLASSES:
                _FF_CLASSES[base, mixin] = type(f"{mixin.__name__[:-len('FeedForward')]}{base.__name__}", (mixin, base), {"__module__": __name__})
            module.__class__ = _FF_CLASSES[base, mixin]
    return count


class Float8FeedForward:
    """Mixed into a diffusers ``FeedForward`` of the form ``GEGLU -> Dropout -> Linear``
    (:func:`convert_unet` with ``norm_fed+ff``): the GEGLU product goes to float8 in the same
    kernel that computes it (:func:`geglu_rows_fp8`), and the output linear multiplies in float8.
    Parameters, buffers and module paths stay those of the ``FeedForward``."""

    @staticmethod
    def fits(module: nn.Module) -> bool:
        from diffusers.models.activations import GEGLU

        net = getattr(module, "net", None)
        if not isinstance(net, nn.ModuleList) or len(net) not in (3, 4) or type(net[0]) is not GEGLU:
            return False
        dropouts = [net[1]] + ([net[3]] if len(net) == 4 else [])
        if not all(isinstance(d, nn.Dropout) and d.p == 0 for d in dropouts):
            return False
        proj, out = net[0].proj, net[2]
        return (isinstance(out, nn.Linear) and proj.out_features == 2 * out.in_features and out.in_features % 16 == 0
                and out.out_features % 16 == 0)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        geglu, out = self.net[0], self.net[2]
        h = geglu.proj(hidden_states)
        shape = h.shape
        x8, scale = torch.ops.rayimg.geglu_rows_fp8(h.reshape(-1, shape[-1]))
        y = torch._scaled_mm(x8, out.w8.t(), scale_a=scale, scale_b=out.w_scale, out_dtype=h.dtype,
                             use_fast_accum=h.is_cuda)
        if out.bias is not None:
            y = y + out.bias
        return y.reshape(*shape[:-1], y.shape[-1])


class Float8BlockFeedForward(Float8FeedForward):
    """``norm_fed+ff128``: the GEGLU product scaled to float8 per 1×128 block in plain torch ops
    (inductor fuses the GEGLU, the block maxima and the scaling into one kernel), then the block-scaled
    float8 ``ff.net.2`` (:class:`Float8BlockLinear`)."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        geglu, out = self.net[0], self.net[2]
        h = geglu.proj(hidden_states)
        value, gate = h.chunk(2, dim=-1)
        y = value * geglu.gelu(gate)  # diffusers' GEGLU, in the activations' dtype
        shape = y.shape
        x8, scale = quantize_blocks(y.reshape(-1, shape[-1]))
        z = blockwise_mm(x8, scale, out.w8, out.w_scale, y.dtype)
        if out.bias is not None:
            z = z + out.bias
        return z.reshape(*shape[:-1], z.shape[-1])


def requantize(modules: Iterable[nn.Module] | nn.Module, weights: set[int] | None = None) -> int:
    """Refresh the float8 copies of the :class:`Float8Linear` and
    :class:`~rayimg.render.fp8_conv.Float8Conv2d` modules (of a model, or an iterable of
    modules) after their weights changed; ``weights``: only those whose ``id(weight)`` is in it."""
    from rayimg.render.fp8_conv import Float8Conv2d

    if isinstance(modules, nn.Module):
        modules = getattr(modules, "_orig_mod", modules).modules()
    count = 0
    for module in modules:
        if isinstance(module, (Float8Linear, Float8Conv2d)) and (weights is None or id(module.weight) in weights):
            module.quantize_weight()
            count += 1
    return count
