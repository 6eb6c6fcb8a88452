"""The Serve app's step loop over real HTTP (``batching.mode: step``, the default): concurrent
requests with different adapters, scales, step counts and schedulers share denoising steps, and
each image equals the same request rendered alone with its adapters fused (tiny SD, CPU). Requests
the loop does not take (img2img, more adapters than a sample combines) take the fused path on the
same replica."""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from tests.test_serve import serve_job


@pytest.fixture(scope="module")
def step_app(ray_cluster, publish_tiny_lora, tmp_path_factory):
    from ray import serve

    from serving.app import start

    tmp = tmp_path_factory.mktemp("serve-step")
    registry = str(tmp / "registry")
    for i, name in enumerate(["sa", "sb", "sc"]):
        publish_tiny_lora(registry, name, seed=40 + i)
    job = serve_job(registry, tmp, app_name="step", http={"route_prefix": "/step", "max_ongoing_requests": 12},
                    adapter_cache={"gpu_max_adapters": 4, "cpu_max_adapters": 4},
                    batching={"mode": "step", "max_batch": 4, "pad_to": [1, 2, 4], "num_slots": 2, "max_adapters": 2})
    url = start(job)
    yield url, job
    serve.delete("step")


def image_of(response) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(response["images"][0]["b64_json"]))).convert("RGB"), dtype=np.int16)


def metric(url: str, name: str) -> float:
    text = requests.get(f"{url}/metrics", timeout=30).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


def test_mixed_adapters_share_steps_and_match_fused_alone(step_app, tmp_path):
    url, job = step_app
    bodies = [
        {"prompt": "a red square", "seed": 1, "steps": 4, "adapters": [{"name": "sa", "scale": 0.8}]},
        {"prompt": "a blue circle", "seed": 2, "steps": 2, "adapters": [{"name": "sb"}]},
        {"prompt": "green grass", "seed": 3, "steps": 3},
        {"prompt": "a red square", "seed": 4, "steps": 4, "adapters": [{"name": "sa", "scale": 1.0}, {"name": "sc", "scale": 0.5}],
         "scheduler": "euler_a"},
        {"prompt": "a blue circle", "seed": 5, "steps": 2, "adapters": [{"name": "sc"}], "guidance": 6.0},
        {"prompt": "green grass", "seed": 6, "steps": 3, "adapters": [{"name": "sb", "scale": 0.3}]},
    ]
    steps_before, samples_before = metric(url, "rayimg_denoise_steps_total"), metric(url, "rayimg_denoise_samples_total")
    with ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(lambda b: requests.post(f"{url}/v1/generate", json=b, timeout=300), bodies))
    assert [r.status_code for r in responses] == [200] * len(bodies), [r.text[:600] for r in responses if r.status_code != 200]
    steps = metric(url, "rayimg_denoise_steps_total") - steps_before
    samples = metric(url, "rayimg_denoise_samples_total") - samples_before
    assert samples == sum(b["steps"] for b in bodies)  # every request's steps ran in the step loop
    assert steps < samples  # and they shared UNet calls: a mean batch above one
    for r in responses:  # where each image's time went, from the step loop (no GPU spans on CPU)
        [split] = r.json()["timings"]["images"]
        assert set(split) == {"queue_s", "denoise_s", "decode_s", "png_s"} and min(split.values()) >= 0, split
        assert split["denoise_s"] > 0 and split["decode_s"] > 0
        # the ingress replica's own time, its body encoded: at least the generator's
        name, _, dur = r.headers["Server-Timing"].partition(";dur=")
        assert name == "ingress" and float(dur) / 1000 >= r.json()["timings"]["generator_s"], r.headers["Server-Timing"]

    # each image against the same request alone, adapters fused, through the project's engine
    from rayimg.config import ModelConfig
    from rayimg.models import load_model
    from rayimg.registry import AdapterStore
    from rayimg.render.engine import Engine, GenerationRequest
    from rayimg.storage import Storage

    engine = Engine(load_model(ModelConfig(pretrained="rayimg-tiny-sd", device="cpu", cache_dir=str(tmp_path / "models"))).pipeline)
    store = AdapterStore(Storage(), job.registry, job.adapter_cache)
    store.unet_config = engine.pipe.unet.config
    for body, response in zip(bodies, responses):
        data = response.json()
        identity = [(a["name"], a["version"], a["scale"]) for a in data["adapters"]]
        pairs = [(store.get_on(name, version, "cpu")[1], scale) for name, version, scale in identity]
        engine.set_adapters(pairs, identity)
        request = GenerationRequest(prompt=body["prompt"], steps=body["steps"], seed=body["seed"], width=64, height=64,
                                    guidance_scale=body.get("guidance", 3.0), scheduler=body.get("scheduler", "euler"),
                                    adapters=identity)
        alone = np.asarray(engine.generate([request])[0], dtype=np.int16)
        assert np.abs(image_of(data) - alone).max() <= 2, body


