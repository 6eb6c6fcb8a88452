"""The per-row math of adapter slots (see :mod:`rayimg.render.multi_lora`): each slotted module
adds ``sum_k scale[n, k] * B[index[n, k]] @ (A[index[n, k]] @ x[n])`` to its base output, from
slot tables gathered per row of its input. Plain PyTorch with no Python branch on data, so a
compiled module keeps one graph across slot loads and batches. The low-rank product accumulates into
the base output's buffer (:func:`add_low_rank_`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rayimg.render.adapters import LoraError

__all__ = ["Rows", "is_slotted", "slotted_class"]


class Rows:
    """The per-row adapter choice of one component: ``index`` (slot, long) and ``scale``
    (float32), both ``(max_rows, K)`` on the component's device, of which the first ``count``
    rows are in use; ``count`` -1: not set (a forward refuses to run). ``passthrough``: the modules
    compute their base output only (see :meth:`AdapterSlots.set_passthrough`)."""

    def __init__(self, component: str, max_rows: int, k: int, device: torch.device):
        self.component = component
        self.index = torch.zeros(max_rows, k, dtype=torch.long, device=device)
        self.scale = torch.zeros(max_rows, k, dtype=torch.float32, device=device)
        self.count = -1
        self.passthrough = False
        if device.type == "cuda":
            # constant addresses: CUDA graphs read them in place instead of copying them each replay
            torch._dynamo.mark_static_address(self.index)
            torch._dynamo.mark_static_address(self.scale)

    def check(self, module: nn.Module, rows: int) -> None:
        """Eager calls only: traced, comparing the batch with a Python int would specialise the
        graph's batch dimension (one graph per batch size even with a dynamic batch). Compiled
        callers check each call's rows before it, outside the graph (:meth:`verify`, through
        :meth:`AdapterSlots.check_rows`, as :class:`~rayimg.render.stepper.StepBatcher` does)."""
        if torch.compiler.is_compiling():
            return
        self.verify(f"module {type(module).__name__}", rows)

    def verify(self, what: str, rows: int) -> None:
        """Raise :class:`LoraError` unless ``rows`` is the row count set for the next call."""
        if rows != self.count:
            have = "no batch is set" if self.count < 0 else f"the batch set has {self.count} rows"
            raise LoraError(f"adapter slots: {self.component} {what} got {rows} rows but {have}; "
                            f"call AdapterSlots.set_batch with this call's samples (guidance=True when the UNet batch is doubled)")


def _gathered(module: nn.Module, x: torch.Tensor):
    """The slots of each of ``x``'s rows, scaled: A ``(n, K*R, in[, kh, kw])`` with ``scale[n, k]``
    folded in (in float32, rounded once) and B^T ``(n, K*R, out)``; None in passthrough."""
    rows, down, up = module.lora_slot_rows, module.lora_slot_down, module.lora_slot_up
    if rows.passthrough:
        return None
    n = x.shape[0]
    rows.check(module, n)
    index, scale = rows.index[:n].reshape(-1), rows.scale[:n]
    a = down.index_select(0, index).view(n, -1, *down.shape[1:])  # (n, K, R, in[, kh, kw])
    a = (a.float() * scale.view(n, -1, *([1] * (a.ndim - 2)))).to(x.dtype)
    return a.flatten(1, 2), up.index_select(0, index).view(n, -1, up.shape[-1])


@torch.library.custom_op("rayimg::add_low_rank_", mutates_args=("out",))
def add_low_rank_(out: torch.Tensor, h: torch.Tensor, b: torch.Tensor) -> None:
    """``out += h @ b`` in place (``baddbmm_``). An op of its own so that a compiled graph calls it
    on the base output's buffer: ``torch.baddbmm`` in a graph writes a new buffer, which on CUDA is
    a copy of the base output before the product accumulates into it."""
    out.baddbmm_(h, b)


@add_low_rank_.register_fake
def _(out: torch.Tensor, h: torch.Tensor, b: torch.Tensor) -> None:
    return None


def _accumulate(out3: torch.Tensor, h: torch.Tensor, b: torch.Tensor, in_place: bool) -> torch.Tensor:
    """``out3 + h @ b`` (batched): in ``out3``'s storage when ``in_place`` (``out3`` is a view of a
    base output no one else holds) and no gradient is being recorded, else a new tensor."""
    if not in_place or (torch.is_grad_enabled() and (out3.requires_grad or h.requires_grad or b.requires_grad)):
        return torch.baddbmm(out3, h, b)
    if torch.compiler.is_compiling():
        add_low_rank_(out3, h, b)  # traced: the op keeps the graph from copying out3
    else:
        out3.baddbmm_(h, b)  # eager: the same, without the custom op's dispatch cost
    return out3


class _SlottedLinear:
    """Mixin put in front of a linear's class (``nn.Linear``, float8 linears)."""

    lora_slot_down: torch.Tensor
    lora_slot_up: torch.Tensor
    lora_slot_rows: Rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        slots = _gathered(self, x)
        if slots is None:
            return out
        a, b = slots
        n = x.shape[0]
        h = torch.bmm(x.reshape(n, -1, x.shape[-1]), a.transpose(1, 2))  # (n, T, K*R)
        return _accumulate(out.reshape(n, -1, out.shape[-1]), h, b, out.is_contiguous()).view(out.shape)


class _SlottedConv2d:
    """Mixin put in front of an ``nn.Conv2d``'s class: A as a kxk conv (one group per row, so each
    row convolves with its own slots), B as a 1x1 conv (a batched matmul)."""

    lora_slot_down: torch.Tensor
    lora_slot_up: torch.Tensor
    lora_slot_rows: Rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        slots = _gathered(self, x)
        if slots is None:
            return out
        a, b = slots
        n, c = x.shape[:2]
        width = a.shape[1]
        h = F.conv2d(x.reshape(1, n * c, *x.shape[2:]), a.reshape(n * width, *a.shape[2:]), None,
                     self.stride, self.padding, self.dilation, groups=n)  # (1, n*K*R, H', W')
        h = h.view(n, width, -1)
        o = out.shape[1]
        if out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous():
            rows_last = out.permute(0, 2, 3, 1).reshape(n, -1, o)  # a view: (n, H'W', out)
            return _accumulate(rows_last, h.transpose(1, 2), b, True).view(n, *out.shape[2:], o).permute(0, 3, 1, 2)
        return _accumulate(out.reshape(n, o, -1), b.transpose(1, 2), h, out.is_contiguous()).view(out.shape)


_SLOTTED_CLASSES: dict[type, type] = {}


def slotted_class(cls: type) -> type:
    sub = _SLOTTED_CLASSES.get(cls)
    if sub is None:
        mixin = _SlottedConv2d if issubclass(cls, nn.Conv2d) else _SlottedLinear
        sub = type(f"Slotted{cls.__name__}", (mixin, cls), {"__module__": cls.__module__, "__doc__": cls.__doc__})
        _SLOTTED_CLASSES[cls] = sub
    return sub


def is_slotted(module: nn.Module) -> bool:
    """Whether ``module`` already carries adapter slots."""
    return type(module) in _SLOTTED_CLASSES.values()
