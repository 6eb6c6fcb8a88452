"""Defects of the Serve app found by fuzzing its OpenAPI schema and by hand (issue 22, "Also
fix"), each over real HTTP against a real Serve deployment of the tiny model: img2img with no
denoising step, work cancelled when its deadline passes or its client leaves, init images
bounded and decoded off the event loop, broken registry entries, adapters of another base
model, replica death, the OpenAPI document, the image cache's check, the web page and the
README's laptop command.

The ``fixes`` app works on one request at a time (max_ongoing_requests 1), so work that is not
cancelled shows as later requests waiting for it.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import shlex
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from rayimg.config import ServeJob
from rayimg.storage import Storage
from tests.test_serve import assert_clean_error, free_port, m, metrics, png_of, post, serve_job
from tests.test_web_page import CHROMIUM, browser  # noqa: F401  (browser: a pytest fixture)

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = "pytorch_lora_weights.safetensors"


def png_b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def set_weights(version_dir: Path, data: bytes) -> None:
    """Replace an adapter's weights and record their sha256 in its adapter.json (a consistent entry)."""
    (version_dir / WEIGHTS).write_bytes(data)
    meta = json.loads((version_dir / "adapter.json").read_text())
    meta["weights"][WEIGHTS] = hashlib.sha256(data).hexdigest()
    (version_dir / "adapter.json").write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def publish_shapes_lora():
    """``publish(registry, name, seed)``: a LoRA for the demo's base model (rayimg-tiny-shapes),
    shaped as `rayimg demo` trains it (conv layers and the text encoder too), published as the
    train job publishes (base model id, hash and family recorded)."""
    import tempfile

    import torch

    from rayimg.config import DemoJob, TrainJob, from_dict
    from rayimg.models.loader import load_model
    from rayimg.registry import publish_adapter
    from rayimg.train.export import lora_state_dicts, save_lora
    from rayimg.train.trainee import build_trainee

    demo = DemoJob()
    loaded = load_model(demo.model)
    tj = from_dict(TrainJob, {"cache": "unused", "model": {"pretrained": demo.model.pretrained, "family": "sd", "dtype": "float32", "device": "cpu"},
                              "train": {"mixed_precision": "no"},
                              "lora": {"rank": 4, "target_modules": list(demo.lora.target_modules), "train_text_encoder": True}})
    trainee = build_trainee(loaded, tj)

    def publish(registry: str, name: str, seed: int) -> str:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for n, p in list(trainee.unet.named_parameters()) + list(trainee.text_encoders.named_parameters()):
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        with tempfile.TemporaryDirectory() as d:
            dicts = lora_state_dicts(trainee)
            save_lora(d, "sd", dicts["unet"], {k: v for k, v in dicts.items() if k != "unet"})
            _uri, version = publish_adapter(Storage(), registry, name, None, d, {
                "base_model": {"id": loaded.model_id, "hash": loaded.model_hash, "family": "sd"}, "method": "lora", "rank": 4})
        return version

    return publish


@pytest.fixture(scope="module")
def registry_dir(publish_tiny_lora, publish_shapes_lora, tmp_path_factory):
    from safetensors.torch import load, save

    tmp = tmp_path_factory.mktemp("fixes-registry")
    root = tmp / "registry"
    for i, name in enumerate(["good", "list-json", "bad-json", "tampered", "not-st", "nan", "escape"]):
        publish_tiny_lora(str(root), name, seed=40 + i)
    publish_shapes_lora(str(root), "shapes-only", seed=3)
    adapters = root / "adapters"
    (adapters / "list-json" / "1" / "adapter.json").write_text('["not", "an", "object"]')
    (adapters / "bad-json" / "1" / "adapter.json").write_text('{"base_model": ')
    tampered = adapters / "tampered" / "1" / WEIGHTS
    data = bytearray(tampered.read_bytes())
    data[-1] ^= 0xFF
    tampered.write_bytes(bytes(data))
    set_weights(adapters / "not-st" / "1", b"PK\x03\x04 this is a zip, not safetensors" * 10)
    tensors = load((adapters / "nan" / "1" / WEIGHTS).read_bytes())
    first = sorted(k for k in tensors if "lora_B" in k or "lora.up" in k)[0]
    tensors[first][0, 0] = float("nan")
    set_weights(adapters / "nan" / "1", save(tensors))
    # a link to a file outside the registry; its content (and sha256) are a valid adapter's
    outside = tmp / "outside"
    outside.mkdir()
    link = adapters / "escape" / "1" / WEIGHTS
    os.replace(link, outside / WEIGHTS)
    link.symlink_to(outside / WEIGHTS)
    return root


