"""The adapter registry, used by train (publish), render and serve (resolve, load).

- :mod:`rayimg.registry.versions`: publish, list and resolve adapters under
  ``<root>/adapters/<name>/<version>/`` (local or s3://), with their ``adapter.json``;
- :mod:`rayimg.registry.store`: :class:`AdapterStore`, which loads published adapters through
  bounded cache tiers (storage -> local disk, sha256 checked -> CPU -> device);
- :mod:`rayimg.registry.compat`: :func:`check_adapter`, whether an adapter can be applied to a
  job's model (a LoRA of the same model family).
"""

from rayimg.registry.compat import AdapterIncompatible, adapter_family, check_adapter, check_published
from rayimg.registry.store import WEIGHT_FILE, AdapterStore
from rayimg.registry.versions import (
    METADATA_NAME,
    AdapterCorrupt,
    AdapterNotFound,
    RegistryError,
    adapter_metadata,
    adapter_uri,
    list_adapters,
    publish_adapter,
    recorded_targets,
    resolve_adapter,
)

__all__ = [
    "AdapterCorrupt", "AdapterIncompatible", "AdapterNotFound", "AdapterStore", "METADATA_NAME", "RegistryError", "WEIGHT_FILE",
    "adapter_family", "adapter_metadata", "adapter_uri", "check_adapter", "check_published", "list_adapters", "publish_adapter", "recorded_targets",
    "resolve_adapter",
]
