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
product in float8 with its row scales, so that product's scaling is fused too. On an H100 it saves
0.9 ms per UNet step at UNet batch 8 and costs 0.3 ms at batch 2 (the kernel reaches 1.7 TB/s;
``bench/geglu_bench.py``, render run 6), so it is not the default.

Measured on an H100 (docs/BENCHMARKS.md, render run 5), compiled with CUDA graphs, 1024² CFG
step in the pipeline: 29.9 vs 32.6 ms (bf16) at batch 1, 112 vs 123-126 ms at batch 4. Converting every attention
block linear instead was slower than bf16 at batch 1 (32.8 ms) and gained 4 % at batch 4.
"""

from __future__ import annotations

import re
from typing import Iterable

import torch
from torch import nn

__all__ = ["FP8_MAX", "Float8Linear", "add_layernorm_rows_fp8", "fp8_unavailable", "convert_unet", "geglu_reference", "geglu_rows_fp8", "quantize_rows",
           "requantize"]

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
TARGETS = {
    "norm_fed": _NORM_FED,
    "norm_fed+ff": _NORM_FED,
    "all": re.compile(r"(^|\.)attentions\.\d+\."),
}
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


def _add_layernorm_rows_reference(y: torch.Tensor, r: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                                  eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    h = y + r
    x8, scale = quantize_rows(torch.nn.functional.layer_norm(h, (h.shape[-1],), weight, bias, eps))
    return h, x8, scale


_ADD_LN_KERNEL = None


def _add_layernorm_kernel():
    """The Triton kernel (built on first use; CUDA only): ``ROWS`` rows per program, each read once
    (``y`` and ``r``), written once as their sum ``h`` (the new residual, in the inputs' dtype) and
    once as the float8 codes of ``layer_norm(h)`` with the row's scale. The norm is computed from
    the rounded ``h`` and rounded to the inputs' dtype before its scaling, as the eager path
    (``y + r``, ``F.layer_norm``, :func:`quantize_rows`) rounds."""
    global _ADD_LN_KERNEL
    if _ADD_LN_KERNEL is None:
        import triton
        import triton.language as tl

        @triton.jit
        def add_layernorm_rows_fp8(y_ptr, r_ptr, w_ptr, b_ptr, h_ptr, x8_ptr, scale_ptr, m, n, eps, fp8_max,
                                   ROWS: tl.constexpr, BLOCK: tl.constexpr):
            row1 = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
            rows = row1[:, None]
            cols = tl.arange(0, BLOCK)[None, :]
            cmask = cols < n
            mask = (rows < m) & cmask
            off = rows * n + cols
            y = tl.load(y_ptr + off, mask=mask, other=0.0)
            h = (y.to(tl.float32) + tl.load(r_ptr + off, mask=mask, other=0.0).to(tl.float32)).to(y.dtype)
            tl.store(h_ptr + off, h, mask=mask)
            hf = h.to(tl.float32)
            mean = tl.sum(hf, axis=1) / n
            d = tl.where(mask, hf - mean[:, None], 0.0)
            rstd = tl.math.rsqrt(tl.sum(d * d, axis=1) / n + eps)
            w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
            b = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
            o = (d * rstd[:, None] * w + b).to(y.dtype).to(tl.float32)
            o = tl.where(mask, o, 0.0)
            scale = tl.maximum(tl.max(tl.abs(o), axis=1), 1e-12) / fp8_max
            q = tl.clamp(o / scale[:, None], -fp8_max, fp8_max)
            tl.store(x8_ptr + off, q.to(x8_ptr.dtype.element_ty), mask=mask)
            tl.store(scale_ptr + row1, scale, mask=row1 < m)

        _ADD_LN_KERNEL = add_layernorm_rows_fp8
    return _ADD_LN_KERNEL


def _add_layernorm_launch(y, r, weight, bias, eps, rows: int | None = None, warps: int | None = None):
    import triton

    y, r = y.contiguous(), r.contiguous()
    m, n = y.shape
    h = torch.empty_like(y)
    x8 = torch.empty((m, n), device=y.device, dtype=FP8_DTYPE)
    scale = torch.empty((m, 1), device=y.device, dtype=torch.float32)
    block = triton.next_power_of_2(n)
    rows = rows or max(1, 2048 // block)
    warps = warps or min(max(rows * block // 256, 4), 16)
    _add_layernorm_kernel()[(triton.cdiv(m, rows),)](y, r, weight, bias, h, x8, scale, m, n, eps, FP8_MAX,
                                                      ROWS=rows, BLOCK=block, num_warps=warps)
    return h, x8, scale


@torch.library.custom_op("rayimg::add_layernorm_rows_fp8", mutates_args=())
def add_layernorm_rows_fp8(y: torch.Tensor, r: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A transformer block's residual add, its LayerNorm and the per-row float8 scaling of the norm,
    on 2-D ``(M, C)`` inputs: ``(h = y + r, x8 (M, C), scale (M, 1) float32)``, where ``x8 * scale``
    is ``layer_norm(h)``, the input of a float8 linear. On CUDA one Triton kernel that reads each
    row once (inductor loops over rows wider than 1,024: the same math took 11.2 ms of a UNet step
    at batch 8); elsewhere the torch ops."""
    if y.device.type != "cuda":
        return _add_layernorm_rows_reference(y, r, weight, bias, eps)
    return _add_layernorm_launch(y, r, weight, bias, eps)


@add_layernorm_rows_fp8.register_fake
def _(y, r, weight, bias, eps):
    m, n = y.shape
    return torch.empty_like(y), y.new_empty((m, n), dtype=FP8_DTYPE), y.new_empty((m, 1), dtype=torch.float32)


_GEGLU_MM_KERNEL = None
GEGLU_MM_CONFIG = (128, 128, 128, 8, 3, 8)  # BM, BN, BK, warps, stages, GROUP_M


def _geglu_mm_kernel():
    """The Triton kernel (built on first use; CUDA, compute capability 9.0+): the GEGLU projection
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


_FF_CLASSES: dict[type, type] = {}


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
        elif (targets.endswith("+ff") and _FEED_FORWARD.search(name) and not isinstance(module, Float8FeedForward)
              and Float8FeedForward.fits(module)):
            out = module.net[2]
            if _convertible(out):
                out.__class__ = Float8Linear
                out.quantize_weight()
                count += 1
            base = type(module)
            if base not in _FF_CLASSES:
                _FF_CLASSES[base] = type(f"Float8{base.__name__}", (Float8FeedForward, base), {"__module__": __name__})
            module.__class__ = _FF_CLASSES[base]
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


def requantize(modules: Iterable[nn.Module] | nn.Module, weights: set[int] | None = None) -> int:
    """Refresh the float8 copies of the :class:`Float8Linear` modules (of a model, or an iterable of
    modules) after their weights changed; ``weights``: only those whose ``id(weight)`` is in it."""
    if isinstance(modules, nn.Module):
        modules = getattr(modules, "_orig_mod", modules).modules()
    count = 0
    for module in modules:
        if isinstance(module, Float8Linear) and (weights is None or id(module.weight) in weights):
            module.quantize_weight()
            count += 1
    return count
