"""LoRA adapters at render time: read safetensors files into CPU tensors, and fuse several
adapters with per-adapter scales into a pipeline's weights in place — no peft layers.

Why in place: an unfused LoRA adds two small matmuls to every targeted layer at every step,
and peft's adapter loading is slow per swap. Writing
``W = W0 + sum_i scale_i * (alpha_i / r_i) * B_i @ A_i`` into the targeted weights costs one
pass over those weights per swap and nothing per step. Because the parameters keep their
identity, shape, dtype and storage, a ``torch.compile``d UNet keeps its compiled graph across
swaps (the weights are graph inputs, not constants).

Exactness: the originals ``W0`` of every module ever touched are kept (on the weights' device)
and every swap starts from them by copy, so swapping back and forth never drifts and
:meth:`FusedAdapters.restore` gives the base weights back bit for bit.

Files: only safetensors is read (never pickle). Accepted layouts, all normalised to
``component -> module path -> LoraLayer``:

- diffusers / PEFT: ``unet.<module>.lora_A.weight`` / ``lora_B.weight`` (also
  ``text_encoder.`` and ``text_encoder_2.``), alpha from diffusers' ``lora_adapter_metadata``
  (``<component>.lora_alpha`` / ``alpha_pattern`` / ``use_rslora``) or ``<module>.alpha``
  tensors, else alpha = rank (diffusers' convention: scale 1);
- older diffusers layouts: ``.lora.down/up.weight``, ``.lora_linear_layer.down/up.weight``,
  attention-processor keys ``.processor.to_q_lora.down.weight``, text-encoder
  ``self_attn.to_q_lora.down.weight``;
- kohya / A1111: ``lora_unet_*``, ``lora_te_*`` / ``lora_te1_*`` / ``lora_te2_*`` with
  ``lora_down`` / ``lora_up`` / ``alpha``, converted to diffusers names by diffusers' own
  ``lora_state_dict`` (pass ``unet_config`` to map SGM block names such as ``input_blocks``).

Linear LoRA (A: (r, in), B: (out, r)) and conv LoRA (A: (r, in, kh, kw), B: (out, r, 1, 1))
are both supported. DoRA and LoRA biases are refused with a clear error.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch

__all__ = [
    "LoraError", "LoraLayer", "LoraWeights", "load_lora_file", "load_lora_bytes", "lora_from_state_dict",
    "FusedAdapters", "LORA_WEIGHT_NAME", "COMPONENTS",
]

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
_KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
_METADATA_KEY = "lora_adapter_metadata"

# Module-path suffixes of the older diffusers layouts -> the module's real attribute path.
_PROCESSOR_TARGETS = {"to_q_lora": "to_q", "to_k_lora": "to_k", "to_v_lora": "to_v", "to_out_lora": "to_out.0"}
_TEXT_ATTN_TARGETS = {"to_q_lora": "q_proj", "to_k_lora": "k_proj", "to_v_lora": "v_proj", "to_out_lora": "out_proj"}


class LoraError(ValueError):
    """A LoRA file could not be read or applied; the message names the adapter and module."""


@dataclass(frozen=True)
class LoraLayer:
    """One targeted module: ``delta W = (alpha / rank) * up @ down``.

    ``down`` is A, (rank, in) or (rank, in, kh, kw) for a conv; ``up`` is B, (out, rank) or
    (out, rank, 1, 1).
    """

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight delta at scale 1 as ``(out, in * kh * kw)`` (for tests and inspection)."""
        return self.scale * (self.up.flatten(1).to(dtype) @ self.down.flatten(1).to(dtype))


