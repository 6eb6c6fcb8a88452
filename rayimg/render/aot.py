"""Compiled UNet graphs kept whole on the compile cache, so a warm start skips dynamo's tracing.

The compile cache's mega-cache (:mod:`rayimg.render.compile_cache`) makes inductor a cache hit,
but dynamo still traces the UNet again in every new process (about 22 s for SDXL on an H100).
Here the UNet's first call of each input signature is compiled ahead of time (torch's
``aot_compile``: one full graph, ``dynamic=False``, the engine's compile mode) and the compiled
function is stored on the compile cache; a new process loads it and calls it with the module's
own weights (read in place, so fused adapters still apply) without tracing anything.

:func:`install` puts a dispatcher in the place ``nn.Module.compile`` put its compiled call, so
the engine and the pipelines call ``unet(...)`` as before. Anything the ahead-of-time path cannot
do (a graph break, guards it cannot store, an entry that fails its checks or torch refuses, an
input signature the loaded graph's guards reject) is one warning line, and that signature runs
through the ordinary ``torch.compile`` of the module instead: never a wrong or failed call.

The stored guards leave out identity and global checks, so an entry is keyed (besides the
compile cache's key: torch version, GPU model, engine settings, model) by Python's and diffusers'
versions and by the module's structure (its submodules' classes and parameter shapes and
dtypes); a module whose structure changes after install (adapter slots) is given back to the
ordinary compile with :func:`uninstall`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import sys
import time
from typing import Any, Callable

import torch
import torch._inductor
import torch._inductor.config

from rayimg.render.compile_cache import CompileCache, CompileCacheError, entry_uri, key_digest, read_entry, write_entry

__all__ = ["install", "uninstall", "installed", "signature", "structure_digest"]

MAX_SIGNATURES = 8  # input signatures one module compiles ahead of time; later ones use torch.compile


def _serializable_guards(entries) -> list[bool]:
    """The guards an entry can store: torch's own filter misses unstorable guards derived from
    storable ones (an ID_MATCH under a TYPE_MATCH), so these are dropped here too."""
    from torch._dynamo.guards import CheckFunctionManager

    bad = CheckFunctionManager.UNSUPPORTED_SERIALIZATION_GUARD_TYPES
    return [not (g.is_global or g.guard_type in bad or any(d in bad for d in g.derived_guard_types)) for g in entries]


def _describe(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return ("T", tuple(value.shape), tuple(value.stride()), str(value.dtype), str(value.device), value.requires_grad)
    if isinstance(value, dict):
        return ("D", tuple((k, _describe(v)) for k, v in sorted(value.items())))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_describe(v) for v in value))
    if value is None or isinstance(value, (bool, int, float, str)):
        return value  # dynamo specialises on Python scalars: their values are part of the graph
    return ("O", type(value).__qualname__)


def signature(args: tuple, kwargs: dict) -> tuple:
    """What decides which graph a call needs: every tensor's shape, strides, dtype and device,
    every Python scalar's value, and the grad mode."""
    return (_describe(args), _describe(kwargs), torch.is_grad_enabled(), torch.is_inference_mode_enabled())


def structure_digest(module: torch.nn.Module) -> str:
    """The module's structure: each submodule's path and class, each parameter's and buffer's
    path, shape and dtype (not their values: weights are read in place)."""
    h = hashlib.sha256()
    for name, sub in module.named_modules():
        h.update(f"{name}:{type(sub).__module__}.{type(sub).__qualname__};".encode())
        processor = getattr(sub, "processor", None)
        if processor is not None:
            h.update(f"p:{type(processor).__qualname__};".encode())
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
    return h.hexdigest()[:32]


