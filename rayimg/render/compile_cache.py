"""Compiled-graph artifacts kept on the job's storage, so a second actor, a restarted actor or the
next job loads the engine's compiled UNet/VAE instead of compiling them again.

torch's "mega-cache" (``torch.compiler.save_cache_artifacts`` / ``load_cache_artifacts``) packs
what ``torch.compile`` wrote to its local caches (inductor's compiled graphs, AOTAutograd
entries, autotuning results) into one byte string, and loads such a string back into the local
caches of another process, where the next compile of the same graph is a cache hit.

One entry per :func:`cache_key` (torch version, accelerator, the engine settings that change the
graphs, the model, and the call's shape), stored as ``<prefix>/<sha256 of the key>.bin``, one
object written atomically::

    RAYIMG-COMPILE-CACHE 1\\n
    {"key": {...}, "payload_bytes": n, "payload_sha256": "..."}\\n
    <payload: the bytes of save_cache_artifacts>

An entry is loaded only when its header names the same key and the payload's sha256 matches; a
stale or corrupt entry (or one torch refuses) is reported in one warning line and the engine
compiles from cold. Plain PyTorch: no Ray here.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from rayimg.storage import Storage, join

__all__ = ["CompileCache", "cache_key", "entry_uri", "read_entry", "write_entry", "CompileCacheError"]

MAGIC = b"RAYIMG-COMPILE-CACHE 1\n"
# EngineConfig fields that change the compiled graphs (batch_invariant changes the call's batch,
# which is part of the shape)
GRAPH_SETTINGS = ("compile", "compile_mode", "compile_vae", "fuse_qkv", "channels_last", "fp8", "vae_batch",
                  "vae_slicing", "vae_tiling", "attention_slicing")


class CompileCacheError(ValueError):
    """An entry that cannot be trusted: bad header, another key, or a payload checksum mismatch."""


def accelerator_name(device: torch.device | str) -> str:
    """The GPU model (compiled kernels are tuned per model), or ``"cpu"``."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def cache_key(engine_cfg, *, device, dtype, model_id: str, model_hash: str, shape: dict) -> dict:
    """The identity of one entry: everything that decides which graphs ``torch.compile`` makes.
    ``shape``: the pipeline call's shape (mode, images per call, width, height, guidance on/off)."""
    return {
        "torch": torch.__version__,
        "accelerator": accelerator_name(device),
        "engine": {name: getattr(engine_cfg, name) for name in GRAPH_SETTINGS if hasattr(engine_cfg, name)},
        "dtype": str(dtype).removeprefix("torch."),
        "model": model_id,
        "model_hash": model_hash,
        "shape": dict(shape),
    }


def key_digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode("utf-8")).hexdigest()


def entry_uri(prefix: str, key: dict) -> str:
    return join(prefix, f"{key_digest(key)}.bin")


def encode_entry(key: dict, payload: bytes) -> bytes:
    header = {"key": key, "payload_bytes": len(payload), "payload_sha256": hashlib.sha256(payload).hexdigest()}
    return MAGIC + json.dumps(header, sort_keys=True).encode("utf-8") + b"\n" + payload


def decode_entry(data: bytes, key: dict) -> bytes:
    """The payload of an entry for ``key``; :class:`CompileCacheError` if it cannot be trusted."""
    if not data.startswith(MAGIC):
        raise CompileCacheError("not a rayimg compile-cache entry (bad magic line)")
    end = data.find(b"\n", len(MAGIC))
    if end < 0:
        raise CompileCacheError("truncated header")
    try:
        header = json.loads(data[len(MAGIC):end].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CompileCacheError(f"unreadable header ({e})") from None
    if not isinstance(header, dict) or header.get("key") != json.loads(json.dumps(key)):
        raise CompileCacheError("its header names another key")
    payload = data[end + 1:]
    if len(payload) != header.get("payload_bytes") or hashlib.sha256(payload).hexdigest() != header.get("payload_sha256"):
        raise CompileCacheError("payload checksum mismatch")
    return payload


def read_entry(storage: Storage, uri: str, key: dict) -> bytes | None:
    """The checked payload at ``uri``, or None when there is no entry."""
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError:
        return None
    return decode_entry(data, key)


def write_entry(storage: Storage, uri: str, key: dict, payload: bytes) -> None:
    storage.write_bytes(uri, encode_entry(key, payload))  # atomic: readers see a whole entry


def summary(key: dict) -> str:
    shape = " ".join(f"{name}={value}" for name, value in key["shape"].items())
    return f"{key['model']} {shape} on {key['accelerator']} (torch {key['torch']})"


def _graph_counts() -> tuple[int, int]:
    """inductor's (FX graph cache hits, misses) in this process so far."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"]


# torch's compile-time counters (seconds, cumulative per process) that say where a first call went
_PHASES = {"bytecode_tracing": "dynamo tracing", "OutputGraph.call_user_compiler": "backend", "build_guards": "guards"}


def _compile_seconds() -> dict[str, float]:
    """torch's cumulative compile seconds per :data:`_PHASES` key (empty if torch has no such
    counters: they are private and may change)."""
    try:
        from torch._dynamo.utils import compile_times

        names, values = compile_times(repr="csv", aggregate=True)
        return {name: float(value) for name, value in zip(names, values) if name in _PHASES}
    except Exception:  # noqa: BLE001 - diagnostics only
        return {}


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@dataclass
class _FirstCall:
    """What stood before a shape's first call: its lookup event (once logged), inductor's graph
    cache hits and misses, the start time, torch's compile seconds so far."""

    graph_counts: tuple[int, int]
    started: float
    compile_seconds: dict[str, float]
    event: dict | None = None