def test_requests_the_loop_does_not_take_use_the_fused_path(step_app):
    """They render with their adapters fused into the weights, and the step loop's requests after
    (and beside) them render on the base weights again: the same request gives the same image."""
    url, _ = step_app
    plain = {"prompt": "green grass", "seed": 9}
    before = requests.post(f"{url}/v1/generate", json=plain, timeout=300)
    assert before.status_code == 200, before.text[:300]
    three = {"prompt": "a red square", "seed": 7, "adapters": [{"name": "sa"}, {"name": "sb"}, {"name": "sc"}]}
    init = Image.new("RGB", (64, 64), (200, 30, 30))
    buf = io.BytesIO()
    init.save(buf, format="PNG")
    img2img = {"prompt": "a red square", "seed": 8, "steps": 4, "strength": 0.5, "adapters": [{"name": "sa"}],
               "init_image": base64.b64encode(buf.getvalue()).decode()}
    with ThreadPoolExecutor(3) as pool:
        a = pool.submit(requests.post, f"{url}/v1/generate", json=three, timeout=300)
        b = pool.submit(requests.post, f"{url}/v1/img2img", json=img2img, timeout=300)
        c = pool.submit(requests.post, f"{url}/v1/generate", json=plain, timeout=300)
        results = [a.result(), b.result(), c.result()]
    assert [r.status_code for r in results] == [200, 200, 200], [r.text[:300] for r in results]
    assert metric(url, "rayimg_adapter_swaps_total") >= 1  # the three-adapter request and img2img were fused
    after = requests.post(f"{url}/v1/generate", json=plain, timeout=300)
    assert after.status_code == 200, after.text[:300]
    for response in (results[2], after):  # no adapter fused for the other requests leaks into them
        assert np.abs(image_of(response.json()) - image_of(before.json())).max() <= 2
    # alone in the loop, a request renders with its adapter fused (batching.fuse_alone) and reports the swap it waited for
    swaps = metric(url, "rayimg_adapter_swaps_total")
    lone = requests.post(f"{url}/v1/generate", json={"prompt": "a red square", "seed": 10, "adapters": [{"name": "sb"}]}, timeout=300)
    assert lone.status_code == 200 and lone.json()["timings"]["swap_s"] > 0, lone.text[:300]
    assert metric(url, "rayimg_adapter_swaps_total") == swaps + 1


