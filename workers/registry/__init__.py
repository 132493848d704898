"""The model registry: LightGBM model files and their cards in the NATS Object Store, the
active version per (feed, symbol, timeframe) in a KV bucket. A library, not a worker: the
trainer writes it, the model-scorer reads it, ``tickwire models`` inspects and changes it.
"""

from workers.registry.gate import LOWER_IS_BETTER, should_promote
from workers.registry.store import (
    Promotion,
    Registry,
    RegistryConflict,
    RegistryError,
    active_key,
    bucket_name,
    load_booster,
    pointer_of,
    version_of,
)

__all__ = [
    "LOWER_IS_BETTER",
    "Promotion",
    "Registry",
    "RegistryConflict",
    "RegistryError",
    "active_key",
    "bucket_name",
    "load_booster",
    "pointer_of",
    "should_promote",
    "version_of",
]