@dataclass
class CompileCache:
    """Loads and saves the mega-cache entry of each shape the engine compiles (one prefix).

    :meth:`before_call` loads a shape's entry (once per shape, before its first compile);
    :meth:`after_call` saves it when there was none. :attr:`events` records what happened, one
    dict per load or save (``{"action": "loaded"|"cold"|"saved"|"ignored"|..., "uri", "bytes",
    "key"}``; the lookup's dict also gets ``graphs_from_cache`` and ``graphs_compiled``, inductor's
    cache hits and misses in that shape's first call, ``first_call_s``, that call's seconds, and
    ``compile_phases_s``, torch's seconds of dynamo tracing, backend compile and guards within it), and each is reported in one line through ``log`` (stderr by default)."""

    storage: Storage
    prefix: str
    base_key: Callable[[dict], dict]  # shape -> key
    log: Callable[[str], None] = _stderr
    events: list[dict] = field(default_factory=list)
    _seen: dict[str, bool] = field(default_factory=dict)  # key digest -> an entry exists on storage

    def _event(self, action: str, key: dict, uri: str, line: str, nbytes: int = 0, reason: str = "") -> None:
        event = {"action": action, "uri": uri, "bytes": nbytes, "key": key, **({"reason": reason} if reason else {})}
        self.events.append(event)
        first = self._first.get(key_digest(key))
        if first is not None and first.event is None:
            first.event = event
        self.log(line)

    _first: dict[str, "_FirstCall"] = field(default_factory=dict)  # digest -> what stood before the shape's first call

    def record(self, action: str, key: dict, uri: str, line: str, nbytes: int = 0, reason: str = "") -> None:
        """An event of another user of this cache's storage (:mod:`rayimg.render.aot`): in
        :attr:`events` and one log line."""
        self._event(action, key, uri, line, nbytes, reason)

    def before_call(self, shape: dict) -> None:
        key = self.base_key(shape)
        digest = key_digest(key)
        if digest in self._seen:
            return
        self._first[digest] = _FirstCall(graph_counts=_graph_counts(), started=time.perf_counter(), compile_seconds=_compile_seconds())
        uri = entry_uri(self.prefix, key)
        try:
            payload = read_entry(self.storage, uri, key)
            if payload is None:
                self._seen[digest] = False
                self._event("cold", key, uri, f"rayimg compile cache: cold for {summary(key)}: no entry at {uri}")
                return
            if torch.compiler.load_cache_artifacts(payload) is None:  # torch logs and returns None on bytes it cannot read
                raise CompileCacheError("torch.compiler.load_cache_artifacts could not read the payload")
        except Exception as e:  # noqa: BLE001 - a cache never stops a render: compile from cold
            self._seen[digest] = False  # a good entry replaces it after this compile
            self._event("ignored", key, uri, f"WARNING: rayimg compile cache: ignoring {uri} ({type(e).__name__}: {e}); "
                                             f"compiling {summary(key)} from cold", reason=f"{type(e).__name__}: {e}")
            return
        self._seen[digest] = True
        self._event("loaded", key, uri, f"rayimg compile cache: loaded {len(payload)} bytes for {summary(key)} from {uri}",
                    nbytes=len(payload))

    def after_call(self, shape: dict) -> None:
        key = self.base_key(shape)
        digest = key_digest(key)
        first = self._first.pop(digest, None)
        if first is not None and first.event is not None:
            # the lookup's event learns how the shape's first call got its graphs, and how long it took
            hits, misses = (now - then for now, then in zip(_graph_counts(), first.graph_counts))
            seconds = round(time.perf_counter() - first.started, 2)
            now = _compile_seconds()
            phases = {_PHASES[name]: round(now[name] - first.compile_seconds.get(name, 0.0), 2) for name in now}
            first.event.update(graphs_from_cache=hits, graphs_compiled=misses, first_call_s=seconds, compile_phases_s=phases)
            spent = "".join(f", {name} {value:.1f}s" for name, value in phases.items())
            line = (f"rayimg compile cache: first call for {summary(key)} took {seconds:.1f}s ({hits} graph(s) from the cache, "
                    f"{misses} compiled{spent})")
            if first.event["action"] == "loaded" and misses and not hits:
                # torch keys its graphs on process-wide settings too (TF32, inductor config, threads): the
                # entry was sound but made for a process set up differently
                line = ("WARNING: " + line + ": the loaded entry matched none of this process's graphs "
                        "(a process-wide torch setting such as TF32 or the intra-op thread count, "
                        f"{torch.get_num_threads()} here and 1 in a Ray actor by default, differs from the one that saved it)")
            self.log(line)
        if self._seen.get(digest, True):  # loaded, already saved, or never looked up
            return
        self._seen[digest] = True
        uri = entry_uri(self.prefix, key)
        try:
            saved = torch.compiler.save_cache_artifacts()
            if saved is None:
                self._event("nothing", key, uri, f"rayimg compile cache: nothing to save for {summary(key)} "
                                                 "(torch recorded no compiled artifacts)")
                return
            payload = saved[0]
            write_entry(self.storage, uri, key, payload)
        except Exception as e:  # noqa: BLE001 - the images are fine; only the next start is slower
            self._event("save_failed", key, uri, f"WARNING: rayimg compile cache: could not save {uri} ({type(e).__name__}: {e})",
                        reason=f"{type(e).__name__}: {e}")
            return
        self._event("saved", key, uri, f"rayimg compile cache: saved {len(payload)} bytes for {summary(key)} to {uri}",
                    nbytes=len(payload))