@dataclass
class LoraWeights:
    """A loaded LoRA adapter: ``layers[component][module_path] -> LoraLayer``.

    ``component`` is ``unet``, ``text_encoder`` or ``text_encoder_2``; module paths are dotted
    paths inside that component (``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``;
    CLIP paths without the ``text_model.`` prefix older files carry).
    ``fingerprint`` is the sha256 of the file's bytes (the registry's ``weights`` sha256).
    """

    layers: dict[str, dict[str, LoraLayer]]
    fingerprint: str
    name: str = ""
    # dtype -> one flat buffer the tensors are views of (set by packed()/to()): moved in one copy
    flat: dict[torch.dtype, torch.Tensor] | None = field(default=None, repr=False, compare=False)

    def items(self) -> Iterator[tuple[str, str, LoraLayer]]:
        for component, modules in self.layers.items():
            for path, layer in modules.items():
                yield component, path, layer

    @property
    def num_layers(self) -> int:
        return sum(len(m) for m in self.layers.values())

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for _, _, layer in self.items() for t in (layer.down, layer.up))

    @property
    def device(self) -> torch.device:
        return next(layer.down.device for _, _, layer in self.items())

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "LoraWeights":
        """A copy with the tensors on ``device`` (e.g. a GPU-resident cache tier), or ``self``
        when they are there already. The tensors travel packed in one buffer per dtype (one
        transfer instead of two per module); the copy's tensors are views into it."""
        device = torch.device(device)
        entries = list(self.items())
        if all(layer.down.device == device and layer.up.device == device for _, _, layer in entries):
            return self
        if self.flat is None:
            return self._packed_copy(lambda flat: flat.to(device, non_blocking=non_blocking))
        # already packed (e.g. pinned in the CPU tier): one copy per buffer, no concatenation
        pinned = all(f.is_pinned() for f in self.flat.values()) if device.type == "cuda" else False
        return self._packed_copy(lambda flat: flat.to(device, non_blocking=non_blocking or pinned))

    def packed(self, pin: bool = False) -> "LoraWeights":
        """A copy whose tensors are views of one flat buffer per dtype, in pinned (page-locked)
        memory with ``pin``: a CPU cache tier of these moves to a GPU in one fast copy."""
        return self._packed_copy(lambda flat: flat.pin_memory() if pin else flat)

    def _packed_copy(self, place) -> "LoraWeights":
        entries = list(self.items())
        tensors = [t for _, _, layer in entries for t in (layer.down, layer.up)]
        moved: list[torch.Tensor | None] = [None] * len(tensors)
        flats: dict[torch.dtype, torch.Tensor] = {}
        for dtype in sorted({t.dtype for t in tensors}, key=str):
            index = [i for i, t in enumerate(tensors) if t.dtype == dtype]
            if self.flat is not None and dtype in self.flat:
                source = self.flat[dtype]
            else:
                source = torch.cat([tensors[i].reshape(-1) for i in index])
            flats[dtype] = flat = place(source)
            for i, part in zip(index, flat.split([tensors[i].numel() for i in index])):
                moved[i] = part.view(tensors[i].shape)
        layers: dict[str, dict[str, LoraLayer]] = {}
        for n, (component, path, layer) in enumerate(entries):
            layers.setdefault(component, {})[path] = LoraLayer(moved[2 * n], moved[2 * n + 1], layer.alpha)
        return LoraWeights(layers=layers, fingerprint=self.fingerprint, name=self.name, flat=flats)


# --------------------------------------------------------------------------- reading files
def load_lora_file(path: str | Path, *, name: str = "", unet_config: Mapping | None = None, sha256: str | None = None) -> LoraWeights:
    """Read a LoRA safetensors file (or a dir holding ``pytorch_lora_weights.safetensors``).

    Never unpickles: anything but a ``.safetensors`` file is refused. ``unet_config`` (the
    UNet's config) lets kohya files with SGM block names (``input_blocks``) be mapped.
    ``sha256``: the file's digest when the caller has just verified it (the adapter store does),
    used as the fingerprint instead of hashing the bytes a second time.
    """
    path = Path(path)
    if path.is_dir():
        path = path / LORA_WEIGHT_NAME
    if path.suffix != ".safetensors":
        raise LoraError(f"{path}: only .safetensors LoRA files are loaded (pickle formats are refused)")
    if not path.is_file():
        raise LoraError(f"{path}: no such LoRA file")
    return load_lora_bytes(path.read_bytes(), name=name or str(path), unet_config=unet_config, sha256=sha256)


def load_lora_bytes(data: bytes, *, name: str = "", unet_config: Mapping | None = None, sha256: str | None = None) -> LoraWeights:
    """Parse the bytes of a LoRA safetensors file (see :func:`load_lora_file`)."""
    from safetensors.torch import load as load_safetensors

    try:
        tensors = load_safetensors(data)
        metadata = _safetensors_metadata(data)
    except Exception as e:  # safetensors raises its own error types
        raise LoraError(f"adapter {name!r}: not a valid safetensors file: {e}") from e
    return lora_from_state_dict(tensors, metadata, name=name, fingerprint=sha256 or hashlib.sha256(data).hexdigest(),
                                unet_config=unet_config)


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + header_len])
    return dict(header.get("__metadata__") or {})


