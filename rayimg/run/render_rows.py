"""The render job's actor: holds the model and renders work units (``rayimg render``'s stage 2,
run by Ray Data's actor pool or as a kept actor, :mod:`rayimg.run.resident`)."""

from __future__ import annotations

import json
import time

from rayimg.config import RenderJob
from rayimg.run.manifest import manifest_row, write_errors, write_manifest_part
from rayimg.storage import Storage, join

__all__ = ["RenderRows", "shape_key"]


class RenderRows:
    """An actor holding the model; renders each batch grouped by batch key."""

    def __init__(self, job: RenderJob, progress=None, job_started: float | None = None, warm: tuple[int, int, float] | None = None):
        """``job_started``: the job's start (``time.time()``), for the start-up lines. ``warm``:
        ``(width, height, guidance_scale)`` of the engine batch to compile (or load from the
        compile cache) before the first unit comes, while the catalog is still being validated
        and sorted (:meth:`Renderer.warm_up`)."""
        entered = time.time()
        from rayimg.registry import AdapterStore
        from rayimg.render.renderer import Renderer

        imports_s = time.time() - entered
        self.job = job
        self.progress = progress  # a Progress actor handle, or None
        self.label = _actor_label()
        self.storage = Storage(job.storage)
        store = AdapterStore(self.storage, job.registry)
        self.renderer = Renderer(job.model, job.engine, self.storage, adapter_store=store, compile_cache=join(job.output.uri, ".compile-cache"))
        store.unet_config = self.renderer.pipe.unet.config
        startup = self.renderer.startup
        since = (f" (process up {entered - job_started:.1f}s and ready {time.time() - job_started:.1f}s after the job started)"
                 if job_started else "")
        print(f"[render actor {self.label}] imports {imports_s:.1f}s, model loaded in {startup['model_load_s']:.1f}s, engine set up in "
              f"{startup['engine_setup_s']:.1f}s{since}", flush=True)
        self._cache_events_sent = 0
        self._started_units = False
        self.warmed: set[tuple] = set()  # shapes warmed up (or tried)
        if warm is not None:
            self.warm_up(warm, job_started)

    def warm_up(self, warm: tuple[int, int, float], job_started: float | None = None) -> None:
        """Compile (or load) the graphs of one engine batch of shape ``warm``; a failure is a
        warning (the first unit compiles what it needs)."""
        self.warmed.add(shape_key(*warm))
        try:
            seconds = self.renderer.warm_up(*warm)
        except Exception as e:  # noqa: BLE001 - the first unit compiles what it needs, as without a warm-up
            seconds = None
            print(f"[render actor {self.label}] WARNING: warm-up of {warm[0]}x{warm[1]} failed ({type(e).__name__}: {e}); "
                  "the first unit compiles its shapes", flush=True)
        if seconds is not None:
            since = f" (ready {time.time() - job_started:.1f}s after the job started)" if job_started else ""
            actions = [e["action"] for e in self.renderer.compile_cache_status]
            cache = f"; compile cache: {', '.join(actions)}" if actions else ""
            print(f"[render actor {self.label}] warmed up {warm[0]}x{warm[1]} in {seconds:.1f}s{cache}{since}", flush=True)
            self._report_cache()
            if self.progress is not None:
                try:
                    self.progress.warmed_up.remote(self.label, list(warm), seconds)
                except Exception:
                    pass

    def __call__(self, batch: dict) -> dict:
        from rayimg.render.engine import GenerationRequest

        if not self._started_units and self.progress is not None:
            self._started_units = True
            try:  # a unit exists only once the catalog is validated and sorted: the total is final
                self.progress.units_started.remote()
            except Exception:
                pass
        rows = [(str(r), json.loads(s)) for r, s in zip(batch["row_id"], batch["settings"])]
        groups: dict[tuple, list] = {}
        for rid, s in rows:
            req = GenerationRequest(prompt=s["prompt"], negative_prompt=s["negative_prompt"], steps=s["steps"],
                                    guidance_scale=s["guidance_scale"], width=s["width"], height=s["height"],
                                    scheduler=s["scheduler"], seed=s["seed"], adapters=tuple(tuple(a) for a in s["adapters"]))
            groups.setdefault(req.batch_key(), []).append((rid, req))
            self.warmed.add(shape_key(req.width, req.height, req.guidance_scale))
        manifest, out = [], {"row_id": [], "rendered": []}
        chunks, paths = [], {}
        n_skipped = 0
        bs = self.job.engine.batch_size
        for _key, items in sorted(groups.items(), key=lambda kv: repr(kv[0])):
            todo = []
            for rid, req in items:
                key = self.renderer.key(req)
                path = join(self.job.output.uri, "images", f"{key}.png")
                if self.storage.exists(path):  # written by an earlier (maybe killed) run or actor
                    manifest.append(manifest_row(rid, key, path, req, None))
                    out["row_id"].append(rid)
                    out["rendered"].append(False)
                    n_skipped += 1
                else:
                    todo.append(req)
                    paths[id(req)] = (rid, key, path)
            chunks += [todo[start:start + bs] for start in range(0, len(todo), bs)]

        def write(req, image):  # in the renderer's encoder thread, beside the next batch
            rid, key, path = paths[id(req)]
            assert image.key == key
            self.storage.write_bytes(path, image.png)
            return rid, key, path, req, time.time()

        if n_skipped:
            self._report(0, n_skipped)
        # one stream over every group: the next group's adapters load while this one renders.
        # An adapter that fails to load (despite validation: e.g. corrupt weights) sends the rows
        # naming it to errors/ and the stream goes on with the other groups.
        from rayimg.registry import AdapterCorrupt, RegistryError
        from rayimg.render.adapters import LoraError

        while chunks:
            done = 0
            try:
                for results in self.renderer.render_stream(chunks, sink=write):
                    done += 1
                    for image, (rid, key, path, req, _) in results:
                        manifest.append(manifest_row(rid, key, path, req, image.seconds))
                        out["row_id"].append(rid)
                        out["rendered"].append(True)
                    # per engine batch, stamped when its PNGs were written (the stream hands a
                    # batch over only once the next one is queued, which can be a batch later)
                    self._report(len(results), 0, at=max(r[1][-1] for r in results))
                    self._report_cache()
                chunks = []
            except (LoraError, RegistryError, AdapterCorrupt) as e:  # raised by chunks[done]'s adapter swap
                failed = chunks[done][0].adapters
                settings = dict(rows)
                write_errors(self.storage, self.job.output.uri, [
                    {"row_id": paths[id(req)][0], "reason": f"adapter could not be loaded: {e}", "row": settings[paths[id(req)][0]]}
                    for chunk in chunks[done:] if chunk[0].adapters == failed for req in chunk])
                chunks = [chunk for chunk in chunks[done + 1:] if chunk[0].adapters != failed]
        if manifest:
            write_manifest_part(self.storage, self.job.output.uri, manifest)
        return out

    def _report_cache(self) -> None:
        """New compile-cache events (loaded / cold / saved / ignored) to the Progress actor."""
        events = self.renderer.compile_cache_status
        if self.progress is not None and len(events) > self._cache_events_sent:
            try:
                self.progress.cache_events.remote([e["action"] for e in events[self._cache_events_sent:]])
                self._cache_events_sent = len(events)
            except Exception:
                pass

    def _report(self, rendered: int, skipped: int, at: float | None = None) -> None:
        if self.progress is not None:
            try:
                self.progress.report.remote(self.label, rendered, skipped, at)  # fire and forget
            except Exception:  # progress is advisory: never fail a unit over it
                pass


def shape_key(width: int, height: int, guidance_scale: float) -> tuple[int, int, bool]:
    """What decides the graphs a txt2img batch compiles: its size and whether it uses CFG."""
    return int(width), int(height), guidance_scale > 1


def _actor_label() -> str:
    """A short, restart-stable name for the current render actor (its actor id)."""
    try:
        import ray

        aid = ray.get_runtime_context().get_actor_id()
        return aid[:8] if aid else "local"
    except Exception:
        return "local"
