"""Load a base model once and turn generation requests into keyed PNGs (render job and server)."""

from __future__ import annotations

import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

from rayimg.config import EngineConfig, ModelConfig
from rayimg.models.loader import load_model
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

    def __init__(self, model_cfg: ModelConfig, engine_cfg: EngineConfig | None = None, storage=None, adapter_store=None):
        loaded = load_model(model_cfg, storage)
        self._setup(loaded.pipeline, loaded.model_id, loaded.model_hash, loaded.family, engine_cfg, adapter_store)

    @classmethod
    def from_pipeline(cls, pipe, model_id: str, model_hash: str, family: str, engine_cfg: EngineConfig | None = None,
                      adapter_store=None) -> "Renderer":
        """A renderer over a pipeline already in memory (benchmarks; the loader is skipped)."""
        self = cls.__new__(cls)
        self._setup(pipe, model_id, model_hash, family, engine_cfg, adapter_store)
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
        # render_stream's wall time by phase (seconds, all batches): where a stream's time goes
        # besides generate(); "handoff" waits for the previous batch's PNGs, "consumer" is the caller's
        self.stream_stats = {"batches": 0, "adapters_s": 0.0, "prefetch_s": 0.0, "generate_s": 0.0, "handoff_s": 0.0, "consumer_s": 0.0}
        self.prefetched_adapters = 0  # adapters loaded ahead by render_stream, during the batch before theirs
        # loads ahead: how many, their host seconds, and how many ended with the GPU still busy
        self.prefetch_stats = {"calls": 0, "seconds": 0.0, "hidden": 0}

    def key(self, request: GenerationRequest) -> str:
        adapters = [{"name": n, "version": v, "scale": s} for n, v, s in request.adapters]
        params = request.params()
        if self.engine.fp8:
            # other pixels than the bf16 engine's: another key (absent otherwise, so keys stay); the
            # set of float8 linears is part of it (each set gives other pixels)
            params["numerics"] = f"fp8:{self.engine.fp8_targets}"
        if self.engine.fp8_convs:
            params["numerics"] = params.get("numerics", "bf16") + "+fp8-convs"
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

    def render(self, requests: list[GenerationRequest]) -> list[RenderedImage]:
        """Render requests that share a batch key (adapters included) in one batch."""
        if not requests:
            return []
        return self._encode(requests, *self._generate(requests))

    def render_stream(self, batches: Iterable[list[GenerationRequest]],
                      sink: Callable[[GenerationRequest, RenderedImage], Any] | None = None) -> Iterator[list[tuple[RenderedImage, Any]]]:
        """Render ``batches`` in order, yielding ``[(image, sink result), ...]`` per batch.

        Each batch's PNG encoding (and ``sink(request, image)``, e.g. the write to storage) runs
        in a worker thread while the next batch is on the accelerator, so the CPU work of a
        1024² image (PNG deflate alone is 0.1-0.3 s) hides behind the next generation instead of
        adding to it; the next batch's prompts are encoded (:meth:`Engine.prefetch`) while this
        one denoises. When the next batch needs other adapters, their files are fetched, checked
        and parsed into the store's CPU tier on this thread, one part per denoising step of the
        current batch (the accelerator is then busy with the steps queued ahead), and, when the
        swap leaves the text encoders alone, its prompts are encoded then too; the swap itself
        stays between the batches. Results are the same as :meth:`render`'s, batch by batch, in
        order; a batch that fails raises after the batch before it has been yielded."""
        pool = self._encoder_pool()
        pending: Future | None = None
        queue = (requests for requests in batches if requests)
        stats = self.stream_stats
        clock = time.perf_counter()
        requests = next(queue, None)
        while requests is not None:
            upcoming = next(queue, None)  # one batch ahead: its prompts are encoded during this one
            try:
                self.use_adapters(requests[0].adapters)
                clock = _lap(stats, "adapters_s", clock)
                work = None
                if upcoming is not None:
                    if tuple(upcoming[0].adapters) == self.engine.adapter_identity:
                        self.engine.prefetch(upcoming)
                    else:  # a swap comes first: load its adapters while this batch denoises
                        work = self._prepare(upcoming)
                clock = _lap(stats, "prefetch_s", clock)
                # on the caller's thread (it owns the model); the pixels arrive in the worker, so
                # the next batch is set up and queued while this one decodes
                images, seconds = self._generate(requests, while_busy=work, pending=True)
                clock = _lap(stats, "generate_s", clock)
            except Exception:
                if pending is not None:  # the batch before the failing one is complete: hand it over first
                    done, pending = pending.result(), None
                    yield done
                raise
            future = pool.submit(self._encode_and_sink, requests, images, seconds, sink)
            stats["batches"] += 1
            if pending is not None:
                done = pending.result()
                clock = _lap(stats, "handoff_s", clock)
                yield done
                clock = _lap(stats, "consumer_s", clock)
            pending = future
            requests = upcoming
        if pending is not None:
            yield pending.result()

    def _generate(self, requests: list[GenerationRequest], while_busy=None, pending: bool = False):
        """``(images, seconds per image)``; ``pending``: the images are :class:`PendingImage` (the
        call returns before the accelerator is done) and the seconds a callable that waits for
        the pixels and measures up to their arrival."""
        self.use_adapters(requests[0].adapters)
        start = time.perf_counter()
        if not pending:
            images = self.engine.generate(requests, while_busy=while_busy)
            return images, (time.perf_counter() - start) / len(requests)
        images = self.engine.generate(requests, while_busy=while_busy, output_type="pending")
        return images, lambda: (max(image.ready_at for image in images) - start) / len(requests)

    def _prepare(self, upcoming: list[GenerationRequest]) -> Iterator[None]:
        """Bring the adapters of ``upcoming`` to the store's CPU tier, in parts (a generator: the
        engine runs one part per denoising step of the current batch, see ``Engine.generate``),
        then queue its prompts' encoding when the swap allows it (:meth:`Engine.prefetch`). A
        failure here is left to the batch's own :meth:`use_adapters`, which raises it in its
        turn; this batch is unaffected."""
        identity = tuple(upcoming[0].adapters)
        if identity and self.adapter_store is None:
            return
        stats = self.prefetch_stats
        pairs = []
        try:
            for name, version, scale in identity:
                part = time.perf_counter()
                for _ in self.adapter_store.load_steps(name, version):
                    stats["seconds"] += time.perf_counter() - part
                    yield
                    part = time.perf_counter()
                pairs.append((self.adapter_store.get(name, version)[1], scale))
                stats["seconds"] += time.perf_counter() - part
        except Exception:  # noqa: BLE001 - reported by use_adapters when that batch comes
            return
        self.prefetched_adapters += len(pairs)
        self.engine.prefetch(upcoming, adapters=pairs)
        stats["calls"] += 1
        device = self.engine.device
        if device.type == "cuda":
            import torch

            # the accelerator still had queued work when this ended: the load was hidden
            stats["hidden"] += int(not torch.cuda.current_stream(device).query())

    def _encode(self, requests, images, seconds) -> list[RenderedImage]:
        """The batch's PNGs, encoded in parallel threads (zlib and PIL's encoder release the GIL:
        a 1024² PNG takes 0.1-0.3 s, so a batch of 4 encoded one by one added up to 0.9 s to the
        last batch of a stream and to each ``render()`` call); same bytes as one by one."""
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


def _lap(stats: dict, name: str, since: float) -> float:
    now = time.perf_counter()
    stats[name] += now - since
    return now
