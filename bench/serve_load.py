"""Load test of the Serve app: Zipf-distributed traffic over many LoRA adapters, on loopback only.

Starts a local Ray cluster and the app (serving/app.py) in-process, publishes ``--adapters``
random LoRAs to a fresh local registry, then sends ``--requests`` requests from ``--concurrency``
client threads to 127.0.0.1. Each request names one adapter drawn from a Zipf law (rank k has
probability proportional to 1/k^s; ``--no-adapter-share`` of requests name none) and its own seed
(the image cache is off, every request renders). Bounded: a fixed request count, and
``--max-seconds`` stops sending.

Reports p50/p95/p99 latency, throughput, the adapter cache hit rate (a request whose adapters
were resident on the replica or came from the CPU/device tiers, rather than from a file on disk
or storage) and adapter file loads per second, from the responses and the app's /metrics.

    python bench/serve_load.py                               # CPU, tiny model (a few minutes on 2 cores)
    python bench/serve_load.py --real-size --requests 200    # GPU: real-size SDXL (random init) at 1024², 30 steps
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve_common import counters, dump, percentile, publish_random_adapters, lora_shapes  # noqa: E402


def zipf_weights(n: int, s: float) -> list[float]:
    w = [1.0 / (k ** s) for k in range(1, n + 1)]
    total = sum(w)
    return [x / total for x in w]


def real_size_renderer(job, store):
    """Generator replicas build the real-size SDXL architecture (random init, bf16) on the GPU."""
    import torch

    from rayimg.models.real_size import build_sdxl_pipeline
    from rayimg.render.renderer import Renderer

    pipe = build_sdxl_pipeline(torch.bfloat16, "cuda")
    return Renderer.from_pipeline(pipe, "sdxl-random-init", "random", "sdxl", job.engine, adapter_store=store)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--adapters", type=int, default=50)
    ap.add_argument("--requests", type=int, default=120)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent s")
    ap.add_argument("--no-adapter-share", type=float, default=0.1, help="share of requests without adapters")
    ap.add_argument("--max-seconds", type=float, default=600.0, help="stop sending after this long")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--rank", type=int, default=None)
    ap.add_argument("--replicas", type=int, default=1)
    ap.add_argument("--gpu-sets", type=int, default=4, help="adapter sets resident per replica (adapter_cache.gpu_max_adapters)")
    ap.add_argument("--cpu-adapters", type=int, default=16, help="adapters held as CPU tensors per replica")
    ap.add_argument("--real-size", action="store_true", help="GPU: real-size SDXL (random init) at 1024², 30 steps, rank-16 LoRAs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.environ.get("OUT", "outputs/bench"))
    args = ap.parse_args()
    real = args.real_size
    steps = args.steps or (30 if real else 2)
    size = args.size or (1024 if real else 64)
    rank = args.rank or (16 if real else 4)

    import ray
    import requests
    import torch

    from rayimg.config import ServeJob, from_dict
    from serving.app import start

    tmp = Path(tempfile.mkdtemp(prefix="rayimg-serve-load-"))
    registry = str(tmp / "registry")
    names = [f"load-{i:03d}" for i in range(args.adapters)]
    t0 = time.perf_counter()
    if real:
        from diffusers import UNet2DConditionModel

        from rayimg.models.real_size import sdxl_config

        with torch.device("meta"):
            unet = UNet2DConditionModel(**{k: v for k, v in sdxl_config("unet").items() if not k.startswith("_")})
        model_id, model_hash, factory = "sdxl-random-init", "random", real_size_renderer
    else:
        from rayimg.config import ModelConfig
        from rayimg.models.loader import load_model

        loaded = load_model(ModelConfig(device="cpu"))
        unet, model_id, model_hash, factory = loaded.pipeline.unet, loaded.model_id, loaded.model_hash, None
    publish_random_adapters(registry, names, lora_shapes(unet), rank, model_id, model_hash)
    print(f"[load] published {len(names)} rank-{rank} adapters to {registry} in {time.perf_counter() - t0:.1f}s", flush=True)

    ray.init(num_cpus=os.cpu_count() if real else 2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    port = 8000 + random.Random(os.getpid()).randrange(1000)
    job = from_dict(ServeJob, {
        "registry": registry, "model": {"device": "cuda" if real else "cpu"}, "app_name": "load",
        "defaults": {"steps": steps, "width": size, "height": size, "guidance_scale": 5.0},
        "limits": {"max_width": size, "max_height": size, "max_steps": steps, "max_num_images": 1},
        "engine": {"batch_invariant": not real},
        "http": {"host": "127.0.0.1", "port": port, "max_batch_size": 4, "batch_wait_timeout_s": 0.02,
                 "max_ongoing_requests": 8, "max_queued_requests": 4 * args.concurrency + 8, "request_timeout_s": 600.0},
        "autoscaling": {"min_replicas": args.replicas, "max_replicas": args.replicas},
        "adapter_cache": {"disk_dir": str(tmp / "adapter-cache"), "cpu_max_adapters": args.cpu_adapters, "gpu_max_adapters": args.gpu_sets,
                          "refresh_s": 30.0},
        "num_cpus_per_replica": 1.0 if real else 0.5, "num_gpus_per_replica": 1.0 if real else 0.0, "num_cpus_ingress": 0.25,
    })
    t1 = time.perf_counter()
    url = start(job, renderer_factory=factory)
    print(f"[load] app up at {url} in {time.perf_counter() - t1:.1f}s", flush=True)
    assert url.startswith("http://127.0.0.1:"), url  # loopback only

    rng = random.Random(args.seed)
    weights = zipf_weights(len(names), args.zipf)
    plan = []
    for i in range(args.requests):
        adapters = [] if rng.random() < args.no_adapter_share else [{"name": rng.choices(names, weights)[0], "scale": 0.8}]
        plan.append({"prompt": f"a red circle, request {i}", "seed": 10_000 + i, "adapters": adapters})
    # one warm-up request (first-call costs), not counted
    requests.post(f"{url}/v1/generate", json={"prompt": "warm-up", "seed": 1}, timeout=600).raise_for_status()

    before = counters(url)
    results, lock = [], threading.Lock()
    deadline = time.perf_counter() + args.max_seconds
    session = threading.local()

    def send(body):
        if time.perf_counter() > deadline:
            return
        s = getattr(session, "s", None) or requests.Session()
        session.s = s
        start = time.perf_counter()
        r = s.post(f"{url}/v1/generate", json=body, timeout=600)
        latency = time.perf_counter() - start
        reply = r.json()
        with lock:
            results.append({"status": r.status_code, "latency": latency, "adapters": bool(body["adapters"]),
                            "tiers": (reply.get("timings") or {}).get("adapter_tiers", {}),
                            "batch": ((reply.get("timings") or {}).get("batch_sizes") or [0])[0]})

    t2 = time.perf_counter()
    with ThreadPoolExecutor(args.concurrency) as pool:
        list(pool.map(send, plan))
    elapsed = time.perf_counter() - t2
    after = counters(url)

    ok = [r for r in results if r["status"] == 200]
    lat = [r["latency"] for r in ok]
    with_adapters = [r for r in ok if r["adapters"]]
    hits = [r for r in with_adapters if all(t in ("resident", "device", "cpu") for t in r["tiers"].values())]
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    summary = {
        "mode": "real-size SDXL (random init), GPU" if real else "tiny SD, CPU",
        "device": torch.cuda.get_device_name(0) if real and torch.cuda.is_available() else "cpu",
        "adapters": len(names), "zipf_s": args.zipf, "rank": rank, "size": size, "steps": steps,
        "requests_sent": len(results), "ok": len(ok), "errors": {str(s): sum(r["status"] == s for r in results) for s in {r["status"] for r in results if r["status"] != 200}},
        "concurrency": args.concurrency, "replicas": args.replicas, "seconds": round(elapsed, 2),
        "throughput_rps": round(len(ok) / elapsed, 3),
        "latency_s": {"p50": round(percentile(lat, 50), 3), "p95": round(percentile(lat, 95), 3), "p99": round(percentile(lat, 99), 3),
                      "mean": round(sum(lat) / max(len(lat), 1), 3)},
        "adapter_cache_hit_rate": round(len(hits) / max(len(with_adapters), 1), 3),
        "adapter_file_loads": int(delta.get("rayimg_adapter_loads_total", 0)),
        "adapter_loads_per_s": round(delta.get("rayimg_adapter_loads_total", 0) / elapsed, 3),
        "adapter_downloads": int(delta.get("rayimg_adapter_downloads_total", 0)),
        "adapter_swaps": int(delta.get("rayimg_adapter_swaps_total", 0)),
        "mean_swap_ms": round(1000 * delta.get("rayimg_adapter_swap_seconds_total", 0) / max(delta.get("rayimg_adapter_swaps_total", 0), 1), 2),
        "mean_batch_size": round(sum(r["batch"] for r in ok) / max(len(ok), 1), 2),
        "distinct_adapters_requested": len({n for r in plan for n in (a["name"] for a in r["adapters"])}),
    }
    print("SUMMARY " + json.dumps(summary), flush=True)
    print(f"\n{summary['mode']}: {summary['ok']}/{summary['requests_sent']} ok in {summary['seconds']} s "
          f"({summary['throughput_rps']} req/s, concurrency {args.concurrency})")
    print(f"latency p50 {summary['latency_s']['p50']} s, p95 {summary['latency_s']['p95']} s, p99 {summary['latency_s']['p99']} s")
    print(f"adapter cache hit rate {summary['adapter_cache_hit_rate']:.1%}; {summary['adapter_file_loads']} file loads "
          f"({summary['adapter_loads_per_s']}/s), {summary['adapter_downloads']} downloads, {summary['adapter_swaps']} swaps "
          f"(mean {summary['mean_swap_ms']} ms), mean batch {summary['mean_batch_size']}")
    dump(Path(args.out) / "serve_load.json", summary)
    from ray import serve

    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
