"""Type stubs for ferry (the native module ``ferry._ferry`` plus the pure-Python helpers)."""

import builtins
from collections.abc import ItemsView, Iterable, Iterator, KeysView, Mapping, ValuesView
from os import PathLike
from types import TracebackType
from typing import Any, Literal, final

import numpy

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

def open_store_with_backend(
    backend: Any,
    *,
    store_id: str | None = None,
    retain_on_release: bool = False,
    max_resident_bytes: int | None = None,
    max_hold_age_s: float | None = None,
    max_release_attempts: int = 3,
    secret: str | None = None,
    credential: str | None = None,
    replicate_config: Any = None,
    register_buffers: bool = True,
    uri_scheme: str = "mooncake",
    bfloat16: _Bfloat16Mode = "auto",
) -> Store:
    """Opens a feature store whose bytes live in ``backend``, a Python object with Mooncake's
    raw-buffer client API (``mooncake.store.MooncakeDistributedStore`` plugs in unchanged):
    ``put_from(key, buffer_ptr, size[, config]) -> 0``, ``get_into(key, buffer_ptr, size) ->
    bytes read``, ``remove(key[, force]) -> 0``, ``is_exist(key) -> 1 | 0``; negative statuses
    are failures, ``-704`` (OBJECT_NOT_FOUND) a missing object. Optional: ``batch_put_from``,
    ``batch_get_into``, ``get_size``, ``register_buffer`` / ``unregister_buffer``.

    Keys are ``{store_id}/{sample_id}/g{generation}/{name}``, one raw object per tensor; refs
    are ``{uri_scheme}://{store_id}/{sample_id}`` with ``metadata.generation``. An empty tensor
    gets no object (Mooncake stores none) and reads back empty from its spec. Every lifecycle
    rule of ``open_store``'s stores applies. ``put_from`` receives the caller's array address
    (no staging copy); ``get_into`` the destination's. ``replicate_config`` is passed to every
    put; ``register_buffers`` registers each transfer's memory around the call.

    Raises ``BackendError`` (a ``RuntimeError``) when the client lacks a required method; a
    client's exception in any later call is a ``BackendError`` with its text.
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
    def get(self, ref: SampleRef, names: list[str] | None = None, *, borrow: bool = False) -> Lease:
        """Reads a sample's features (all, or ``names``) under a read lease.

        Returns a ``Lease`` mapping name -> numpy array. The arrays own their memory (ferry's
        aligned buffers, wrapped without a copy): they stay valid after the lease ends.
        Raises ``StaleRefError`` / ``UseAfterFreeError`` / ``NotFoundError`` (``KeyError``s)
        when the ref's sample is gone.

        ``borrow=True`` copies nothing: the arrays are read-only views of a daemon's
        shared-memory arena as mapped in this process (a daemon client on the shared-memory
        route, ``ferry+unix://``, only; other stores raise ``InvalidArgumentError``). The views
        pin the bytes through the read lease: releasing the ``Lease`` empties it, and the read
        lease ends once the last array taken out of it is collected too. An abort refuses later
        reads but never reuses bytes a view still shows.
        """
    def get_views(self, ref: SampleRef, views: dict[str, tuple[int, int, int]]) -> Lease:
        """Reads parts of features under a read lease: ``views`` maps a feature name to a
        narrow ``(dim, start, length)`` (torch's ``tensor.narrow``; ``shard_view`` gives a
        tensor-parallel shard). A daemon client asks the daemon, which derives each view where
        the bytes are and sends only the view's bytes; other stores read the feature and cut the
        view out. Returns a ``Lease`` of view-shaped arrays (the arrays own their memory).
        A lazy offline ref's specs are described first (no lease). Raises
        ``InvalidArgumentError`` (a ``ValueError``) for a view that does not fit the feature's
        shape, before any lease is taken, and ``NotFoundError`` (a ``KeyError``) for a feature
        the sample does not have."""
    def get_into(self, ref: SampleRef, out: dict[str, Any]) -> Lease:
        """Reads features into the caller's arrays (``out``: name -> numpy array or CPU torch
        tensor, each writable, C-contiguous, of the feature's dtype and exact byte size; a
        bfloat16 feature takes ``ml_dtypes.bfloat16``, ``uint16`` or ``int16`` arrays).
        Raises ``InvalidArgumentError`` (a ``ValueError``) for a wrong dtype, size or layout.
        Returns the lease as a ``Lease`` over ``out``."""
    def describe(self, ref: SampleRef) -> dict[str, FeatureSpec]:
        """The specs of a sample's features, as the store holds them."""
    def release(self, handle: Lease | FeatureHandle) -> None:
        """Releases a read lease (idempotent; a stale handle releases nothing). The handle of
        a borrowed lease whose arrays are alive is refused (``InvalidArgumentError``)."""
    def abort(self, sample_id: str) -> None:
        """Frees a sample now, whoever holds leases; their later reads are refused."""
    def abort_all(self) -> int:
        """Frees every sample; returns how many."""
    def adopt(self, ref: SampleRef) -> None:
        """Takes ownership of a sample another writer published."""
    def track_external_attempt(self, sample_id: str, generation: int, names: list[str]) -> None:
        """Tracks a sample an external writer (a capture server) may be writing as
        ``sample_id`` at ``generation`` with the features ``names``, before this process sees
        its response: ``adopt(ref)`` takes it over, ``discard_external_attempts()`` frees every
        tracked attempt not adopted. ``names`` must not be empty."""
    def discard_external_attempts(self) -> int:
        """Frees every tracked external attempt not adopted; returns how many."""
    def disown(self, sample_ids: list[str]) -> None:
        """Gives up this client's ownership (an owning daemon client no longer aborts the
        samples when its connection ends); a producer disowns refs just before publishing."""
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
    @property
    def borrowed(self) -> bool:
        """Whether the arrays are views of a daemon's shared memory (``get(..., borrow=True)``)."""
    def release(self) -> None:
        """Releases the lease (idempotent). Arrays from ``get`` stay valid. A borrowed lease
        is emptied; its read lease ends when the last array taken out of it is collected."""
    def to_torch(self) -> dict[str, Any]:
        """The tensors as torch tensors over the same memory (bfloat16 as ``torch.bfloat16``).

        For a borrowed lease (``get(..., borrow=True)``) they are views of the daemon's shared
        memory, which every reader of the sample sees: torch cannot mark a tensor read-only, so
        treat them as read-only (write to a ``.clone()``). They pin the bytes like the arrays."""
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

