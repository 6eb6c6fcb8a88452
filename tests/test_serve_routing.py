"""Routing across generator replicas over real HTTP (serving/routing.py), with the tiny model on
CPU: an idle replica that holds a request's adapters gets it; a burst naming one popular adapter
is served by both replicas instead of queueing on the one that loaded it first (Serve's own
multiplexed routing keeps sending to that one until it is full); with one replica everything
still works, also when requests wait in the ingress for room on it. And the autoscaling and
routing settings reach the generator deployment."""

from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.test_serve import serve_job

# how long a replica's new adapter set takes to reach the ingress's router (pushed every 0.1 s
# to the controller, then broadcast)
LEARN_S = 2.0


@pytest.fixture(scope="module")
def registry(publish_tiny_lora, tmp_path_factory):
    registry = str(tmp_path_factory.mktemp("routing-registry") / "registry")
    for i, name in enumerate(["hot", "solo-a", "solo-b", "cold"]):
        publish_tiny_lora(registry, name, seed=70 + i)
    return registry


def start_app(registry: str, tmp, name: str, **overrides) -> str:
    from serving.app import start

    job = serve_job(registry, tmp, app_name=name, http={"route_prefix": f"/{name}", **overrides.pop("http", {})},
                    adapter_cache={"gpu_max_adapters": 4, "cpu_max_adapters": 4}, **overrides)
    return start(job)


@pytest.fixture(scope="module")
def two_replicas(ray_cluster, registry, tmp_path_factory):
    from ray import serve

    url = start_app(registry, tmp_path_factory.mktemp("routing-two"), "routing-two", http={"max_ongoing_requests": 8},
                    autoscaling={"min_replicas": 2, "max_replicas": 2}, routing={"affinity_slack": 1},
                    batching={"max_batch": 4, "pad_to": [1, 2, 4]})
    yield url
    serve.delete("routing-two")


def generate(url: str, adapter: str | None, seed: int, steps: int = 2) -> dict:
    body = {"prompt": "a red square", "seed": seed, "steps": steps, "adapters": [{"name": adapter}] if adapter else []}
    response = requests.post(f"{url}/v1/generate", json=body, timeout=300)
    assert response.status_code == 200, response.text[:600]
    return response.json()


def burst(url: str, bodies: list[dict]) -> list[dict]:
    with ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(lambda b: requests.post(f"{url}/v1/generate", json=b, timeout=300), bodies))
    assert [r.status_code for r in responses] == [200] * len(bodies), [r.text[:600] for r in responses if r.status_code != 200]
    return [r.json() for r in responses]


def test_idle_replicas_keep_adapter_affinity(two_replicas):
    url = two_replicas
    first = generate(url, "solo-a", seed=1)["replica"]
    time.sleep(LEARN_S)
    # a set no replica holds goes to the replica holding the fewest sets
    second = generate(url, "solo-b", seed=2)["replica"]
    assert second != first
    time.sleep(LEARN_S)
    served = [(adapter, generate(url, adapter, seed=10 + i)["replica"]) for i, adapter in enumerate(["solo-a", "solo-b"] * 3)]
    assert served == [("solo-a", first), ("solo-b", second)] * 3


def test_a_popular_adapter_spreads_over_both_replicas(two_replicas):
    url = two_replicas
    holder = generate(url, "hot", seed=100)["replica"]
    time.sleep(LEARN_S)
    # all at once, each long enough that they overlap: the holder takes the first ones, then it is
    # busier than the other replica by more than affinity_slack and the other takes its share
    bodies = [{"prompt": "a red square", "seed": 200 + i, "steps": 24, "adapters": [{"name": "hot"}]} for i in range(8)]
    replicas = Counter(r["replica"] for r in burst(url, bodies))
    assert len(replicas) == 2, replicas
    assert replicas[holder] >= 2, replicas  # affinity still gave the holder the first requests


def test_one_replica_serves_a_mixed_burst_beyond_its_capacity(ray_cluster, registry, tmp_path_factory):
    from ray import serve

    # two requests at a time on the replica: the rest wait in the ingress's router (with backoff)
    url = start_app(registry, tmp_path_factory.mktemp("routing-one"), "routing-one",
                    http={"max_ongoing_requests": 2, "max_batch_size": 2}, batching={"max_batch": 2, "pad_to": [1, 2]})
    try:
        adapters = ["hot", "cold", None, "hot", "solo-a", None]
        bodies = [{"prompt": "green grass", "seed": 300 + i, "steps": 6, "adapters": [{"name": a}] if a else []}
                  for i, a in enumerate(adapters)]
        results = burst(url, bodies)
        assert len({r["replica"] for r in results}) == 1
        assert [[a["name"] for a in r["adapters"]] for r in results] == [[a] if a else [] for a in adapters]
        assert all(len(r["images"]) == 1 and r["images"][0]["b64_json"] for r in results)
    finally:
        serve.delete("routing-one")


def test_autoscaling_and_routing_settings_reach_the_deployment(tmp_path):
    from ray.serve.config import AutoscalingConfig

    from rayimg.config import ConfigError
    from serving.generator import generator_deployment, generator_options
    from serving.routing import AdapterAffinityRouter

    job = serve_job(str(tmp_path), tmp_path, http={"max_ongoing_requests": 6},
                    autoscaling={"min_replicas": 1, "max_replicas": 4, "upscale_delay_s": 5.0, "downscale_delay_s": 60.0,
                                 "look_back_period_s": 20.0},
                    routing={"affinity_slack": 3}, batching={"max_batch": 4, "pad_to": [1, 2, 4]})
    options = generator_options(job)
    config = generator_deployment(job)._deployment_config
    for autoscaling in (AutoscalingConfig(**options["autoscaling_config"]), config.autoscaling_config):
        assert (autoscaling.min_replicas, autoscaling.max_replicas) == (1, 4)
        assert autoscaling.target_ongoing_requests == 4.0  # default: a full step batch per replica
        assert (autoscaling.upscale_delay_s, autoscaling.downscale_delay_s, autoscaling.look_back_period_s) == (5.0, 60.0, 20.0)
    assert config.max_ongoing_requests == 6
    assert config.request_router_config.get_request_router_class() is AdapterAffinityRouter
    assert config.request_router_config.request_router_kwargs == {"affinity_slack": 3}

    # the default target follows the batching mode and stays within max_ongoing_requests
    fused = serve_job(str(tmp_path), tmp_path, http={"max_batch_size": 3}, batching={"mode": "request"})
    assert generator_options(fused)["autoscaling_config"]["target_ongoing_requests"] == 3.0
    small = serve_job(str(tmp_path), tmp_path, http={"max_ongoing_requests": 5, "max_batch_size": 2})
    assert generator_options(small)["autoscaling_config"]["target_ongoing_requests"] == 5.0
    explicit = serve_job(str(tmp_path), tmp_path, autoscaling={"target_ongoing_requests": 1.5})
    assert generator_options(explicit)["autoscaling_config"]["target_ongoing_requests"] == 1.5

    with pytest.raises(ConfigError, match="autoscaling.target_ongoing_requests"):
        serve_job(str(tmp_path), tmp_path, http={"max_ongoing_requests": 8}, autoscaling={"target_ongoing_requests": 9})
    with pytest.raises(ConfigError, match="routing.affinity_slack"):
        serve_job(str(tmp_path), tmp_path, routing={"affinity_slack": -1})
    with pytest.raises(ConfigError, match="autoscaling.upscale_delay_s"):
        serve_job(str(tmp_path), tmp_path, autoscaling={"upscale_delay_s": -1})
