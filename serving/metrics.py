"""Prometheus metrics of the HTTP service (GET /metrics).

The ingress counts requests, statuses and latencies itself. The generator replicas' counters
(adapter downloads and loads, cache hits per tier, evictions, batches, swaps, image-cache hits and
rejects, cancelled requests)
travel back with every response as a snapshot numbered by the replica; the ingress keeps the
newest snapshot of each replica and exports it, labelled by replica. Asking the replicas
directly would wake a deployment scaled to zero.
"""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)


class ReplicaStats:
    """Newest counter snapshot per generator replica."""

    def __init__(self):
        self._lock = threading.Lock()
        self._latest: dict[str, dict] = {}

    def update(self, snapshot: dict | None) -> None:
        if not snapshot:
            return
        with self._lock:
            old = self._latest.get(snapshot["replica"])
            if old is None or snapshot["seq"] > old["seq"]:
                self._latest[snapshot["replica"]] = snapshot

    def snapshots(self) -> list[dict]:
        with self._lock:
            return list(self._latest.values())

    def collect(self):
        snaps = self.snapshots()
        counters = {
            "rayimg_adapter_downloads": ("adapter files downloaded from storage", lambda s: s["store"]["downloads"]),
            "rayimg_adapter_loads": ("adapter files read into CPU tensors", lambda s: s["store"]["loads"]),
            "rayimg_images_rendered": ("images rendered by the engine", lambda s: s["images_rendered"]),
            "rayimg_image_cache_hits": ("images answered from the image cache", lambda s: s["image_cache_hits"]),
            "rayimg_batches": ("engine batches run", lambda s: s["batches"]),
            "rayimg_adapter_swaps": ("adapter sets fused into the weights", lambda s: s["swaps"]),
            "rayimg_adapter_set_loads": ("adapter sets loaded for multiplexing", lambda s: s["set_loads"]),
            "rayimg_requests_cancelled": ("requests whose rendering was stopped or skipped: client gone or deadline passed",
                                          lambda s: s.get("cancelled", 0)),
            "rayimg_image_cache_rejected": ("cached images ignored: not decodable or not their key's image",
                                            lambda s: s.get("image_cache_rejected", 0)),
            "rayimg_denoise_steps": ("UNet calls of the step loop (one denoising step of the running batch)",
                                     lambda s: s.get("step_loop", {}).get("steps", 0)),
            "rayimg_denoise_samples": ("samples in those calls, summed: / rayimg_denoise_steps = mean batch",
                                       lambda s: s.get("step_loop", {}).get("samples", 0)),
        }
        for name, (doc, get) in counters.items():
            family = CounterMetricFamily(name, doc, labels=["replica"])
            for s in snaps:
                family.add_metric([s["replica"]], float(get(s)))
            yield family
        swap = CounterMetricFamily("rayimg_adapter_swap_seconds", "seconds spent fusing adapter sets", labels=["replica"])
        for s in snaps:
            swap.add_metric([s["replica"]], float(s["swap_seconds"]))
        yield swap
        for what in ("hits", "misses", "evictions"):
            family = CounterMetricFamily(f"rayimg_adapter_cache_{what}", f"adapter cache {what} per tier", labels=["replica", "tier"])
            for s in snaps:
                for tier in ("disk", "cpu", "device"):
                    family.add_metric([s["replica"], tier], float(s["store"][tier][what]))
            yield family
        count = GaugeMetricFamily("rayimg_adapter_cache_adapters", "adapters held per tier", labels=["replica", "tier"])
        size = GaugeMetricFamily("rayimg_adapter_cache_bytes", "bytes held per tier", labels=["replica", "tier"])
        for s in snaps:
            for tier, (n, nbytes) in s["tiers"].items():
                count.add_metric([s["replica"], tier], float(n))
                size.add_metric([s["replica"], tier], float(nbytes))
        yield count
        yield size


class ServeMetrics:
    """The ingress's registry: its own request metrics plus the replicas' snapshots."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("rayimg_http_requests", "HTTP requests by route and status", ["route", "status"], registry=self.registry)
        self.latency = Histogram("rayimg_http_request_seconds", "request latency by route", ["route"], buckets=LATENCY_BUCKETS,
                                 registry=self.registry)
        self.in_flight = Gauge("rayimg_http_requests_in_flight", "requests being answered", registry=self.registry)
        self.images = Counter("rayimg_images_served", "images returned, by source", ["source"], registry=self.registry)
        self.replicas = ReplicaStats()
        self.registry.register(self.replicas)

    def text(self) -> bytes:
        return generate_latest(self.registry)