# --- the feature loader ----------------------------------------------------------------------

_Strategy = Literal["eagle3", "dflash", "domino"]

@final
class SampleRefQueue:
    """The in-process staging queue a queue-mode :class:`FeatureLoader` reads (SpecForge's
    ``SampleRefQueue``): refs only, FIFO, consume-once with leases. Open until :meth:`close`;
    a loader leases ``batch_size`` refs once that many are pending (the rest once closed) and
    its pass ends when the queue is closed and drained."""

    def __new__(cls) -> SampleRefQueue: ...
    def put(self, refs: SampleRef | Iterable[SampleRef]) -> int:
        """Appends refs whose ids are neither pending nor in flight; returns how many.
        ``InvalidArgumentError`` after :meth:`close`."""
    def close(self) -> None:
        """Ends the stream: loaders drain what is pending, then their passes end."""
    @property
    def closed(self) -> bool: ...
    @property
    def depth(self) -> int:
        """Refs waiting to be leased."""
    @property
    def in_flight(self) -> int:
        """Refs leased and not yet acked or failed."""
    def pending_ids(self) -> list[str]: ...
    def in_flight_ids(self) -> list[str]: ...
    def ack(self, ids: Batch | str | Iterable[str | SampleRef]) -> None:
        """Settles leased refs (with ``defer_ack=True``, after the trainer's durable ack)."""
    def fail(self, refs: SampleRef | Iterable[SampleRef], reason: str, retryable: bool = True) -> None:
        """Gives leased refs back to the pending tail (``retryable``) or drops them."""

