"""Helpers of the Serve benchmarks: random LoRA adapters for a UNet published to a registry,
percentiles, and Prometheus counters read from the app's /metrics."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def lora_shapes(unet) -> dict[str, tuple[int, int]]:
    """``module path -> (out, in)`` of every attention projection LoRA targets (works on the meta device)."""
    out = {}
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and any(name.endswith("." + t) for t in TARGETS):
            out[name] = (module.out_features, module.in_features)
    return out


def random_lora(shapes: dict[str, tuple[int, int]], rank: int, seed: int, dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    """A diffusers/PEFT-format UNet LoRA state dict (``unet.<module>.lora_A/B.weight``)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for path, (out_features, in_features) in shapes.items():
        sd[f"unet.{path}.lora_A.weight"] = (torch.randn(rank, in_features, generator=g) / in_features ** 0.5).to(dtype)
        sd[f"unet.{path}.lora_B.weight"] = (torch.randn(out_features, rank, generator=g) * 0.01).to(dtype)
    return sd


def publish_random_adapters(registry: str, names: list[str], shapes: dict, rank: int, model_id: str, model_hash: str) -> None:
    from safetensors.torch import save_file

    from rayimg.storage import Storage
    from rayimg.train.registry import publish_adapter

    storage = Storage()
    for i, name in enumerate(names):
        with tempfile.TemporaryDirectory() as d:
            save_file(random_lora(shapes, rank, seed=1000 + i), str(Path(d) / "pytorch_lora_weights.safetensors"))
            publish_adapter(storage, registry, name, None, d, {"base_model": {"id": model_id, "hash": model_hash}, "method": "lora",
                                                              "rank": rank, "alpha": rank, "target_modules": list(TARGETS)})


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    v = sorted(values)
    k = (len(v) - 1) * q / 100.0
    lo, hi = int(k), min(int(k) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


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


def dump(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, sort_keys=True))
