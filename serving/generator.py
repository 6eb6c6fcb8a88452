"""The generator replicas of the Serve app (:mod:`serving.app`): each holds the model and renders.

txt2img images join the replica's step loop (:mod:`serving.stepping`, ``batching.mode: step``):
each with its own adapters from the GPU adapter slots, joining at the next denoising step.
img2img and what the slots cannot hold are batched by adapter set (``@serve.batch``; Serve's
multiplexing by adapter set) and rendered with the set fused into the weights. Every request
carries a :class:`Ticket`: its rendering stops at the next denoising step once its client is
gone or its deadline has passed.
"""


# No `from __future__ import annotations`: Serve wraps these methods (as in serving/app.py).
import asyncio
import base64
import contextlib
import logging
import threading
import time
import uuid

from ray import serve

from rayimg.config import ServeJob
from rayimg.storage import Storage, join
from serving.errors import ApiError
from serving.image_cache import ImageStore
from serving.schema import adapter_set_id, parse_adapter_set_id

logger = logging.getLogger("ray.serve")


class AdapterSet:
    """The adapters of one multiplexed set, on the engine's device."""

    def __init__(self, set_id: str, weights: dict, tiers: dict, seconds: float):
        self.set_id = set_id
        self.weights = weights  # (name, version) -> LoraWeights on the device
        self.tiers = tiers  # "name@version" -> tier it came from: storage, disk, cpu or device
        self.seconds = seconds
        self.uses = 0


class RequestCancelled(Exception):
    """Raised between denoising steps when no one waits for a batch's images any more."""


class Ticket:
    """One request's claim on the engine: done once its client is gone (the request task was
    cancelled) or its deadline (unix time, set by the ingress) has passed."""

    def __init__(self, deadline: float | None):
        self.deadline = deadline
        self.cancelled = threading.Event()

    def done(self) -> bool:
        return self.cancelled.is_set() or (self.deadline is not None and time.time() > self.deadline)


def stop_when_done(tickets: list, steps: int):
    """The engine's ``while_busy`` work for one pipeline call: one part per denoising step, each
    raising :class:`RequestCancelled` once every ticket is done, so abandoned work stops at the
    next step boundary. It has exactly ``steps`` parts (the steps the call runs), so nothing is
    left to run after the call."""
    for _ in range(steps):
        if all(t.done() for t in tickets):
            raise RequestCancelled
        yield


def denoising_steps(request) -> int:
    """The denoising steps one pipeline call of ``request`` runs (img2img skips the first part of
    the schedule, as diffusers' img2img pipelines do)."""
    if request.mode == "img2img":
        return min(int(request.steps * request.strength), request.steps)
    return request.steps


def slot_config(b, unet_targets=None):
    """The step loop's AdapterSlots layout for a ``batching`` section ``b``: its sizes, and slots on
    the UNet modules named ``unet_targets`` (default: every module type adapters may target); the
    slots take a UNet call's samples padding included (``max_batch`` padded up to a ``pad_to``
    size)."""
    from rayimg.render.multi_lora import SlotConfig
    from rayimg.render.stepper import padded_size

    targets = {"unet_targets": tuple(unet_targets)} if unet_targets else {}
    return SlotConfig(num_slots=b.num_slots, max_rank=b.max_rank, max_batch=padded_size(b.max_batch, b.pad_to), max_adapters=b.max_adapters,
                      **targets)


def slot_targets(job: ServeJob, storage: Storage) -> list[str] | None:
    """The UNet modules a replica gives adapter slots: ``batching.slot_targets``, else what the
    registry's adapters record (None: every module type)."""
    from rayimg.registry import recorded_targets

    return job.batching.slot_targets or recorded_targets(storage, job.registry)


def default_compile_cache(job: ServeJob) -> str:
    """Where replicas share compiled graphs when ``engine.compile_cache`` is empty: beside the image
    cache (storage every replica can write), so an added or restarted replica starts warm."""
    return join(job.image_cache.uri, ".compile-cache")