@final
class FeatureLoader:
    """The feature loader: refs + store -> collated batches, over a fixed ref list (refs mode)
    or a :class:`SampleRefQueue` (queue mode); exactly one of ``refs`` and ``queue``.

    Every ``iter(loader)`` is one pass (a :class:`Batches`), in batches of ``batch_size``, a
    short tail dropped when ``drop_last``; each batch is materialized with the GIL released
    (inline, or ``num_workers`` batches ahead on Rust threads) and padded to its longest sample
    with an ``attention_mask``. ``dp``/``rank`` shard the refs exactly as
    ``torch.utils.data.DistributedSampler(num_replicas=dp, rank=rank, shuffle=shuffle,
    seed=seed, drop_last=dp_drop_last)``, reshuffled per :meth:`set_epoch`. ``max_len`` cuts
    offline samples (default: each ref's ``metadata.max_len``). ``len(loader)`` is the batches
    of one full pass. An unknown ``strategy`` is an ``InvalidArgumentError`` naming the
    registered ones.

    Queue mode (online, consume-once): each pass leases ``batch_size`` refs as they arrive and
    yields batches until the queue is closed and drained; a short tail is yielded
    (``drop_last=False``) or failed and freed from the store. A batch is acked when the
    consumer asks for the next one or closes the pass; ``defer_ack=True`` leaves that to the
    caller (``queue.ack(batch)``). ``prefetch_depth`` (default ``num_workers``) batches are
    materialized ahead on a Rust thread. One live pass at a time; the wait for refs runs
    without the GIL and Ctrl-C ends it (``KeyboardInterrupt``; nothing leased is lost).
    ``dp``/``rank``, :meth:`seek` and ``len()`` are refused.
    """

    def __new__(
        cls,
        store: Store,
        refs: Iterable[SampleRef] | None = None,
        queue: SampleRefQueue | None = None,
        *,
        batch_size: int = 1,
        drop_last: bool = True,
        strategy: _Strategy | str = "eagle3",
        num_workers: int = 0,
        dp: int | None = None,
        rank: int | None = None,
        seed: int = 0,
        shuffle: bool = True,
        dp_drop_last: bool = False,
        max_len: int | None = None,
        prefetch_depth: int | None = None,
        defer_ack: bool = False,
    ) -> FeatureLoader: ...
    def __iter__(self) -> Batches:
        """Starts a pass, consuming a pending :meth:`seek`."""
    def __len__(self) -> int:
        """Batches one full pass yields (this rank's share with ``dp``); ``TypeError`` for a
        queue."""
    @property
    def queue(self) -> SampleRefQueue | None: ...
    @property
    def prefetch_depth(self) -> int: ...
    @property
    def defer_ack(self) -> bool: ...
    @property
    def refs_per_pass(self) -> int: ...
    def seek(self, batches: int) -> None:
        """Skips the first ``batches`` batches of the next pass only (never read)."""
    def set_epoch(self, epoch: int) -> None:
        """With ``dp``, the next pass reads that epoch's shard (seeded ``seed + epoch``)."""
    @property
    def epoch(self) -> int: ...
    @property
    def strategy(self) -> str: ...
    @property
    def batch_size(self) -> int: ...
    @property
    def drop_last(self) -> bool: ...
    @property
    def num_workers(self) -> int: ...
    @property
    def dp(self) -> int | None: ...
    @property
    def rank(self) -> int | None: ...
    def load_batch(self, refs: Iterable[SampleRef]) -> Batch:
        """``refs`` as one batch, now, exactly as a pass would build it."""
    def close(self) -> None:
        """Queue mode: ends the live pass (failing refs leased but never yielded) and every
        later one. Refs mode: nothing to release; the loader stays usable."""
    def __enter__(self) -> FeatureLoader: ...
    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool: ...

@final
class Batches(Iterator[Batch]):
    """One pass: batches in order, ending at the first error (raised)."""

    def __iter__(self) -> Batches: ...
    def __next__(self) -> Batch: ...
    @property
    def remaining(self) -> int:
        """Batches still to come (if none fails)."""
    def __length_hint__(self) -> int: ...
    def close(self) -> None:
        """Stops the pass's workers (``TimeoutError`` if one is still reading; retry later)."""
    def __enter__(self) -> Batches: ...
    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool: ...

@final
class Batch(Mapping[str, Any]):
    """One collated batch; also a mapping of tensor name -> numpy array.

    The arrays are ferry's batch buffers handed to numpy without a copy; they own their memory
    and outlive the loader and the store.
    """

    @property
    def sample_ids(self) -> list[str]: ...
    @property
    def batch_size(self) -> int: ...
    @property
    def strategy(self) -> str: ...
    @property
    def tensors(self) -> dict[str, numpy.ndarray]:
        """A new dict of tensor name -> array (the same arrays every time)."""
    @property
    def metadata(self) -> dict[str, Any]: ...
    @property
    def dtypes(self) -> dict[str, str]:
        """ferry's dtype name per tensor (``"bfloat16"`` also where the array is ``uint16``)."""
    def to_torch(self) -> dict[str, Any]:
        """The tensors as torch tensors over the same memory (bfloat16 as ``torch.bfloat16``)."""
    def __getitem__(self, key: str, /) -> numpy.ndarray: ...
    def __len__(self) -> int: ...
    def __iter__(self) -> Iterator[str]: ...
    def __contains__(self, key: object, /) -> bool: ...
    def keys(self) -> KeysView[str]: ...
    def values(self) -> ValuesView[Any]: ...
    def items(self) -> ItemsView[str, Any]: ...
    def get(self, name: str, default: Any = None) -> Any: ...

