"""Serve headline: the Serve app (`serving.app.start`) over HTTP on 127.0.0.1 under many-adapter
traffic, against the render engine's bulk rate with the same engine settings, measured in the
same process before the app starts. One call measures everything issue 22's bars need.

Phases, in order, each logged with the seconds since the start and each followed by the partial
result written to ``--json`` (else ``<out>/serve_partial.json``), so a device call killed at its
time limit still leaves what was measured; a phase that would end after ``--deadline-s`` is
skipped (``details["skipped"]``):

1. ``mixed_step`` (``--mixed-step``; always with ``--smoke``): one UNet step of
   ``batching.max_batch`` samples, the base UNet against the same batch with as many different
   adapters in AdapterSlots built exactly as the app's step loop builds them (its compiled graph
   is the app's, and torch's on-disk compile caches then serve the app); the cold and the warm
   slot load (an adapter whose slot-row image is in host memory: one copy into a GPU slot).
2. ``reference``: `Renderer.render_stream` over batches of ``--ref-batch`` (default the app's max
   batch; issue 22 compares with the engine's best bulk batch, 16 on an H100) with the app's
   engine settings, no adapters: what the same engine renders in bulk on this device
   (``--skip-reference``: none, and no ratio).
3. ``app``: ``--adapters`` random LoRAs (rank 16 on to_q/to_k/to_v/to_out.0 at real size)
   published to a fresh local registry, the app started, one warm-up request.
4. ``single``: ``--single`` sequential requests from one client (a third, at least one, with no adapter back to
   back, then the most popular adapter and no adapter in turn): p50/min/max latency, and p50 of
   each kind (no adapter with no swap, no adapter after an adapter, adapter).
5. ``level <clients>`` for each of ``--concurrency`` (e.g. ``8,32``), against the same app:
   ``--requests`` requests from that many client threads, each naming one adapter drawn from a
   Zipf law (rank k has probability proportional to 1/k^s; 10 % name none) and its own seed (the
   image cache is off: every request renders). Throughput, p50/p95/p99 latency, errors, mean
   batch size and swaps (from the app's /metrics) per level in ``details["levels"]``; the
   headline figure and the top-level latency keys are the first level's.

    python bench/serve.py               # GPU: real-size SDXL (random init), 1024², 30 steps, eager engine
    python bench/serve.py --options compile,cudagraphs,fuse_qkv,channels_last,compile_vae,fp8 --max-batch-size 8 \\
        --mixed-step --concurrency 8,32 --single 5 --ref-batch 16   # issue 22's bars in one device call
    python bench/serve.py --smoke       # CPU: tiny SD at 64², 2 steps, levels 2,3 (~30 s)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import common

TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
MIN_SENDING_S = 50  # a load level sends for at least this long, or is skipped
HEADLINE_LEVEL_KEYS = ("requests_sent", "ok", "errors", "concurrency", "seconds", "latency_s", "adapter_cache_hit_rate", "adapter_file_loads",
                       "adapter_swaps", "mean_swap_ms", "mean_batch_size", "gpu_samples")


# --------------------------------------------------------------------------- adapters
def lora_shapes(unet) -> dict[str, tuple[int, int]]:
    """``module path -> (out, in)`` of every attention projection LoRA targets (works on the meta device)."""
    import torch

    return {name: (m.out_features, m.in_features) for name, m in unet.named_modules()
            if isinstance(m, torch.nn.Linear) and any(name.endswith("." + t) for t in TARGETS)}


def random_lora(shapes: dict[str, tuple[int, int]], rank: int, seed: int) -> dict:
    """A diffusers/PEFT-format UNet LoRA state dict (``unet.<module>.lora_A/B.weight``), bf16."""
    import torch

    g = torch.Generator().manual_seed(seed)
    sd = {}
    for path, (out_features, in_features) in shapes.items():
        sd[f"unet.{path}.lora_A.weight"] = (torch.randn(rank, in_features, generator=g) / in_features ** 0.5).to(torch.bfloat16)
        sd[f"unet.{path}.lora_B.weight"] = (torch.randn(out_features, rank, generator=g) * 0.01).to(torch.bfloat16)
    return sd


def publish_random_adapters(registry: str, names: list[str], shapes: dict, rank: int, model_id: str, model_hash: str) -> None:
    from safetensors.torch import save_file

    from rayimg.registry import publish_adapter
    from rayimg.storage import Storage

    storage = Storage()
    for i, name in enumerate(names):
        with tempfile.TemporaryDirectory() as d:
            save_file(random_lora(shapes, rank, seed=1000 + i), str(Path(d) / "pytorch_lora_weights.safetensors"))
            publish_adapter(storage, registry, name, None, d, {"base_model": {"id": model_id, "hash": model_hash}, "method": "lora",
                                                              "rank": rank, "alpha": rank, "target_modules": list(TARGETS)})


def counters(url: str) -> dict[str, float]:
    """Sum over replicas (and labels) of each rayimg_* sample in /metrics."""
    import requests
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(requests.get(f"{url}/metrics", timeout=30).text):
        for sample in family.samples:
            if sample.name.startswith("rayimg_"):
                key = sample.name + (f"{{tier={sample.labels['tier']}}}" if "tier" in sample.labels else "")
                out[key] = out.get(key, 0.0) + sample.value
    return out


def zipf_weights(n: int, s: float) -> list[float]:
    w = [1.0 / (k ** s) for k in range(1, n + 1)]
    return [x / sum(w) for x in w]


# --------------------------------------------------------------------------- the two sides
def real_size_renderer(job, store):
    """Generator replicas build the real-size SDXL architecture (random init, bf16) on the GPU."""
    import os  # noqa: F811 - pickled by value when this runs as __main__: its imports travel inside
    import sys  # noqa: F811

    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # a Serve replica runs this: bench/ for sdxl_random
    from sdxl_random import build_sdxl_pipeline

    from rayimg.render.renderer import Renderer

    pipe = build_sdxl_pipeline(torch.bfloat16, "cuda")
    return Renderer.from_pipeline(pipe, "sdxl-random-init", "random", "sdxl", job.engine, adapter_store=store)


def free_device(device: str) -> None:
    """Give back what this process's models held on the GPU before the next phase: compiled
    graphs and their CUDA-graph pools (torch's on-disk compile caches stay)."""
    if common.is_cuda(device):
        import gc

        import torch

        gc.collect()
        torch._dynamo.reset()
        torch.cuda.empty_cache()


def engine_bulk_rate(job, real: bool, *, batch: int, calls: int, device: str) -> dict:
    """The reference: the app's engine settings at ``batch``, no adapters, in this process; a
    warm-up call, then a stream of ``calls`` batches."""
    import dataclasses

    import render as render_bench
    from rayimg.render.renderer import Renderer

    cfg = dataclasses.replace(job.engine, batch_size=batch, batch_invariant=False)
    if real:
        pipe = render_bench.build_pipeline(False, device)
        renderer = Renderer.from_pipeline(pipe, "sdxl-random-init", "random", "sdxl", cfg)
    else:
        renderer = Renderer(job.model, cfg)
    d = job.defaults
    out = render_bench.engine_stream(renderer, batch=batch, calls=calls, steps=d.steps, size=d.width, guidance=d.guidance_scale, device=device)
    out["batch"] = batch
    del renderer
    free_device(device)
    return out


def kernel_profile(fn, calls: int = 2, top: int = 25) -> dict:
    """Device time of ``calls`` calls of ``fn`` under torch.profiler: the total per call and the
    ``top`` kernels (or ops, on a CPU) by self time per call, in milliseconds."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    fn()
    with profile(activities=[ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn()
        if cuda:
            torch.cuda.synchronize()
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    rows = sorted(((e.key, getattr(e, attr) / 1000 / calls, e.count // calls) for e in prof.key_averages() if getattr(e, attr) > 0),
                  key=lambda r: -r[1])
    return {"ms_per_call": round(sum(r[1] for r in rows), 3),
            "top": [{"name": name[:120], "ms": round(ms, 3), "count": count} for name, ms, count in rows[:top]]}


def mixed_adapter_step(job, real: bool, *, rank: int, device: str, warm_rounds: int = 2, profile: bool = False) -> dict:
    """One UNet step of ``batching.max_batch`` samples (CFG: twice the rows) with the app's engine
    settings: the base UNet, then the same batch with as many different adapters in AdapterSlots
    laid out as the app's (``serving.generator.slot_config``), called as the step loop calls the
    UNet, so the compiled graph is the app's full-batch step graph. Then the slot loads: cold (the
    adapter's slot-row image built, then copied) and warm (evicted adapters loaded again from
    their cached images: one copy into a GPU slot each, as a swap in the app), each between two
    device syncs. Issue 22's bars: the mixed step within 1.10x of the base step; a warm load
    within 10 ms."""
    import dataclasses

    import torch

    import render as render_bench
    from rayimg.render.adapters import lora_from_state_dict
    from rayimg.render.engine import Engine
    from rayimg.render.multi_lora import AdapterSlots
    from serving.generator import slot_config

    batch = job.batching.max_batch
    warmup, calls = (2, 10) if real else (1, 3)
    pipe = render_bench.build_pipeline(not real, device)
    engine = Engine(pipe, job.engine)
    unet = pipe.unet
    size = job.defaults.width // pipe.vae_scale_factor
    g = torch.Generator("cpu").manual_seed(0)
    dtype = unet.dtype
    sample = torch.randn(2 * batch, unet.config.in_channels, size, size, generator=g).to(device, dtype)
    t = torch.full((2 * batch,), 500.0, device=device)
    hidden = torch.randn(2 * batch, 77, unet.config.cross_attention_dim, generator=g).to(device, dtype)
    added = None
    if engine.family == "sdxl":
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        added = {"text_embeds": torch.randn(2 * batch, pooled, generator=g).to(device, dtype),
                 "time_ids": torch.tensor([[size * 8, size * 8, 0, 0, size * 8, size * 8]] * (2 * batch), device=device, dtype=dtype)}

    def step():  # the step loop's call (rayimg.render.stepper.StepBatcher._denoise)
        with torch.no_grad():
            unet(sample, t, encoder_hidden_states=hidden, timestep_cond=None, cross_attention_kwargs=None, added_cond_kwargs=added,
                 return_dict=False)

    base = common.measure(step, warmup=warmup, calls=calls, device=device)
    profiles = {"base": kernel_profile(step)} if profile else None
    shapes = lora_shapes(unet)
    slots = AdapterSlots(pipe, slot_config(job.batching, job.batching.slot_targets or TARGETS))  # the app's: what the adapters record
    weights = [lora_from_state_dict(random_lora(shapes, rank, 100 + i), name=f"a{i}", fingerprint=f"{i:064d}", unet_config=unet.config).to(device)
               for i in range(batch)]

    def timed_acquire(w):
        common.sync(device)
        start = time.perf_counter()
        pinned = slots.acquire([(w, 1.0)])
        common.sync(device)
        return pinned, 1000 * (time.perf_counter() - start)

    cold = [timed_acquire(w) for w in weights]
    pinned = [p for p, _ in cold]
    slots.set_batch(pinned, guidance=True)
    mixed = common.measure(step, warmup=warmup, calls=calls, device=device)
    if profile:
        profiles["mixed"] = kernel_profile(step)
    warm_ms = []
    for _ in range(warm_rounds):
        for p in pinned:
            slots.release(p)
        for w in weights:
            slots.evict(w)
        again = [timed_acquire(w) for w in weights]
        pinned = [p for p, _ in again]
        warm_ms += [ms for _, ms in again]
    for p in pinned:
        slots.release(p)
    cold_ms = [ms for _, ms in cold]
    return {"batch": batch, "rank": rank, "slot_config": dataclasses.asdict(slots.config), "slot_modules": slots.num_modules,
            "base_step_s": base["s_per_call_median"], "mixed_step_s": mixed["s_per_call_median"],
            "ratio": round(mixed["s_per_call_median"] / base["s_per_call_median"], 3),
            "base_warmup_s": base["warmup_s"], "mixed_warmup_s": mixed["warmup_s"],
            "slot_load_ms_incl_first_image": round(statistics.mean(cold_ms), 2), "slot_load_ms_cold_max": round(max(cold_ms), 2),
            "slot_load_ms_warm": round(statistics.median(warm_ms), 3), "slot_load_ms_warm_max": round(max(warm_ms), 3), "warm_loads": len(warm_ms),
            "slot_row_mib": round(slots.row_nbytes / 2**20, 1), "slot_bytes": slots.nbytes, "profile": profiles}


# --------------------------------------------------------------------------- the load
def post(session, url: str, body: dict, timeout: float) -> dict:
    """One generate request: its status (or the client-side exception's name) and latency."""
    import requests

    start = time.perf_counter()
    try:
        r = session.post(f"{url}/v1/generate", json=body, timeout=timeout)
    except requests.RequestException as e:
        return {"status": type(e).__name__, "latency": time.perf_counter() - start, "adapters": bool(body["adapters"]), "tiers": {}, "batch": 0}
    latency = time.perf_counter() - start
    try:
        timings = r.json().get("timings") or {}
    except ValueError:
        timings = {}
    split = {"engine_s": timings.get("engine_s"), "generator_s": timings.get("generator_s"), "ingress_s": server_timing(r.headers, "ingress"),
             **((timings.get("images") or [{}])[0])}
    return {"status": r.status_code, "latency": latency, "adapters": bool(body["adapters"]),
            "tiers": timings.get("adapter_tiers", {}), "batch": (timings.get("batch_sizes") or [0])[0],
            "split": {k: v for k, v in split.items() if v is not None}}


def server_timing(headers, name: str) -> float | None:
    """Seconds of metric ``name`` in a ``Server-Timing`` header (``name;dur=<ms>``), or None."""
    for metric in headers.get("Server-Timing", "").split(","):
        key, _, rest = metric.strip().partition(";")
        if key == name and rest.startswith("dur="):
            try:
                return float(rest[4:]) / 1000
            except ValueError:
                return None
    return None


def load_test(url: str, plan: list[dict], concurrency: int, max_seconds: float) -> tuple[list[dict], float]:
    """``plan`` from ``concurrency`` client threads; no request starts after ``max_seconds``."""
    import requests

    results, lock, session = [], threading.Lock(), threading.local()
    deadline = time.perf_counter() + max_seconds

    def send(body):
        if time.perf_counter() > deadline:
            return
        s = getattr(session, "s", None) or requests.Session()
        session.s = s
        result = post(s, url, body, timeout=600)
        with lock:
            results.append(result)

    t = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(send, plan))
    return results, time.perf_counter() - t


