"""Type stubs for ferry (the native module ``ferry._ferry`` plus the pure-Python helpers)."""

import builtins
from collections.abc import ItemsView, Iterator, KeysView, Mapping, ValuesView
from os import PathLike
from types import TracebackType
from typing import Any, Literal, final

import numpy

__all__ = [
    "DTYPES",
    "AuthError",
    "BackendError",
    "CollectiveError",
    "CorruptError",
    "Daemon",
    "DrainIncompleteError",
    "Error",
    "FailureHandlingError",
    "FeatureHandle",
    "FeatureSpec",
    "InvalidArgumentError",
    "IoError",
    "JsonError",
    "Lease",
    "MissingFeatureKeysError",
    "NotAvailableError",
    "NotFoundError",
    "PeerFailedError",
    "PeerLostError",
    "ProtocolError",
    "RemoteError",
    "SampleRef",
    "ShortReadError",
    "StaleRefError",
    "Store",
    "StoreFullError",
    "UnknownDtypeError",
    "UseAfterFreeError",
    "__version__",
    "bfloat16_dtype",
    "open_store",
    "start_daemon",
    "to_torch",
]

__version__: str
#: Every dtype ferry stores, by SpecForge's names.
DTYPES: list[str]

_JsonStyle = Literal["compact", "spaced"]
_Bfloat16Mode = Literal["auto", "ml_dtypes", "uint16"]
#: What `Store.put` takes per feature: a numpy array, a torch tensor, or anything
#: `numpy.asarray` accepts.
_ArrayLike = Any

# --- records ---------------------------------------------------------------------------------

@final
class FeatureSpec:
    """One named tensor's description (SpecForge's ``FeatureSpec``). Immutable. The dtype is
    kept as written, so unknown dtypes round-trip."""

    def __new__(
        cls,
        name: str,
        shape: tuple[int, ...] | list[int],
        dtype: str,
        *,
        device_hint: str | None = None,
        required: bool = True,
        target_repr: Literal["logits", "pruned_logits", "hidden_state"] | None = None,
        target_meta: dict[str, Any] | None = None,
    ) -> FeatureSpec: ...
    @staticmethod
    def from_dict(d: dict[str, Any]) -> FeatureSpec:
        """A spec from a dict with SpecForge's keys; unknown keys are a ``JsonError``."""
    @staticmethod
    def from_json(text: str) -> FeatureSpec:
        """A spec from JSON text."""
    def to_dict(self) -> dict[str, Any]:
        """The spec as a dict in SpecForge's key order (shape as a list)."""
    def to_json(self, style: _JsonStyle = "compact") -> str:
        """The spec as Python's ``json.dumps`` writes it (``"compact"``: ``separators=(",", ":")``)."""
    @property
    def name(self) -> str: ...
    @property
    def shape(self) -> tuple[int, ...]: ...
    @property
    def dtype(self) -> str: ...
    @property
    def device_hint(self) -> str | None: ...
    @property
    def required(self) -> bool: ...
    @property
    def target_repr(self) -> str | None: ...
    @property
    def target_meta(self) -> dict[str, Any]: ...
    @property
    def numel(self) -> int:
        """Number of elements (1 for a 0-dim tensor)."""
    @property
    def nbytes(self) -> int:
        """Exact bytes of the contiguous tensor; ``UnknownDtypeError`` for a dtype ferry cannot store."""
    def __eq__(self, value: object, /) -> bool: ...

