"""trtcal.storage: the content-addressed calibration cache store on fsspec (local, S3, memory).

Public API:
    CacheStore(url, *, namespace=None, read_only=False, read_from=(), on_corrupt="fail", **storage_options)
        .get(key, lazy=False) -> Entry | None      verified lookup (then read-from stores)
        .publish(key, artifacts, key_inputs=..., extra=None) -> Entry   atomic, create-only commit
        .ls(EntryFilter) / .verify(EntryFilter) / .gc(older_than=...) / .export_trt_cache(key, trt_version=...)
    Entry: .key .namespace .manifest .url .names .read(name) .download(name, dest) .verify()
    compute_cache_key(inputs) -> str, KeyInputs, canonical_json
    StoreConfig, EntryFilter, EntryInfo, VerifyResult, GcReport, retarget_trt_cache

See docs/storage.md for the layout, the commit protocol and the security rules.
"""

from trtcal.storage.entry import Entry
from trtcal.storage.keys import KeyInputs, canonical_json, compute_cache_key
from trtcal.storage.names import DEFAULT_NAMESPACE
from trtcal.storage.records import EntryFilter, EntryInfo, GcReport, StoreConfig, VerifyResult
from trtcal.storage.store import CacheStore
from trtcal.storage.trt_export import retarget_trt_cache

__all__ = [
    "DEFAULT_NAMESPACE",
    "CacheStore",
    "Entry",
    "EntryFilter",
    "EntryInfo",
    "GcReport",
    "KeyInputs",
    "StoreConfig",
    "VerifyResult",
    "canonical_json",
    "compute_cache_key",
    "retarget_trt_cache",
]
