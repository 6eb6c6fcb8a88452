"""The :class:`~rayimg.render.stepper.StepBatcher` adapters hook over
:class:`~rayimg.render.multi_lora.AdapterSlots`: each running sample's adapters pinned in GPU slots,
selected per UNet call, and (``fuse_alone``) handed to the engine's fused path when a sample runs
alone."""

from __future__ import annotations

from typing import Callable

from rayimg.render.request import GenerationRequest

__all__ = ["SlotAdapters"]


class SlotAdapters:
    """The :class:`StepBatcher` adapters hook over :class:`~rayimg.render.multi_lora.AdapterSlots`.

    ``weights_for(adapters)``: the ``(LoraWeights, scale)`` pairs of a request's adapter identity
    (``(name, version, scale)`` triples) when they were not given at submit. A request whose
    adapters touch the text encoders has its prompts encoded with its own adapters selected (and
    not cached: the prompt cache holds base-encoder texts only)."""

    def __init__(self, slots, weights_for: Callable[[tuple], list] | None = None):
        self.slots = slots
        self.weights_for = weights_for

    def signature(self) -> dict:
        """What of the slot layout changes the compiled graphs (part of compile-cache keys)."""
        c = self.slots.config
        return {"num_slots": c.num_slots, "max_rank": c.max_rank, "max_batch": c.max_batch, "max_adapters": c.max_adapters,
                "unet_targets": list(c.unet_targets), "text_targets": list(c.text_targets)}

    def acquire(self, request: GenerationRequest, pairs: list | None = None) -> tuple:
        """``(pinned slots, whether they touch the text encoders, (weights, scale) pairs, the
        request's adapter identity)``."""
        if pairs is None:
            if request.adapters and self.weights_for is None:
                raise ValueError(f"adapters: no weights given for {list(request.adapters)}")
            pairs = self.weights_for(request.adapters) if request.adapters else []
        text = any(modules for weights, _ in pairs for component, modules in weights.layers.items() if component != "unet")
        return self.slots.acquire(pairs), text, list(pairs), tuple(request.adapters)

    def fusable(self, handle: tuple) -> tuple | None:
        """``(pairs, identity)`` to fuse this sample's adapters into the weights in place of its
        slots (:meth:`StepBatcher._set_weights`); None when they touch the text encoders."""
        _, text, pairs, identity = handle
        if text or len(pairs) != len(identity):
            return None
        return pairs, identity

    def passthrough(self, on: bool) -> None:
        """The slotted modules compute their base output only (``on``) or add the slots' products."""
        self.slots.set_passthrough(on)

    def release(self, handle: tuple) -> None:
        self.slots.release(handle[0])

    def select(self, handles: list, guidance: bool, rows: int | None = None) -> None:
        """Set the next UNet call's adapters; ``rows``: that call's batch, checked here, outside a
        compiled UNet's graph (inside it, only eager calls check)."""
        self.slots.set_batch([h[0] for h in handles], guidance=guidance)
        if rows is not None:
            self.slots.check_rows("unet", rows)

    def encode(self, request: GenerationRequest, handle: tuple, encode: Callable[..., dict]) -> dict:
        self.slots.set_batch([handle[0]], guidance=False)  # the text encoders see this request's row
        return encode(cached=not handle[1])