def single_requests(url: str, n: int, adapter: str) -> dict:
    """``n`` requests one after another from one client: a third (at least one) with no adapter
    back to back (nothing to swap), then ``adapter`` and no adapter in turn (each request swaps the
    fused weights: the adapter in, then the base weights back)."""
    import requests

    steady = max(1, n // 3)
    with_adapter = [False] * steady + [(i - steady) % 2 == 0 for i in range(steady, n)]
    with requests.Session() as s:
        results = [post(s, url, {"prompt": f"a blue square, single {i}", "seed": 20_000 + i,
                                 "adapters": [{"name": adapter, "scale": 0.8}] if with_adapter[i] else []}, timeout=600) for i in range(n)]
    for i, r in enumerate(results):
        r["after_adapter"] = i > 0 and with_adapter[i - 1]
    lat = [r["latency"] for r in results if r["status"] == 200]
    kinds = {"no_adapter": lambda r: not r["adapters"], "adapter": lambda r: r["adapters"],
             "no_adapter_no_swap": lambda r: not r["adapters"] and not r["after_adapter"],
             "no_adapter_after_adapter": lambda r: not r["adapters"] and r["after_adapter"]}
    by_kind = {kind: [r["latency"] for r in results if r["status"] == 200 and pick(r)] for kind, pick in kinds.items()}
    return {"n": n, "ok": len(lat), "errors": errors_of(results), "p50": round(common.percentile(lat, 50), 3) if lat else None,
            **{f"p50_{kind}": round(common.percentile(x, 50), 3) if x else None for kind, x in by_kind.items()},
            "min": round(min(lat), 3) if lat else None, "max": round(max(lat), 3) if lat else None, "split_median_s": split_medians(results),
            "split_median_no_swap_s": split_medians([r for r in results if kinds["no_adapter_no_swap"](r)]),
            "latencies": [{"adapter": r["adapters"], "after_adapter": r["after_adapter"], "s": round(r["latency"], 3), "status": r["status"],
                           "split": r.get("split", {})} for r in results]}


def split_medians(results: list[dict]) -> dict[str, float]:
    """Where a request's time went, medians over the successful ones: the replica's split (step
    loop queue/denoise/decode, the same spans on the GPU's clock, PNG; engine_s and generator_s)
    and the rest (Serve, HTTP, base64): ``outside_generator_s``, of it ``ingress_hop_s`` (the
    ingress replica's time less the generator's: the handle call both ways and the JSON body) and
    ``proxy_http_s`` (the client's time less the ingress replica's: Serve's proxy, HTTP, reading
    the body). ``gpu_denoise_s`` / steps is the GPU's time per denoising step at the batch the
    request ran in."""
    splits = []
    for r in results:
        split = r.get("split", {})
        if r["status"] != 200 or "generator_s" not in split:
            continue
        split = {**split, "outside_generator_s": r["latency"] - split["generator_s"]}
        if split.get("ingress_s") is not None:
            split.update(ingress_hop_s=split["ingress_s"] - split["generator_s"], proxy_http_s=r["latency"] - split["ingress_s"])
        splits.append(split)
    return {k: round(statistics.median(x[k] for x in splits if k in x), 4) for k in sorted({k for x in splits for k in x})}


def errors_of(results: list[dict]) -> dict[str, int]:
    return {str(s): sum(r["status"] == s for r in results) for s in {r["status"] for r in results} - {200}}


def counter_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """What each /metrics counter (:func:`counters`) grew by between two reads."""
    return {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}


def swap_summary(delta: dict[str, float]) -> dict:
    """The adapter swaps in a :func:`counter_delta` and their mean time."""
    swaps = delta.get("rayimg_adapter_swaps_total", 0)
    return {"adapter_swaps": int(swaps), "mean_swap_ms": round(1000 * delta.get("rayimg_adapter_swap_seconds_total", 0) / max(swaps, 1), 2)}


def level_summary(results: list[dict], elapsed: float, delta: dict[str, float], *, clients: int, planned: int, max_seconds: float,
                  batching: str, gpu: dict) -> dict:
    """One load level: throughput, latency percentiles, errors, adapter cache and batch sizes."""
    ok = [r for r in results if r["status"] == 200]
    lat = [r["latency"] for r in ok]
    with_adapters = [r for r in ok if r["adapters"]]
    hits = [r for r in with_adapters if all(t in ("resident", "device", "cpu") for t in r["tiers"].values())]
    if batching == "step":  # samples per UNet call of the step loop
        mean_batch = delta.get("rayimg_denoise_samples_total", 0) / max(delta.get("rayimg_denoise_steps_total", 0), 1)
    else:
        mean_batch = sum(r["batch"] for r in ok) / max(len(ok), 1)
    return {"concurrency": clients, "requests_planned": planned, "requests_sent": len(results), "ok": len(ok), "errors": errors_of(results),
            "max_seconds": round(max_seconds, 1), "seconds": round(elapsed, 2), "images_per_s": round(len(ok) / elapsed, 4) if ok else None,
            "latency_s": {q: round(common.percentile(lat, p), 3) for q, p in (("p50", 50), ("p95", 95), ("p99", 99))},
            "adapter_cache_hit_rate": round(len(hits) / max(len(with_adapters), 1), 3),
            "adapter_file_loads": int(delta.get("rayimg_adapter_loads_total", 0)), **swap_summary(delta),
            "mean_batch_size": round(mean_batch, 2), "split_median_s": split_medians(results), "gpu_samples": gpu}


# --------------------------------------------------------------------------- phases
class Phases:
    """The run's phases against a deadline: each logged at its start and end with the seconds
    since the start, the partial result written after each (and at a failure, before it
    propagates), and a phase whose rough estimate would end after the deadline skipped."""

    def __init__(self, t0: float, deadline_s: float, write, details: dict):
        self.t0, self.deadline_s, self.write, self.details = t0, deadline_s, write, details
        details.update(deadline_s=deadline_s, phases={}, skipped=[], skip_reasons={})

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.deadline_s - self.elapsed()

    def skip(self, name: str, why: str) -> None:
        common.log("serve", f"skip {name}: {why}")
        self.details["skipped"].append(name)
        self.details["skip_reasons"][name] = why
        self.write()

    def fits(self, name: str, estimate_s: float) -> bool:
        """Whether ``name`` (about ``estimate_s``) ends before the deadline; else it is skipped."""
        if self.elapsed() + estimate_s <= self.deadline_s:
            return True
        self.skip(name, f"{self.left():.0f} s left before --deadline-s {self.deadline_s:.0f}, needs about {estimate_s:.0f} s")
        return False

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = self.elapsed()
        common.log("serve", f"phase {name}: start at {start:.1f} s")
        try:
            yield
        except BaseException as e:
            self.details["failed"] = {"phase": name, "error": f"{type(e).__name__}: {e}", "at_s": round(self.elapsed(), 1)}
            common.log("serve", f"phase {name}: FAILED at {self.elapsed():.1f} s: {type(e).__name__}: {e}")
            self.write()
            raise
        end = self.elapsed()
        self.details["phases"][name] = {"start_s": round(start, 1), "end_s": round(end, 1), "seconds": round(end - start, 1)}
        common.log("serve", f"phase {name}: end at {end:.1f} s ({end - start:.1f} s)")
        self.write()


class Estimates:
    """Rough lower bounds of each phase's seconds (real size on an H100; smoke: tiny), for the
    deadline: a phase is skipped only when even this would pass it."""

    def __init__(self, real: bool, compiled: bool, warm_sizes: int = 1):
        self.real, self.compiled, self.warm_sizes = real, compiled, warm_sizes
        self.s_per_image = (0.8 if compiled else 1.2) if real else 0.1

    def mixed_step(self) -> float:
        return (120 if self.compiled else 20) if self.real else 5

    def reference(self, batch: int, calls: int) -> float:
        return ((90 if self.compiled else 10) if self.real else 2) + batch * calls * self.s_per_image

    def app(self) -> float:
        """Start-up: a compiled replica compiles each warmed batch size cold (about 100 s each on an
        H100: the render job's UNet + VAE took 150 s, and a replica warming four sizes was not ready
        after 6.5 minutes)."""
        return (60 + 100 * self.warm_sizes if self.compiled else 40) if self.real else 10

    def single(self, n: int) -> float:
        return n * ((1.5 if self.compiled else 5) if self.real else 0.5)

    def drain(self, clients: int) -> float:
        """After the last request is sent: the requests in flight, then Serve's shutdown."""
        return clients * self.s_per_image + (10 if self.real else 5)


def int_list(ap, flag: str, text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        ap.error(f"{flag}: expected a comma list of integers, got {text!r}")
    if not values or any(v < 1 for v in values):
        ap.error(f"{flag}: expected positive integers, got {text!r}")
    return values


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny SD at 64², 2 steps: checks the code path, numbers meaningless")
    ap.add_argument("--adapters", type=int, default=None, help="published adapters (GPU default 20)")
    ap.add_argument("--concurrency", default=None, help="client threads of each load level, run one after another against the same app, "
                                                        "e.g. 8,32 (GPU default 8, smoke 2,3); the headline is the first level's")
    ap.add_argument("--requests", default=None, help="requests per level: a comma list matching --concurrency, or one number for the "
                                                     "first level (default: GPU 48, smoke 6) with 3x clients for each later one")
    ap.add_argument("--single", type=int, default=None, help="sequential single requests before the load, one client (GPU default 5, smoke 2; 0: none)")
    ap.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent s")
    ap.add_argument("--no-adapter-share", type=float, default=0.1)
    ap.add_argument("--max-seconds", type=float, default=300.0, help="stop sending after this long, per level (also capped by --deadline-s)")
    ap.add_argument("--no-app", action="store_true", help="measure only what comes before the app (--mixed-step, the reference)")
    ap.add_argument("--deadline-s", type=float, default=None,
                    help="seconds from the start by which every phase should be done; a phase that would not be is skipped, a level's "
                         "sending is cut short (GPU default 560: one 10-minute device call, less bench/run.py's margin; smoke 840, inside bench/run.py's 900 s)")
    ap.add_argument("--max-batch-size", type=int, default=4, help="http.max_batch_size and batching.max_batch (the step loop's batch)")
    ap.add_argument("--options", default="", help="engine speed options of the app and the reference: compile,cudagraphs,fuse_qkv,channels_last,compile_vae,fp8")
    ap.add_argument("--ref-batch", type=int, default=None, help="the reference stream's batch (default --max-batch-size; issue 22 compares "
                                                                "with the engine's best bulk batch, 16 on an H100)")
    ap.add_argument("--ref-calls", type=int, default=None, help="batches in the reference stream (GPU default 6)")
    ap.add_argument("--skip-reference", action="store_true", help="no reference stream (the ratio is then null)")
    ap.add_argument("--pad-to", default=None, help="batching.pad_to: the step batch sizes a replica compiles and warms before it "
                    "takes requests (default: the powers of two below --max-batch-size, and it); each costs a cold compile")
    ap.add_argument("--shared-graph", action="store_true", help="batching.shared_graph: one step graph for every --pad-to size (the batch "
                                                                  "dimension dynamic), compiled once; CUDA graphs still recorded per size")
    ap.add_argument("--no-fuse-alone", action="store_true", help="batching.fuse_alone off: a request alone in the step loop runs on the "
                                                                  "adapter slots instead of the base step with its adapters fused")
    ap.add_argument("--slot-targets", default=None,
                    help="batching.slot_targets: comma list of UNet module names given adapter slots, or 'all' (every type adapters "
                         "may target); default: what the published adapters record (their attention projections)")
    ap.add_argument("--batching", choices=("step", "request"), default="step",
                    help="the app's batching.mode: step-level with per-sample adapters (default), or request batches with fused adapters")
    ap.add_argument("--mixed-step", action="store_true", help="also time one UNet step of --max-batch-size samples with as many different "
                                                                "adapters against the base step, and the slot loads (before the app starts; "
                                                                "always with --smoke)")
    ap.add_argument("--profile", action="store_true", help="with --mixed-step: the device time of the base and the mixed step by "
                                                           "kernel (torch.profiler), top kernels in the JSON")
    ap.add_argument("--compile-cache", default="", help="engine.compile_cache of the app and the reference: a dir or s3:// prefix that "
                    "a later run (a new replica, the next call on the same machine) loads its compiled graphs from (default: none, all cold)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write this headline's JSON here (the partial one after each phase too)")
    args = ap.parse_args(argv)
    # `timeout` (a device call's limit) sends SIGTERM: end through the finally blocks (Serve shut
    # down, the partial result already written) instead of dying mid-phase
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    t0 = time.perf_counter()
    real = not args.smoke
    device = "cuda" if real else "cpu"
    steps, size, rank = (30, 1024, 16) if real else (2, 64, 4)
    adapters = args.adapters or (20 if real else 4)
    levels = int_list(ap, "--concurrency", args.concurrency or ("8" if real else "2,3"))
    if len(set(levels)) != len(levels):
        ap.error(f"--concurrency: each level once, got {args.concurrency!r}")
    counts = int_list(ap, "--requests", args.requests or ("48" if real else "6"))
    if len(counts) == 1:
        counts += [3 * c for c in levels[1:]]
    if len(counts) != len(levels):
        ap.error(f"--requests: {len(counts)} numbers for {len(levels)} levels of --concurrency; give one, or one per level")
    n_single = (5 if real else 2) if args.single is None else args.single
    ref_batch = args.ref_batch or args.max_batch_size
    ref_calls = args.ref_calls or (6 if real else 3)
    deadline_s = (560.0 if real else 840.0) if args.deadline_s is None else args.deadline_s
    options = {o for o in args.options.split(",") if o}
    env = common.device_info(device)
    pad_to = (int_list(ap, "--pad-to", args.pad_to) if args.pad_to
              else sorted({b for b in (1, 2, 4, 8, 16) if b < args.max_batch_size} | {args.max_batch_size}))
    estimate = Estimates(real, "compile" in options, warm_sizes=len(pad_to) if args.batching == "step" and not args.shared_graph else 1)

    from rayimg.config import ServeJob, from_dict, to_dict
    from rayimg.config.train import LORA_TARGETS

    import render as render_bench

    tmp = Path(tempfile.mkdtemp(prefix="rayimg-bench-serve-"))
    registry = str(tmp / "registry")
    names = [f"load-{i:03d}" for i in range(adapters)]
    port = 8000 + random.Random(os.getpid()).randrange(1000)
    engine = to_dict(render_bench.engine_config(options, 1, batch_invariant=not real, compile_cache=args.compile_cache))
    slot_targets = (list(LORA_TARGETS) if args.slot_targets == "all" else [t for t in args.slot_targets.split(",") if t]) if args.slot_targets else None
    job = from_dict(ServeJob, {
        "registry": registry, "model": {"device": device}, "app_name": "bench",
        "defaults": {"steps": steps, "width": size, "height": size, "guidance_scale": 5.0},
        "limits": {"max_width": size, "max_height": size, "max_steps": steps, "max_num_images": 1},
        "engine": engine,
        "http": {"host": "127.0.0.1", "port": port, "max_batch_size": args.max_batch_size, "batch_wait_timeout_s": 0.02,
                 "max_ongoing_requests": max(8, args.max_batch_size), "max_queued_requests": 4 * max(levels) + 8, "request_timeout_s": 600.0},
        "autoscaling": {"min_replicas": 1, "max_replicas": 1},
        "batching": {"mode": args.batching, "max_batch": args.max_batch_size,
                     "pad_to": pad_to, "slot_targets": slot_targets, "shared_graph": args.shared_graph, "fuse_alone": not args.no_fuse_alone,
                     "num_slots": 16, "max_rank": rank},
        "adapter_cache": {"disk_dir": str(tmp / "adapter-cache"), "cpu_max_adapters": 16, "gpu_max_adapters": 4, "refresh_s": 30.0},
        "num_cpus_per_replica": 1.0 if real else 0.5, "num_gpus_per_replica": 1.0 if real else 0.0, "num_cpus_ingress": 0.25,
    })

    details = {"adapters": len(names), "zipf_s": args.zipf, "rank": rank, "size": size, "steps": steps, "options": sorted(options),
               "compile_cache": args.compile_cache or None, "slot_targets": slot_targets or list(TARGETS),
               "batching": args.batching, "max_batch_size": args.max_batch_size, "pad_to": pad_to, "shared_graph": args.shared_graph, "fuse_alone": not args.no_fuse_alone, "concurrency_levels": levels, "requests_per_level": counts,
               "mixed_adapter_step": None, "reference_measure": None, "reference_batch": None if args.skip_reference else ref_batch,
               "single_request_s": None, "levels": {}}
    partial_path = Path(args.json) if args.json else (common.out_dir() if real else tmp) / "serve_partial.json"

    def result(partial: bool) -> dict:
        first = details["levels"].get(str(levels[0]))
        ref = details["reference_measure"]
        details["partial"] = partial
        return common.headline(
            "serve", figure=first and first["images_per_s"], unit="images/s",
            what=f"Serve app over HTTP ({args.batching} batching), {levels[0]} clients"
                 f"{' (levels ' + ','.join(map(str, levels)) + ')' if len(levels) > 1 else ''}, {len(names)} adapters (Zipf {args.zipf}), "
                 f"{size}², {steps} steps, options {','.join(sorted(options)) or 'none'}",
            # the steady rate (from the stream's first yield on): a short stream's whole-run rate is dragged by its first batch
            reference=ref and (ref.get("steady_images_per_s") or ref["images_per_s"]),
            reference_what=(f"the render engine's bulk stream, same engine settings, batch {ref_batch}, no adapters, "
                            f"{'steady rate' if ref.get('steady_images_per_s') else 'whole-stream rate'}" if ref else
                            "none (" + ("skipped: " + details["skip_reasons"]["reference"] if "reference" in details["skip_reasons"] else "not measured yet") + ")"),
            device=env, command=common.command_line(), seconds=phases.elapsed(), details=details)

    phases = Phases(t0, deadline_s, lambda: common.write_json(partial_path, result(partial=True)), details)
    common.log("serve", f"levels {levels} with {counts} requests, {n_single} single, deadline {deadline_s:.0f} s; partial results: {partial_path}")

    if args.mixed_step or args.smoke:
        if phases.fits("mixed_step", estimate.mixed_step()):
            with phases("mixed_step"):
                details["mixed_adapter_step"] = mixed_adapter_step(job, real, rank=rank, device=device, profile=args.profile)
                free_device(device)  # its models are gone with its frame
            common.log("serve", f"mixed-adapter step: {json.dumps(details['mixed_adapter_step'])}")
    if args.skip_reference:
        phases.skip("reference", "--skip-reference")
    elif phases.fits("reference", estimate.reference(ref_batch, ref_calls)):
        with phases("reference"):
            details["reference_measure"] = engine_bulk_rate(job, real, batch=ref_batch, calls=ref_calls, device=device)
        ref = details["reference_measure"]
        common.log("serve", f"reference: engine bulk {ref['images_per_s']:.3f} images/s at batch {ref_batch} (steady {ref['steady_images_per_s']})")

    later = (["single"] if n_single else []) + [f"level {c}" for c in levels]
    import ray

    try:
        url = None
        if args.no_app:
            for name in ["app"] + later:
                phases.skip(name, "--no-app")
        elif phases.fits("app", estimate.app()):
            with phases("app"):
                url = start_app(job, real, names, rank, details)
        else:
            for name in later:
                phases.skip(name, "the app did not start")
        if url and n_single:
            if phases.fits("single", estimate.single(n_single)):
                with phases("single"):
                    before = counters(url)
                    details["single_request_s"] = single_requests(url, n_single, names[0])
                    details["single_request_s"].update(swap_summary(counter_delta(before, counters(url))))
                s = details["single_request_s"]
                common.log("serve", f"single requests: p50 {s['p50']} s (no adapter {s['p50_no_adapter']} s: {s['p50_no_adapter_no_swap']} s with no swap, "
                                          f"{s['p50_no_adapter_after_adapter']} s after an adapter; adapter {s['p50_adapter']} s), "
                                    f"min {s['min']} s, max {s['max']} s; {s['adapter_swaps']} swaps, mean {s['mean_swap_ms']} ms; "
                                    f"split (medians) {s['split_median_s']}; no swap {s['split_median_no_swap_s']}")
        rng = random.Random(args.seed)
        weights = zipf_weights(len(names), args.zipf)
        for li, (clients, n_requests) in enumerate(zip(levels, counts)):
            plan = [{"prompt": f"a red circle, level {clients}, request {i}", "seed": 10_000 + 1000 * li + i,
                     "adapters": [] if rng.random() < args.no_adapter_share else [{"name": rng.choices(names, weights)[0], "scale": 0.8}]}
                    for i in range(n_requests)]
            if not url:
                continue
            name, drain = f"level {clients}", estimate.drain(clients)
            if not phases.fits(name, drain + MIN_SENDING_S):
                continue
            max_seconds = min(args.max_seconds, phases.left() - drain)
            with phases(name):
                before = counters(url)
                with common.GpuSampler() as gpu:
                    results, elapsed = load_test(url, plan, clients, max_seconds)
                delta = counter_delta(before, counters(url))
                level = details["levels"][str(clients)] = level_summary(results, elapsed, delta, clients=clients, planned=n_requests,
                                                                        max_seconds=max_seconds, batching=args.batching, gpu=gpu.summary())
                if li == 0:  # the headline's level, also at the top level (the keys from before the levels)
                    details.update({k: level[k] for k in HEADLINE_LEVEL_KEYS})
            common.log("serve", f"{clients} clients: {level['ok']}/{level['requests_sent']} ok ({n_requests} planned) in {level['seconds']} s, "
                                f"{level['images_per_s']} images/s, p50 {level['latency_s']['p50']} s, p95 {level['latency_s']['p95']} s, "
                                f"errors {level['errors']}, mean batch {level['mean_batch_size']}; split (medians) {level['split_median_s']}")
    finally:
        if ray.is_initialized():
            from ray import serve

            serve.shutdown()
            ray.shutdown()

    out = result(partial=False)
    for clients, level in details["levels"].items():
        print(f"{clients} clients: {level['images_per_s']} images/s, latency p50 {level['latency_s']['p50']} s, p95 {level['latency_s']['p95']} s, "
              f"errors {level['errors']}; {level['adapter_swaps']} swaps, mean batch {level['mean_batch_size']}", flush=True)
    if details["skipped"]:
        print(f"skipped: {', '.join(details['skipped'])}", flush=True)
    common.report(out, args.json)
    if not args.json:
        common.write_json(partial_path, out)
    return out


def start_app(job, real: bool, names: list[str], rank: int, details: dict) -> str:
    """Publish the adapters, start a local Ray and the app, send one warm-up request (first-call
    costs); the app's URL."""
    import ray
    import requests
    import torch

    from serving.app import start

    t = time.perf_counter()
    if real:
        from diffusers import UNet2DConditionModel

        from sdxl_random import sdxl_config

        with torch.device("meta"):
            unet = UNet2DConditionModel(**{k: v for k, v in sdxl_config("unet").items() if not k.startswith("_")})
        model_id, model_hash, factory = "sdxl-random-init", "random", real_size_renderer
    else:
        from rayimg.models.loader import load_model

        loaded = load_model(job.model)
        unet, model_id, model_hash, factory = loaded.pipeline.unet, loaded.model_id, loaded.model_hash, None
    publish_random_adapters(job.registry, names, lora_shapes(unet), rank, model_id, model_hash)
    common.log("serve", f"published {len(names)} rank-{rank} adapters in {time.perf_counter() - t:.1f}s")

    # the replica's lines (its warm-up, compile cache, errors) in this bench's log
    ray.init(address="local", num_cpus=os.cpu_count() if real else 2, include_dashboard=False, log_to_driver=True, configure_logging=False)
    t = time.perf_counter()
    url = start(job, renderer_factory=factory)
    details["app_startup_s"] = round(time.perf_counter() - t, 1)
    assert url.startswith("http://127.0.0.1:"), url  # loopback only
    common.log("serve", f"app up at {url} in {details['app_startup_s']:.1f}s")
    # one request alone, no adapter: its split is kept, so a call cut before the single requests
    # still says where one request's time goes
    with requests.Session() as session:
        warm = post(session, url, {"prompt": "warm-up", "seed": 1, "adapters": []}, timeout=900)
    if warm["status"] != 200:
        raise RuntimeError(f"the warm-up request failed: {warm['status']}")  # an HTTP status or the client's exception
    details["app_warmup_s"] = round(warm["latency"], 3)
    details["app_warmup_split_s"] = warm["split"]
    common.log("serve", f"warm-up request: {details['app_warmup_s']:.2f}s; split {warm['split']}")
    return url


if __name__ == "__main__":
    main()