def lora_from_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    *,
    name: str = "",
    fingerprint: str = "",
    unet_config: Mapping | None = None,
) -> LoraWeights:
    """Normalise a LoRA state dict of any accepted layout (see the module docstring)."""
    state_dict = dict(state_dict)
    if not state_dict:
        raise LoraError(f"adapter {name!r}: the file holds no tensors")
    for key in state_dict:
        if "dora_scale" in key or "lora_magnitude_vector" in key:
            raise LoraError(f"adapter {name!r}: DoRA weights ({key}) are not supported")
    network_alphas: dict[str, float] = {}
    if all(k.startswith(_KOHYA_PREFIXES) for k in state_dict):
        from diffusers import StableDiffusionPipeline

        try:
            converted, alphas = StableDiffusionPipeline.lora_state_dict(state_dict, unet_config=unet_config)
        except (ValueError, KeyError) as e:
            raise LoraError(f"adapter {name!r}: cannot convert the kohya-format keys: {e!r}") from e
        state_dict, network_alphas = dict(converted), dict(alphas or {})

    downs: dict[tuple[str, str], torch.Tensor] = {}
    ups: dict[tuple[str, str], torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.endswith(".alpha"):
            network_alphas[key] = float(value.item())
            continue
        component, rest = _split_component(key)
        module, kind = _module_and_kind(component, rest, name, key)
        (downs if kind == "down" else ups)[(component, module)] = value
    alphas = {}
    for key, value in network_alphas.items():
        component, rest = _split_component(key[: -len(".alpha")])
        module, _ = _module_and_kind(component, rest, name, key, allow_bare=True)
        alphas[(component, module)] = float(value)

    config = _adapter_metadata(metadata, name)
    layers: dict[str, dict[str, LoraLayer]] = {}
    for target in sorted(set(downs) | set(ups)):
        component, module = target
        if target not in downs or target not in ups:
            missing = "down (lora_A)" if target not in downs else "up (lora_B)"
            raise LoraError(f"adapter {name!r}: module {component}.{module} has no {missing} weight")
        down, up = downs[target], ups[target]
        rank = down.shape[0]
        if up.ndim < 2 or up.shape[1] != rank or any(s != 1 for s in up.shape[2:]):
            raise LoraError(f"adapter {name!r}: module {component}.{module}: up {tuple(up.shape)} does not match down {tuple(down.shape)} (rank {rank})")
        alpha = _alpha(config.get(component, {}), module, rank, alphas.get(target))
        layers.setdefault(component, {})[module] = LoraLayer(down=down, up=up, alpha=alpha)
    return LoraWeights(layers=layers, fingerprint=fingerprint or _tensor_fingerprint(state_dict), name=name)


def _split_component(key: str) -> tuple[str, str]:
    for component in ("text_encoder_2", "text_encoder", "unet"):
        if key.startswith(component + "."):
            return component, key[len(component) + 1:]
    # The oldest diffusers files (attention processors) carry no prefix and are UNet-only.
    return "unet", key


def _module_and_kind(component: str, rest: str, name: str, key: str, allow_bare: bool = False) -> tuple[str, str | None]:
    """``(module path, 'down' | 'up')`` of one key (without component prefix)."""
    for suffix, kind in ((".lora_A.weight", "down"), (".lora_B.weight", "up"), (".lora.down.weight", "down"),
                         (".lora.up.weight", "up"), (".lora_linear_layer.down.weight", "down"),
                         (".lora_linear_layer.up.weight", "up"), (".down.weight", "down"), (".up.weight", "up")):
        if rest.endswith(suffix):
            module = rest[: -len(suffix)]
            break
    else:
        if rest.endswith((".lora_B.bias", ".lora.up.bias")):
            raise LoraError(f"adapter {name!r}: LoRA biases ({key}) are not supported")
        if not allow_bare:
            raise LoraError(f"adapter {name!r}: unrecognised LoRA key {key!r}")
        module, kind = rest, None
    if component.startswith("text_encoder") and module.startswith("text_model."):
        # One spelling for CLIP paths: transformers 5 flattened CLIPTextModel (no
        # ``text_model``); FusedAdapters adds the prefix back for models that still have it.
        module = module[len("text_model."):]
    head, _, leaf = module.rpartition(".")
    if leaf in _PROCESSOR_TARGETS:
        if head.endswith(".processor"):  # attention-processor layout (UNet)
            module = f"{head[: -len('.processor')]}.{_PROCESSOR_TARGETS[leaf]}"
        elif component.startswith("text_encoder"):
            module = f"{head}.{_TEXT_ATTN_TARGETS[leaf]}"
        else:
            module = f"{head}.{_PROCESSOR_TARGETS[leaf]}"
    return module, kind


def _adapter_metadata(metadata: Mapping[str, str] | None, name: str) -> dict[str, dict[str, Any]]:
    """diffusers' ``lora_adapter_metadata`` (a peft LoraConfig per component) as
    ``component -> {field: value}``."""
    raw = (metadata or {}).get(_METADATA_KEY)
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except json.JSONDecodeError as e:
        raise LoraError(f"adapter {name!r}: metadata {_METADATA_KEY!r} is not JSON: {e}") from e
    out: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        component, _, fieldname = key.partition(".")
        out.setdefault(component, {})[fieldname] = value
    return out


def _alpha(config: Mapping[str, Any], module: str, rank: int, file_alpha: float | None) -> float:
    """The module's alpha such that its scale is alpha / rank (peft's rules when a config is stored)."""
    if config:
        alpha = float(config.get("lora_alpha", rank))
        for pattern, value in (config.get("alpha_pattern") or {}).items():
            if re.match(rf"(.*\.)?({pattern})$", module):
                alpha = float(value)
                break
        if config.get("use_rslora"):
            # peft scales rsLoRA by alpha / sqrt(r); expressed as alpha' / r.
            return alpha * rank / rank ** 0.5
        return alpha
    return float(file_alpha) if file_alpha is not None else float(rank)


def _tensor_fingerprint(state_dict: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key].detach().to("cpu").contiguous()
        h.update(key.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# --------------------------------------------------------------------------- fusing into a pipeline
@dataclass
class _Target:
    """Where one LoRA module writes: a weight parameter, or a row range of a fused QKV weight."""

    param: torch.nn.Parameter
    rows: slice | None
    shape: torch.Size = field(init=False)

    def __post_init__(self) -> None:
        self.shape = self.view().shape

    def view(self) -> torch.Tensor:
        data = self.param.data
        return data if self.rows is None else data[self.rows]


class FusedAdapters:
    """Fuses LoRA adapters into a pipeline's UNet and text encoders in place.

    ``apply([(lora, scale), ...])`` makes every targeted weight ``W0 + sum_i scale_i *
    (alpha_i / r_i) * B_i @ A_i``: the delta is computed in float32 on the weights' device,
    added to ``W0`` in float32 and cast once to the weights' dtype. The originals ``W0`` of all
    modules ever touched are kept on ``originals_device`` (default: the weights' device), so
    each apply starts from the base by copy and :meth:`restore` is bit-exact.

    Parameters are updated with ``copy_`` into their existing storage: their identity, shape,
    dtype and ``data_ptr`` never change, so a ``torch.compile``d UNet does not recompile when
    adapters change, and optimisers or hooks holding the parameters stay valid.

    Cost per swap: one pass over the targeted weights. Modules of one shape and adapter
    composition are fused together with batched matmuls, in chunks of at most ``chunk_bytes``
    of float32 scratch, so a swap is a few kernels per chunk rather than several per module.
    Adapters whose tensors are not on the weights' device travel there packed, in one transfer
    (keep ``LoraWeights.to(device)`` copies for the fastest swaps). On CUDA with TF32 matmuls
    allowed, the delta is computed in TF32 (ample for bf16/fp16 weights).

    Attention modules whose QKV projections were fused (``pipe.fuse_qkv_projections()``) are
    handled: a LoRA on ``to_q`` / ``to_k`` / ``to_v`` writes the matching rows of ``to_qkv`` /
    ``to_kv``. Fuse projections before the first ``apply``.
    """

    def __init__(self, pipe, *, originals_device: torch.device | str | None = None, chunk_bytes: int = 256 * 2**20):
        self.components: dict[str, torch.nn.Module] = {}
        for component in COMPONENTS:
            module = getattr(pipe, component, None)
            if module is not None:
                self.components[component] = module
        self.originals_device = None if originals_device is None else torch.device(originals_device)
        self.chunk_bytes = chunk_bytes  # bound on the float32 scratch of one fused chunk
        self._targets: dict[tuple[str, str], _Target] = {}
        self._originals: dict[tuple[str, str], torch.Tensor] = {}
        self._modified: set[tuple[str, str]] = set()
        self._identity: tuple = ()

    @property
    def identity(self) -> tuple:
        """The identity of the adapter set now fused (``()`` when the base weights are in place)."""
        return self._identity

    @property
    def originals_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._originals.values())

    def apply(self, adapters: Sequence[tuple[LoraWeights, float]], identity: tuple | None = None) -> bool:
        """Fuse ``adapters`` (``(weights, scale)`` pairs) into the pipeline; returns False when
        the same set (by ``identity``, default each adapter's fingerprint and scale) is already
        fused. Every target is checked before any weight changes: a missing module or a shape
        mismatch raises :class:`LoraError` naming the adapter and module, leaving the weights
        as they were."""
        adapters = [(weights, float(scale)) for weights, scale in adapters]
        if identity is None:
            identity = tuple((weights.fingerprint, scale) for weights, scale in adapters)
        identity = tuple(identity)
        if identity == self._identity and (identity or not self._modified):
            return False

        plan: dict[tuple[str, str], list[tuple[LoraLayer, float]]] = {}
        plan_owners: dict[tuple[str, str], list[LoraWeights]] = {}
        adapters = [(self._on_device(weights), scale) for weights, scale in adapters]
        for weights, scale in adapters:
            for component, path, layer in weights.items():
                key = (component, path)
                target = self._target(component, path, weights.name)
                out_rows, cols = target.shape[0], target.shape[1:].numel()
                if layer.up.shape[0] != out_rows or layer.down[0].numel() != cols:
                    raise LoraError(
                        f"adapter {weights.name!r}: module {component}.{path} has weight {tuple(target.shape)} "
                        f"but the LoRA is up {tuple(layer.up.shape)} @ down {tuple(layer.down.shape)}"
                    )
                if scale != 0.0:
                    plan.setdefault(key, []).append((layer, scale * layer.scale))
                    plan_owners.setdefault(key, []).append(weights)

        with torch.no_grad():
            stale = sorted(self._modified - plan.keys())
            if stale:
                torch._foreach_copy_([self._targets[k].view() for k in stale], [self._originals[k] for k in stale])
            for key in plan:
                self._remember_original(key)
            # Modules of one shape, dtype and adapter composition are fused together, a chunk
            # at a time: a few kernels per chunk instead of several per module.
            groups: dict[tuple, list[tuple[str, str]]] = {}
            for key, terms in plan.items():
                weight = self._targets[key].view()
                signature = tuple((id(owner), layer.rank) for owner, (layer, _) in zip(plan_owners[key], terms))
                groups.setdefault((weight.device, weight.dtype, tuple(weight.shape), signature), []).append(key)
            for (device, _, shape, _), keys in groups.items():
                per_module = 4 * shape[0] * max(1, torch.Size(shape[1:]).numel())
                step = max(1, self.chunk_bytes // per_module)
                for start in range(0, len(keys), step):
                    chunk = keys[start:start + step]
                    self._fuse(chunk, [plan[k] for k in chunk], device, shape)
        self._modified = set(plan)
        self._identity = identity
        return True

    @property
    def modified_components(self) -> set[str]:
        """The components (``unet``, ``text_encoder``, ``text_encoder_2``) whose weights now differ from the base."""
        return {component for component, _ in self._modified}

    def touched_parameters(self) -> set[int]:
        """``id()`` of every weight Parameter an adapter has ever been fused into (what a cache
        derived from the weights, such as float8 copies, must refresh after a swap)."""
        return {id(self._targets[key].param) for key in self._originals}

    def modified_parameters(self) -> set[int]:
        """``id()`` of every weight Parameter that now holds an adapter (the rest of
        :meth:`touched_parameters` hold their base values)."""
        return {id(self._targets[key].param) for key in self._modified}

    def restore(self) -> None:
        """Put the base weights back (bit-exact copies of the originals)."""
        keys = sorted(self._modified)
        if keys:
            with torch.no_grad():
                torch._foreach_copy_([self._targets[k].view() for k in keys], [self._originals[k] for k in keys])
        self._modified = set()
        self._identity = ()

    def _remember_original(self, key: tuple[str, str]) -> None:
        if key not in self._originals:
            weight = self._targets[key].view().detach()
            self._originals[key] = weight.clone() if self.originals_device is None else weight.to(self.originals_device, copy=True)

    def _fuse(self, keys: list[tuple[str, str]], terms: list[list[tuple[LoraLayer, float]]], device: torch.device, shape: tuple) -> None:
        """``W = W0 + [f1 B1 | f2 B2 | ...] @ [A1; A2; ...]`` for a chunk of same-shaped modules
        with the same adapter composition: one batched matmul in float32, cast once."""
        out, cols = shape[0], torch.Size(shape[1:]).numel()
        downs, ups = [], []
        for j in range(len(terms[0])):
            rank = terms[0][j][0].rank
            downs.append(torch.stack([t[j][0].down.reshape(rank, cols) for t in terms]).to(device=device, dtype=torch.float32))
            up = torch.stack([t[j][0].up.reshape(out, rank) for t in terms]).to(device=device, dtype=torch.float32)
            factors = torch.tensor([t[j][1] for t in terms], dtype=torch.float32).to(device)
            ups.append(up * factors.view(-1, 1, 1))
        down = downs[0] if len(downs) == 1 else torch.cat(downs, dim=1)
        up = ups[0] if len(ups) == 1 else torch.cat(ups, dim=2)
        fused = torch.stack([self._originals[k].reshape(out, cols) for k in keys]).to(device=device, dtype=torch.float32)
        fused.baddbmm_(up, down)
        torch._foreach_copy_([self._targets[k].view() for k in keys], list(fused.view(len(keys), *shape).unbind(0)))

    def _on_device(self, weights: LoraWeights) -> LoraWeights:
        """``weights`` moved (packed, one transfer) to the device of the weights it adapts."""
        component = next(iter(weights.layers), None)
        model = self.components.get(component) if component else None
        if model is None:
            return weights
        device = next(model.parameters()).device
        return weights if weights.device == device else weights.to(device)

    def _target(self, component: str, path: str, adapter: str) -> _Target:
        key = (component, path)
        target = self._targets.get(key)
        if target is None:
            target = self._resolve(component, path, adapter)
            self._targets[key] = target
        return target

    def _resolve(self, component: str, path: str, adapter: str) -> _Target:
        model = self.components.get(component)
        if model is None:
            raise LoraError(f"adapter {adapter!r} targets {component}.{path} but the pipeline has no {component}")
        model = getattr(model, "_orig_mod", model)  # a torch.compile wrapper
        candidates = [path]
        if component.startswith("text_encoder"):
            # transformers 5 flattened CLIPTextModel (no ``text_model``); older files carry it.
            candidates.append(path[len("text_model."):] if path.startswith("text_model.") else "text_model." + path)
        module, found = None, None
        for candidate in candidates:
            try:
                module, found = model.get_submodule(candidate), candidate
                break
            except AttributeError:
                continue
        if module is None:
            raise LoraError(f"adapter {adapter!r}: module {component}.{path} does not exist in the pipeline's {component} ({type(model).__name__})")
        module = getattr(module, "base_layer", module)  # a peft-wrapped layer
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.nn.Parameter):
            raise LoraError(f"adapter {adapter!r}: module {component}.{path} ({type(module).__name__}) has no weight to adapt")
        fused = self._fused_qkv(model, found)
        return fused if fused is not None else _Target(weight, None)

    @staticmethod
    def _fused_qkv(model: torch.nn.Module, path: str) -> _Target | None:
        head, _, leaf = path.rpartition(".")
        if leaf not in ("to_q", "to_k", "to_v") or not head:
            return None
        attn = model.get_submodule(head)
        if not getattr(attn, "fused_projections", False):
            return None
        if getattr(attn, "to_qkv", None) is not None and not getattr(attn, "is_cross_attention", False):
            fused, order = attn.to_qkv, ("to_q", "to_k", "to_v")
        elif getattr(attn, "to_kv", None) is not None and leaf in ("to_k", "to_v"):
            fused, order = attn.to_kv, ("to_k", "to_v")
        else:
            return None
        start = 0
        for name in order:
            rows = getattr(attn, name).weight.shape[0]
            if name == leaf:
                return _Target(fused.weight, slice(start, start + rows))
            start += rows
        return None
