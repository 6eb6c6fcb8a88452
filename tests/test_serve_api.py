"""The APIs clients already speak, over real HTTP against a real Serve deployment of the tiny
model (API key on): OpenAI's ``POST /v1/images/generations`` (with ``GET /v1/images/<key>.png``
for its URLs) and Automatic1111's ``POST /sdapi/v1/txt2img``. Each gives the images
``/v1/generate`` gives for the same settings, and errors of the same shape, status, code and
message (the field named in the client's own terms)."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import requests
from PIL import Image

from tests.test_serve import assert_clean_error, serve_job

KEY_ENV = "RAYIMG_TEST_API_KEY"
AUTH = {"Authorization": "Bearer api-key-1"}


@pytest.fixture(scope="module")
def api_app(ray_cluster, publish_tiny_lora, tmp_path_factory):
    from ray import serve

    from serving.app import start

    tmp = tmp_path_factory.mktemp("serve-api")
    registry = str(tmp / "registry")
    publish_tiny_lora(registry, "style-a", seed=61)
    publish_tiny_lora(registry, "style-b", seed=62)
    mp = pytest.MonkeyPatch()
    mp.setenv(KEY_ENV, "api-key-1")
    job = serve_job(registry, tmp, app_name="api", http={"route_prefix": "/api", "api_key_env": KEY_ENV},
                    image_cache={"enabled": True, "uri": str(tmp / "image-cache")})
    url = start(job)
    yield url
    serve.delete("api")
    mp.undo()


def call(url: str, route: str, body, headers=AUTH) -> requests.Response:
    return requests.post(f"{url}{route}", json=body, headers=headers, timeout=120)


def decode(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def params_of(image: Image.Image) -> dict:
    return json.loads(image.text["parameters"])


# --------------------------------------------------------------------------- OpenAI
def test_openai_b64_json(api_app):
    r = call(api_app, "/v1/images/generations", {"prompt": "a red circle", "n": 2, "size": "64x48", "response_format": "b64_json"})
    assert r.status_code == 200, r.text
    reply = r.json()
    assert set(reply) == {"created", "data"} and isinstance(reply["created"], int)
    assert len(reply["data"]) == 2 and all(set(d) == {"b64_json"} for d in reply["data"])
    images = [decode(d["b64_json"]) for d in reply["data"]]
    assert [i.size for i in images] == [(64, 48), (64, 48)]
    seeds = [params_of(i)["seed"] for i in images]
    assert seeds[1] == seeds[0] + 1 and params_of(images[0])["adapters"] == []
    # seeds are random, as OpenAI's images are
    again = call(api_app, "/v1/images/generations", {"prompt": "a red circle", "size": "64x48", "response_format": "b64_json"}).json()
    assert params_of(decode(again["data"][0]["b64_json"]))["seed"] not in seeds


def test_openai_url_is_served_with_the_same_auth(api_app):
    r = call(api_app, "/v1/images/generations", {"prompt": "a blue square", "model": "style-a"})  # response_format url: the default
    assert r.status_code == 200, r.text
    (item,) = r.json()["data"]
    assert set(item) == {"url"} and item["url"].startswith(f"{api_app}/v1/images/") and item["url"].endswith(".png")
    assert_clean_error(requests.get(item["url"], timeout=30), 401, "unauthorized")
    image = requests.get(item["url"], headers=AUTH, timeout=30)
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    png = decode(base64.b64encode(image.content).decode())
    assert png.size == (64, 64)
    assert params_of(png)["adapters"] == [{"name": "style-a", "version": "1", "scale": 1.0}]
    assert png.text["rayimg:key"] == item["url"].rsplit("/", 1)[1][:-4]
    assert_clean_error(requests.get(f"{api_app}/v1/images/{'0' * 64}.png", headers=AUTH, timeout=30), 404, "not_found")
    assert_clean_error(requests.get(f"{api_app}/v1/images/..%2F..%2Fetc%2Fpasswd", headers=AUTH, timeout=30), 404, "not_found")


def test_openai_model_names_the_base_or_an_adapter_version(api_app):
    for model in ("rayimg-tiny-sd", None):
        body = {"prompt": "a green star", "size": "64x64", "response_format": "b64_json", **({"model": model} if model else {})}
        r = call(api_app, "/v1/images/generations", body)
        assert r.status_code == 200, r.text
        assert params_of(decode(r.json()["data"][0]["b64_json"]))["adapters"] == []
    r = call(api_app, "/v1/images/generations", {"prompt": "a green star", "size": "64x64", "response_format": "b64_json", "model": "style-b@1"})
    assert params_of(decode(r.json()["data"][0]["b64_json"]))["adapters"] == [{"name": "style-b", "version": "1", "scale": 1.0}]


# --------------------------------------------------------------------------- Automatic1111
def test_a1111_txt2img_equals_v1_generate(api_app):
    body = {"prompt": "a red circle, <lora:style-a:0.7> on white", "negative_prompt": "blurry", "steps": 3, "cfg_scale": 3.0,
            "width": 64, "height": 48, "seed": 7, "sampler_name": "Euler a", "batch_size": 2}
    r = call(api_app, "/sdapi/v1/txt2img", body)
    assert r.status_code == 200, r.text
    reply = r.json()
    assert set(reply) == {"images", "parameters", "info"} and len(reply["images"]) == 2
    info = json.loads(reply["info"])
    assert info["seed"] == 7 and info["all_seeds"] == [7, 8] and info["sampler_name"] == "euler a" and info["steps"] == 3
    assert reply["parameters"]["prompt"] == body["prompt"] and reply["parameters"]["seed"] == 7
    images = [decode(b) for b in reply["images"]]
    assert params_of(images[0])["prompt"] == "a red circle, on white"
    assert params_of(images[0])["adapters"] == [{"name": "style-a", "version": "1", "scale": 0.7}]
    same = call(api_app, "/v1/generate", {"prompt": "a red circle, on white", "negative_prompt": "blurry", "steps": 3, "guidance": 3.0,
                                          "width": 64, "height": 48, "seed": 7, "scheduler": "euler_a", "num_images": 2,
                                          "adapters": [{"name": "style-a", "scale": 0.7}]})
    assert same.status_code == 200, same.text
    assert [i["b64_json"] for i in same.json()["images"]] == reply["images"]
    assert info["keys"] == [i["key"] for i in same.json()["images"]]


def test_a1111_seed_minus_one_defaults_and_karras(api_app):
    seeds = set()
    for _ in range(2):
        r = call(api_app, "/sdapi/v1/txt2img", {"prompt": "a yellow circle", "steps": 2, "width": 64, "height": 64})
        assert r.status_code == 200, r.text
        seeds.add(json.loads(r.json()["info"])["seed"])
    assert len(seeds) == 2 and all(0 <= s < 2**32 for s in seeds)
    r = call(api_app, "/sdapi/v1/txt2img", {"prompt": "a yellow circle", "steps": 2, "width": 64, "height": 64, "seed": 1,
                                            "sampler_name": "DPM++ 2M", "scheduler": "Karras"})
    assert r.status_code == 200, r.text
    assert params_of(decode(r.json()["images"][0]))["scheduler"] == "dpmpp_2m_karras"


# --------------------------------------------------------------------------- errors: the same as /v1/generate's
@pytest.mark.parametrize("generate, openai, a1111, status, code, field, theirs", [
    ({"steps": 41}, None, {"steps": 41}, 422, "limit_exceeded", "steps", ("steps", "steps")),
    ({"width": 256}, {"size": "256x64"}, {"width": 256}, 422, "limit_exceeded", "width", ("size", "width")),
    ({"num_images": 4}, {"n": 4}, {"batch_size": 4}, 422, "limit_exceeded", "num_images", ("n", "batch_size")),
    ({"adapters": [{"name": "no-such"}]}, {"model": "no-such"}, {"prompt": "x <lora:no-such:1>"}, 404, "adapter_not_found", None, (None, None)),
    ({"width": 100}, {"size": "100x64"}, {"width": 100}, 422, "invalid_request", "width", ("size", "width")),
    ({"colour": "red"}, {"colour": "red"}, {"colour": "red"}, 422, "invalid_request", "colour", ("colour", "colour")),
    ({"prompt": ""}, {"prompt": ""}, {"prompt": ""}, 422, "invalid_request", "prompt", ("prompt", "prompt")),
    ({"adapters": [{"name": "Bad Name"}]}, {"model": "Bad Name"}, {"prompt": "x <lora:Bad Name:1>"}, 422, "invalid_request", "adapters.0.name",
     ("model", "prompt")),
])
def test_errors_match_v1_generate(api_app, generate, openai, a1111, status, code, field, theirs):
    base = {"prompt": "x", "steps": 2}
    ours = assert_clean_error(call(api_app, "/v1/generate", {**base, **generate}), status, code, field)
    for route, body, their_field in (("/v1/images/generations", openai, theirs[0]), ("/sdapi/v1/txt2img", a1111, theirs[1])):
        if body is None:
            continue
        extra = {"steps": 2} if route == "/sdapi/v1/txt2img" else {}
        r = call(api_app, route, {"prompt": "x", **extra, **body})
        error = assert_clean_error(r, status, code, their_field)
        assert set(r.json()) == {"error"} and set(error) <= {"code", "message", "field"}
        if their_field == field or code == "adapter_not_found":
            assert error["message"] == ours["message"], (route, error, ours)


def test_route_specific_errors(api_app):
    for body, field in (({"size": "64"}, "size"), ({"size": "64x60"}, "size"), ({"response_format": "png"}, "response_format"),
                        ({"n": 0}, "n"), ({"quality": "hd"}, "quality")):
        assert_clean_error(call(api_app, "/v1/images/generations", {"prompt": "x", **body}), 422, "invalid_request", field)
    for body, field in (({"sampler_name": "Heun"}, "sampler_name"), ({"sampler_name": "Euler", "scheduler": "Karras"}, "scheduler"),
                        ({"prompt": "x <lora:style-a:strong>"}, "prompt"), ({"prompt": "x <lora:style-a:1:2>"}, "prompt"),
                        ({"prompt": "x <hypernet:foo:1>"}, "prompt"), ({"prompt": "<lora:style-a:1>"}, "prompt"),
                        ({"prompt": "x <lora:style-a> <lora:style-a:0.5>"}, "prompt"), ({"seed": -2}, "seed"),
                        ({"cfg_scale": 80}, "cfg_scale"), ({"send_images": False}, "send_images")):
        error = assert_clean_error(call(api_app, "/sdapi/v1/txt2img", {"prompt": "x", "steps": 2, **body}), 422, "invalid_request", field)
        if field == "sampler_name":
            assert "Euler a" in error["message"] and "Heun" in error["message"]


@pytest.mark.parametrize("route", ["/v1/generate", "/v1/images/generations", "/sdapi/v1/txt2img"])
def test_auth_and_body_errors_on_every_route(api_app, route):
    assert_clean_error(call(api_app, route, {"prompt": "x"}, headers={}), 401, "unauthorized")
    r = call(api_app, route, {"prompt": "x"}, headers={"Authorization": "Bearer nope"})
    assert_clean_error(r, 401, "unauthorized")
    assert r.headers["WWW-Authenticate"] == "Bearer"
    error = assert_clean_error(requests.post(f"{api_app}{route}", data=b"prompt=x", headers={**AUTH, "Content-Type": "text/plain"}, timeout=30),
                               422, "invalid_request")
    assert "Content-Type: application/json" in error["message"]
    r = requests.get(f"{api_app}{route}", headers=AUTH, timeout=30)
    assert_clean_error(r, 405, "method_not_allowed")
    assert r.headers["Allow"] == "POST"


def test_openapi_lists_both_apis_with_auth(api_app):
    schema = requests.get(f"{api_app}/openapi.json", timeout=30).json()
    assert {"/v1/images/generations", "/v1/images/{key}.png", "/sdapi/v1/txt2img"} <= set(schema["paths"])
    assert "HTTPBearer" in schema["components"]["securitySchemes"]
    for path in ("/v1/generate", "/v1/images/generations", "/sdapi/v1/txt2img"):
        operation = schema["paths"][path]["post"]
        assert operation["security"] == [{"HTTPBearer": []}]
        assert {"401", "404", "422", "503", "504"} <= set(operation["responses"])
        assert operation["responses"]["401"]["content"]["application/json"]["schema"]["$ref"] == "#/components/schemas/ErrorBody"
        assert "Server-Timing" in operation["responses"]["200"]["headers"]
    assert "Server-Timing" in schema["paths"]["/v1/adapters"]["get"]["responses"]["200"]["headers"]
    assert "headers" not in schema["paths"]["/v1/images/{key}.png"]["get"]["responses"]["200"]
    props = schema["components"]["schemas"]
    assert {"prompt", "n", "size", "response_format", "model"} <= set(props["OpenAIImagesBody"]["properties"])
    assert {"prompt", "negative_prompt", "steps", "cfg_scale", "width", "height", "seed", "sampler_name", "batch_size"} \
        <= set(props["A1111Txt2ImgBody"]["properties"])
    assert schema["paths"]["/sdapi/v1/txt2img"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]["$ref"] \
        .endswith("A1111Txt2ImgResponse")
    assert "HTTPValidationError" not in json.dumps(schema)
