"""Load a base model once and turn generation requests into keyed PNGs (render job and server)."""

from __future__ import annotations

import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

from rayimg.config import EngineConfig, ModelConfig
from rayimg.models.loader import load_model
from rayimg.render.compile_cache import CompileCache, cache_key
from rayimg.render.engine import Engine, GenerationRequest, PendingImage
from rayimg.render.output import output_key, png_bytes


@dataclass
class RenderedImage:
    key: str
    png: bytes
    params: dict
    seconds: float


class Renderer:
    """A base pipeline, the engine and (optionally) an adapter store for ``request.adapters``."""

    def __init__(self, model_cfg: ModelConfig, engine_cfg: EngineConfig | None = None, storage=None, adapter_store=None,
                 compile_cache: str = ""):
        """``compile_cache``: the compile-cache prefix used when ``engine_cfg.compile_cache`` is
        empty (the render job passes one under its output); empty too: no compile cache."""
        start = time.perf_counter()
        loaded = load_model(model_cfg, storage)
        loaded_at = time.perf_counter()
        self._setup(loaded.pipeline, loaded.model_id, loaded.model_hash, loaded.family, engine_cfg, adapter_store)
        self._setup_compile_cache(engine_cfg or EngineConfig(), storage, compile_cache)
        self.startup = {"model_load_s": round(loaded_at - start, 2), "engine_setup_s": round(time.perf_counter() - loaded_at, 2)}

    @classmethod
    def from_pipeline(cls, pipe, model_id: str, model_hash: str, family: str, engine_cfg: EngineConfig | None = None,
                      adapter_store=None, storage=None, compile_cache: str = "") -> "Renderer":
        """A renderer over a pipeline already in memory (benchmarks; the loader is skipped)."""
        self = cls.__new__(cls)
        start = time.perf_counter()
        self._setup(pipe, model_id, model_hash, family, engine_cfg, adapter_store)
        self._setup_compile_cache(engine_cfg or EngineConfig(), storage, compile_cache)
        self.startup = {"model_load_s": 0.0, "engine_setup_s": round(time.perf_counter() - start, 2)}
        return self

    def _setup(self, pipe, model_id, model_hash, family, engine_cfg, adapter_store) -> None:
        self.model_id, self.model_hash, self.family = model_id, model_hash, family
        self.pipe = pipe
        engine_cfg = engine_cfg or EngineConfig()
        self.engine = Engine.from_config(self.pipe, engine_cfg)
        self.png_compress_level = engine_cfg.png_compress_level
        self.adapter_store = adapter_store
        self._pool: ThreadPoolExecutor | None = None
        self._png_pool: ThreadPoolExecutor | None = None
        self.prefetched_adapters = 0  # adapters loaded ahead by render_stream, during the batch before theirs
        self.compile_cache: CompileCache | None = None

    def _setup_compile_cache(self, engine_cfg: EngineConfig, storage, default_prefix: str) -> None:
        """Compiled graphs from (and to) the compile cache (:mod:`rayimg.render.compile_cache`),
        when the engine compiles anything and a prefix is set."""
        prefix = engine_cfg.compile_cache or default_prefix
        if not prefix or not (engine_cfg.compile or engine_cfg.compile_vae):
            return
        from rayimg.storage import Storage

        settings, device, dtype = self.engine.config, self.engine.device, self.pipe.unet.dtype
        self.compile_cache = CompileCache(storage or Storage(), prefix, lambda shape: cache_key(
            settings, device=device, dtype=dtype, model_id=self.model_id, model_hash=self.model_hash, shape=shape))
        if settings.compile:
            from rayimg.render import aot

            # the UNet's graphs whole, so a warm start skips dynamo's tracing too
            aot.install(self.pipe.unet, self.compile_cache, None if settings.compile_mode == "default" else settings.compile_mode)

    @property
    def compile_cache_status(self) -> list[dict]:
        """What the compile cache did, one dict per shape looked up or saved (see
        :class:`~rayimg.render.compile_cache.CompileCache`); empty without a compile cache."""
        return list(self.compile_cache.events) if self.compile_cache is not None else []

    def _call_shape(self, requests: list[GenerationRequest]) -> dict:
        """The shape of the engine's pipeline calls for ``requests`` (which graphs they compile)."""
        first = requests[0]
        return {"mode": first.mode, "batch": 1 if self.engine.batch_invariant else len(requests),
                "width": first.width, "height": first.height, "guidance": first.guidance_scale > 1}

    def key(self, request: GenerationRequest) -> str:
        adapters = [{"name": n, "version": v, "scale": s} for n, v, s in request.adapters]
        params = request.params()
        if self.engine.config.fp8:
            # other pixels than the bf16 engine's: another key (absent otherwise, so keys stay)
            params["numerics"] = "fp8:norm_fed"
        return output_key(self.model_id, self.model_hash, adapters, params)

    def use_adapters(self, identity) -> float:
        """Fuse the adapters ``((name, version, scale), ...)`` (versions resolved); returns seconds spent."""
        start = time.perf_counter()
        if tuple(identity) != self.engine.adapter_identity:
            if identity and self.adapter_store is None:
                raise ValueError("requests name adapters but this renderer has no adapter registry")
            pairs = [(self.adapter_store.get(name, version)[1], scale) for name, version, scale in identity]
            self.engine.set_adapters(pairs, identity)
        return time.perf_counter() - start

    def warm_up(self, width: int, height: int, guidance_scale: float, steps: int = 3) -> float | None:
        """Compile (or load from the compile cache) the graphs of one engine batch of txt2img
        requests of this shape, and record their CUDA graphs, by rendering a throwaway batch of
        ``steps`` steps (a graph does not depend on the step count); returns the seconds spent,
        or None when the engine compiles nothing (nothing to warm)."""
        if not (self.engine.config.compile or self.engine.config.compile_vae):
            return None
        start = time.perf_counter()
        n = 1 if self.engine.batch_invariant else self.engine.config.batch_size
        requests = [GenerationRequest(prompt="warm-up", steps=steps, guidance_scale=guidance_scale, width=width, height=height, seed=i)
                    for i in range(n)]
        self._generate(requests)
        return time.perf_counter() - start

    def render(self, requests: list[GenerationRequest]) -> list[RenderedImage]:
        """Render requests that share a batch key (adapters included) in one batch."""
        if not requests:
            return []
        return self._encode(requests, *self._generate(requests))

    def render_stream(self, batches: Iterable[list[GenerationRequest]],
                      sink: Callable[[GenerationRequest, RenderedImage], Any] | None = None) -> Iterator[list[tuple[RenderedImage, Any]]]:
        """Render ``batches`` in order, yielding ``[(image, sink result), ...]`` per batch.

        Each batch's PNG encoding (and ``sink(request, image)``, e.g. the write to storage) runs
        in a worker thread while the next batch is on the accelerator, so the CPU work of an
        image (mostly PNG deflate) hides behind the next generation instead of adding to it; the next batch's prompts are encoded (:meth:`Engine.prefetch`) while this
        one denoises. When the next batch needs other adapters, their files are fetched, checked
        and parsed into the store's CPU tier on this thread, one part per denoising step of the
        current batch (the accelerator is then busy with the steps queued ahead), and, when the
        swap leaves the text encoders alone, its prompts are encoded then too; the swap itself
        stays between the batches. Results are the same as :meth:`render`'s, batch by batch, in
        order; a batch that fails raises after the batch before it has been yielded."""
        pool = self._encoder_pool()
        pending: Future | None = None
        queue = (requests for requests in batches if requests)
        requests = next(queue, None)
        while requests is not None:
            upcoming = next(queue, None)  # one batch ahead: its prompts are encoded during this one
            try:
                self.use_adapters(requests[0].adapters)
                work = None
                if upcoming is not None:
                    if tuple(upcoming[0].adapters) == self.engine.adapter_identity:
                        self.engine.prefetch(upcoming)
                    else:  # a swap comes first: load its adapters while this batch denoises
                        work = self._prepare(upcoming)
                # on the caller's thread (it owns the model); the pixels arrive in the worker, so
                # the next batch is set up and queued while this one decodes
                images, seconds = self._generate(requests, while_busy=work, pending=True)
            except Exception:
                if pending is not None:  # the batch before the failing one is complete: hand it over first
                    done, pending = pending.result(), None
                    yield done
                raise
            future = pool.submit(self._encode_and_sink, requests, images, seconds, sink)
            if pending is not None:
                yield pending.result()
            pending = future
            requests = upcoming
        if pending is not None:
            yield pending.result()

    def _generate(self, requests: list[GenerationRequest], while_busy=None, pending: bool = False):
        """``(images, seconds per image)``; ``pending``: the images are :class:`PendingImage` (the
        call returns before the accelerator is done) and the seconds a callable that waits for
        the pixels and measures up to their arrival."""
        self.use_adapters(requests[0].adapters)
        shape = self._call_shape(requests) if self.compile_cache is not None else None
        if shape is not None:
            self.compile_cache.before_call(shape)  # once per shape, before it compiles
        start = time.perf_counter()
        if not pending:
            images = self.engine.generate(requests, while_busy=while_busy)
            seconds = (time.perf_counter() - start) / len(requests)
        else:
            images = self.engine.generate(requests, while_busy=while_busy, output_type="pending")
            seconds = lambda: (max(image.ready_at for image in images) - start) / len(requests)  # noqa: E731
        if shape is not None:
            self.compile_cache.after_call(shape)  # the graphs are compiled once the call returns
        return images, seconds

    def _prepare(self, upcoming: list[GenerationRequest]) -> Iterator[None]:
        """Bring the adapters of ``upcoming`` to the store's CPU tier, in parts (a generator: the
        engine runs one part per denoising step of the current batch, see ``Engine.generate``),
        then queue its prompts' encoding when the swap allows it (:meth:`Engine.prefetch`). A
        failure here is left to the batch's own :meth:`use_adapters`, which raises it in its
        turn; this batch is unaffected."""
        identity = tuple(upcoming[0].adapters)
        if identity and self.adapter_store is None:
            return
        pairs = []
        try:
            for name, version, scale in identity:
                yield from self.adapter_store.load_steps(name, version)
                pairs.append((self.adapter_store.get(name, version)[1], scale))
        except Exception:  # noqa: BLE001 - reported by use_adapters when that batch comes
            return
        self.prefetched_adapters += len(pairs)
        self.engine.prefetch(upcoming, adapters=pairs)

    def _encode(self, requests, images, seconds) -> list[RenderedImage]:
        """The batch's PNGs, encoded in parallel threads (zlib and PIL's encoder release the GIL,
        and a large PNG takes a noticeable fraction of a second); same bytes as one by one."""
        images = [image.result() if isinstance(image, PendingImage) else image for image in images]
        if callable(seconds):
            seconds = seconds()
        keys = [self.key(request) for request in requests]
        jobs = [(image, {"rayimg:key": key, "rayimg:model": self.model_id, "parameters": request.params()}, self.png_compress_level)
                for key, request, image in zip(keys, requests, images)]
        pngs = list(self._png_workers().map(lambda job: png_bytes(*job), jobs)) if len(jobs) > 1 else [png_bytes(*job) for job in jobs]
        return [RenderedImage(key=key, png=png, params=request.params(), seconds=seconds) for key, png, request in zip(keys, pngs, requests)]

    def _png_workers(self) -> ThreadPoolExecutor:
        if self._png_pool is None:
            self._png_pool = ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1)), thread_name_prefix="rayimg-png-encode")
        return self._png_pool

    def _encode_and_sink(self, requests, images, seconds, sink):
        rendered = self._encode(requests, images, seconds)
        return [(image, sink(request, image) if sink is not None else None) for request, image in zip(requests, rendered)]

    def _encoder_pool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            # one thread: batches are encoded in order, and zlib releases the GIL while it works
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rayimg-png")
        return self._pool
