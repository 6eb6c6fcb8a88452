"""Adapter swap time and request latency of the Serve app on a GPU (issue 6).

The real-size SDXL architecture (random init, bf16, built on the GPU in the generator replica)
behind the real app (serving/app.py, over HTTP on 127.0.0.1), rank-16 LoRAs on
to_q/to_k/to_v/to_out.0 of every attention block, published to a local registry:

- ``cold``: an adapter never seen: storage -> disk (sha256 checked) -> CPU tensors -> GPU,
  then fused. Reported: load (``adapter_load_s``) + fuse (``swap_s``) from the replica's timings;
- ``warm``: an adapter in the CPU tier but not on the GPU (one resident set and one GPU-tier
  slot, two adapters alternating): CPU -> GPU copy + fuse. Target <= 100 ms;
- ``latency``: requests at 1024², 30 steps, no adapter and with a resident one, sequential:
  the client's wall time vs the engine's own time (``engine_s``: the pipeline call, measured
  in the replica). Target: p50 latency within 10 % of the engine's p50.

Swap requests use ``--swap-steps`` (2) steps: the swap is timed on its own, the steps only
make each request short. One ``RESULT`` line per row; ``$OUT/serve_swap_bench.json``.

    python bench/serve_swap_bench.py                 # GPU
    python bench/serve_swap_bench.py --tiny          # CPU smoke test with the tiny model
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve_common import dump, lora_shapes, percentile, publish_random_adapters  # noqa: E402

RESULTS: dict = {"rows": [], "notes": {}}


def out_path() -> Path:
    return Path(os.environ.get("OUT", "outputs/bench")) / "serve_swap_bench.json"


def record(row: dict) -> None:
    RESULTS["rows"].append(row)
    print("RESULT " + json.dumps(row), flush=True)
    dump(out_path(), RESULTS)


def real_size_renderer(job, store):
    """Built inside the generator replica: the real-size SDXL pipeline, random init, on the GPU."""
    import torch

    from rayimg.models.real_size import build_sdxl_pipeline
    from rayimg.render.renderer import Renderer

    pipe = build_sdxl_pipeline(torch.bfloat16, "cuda")
    return Renderer.from_pipeline(pipe, "sdxl-random-init", "random", "sdxl", job.engine, adapter_store=store)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test: the tiny SD model, 64², 2 steps, rank 4")
    ap.add_argument("--cold", type=int, default=3, help="cold swaps measured")
    ap.add_argument("--warm", type=int, default=6, help="warm swaps measured")
    ap.add_argument("--latency", type=int, default=5, help="timed requests per latency row")
    ap.add_argument("--swap-steps", type=int, default=2)
    args = ap.parse_args()
    tiny = args.tiny
    size, steps, rank = (64, 2, 4) if tiny else (1024, 30, 16)

    import ray
    import requests
    import torch

    from rayimg.config import ServeJob, from_dict
    from serving.app import start

    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="rayimg-swap-bench-"))
    registry = str(tmp / "registry")
    names = [f"swap-{i}" for i in range(args.cold + 2)]
    if tiny:
        from rayimg.config import ModelConfig
        from rayimg.models.loader import load_model

        loaded = load_model(ModelConfig(device="cpu"))
        unet, model_id, model_hash, factory = loaded.pipeline.unet, loaded.model_id, loaded.model_hash, None
    else:
        from diffusers import UNet2DConditionModel

        from rayimg.models.real_size import sdxl_config

        with torch.device("meta"):
            unet = UNet2DConditionModel(**{k: v for k, v in sdxl_config("unet").items() if not k.startswith("_")})
        model_id, model_hash, factory = "sdxl-random-init", "random", real_size_renderer
    shapes = lora_shapes(unet)
    publish_random_adapters(registry, names, shapes, rank, model_id, model_hash)
    weights_mb = (tmp / "registry" / "adapters" / names[0] / "1" / "pytorch_lora_weights.safetensors").stat().st_size / 2**20
    RESULTS["notes"].update(lora_modules=len(shapes), rank=rank, lora_file_mb=round(weights_mb, 1), size=size, steps=steps,
                            registry="local disk (the storage tier; S3 adds the transfer)")
    print(f"[swap] {len(names)} rank-{rank} LoRAs ({len(shapes)} modules, {weights_mb:.1f} MB each) in {time.perf_counter() - t0:.1f}s", flush=True)

    ray.init(num_cpus=2 if tiny else min(os.cpu_count() or 4, 8), include_dashboard=False, log_to_driver=True, configure_logging=False)
    job = from_dict(ServeJob, {
        "registry": registry, "model": {"device": "cpu" if tiny else "cuda"}, "app_name": "swap",
        "defaults": {"steps": steps, "width": size, "height": size, "guidance_scale": 5.0},
        "limits": {"max_width": size, "max_height": size, "max_steps": steps, "max_num_images": 1},
        "http": {"host": "127.0.0.1", "port": 8000 + os.getpid() % 1000, "max_batch_size": 1, "max_ongoing_requests": 1,
                 "request_timeout_s": 600.0},
        "autoscaling": {"min_replicas": 1, "max_replicas": 1},
        # one resident set and one GPU-tier slot: alternating two adapters makes each swap come from the CPU tier
        "adapter_cache": {"disk_dir": str(tmp / "adapter-cache"), "gpu_max_adapters": 1, "cpu_max_adapters": 32, "refresh_s": 1e6},
        "num_cpus_per_replica": 0.5 if tiny else 1.0, "num_gpus_per_replica": 0.0 if tiny else 1.0, "num_cpus_ingress": 0.25,
    })
    t1 = time.perf_counter()
    url = start(job, renderer_factory=factory)
    RESULTS["notes"]["app_start_s"] = round(time.perf_counter() - t1, 1)
    if not tiny:
        RESULTS["notes"]["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "?"
    print(f"[swap] app up at {url} in {RESULTS['notes']['app_start_s']}s", flush=True)
    session = requests.Session()

    def call(adapters, n_steps, seed):
        start = time.perf_counter()
        r = session.post(f"{url}/v1/generate", json={"prompt": "a lighthouse at dusk", "seed": seed, "steps": n_steps, "adapters": adapters},
                         timeout=600)
        wall = time.perf_counter() - start
        assert r.status_code == 200, r.text[:500]
        return wall, r.json()["timings"]

    seed = iter(range(1, 10**6))
    call([], args.swap_steps, next(seed))  # warm-up: first-call costs
    call([], steps, next(seed))

    # cold: storage -> disk -> CPU -> GPU, then fuse
    cold = []
    for name in names[2:2 + args.cold]:
        _, t = call([{"name": name}], args.swap_steps, next(seed))
        assert t["adapter_tiers"] == {f"{name}@1": "storage"}, t
        cold.append((t["adapter_load_s"], t["swap_s"]))
    record({"row": "cold swap (storage -> GPU, fused)", "n": len(cold),
            "load_ms_p50": round(1000 * percentile([c[0] for c in cold], 50), 1),
            "fuse_ms_p50": round(1000 * percentile([c[1] for c in cold], 50), 1),
            "total_ms_p50": round(1000 * percentile([c[0] + c[1] for c in cold], 50), 1)})

    # warm: two adapters alternating with one resident set: each comes back from the CPU tier
    a, b = names[0], names[1]
    call([{"name": a}], args.swap_steps, next(seed))
    call([{"name": b}], args.swap_steps, next(seed))
    warm = []
    for i in range(args.warm):
        name = a if i % 2 == 0 else b
        _, t = call([{"name": name}], args.swap_steps, next(seed))
        assert t["adapter_tiers"] == {f"{name}@1": "cpu"}, t
        warm.append((t["adapter_load_s"], t["swap_s"]))
    total = [1000 * (c[0] + c[1]) for c in warm]
    record({"row": "warm swap (CPU -> GPU, fused)", "n": len(warm),
            "copy_ms_p50": round(1000 * percentile([c[0] for c in warm], 50), 1),
            "fuse_ms_p50": round(1000 * percentile([c[1] for c in warm], 50), 1),
            "total_ms_p50": round(percentile(total, 50), 1), "total_ms_max": round(max(total), 1),
            "target_ms": 100, "meets_target": percentile(total, 50) <= 100})

    # latency at full size: client wall time vs the engine's own time
    for label, adapters in (("no adapter", []), ("resident adapter", [{"name": b, "scale": 0.8}])):
        call(adapters, steps, next(seed))  # makes the adapter resident and fused
        walls, engines = [], []
        for _ in range(args.latency):
            wall, t = call(adapters, steps, next(seed))
            walls.append(wall)
            engines.append(t["engine_s"])
        p50_wall, p50_engine = percentile(walls, 50), percentile(engines, 50)
        record({"row": f"request latency, {label}", "size": size, "steps": steps, "n": len(walls),
                "latency_s_p50": round(p50_wall, 3), "engine_s_p50": round(p50_engine, 3),
                "overhead_pct": round(100 * (p50_wall / p50_engine - 1), 1), "target_pct": 10,
                "meets_target": p50_wall <= 1.10 * p50_engine})
    RESULTS["notes"]["total_s"] = round(time.perf_counter() - t0, 1)
    dump(out_path(), RESULTS)
    print(f"[swap] done in {RESULTS['notes']['total_s']}s; {out_path()}", flush=True)
    from ray import serve

    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
