"""The Serve app over real HTTP: a real Ray Serve deployment of the tiny model, adapters from a
registry on the loopback S3 server, the image cache in S3, errors, limits, auth and backpressure.

Two apps are started once per module: ``main`` (S3 registry, small cache bounds so evictions
happen, image cache on) and ``tight`` (local registry, API key, one request at a time and a
queue of one, so backpressure is reachable).
"""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from rayimg.config import ServeJob, from_dict
from rayimg.storage import Storage

REPO = Path(__file__).resolve().parents[1]
API_KEY_ENV = "RAYIMG_TEST_SERVE_KEY"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_job(registry: str, tmp: Path, **overrides) -> ServeJob:
    data = {
        "registry": registry,
        "model": {"device": "cpu"},
        "defaults": {"steps": 2, "width": 64, "height": 64, "guidance_scale": 3.0},
        "limits": {"max_width": 128, "max_height": 128, "max_steps": 40, "max_num_images": 3},
        "http": {"host": "127.0.0.1", "port": free_port(), "max_batch_size": 4, "batch_wait_timeout_s": 0.3,
                 "max_ongoing_requests": 8, "max_queued_requests": 16, "request_timeout_s": 60.0},
        "autoscaling": {"min_replicas": 1, "max_replicas": 1},
        "adapter_cache": {"disk_dir": str(tmp / "adapter-cache"), "disk_max_adapters": 3, "cpu_max_adapters": 2,
                          "gpu_max_adapters": 2, "refresh_s": 0.5},
        "num_cpus_per_replica": 0.5,
        "num_cpus_ingress": 0.1,
    }
    for key, value in overrides.items():
        if isinstance(value, dict):
            data.setdefault(key, {}).update(value)
        else:
            data[key] = value
    return from_dict(ServeJob, data)


@pytest.fixture(scope="module")
def bucket(s3_server):
    name = f"serve-{uuid.uuid4().hex[:10]}"
    Storage().s3.create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="module")
def s3_registry(bucket, publish_tiny_lora):
    registry = f"s3://{bucket}/registry"
    for i, name in enumerate(["style-a", "style-b", "style-c", "style-d", "shared-x", "shared-y", "tampered"]):
        publish_tiny_lora(registry, name, seed=10 + i)
    # Weights changed after publishing: the sha256 in adapter.json no longer matches.
    storage = Storage()
    weights = f"{registry}/adapters/tampered/1/pytorch_lora_weights.safetensors"
    data = bytearray(storage.read_bytes(weights))
    data[-1] ^= 0xFF
    storage.write_bytes(weights, bytes(data))
    return registry


@pytest.fixture(scope="module")
def main_app(ray_cluster, s3_registry, bucket, tmp_path_factory):
    from ray import serve

    from serving.app import start

    job = serve_job(s3_registry, tmp_path_factory.mktemp("serve-main"), app_name="main",
                    image_cache={"enabled": True, "uri": f"s3://{bucket}/image-cache"})
    url = start(job)
    yield url
    serve.delete("main")


@pytest.fixture(scope="module")
def tight_app(main_app, publish_tiny_lora, tmp_path_factory, monkeypatch_module):
    from ray import serve

    from serving.app import start

    tmp = tmp_path_factory.mktemp("serve-tight")
    registry = str(tmp / "registry")
    publish_tiny_lora(registry, "local-a", seed=99)
    monkeypatch_module.setenv(API_KEY_ENV, "s3cret-key")
    job = serve_job(registry, tmp, app_name="tight", http={"route_prefix": "/tight", "api_key_env": API_KEY_ENV,
                                                           "max_batch_size": 1, "max_ongoing_requests": 1,
                                                           "max_queued_requests": 1, "retry_after_s": 7})
    url = start(job)
    yield url
    serve.delete("tight")


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def post(url: str, body, **kw) -> requests.Response:
    return requests.post(url, json=body, timeout=120, **kw)


def png_of(image: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(image["b64_json"]))).convert("RGB"))


def metrics(url: str) -> dict:
    """{(name, labels...): value} of /metrics, summed over replicas."""
    text = requests.get(f"{url}/metrics", timeout=30).text
    out: dict = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, sample.labels.get("tier", ""), sample.labels.get("route", ""), sample.labels.get("status", ""))
            out[key] = out.get(key, 0.0) + sample.value
    return out


def m(snapshot: dict, name: str, tier: str = "") -> float:
    return snapshot.get((name, tier, "", ""), 0.0)