class GeneratorBase:
    """Holds the model; renders batches of compatible requests. Subclassed by
    :func:`generator_deployment` to add the multiplexed ``adapter_set`` loader (its bound comes
    from config)."""

    def __init__(self, job: ServeJob, renderer_factory=None):
        from rayimg.registry import AdapterStore
        from rayimg.render.renderer import Renderer

        self.job = job
        self.storage = Storage(job.storage)
        self.store = AdapterStore(self.storage, job.registry, job.adapter_cache)
        if renderer_factory is not None:  # benchmarks: e.g. random-init real-size weights built on the GPU
            self.renderer = renderer_factory(job, self.store)
        else:
            self.renderer = Renderer(job.model, job.engine, self.storage, adapter_store=self.store,
                                     compile_cache=default_compile_cache(job))
        self.store.unet_config = self.renderer.pipe.unet.config
        self.images = ImageStore(self.storage, job.image_cache.uri)
        self.device = self.renderer.engine.device
        self.render_lock = threading.Lock()  # one engine: sub-batches of different sets (and steps) take turns
        self.slots = self.step_loop = None
        if job.batching.mode == "step":
            self._start_step_loop()
        try:
            self.replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # outside Serve (never in the app)
            self.replica = uuid.uuid4().hex[:8]
        self.counters = {"seq": 0, "images_rendered": 0, "image_cache_hits": 0, "batches": 0, "batched_images": 0,
                         "swaps": 0, "swap_seconds": 0.0, "set_loads": 0, "cancelled": 0, "image_cache_rejected": 0}
        self.render_batch.set_max_batch_size(job.http.max_batch_size)
        self.render_batch.set_batch_wait_timeout_s(job.http.batch_wait_timeout_s)

    def _start_step_loop(self) -> None:
        """Per-sample adapter slots on the pipeline and the step loop over them (see serving.stepping).
        With a compiled UNet or VAE decoder and ``batching.warm_up``, the loop's graphs at the
        default size and guidance are made first, so no request waits on a compile."""
        from rayimg.render.multi_lora import AdapterSlots
        from rayimg.render.slot_adapters import SlotAdapters
        from rayimg.render.stepper import StepBatcher
        from serving.stepping import StepLoop

        b = self.job.batching
        self.slots = AdapterSlots(self.renderer.pipe, slot_config(b, slot_targets(self.job, self.storage)))
        logger.info("rayimg step loop: adapter slots on the UNet's %s modules (%d modules, %.0f MiB a slot)",
                    ", ".join(self.slots.config.unet_targets), self.slots.num_modules, self.slots.row_nbytes / 2**20)
        batcher = StepBatcher(self.renderer.engine, max_batch=b.max_batch, pad_to=tuple(b.pad_to), adapters=SlotAdapters(self.slots),
                              compile_cache=self.renderer.compile_cache, shared_graph=b.shared_graph, fuse_alone=b.fuse_alone)
        compiled = self.renderer.engine.config.compile or self.renderer.engine.config.compile_vae
        d = self.job.defaults

        def warm_up() -> None:
            warmed = batcher.warm_up(d.width, d.height, guidance=d.guidance_scale > 1, log=lambda line: logger.info("rayimg step loop: %s", line))
            logger.info("rayimg step loop: warmed up UNet batches %s%s at %dx%d (guidance %s) in %.1f s",
                        warmed["unet_batches"], " and the decode" if warmed["decode"] else "", d.width, d.height,
                        "on" if warmed["guidance"] else "off", warmed["seconds"])

        # warmed on the loop's own thread, where the steps record their CUDA graphs
        self.step_loop = StepLoop(batcher, self.render_lock, first=warm_up if b.warm_up and compiled else None)

    @contextlib.contextmanager
    def _fused_path(self):
        """The engine's own (fused-adapter) path: slotted modules compute their base output only."""
        if self.slots is None:
            yield
            return
        self.slots.set_passthrough(True)
        try:
            yield
        finally:
            self.slots.set_passthrough(False)

    def _steppable(self, request, aset: "AdapterSet | None") -> bool:
        """Whether ``request`` can join the step loop: txt2img with adapters the slots can hold (rank,
        and slots on every module they adapt)."""
        if self.step_loop is None or request.mode != "txt2img" or len(request.adapters) > self.job.batching.max_adapters:
            return False
        if aset is None:
            return not request.adapters
        return all(self.slots.holds(w) for w in aset.weights.values())

    async def _render_step(self, request, aset: "AdapterSet | None", ticket: Ticket) -> "dict | ApiError":
        """One image through the step loop: it joins the running batch at the next step."""
        from rayimg.render.adapters import LoraError

        pairs = [(aset.weights[(name, version)], scale) for name, version, scale in request.adapters] if request.adapters else []
        start = time.perf_counter()
        try:
            slot = await self.step_loop.render(request, cancelled=ticket.done, adapters=pairs)
        except TimeoutError:
            return self._cancelled(count=False)  # the step loop counted it
        except LoraError as e:
            return ApiError(422, "adapter_incompatible", str(e), field="adapters")
        engine_s = time.perf_counter() - start
        self.counters["images_rendered"] += 1
        start = time.perf_counter()
        png = await asyncio.to_thread(self._png, request, slot.image)
        timings = {**slot.timings, "png_s": round(time.perf_counter() - start, 4)}
        return {"png": png, "batch_size": round(slot.batched / max(slot.step, 1), 2), "swap_s": round(slot.swap_s, 4), "engine_s": engine_s, "timings": timings}

    def model_identity(self) -> dict:
        """What adapters are checked against: the model's family, id and content hash."""
        return {"family": self.renderer.family, "model_id": self.renderer.model_id, "model_hash": self.renderer.model_hash}

    # ------------------------------------------------------------------ adapters
    def _load_set(self, set_id: str) -> AdapterSet:
        start = time.perf_counter()
        weights, tiers = {}, {}
        from rayimg.registry import check_published

        for name, version in parse_adapter_set_id(set_id):
            # another model family or not a LoRA: AdapterIncompatible (a 422) before any weight loads
            check_published(self.storage, self.job.registry, name, version, family=self.renderer.family,
                            model_id=self.renderer.model_id, model_hash=self.renderer.model_hash,
                            metadata=self.store.metadata(name, version))
            _v, w, tier = self.store.get_on(name, version, self.device)
            self._check_fits(name, version, w)
            weights[(name, version)] = w
            tiers[f"{name}@{version}"] = tier
        self.counters["set_loads"] += 1
        return AdapterSet(set_id, weights, tiers, time.perf_counter() - start)

    def _check_fits(self, name: str, version: str, weights) -> None:
        """Every layer of the adapter has a module of its shape in this model (an adapter of the
        same family but another architecture fails here, when its set loads, not mid-batch)."""
        from rayimg.registry import AdapterIncompatible
        from rayimg.render.adapters import LoraError

        fused = self.renderer.engine.fused
        base = (self.store.metadata(name, version).get("base_model") or {})
        trained_on = f"trained on {base.get('id')!r}" if isinstance(base, dict) and base.get("id") else "trained on an unrecorded model"
        for component, path, layer in weights.items():
            try:
                target = fused._target(component, path, f"{name}@{version}")
            except LoraError as e:
                raise AdapterIncompatible(f"adapter {name!r} version {version!r} ({trained_on}) does not fit this server's model "
                                          f"{self.renderer.model_id!r}: {e}") from None
            if layer.up.shape[0] != target.shape[0] or layer.down[0].numel() != target.shape[1:].numel():
                raise AdapterIncompatible(
                    f"adapter {name!r} version {version!r} ({trained_on}) does not fit this server's model {self.renderer.model_id!r}: "
                    f"{component}.{path} has weight {tuple(target.shape)}, the LoRA is up {tuple(layer.up.shape)} @ down {tuple(layer.down.shape)}")

    async def adapter_set(self, set_id: str) -> AdapterSet:  # replaced by the multiplexed loader
        raise NotImplementedError

    # ------------------------------------------------------------------ requests
    async def generate(self, payload: dict) -> dict:
        """One request: ``payload`` holds the checked settings with resolved adapter versions.
        Returns ``{"images": [...], ...}`` (an image's ``b64_json``: base64 ``bytes``, which
        :func:`serving.jsonbody.json_bytes` writes as a JSON string) or
        ``{"error": ApiError.as_dict()}``."""
        ticket = Ticket(payload.get("deadline"))
        try:
            return await self._generate(payload, ticket)
        except ApiError as e:
            return {"error": e.as_dict(), "stats": self.snapshot()}
        except asyncio.CancelledError:  # the client went away or the ingress gave up: stop its work
            ticket.cancelled.set()
            raise

    async def _generate(self, payload: dict, ticket: Ticket) -> dict:
        from rayimg.registry import AdapterCorrupt, AdapterIncompatible, AdapterNotFound
        from rayimg.render.adapters import LoraError
        from rayimg.render.request import GenerationRequest

        started = time.perf_counter()
        s = payload["settings"]
        try:
            requests = [GenerationRequest(
                prompt=s["prompt"], negative_prompt=s["negative_prompt"], steps=s["steps"], guidance_scale=s["guidance_scale"],
                width=s["width"], height=s["height"], scheduler=s["scheduler"], seed=s["seed"] + i, mode=s["mode"],
                init_image=s.get("init_image"), strength=s.get("strength", 0.8),
                adapters=[(a["name"], a["version"], a["scale"]) for a in s["adapters"]]) for i in range(s["num_images"])]
        except ValueError as e:  # the ingress checked everything; this names what it missed
            field, _, message = str(e).partition(": ")
            raise ApiError(422, "invalid_request", str(e), field=field if message else None) from None
        keys = [self.renderer.key(r) for r in requests]
        out: list[dict | None] = [None] * len(requests)
        want_uri = payload["response_format"] == "uri"
        if self.job.image_cache.enabled:
            cached = await asyncio.gather(*(asyncio.to_thread(self.images.get, k) for k in keys))
            for i, png in enumerate(cached):
                if png is not None:
                    out[i] = {"png": png, "cached": True}
                    self.counters["image_cache_hits"] += 1
        todo = [i for i in range(len(requests)) if out[i] is None]
        info = {"adapter_tiers": {}, "adapter_load_s": 0.0, "batch_sizes": [], "swap_s": 0.0, "engine_s": 0.0}
        if todo:
            set_id = adapter_set_id(s["adapters"])
            aset = None
            if set_id:
                try:
                    aset = await self.adapter_set(set_id)
                except AdapterNotFound as e:
                    raise ApiError(404, "adapter_not_found", str(e)) from None
                except AdapterCorrupt as e:
                    raise ApiError(422, "adapter_corrupt", str(e), field="adapters") from None
                except (LoraError, AdapterIncompatible) as e:
                    raise ApiError(422, "adapter_incompatible", str(e), field="adapters") from None
                first_use = aset.uses == 0
                aset.uses += 1
                info["adapter_tiers"] = aset.tiers if first_use else {k: "resident" for k in aset.tiers}
                info["adapter_load_s"] = aset.seconds if first_use else 0.0
            results = await asyncio.gather(*(self._render_step(requests[i], aset, ticket) if self._steppable(requests[i], aset)
                                             else self.render_batch((requests[i], aset, ticket)) for i in todo))
            for i, r in zip(todo, results):
                if isinstance(r, ApiError):
                    raise r
                out[i] = {"png": r["png"], "cached": False}
                info["batch_sizes"].append(r["batch_size"])
                info["swap_s"] = max(info["swap_s"], r["swap_s"])
                info["engine_s"] = max(info["engine_s"], r["engine_s"])
                if r.get("timings"):  # the step loop's split of each image's time (StepBatcher.timings, png_s)
                    info.setdefault("images", []).append(r["timings"])
            if self.job.image_cache.enabled or want_uri:
                await asyncio.gather(*(asyncio.to_thread(self.images.put, keys[i], out[i]["png"]) for i in todo))
        images = []
        for i, (request, key, item) in enumerate(zip(requests, keys, out)):
            image = {"key": key, "seed": request.seed, "cached": item["cached"]}
            if want_uri:
                if item["cached"] or i in todo:
                    image["uri"] = self.images.uri_of(key)
            else:
                image["b64_json"] = base64.b64encode(item["png"])  # bytes: the ingress writes them into its JSON body as they are
            images.append(image)
        info["generator_s"] = time.perf_counter() - started
        return {"images": images, "model": self.renderer.model_id, "replica": self.replica, "timings": info, "stats": self.snapshot()}

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.05)
    async def render_batch(self, items: list) -> list:
        """One engine pass per group of compatible requests (one adapter set per batch: Serve
        splits batches by multiplexed model id)."""
        return await asyncio.to_thread(self._render_items, items)

    def _render_items(self, items: list) -> list:
        from rayimg.render.adapters import LoraError

        groups: dict = {}
        for i, (request, aset, ticket) in enumerate(items):
            groups.setdefault(request.batch_key(), []).append(i)
        results: list = [None] * len(items)
        for indices in groups.values():
            gone = [i for i in indices if items[i][2].done()]
            for i in gone:  # never started: no one waits for it
                results[i] = self._cancelled()
            indices = [i for i in indices if i not in gone]
            if not indices:
                continue
            requests = [items[i][0] for i in indices]
            tickets = [items[i][2] for i in indices]
            aset = items[indices[0]][1]
            try:
                with self.render_lock, self._fused_path():
                    swap_s = self._use_adapters(requests[0].adapters, aset)
                    start = time.perf_counter()
                    images = self._run_engine(requests, tickets)
                    if self.device.type == "cuda":
                        import torch

                        torch.cuda.synchronize()
                    engine_s = time.perf_counter() - start
            except LoraError as e:
                for i in indices:
                    results[i] = ApiError(422, "adapter_incompatible", str(e), field="adapters")
                continue
            rendered = [(i, request, image) for i, request, image in zip(indices, requests, images) if image is not None]
            for i, image in zip(indices, images):
                if image is None:
                    results[i] = self._cancelled()
            if not rendered:
                continue
            self.counters["batches"] += 1
            self.counters["batched_images"] += len(rendered)
            self.counters["images_rendered"] += len(rendered)
            for i, request, image in rendered:
                results[i] = {"png": self._png(request, image), "batch_size": len(rendered), "swap_s": swap_s, "engine_s": engine_s}
        return results

    def _run_engine(self, requests: list, tickets: list) -> list:
        """The images of ``requests`` (None for those cancelled). The engine stops a pipeline call
        at the next step boundary once every request in it is abandoned (client gone or deadline
        passed). Batch-invariant engines render one request per call anyway: each call then
        stops for its own request."""
        engine = self.renderer.engine
        calls = [[i] for i in range(len(requests))] if engine.batch_invariant else [list(range(len(requests)))]
        images: list = [None] * len(requests)
        for call in calls:
            batch, waiting = [requests[i] for i in call], [tickets[i] for i in call]
            if all(t.done() for t in waiting):
                continue
            try:
                out = engine.generate(batch, while_busy=stop_when_done(waiting, denoising_steps(batch[0])))
            except RequestCancelled:
                continue
            for i, image in zip(call, out):
                images[i] = image
        return images

    def _cancelled(self, count: bool = True) -> ApiError:
        if count:
            self.counters["cancelled"] += 1
        return ApiError(504, "timeout", "the request was cancelled (its client left or its deadline passed)")

    def _png(self, request, image) -> bytes:
        """PNG with the same metadata the render job writes (Renderer.render)."""
        from rayimg.render.output import png_bytes

        key = self.renderer.key(request)
        return png_bytes(image, {"rayimg:key": key, "rayimg:model": self.renderer.model_id, "parameters": request.params()},
                         self.renderer.png_compress_level)

    def _use_adapters(self, identity: tuple, aset: AdapterSet | None) -> float:
        """Fuse the adapter set (device-resident weights) at the requested scales."""
        engine = self.renderer.engine
        if tuple(identity) == engine.adapter_identity:
            return 0.0
        start = time.perf_counter()
        pairs = [(aset.weights[(name, version)], scale) for name, version, scale in identity]
        engine.set_adapters(pairs, identity)
        seconds = time.perf_counter() - start
        self.counters["swaps"] += 1
        self.counters["swap_seconds"] += seconds
        return seconds

    def snapshot(self) -> dict:
        """Counters for the ingress's /metrics, numbered so the newest wins."""
        self.counters["seq"] += 1
        self.counters["image_cache_rejected"] = self.images.rejected
        steps = dict(self.step_loop.stats) if self.step_loop is not None else {}
        counters = {**self.counters, "cancelled": self.counters["cancelled"] + steps.get("cancelled", 0),
                    "swaps": self.counters["swaps"] + steps.get("swaps", 0),
                    "swap_seconds": self.counters["swap_seconds"] + steps.get("swap_s", 0.0)}
        return {"replica": self.replica, "store": self.store.stats.as_dict(), "tiers": self.store.tier_sizes(), "step_loop": steps, **counters}


