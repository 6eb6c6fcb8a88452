"""Adapters from the registry, through bounded cache tiers: object storage -> local disk -> CPU
-> device (GPU).

Each tier is LRU-bounded by count and bytes. The device tier holds copies of the CPU weights on
the accelerator (packed, one transfer: what makes a warm swap fast); it is skipped when the
device is the CPU. Concurrent requests for the same adapter share one download and one load.
The file's sha256 must equal the one in ``adapter.json``; only safetensors is ever read, never
through a link leaving a local registry, and weights that are not finite are refused
(:class:`AdapterCorrupt` for each, naming the adapter).
``latest`` is re-resolved every ``refresh_s`` seconds, so newly published versions are picked
up without a restart.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Generator, Iterator

from rayimg.config import AdapterCacheConfig
from rayimg.registry.versions import AdapterCorrupt, AdapterNotFound, check_inside_registry, resolve_adapter
from rayimg.render.adapters import LORA_WEIGHT_NAME as WEIGHT_FILE
from rayimg.render.adapters import LoraError, LoraWeights, load_lora_bytes, load_lora_file
from rayimg.storage import Storage, join

__all__ = ["AdapterStore", "AdapterNotFound", "AdapterCorrupt", "WEIGHT_FILE"]


@dataclass
class TierStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0


@dataclass
class StoreStats:
    downloads: int = 0
    loads: int = 0
    disk: TierStats = field(default_factory=TierStats)
    cpu: TierStats = field(default_factory=TierStats)
    device: TierStats = field(default_factory=TierStats)

    def as_dict(self) -> dict:
        return asdict(self)


class AdapterStore:
    """Resolve and load adapters by (name, version); thread-safe."""

    def __init__(self, storage: Storage, registry: str, cache: AdapterCacheConfig | None = None, *, disk_dir: str | None = None,
                 unet_config=None):
        """``cache`` bounds the tiers (default :class:`~rayimg.config.AdapterCacheConfig`'s);
        ``disk_dir`` overrides its ``disk_dir``; ``unet_config`` lets adapters be checked against
        the UNet they will be fused into."""
        self.storage = storage
        self.registry = registry
        self.cache = cache = cache or AdapterCacheConfig()
        root = disk_dir or cache.disk_dir or os.path.join(os.environ.get("RAYIMG_CACHE") or os.path.expanduser("~/.cache/rayimg"), "adapters")
        self.disk_dir = Path(root)
        self.unet_config = unet_config
        self.stats = StoreStats()
        self._lock = threading.Lock()
        self._inflight: dict[tuple[str, str], threading.Lock] = {}
        self._device: OrderedDict[tuple[str, str, str], LoraWeights] = OrderedDict()
        self._cpu: OrderedDict[tuple[str, str], LoraWeights] = OrderedDict()
        self._disk: OrderedDict[tuple[str, str], tuple[Path, int]] = OrderedDict()
        self._latest: dict[str, tuple[str, float]] = {}
        self._metadata: dict[tuple[str, str], dict] = {}

    # ------------------------------------------------------------------ versions
    def resolve(self, name: str, version: str | None = None) -> str:
        """The concrete version of ``name`` (``None`` = latest, cached for ``refresh_s``)."""
        if version is not None:
            self.metadata(name, str(version))
            return str(version)
        now = time.monotonic()
        with self._lock:
            cached = self._latest.get(name)
        if cached and now - cached[1] < self.cache.refresh_s:
            return cached[0]
        resolved, _uri, meta = resolve_adapter(self.storage, self.registry, name, None)
        with self._lock:
            self._latest[name] = (resolved, now)
            self._metadata[(name, resolved)] = meta
        return resolved

    def metadata(self, name: str, version: str) -> dict:
        key = (name, str(version))
        with self._lock:
            if key in self._metadata:
                return self._metadata[key]
        _v, _uri, meta = resolve_adapter(self.storage, self.registry, name, version)
        with self._lock:
            self._metadata[key] = meta
        return meta

    # ------------------------------------------------------------------ loading
    def get(self, name: str, version: str | None = None) -> tuple[str, LoraWeights]:
        """(version, CPU weights) of an adapter, through the tiers."""
        version, weights, _tier = self._get(name, version)
        return version, weights

    def _get(self, name: str, version: str | None) -> tuple[str, LoraWeights, str]:
        version = self.resolve(name, version)
        key = (name, version)
        with self._lock:
            if (weights := self._cpu_hit(key)) is not None:
                return version, weights, "cpu"
            gate = self._inflight.setdefault(key, threading.Lock())
        with gate:  # one download and one load per adapter, however many ask at once
            with self._lock:
                if (weights := self._cpu_hit(key)) is not None:
                    return version, weights, "cpu"
            try:
                weights, tier = _run(self._load(name, version))
            finally:
                with self._lock:
                    self._inflight.pop(key, None)
            self._keep(key, weights)
        return version, weights, tier

    def _cpu_hit(self, key: tuple[str, str]) -> LoraWeights | None:
        """The CPU tier's weights for ``key`` (a hit, counted), or None; the lock is held."""
        if key in self._cpu:
            self._cpu.move_to_end(key)
            self.stats.cpu.hits += 1
            return self._cpu[key]
        return None

    def get_on(self, name: str, version: str | None, device) -> tuple[str, LoraWeights, str]:
        """(version, weights on ``device``, tier it came from: 'device', 'cpu', 'disk' or
        'storage'). On the CPU the device tier is the CPU tier."""
        import torch

        device = torch.device(device)
        version = self.resolve(name, version)
        key = (name, version, str(device))
        if device.type != "cpu":
            with self._lock:
                if key in self._device:
                    self._device.move_to_end(key)
                    self.stats.device.hits += 1
                    return version, self._device[key], "device"
                self.stats.device.misses += 1
        version, weights, tier = self._get(name, version)
        if device.type == "cpu":
            return version, weights, tier
        weights = weights.to(device)
        with self._lock:
            self._device[key] = weights
            self._device.move_to_end(key)
            while len(self._device) > 1 and (len(self._device) > self.cache.gpu_max_adapters
                                             or sum(w.nbytes for w in self._device.values()) > self.cache.gpu_max_bytes):
                self._device.popitem(last=False)
                self.stats.device.evictions += 1
        return version, weights, tier

    def load_steps(self, name: str, version: str | None = None) -> Iterator[None]:
        """Bring an adapter to the CPU tier in parts, yielding between them (resolve; download;
        read and verify; parse; pack), so a caller can spread the work over idle moments (the
        render stream runs one part per denoising step of the batch before). Afterwards
        :meth:`get` finds it in the CPU tier. Errors are raised as :meth:`get` raises them."""
        version = self.resolve(name, version)
        key = (name, version)
        with self._lock:
            if key in self._cpu:
                return
        yield
        weights, _tier = yield from self._load(name, version)
        self._keep(key, weights)

    def _load(self, name: str, version: str) -> Generator[None, None, tuple[LoraWeights, str]]:
        """(packed CPU weights, tier the file came from: 'disk' or 'storage'), yielding between
        the download, the check and the parse."""
        path, tier, data = yield from self._on_disk_steps(name, version)
        yield
        # the file's digest was checked against adapter.json on its way to the disk tier;
        # the bytes read for that check are parsed as they are (the file is read once)
        sha = (self.metadata(name, version).get("weights") or {}).get(WEIGHT_FILE)
        label = f"{name}@{version}"
        try:
            if data is not None:
                weights = load_lora_bytes(data, name=label, unet_config=self.unet_config, sha256=sha)
            else:
                weights = load_lora_file(path, name=label, unet_config=self.unet_config, sha256=sha)
        except LoraError as e:  # the file itself cannot be read as a LoRA: the entry is broken
            raise AdapterCorrupt(f"adapter {name!r} version {version!r}: {WEIGHT_FILE} cannot be read: {e}") from None
        del data
        check_finite(weights, f"adapter {name!r} version {version!r}")
        yield
        # one flat buffer per dtype, page-locked when a GPU is present: a warm swap is then one
        # fast host-to-device copy instead of a gather plus a pageable copy
        return weights.packed(pin=_can_pin()), tier

    def _keep(self, key: tuple[str, str], weights: LoraWeights) -> None:
        """Put freshly loaded weights in the CPU tier (unless a concurrent load got there first)."""
        with self._lock:
            if key not in self._cpu:
                self.stats.cpu.misses += 1
                self.stats.loads += 1
                self._cpu[key] = weights
                self._evict_cpu()

    def _on_disk_steps(self, name: str, version: str) -> Generator[None, None, tuple[Path, str, bytes | None]]:
        """The verified local file, where it came from ('disk' or 'storage'), and its bytes when
        they were read to verify it (None when the file was verified before); yields between
        the download and the check."""
        key = (name, version)
        meta = self.metadata(name, version)
        expected = (meta.get("weights") or {}).get(WEIGHT_FILE)
        if not expected:
            raise AdapterCorrupt(f"adapter {name!r} version {version!r}: adapter.json records no sha256 for {WEIGHT_FILE}")
        path = self.disk_dir / name / version / WEIGHT_FILE
        with self._lock:
            known = key in self._disk
        if known or path.is_file():
            data = None if known else path.read_bytes()
            if known or hashlib.sha256(data).hexdigest() == expected:
                with self._lock:
                    self.stats.disk.hits += 1
                    self._disk[key] = (path, path.stat().st_size)
                    self._disk.move_to_end(key)
                return path, "disk", data
        with self._lock:
            self.stats.disk.misses += 1
        uri = join(self.registry, "adapters", name, version, WEIGHT_FILE)
        check_inside_registry(self.registry, uri, f"adapter {name!r} version {version!r}")
        tmp = path.with_name(f".{WEIGHT_FILE}.{os.getpid()}.{threading.get_ident()}.download")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.storage.download_file(uri, tmp)
        except FileNotFoundError:
            raise AdapterNotFound(f"adapter {name!r} version {version!r}: {uri} is missing") from None
        with self._lock:
            self.stats.downloads += 1
        try:
            yield
        except GeneratorExit:  # abandoned between the parts: no half-checked file is left
            tmp.unlink(missing_ok=True)
            raise
        data = tmp.read_bytes()
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected:
            tmp.unlink(missing_ok=True)
            raise AdapterCorrupt(f"adapter {name!r} version {version!r}: sha256 of {WEIGHT_FILE} is {actual[:12]}…, "
                                 f"adapter.json says {expected[:12]}…; refusing to load it")
        os.replace(tmp, path)
        with self._lock:
            self._disk[key] = (path, path.stat().st_size)
            self._evict_disk()
        return path, "storage", data

    # ------------------------------------------------------------------ bounds
    def _evict_cpu(self) -> None:
        while self._cpu and (len(self._cpu) > self.cache.cpu_max_adapters
                                or sum(w.nbytes for w in self._cpu.values()) > self.cache.cpu_max_bytes):
            if len(self._cpu) == 1:
                break  # never evict the adapter just loaded
            self._cpu.popitem(last=False)
            self.stats.cpu.evictions += 1

    def _evict_disk(self) -> None:
        while len(self._disk) > 1 and (len(self._disk) > self.cache.disk_max_adapters
                                       or sum(size for _, size in self._disk.values()) > self.cache.disk_max_bytes):
            (name, version), (path, _size) = self._disk.popitem(last=False)
            shutil.rmtree(path.parent, ignore_errors=True)
            self.stats.disk.evictions += 1

    def cpu_keys(self) -> list[tuple[str, str]]:
        with self._lock:
            return list(self._cpu)

    def tier_sizes(self) -> dict:
        """Adapters and bytes held in each tier now."""
        with self._lock:
            return {"disk": (len(self._disk), sum(size for _, size in self._disk.values())),
                    "cpu": (len(self._cpu), sum(w.nbytes for w in self._cpu.values())),
                    "device": (len(self._device), sum(w.nbytes for w in self._device.values()))}


def check_finite(weights: LoraWeights, label: str) -> None:
    """Raise :class:`AdapterCorrupt` when a LoRA tensor holds NaN or infinity (fused, it would
    turn every image it touches into noise or black)."""
    import torch

    for component, path, layer in weights.items():
        for kind, tensor in (("down", layer.down), ("up", layer.up)):
            if not bool(torch.isfinite(tensor).all()):
                raise AdapterCorrupt(f"{label}: the {kind} weight of {component}.{path} holds NaN or infinite values; refusing to load it")


def _run(steps: Generator):
    """Run a step generator to its end; its return value."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def _can_pin() -> bool:
    import torch

    return torch.cuda.is_available()