def assert_clean_error(r: requests.Response, status: int, code: str, field: str | None = None) -> dict:
    assert r.status_code == status, r.text
    assert "Traceback" not in r.text and 'File "' not in r.text
    error = r.json()["error"]
    assert error["code"] == code, error
    if field is not None:
        assert error.get("field") == field, error
    return error


# --------------------------------------------------------------------------- generation
def test_generate_without_adapters_and_image_cache(main_app, bucket):
    body = {"prompt": "a red circle", "seed": 3}
    first = post(f"{main_app}/v1/generate", body)
    assert first.status_code == 200, first.text
    reply = first.json()
    (image,) = reply["images"]
    assert reply["adapters"] == [] and image["seed"] == 3 and not image["cached"] and len(image["key"]) == 64
    pixels = png_of(image)
    assert pixels.shape == (64, 64, 3)
    # The same request again: the same key, answered from the image cache in storage.
    again = post(f"{main_app}/v1/generate", body).json()["images"][0]
    assert again["cached"] and again["key"] == image["key"] and again["b64_json"] == image["b64_json"]
    stored = Storage().read_bytes(f"s3://{bucket}/image-cache/{image['key']}.png")
    assert stored == base64.b64decode(image["b64_json"])
    assert json.loads(Image.open(io.BytesIO(stored)).text["parameters"])["seed"] == 3
    # num_images: consecutive seeds; storage URIs when asked.
    two = post(f"{main_app}/v1/generate", {"prompt": "a blue square", "seed": 5, "num_images": 2, "response_format": "uri"}).json()
    assert [i["seed"] for i in two["images"]] == [5, 6]
    for i in two["images"]:
        assert i["uri"] == f"s3://{bucket}/image-cache/{i['key']}.png" and Storage().exists(i["uri"]) and "b64_json" not in i


def test_generate_with_adapters(main_app):
    base = post(f"{main_app}/v1/generate", {"prompt": "a green star", "seed": 1}).json()["images"][0]
    styled = post(f"{main_app}/v1/generate", {"prompt": "a green star", "seed": 1, "adapters": [{"name": "style-a", "scale": 1.0}]})
    assert styled.status_code == 200, styled.text
    reply = styled.json()
    assert reply["adapters"] == [{"name": "style-a", "version": "1", "scale": 1.0}]
    zero = post(f"{main_app}/v1/generate", {"prompt": "a green star", "seed": 1, "adapters": [{"name": "style-a", "version": 1, "scale": 0.0}]}).json()
    assert not np.array_equal(png_of(base), png_of(reply["images"][0]))
    assert np.array_equal(png_of(base), png_of(zero["images"][0]))  # scale 0 is the base model
    assert len({base["key"], reply["images"][0]["key"], zero["images"][0]["key"]}) == 3


def test_three_adapters_from_s3_with_eviction(main_app):
    before = metrics(main_app)
    tiers = {}
    for name in ("style-b", "style-c", "style-d"):
        r = post(f"{main_app}/v1/generate", {"prompt": "a yellow circle", "seed": 2, "adapters": [{"name": name}]})
        assert r.status_code == 200, r.text
        tiers[name] = r.json()["timings"]["adapter_tiers"]
    assert tiers == {n: {f"{n}@1": "storage"} for n in ("style-b", "style-c", "style-d")}
    after = metrics(main_app)
    assert m(after, "rayimg_adapter_downloads_total") - m(before, "rayimg_adapter_downloads_total") == 3
    # cpu_max_adapters=2, disk_max_adapters=3: both tiers evicted and stay within their bounds.
    assert m(after, "rayimg_adapter_cache_evictions_total", "cpu") > m(before, "rayimg_adapter_cache_evictions_total", "cpu")
    assert m(after, "rayimg_adapter_cache_evictions_total", "disk") >= 1
    assert m(after, "rayimg_adapter_cache_adapters", "cpu") <= 2 and m(after, "rayimg_adapter_cache_adapters", "disk") <= 3
    # style-b left the resident sets (gpu_max_adapters=2) and the CPU tier: it comes back from disk.
    r = post(f"{main_app}/v1/generate", {"prompt": "a yellow circle", "seed": 4, "adapters": [{"name": "style-b"}]})
    assert r.json()["timings"]["adapter_tiers"] == {"style-b@1": "disk"}
    # ...and is resident for the next request.
    r = post(f"{main_app}/v1/generate", {"prompt": "a yellow circle", "seed": 5, "adapters": [{"name": "style-b", "scale": 0.5}]})
    assert r.json()["timings"]["adapter_tiers"] == {"style-b@1": "resident"}


