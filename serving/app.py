"""The Ray Serve application: a FastAPI ingress in front of multiplexed, batched generator replicas.

    HTTP -> Ingress (FastAPI; auth, body checks, limits, adapters resolved and checked, deadline)
         -> Generator (model + engine; multiplexed by adapter set, @serve.batch, autoscaled)

Routes: POST /v1/generate, POST /v1/img2img, POST /v1/images/generations (OpenAI) with
GET /v1/images/<key>.png, POST /sdapi/v1/txt2img (Automatic1111; both in :mod:`serving.compat`),
GET /v1/adapters, GET /healthz, GET /metrics, GET / (a small web page), GET /openapi.json (and
/docs). Every error is ``{"error": {...}}`` (:mod:`serving.errors`).

Each request carries a deadline; the generator stops its rendering at the next denoising step
once the deadline passes or the request is cancelled (its client left, or the ingress gave up),
through the engine's ``while_busy`` step hook. A replica that dies with a request makes it a 503
with ``Retry-After``.

The ingress routes each request with ``multiplexed_model_id`` = its adapter set
(``name@version,...``). :mod:`serving.routing` sends it to a replica that already holds those
adapters while that replica is at most ``routing.affinity_slack`` requests busier than the least
loaded one, else to the least loaded one, so a popular adapter spreads over replicas; replicas
autoscale on ongoing plus queued requests (``autoscaling.*``). A replica
keeps ``adapter_cache.gpu_max_adapters`` sets resident (Serve's LRU over ``adapter_set``) on top
of the AdapterStore tiers storage -> disk -> CPU -> device. Compatible requests (same adapter
set; then grouped by mode, size, steps, guidance and scheduler) are batched with
``@serve.batch``.

Three ways to run it:

- ``rayimg serve --config jobs/configs/serve.yaml`` (blocks until Ctrl-C);
- in-process: ``base_url = serving.app.start(job)`` (see :func:`start`);
- ``serve deploy serving/config.yaml`` on a running cluster (:func:`app_builder`).
"""


# No `from __future__ import annotations` here: Serve rewrites the ingress methods, and FastAPI
# could then no longer resolve string annotations (a body model would turn into a query param).
import asyncio
import base64
import contextlib
import hashlib
import hmac
import logging
import os
import threading
import time
import uuid
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from rayimg.config import ConfigError, ServeJob, absolute_paths, load_job
from rayimg.storage import Storage
from serving.errors import ApiError, error_responses
from serving.image_cache import ImageStore, is_key
from serving.metrics import CONTENT_TYPE, ServeMetrics
from serving.schema import GenerateBody, Img2ImgBody, adapter_set_id, parse_adapter_set_id, settings_for

logger = logging.getLogger("ray.serve")

PAGE = Path(__file__).with_name("page.html")