def generator_deployment(job: ServeJob):
    """The Generator deployment of ``job``: resources, autoscaling and queue bounds from config."""

    class Generator(GeneratorBase):
        @serve.multiplexed(max_num_models_per_replica=job.adapter_cache.gpu_max_adapters)
        async def adapter_set(self, set_id: str) -> AdapterSet:
            return await asyncio.to_thread(self._load_set, set_id)

    Generator.__qualname__ = Generator.__name__ = "Generator"
    return serve.deployment(Generator, **generator_options(job))


def generator_options(job: ServeJob) -> dict:
    """``serve.deployment`` options of the generator (also what serving/config.yaml spells out)."""
    a = job.autoscaling
    actor = {"num_cpus": job.num_cpus_per_replica}
    if job.num_gpus_per_replica:
        actor["num_gpus"] = job.num_gpus_per_replica
    return {
        "name": "Generator",
        "ray_actor_options": actor,
        "max_ongoing_requests": job.http.max_ongoing_requests,
        "max_queued_requests": job.http.max_queued_requests,
        # Serve counts a replica's ongoing requests plus those queued for it at the ingress
        "autoscaling_config": {"min_replicas": a.min_replicas, "max_replicas": a.max_replicas,
                               "initial_replicas": max(a.min_replicas, 1) if a.min_replicas == 0 else a.min_replicas,
                               "target_ongoing_requests": job.autoscaling_target(),
                               "upscale_delay_s": a.upscale_delay_s, "downscale_delay_s": a.downscale_delay_s,
                               "look_back_period_s": a.look_back_period_s},
        # adapter affinity that gives way to load, instead of Serve's pinning multiplexed routing
        "request_router_config": {"request_router_class": "serving.routing:AdapterAffinityRouter",
                                  "request_router_kwargs": {"affinity_slack": job.routing.affinity_slack}},
        # Loading a real-size model takes a while; do not count it as a failed health check.
        "health_check_timeout_s": 120.0,
    }