def test_concurrent_requests_for_a_cold_adapter_download_it_once(main_app):
    before = metrics(main_app)
    bodies = [{"prompt": "a red square", "seed": 8, "adapters": [{"name": "shared-x"}]},
              {"prompt": "a red square", "seed": 9, "adapters": [{"name": "shared-x", "scale": 0.5}, {"name": "shared-y"}]}]
    with ThreadPoolExecutor(2) as pool:
        replies = list(pool.map(lambda b: post(f"{main_app}/v1/generate", b), bodies))
    assert [r.status_code for r in replies] == [200, 200], [r.text for r in replies]
    after = metrics(main_app)
    assert m(after, "rayimg_adapter_downloads_total") - m(before, "rayimg_adapter_downloads_total") == 2  # shared-x once, shared-y once
    sources = [r.json()["timings"]["adapter_tiers"]["shared-x@1"] for r in replies]
    assert sorted(sources)[1] == "storage" and sources.count("storage") == 1, sources


def test_adapter_store_single_flight_across_threads(s3_registry, tmp_path):
    from rayimg.registry import AdapterStore

    store = AdapterStore(Storage(), s3_registry, disk_dir=str(tmp_path))
    store.metadata("style-c", "1")  # adapter.json read: every thread goes straight for the weights
    barrier = threading.Barrier(8)

    def get(_):
        barrier.wait()
        return store.get("style-c", "1")

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(get, range(8)))
    assert {v for v, _ in results} == {"1"} and len({id(w) for _, w in results}) == 1
    assert store.stats.downloads == 1 and store.stats.loads == 1


def test_corrupted_adapter_is_refused(main_app):
    r = post(f"{main_app}/v1/generate", {"prompt": "x", "adapters": [{"name": "tampered"}]})
    error = assert_clean_error(r, 422, "adapter_corrupt", "adapters")
    assert "sha256" in error["message"] and "tampered" in error["message"]


def test_adapter_of_another_family_or_type_is_a_422(main_app, s3_registry, tmp_path):
    import torch

    from rayimg.registry import publish_adapter
    from rayimg.train.export import save_textual_inversion
    from tests.test_render_engine import ATTN, make_lora

    st = Storage()
    publish_adapter(st, s3_registry, "xl-only", None, make_lora(tmp_path / "xl", "sdxl", 5, rank=4, alpha=4, unet_targets=ATTN),
                    {"base_model": {"id": "rayimg-tiny-sdxl", "hash": "0" * 64, "family": "sdxl"}, "method": "lora"})
    save_textual_inversion(tmp_path / "ti", "sd", {"<tok>": torch.randn(1, 32)}, token="<tok>")
    publish_adapter(st, s3_registry, "an-embedding", None, tmp_path / "ti",
                    {"base_model": {"id": "rayimg-tiny-sd", "hash": "0" * 64, "family": "sd"}, "method": "textual_inversion",
                     "placeholder_token": "<tok>"})
    r = post(f"{main_app}/v1/generate", {"prompt": "x", "adapters": [{"name": "xl-only"}]})
    error = assert_clean_error(r, 422, "adapter_incompatible", "adapters")
    assert "adapter 'xl-only' version '1' was trained for an SDXL base model ('rayimg-tiny-sdxl')" in error["message"]
    r = post(f"{main_app}/v1/generate", {"prompt": "x", "adapters": [{"name": "an-embedding"}]})
    error = assert_clean_error(r, 422, "adapter_incompatible", "adapters")
    assert "adapter 'an-embedding' version '1' is a textual inversion (an embedding for token '<tok>'), not a LoRA" in error["message"]


def test_new_version_is_picked_up_without_restart(main_app, s3_registry, publish_tiny_lora):
    body = {"prompt": "a blue circle", "seed": 6, "adapters": [{"name": "style-d"}]}
    assert post(f"{main_app}/v1/generate", body).json()["adapters"][0]["version"] == "1"
    assert publish_tiny_lora(s3_registry, "style-d", seed=77) == "2"
    deadline = time.time() + 10
    while True:
        reply = post(f"{main_app}/v1/generate", body).json()
        if reply["adapters"][0]["version"] == "2" or time.time() > deadline:
            break
        time.sleep(0.3)
    assert reply["adapters"] == [{"name": "style-d", "version": "2", "scale": 1.0}]
    assert reply["timings"]["adapter_tiers"] == {"style-d@2": "storage"}
    listed = {a["name"]: a for a in requests.get(f"{main_app}/v1/adapters", timeout=30).json()["adapters"]}
    assert listed["style-d"]["versions"] == ["1", "2"] and listed["style-d"]["latest"] == "2"