@final
class SampleRef:
    """One sample's reference (SpecForge's ``SampleRef``): where its features live, their
    specs, and metadata. Immutable, tensor-free, and byte-identical to SpecForge in JSON.
    ``SampleRef(**fields)`` is ``SampleRef.from_dict(fields)``. Picklable (through JSON)."""

    def __new__(cls, **fields: Any) -> SampleRef: ...
    @staticmethod
    def from_dict(d: dict[str, Any]) -> SampleRef:
        """SpecForge's ``ref_from_dict``: unknown keys are a ``JsonError``, missing defaulted
        keys take their defaults."""
    @staticmethod
    def from_json(text: str) -> SampleRef:
        """A ref from JSON text (compact or spaced)."""
    def to_dict(self) -> dict[str, Any]:
        """SpecForge's ``ref_to_dict`` after a JSON round trip: key order kept, shapes as lists."""
    def to_json(self, style: _JsonStyle = "compact") -> str:
        """SpecForge's bytes: ``"compact"`` is a channel/inbox line, ``"spaced"`` is
        ``json.dumps``'s default (manifests, the SQLite ledger's ``ref_json``)."""
    @property
    def sample_id(self) -> str: ...
    @property
    def run_id(self) -> str: ...
    @property
    def source_task_id(self) -> str | None: ...
    @property
    def feature_store_uri(self) -> str: ...
    @property
    def feature_keys(self) -> dict[str, str]: ...
    @property
    def feature_specs(self) -> dict[str, FeatureSpec]: ...
    @property
    def strategy(self) -> str: ...
    @property
    def schema_version(self) -> int: ...
    @property
    def target_model_version(self) -> str: ...
    @property
    def draft_weight_version(self) -> str | None: ...
    @property
    def tokenizer_version(self) -> str: ...
    @property
    def num_tokens(self) -> int: ...
    @property
    def estimated_bytes(self) -> int: ...
    @property
    def metadata(self) -> dict[str, Any]: ...
    @property
    def generation(self) -> int | None:
        """``metadata["generation"]``, if the ref carries one."""
    def __eq__(self, value: object, /) -> bool: ...

@final
class FeatureHandle:
    """A read lease's identity (SpecForge's ``FeatureHandle``). Hashable."""

    @staticmethod
    def from_dict(d: dict[str, Any]) -> FeatureHandle: ...
    def to_dict(self) -> dict[str, Any]: ...
    @property
    def sample_id(self) -> str: ...
    @property
    def generation(self) -> int:
        """The generation read (0 for untracked offline files)."""
    @property
    def lease_token(self) -> str: ...
    def __eq__(self, value: object, /) -> bool: ...
    def __hash__(self) -> int: ...

# --- stores ----------------------------------------------------------------------------------

def open_store(
    uri: str,
    *,
    secret: str | None = None,
    credential: str | None = None,
    store_id: str | None = None,
    retain_on_release: bool = False,
    max_resident_bytes: int | None = None,
    max_hold_age_s: float | None = None,
    route: Literal["auto", "shm", "tcp"] = "auto",
    owning: bool = False,
    bfloat16: _Bfloat16Mode = "auto",
) -> Store:
    """Opens a feature store.

    ``uri``: ``mem://[store_id]`` (this process's memory), ``dir://<root>[?format=ckpt|safetensors]``
    (a shared directory with SpecForge's file naming), ``ferry://host:port`` or
    ``ferry+unix:///path.sock`` (a ``ferry serve`` daemon; on its Unix socket bytes move
    through shared memory).

    In-process stores: ``secret`` is the shared secret the store requires, ``credential`` what
    this process presents (default: ``secret``); ``store_id``, ``retain_on_release``,
    ``max_resident_bytes`` and ``max_hold_age_s`` configure the store.

    Daemons: ``secret`` is what this client presents (default: ``$FERRY_AUTH_TOKEN``, else
    ``$DISAGG_AUTH_TOKEN``); ``route`` picks the byte route; ``owning=True`` has the daemon
    abort this client's puts when the connection ends. Store settings belong to
    ``ferry serve`` and are an ``InvalidArgumentError`` here.

    ``bfloat16``: how bfloat16 features come back: ``"auto"`` (``ml_dtypes.bfloat16`` when
    importable, else ``"uint16"``), ``"ml_dtypes"``, or ``"uint16"`` (raw bit patterns).

    Raises ``AuthError`` (a ``PermissionError``) for a wrong or missing secret, ``IoError``
    when a daemon cannot be reached, ``InvalidArgumentError`` for a bad URI or option.
    """

