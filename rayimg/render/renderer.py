"""Load a base model once and turn generation requests into keyed PNGs (render job and server)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from rayimg.config import EngineConfig, ModelConfig
from rayimg.models.loader import load_model
from rayimg.render.engine import Engine, GenerationRequest
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
        self.engine = Engine.from_config(self.pipe, engine_cfg or EngineConfig())
        self.adapter_store = adapter_store

    def key(self, request: GenerationRequest) -> str:
        adapters = [{"name": n, "version": v, "scale": s} for n, v, s in request.adapters]
        return output_key(self.model_id, self.model_hash, adapters, request.params())

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
        self.use_adapters(requests[0].adapters)
        start = time.perf_counter()
        images = self.engine.generate(requests)
        seconds = (time.perf_counter() - start) / len(requests)
        out = []
        for request, image in zip(requests, images):
            key = self.key(request)
            meta = {"rayimg:key": key, "rayimg:model": self.model_id, "parameters": request.params()}
            out.append(RenderedImage(key=key, png=png_bytes(image, meta), params=request.params(), seconds=seconds))
        return out