def test_compatible_requests_are_batched(main_app):
    bodies = [{"prompt": f"a red circle {i}", "seed": 100 + i, "steps": 3} for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda b: post(f"{main_app}/v1/generate", b), bodies))
    assert all(r.status_code == 200 for r in replies), [r.text for r in replies]
    sizes = [r.json()["timings"]["batch_sizes"][0] for r in replies]
    assert max(sizes) > 1, sizes


def test_img2img(main_app):
    init = Image.new("RGB", (64, 48), (200, 30, 30))
    buf = io.BytesIO()
    init.save(buf, format="PNG")
    b64 = base64.b64encode(buf.getvalue()).decode()
    r = post(f"{main_app}/v1/img2img", {"prompt": "a red square", "init_image": b64, "strength": 0.5, "seed": 1})
    assert r.status_code == 200, r.text
    out = png_of(r.json()["images"][0])
    assert out.shape == (48, 64, 3)
    resized = post(f"{main_app}/v1/img2img", {"prompt": "a red square", "init_image": "data:image/png;base64," + b64, "width": 32, "height": 32})
    assert png_of(resized.json()["images"][0]).shape == (32, 32, 3)
    odd = io.BytesIO()
    Image.new("RGB", (60, 60)).save(odd, format="PNG")
    assert_clean_error(post(f"{main_app}/v1/img2img", {"prompt": "x", "init_image": base64.b64encode(odd.getvalue()).decode()}),
                       422, "invalid_request", "init_image")
    assert_clean_error(post(f"{main_app}/v1/img2img", {"prompt": "x", "init_image": "not base64!"}), 422, "invalid_request", "init_image")
    assert_clean_error(post(f"{main_app}/v1/img2img", {"prompt": "x", "init_image": b64, "strength": 1.5}), 422, "invalid_request", "strength")


# --------------------------------------------------------------------------- errors and limits
@pytest.mark.parametrize("body, status, code, field", [
    ({"seed": 1}, 422, "invalid_request", "prompt"),
    ({"prompt": "x", "steps": "many"}, 422, "invalid_request", "steps"),
    ({"prompt": "x", "width": 100}, 422, "invalid_request", "width"),
    ({"prompt": "x", "scheduler": "nope"}, 422, "invalid_request", "scheduler"),
    ({"prompt": "x", "colour": "red"}, 422, "invalid_request", "colour"),
    ({"prompt": "x", "adapters": [{"name": "../../etc/passwd"}]}, 422, "invalid_request", "adapters.0.name"),
    ({"prompt": "x", "adapters": [{"name": "style-a", "version": "../1"}]}, 422, "invalid_request", "adapters.0.version"),
    ({"prompt": "x", "adapters": [{"name": "style-a"}, {"name": "style-a"}]}, 422, "invalid_request", "adapters"),
    ({"prompt": "x", "width": 256}, 422, "limit_exceeded", "width"),
    ({"prompt": "x", "height": 136}, 422, "limit_exceeded", "height"),
    ({"prompt": "x", "steps": 41}, 422, "limit_exceeded", "steps"),
    ({"prompt": "x", "num_images": 4}, 422, "limit_exceeded", "num_images"),
    ({"prompt": "x", "timeout_s": 1000}, 422, "limit_exceeded", "timeout_s"),
    ({"prompt": "x", "adapters": [{"name": "no-such-adapter"}]}, 404, "adapter_not_found", None),
    ({"prompt": "x", "adapters": [{"name": "style-a", "version": "9"}]}, 404, "adapter_not_found", None),
])
def test_request_errors(main_app, body, status, code, field):
    assert_clean_error(post(f"{main_app}/v1/generate", body), status, code, field)


def test_bad_json_timeout_and_unknown_route(main_app):
    r = requests.post(f"{main_app}/v1/generate", data=b"{not json", headers={"Content-Type": "application/json"}, timeout=30)
    assert_clean_error(r, 422, "invalid_request")
    slow = {"prompt": "a slow one", "steps": 40, "width": 128, "height": 128, "seed": 11, "timeout_s": 0.05}
    error = assert_clean_error(post(f"{main_app}/v1/generate", slow), 504, "timeout")
    assert "0.05" in error["message"]
    assert_clean_error(requests.get(f"{main_app}/v1/nothing", timeout=30), 404, "not_found")