@final
class Store:
    """A feature store (``open_store``). Every call that can block runs without the GIL. A
    context manager that closes the store."""

    @property
    def store_id(self) -> str: ...
    @property
    def uri(self) -> str: ...
    @property
    def bfloat16(self) -> Literal["ml_dtypes", "uint16"]: ...
    def put(
        self,
        sample_id: str,
        tensors: Mapping[str, _ArrayLike],
        metadata: dict[str, Any] | None = None,
        *,
        dtypes: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> SampleRef:
        """Stores one sample and returns its ref.

        C-contiguous little-endian numpy arrays (and CPU torch tensors) are read in place;
        other layouts are copied once first. ``metadata`` must be JSON-able (a tensor in it is
        a ``TypeError``); ``run_id``, ``strategy``, ``num_tokens``, ... fill the ref as in
        SpecForge. ``dtypes`` stores an array's bits as another dtype of the same item size,
        e.g. ``{"hidden_state": "bfloat16"}`` for a ``uint16`` array of bfloat16 bits.
        A full store raises ``StoreFullError`` (a ``MemoryError``) at once; with ``timeout``
        (seconds) the put waits that long for room, interruptible by Ctrl-C.
        """
    def get(self, ref: SampleRef, names: list[str] | None = None) -> Lease:
        """Reads a sample's features (all, or ``names``) under a read lease.

        Returns a ``Lease`` mapping name -> numpy array. The arrays own their memory (ferry's
        aligned buffers, wrapped without a copy): they stay valid after the lease ends.
        Raises ``StaleRefError`` / ``UseAfterFreeError`` / ``NotFoundError`` (``KeyError``s)
        when the ref's sample is gone.
        """
    def get_into(self, ref: SampleRef, out: dict[str, Any]) -> Lease:
        """Reads features into the caller's arrays (``out``: name -> numpy array or CPU torch
        tensor, each writable, C-contiguous, of the feature's dtype and exact byte size; a
        bfloat16 feature takes ``ml_dtypes.bfloat16``, ``uint16`` or ``int16`` arrays).
        Raises ``InvalidArgumentError`` (a ``ValueError``) for a wrong dtype, size or layout.
        Returns the lease as a ``Lease`` over ``out``."""
    def describe(self, ref: SampleRef) -> dict[str, FeatureSpec]:
        """The specs of a sample's features, as the store holds them."""
    def release(self, handle: Lease | FeatureHandle) -> None:
        """Releases a read lease (idempotent; a stale handle releases nothing)."""
    def abort(self, sample_id: str) -> None:
        """Frees a sample now, whoever holds leases; their later reads are refused."""
    def abort_all(self) -> int:
        """Frees every sample; returns how many."""
    def adopt(self, ref: SampleRef) -> None:
        """Takes ownership of a sample another writer published."""
    def gc(self) -> dict[str, int]:
        """One max-hold GC sweep: ``{"force_freed", "force_freed_bytes", "release_pending"}``."""
    def drain(
        self, *, sample_ids: list[str] | None = None, max_attempts: int = 8, retry_interval_s: float = 0.25
    ) -> dict[str, int]:
        """Retries pending removals, forced: ``{"removed", "removed_bytes", "release_pending",
        "attempts"}``; ``DrainIncompleteError`` if some remain."""
    def health(self) -> dict[str, Any]:
        """The health map (SpecForge's keys plus ferry's)."""
    def retains_on_release(self) -> bool:
        """Whether release keeps the bytes (offline data) or frees them (consume-once)."""
    def close(self) -> None:
        """Closes the store (a daemon connection ends). Held leases can still be released."""
    def __enter__(self) -> Store: ...
    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool: ...

@final
class Lease(Mapping[str, Any]):
    """A read lease and the tensors read under it: a mapping of feature name -> array and a
    context manager. Released by ``release()``, on leaving a ``with`` block, or when garbage
    collected; keep the ``Lease`` to keep the lease."""

    def __getitem__(self, key: str, /) -> numpy.ndarray: ...
    def __len__(self) -> int: ...
    def __iter__(self) -> Iterator[str]: ...
    def __contains__(self, key: object, /) -> bool: ...
    def keys(self) -> KeysView[str]: ...
    def values(self) -> ValuesView[Any]: ...
    def items(self) -> ItemsView[str, Any]: ...
    def get(self, name: str, default: Any = None) -> Any: ...
    @property
    def tensors(self) -> dict[str, Any]:
        """A new dict of feature name -> array."""
    @property
    def handle(self) -> FeatureHandle: ...
    @property
    def ref(self) -> SampleRef: ...
    @property
    def released(self) -> bool: ...
    def release(self) -> None:
        """Releases the lease (idempotent). Arrays from ``get`` stay valid."""
    def to_torch(self) -> dict[str, Any]:
        """The tensors as torch tensors over the same memory (bfloat16 as ``torch.bfloat16``)."""
    def __enter__(self) -> Lease: ...
    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool: ...

# --- the node daemon -------------------------------------------------------------------------

def start_daemon(
    *,
    listen: str | None = "127.0.0.1:0",
    socket: str | PathLike[str] | None = None,
    capacity: int | None = None,
    secret: str | None = None,
    store_id: str | None = None,
    retain_on_release: bool = False,
    max_hold_age_s: float | None = None,
) -> Daemon:
    """Starts a node daemon (what ``ferry serve`` runs) in this process, on Rust threads.

    ``listen``: a TCP address (``"127.0.0.1:0"`` picks a port; ``None``: no TCP). ``socket``:
    a Unix socket path. ``capacity``: bytes of a shared-memory arena holding the store (Unix
    socket clients map it); without it the store is in the daemon's heap. ``secret``: the
    shared secret clients must prove they know.
    """

@final
class Daemon:
    """A running node daemon. A context manager that stops it; also stopped when collected."""

    @property
    def tcp_uri(self) -> str | None: ...
    @property
    def unix_uri(self) -> str | None: ...
    @property
    def store_id(self) -> str: ...
    @property
    def running(self) -> bool: ...
    def health(self) -> dict[str, Any]: ...
    def connections(self) -> int: ...
    def stop(self) -> None: ...
    def __enter__(self) -> Daemon: ...
    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool: ...

# --- arrays ----------------------------------------------------------------------------------

def to_torch(array: Any, dtype: str | None = None) -> Any:
    """A torch tensor over the same memory as ``array``; bfloat16 arrays (or ``uint16`` with
    ``dtype="bfloat16"``) become ``torch.bfloat16``. Needs torch."""

def bfloat16_dtype() -> Any:
    """``ml_dtypes.bfloat16`` if ml_dtypes is importable, else ``None``."""

# --- errors ----------------------------------------------------------------------------------

class Error(Exception):
    """Base of every ferry error. ``kind`` is the Rust variant, ``python_exception`` the name
    SpecForge raises, ``details`` the variant's fields (also attributes)."""

    kind: str
    python_exception: str
    details: dict[str, Any]

class InvalidArgumentError(Error, ValueError): ...
class UnknownDtypeError(InvalidArgumentError): ...
class JsonError(Error, ValueError): ...
class CorruptError(Error, ValueError): ...
class NotAvailableError(Error, KeyError): ...
class NotFoundError(NotAvailableError): ...
class StaleRefError(NotAvailableError): ...
class UseAfterFreeError(StaleRefError): ...
class ShortReadError(NotAvailableError): ...
class MissingFeatureKeysError(NotAvailableError): ...
class StoreFullError(Error, MemoryError): ...
class AuthError(Error, PermissionError): ...
class TimeoutError(Error, builtins.TimeoutError): ...
class IoError(Error, OSError): ...
class BackendError(Error, RuntimeError): ...
class DrainIncompleteError(Error, RuntimeError): ...
class PeerFailedError(Error, RuntimeError): ...
class PeerLostError(Error, ConnectionError): ...
class ProtocolError(Error, RuntimeError): ...
class CollectiveError(Error, RuntimeError): ...
class FailureHandlingError(Error, RuntimeError): ...
class RemoteError(Error, RuntimeError): ...
