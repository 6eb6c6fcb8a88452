"""Mixed-adapter batches: every sample of a batch gets its own LoRA adapters (and scales), applied
as a batched low-rank product from a fixed table of adapter slots; the base weights never change.

:class:`AdapterSlots` installs once on a pipeline (UNet and text encoders). Each module that
adapters can target (attention and feed-forward ``nn.Linear``, ``nn.Conv2d``, the fused
``to_qkv`` / ``to_kv`` projections of ``pipe.fuse_qkv_projections()``, the float8 linears of
:mod:`rayimg.render.fp8`) computes::

    y[n] = base(x)[n] + sum_k scale[n, k] * B[index[n, k]] @ (A[index[n, k]] @ x[n])

from two tables held by the module (``lora_slot_down``, ``lora_slot_up``; views of one slot store
per device and dtype, see :class:`AdapterSlots`):

- ``lora_slot_down`` (A): ``(num_slots + 1, parts * max_rank, in)``, or
  ``(num_slots + 1, parts * max_rank, in, kh, kw)`` for a convolution (LoRA A is a kxk conv with
  the base conv's stride and padding, B a 1x1 conv, as diffusers/peft store them);
- ``lora_slot_up`` (B, stored transposed): ``(num_slots + 1, parts * max_rank, out)``, so that
  the gathered ``(K * parts * max_rank, out)`` block of a sample is contiguous for ``bmm``.

Slot 0 is "no adapter" and stays zero; ranks below ``max_rank`` are zero-padded, so padding adds
exact zeros. An adapter's ``alpha / rank`` (as :mod:`rayimg.render.adapters` reads it, per module)
is folded into its B rows when it is loaded. ``parts`` is 1 except for fused projections: a
``to_qkv`` holds the LoRAs of ``to_q``, ``to_k`` and ``to_v`` side by side along the rank, each
writing its own rows of the output (block-diagonal B).

``index`` / ``scale`` are per row of the module's input: ``(rows, K)``, ``K = max_adapters``. The
UNet under classifier-free guidance sees ``2 * batch`` rows (the uncond half, then the cond half,
as diffusers concatenates them); both halves of a sample use its adapters, as diffusers'
``set_adapters`` does. The text encoders see one row per prompt (prompts and negative prompts are
encoded in separate calls of ``batch`` rows each).

Everything a forward reads has a fixed shape and address: loading an adapter is one in-place copy
of a prepared image into its slot's row, eviction zeroes the row, setting a batch's adapters copies
into persistent index/scale buffers; the forward does gathers, ``bmm``/``baddbmm`` and (for convs) a
grouped convolution, with no Python branch on data, so a ``torch.compile``d UNet keeps its graph
(and its CUDA graphs) across all of these. Under CUDA graphs the slot stores and the index/scale
buffers are marked static addresses (``torch._dynamo.mark_static_address``).

Order: install after the pipeline is on its device and after :func:`rayimg.render.speedups.apply`
has fused QKV and converted float8 linears (a linear converted to float8 later is not seen, and
QKV fused or unfused later is refused at the next load or set_batch), and before the first
compiled call.

Sizes, computed from the shapes: real-size SDXL at ``max_rank`` 16 in bf16 takes 44 MiB per slot
for the attention projections alone (65 MiB with fused QKV: its B is block-diagonal) and 93 MiB
for the default targets (the registry's ``LORA_TARGETS``); one load copies one such row.

Typical use (a serving engine)::

    slots = AdapterSlots(pipe, SlotConfig(num_slots=16, max_rank=16, max_batch=8, max_adapters=2))
    a = slots.acquire([(lora_style, 0.8)])            # loads into a slot if needed, pins it
    b = slots.acquire([(lora_x, 1.0), (lora_y, 0.5)])
    slots.set_batch([a, b, slots.acquire([])], guidance=True)
    pipe(prompt=[...], negative_prompt=[...], generator=[...], ...)
    slots.release(a)                                   # when that request leaves the batch

or ``with slots.batch([[(lora_style, 0.8)], [], ...], guidance=True): pipe(...)``.
"""