def offline_refs(
    path: str | PathLike[str],
    *,
    run_id: str = "offline",
    strategy: _Strategy | str = "eagle3",
    validate: bool = False,
    max_len: int = 2048,
    ttt_length: int = 7,
) -> list[SampleRef]:
    """One lazy ``file://`` ref per feature file under ``path`` (SpecForge's
    ``OfflineManifestReader``: lexicographic order, ids ``<run_id>:<index:08>``, the strategy's
    raw keys). ``validate=True`` opens each file once to fill specs and sizes."""

def shard_view(dim: int, index: int, count: int, size: int) -> tuple[int, int, int]:
    """``(dim, start, length)`` of shard ``index`` of ``count`` equal shards of dimension
    ``dim`` of ``size`` indices, for ``Store.get_views`` (a tensor-parallel slice: dimension 0
    for column-parallel weights, 1 for row-parallel ones). ``InvalidArgumentError`` when the
    dimension does not split evenly."""

def read_manifest(path: str | PathLike[str]) -> list[SampleRef]:
    """The refs of a SpecForge offline ref manifest."""

def write_manifest(refs: Iterable[SampleRef], path: str | PathLike[str]) -> None:
    """Writes SpecForge's manifest bytes atomically (``<path>.tmp``, then a rename)."""

# --- the online control plane ----------------------------------------------------------------

@final
class RefChannel:
    """A ref channel file, byte-compatible with SpecForge's ``StreamingRefChannel`` (JSONL plus
    sidecars): the producer's half and the consumer's half. ``published`` and ``consumed``
    count what this instance did. Every call runs without the GIL."""

    def __new__(cls, path: str | PathLike[str]) -> RefChannel: ...
    @staticmethod
    def inbox(inbox_dir: str | PathLike[str], rank: int) -> RefChannel:
        """Rank ``rank``'s inbox (``inbox-rank<rank>.jsonl``), written by the ref distributor."""
    @property
    def path(self) -> PathLike[str]: ...
    def publish(self, refs: SampleRef | Iterable[SampleRef]) -> None:
        """Appends a ref, or refs in one write and one fsync (the directory must exist)."""
    def publish_lines(self, lines: list[str]) -> None:
        """Appends records that are already compact JSON refs."""
    @property
    def published(self) -> int: ...
    def close(self) -> None:
        """A clean end of stream (``.closed``)."""
    def mark_failed(self, reason: str = "") -> None:
        """The producer failed (``.failed``)."""
    def poll(self, max: int | None = None) -> list[SampleRef]:
        """Up to ``max`` new refs without blocking (a torn trailing record is never returned)."""
    def poll_records(self, max: int | None = None) -> list[tuple[str, str]]:
        """Up to ``max`` new records as ``(sample_id, line)``, no ref built."""
    def is_closed(self) -> bool: ...
    def failure(self) -> str | None: ...
    def mark_consumed(self, n: int) -> None: ...
    def seed_consumed(self) -> int: ...
    @property
    def consumed(self) -> int: ...
    def consumed_remote(self) -> int: ...
    def in_flight_remote(self) -> int: ...
    def mark_consumer_done(self) -> None: ...
    def mark_consumer_failed(self, reason: str = "") -> None: ...
    def consumer_failure(self) -> str | None: ...
    def consumer_stopped(self) -> bool: ...
    def consumer_quantum(self) -> int | None: ...
    def publish_consumer_quantum(self, quantum: int, allow_existing: bool = False) -> None: ...
    def state(self) -> dict[str, Any]:
        """``{"closed", "failed", "consumed_count", "consumer_done", "consumer_failed",
        "consumer_quantum"}``."""

class _Collective:
    """What ``OnlineRank`` takes as a collective (a protocol)."""

    rank: int
    world_size: int
    def all_gather(self, part: bytes) -> list[bytes]: ...

