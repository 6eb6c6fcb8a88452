"""Checkpoint state without pickle: nested state dicts as safetensors plus a JSON sidecar.

``save_state(dir, name, state)`` writes ``<name>.json`` (the structure and every scalar) and,
when the state holds tensors, ``<name>.safetensors`` (the tensors, flat, keyed by their path in
the structure). ``load_state(dir, name)`` reads them back with ``safetensors`` and ``json``
only, so nothing read from checkpoint storage is ever unpickled.

Every JSON object in the structure is one tag, so any state dict round-trips exactly:

- ``{"dict": {key: value}}``          a dict with string keys;
- ``{"items": [[key, value], ...]}``  a dict with other keys (an optimizer's state is keyed by
  parameter index);
- ``{"tuple": [...]}``                a tuple (``random.getstate()``, AdamW's ``betas``);
- ``{"tensor": key}``                 a torch tensor in the safetensors file;
- ``{"ndarray": key}``                a numpy array, stored as a tensor (numpy's RNG state).

Lists, strings, numbers (floats round-trip exactly, NaN and inf included), booleans and None are
themselves. Anything else is a ``TypeError`` naming its path.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["save_state", "load_state", "FORMAT"]

FORMAT = "rayimg.state/1"


def _encode(value: Any, path: str, tensors: dict[str, torch.Tensor], seen: set[int]) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if path in tensors:  # a key holding "/" can spell another entry's path
        path = f"{path}#{len(tensors)}"
    if isinstance(value, torch.Tensor):
        t = value.detach().to("cpu").contiguous()
        if t.numel() and t.data_ptr() in seen:  # safetensors refuses tensors that share memory
            t = t.clone()
        if t.numel():
            seen.add(t.data_ptr())
        tensors[path] = t
        return {"tensor": path}
    if isinstance(value, np.ndarray):
        tensors[path] = torch.from_numpy(np.ascontiguousarray(value).copy())
        return {"ndarray": path}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple):
        return {"tuple": [_encode(v, f"{path}/{i}", tensors, seen) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, f"{path}/{i}", tensors, seen) for i, v in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return {"dict": {k: _encode(v, f"{path}/{k}", tensors, seen) for k, v in value.items()}}
        for k in value:
            if not (k is None or isinstance(k, (bool, int, float, str))):
                raise TypeError(f"checkpoint state {path or '/'}: dict key {k!r} of type {type(k).__name__} cannot be stored")
        return {"items": [[k, _encode(v, f"{path}/{k}", tensors, seen)] for k, v in value.items()]}
    raise TypeError(f"checkpoint state {path or '/'}: a {type(value).__name__} cannot be stored without pickle")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) != 1:
        raise ValueError(f"checkpoint state: an untagged JSON object {sorted(value)[:5]}")
    (tag, body), = value.items()
    if tag == "dict":
        return {k: _decode(v, tensors) for k, v in body.items()}
    if tag == "items":
        return {k: _decode(v, tensors) for k, v in body}
    if tag == "tuple":
        return tuple(_decode(v, tensors) for v in body)
    if tag == "tensor":
        return tensors[body]
    if tag == "ndarray":
        return tensors[body].numpy()
    raise ValueError(f"checkpoint state: unknown tag {tag!r}")


def save_state(directory: str | Path, name: str, state: Any) -> None:
    """Write ``state`` as ``<directory>/<name>.json`` (+ ``<name>.safetensors`` for its tensors)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(state, "", tensors, set())
    if tensors:
        save_file(tensors, str(directory / f"{name}.safetensors"))
    doc = {"format": FORMAT, "tensors": f"{name}.safetensors" if tensors else None, "state": structure}
    (directory / f"{name}.json").write_text(json.dumps(doc))


def load_state(directory: str | Path, name: str, device: str | torch.device = "cpu") -> Any:
    """The state :func:`save_state` wrote under ``name``; tensors on ``device``."""
    from safetensors.torch import load_file

    directory = Path(directory)
    path = directory / f"{name}.json"
    if not path.exists():
        old = sorted(p.name for p in directory.glob(f"{name}*.pt"))
        hint = f" (it holds {', '.join(old)}: a pickled checkpoint, which is never loaded)" if old else ""
        raise FileNotFoundError(f"checkpoint {directory}: no {name}.json{hint}")
    doc = json.loads(path.read_text())
    if doc.get("format") != FORMAT:
        raise ValueError(f"{path}: format {doc.get('format')!r}, expected {FORMAT!r}")
    tensors = load_file(str(directory / doc["tensors"]), device=str(device)) if doc["tensors"] else {}
    return _decode(doc["state"], tensors)