def test_adapters_health_metrics_openapi(main_app):
    listed = requests.get(f"{main_app}/v1/adapters", timeout=30).json()["adapters"]
    names = [a["name"] for a in listed]
    assert {"style-a", "style-b", "style-c", "shared-x"} <= set(names) and names == sorted(names)
    assert requests.get(f"{main_app}/healthz", timeout=30).json()["status"] == "ok"
    schema = requests.get(f"{main_app}/openapi.json", timeout=30).json()
    assert {"/v1/generate", "/v1/img2img", "/v1/adapters", "/healthz", "/metrics"} <= set(schema["paths"])
    assert "prompt" in schema["components"]["schemas"]["GenerateBody"]["properties"]
    snap = metrics(main_app)
    assert snap[("rayimg_http_requests_total", "", "/v1/generate", "200")] >= 1
    assert m(snap, "rayimg_images_rendered_total") >= 1 and m(snap, "rayimg_batches_total") >= 1
    page = requests.get(f"{main_app}/", timeout=30)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"] and "v1/generate" in page.text


def test_auth(tight_app):
    body = {"prompt": "a red circle", "seed": 1, "adapters": [{"name": "local-a"}]}
    error = assert_clean_error(post(f"{tight_app}/v1/generate", body), 401, "unauthorized")
    assert "Bearer" in error["message"]
    r = post(f"{tight_app}/v1/generate", body, headers={"Authorization": "Bearer wrong"})
    assert_clean_error(r, 401, "unauthorized")
    assert r.headers["WWW-Authenticate"] == "Bearer"
    assert_clean_error(requests.get(f"{tight_app}/v1/adapters", timeout=30), 401, "unauthorized")
    ok = post(f"{tight_app}/v1/generate", body, headers={"Authorization": "Bearer s3cret-key"})
    assert ok.status_code == 200, ok.text
    assert ok.json()["adapters"] == [{"name": "local-a", "version": "1", "scale": 1.0}]
    assert requests.get(f"{tight_app}/healthz", timeout=30).status_code == 200


def test_queue_full_is_503_with_retry_after(tight_app):
    # One request runs, one waits in the queue; the rest are turned away at once.
    bodies = [{"prompt": f"busy {i}", "steps": 30, "width": 128, "height": 128, "seed": i} for i in range(6)]
    with ThreadPoolExecutor(6) as pool:
        replies = list(pool.map(lambda b: post(f"{tight_app}/v1/generate", b, headers={"Authorization": "Bearer s3cret-key"}), bodies))
    statuses = sorted(r.status_code for r in replies)
    assert statuses.count(200) >= 1 and statuses.count(503) >= 1 and set(statuses) <= {200, 503}, statuses
    for r in replies:
        if r.status_code == 503:
            assert_clean_error(r, 503, "overloaded")
            assert r.headers["Retry-After"] == "7"


# --------------------------------------------------------------------------- config
def test_serve_config_loads_and_builds(monkeypatch):
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from serving.app import app_builder

    data = yaml.safe_load((REPO / "serving" / "config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(data)
    (app,) = schema.applications
    assert app.import_path == "serving.app:app_builder"
    monkeypatch.setenv("RAYIMG_API_KEY", "k")
    monkeypatch.chdir(REPO)
    built = app_builder(app.args)
    assert type(built).__name__ == "Application"
    with pytest.raises(Exception, match="limits.max_steps"):
        app_builder({"config": app.args["config"], "overrides": ["limits.max_steps=0"]})


def test_scale_to_zero_and_missing_api_key_env(monkeypatch, tmp_path):
    from ray.serve.config import AutoscalingConfig

    from rayimg.config import ConfigError
    from serving.app import build_app
    from serving.generator import generator_options

    job = serve_job(str(tmp_path), tmp_path, autoscaling={"min_replicas": 0, "max_replicas": 3, "target_ongoing_requests": 1.5})
    options = generator_options(job)
    config = AutoscalingConfig(**options["autoscaling_config"])
    assert config.min_replicas == 0 and config.max_replicas == 3 and config.target_ongoing_requests == 1.5
    monkeypatch.delenv("RAYIMG_UNSET_KEY", raising=False)
    with pytest.raises(ConfigError, match="http.api_key_env"):
        build_app(serve_job(str(tmp_path), tmp_path, http={"api_key_env": "RAYIMG_UNSET_KEY"}))
