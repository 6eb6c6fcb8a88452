"""The Ray Serve application: a FastAPI ingress in front of generator replicas.

    HTTP -> Ingress (FastAPI; auth, body checks, limits, adapters resolved and checked, deadline)
         -> Generator (serving/generator.py: model + engine; a step loop with per-sample adapters,
            the fused path batched by adapter set; autoscaled)

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
of the AdapterStore tiers storage -> disk -> CPU -> device. txt2img images join the replica's
step loop (any adapters, any steps); img2img requests are batched by adapter set with
``@serve.batch`` (see :mod:`serving.generator`).

Three ways to run it:

- ``rayimg serve --config jobs/configs/serve.yaml`` (blocks until Ctrl-C);
- in-process: ``base_url = serving.app.start(job)`` (see :func:`start`);
- ``serve deploy serving/config.yaml`` on a running cluster (:func:`app_builder`).
"""


# No `from __future__ import annotations` here: Serve rewrites the ingress methods, and FastAPI
# could then no longer resolve string annotations (a body model would turn into a query param).
import asyncio
import hashlib
import hmac
import logging
import os
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
from serving.generator import generator_deployment
from serving.image_cache import ImageStore, is_key
from serving.jsonbody import JSONBody
from serving.metrics import CONTENT_TYPE, ServeMetrics
from serving.schema import GenerateBody, Img2ImgBody, adapter_set_id, settings_for

logger = logging.getLogger("ray.serve")

PAGE = Path(__file__).with_name("page.html")


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

    def documented(model, *statuses: int, timed: bool = True) -> dict:
        """FastAPI's dependencies and responses of a route: its errors, and its 200 (``model``, and with
        ``timed`` the Server-Timing header that routes answering through ``_measured`` send)."""
        responses = error_responses(*statuses, auth=auth)
        success = {"model": model} if model is not None else {}
        if timed:
            success["headers"] = {"Server-Timing": {"description": "the ingress's time on the request in ms, e.g. `ingress;dur=12.3`",
                                                    "schema": {"type": "string"}}}
        if success:
            responses[200] = {**success, "description": "success"}
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
                response = JSONBody(result)  # images' base64 bytes go into the body as they are
                # this replica's time on the request, its body encoded (the generator's is in the body's timings)
                response.headers["Server-Timing"] = f"ingress;dur={(time.perf_counter() - start) * 1000:.1f}"
                return response
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
                 **documented(None, 404, 500, timed=False), response_description="the PNG (image/png)")
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
