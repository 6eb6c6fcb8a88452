"""Float8 matmuls for the UNet's transformer linears that read a LayerNorm (``engine.fp8``).

Each converted ``nn.Linear`` keeps its bf16 ``weight`` Parameter (the one adapters are fused
into, the one ``state_dict`` shows) and a cached float8 (e4m3) copy with one scale per output
row. At each call the activations are scaled per row (per token) to float8 on the fly and the
product runs in ``torch._scaled_mm`` (float8 tensor cores; fast accumulation on CUDA),
accumulated in float32 and written in the activations' dtype.

Only the linears that read a LayerNorm's output are converted (:data:`NORM_FED`): under
``torch.compile`` their per-row scaling fuses into the norm's kernel. Elsewhere the scaling would
be a kernel of its own that costs more than the float8 product saves (docs/BENCHMARKS.md).

The cached copy must follow the weight: :class:`Float8Copies` rewrites it in place (same storage,
so a compiled UNet keeps its graph) and the engine refreshes it after every adapter swap.

Pixels differ from bf16 (fewer significant bits in each product's inputs), so the render output
key records it (see ``Renderer.key``).
"""

from __future__ import annotations

import re
import torch
from torch import nn

__all__ = ["FP8_MAX", "NORM_FED", "Float8Linear", "convert_unet", "fp8_unavailable", "quantize_rows", "Float8Copies"]

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
# The linears whose input is a LayerNorm's output: self-attention to_q/k/v (or the fused to_qkv),
# cross-attention to_q and the feed-forward's GEGLU proj.
NORM_FED = re.compile(r"(^|\.)attentions\.\d+\.transformer_blocks\.\d+\."
                      r"(attn1\.(to_qkv|to_q|to_k|to_v)|attn2\.to_q|ff\.net\.0\.proj)$")


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


def convert_unet(unet: nn.Module) -> int:
    """Convert the UNet's LayerNorm-fed linears (:data:`NORM_FED`) to :class:`Float8Linear` in
    place (module identity, parameter names and state dict unchanged); returns how many. Linears
    whose sizes are not multiples of 16 (a float8 GEMM requirement) stay as they are.

    The class of each converted module changes (``module.__class__``) rather than the module
    being replaced: adapters, the fused-QKV projections and a compiled UNet all hold these
    modules and their ``weight`` Parameters by identity."""
    model = getattr(unet, "_orig_mod", unet)
    count = 0
    for name, module in list(model.named_modules()):
        if (type(module) is nn.Linear and module.in_features % 16 == 0 and module.out_features % 16 == 0
                and NORM_FED.search(name)):
            module.__class__ = Float8Linear
            module.quantize_weight()
            count += 1
    return count


class Float8Copies:
    """Keeps the float8 copies of a UNet's :class:`Float8Linear` modules in step with their
    weights across adapter swaps (:meth:`refresh`), in place (same storage, so a compiled UNet
    keeps its graph). A weight back at its base value gets the base's float8 copy back, kept (on
    the weight's device) from before its first change: bit for bit what requantising it gives,
    without the pass over the weight."""

    def __init__(self, unet: nn.Module):
        model = getattr(unet, "_orig_mod", unet)
        self.modules = [m for m in model.modules() if isinstance(m, Float8Linear)]
        self.base: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(weight) -> the base's (w8, w_scale)

    def refresh(self, touched: set[int], modified: set[int]) -> None:
        """After a swap: ``touched``, the ``id()`` of every weight ever changed (whose float8 copy
        may be stale); ``modified``, those that now differ from their base value (requantised).
        Call it after every change, before the copies are used: a weight first seen in
        ``touched`` must still have its base's float8 copy."""
        restore: list[Float8Linear] = []
        with torch.no_grad():
            for module in self.modules:
                key = id(module.weight)
                if key not in touched:
                    continue
                if key not in self.base:  # first change: w8 still holds the base's copy
                    self.base[key] = (module.w8.clone(), module.w_scale.clone())
                if key in modified:
                    module.quantize_weight()
                else:
                    restore.append(module)
            if restore:
                saved = [self.base[id(m.weight)] for m in restore]
                torch._foreach_copy_([m.w8 for m in restore] + [m.w_scale for m in restore],
                                     [w8 for w8, _ in saved] + [scale for _, scale in saved])