@final
class SocketCollective:
    """One rank of a group of processes joined through rank 0's socket (no torch needed)."""

    def __new__(
        cls, address: str, rank: int, world_size: int, timeout_s: float = 300.0, *, group: str = "ferry"
    ) -> SocketCollective:
        """``address`` is ``unix:///path`` or ``tcp://host:port``; rank 0 listens, the others
        connect. ``timeout_s`` bounds the rendezvous and every round."""
    @property
    def rank(self) -> int: ...
    @property
    def world_size(self) -> int: ...
    def all_gather(self, part: bytes) -> list[bytes]: ...
    def broadcast_from_rank0(self, part: bytes) -> bytes: ...
    def abandon(self) -> None: ...

class TorchCollective:
    """The collective over ``torch.distributed`` (``all_gather_object``); needs an initialized
    process group."""

    rank: int
    world_size: int
    def __init__(self, group: Any = None) -> None: ...
    def all_gather(self, part: bytes) -> list[bytes]: ...
    def abandon(self) -> None: ...

class LocalCollective:
    """A one-rank collective."""

    rank: int
    world_size: int
    def all_gather(self, part: bytes) -> list[bytes]: ...

@final
class ConsumerConfig:
    """An online consumer's state locations and shape (``ferry_control``'s ``ConsumerConfig``)."""

    def __new__(
        cls,
        run_id: str,
        channel: str | PathLike[str],
        inbox_dir: str | PathLike[str],
        ledger: str | PathLike[str],
        *,
        dp_size: int = 1,
        batch_size: int = 1,
        accumulation: int = 1,
        resume: bool = False,
        checkpoint_step: int = 0,
        idle_timeout_s: float | None = None,
        poll_s: float = 0.05,
    ) -> ConsumerConfig: ...
    @property
    def run_id(self) -> str: ...
    @property
    def channel(self) -> PathLike[str]: ...
    @property
    def inbox_dir(self) -> PathLike[str]: ...
    @property
    def ledger(self) -> PathLike[str]: ...
    @property
    def dp_size(self) -> int: ...
    @property
    def batch_size(self) -> int: ...
    @property
    def accumulation(self) -> int: ...
    @property
    def resume(self) -> bool: ...
    @property
    def checkpoint_step(self) -> int: ...
    @property
    def idle_timeout_s(self) -> float | None: ...
    @property
    def poll_s(self) -> float: ...
    @property
    def refs_per_rank_step(self) -> int: ...
    @property
    def quantum(self) -> int:
        """``dp_size * batch_size * accumulation``: one global optimizer window."""

@final
class OnlineRank(Iterator[list[list[SampleRef]]]):
    """One data-parallel rank of an online consumer: rank-0 setup agreement, the distributor
    on rank 0, optimizer steps from the rank's inbox, the durable DP ack per step, and the
    finishing lifecycle. A context manager: ``finish()`` on success, ``fail(exc)`` on an
    exception."""

    def __new__(
        cls, config: ConsumerConfig, collective: _Collective | SocketCollective, store: Store | None = None
    ) -> OnlineRank: ...
    @property
    def rank(self) -> int: ...
    @property
    def world_size(self) -> int: ...
    @property
    def config(self) -> ConsumerConfig: ...
    @property
    def global_step(self) -> int: ...
    @property
    def status(self) -> Literal["running", "ended", "finished", "failed"]: ...
    def distributor_stats(self) -> dict[str, int] | None: ...
    def next_step(self) -> list[list[SampleRef]] | None:
        """The next optimizer step's micro-batches, or ``None`` at the end (blocks without the
        GIL; Ctrl-C interrupts and puts leased refs back)."""
    def commit_step(self, ids: list[str] | None = None) -> int:
        """The durable DP ack of the step, then the inbox ack; returns the new global step."""
    def finish(self) -> dict[str, int]:
        """Drain, agree, ``.consumer_done`` (rank 0): ``{"steps", "refs", "global_step"}``."""
    def fail(self, reason: str | BaseException, *, peer_loss: bool | None = None) -> None:
        """Abandon the group and publish ``.consumer_failed`` (not for a lost peer)."""
    def __iter__(self) -> OnlineRank: ...
    def __next__(self) -> list[list[SampleRef]]: ...
    def __enter__(self) -> OnlineRank: ...
    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool: ...

