"""The text encoders' forward for one prompt, replayed from a CUDA graph.

The engine encodes each text alone (:mod:`rayimg.render.prompts`): a batch-1, fixed-length call
of a CLIP text encoder, a few hundred small kernels whose launches cost far more than their
work. :func:`install` makes such calls replay a CUDA graph of the encoder's forward: the same
kernels on the same weights, so the outputs are bit for bit those of the eager forward.

The graph reads the weights in place, so an adapter fused by ``copy_`` into the parameters
(:class:`~rayimg.render.adapters.FusedAdapters`) or loaded into adapter slots is seen at the next
replay. Whatever a graph cannot see is part of its key, checked at every call: the storage of
every parameter and buffer (a resized embedding table, a replaced weight), each module's class,
and the slot rows' Python state (passthrough, row count). A key seen for the first time captures
a graph (a few are kept); any other call (another shape, a mask, gradients, peft adapter layers
whose scales live in Python) runs the eager forward.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

__all__ = ["GraphedForward", "install"]

KEPT_GRAPHS = 4  # per encoder: e.g. slots passed through or not, before and after a textual inversion


def install(pipe) -> list["GraphedForward"]:
    """Make ``pipe``'s CUDA text encoders replay CUDA graphs for one-prompt calls; returns the
    installed forwards (none on another device, or already installed)."""
    out = []
    for name in ("text_encoder", "text_encoder_2"):
        encoder = getattr(pipe, name, None)
        if encoder is None or isinstance(encoder.__dict__.get("forward"), GraphedForward):
            continue
        if next(encoder.parameters()).device.type != "cuda":
            continue
        encoder.forward = GraphedForward(encoder)
        out.append(encoder.forward)
    return out


class GraphedForward:
    """The forward of ``encoder`` (set as its instance attribute, so the module keeps its identity,
    parameters and paths): calls with ``input_ids`` of one row on the GPU and nothing else but
    ``output_hidden_states`` replay a graph; the outputs are copies, never the graph's own
    buffers. ``stats``: replays, captures and eager calls."""

    def __init__(self, encoder: nn.Module):
        self.encoder = encoder
        self.eager = type(encoder).forward.__get__(encoder)
        self.graphs: OrderedDict[tuple, tuple] = OrderedDict()  # key -> (graph, static ids, static output)
        self.pool = None
        self.last_stream = None
        self.stats = {"replays": 0, "captures": 0, "eager": 0}

    def __call__(self, input_ids=None, *args, **kwargs):
        given = {k: v for k, v in kwargs.items() if v is not None}
        hidden = bool(given.pop("output_hidden_states", False))
        plain = not args and not given.pop("output_attentions", False) and given.pop("return_dict", True) is True and not given
        if not plain or not self._graphable(input_ids):
            self.stats["eager"] += 1
            return self.eager(input_ids, *args, **kwargs)
        key = (tuple(input_ids.shape), input_ids.dtype, input_ids.device, hidden, self._state())
        stream = torch.cuda.current_stream(input_ids.device)
        if self.last_stream is not None and self.last_stream != stream:
            stream.wait_stream(self.last_stream)  # the copies of the last replay's outputs are done first
        entry = self.graphs.get(key)
        if entry is None:
            entry = self._capture(input_ids, hidden)
            self.graphs[key] = entry
            while len(self.graphs) > KEPT_GRAPHS:
                self.graphs.popitem(last=False)
        else:
            self.graphs.move_to_end(key)
        graph, static_ids, static_out = entry
        static_ids.copy_(input_ids)
        graph.replay()
        self.stats["replays"] += 1
        self.last_stream = stream
        return _copied(static_out)

    def _graphable(self, input_ids) -> bool:
        encoder = self.encoder
        return (isinstance(input_ids, torch.Tensor) and input_ids.is_cuda and input_ids.dim() == 2 and input_ids.shape[0] == 1
                and not torch.is_grad_enabled() and not encoder.training and not getattr(encoder, "peft_config", None)
                and not torch.cuda.is_current_stream_capturing() and not torch.compiler.is_compiling())

    def _state(self) -> tuple:
        """What the graph reads that a replay cannot follow: storages, module classes, slot rows."""
        state = []
        for module in self.encoder.modules():
            state.append(id(type(module)))
            for tensor in module._parameters.values():
                state.append(None if tensor is None else tensor.data_ptr())
            for tensor in module._buffers.values():
                state.append(None if tensor is None else tensor.data_ptr())
            rows = getattr(module, "lora_slot_rows", None)
            if rows is not None:
                state += [rows.passthrough, rows.count, rows.index.data_ptr(), rows.scale.data_ptr(),
                          module.lora_slot_down.data_ptr(), module.lora_slot_up.data_ptr()]
        return tuple(state)

    def _capture(self, input_ids, hidden: bool) -> tuple:
        device = input_ids.device
        static_ids = input_ids.clone()
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # first-call set-up (cuBLAS workspaces, lazy buffers) outside the capture
            self.eager(static_ids, output_hidden_states=hidden)
        torch.cuda.current_stream(device).wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            static_out = self.eager(static_ids, output_hidden_states=hidden)
        self.stats["captures"] += 1
        return graph, static_ids, static_out


def _copied(value):
    """A copy of a model output (tensors cloned, tuples and ModelOutputs rebuilt)."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, tuple):
        return tuple(_copied(v) for v in value)
    if isinstance(value, dict):  # transformers' ModelOutput: a dataclass over an OrderedDict
        return type(value)(**{k: _copied(v) for k, v in value.items()})
    return value