from __future__ import annotations

from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import torch
from torch import nn

from rayimg.config.train import LORA_TARGETS
from rayimg.render.adapters import COMPONENTS, LoraError, LoraLayer, LoraWeights
from rayimg.render.slotted import Rows, is_slotted, slotted_class

__all__ = ["AdapterSlots", "PinnedAdapters", "SlotConfig", "SlotsExhausted", "TEXT_TARGETS", "targets_of"]

TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
_FUSED = {"to_qkv": ("to_q", "to_k", "to_v"), "to_kv": ("to_k", "to_v")}


class SlotsExhausted(RuntimeError):
    """Every slot holds an adapter pinned by a request in the running batch: release one first."""


@dataclass
class SlotConfig:
    """Sizes of the slot tables and which modules get them."""

    num_slots: int = 16
    """adapters held at once (table rows: num_slots + 1; row 0 is "no adapter")"""
    max_rank: int = 16
    """largest LoRA rank a slot takes (smaller ranks are zero-padded)"""
    max_batch: int = 8
    """most samples (images) in one call; the UNet takes twice as many rows under guidance"""
    max_adapters: int = 2
    """most adapters one sample combines (K)"""
    unet_targets: tuple[str, ...] = LORA_TARGETS
    """UNet modules given slots, as peft target names (a module's path or its last dotted parts)"""
    text_targets: tuple[str, ...] = TEXT_TARGETS
    """text-encoder modules given slots (empty: none)"""
    images: int = 16
    """slot-row images of adapters kept in host memory (pinned on CUDA), each ``AdapterSlots.row_nbytes``"""

    def __post_init__(self) -> None:
        for name in ("num_slots", "max_rank", "max_batch", "max_adapters", "images"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"SlotConfig.{name}: must be a positive integer, got {value!r}")
        self.unet_targets, self.text_targets = tuple(self.unet_targets), tuple(self.text_targets)


def targets_of(adapters: Iterable[LoraWeights]) -> dict[str, tuple[str, ...]]:
    """The exact module paths ``adapters`` adapt, per component: ``SlotConfig(unet_targets=
    t["unet"], text_targets=t.get("text_encoder", ()) + t.get("text_encoder_2", ()))`` gives
    slots to those modules only."""
    out: dict[str, set[str]] = {}
    for weights in adapters:
        for component, path, _ in weights.items():
            out.setdefault(component, set()).add(path)
    return {component: tuple(sorted(paths)) for component, paths in out.items()}