@pytest.fixture(scope="module")
def fixes_app(ray_cluster, registry_dir, tmp_path_factory):
    from ray import serve

    from serving.app import start

    tmp = tmp_path_factory.mktemp("serve-fixes")
    job = serve_job(str(registry_dir), tmp, app_name="fixes",
                    limits={"max_width": 1024, "max_height": 1024, "max_steps": 1000, "max_num_images": 3},
                    http={"route_prefix": "/fixes", "max_batch_size": 1, "max_ongoing_requests": 1, "max_queued_requests": 16,
                          "request_timeout_s": 120.0, "retry_after_s": 3},
                    image_cache={"enabled": True, "uri": str(tmp / "image-cache")})
    url = start(job)
    yield url, job
    serve.delete("fixes")


@pytest.fixture
def url(fixes_app):
    return fixes_app[0]


LONG = {"prompt": "a long one", "steps": 1000, "width": 256, "height": 256, "num_images": 3}  # minutes of work on this CPU


def quick(seed: int) -> dict:
    return {"prompt": "a quick one", "seed": seed, "steps": 2}


# --------------------------------------------------------------------------- img2img, seeds, base64
@pytest.mark.parametrize("steps, strength", [(1, 0.8), (4, 0.2), (9, 0.1)])
def test_img2img_without_a_denoising_step_is_a_422(url, steps, strength):
    body = {"prompt": "x", "init_image": png_b64(Image.new("RGB", (64, 64), (9, 9, 9))), "steps": steps, "strength": strength}
    error = assert_clean_error(post(f"{url}/v1/img2img", body), 422, "invalid_request", "strength")
    assert "int(steps x strength)" in error["message"]


def test_init_image_base64_with_line_breaks_and_seed_minus_one(url):
    b64 = png_b64(Image.new("RGB", (64, 64), (200, 30, 30)))
    wrapped = "\n".join(b64[i:i + 76] for i in range(0, len(b64), 76)) + "\n"
    r = post(f"{url}/v1/img2img", {"prompt": "a red square", "init_image": wrapped, "strength": 0.5, "steps": 4, "seed": 3})
    assert r.status_code == 200, r.text
    seeds = set()
    for _ in range(2):
        r = post(f"{url}/v1/generate", {**quick(-1)})
        assert r.status_code == 200, r.text
        seeds.add(r.json()["images"][0]["seed"])
    assert len(seeds) == 2 and all(0 <= s < 2**32 for s in seeds)
    # an omitted seed is derived from the request: the same request, the same seed
    omitted = [post(f"{url}/v1/generate", {"prompt": "a quick one", "steps": 2}).json()["images"][0]["seed"] for _ in range(2)]
    assert omitted[0] == omitted[1]
    assert_clean_error(post(f"{url}/v1/generate", quick(-2)), 422, "invalid_request", "seed")


# --------------------------------------------------------------------------- cancellation
def test_timed_out_request_stops_rendering(url):
    before = m(metrics(url), "rayimg_requests_cancelled_total")
    start = time.perf_counter()
    error = assert_clean_error(post(f"{url}/v1/generate", {**LONG, "seed": 1, "timeout_s": 2}), 504, "timeout")
    assert "2 s" in error["message"]
    # the only replica is free again within moments, not after the minutes the request would take
    r = requests.post(f"{url}/v1/generate", json=quick(2), timeout=30)
    assert r.status_code == 200, r.text
    assert time.perf_counter() - start < 25
    assert m(metrics(url), "rayimg_requests_cancelled_total") > before