class _Dispatch:
    """``module._compiled_call_impl`` while installed: each input signature's loaded or compiled
    ahead-of-time function, else the module's ordinary compiled call."""

    def __init__(self, module: torch.nn.Module, fallback: Callable, mode: str | None, cache: CompileCache, shape_key: Callable[[tuple], dict]):
        self.module, self.fallback, self.mode, self.cache, self.shape_key = module, fallback, mode, cache, shape_key
        self.functions: dict[tuple, Any] = {}  # signature -> loaded function, or None: use the fallback
        self.proven: set[tuple] = set()  # signatures whose function has run once
        self.structure = structure_digest(module)

    def __call__(self, *args, **kwargs):
        sig = signature(args, kwargs)
        fn = self.functions.get(sig, False)
        if fn is False:
            fn = self.functions[sig] = self._function(sig, args, kwargs)
        if fn is None:
            return self.fallback(*args, **kwargs)
        if sig in self.proven:
            return fn(self.module, *args, **kwargs)
        try:  # a graph's first call: one that fails hands its signature to the ordinary compile
            out = fn(self.module, *args, **kwargs)
        except Exception as e:  # noqa: BLE001
            self.functions[sig] = None
            self.cache.log(f"WARNING: rayimg compile cache: the {type(self.module).__name__} graph for {_shapes(sig)} failed its first call "
                           f"({type(e).__name__}: {str(e)[:300]}); torch.compile takes it")
            return self.fallback(*args, **kwargs)
        self.proven.add(sig)
        return out

    def _key(self, sig: tuple) -> dict:
        import diffusers

        key = self.cache.base_key(self.shape_key(sig))
        return {**key, "aot": {"module": type(self.module).__qualname__, "python": sys.version.split()[0], "diffusers": diffusers.__version__,
                               "structure": self.structure, "signature": hashlib.sha256(repr(sig).encode()).hexdigest()[:32]}}

    def _load(self, payload: bytes):
        from torch._dynamo import config as dynamo_config

        # CUDA graphs wrap a loaded graph when the loading process asks for them
        cudagraphs = torch._inductor.list_mode_options(self.mode or "default", False).get("triton.cudagraphs", False)
        patch = torch._inductor.config.patch({"triton.cudagraphs": True}) if cudagraphs else contextlib.nullcontext()
        with patch, dynamo_config.patch(enable_aot_compile=True):
            fn = torch.compiler.load_compiled_function(io.BytesIO(payload))
        fn.disable_guard_check()  # checked once per signature, in _function
        return fn

    def _function(self, sig: tuple, args: tuple, kwargs: dict):
        real = [s for s, f in self.functions.items() if f is not None]
        if len(real) >= MAX_SIGNATURES:
            return None
        key = self._key(sig)
        uri = entry_uri(self.cache.prefix, key)
        what = f"the {type(self.module).__name__} graph for {_shapes(sig)}"
        start = time.perf_counter()
        try:
            payload = read_entry(self.cache.storage, uri, key)
            if payload is not None:
                fn = self._load(payload)
                if not fn.guard_check(self.module, *args, **kwargs):
                    raise CompileCacheError("its guards reject this call")
                self.cache.record("aot_loaded", key, uri, f"rayimg compile cache: loaded {what} ({len(payload)} bytes) in "
                                                          f"{time.perf_counter() - start:.1f}s, no tracing, from {uri}", nbytes=len(payload))
                return fn
        except Exception as e:  # noqa: BLE001 - compile it again below
            self.cache.record("aot_ignored", key, uri, f"WARNING: rayimg compile cache: ignoring {uri} ({type(e).__name__}: {e}); "
                                                       f"compiling {what} again", reason=f"{type(e).__name__}: {e}")
        try:
            from torch._dynamo import config as dynamo_config

            # the guards' state pickles the module: without this dispatcher (whose cache reaches
            # the whole pipeline) in its attributes
            self.module._compiled_call_impl = None
            try:
                # torch.compile takes a mode or options, not both: the mode as its inductor options
                options = {**torch._inductor.list_mode_options(self.mode or "default", False), "guard_filter_fn": _serializable_guards}
                with dynamo_config.patch(enable_aot_compile=True):
                    compiled = torch.compile(self.module._call_impl, fullgraph=True, dynamic=False, options=options)
                    fn = compiled.aot_compile((args, kwargs))
            finally:
                self.module._compiled_call_impl = self
            buf = io.BytesIO()
            _save(fn, buf)
            payload = buf.getvalue()
            fn = self._load(payload)  # what a new process gets (and CUDA graphs the same way)
            if not fn.guard_check(self.module, *args, **kwargs):
                raise CompileCacheError("the compiled graph's guards reject the call it was compiled for")
        except Exception as e:  # noqa: BLE001 - the ordinary compile takes this signature
            self.cache.record("aot_failed", key, uri, f"WARNING: rayimg compile cache: {what} cannot be compiled ahead of time "
                                                      f"({type(e).__name__}: {str(e)[:300]}); torch.compile takes it (a new process "
                                                      f"traces it again)", reason=f"{type(e).__name__}: {e}")
            return None
        try:
            write_entry(self.cache.storage, uri, key, payload)
        except Exception as e:  # noqa: BLE001 - the images are fine; only the next start is slower
            self.cache.record("aot_save_failed", key, uri, f"WARNING: rayimg compile cache: could not save {uri} ({type(e).__name__}: {e})",
                              reason=f"{type(e).__name__}: {e}")
            return fn
        self.cache.record("aot_saved", key, uri, f"rayimg compile cache: compiled {what} ahead of time in {time.perf_counter() - start:.1f}s, "
                                                 f"saved {len(payload)} bytes to {uri}", nbytes=len(payload))
        return fn


def _save(fn, f) -> None:
    """``fn.save_compiled_function`` into a file object (torch writes to a path)."""
    import os
    import tempfile

    fd, path = tempfile.mkstemp(prefix="rayimg-aot-", suffix=".bin")
    os.close(fd)
    try:
        fn.save_compiled_function(path)
        with open(path, "rb") as src:
            f.write(src.read())
    finally:
        os.unlink(path)


def _shapes(sig: tuple) -> str:
    """The tensor shapes of a signature, for log lines."""
    shapes: list[str] = []

    def walk(v):
        if isinstance(v, tuple) and v and v[0] == "T":
            shapes.append("x".join(map(str, v[1])))
        elif isinstance(v, tuple):
            for x in v:
                walk(x)

    walk(sig[:2])
    shapes = [s for s in shapes if s]  # 0-d tensors (a timestep) say nothing
    return ", ".join(shapes[:2]) + (", ..." if len(shapes) > 2 else "")


def install(module: torch.nn.Module, cache: CompileCache, mode: str | None, shape_key: Callable[[tuple], dict] | None = None) -> None:
    """Route ``module``'s calls (already ``module.compile(...)``-d) through ahead-of-time graphs
    kept on ``cache``. ``shape_key(signature)``: the compile-cache shape dict of an entry (default:
    the signature's digest)."""
    fallback = getattr(module, "_compiled_call_impl", None)
    if fallback is None:
        raise ValueError("aot.install: compile the module first (module.compile(...)): its compiled call is the fallback")
    if installed(module):
        return
    shape_key = shape_key or (lambda sig: {"signature": key_digest({"s": repr(sig)})})
    module._compiled_call_impl = _Dispatch(module, fallback, mode, cache, shape_key)


def uninstall(module: torch.nn.Module) -> None:
    """Give ``module`` back to its ordinary compiled call (before changing its structure)."""
    if installed(module):
        module._compiled_call_impl = module._compiled_call_impl.fallback


def installed(module: torch.nn.Module) -> bool:
    return isinstance(getattr(module, "_compiled_call_impl", None), _Dispatch)