# --------------------------------------------------------------------------- install
@dataclass
class _Wrapped:
    """One module given slot tables; ``parts``: the adapter module paths it serves, each writing
    the output rows ``rows`` from its own ``max_rank`` band of the rank axis. Its tables are views
    of the slot store ``store`` (a ``(device, dtype)``) at element ``offset`` of each slot's row."""

    component: str
    name: str
    module: nn.Module
    base_class: type
    parts: list[tuple[str, slice]]
    down_shape: tuple[int, ...]
    up_shape: tuple[int, ...]
    store: tuple[torch.device, torch.dtype] = None
    offset: int = 0

    @property
    def numel(self) -> int:
        return torch.Size(self.down_shape).numel() + torch.Size(self.up_shape).numel()

    def split(self, row: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This module's ``(down, up)`` in ``row`` (the last axis of a slot store or of an image)."""
        n = torch.Size(self.down_shape).numel()
        part = row[..., self.offset:self.offset + self.numel]
        lead = row.shape[:-1]
        return part[..., :n].view(*lead, *self.down_shape), part[..., n:].view(*lead, *self.up_shape)


def _matches(name: str, targets: Sequence[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def _uses_fused(attn: nn.Module) -> bool:
    """Whether an attention module computes through its fused projections (``unfuse_qkv_projections``
    puts the unfused processors back but leaves ``fused_projections`` set)."""
    return bool(getattr(attn, "fused_projections", False)) and "Fused" in type(getattr(attn, "processor", None)).__name__


def _model(component: nn.Module) -> nn.Module:
    return getattr(component, "_orig_mod", component)  # a torch.compile wrapper


@dataclass(eq=False)
class PinnedAdapters:
    """The slots and scales of one sample's adapters, pinned (not evictable) until released."""

    slots: tuple[int, ...]
    scales: tuple[float, ...]
    fingerprints: tuple[str, ...]
    released: bool = field(default=False)


class AdapterSlots:
    """Adapter slot tables on a pipeline's UNet and text encoders, with an LRU of the adapters in
    them. See the module docstring for the math, the install order and an example.

    Storage: all tables of one device and dtype are views of one slot store ``(num_slots + 1,
    row)``: a slot's tables in every module are one contiguous row. An adapter is turned once into
    an *image* of that row in host memory (padded, ``alpha / rank`` folded in; pinned when the
    tables are on CUDA) and loading it is one non-blocking copy of the image into the row, with
    nothing of an earlier occupant left behind; eviction zeroes the row. Images are cached (LRU,
    ``SlotConfig.images`` of them); :meth:`prepare` builds one ahead of need (e.g. while the GPU
    works). Copies are ordered on the current stream, after the kernels of earlier batches that
    read the slot.

    Adapters are keyed by ``LoraWeights.fingerprint``. :meth:`acquire` loads missing adapters
    (into a free slot, else the least recently used unpinned one) and pins them; :meth:`release`
    unpins; :meth:`set_batch` writes the rows the next pipeline call reads.

    The tables are plain tensor attributes of the modules, not buffers: moving the pipeline to
    another device after install makes every call fail (device mismatch) rather than leave the
    tables behind silently."""

    def __init__(self, pipe, config: SlotConfig | None = None, *, check_finite: bool = True):
        self.config = config = config or SlotConfig()
        self.check_finite = check_finite
        self.components: dict[str, nn.Module] = {c: getattr(pipe, c) for c in COMPONENTS if getattr(pipe, c, None) is not None}
        self._wrapped: list[_Wrapped] = []
        self._paths: dict[tuple[str, str], tuple[int, int]] = {}  # (component, adapter path) -> (wrapped, part)
        self._fused_layout: list[tuple[nn.Module, bool]] = []  # attention modules and whether fused at install
        self.rows: dict[str, Rows] = {}
        self.stores: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        for component, module in self.components.items():
            targets = config.unet_targets if component == "unet" else config.text_targets
            if targets:
                self._install(component, _model(module), targets)
        if not self._wrapped:
            raise LoraError("adapter slots: no module of the pipeline matches SlotConfig.unet_targets/text_targets")
        self._allocate()
        slots = config.num_slots + 1
        self._lru: OrderedDict[str, int] = OrderedDict()  # fingerprint -> slot, least recently used first
        self._occupant: list[str | None] = [None] * slots
        self._pins = [0] * slots
        self._images: OrderedDict[str, dict] = OrderedDict()  # fingerprint -> {store key: image}
        self._batch: list[PinnedAdapters] = []
        self.stats = {"loads": 0, "hits": 0, "evictions": 0, "images": 0}

    # ------------------------------------------------------------------ install
    def _install(self, component: str, model: nn.Module, targets: Sequence[str]) -> None:
        cfg = self.config
        modules = dict(model.named_modules())
        fused_heads = {}
        for name, module in modules.items():
            if hasattr(module, "fused_projections") and hasattr(module, "to_q"):
                self._fused_layout.append((module, _uses_fused(module)))
                if _uses_fused(module):
                    fused_heads[name] = module
        groups: list[tuple[str, nn.Module, list[tuple[str, slice]]]] = []
        superseded = set()
        for head, attn in fused_heads.items():
            prefix = head + "." if head else ""
            for fused_name, parts in _FUSED.items():
                fused = getattr(attn, fused_name, None)
                if fused is None or (fused_name == "to_qkv" and getattr(attn, "is_cross_attention", False)):
                    continue
                start, served = 0, []
                for part in parts:
                    rows = getattr(attn, part).weight.shape[0]
                    superseded.add(prefix + part)
                    if _matches(prefix + part, targets):
                        served.append((prefix + part, slice(start, start + rows)))
                    start += rows
                if served:
                    groups.append((prefix + fused_name, fused, served))
        for name, module in modules.items():
            if name in superseded or name.endswith(tuple("." + f for f in _FUSED)) or not _matches(name, targets):
                continue
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                groups.append((name, module, [(name, slice(0, self._out_features(module)))]))
        for name, module, parts in groups:
            if is_slotted(module):
                raise LoraError(f"adapter slots: {component}.{name} already has slots (install once per pipeline)")
            width = len(parts) * cfg.max_rank
            if isinstance(module, nn.Conv2d):
                if module.groups != 1 or module.padding_mode != "zeros":
                    raise LoraError(f"adapter slots: {component}.{name}: grouped or non-zero-padded convolutions are not supported")
                down_shape = (width, module.in_channels, *module.kernel_size)
            else:
                down_shape = (width, module.in_features)
            index = len(self._wrapped)
            self._wrapped.append(_Wrapped(component, name, module, type(module), parts, down_shape, (width, self._out_features(module))))
            for p, (path, _) in enumerate(parts):
                for alias in self._aliases(component, path):
                    self._paths[(component, alias)] = (index, p)

    def _allocate(self) -> None:
        """One slot store per (device, dtype); every module's tables are views into it."""
        sizes: dict[tuple[torch.device, torch.dtype], int] = {}
        for wrapped in self._wrapped:
            weight = wrapped.module.weight
            wrapped.store = (weight.device, weight.dtype)
            wrapped.offset = sizes.get(wrapped.store, 0)
            sizes[wrapped.store] = wrapped.offset + wrapped.numel
        for (device, dtype), size in sizes.items():
            self.stores[(device, dtype)] = torch.zeros(self.config.num_slots + 1, size, dtype=dtype, device=device)
        for component, module in self.components.items():
            if any(w.component == component for w in self._wrapped):
                rows = 2 * self.config.max_batch if component == "unet" else self.config.max_batch
                self.rows[component] = Rows(component, rows, self.config.max_adapters, next(module.parameters()).device)
        from rayimg.render import aot

        for module in self.components.values():
            aot.uninstall(module)  # slotted modules change the graph its stored guards cannot see
        for wrapped in self._wrapped:
            module = wrapped.module
            down, up = wrapped.split(self.stores[wrapped.store])
            if down.is_cuda:
                # constant addresses: CUDA graphs read them in place instead of copying them each replay
                torch._dynamo.mark_static_address(down)
                torch._dynamo.mark_static_address(up)
            module.lora_slot_down, module.lora_slot_up = down, up
            module.lora_slot_rows = self.rows[wrapped.component]
            module.__class__ = slotted_class(type(module))

    @staticmethod
    def _out_features(module: nn.Module) -> int:
        return module.out_channels if isinstance(module, nn.Conv2d) else module.out_features

    @staticmethod
    def _aliases(component: str, path: str) -> list[str]:
        # adapter files name CLIP modules without ``text_model.`` (see adapters._module_and_kind)
        if component.startswith("text_encoder") and path.startswith("text_model."):
            return [path, path[len("text_model."):]]
        return [path]

    def uninstall(self) -> None:
        """Give every wrapped module its own class back and drop the tables (the base weights were
        never touched)."""
        for wrapped in self._wrapped:
            module = wrapped.module
            module.__class__ = wrapped.base_class
            del module.lora_slot_down, module.lora_slot_up, module.lora_slot_rows
        self._wrapped, self._paths, self._lru, self._images, self.stores = [], {}, OrderedDict(), OrderedDict(), {}

    @property
    def num_modules(self) -> int:
        return len(self._wrapped)

    @property
    def nbytes(self) -> int:
        """Memory of the slot tables (on the pipeline's device)."""
        return sum(t.numel() * t.element_size() for t in self.stores.values())

    @property
    def row_nbytes(self) -> int:
        """Bytes of one slot (all its tables): what one load copies, and the size of one image."""
        return sum(t[0].numel() * t.element_size() for t in self.stores.values())

    def loaded(self) -> dict[str, int]:
        """fingerprint -> slot of every adapter in the tables, least recently used first."""
        return dict(self._lru)

    # ------------------------------------------------------------------ slots
    def holds(self, weights: LoraWeights) -> bool:
        """Whether every module ``weights`` adapts has slots, at a rank they take (else
        :meth:`acquire` refuses it)."""
        return all((component, path) in self._paths and layer.rank <= self.config.max_rank for component, path, layer in weights.items())

    def acquire(self, adapters: Sequence[tuple[LoraWeights, float]]) -> PinnedAdapters:
        """Load ``adapters`` (``(weights, scale)`` pairs of one sample) into slots where they are
        not already, pin them, and return what :meth:`set_batch` takes. Raises
        :class:`SlotsExhausted` when a slot is needed and all are pinned (nothing stays pinned),
        :class:`LoraError` for an adapter that does not fit (module, shape, rank)."""
        adapters = [(weights, float(scale)) for weights, scale in adapters]
        if len(adapters) > self.config.max_adapters:
            raise LoraError(f"adapter slots: {len(adapters)} adapters for one sample; SlotConfig.max_adapters is {self.config.max_adapters}")
        slots: list[int] = []
        try:
            for weights, _ in adapters:
                slot = self.load(weights)
                self._pins[slot] += 1
                slots.append(slot)
        except BaseException:
            for slot in slots:
                self._pins[slot] -= 1
            raise
        return PinnedAdapters(tuple(slots), tuple(s for _, s in adapters), tuple(w.fingerprint for w, _ in adapters))

    def release(self, pinned: PinnedAdapters) -> None:
        """Unpin a sample's adapters (they stay loaded until their slots are needed). A batch set
        with them cannot run any more: set the next batch first."""
        if pinned.released:
            raise LoraError("adapter slots: these adapters were released already")
        pinned.released = True
        for slot in pinned.slots:
            self._pins[slot] -= 1
        if any(p is pinned for p in self._batch):
            self._unset_rows()

    def load(self, weights: LoraWeights) -> int:
        """The slot holding ``weights``: found (and made most recently used), or loaded into a free
        slot, or into the least recently used unpinned one."""
        key = weights.fingerprint
        slot = self._lru.get(key)
        if slot is not None:
            self._lru.move_to_end(key)
            self.stats["hits"] += 1
            return slot
        self._check_layout()
        image = self.prepare(weights)  # every check before any slot changes
        slot = self._free_slot()
        if slot is None:
            raise SlotsExhausted(f"adapter slots: all {self.config.num_slots} slots hold adapters pinned by the running batch; "
                                 f"cannot load {weights.name or key[:12]!r}")
        with torch.no_grad():
            for store_key, store in self.stores.items():
                store[slot].copy_(image[store_key], non_blocking=True)
        self._lru[key] = slot
        self._occupant[slot] = key
        self.stats["loads"] += 1
        return slot

    def evict(self, weights_or_fingerprint: LoraWeights | str) -> bool:
        """Empty the slot of an adapter (zeroed); False when it is not loaded. A pinned adapter is refused."""
        key = getattr(weights_or_fingerprint, "fingerprint", weights_or_fingerprint)
        slot = self._lru.get(key)
        if slot is None:
            return False
        if self._pins[slot]:
            raise LoraError(f"adapter slots: adapter {key[:12]!r} is pinned by {self._pins[slot]} sample(s); release them first")
        self._clear(slot)
        return True

    def _free_slot(self) -> int | None:
        for slot in range(1, self.config.num_slots + 1):
            if self._occupant[slot] is None:
                return slot
        for key, slot in self._lru.items():  # least recently used first
            if not self._pins[slot]:
                del self._lru[key]
                self._occupant[slot] = None
                self.stats["evictions"] += 1
                return slot  # the load overwrites the whole row
        return None

    def _clear(self, slot: int) -> None:
        with torch.no_grad():
            for store in self.stores.values():
                store[slot].zero_()
        key = self._occupant[slot]
        if key is not None:
            del self._lru[key]
        self._occupant[slot] = None

    def _check_layout(self) -> None:
        for attn, fused in self._fused_layout:
            if _uses_fused(attn) != fused:
                raise LoraError("adapter slots: QKV projections were fused or unfused after the slots were installed; "
                                "install AdapterSlots after pipe.fuse_qkv_projections() (speedups.apply)")

    # ------------------------------------------------------------------ images
    def prepare(self, weights: LoraWeights) -> dict[tuple[torch.device, torch.dtype], torch.Tensor]:
        """The slot-row image of ``weights`` per slot store (built once, then cached): raises
        :class:`LoraError` when the adapter does not fit these slots."""
        key = weights.fingerprint
        image = self._images.get(key)
        if image is not None:
            self._images.move_to_end(key)
            return image
        plan = self._plan(weights)
        if weights.device.type != "cpu":
            plan = [(i, p, LoraLayer(layer.down.cpu(), layer.up.cpu(), layer.alpha)) for i, p, layer in plan]
        pin = any(d.type == "cuda" for d, _ in self.stores)
        image = {(d, dtype): torch.zeros(store.shape[1], dtype=dtype, pin_memory=pin) for (d, dtype), store in self.stores.items()}
        r = self.config.max_rank
        with torch.no_grad():
            for i, p, layer in plan:
                wrapped = self._wrapped[i]
                down, up = wrapped.split(image[wrapped.store])
                rows = wrapped.parts[p][1]
                band = slice(p * r, p * r + layer.rank)
                down[band].copy_(layer.down.reshape(down[band].shape))
                # alpha / rank (per module) folded into B, in float32, rounded once
                up[band, rows].copy_(layer.up.reshape(rows.stop - rows.start, layer.rank).t().float() * layer.scale)
        self._images[key] = image
        self.stats["images"] += 1
        while len(self._images) > self.config.images:
            self._images.popitem(last=False)
        return image

    def _plan(self, weights: LoraWeights) -> list[tuple[int, int, LoraLayer]]:
        name = weights.name or weights.fingerprint[:12]
        plan = []
        for component, path, layer in weights.items():
            found = self._paths.get((component, path))
            if found is None:
                if component not in self.components:
                    raise LoraError(f"adapter {name!r} targets {component}.{path} but the pipeline has no {component}")
                raise LoraError(f"adapter {name!r}: module {component}.{path} has no adapter slots "
                                f"(not in SlotConfig.{'unet' if component == 'unet' else 'text'}_targets, or not a Linear/Conv2d)")
            i, p = found
            wrapped = self._wrapped[i]
            if layer.rank > self.config.max_rank:
                raise LoraError(f"adapter {name!r}: module {component}.{path} has rank {layer.rank}; SlotConfig.max_rank is {self.config.max_rank}")
            in_shape, rows = wrapped.down_shape[1:], wrapped.parts[p][1]
            out_rows = rows.stop - rows.start
            if layer.down[0].numel() != torch.Size(in_shape).numel() or tuple(layer.up.shape[:2]) != (out_rows, layer.rank):
                raise LoraError(f"adapter {name!r}: module {component}.{path} takes input {in_shape} and output {out_rows} "
                                f"but the LoRA is up {tuple(layer.up.shape)} @ down {tuple(layer.down.shape)}")
            plan.append((i, p, layer))
        if self.check_finite:
            tensors = list(weights.flat.values()) if weights.flat else [t for *_, l in plan for t in (l.down, l.up)]
            if not all(bool(torch.isfinite(t).all()) for t in tensors):
                raise LoraError(f"adapter {name!r}: its weights hold NaN or infinite values")
        return plan
    # ------------------------------------------------------------------ batches
    def set_batch(self, samples: Sequence[PinnedAdapters], *, guidance: bool = True) -> None:
        """Set the adapters of the next pipeline call, one entry per sample (image), in the order of
        its prompts: the text encoders get one row per sample, the UNet one per sample, twice when
        ``guidance`` (classifier-free guidance doubles its batch: uncond half, then cond half).
        One prompt per image (no ``num_images_per_prompt``): a call whose row count differs from
        the rows set fails loudly. An in-place copy into persistent buffers: a compiled UNet keeps
        its graph."""
        n = len(samples)
        if n > self.config.max_batch:
            raise LoraError(f"adapter slots: {n} samples; SlotConfig.max_batch is {self.config.max_batch}")
        self._check_layout()
        k = self.config.max_adapters
        index = torch.zeros(n, k, dtype=torch.long)
        scale = torch.zeros(n, k, dtype=torch.float32)
        for row, pinned in enumerate(samples):
            if pinned.released:
                raise LoraError(f"adapter slots: sample {row}'s adapters were released; acquire them again")
            for j, (slot, factor, key) in enumerate(zip(pinned.slots, pinned.scales, pinned.fingerprints)):
                if self._occupant[slot] != key:  # pinned slots are never reused; this guards misuse
                    raise LoraError(f"adapter slots: sample {row}: slot {slot} no longer holds adapter {key[:12]!r}")
                index[row, j], scale[row, j] = slot, factor
        for component, rows in self.rows.items():
            doubled = component == "unet" and guidance
            self._copy_rows(rows, torch.cat([index, index]) if doubled else index, torch.cat([scale, scale]) if doubled else scale)
        self._batch = list(samples)

    def check_rows(self, component: str, rows: int) -> None:
        """Raise :class:`LoraError` unless ``component``'s next call, of ``rows`` rows, matches the
        batch set. A compiled component cannot check inside its graph without pinning the batch
        size: its caller checks here, before each call."""
        if component in self.rows:
            self.rows[component].verify("call", rows)

    @staticmethod
    def _copy_rows(rows: Rows, index: torch.Tensor, scale: torch.Tensor) -> None:
        full_index = torch.zeros(rows.index.shape, dtype=torch.long, pin_memory=rows.index.is_cuda)
        full_scale = torch.zeros(rows.scale.shape, dtype=torch.float32, pin_memory=rows.scale.is_cuda)
        full_index[: len(index)] = index
        full_scale[: len(scale)] = scale
        rows.index.copy_(full_index, non_blocking=True)
        rows.scale.copy_(full_scale, non_blocking=True)
        rows.count = len(index)

    def set_passthrough(self, on: bool = True) -> None:
        """With ``on``, every slotted module computes its base output only, at the base model's
        cost: for a batch whose samples all share one adapter set, served faster by fusing it into
        the weights (:class:`~rayimg.render.adapters.FusedAdapters`), or for the base model alone.
        A compiled UNet holds one graph per shape for each setting (a guard on this flag), so
        switching per batch recompiles nothing after the first call of each."""
        for rows in self.rows.values():
            rows.passthrough = bool(on)

    def _unset_rows(self) -> None:
        for rows in self.rows.values():
            rows.count = -1
        self._batch = []

    @contextmanager
    def batch(self, adapters: Sequence[Sequence[tuple[LoraWeights, float]]], *, guidance: bool = True) -> Iterator[list[PinnedAdapters]]:
        """``acquire`` each sample's adapters, ``set_batch``, run the block, release them."""
        if len(adapters) > self.config.max_batch:
            raise LoraError(f"adapter slots: {len(adapters)} samples; SlotConfig.max_batch is {self.config.max_batch}")
        pinned: list[PinnedAdapters] = []
        try:
            for sample in adapters:
                pinned.append(self.acquire(sample))
            self.set_batch(pinned, guidance=guidance)
            yield pinned
        finally:
            for p in pinned:
                self.release(p)