# --------------------------------------------------------------------------- generator replicas
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
            self.renderer = Renderer(job.model, job.engine, self.storage, adapter_store=self.store)
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
        """Per-sample adapter slots on the pipeline and the step loop over them (see serving.stepping)."""
        from rayimg.render.multi_lora import AdapterSlots, SlotConfig
        from rayimg.render.stepper import SlotAdapters, StepBatcher
        from serving.stepping import StepLoop

        b = self.job.batching
        self.slots = AdapterSlots(self.renderer.pipe, SlotConfig(num_slots=b.num_slots, max_rank=b.max_rank, max_batch=b.max_batch,
                                                                 max_adapters=b.max_adapters))
        batcher = StepBatcher(self.renderer.engine, max_batch=b.max_batch, pad_to=tuple(b.pad_to), adapters=SlotAdapters(self.slots),
                              compile_cache=self.renderer.compile_cache)
        self.step_loop = StepLoop(batcher, self.render_lock)

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
        """Whether ``request`` can join the step loop: txt2img with adapters the slots can hold."""
        if self.step_loop is None or request.mode != "txt2img" or len(request.adapters) > self.job.batching.max_adapters:
            return False
        if aset is None:
            return not request.adapters
        return all(layer.rank <= self.job.batching.max_rank for w in aset.weights.values() for _, _, layer in w.items())

    async def _render_step(self, request, aset: "AdapterSet | None", ticket: Ticket) -> "dict | ApiError":
        """One image through the step loop: it joins the running batch at the next step."""
        from rayimg.render.adapters import LoraError

        pairs = [(aset.weights[(name, version)], scale) for name, version, scale in request.adapters] if request.adapters else []
        start = time.perf_counter()
        try:
            slot = await self.step_loop.render(request, cancelled=ticket.done, adapters=pairs)
        except TimeoutError:  # counted by the step loop
            return ApiError(504, "timeout", "the request was cancelled (its client left or its deadline passed)")
        except LoraError as e:
            return ApiError(422, "adapter_incompatible", str(e), field="adapters")
        engine_s = time.perf_counter() - start
        self.counters["images_rendered"] += 1
        png = await asyncio.to_thread(self._png, request, slot.image)
        return {"png": png, "batch_size": round(slot.batched / max(slot.step, 1), 2), "swap_s": 0.0, "engine_s": engine_s}

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
        Returns ``{"images": [...], ...}`` or ``{"error": ApiError.as_dict()}``."""
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
            if self.job.image_cache.enabled or want_uri:
                await asyncio.gather(*(asyncio.to_thread(self.images.put, keys[i], out[i]["png"]) for i in todo))
        images = []
        for i, (request, key, item) in enumerate(zip(requests, keys, out)):
            image = {"key": key, "seed": request.seed, "cached": item["cached"]}
            if want_uri:
                if item["cached"] or i in todo:
                    image["uri"] = self.images.uri_of(key)
            else:
                image["b64_json"] = base64.b64encode(item["png"]).decode("ascii")
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

    def _cancelled(self) -> ApiError:
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
        counters = {**self.counters, "cancelled": self.counters["cancelled"] + steps.get("cancelled", 0)}
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


# --------------------------------------------------------------------------- ingress
NOT_JSON = "send the body as a JSON object with 'Content-Type: application/json'"


def _build_fastapi(job: ServeJob):
    api = FastAPI(title="rayimg", version="1", docs_url="/docs", redoc_url=None, description=(
        "Text-to-image and image-to-image with LoRA adapters from a registry. Every error is "
        "`{\"error\": {\"code\", \"message\", \"field\"?}}`. Also speaks OpenAI's "
        "`POST /v1/images/generations` and Automatic1111's `POST /sdapi/v1/txt2img`, with the same checks, limits and errors."))

    def error_response(e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @api.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return error_response(e)

    @api.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        field = ".".join(loc) if loc else None
        message = f"{field}: {first.get('msg')}" if field else str(first.get("msg"))
        if first.get("type") == "json_invalid":
            field, message = None, f"the body is not valid JSON; {NOT_JSON}"
        elif not loc and first.get("type") in ("model_attributes_type", "dict_type", "missing", "model_type"):
            content_type = request.headers.get("content-type") or "none"
            field, message = None, f"the body is not a JSON object (Content-Type: {content_type}); {NOT_JSON}"
        return error_response(ApiError(422, "invalid_request", message, field=field))

    @api.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
        return error_response(ApiError(e.status_code, code, str(e.detail), headers=dict(e.headers or {})))

    @api.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        ref = uuid.uuid4().hex[:12]
        logger.exception("rayimg: internal error %s on %s", ref, request.url.path)
        return error_response(ApiError(500, "internal", f"internal error (reference {ref}; details are in the server log)"))

    return api


def _replica_lost(e: BaseException) -> bool:
    """Whether awaiting a generator call failed because its replica died or became unreachable."""
    from ray.exceptions import ActorUnavailableError, RayActorError
    from ray.serve.exceptions import DeploymentUnavailableError

    return isinstance(e, (RayActorError, ActorUnavailableError, DeploymentUnavailableError))


def ingress_deployment(job: ServeJob, api_key_sha256: str | None):
    from serving.compat import (
        A1111_FIELDS, OPENAI_FIELDS, A1111Txt2ImgBody, A1111Txt2ImgResponse, OpenAIImagesBody, OpenAIImagesResponse,
        a1111_answer, a1111_to_generate, openai_to_generate, rename_field,
    )
    from serving.schema import GenerateResponse

    api = _build_fastapi(job)
    auth = api_key_sha256 is not None
    dependencies = []
    if auth:  # only then does the OpenAPI document name a security scheme
        bearer = HTTPBearer(auto_error=False, description="the API key (the server sets http.api_key_env)")

        def authorize(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
            if credentials is None or credentials.scheme.lower() != "bearer":
                raise ApiError(401, "unauthorized", "send the API key as 'Authorization: Bearer <key>'", headers={"WWW-Authenticate": "Bearer"})
            given = hashlib.sha256(credentials.credentials.encode()).hexdigest()
            if not hmac.compare_digest(given, api_key_sha256):
                raise ApiError(401, "unauthorized", "the API key is not valid", headers={"WWW-Authenticate": "Bearer"})

        dependencies = [Depends(authorize)]

    def documented(model, *statuses: int) -> dict:
        responses = error_responses(*statuses, auth=auth)
        if model is not None:
            responses[200] = {"model": model, "description": "success"}
        return {"dependencies": dependencies, "responses": responses}

    generating = (404, 405, 422, 500, 503, 504)

    @serve.deployment(name="Ingress", ray_actor_options={"num_cpus": job.num_cpus_ingress}, max_ongoing_requests=1000,
                      num_replicas=1)
    @serve.ingress(api)
    class Ingress:
        def __init__(self, generator, job: ServeJob):
            from rayimg.registry import AdapterStore

            self.generator = generator
            self.job = job
            self.storage = Storage(job.storage)
            self.registry = AdapterStore(self.storage, job.registry, job.adapter_cache)  # resolves versions only
            self.images = ImageStore(self.storage, job.image_cache.uri)
            self.metrics = ServeMetrics()
            self.model: dict | None = None  # the generators' model identity, asked once
            self.checked: dict[tuple[str, str], tuple[ApiError | None, str | None]] = {}
            # init images decode in threads, a few at a time: big ones cannot starve the event loop or memory
            self.decoding = asyncio.Semaphore(2)

        # -------------------------------------------------------------- adapters
        async def _model_identity(self) -> dict:
            if self.model is None:
                self.model = await self._call(self.generator.model_identity.remote())
            return self.model

        async def _resolve(self, adapters: list[dict]) -> tuple[list[dict], list[str]]:
            """Versions resolved and each adapter checked against the model (family, method, a
            readable adapter.json): (adapters, warnings)."""
            from rayimg.registry import AdapterCorrupt, AdapterNotFound

            out, warnings = [], []
            for a in adapters:
                try:
                    version = await asyncio.to_thread(self.registry.resolve, a["name"], a["version"])
                except AdapterNotFound as e:
                    raise ApiError(404, "adapter_not_found", str(e)) from None
                except AdapterCorrupt as e:
                    raise ApiError(422, "adapter_corrupt", str(e), field="adapters") from None
                error, warning = await self._check(a["name"], version)
                if error is not None:
                    raise error
                if warning:
                    warnings.append(warning)
                out.append({"name": a["name"], "version": version, "scale": a["scale"]})
            return out, warnings

        async def _check(self, name: str, version: str) -> tuple[ApiError | None, str | None]:
            """check_published (as the render job runs it) once per published version."""
            from rayimg.registry import AdapterCorrupt, AdapterIncompatible, RegistryError, check_published

            key = (name, version)
            if key not in self.checked:
                model = await self._model_identity()

                def check():
                    return check_published(self.storage, self.job.registry, name, version, family=model["family"],
                                           model_id=model["model_id"], model_hash=model["model_hash"],
                                           metadata=self.registry.metadata(name, version))

                try:
                    self.checked[key] = (None, await asyncio.to_thread(check))
                except AdapterIncompatible as e:
                    self.checked[key] = (ApiError(422, "adapter_incompatible", str(e), field="adapters"), None)
                except (AdapterCorrupt, RegistryError) as e:
                    self.checked[key] = (ApiError(422, "adapter_corrupt", str(e), field="adapters"), None)
            return self.checked[key]

        # -------------------------------------------------------------- generation
        async def _call(self, response):
            """Await a generator call; a replica that died with it is a retryable 503."""
            try:
                return await response
            except BaseException as e:
                if _replica_lost(e):
                    logger.warning("rayimg: a generator replica was lost with a request: %s", type(e).__name__)
                    raise ApiError(503, "unavailable", "the generator replica working on this request stopped; retry later",
                                   headers={"Retry-After": str(self.job.http.retry_after_s)}) from None
                raise

        async def _run(self, body) -> tuple[dict, dict]:
            """(settings used, the generator's answer) of a request body."""
            from ray.serve.exceptions import BackPressureError

            def settings():
                return settings_for(body, self.job.defaults, self.job.limits, max_timeout_s=self.job.http.request_timeout_s)

            if getattr(body, "init_image", None) is not None:
                async with self.decoding:
                    s = await asyncio.to_thread(settings)
            else:
                s = settings()
            s["adapters"], warnings = await self._resolve(s["adapters"])
            set_id = adapter_set_id(s["adapters"])
            timeout = min(body.timeout_s or self.job.http.request_timeout_s, self.job.http.request_timeout_s)
            # the replica stops the work at a step boundary once this deadline passes
            payload = {"settings": s, "response_format": body.response_format, "deadline": time.time() + timeout}
            response = self.generator.options(multiplexed_model_id=set_id).generate.remote(payload)
            try:
                result = await asyncio.wait_for(self._call(response), timeout=timeout)
            except BackPressureError:
                raise ApiError(503, "overloaded", "the server's queue is full; retry later",
                               headers={"Retry-After": str(self.job.http.retry_after_s)}) from None
            except asyncio.TimeoutError:
                response.cancel()
                raise ApiError(504, "timeout", f"the request took longer than {timeout:g} s") from None
            except asyncio.CancelledError:  # the client went away: the replica drops its work
                response.cancel()
                raise
            self.metrics.replicas.update(result.pop("stats", None))
            if "error" in result:
                raise ApiError.from_dict(result["error"])
            for image in result["images"]:
                self.metrics.images.labels("image_cache" if image["cached"] else "rendered").inc()
            result["adapters"] = s["adapters"]
            if warnings:
                result["warnings"] = warnings
            return s, result

        async def _measured(self, route: str, fn):
            self.metrics.in_flight.inc()
            start = time.perf_counter()
            status = 500
            try:
                result = await fn()
                status = 200
                return result
            except ApiError as e:
                status = e.status
                raise
            finally:
                self.metrics.in_flight.dec()
                self.metrics.requests.labels(route, str(status)).inc()
                self.metrics.latency.labels(route).observe(time.perf_counter() - start)

        async def _generate(self, body) -> dict:
            return (await self._run(body))[1]

        @api.post("/v1/generate", summary="Text to image", **documented(GenerateResponse, *generating))
        async def generate(self, body: GenerateBody):
            return await self._measured("/v1/generate", lambda: self._generate(body))

        @api.post("/v1/img2img", summary="Image to image", **documented(GenerateResponse, *generating))
        async def img2img(self, body: Img2ImgBody):
            return await self._measured("/v1/img2img", lambda: self._generate(body))

        # -------------------------------------------------------------- other APIs
        async def _openai(self, body, request: Request) -> dict:
            model = await self._model_identity()
            base_names = {self.job.model.pretrained, model["model_id"]}
            request_body = openai_to_generate(body, base_names)  # its errors name OpenAI's fields already
            try:
                _s, result = await self._run(request_body)
            except ApiError as e:
                raise rename_field(e, OPENAI_FIELDS) from None
            data = []
            for image in result["images"]:
                if body.response_format == "url":
                    data.append({"url": str(request.url_for("image_file", key=image["key"]))})
                else:
                    data.append({"b64_json": image["b64_json"]})
            return {"created": int(time.time()), "data": data}

        @api.post("/v1/images/generations", summary="Text to image, OpenAI's Images API", **documented(OpenAIImagesResponse, *generating))
        async def openai_images(self, body: OpenAIImagesBody, request: Request):
            return await self._measured("/v1/images/generations", lambda: self._openai(body, request))

        # the key is read from the request (not a typed parameter), so no 422 can come of it
        @api.get("/v1/images/{key}.png", summary="A generated image (the URLs /v1/images/generations answers with)",
                 response_class=Response, openapi_extra={"parameters": [
                     {"name": "key", "in": "path", "required": True, "schema": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                      "description": "the image's output key"}]},
                 **documented(None, 404, 500), response_description="the PNG (image/png)")
        async def image_file(self, request: Request):
            key = request.path_params["key"]
            if not is_key(key):
                raise ApiError(404, "not_found", f"no image {key!r}.png (images are /v1/images/<64 hex digits>.png)")
            png = await asyncio.to_thread(self.images.get, key)
            if png is None:
                raise ApiError(404, "not_found", f"no image {key}.png")
            return Response(png, media_type="image/png")

        async def _a1111(self, body) -> dict:
            request_body = a1111_to_generate(body)  # its errors name A1111's fields already
            try:
                s, result = await self._run(request_body)
            except ApiError as e:
                raise rename_field(e, A1111_FIELDS) from None
            return a1111_answer(body, s, result, result.get("model", ""))

        @api.post("/sdapi/v1/txt2img", summary="Text to image, Automatic1111's API (common subset)",
                  **documented(A1111Txt2ImgResponse, *generating))
        async def a1111_txt2img(self, body: A1111Txt2ImgBody):
            return await self._measured("/sdapi/v1/txt2img", lambda: self._a1111(body))

        # -------------------------------------------------------------- the rest
        @api.get("/v1/adapters", summary="Published adapters (entries that cannot be read are left out and logged)",
                 **documented(None, 500))
        async def adapters(self) -> dict:
            return await self._measured("/v1/adapters", lambda: asyncio.to_thread(self._list_adapters))

        def _list_adapters(self) -> dict:
            from rayimg.registry import RegistryError, list_adapters

            out = []
            for name, versions in list_adapters(self.storage, self.job.registry).items():
                try:
                    meta = self.registry.metadata(name, versions[-1])
                except RegistryError as e:
                    logger.warning("rayimg: GET /v1/adapters leaves out %s: %s", name, e)
                    continue
                base = meta.get("base_model") if isinstance(meta.get("base_model"), dict) else {}
                out.append({"name": name, "versions": versions, "latest": versions[-1], "method": meta.get("method"),
                            "rank": meta.get("rank"), "trigger_word": meta.get("trigger_word"),
                            "base_model": base.get("id"), "created": meta.get("created")})
            return {"adapters": out}

        @api.get("/healthz", summary="Liveness (does not wake generator replicas)")
        async def healthz(self) -> dict:
            return {"status": "ok", "model": self.job.model.pretrained, "registry": self.job.registry}

        @api.get("/metrics", summary="Prometheus metrics", response_class=Response)
        async def metrics(self) -> Response:
            return Response(self.metrics.text(), media_type=CONTENT_TYPE)

        @api.get("/", summary="Web page", response_class=HTMLResponse, include_in_schema=False)
        async def page(self) -> HTMLResponse:
            return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    return Ingress


# --------------------------------------------------------------------------- building and running
def _api_key_sha256(job: ServeJob) -> str | None:
    name = job.http.api_key_env
    if not name:
        return None
    key = os.environ.get(name)
    if not key:
        raise ConfigError("http.api_key_env", f"names {name}, but that environment variable is not set (unset api_key_env to disable auth)")
    return hashlib.sha256(key.encode()).hexdigest()


def build_app(job: ServeJob, renderer_factory=None):
    """The Serve application of ``job`` (not started). Paths in ``job`` are made absolute, and
    the API key (``http.api_key_env``) is read from this process's environment now: the
    replicas receive only its sha256. ``renderer_factory(job, adapter_store) -> Renderer``
    (benchmarks) replaces loading ``job.model`` in each generator replica."""
    job = absolute_paths(job)
    generator = generator_deployment(job).bind(job, renderer_factory)
    return ingress_deployment(job, _api_key_sha256(job)).bind(generator, job)


def app_builder(args: dict):
    """For ``serve deploy serving/config.yaml``: ``args`` = ``{"config": "jobs/configs/serve.yaml",
    "overrides": ["limits.max_steps=40", ...]}``; a relative config path is looked up in the
    working dir, then in the repo this module belongs to."""
    config = args.get("config")
    if config and "://" not in config and not Path(config).is_absolute() and not Path(config).exists():
        config = str(Path(__file__).resolve().parents[1] / config)  # relative to the repo the app is installed from
    job = load_job("serve", config, list(args.get("overrides") or []))
    return build_app(job)


def start(job: ServeJob, renderer_factory=None) -> str:
    """Start the app in this process's Ray cluster and return its base URL once every replica
    has loaded the model.

    Connects to Ray as every job does (``cluster.address``, RAY_ADDRESS, or a local cluster
    started in-process), starts Serve's HTTP proxy on ``http.host:http.port`` (a proxy already
    running keeps its own host and port) and deploys the app as ``app_name`` at
    ``http.route_prefix``. Returns e.g. ``"http://127.0.0.1:8000"``; then
    ``POST {base_url}/v1/generate`` with ``{"prompt": "..."}``. The app serves until
    ``serve.delete(job.app_name)`` or ``serve.shutdown()``.
    """
    from rayimg.run.cluster import connect

    connect(job.cluster)
    serve.start(http_options={"host": job.http.host, "port": job.http.port})
    serve.run(build_app(job, renderer_factory), name=job.app_name, route_prefix=job.http.route_prefix, blocking=False)
    return base_url(job)


def base_url(job: ServeJob) -> str:
    """The URL the app answers at (the running proxy's host and port)."""
    host, port = job.http.host, job.http.port
    try:
        from ray.serve.context import _get_global_client

        options = _get_global_client().http_config
        host, port = options.host, options.port
    except Exception:
        pass
    host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return f"http://{host}:{port}{job.http.route_prefix.rstrip('/')}"


def run(job: ServeJob) -> None:
    """``rayimg serve``: start the app and serve until Ctrl-C."""
    print(f"[serve] starting {job.model.pretrained} with adapters from {job.registry}", flush=True)
    try:
        url = start(job)
        print(f"[serve] listening on {url}  (web page {url}/, API docs {url}/docs, metrics {url}/metrics); Ctrl-C stops", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("[serve] stopping", flush=True)
        serve.shutdown()