def test_replica_warms_up_its_step_loop_when_it_compiles(tmp_path, caplog):
    """A replica with a compiled UNet and VAE decoder makes (here: looks up in the compile cache)
    its step loop's graphs at start, before any request: one UNet call per padded batch size at
    the default size and guidance, one batch-1 decode; its step counts stay at zero and no slot
    stays pinned. Without compile, or with batching.warm_up off, nothing runs. (Dynamo is off in
    this process so nothing is actually compiled: inductor on a CPU takes minutes.)"""
    import logging

    import torch

    from serving.generator import GeneratorBase

    def replica(engine: dict, warm_up: bool = True) -> GeneratorBase:
        return GeneratorBase(serve_job(str(tmp_path / "registry"), tmp_path, engine=engine, image_cache={"uri": str(tmp_path / "images")},
                                       batching={"max_batch": 3, "pad_to": [1, 2, 4, 8], "warm_up": warm_up}))

    compiled = {"compile": True, "compile_vae": True, "compile_cache": str(tmp_path / "compile-cache")}
    logger = logging.getLogger("ray.serve")  # Ray's logger does not propagate to the root's handlers
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="ray.serve")
    try:
        with torch._dynamo.config.patch(disable=True):
            warm = replica(compiled)
            cold = replica({"compile": True, "compile_vae": True}, warm_up=False)
        plain = replica({})
    finally:
        logger.removeHandler(caplog.handler)
    looked_up = [e["key"]["shape"] for e in warm.renderer.compile_cache_status if e["action"] == "cold"]
    assert [(s["mode"], s["batch"], s.get("guidance"), s.get("slots")) for s in looked_up] == [
        ("step", 1, True, "passthrough"), ("step", 2, True, None), ("step", 4, True, None),
        ("step-decode", 1, None, None)]  # 3 samples pad to 4; 8 unused; one alone runs the base model's step (fuse_alone)
    assert all((s["width"], s["height"]) == (64, 64) for s in looked_up)  # serve_job's defaults
    assert warm.step_loop.stats == {"steps": 0, "unet_rows": 0, "samples": 0, "joined_running": 0, "swaps": 0, "swap_s": 0.0, "cancelled": 0}
    assert not any(warm.slots._pins) and not warm.step_loop.batcher.busy
    [record] = [r for r in caplog.records if "warmed up" in r.getMessage()]
    assert record.threadName == "rayimg-step-loop"  # where the steps record their CUDA graphs
    line = record.getMessage()
    assert line.startswith("rayimg step loop: warmed up UNet batches [1, 2, 4] and the decode at 64x64 (guidance on) in ")
    progress = [r.getMessage().split(" ready in ")[0] for r in caplog.records if "warm-up: " in r.getMessage()]
    assert progress == [f"rayimg step loop: warm-up: UNet step at batch {b} (64x64)" for b in (1, 2, 4)] + [
        "rayimg step loop: warm-up: decode at 64x64"]  # each size as it is ready: a long cold compile shows progress
    assert cold.renderer.compile_cache_status == []
    # no engine.compile_cache: the replicas share one beside the image cache (an added replica starts warm)
    assert cold.renderer.compile_cache.prefix == str(tmp_path / "images" / ".compile-cache")
    assert plain.renderer.compile_cache is None and plain.renderer.engine.prompts.stats["encoded"] == 0  # no step ran


def test_slots_go_where_the_registry_adapters_record_and_other_adapters_take_the_fused_path(tmp_path, publish_tiny_lora):
    """A replica gives adapter slots to the UNet modules its registry's adapters record in their
    adapter.json (``target_modules``), or to every module type when the registry is empty or an
    adapter records none; ``batching.slot_targets`` overrides it. A request whose adapters adapt a
    module without slots does not join the step loop (it takes the fused path); one the slots hold
    does."""
    from rayimg.config import ConfigError
    from rayimg.config.train import LORA_TARGETS
    from rayimg.registry import recorded_targets
    from rayimg.render.request import GenerationRequest
    from rayimg.storage import Storage
    from serving.generator import GeneratorBase

    registry, storage = str(tmp_path / "registry"), Storage()
    attention = ["to_q", "to_k", "to_v", "to_out.0"]
    assert recorded_targets(storage, registry) is None  # nothing published: nothing known
    version = publish_tiny_lora(registry, "att", seed=50, metadata={"target_modules": attention})  # what the tiny trainee adapts
    assert recorded_targets(storage, registry) == sorted(attention)

    def replica(**batching) -> GeneratorBase:
        return GeneratorBase(serve_job(registry, tmp_path, image_cache={"uri": str(tmp_path / "images")},
                                       batching={"max_batch": 2, "pad_to": [1, 2], **batching}))

    def slotted(generator) -> set[str]:
        return {w.name.rsplit(".", 1)[-1] if not w.name.endswith("to_out.0") else "to_out.0"
                for w in generator.slots._wrapped if w.component == "unet"}

    auto, narrow = replica(), replica(slot_targets=["to_q", "to_k"])
    assert auto.slots.config.unet_targets == tuple(sorted(attention)) and slotted(auto) == set(attention)
    assert slotted(narrow) == {"to_q", "to_k"} and auto.slots.row_nbytes > narrow.slots.row_nbytes
    request = GenerationRequest(prompt="a red square", steps=2, width=64, height=64, seed=1, adapters=[("att", version, 1.0)])
    set_id = f"att@{version}"
    assert auto._steppable(request, auto._load_set(set_id))
    assert not narrow._steppable(request, narrow._load_set(set_id))  # to_v / to_out.0 have no slots there: the fused path

    publish_tiny_lora(registry, "untold", seed=51)  # records no target_modules (e.g. trained elsewhere)
    assert recorded_targets(storage, registry) is None
    assert replica().slots.config.unet_targets == LORA_TARGETS
    with pytest.raises(ConfigError, match=r"batching\.slot_targets.*'attn'"):
        serve_job(registry, tmp_path, batching={"slot_targets": ["attn"]})