def test_abandoned_request_stops_rendering(url):
    before = m(metrics(url), "rayimg_requests_cancelled_total")
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.post(f"{url}/v1/generate", json={**LONG, "seed": 3}, timeout=2)  # the client gives up and disconnects
    start = time.perf_counter()
    r = requests.post(f"{url}/v1/generate", json=quick(4), timeout=30)
    assert r.status_code == 200, r.text
    assert time.perf_counter() - start < 20
    deadline = time.time() + 10
    while m(metrics(url), "rayimg_requests_cancelled_total") <= before and time.time() < deadline:
        time.sleep(0.2)
    assert m(metrics(url), "rayimg_requests_cancelled_total") > before


def test_default_limits_and_timeout_are_bounded():
    job = ServeJob()
    job.validate()
    assert (job.limits.max_width, job.limits.max_height, job.limits.max_steps) == (1024, 1024, 50)
    assert job.http.request_timeout_s <= 120


# --------------------------------------------------------------------------- init images
def sixteen_bit_png(side: int) -> str:
    tile = np.random.RandomState(0).randint(0, 65535, size=(64, 64)).astype(np.uint16)
    return png_b64(Image.fromarray(np.tile(tile, (side // 64, side // 64))))


def test_init_image_pixels_are_bounded_before_decoding(url):
    # 8192 x 8192 declared in a small file: refused from the header
    big = Image.new("L", (8192, 8192))
    buf = io.BytesIO()
    big.save(buf, format="PNG", optimize=True)
    start = time.perf_counter()
    error = assert_clean_error(post(f"{url}/v1/img2img", {"prompt": "x", "init_image": base64.b64encode(buf.getvalue()).decode()}),
                               422, "limit_exceeded", "init_image")
    assert time.perf_counter() - start < 5 and "67108864 pixels" in error["message"]


def test_init_images_decode_off_the_event_loop(url):
    """Six 16-bit 4096x4096 PNGs (about 0.7 s of decoding each on this CPU) in flight: /healthz
    still answers at once."""
    b64 = sixteen_bit_png(4096)
    body = {"prompt": "x", "init_image": b64, "width": 64, "height": 64, "steps": 2, "strength": 0.5}
    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(post, f"{url}/v1/img2img", body) for _ in range(6)]
        time.sleep(1.0)
        latencies = []
        for _ in range(4):
            t = time.perf_counter()
            assert requests.get(f"{url}/healthz", timeout=60).status_code == 200
            latencies.append(time.perf_counter() - t)
            time.sleep(0.2)
        replies = [f.result() for f in futures]
    assert all(r.status_code == 200 for r in replies), [r.text[:200] for r in replies]
    assert max(latencies) < 1.0, latencies


# --------------------------------------------------------------------------- broken adapters
@pytest.mark.parametrize("name, words", [
    ("list-json", "adapter.json is not a JSON object"),
    ("bad-json", "adapter.json is not valid JSON"),
    ("tampered", "sha256"),
    ("not-st", "cannot be read"),
    ("nan", "NaN or infinite"),
    ("escape", "outside the registry"),
])
def test_broken_adapter_is_one_clear_422(url, name, words):
    for body in ({"prompt": "x", "steps": 2, "adapters": [{"name": name}]},
                 {"prompt": "x", "steps": 2, "adapters": [{"name": name, "version": "1"}, {"name": "good", "scale": 0.5}]}):
        error = assert_clean_error(post(f"{url}/v1/generate", body), 422, "adapter_corrupt", "adapters")
        assert f"adapter {name!r} version '1'" in error["message"] and words in error["message"], error


def test_broken_adapters_are_left_out_of_the_listing(url):
    r = requests.get(f"{url}/v1/adapters", timeout=30)
    assert r.status_code == 200, r.text
    names = {a["name"] for a in r.json()["adapters"]}
    assert {"good", "tampered", "nan", "shapes-only"} <= names  # broken weights show only when loaded
    assert not {"list-json", "bad-json"} & names


def test_adapter_of_another_base_model_is_refused_when_resolved(url):
    before = metrics(url)
    error = assert_clean_error(post(f"{url}/v1/generate", {"prompt": "x", "steps": 2, "adapters": [{"name": "shapes-only"}]}),
                               422, "adapter_incompatible", "adapters")
    assert "adapter 'shapes-only' version '1' (trained on 'rayimg-tiny-shapes') does not fit this server's model 'rayimg-tiny-sd'" \
        in error["message"], error
    after = metrics(url)
    assert m(after, "rayimg_adapter_swaps_total") == m(before, "rayimg_adapter_swaps_total")  # refused before any fusing


def test_good_adapter_still_works(url):
    r = post(f"{url}/v1/generate", {"prompt": "x", "steps": 2, "seed": 1, "adapters": [{"name": "good"}]})
    assert r.status_code == 200, r.text
    assert r.json()["adapters"] == [{"name": "good", "version": "1", "scale": 1.0}]


# --------------------------------------------------------------------------- image cache
def test_cached_image_is_checked_before_it_is_served(url, fixes_app):
    job = fixes_app[1]
    first = post(f"{url}/v1/generate", quick(21)).json()["images"][0]
    other = post(f"{url}/v1/generate", quick(22)).json()["images"][0]
    cache = Path(job.image_cache.uri)
    # another request's (valid) image under this key, then a truncated file
    for replacement in ((cache / f"{other['key']}.png").read_bytes(), (cache / f"{first['key']}.png").read_bytes()[:200]):
        (cache / f"{first['key']}.png").write_bytes(replacement)
        again = post(f"{url}/v1/generate", quick(21)).json()["images"][0]
        assert not again["cached"] and again["b64_json"] == first["b64_json"]
    # rendered again and stored again: served from the cache next time
    assert post(f"{url}/v1/generate", quick(21)).json()["images"][0]["cached"]
    assert m(metrics(url), "rayimg_image_cache_rejected_total") >= 2


# --------------------------------------------------------------------------- HTTP and OpenAPI
def test_405_carries_allow_and_non_json_body_gets_a_hint(url):
    r = requests.post(f"{url}/healthz", timeout=30)
    assert_clean_error(r, 405, "method_not_allowed")
    assert r.headers["Allow"] == "GET"
    r = requests.get(f"{url}/v1/generate", timeout=30)
    assert_clean_error(r, 405, "method_not_allowed")
    assert r.headers["Allow"] == "POST"
    for data, content_type in ((b"prompt=x&steps=2", "application/x-www-form-urlencoded"), (b"a red circle", "text/plain"), (b"", None)):
        headers = {"Content-Type": content_type} if content_type else {}
        error = assert_clean_error(requests.post(f"{url}/v1/generate", data=data, headers=headers, timeout=30), 422, "invalid_request")
        assert "Content-Type: application/json" in error["message"], error
    error = assert_clean_error(requests.post(f"{url}/v1/generate", data=b"{no", headers={"Content-Type": "application/json"}, timeout=30),
                               422, "invalid_request")
    assert "not valid JSON" in error["message"]


def test_openapi_describes_the_server(url):
    schema = requests.get(f"{url}/openapi.json", timeout=30).json()
    text = json.dumps(schema)
    assert "HTTPValidationError" not in text and '"detail"' not in text
    assert "securitySchemes" not in schema.get("components", {}) and '"security"' not in text  # no key on this server
    error_ref = "#/components/schemas/ErrorBody"
    for path, statuses in {"/v1/generate": {"404", "405", "422", "500", "503", "504"}, "/v1/img2img": {"422", "503", "504"},
                           "/v1/adapters": {"500"}}.items():
        (operation,) = schema["paths"][path].values()
        responses = operation["responses"]
        assert statuses <= set(responses) and "401" not in responses, (path, sorted(responses))
        for status in statuses:
            assert responses[status]["content"]["application/json"]["schema"]["$ref"] == error_ref, (path, status)
    generate = schema["paths"]["/v1/generate"]["post"]["responses"]
    assert generate["503"]["headers"]["Retry-After"] and generate["200"]["content"]["application/json"]["schema"]["$ref"].endswith("GenerateResponse")
    seed = schema["components"]["schemas"]["GenerateBody"]["properties"]["seed"]
    assert "-1: a random seed" in json.dumps(seed) and "Omitted: derived" in json.dumps(seed)
    assert "line breaks" in json.dumps(schema["components"]["schemas"]["Img2ImgBody"]["properties"]["init_image"])


# --------------------------------------------------------------------------- web page
def test_web_page_seed_adapters_and_image(url):
    html = requests.get(f"{url}/", timeout=30).text
    assert re.search(r'<img id="result"[^>]*\bhidden\b', html), "the image must stay hidden until there is one"
    assert 'id="random-seed"' in html and "seed: $(\"random-seed\").checked ? -1" in html
    assert re.search(r'\$\("apikey"\)\.addEventListener\("change"[^;]*\n[^}]*\n\s*loadAdapters\(\)', html)


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (apt-get install chromium)")
def test_web_page_in_a_browser(url, browser):
    """No image before one is generated; with "random" ticked, an image and the seed it used."""
    tools = browser
    tools.call("Page.enable")
    tools.call("Page.navigate", url=f"{url}/")
    tools.wait_for("document.querySelectorAll('#adapters input[type=checkbox]').length")
    assert tools.js("document.getElementById('result').hidden") is True
    tools.js("document.getElementById('random-seed').click()")
    assert tools.js("document.getElementById('seed').disabled") is True
    tools.js("document.getElementById('prompt').value = 'a red circle'")
    tools.js("document.getElementById('steps').value = '2'")
    tools.js("document.getElementById('generate').click()")
    tools.wait_for("!document.getElementById('result').hidden && document.getElementById('result').naturalWidth")
    seed = int(tools.js("document.getElementById('seed').value"))
    assert 0 <= seed < 2**32 and f"seed {seed}" in tools.js("document.getElementById('status').textContent")


# --------------------------------------------------------------------------- README laptop command
def readme_laptop_overrides() -> list[str]:
    text = (REPO / "README.md").read_text()
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("rayimg serve ") and "--config" not in line:
            command = line
            while command.rstrip().endswith("\\"):
                i += 1
                command = command.rstrip()[:-1] + " " + lines[i]
            return [t for t in shlex.split(command.split("#")[0])[2:] if "=" in t]
    raise AssertionError("README.md shows no `rayimg serve section.field=value ...` laptop command")


def test_readme_laptop_command_serves_the_demo_adapters(ray_cluster, publish_shapes_lora, tmp_path):
    import dataclasses

    from ray import serve

    from rayimg.config import DemoJob, load_job
    from serving.app import start

    overrides = readme_laptop_overrides()
    job = load_job("serve", None, overrides)
    demo = DemoJob()
    assert job.registry == str(Path(demo.output_dir).resolve() / "registry") or job.registry.rstrip("/").endswith(demo.output_dir + "/registry")
    assert job.model.pretrained == demo.model.pretrained
    registry = str(tmp_path / "registry")
    publish_shapes_lora(registry, demo.adapter_name, seed=1)
    job = dataclasses.replace(job, registry=registry, app_name="laptop", num_cpus_per_replica=0.5, num_cpus_ingress=0.1,
                              http=dataclasses.replace(job.http, port=free_port(), route_prefix="/laptop"),
                              adapter_cache=dataclasses.replace(job.adapter_cache, disk_dir=str(tmp_path / "adapters")))
    url = start(job)
    try:
        listed = requests.get(f"{url}/v1/adapters", timeout=30).json()["adapters"]
        assert [a["name"] for a in listed] == [demo.adapter_name]
        r = post(f"{url}/v1/generate", {"prompt": "a red sks on a white background", "seed": 0, "adapters": [{"name": demo.adapter_name}]})
        assert r.status_code == 200, r.text
        assert png_of(r.json()["images"][0]).shape == (job.defaults.height, job.defaults.width, 3)
    finally:
        serve.delete("laptop")


# --------------------------------------------------------------------------- replica death (last: the replica restarts)
def test_replica_death_is_a_503_with_retry_after(url):
    import ray

    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith("SERVE_REPLICA::fixes#Generator")]
    assert len(names) == 1, names
    replica = ray.get_actor(names[0], namespace="serve")
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(post, f"{url}/v1/generate", {**LONG, "seed": 9})
        time.sleep(3)
        ray.kill(replica, no_restart=True)
        r = future.result()
    error = assert_clean_error(r, 503, "unavailable")
    assert r.headers["Retry-After"] == "3" and "retry" in error["message"]
    # Serve starts a new replica; the app answers again
    deadline = time.time() + 120
    while True:
        r = post(f"{url}/v1/generate", quick(30))
        if r.status_code == 200 or time.time() > deadline:
            break
        time.sleep(1)
    assert r.status_code == 200, r.text
