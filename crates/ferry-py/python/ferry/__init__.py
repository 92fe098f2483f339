"""ferry from Python: SpecForge-compatible refs and specs, and ferry's feature stores.

>>> import numpy as np, ferry
>>> store = ferry.open_store("mem://demo")
>>> ref = store.put("run0:task0", {"input_ids": np.arange(4, dtype=np.int64)}, {"run_id": "run0"})
>>> with store.get(ref) as sample:
...     sample["input_ids"].tolist()
[0, 1, 2, 3]

The native module is ``ferry._ferry`` (Rust, pyo3); this package re-exports it with the
exception tree (``ferry._errors``) and the array helpers (``ferry._arrays``). See
``crates/ferry-py/README.md`` for the API and the bfloat16 representation.
"""

from collections.abc import Mapping as _Mapping

from ferry._arrays import bfloat16_dtype, to_dlpack, to_torch
from ferry._collective import LocalCollective, TorchCollective
from ferry._errors import (
    AuthError,
    BackendError,
    CollectiveError,
    CorruptError,
    DrainIncompleteError,
    Error,
    FailureHandlingError,
    InvalidArgumentError,
    IoError,
    JsonError,
    MissingFeatureKeysError,
    NotAvailableError,
    NotFoundError,
    PeerFailedError,
    PeerLostError,
    ProtocolError,
    RemoteError,
    ShortReadError,
    StaleRefError,
    StoreFullError,
    TimeoutError,
    UnknownDtypeError,
    UseAfterFreeError,
)
from ferry._ferry import (
    DTYPES,
    Batch,
    Batches,
    ConsumerConfig,
    DLPackTensor,
    Daemon,
    FeatureHandle,
    FeatureLoader,
    FeatureSpec,
    Lease,
    OnlineRank,
    Producer,
    RefChannel,
    SampleRef,
    SampleRefQueue,
    SocketCollective,
    Store,
    __version__,
    offline_refs,
    open_store,
    open_store_with_backend,
    read_manifest,
    shard_view,
    start_daemon,
    write_manifest,
)

_Mapping.register(Lease)
_Mapping.register(Batch)

__all__ = [
    "DTYPES",
    "AuthError",
    "BackendError",
    "Batch",
    "Batches",
    "CollectiveError",
    "ConsumerConfig",
    "CorruptError",
    "DLPackTensor",
    "Daemon",
    "DrainIncompleteError",
    "Error",
    "FailureHandlingError",
    "FeatureHandle",
    "FeatureLoader",
    "FeatureSpec",
    "InvalidArgumentError",
    "IoError",
    "JsonError",
    "Lease",
    "LocalCollective",
    "MissingFeatureKeysError",
    "NotAvailableError",
    "NotFoundError",
    "OnlineRank",
    "PeerFailedError",
    "PeerLostError",
    "Producer",
    "ProtocolError",
    "RefChannel",
    "RemoteError",
    "SampleRef",
    "SampleRefQueue",
    "ShortReadError",
    "SocketCollective",
    "StaleRefError",
    "Store",
    "StoreFullError",
    "TorchCollective",
    "UnknownDtypeError",
    "UseAfterFreeError",
    "__version__",
    "bfloat16_dtype",
    "offline_refs",
    "open_store",
    "open_store_with_backend",
    "read_manifest",
    "shard_view",
    "start_daemon",
    "to_dlpack",
    "to_torch",
    "write_manifest",
]
# ferry.TimeoutError is deliberately not in __all__: `from ferry import *` must not shadow the
# builtin (it derives from it, so `except TimeoutError` still catches ferry's).