@final
class Producer:
    """The online producer for capture servers: claim, the consumer's quantum, publishing under
    the flow-control watermarks (blocking without the GIL, interruptible), EOF or failure,
    the consumer's end, cleanup. A context manager: ``finish()`` on success, ``fail(exc)`` on
    an exception."""

    def __new__(
        cls,
        channel: str | PathLike[str],
        store: Store,
        *,
        high_watermark: int = 256,
        low_watermark: int | None = None,
        high_watermark_bytes: int | None = None,
        low_watermark_bytes: int | None = None,
        max_resident_bytes: int | None = None,
        peer_timeout_s: float | None = None,
        poll_s: float = 0.05,
        claim: bool = True,
    ) -> Producer: ...
    def claim(self) -> None: ...
    def wait_for_quantum(self, timeout: float | None = None) -> int: ...
    def wait_for_room(self, timeout: float | None = None) -> bool:
        """``True`` once a publish may proceed, ``False`` if the consumer already finished."""
    def publish(self, refs: SampleRef | Iterable[SampleRef], *, timeout: float | None = None) -> bool:
        """Waits for room, disowns, publishes; ``False`` (refs aborted) if the consumer finished."""
    def put_and_publish(
        self,
        sample_id: str,
        tensors: Mapping[str, _ArrayLike],
        metadata: dict[str, Any] | None = None,
        *,
        dtypes: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> SampleRef | None:
        """Waits for room, ``Store.put``, publishes; ``None`` if the consumer finished."""
    def close(self) -> None: ...
    def wait_for_consumer(self, timeout: float | None = None) -> None: ...
    def cleanup(self) -> None: ...
    def finish(self, timeout: float | None = None) -> dict[str, Any]: ...
    def fail(self, reason: str | BaseException) -> None: ...
    @property
    def channel(self) -> PathLike[str]: ...
    @property
    def published(self) -> int: ...
    def consumed(self) -> int: ...
    def in_flight(self) -> tuple[int, int]: ...
    @property
    def paused(self) -> bool: ...
    @property
    def quantum_known(self) -> int | None: ...
    @property
    def stopped_by_consumer(self) -> bool: ...
    def report(self) -> dict[str, Any]: ...
    def __enter__(self) -> Producer: ...
    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool: ...

# --- arrays ----------------------------------------------------------------------------------

def to_torch(array: Any, dtype: str | None = None) -> Any:
    """A torch tensor over the same memory as ``array``; bfloat16 arrays (or ``uint16`` with
    ``dtype="bfloat16"``) become ``torch.bfloat16``. Needs torch. An array ferry returned goes
    through DLPack (``torch.from_dlpack(to_dlpack(array))``: the tensor holds ferry's buffer);
    anything else through ``torch.from_numpy``."""

def to_dlpack(array: numpy.ndarray) -> DLPackTensor:
    """A DLPack exporter over the ferry buffer under ``array`` (an array from ``Store.get`` or a
    ``Batch``, whole, with its own dtype; or its ``.base``). ``InvalidArgumentError`` for
    anything else (other arrays, slices, reinterpreting views, empty features)."""

@final
class DLPackTensor:
    """A DLPack producer over one of ferry's buffers (CPU memory): ``torch.from_dlpack(t)``,
    ``numpy.from_dlpack(t)``, ... take the memory without a copy; the consumer's tensor keeps
    the buffer alive until it is freed."""

    def __dlpack__(
        self,
        *,
        stream: int | None = None,
        max_version: tuple[int, int] | None = None,
        dl_device: tuple[int, int] | None = None,
        copy: bool | None = None,
    ) -> Any:
        """A ``"dltensor"`` capsule (legacy ``DLManagedTensor``), or ``"dltensor_versioned"``
        (DLPack 1.0) when ``max_version >= (1, 0)``; ``copy=True`` exports a copy. ``stream``
        must be ``None`` (or -1) and ``dl_device`` ``(1, 0)``, else ``BufferError``; a read-only
        array exports only versioned (read-only flag) or copied."""
    def __dlpack_device__(self) -> tuple[int, int]:
        """``(1, 0)``: kDLCPU, device 0."""
    @property
    def address(self) -> int: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def shape(self) -> tuple[int, ...]: ...
    @property
    def dtype(self) -> str:
        """The ferry dtype name (``"bfloat16"`` exports as kDLBfloat)."""
    @property
    def readonly(self) -> bool: ...

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
