"""ferry's exception tree.

Every error a ferry call raises is a :class:`ferry.Error`. Each Rust error variant has its own
class, and each class also derives from the standard exception SpecForge raises for that
error, so code written against SpecForge's stores keeps working::

    Error
    ├── InvalidArgumentError (ValueError)         invalid argument, bad dtype/shape/option
    │   └── UnknownDtypeError                     a dtype ferry cannot store
    ├── JsonError (ValueError)                    a record that does not parse
    ├── CorruptError (ValueError)                 a malformed file or frame
    ├── NotAvailableError (KeyError)              the sample or object is not there
    │   ├── NotFoundError                         never written, or long freed
    │   ├── StaleRefError                         the ref's generation is no longer readable
    │   │   └── UseAfterFreeError                 ... because it was released or aborted
    │   ├── ShortReadError                        an object shorter than its spec
    │   └── MissingFeatureKeysError               an offline file lacks required keys
    ├── StoreFullError (MemoryError)              the store's byte budget is exhausted
    ├── AuthError (PermissionError)               missing or wrong shared secret
    ├── TimeoutError (builtins.TimeoutError)      a wait ran past its deadline
    ├── IoError (OSError)                         an OS error; instances also derive from the
    │                                             matching OSError subclass (FileNotFoundError, ...)
    ├── BackendError (RuntimeError)               a backend operation failed
    ├── DrainIncompleteError (RuntimeError)       a bounded drain gave up
    ├── PeerFailedError (RuntimeError)            a producer/consumer peer failed and said why
    ├── PeerLostError (ConnectionError)           a data-parallel peer's connection is gone
    ├── ProtocolError (RuntimeError)              a control-plane rule was broken
    ├── CollectiveError (RuntimeError)            a failure every DP rank raises alike
    ├── FailureHandlingError (RuntimeError)       a failure whose cleanup failed too
    └── RemoteError (RuntimeError)                a peer's error known only by its message

Every instance has ``kind`` (the Rust variant, e.g. ``"StaleRef"``), ``python_exception``
(the name SpecForge would raise, e.g. ``"KeyError"``) and ``details`` (the variant's fields,
e.g. ``{"sample_id": ..., "ref_generation": ..., "current_generation": ...}``); each detail is
also an attribute.
"""

from __future__ import annotations

import builtins
import json
from typing import Any

__all__ = [
    "Error",
    "InvalidArgumentError",
    "UnknownDtypeError",
    "JsonError",
    "CorruptError",
    "NotAvailableError",
    "NotFoundError",
    "StaleRefError",
    "UseAfterFreeError",
    "ShortReadError",
    "MissingFeatureKeysError",
    "StoreFullError",
    "AuthError",
    "TimeoutError",
    "IoError",
    "BackendError",
    "DrainIncompleteError",
    "PeerFailedError",
    "PeerLostError",
    "ProtocolError",
    "CollectiveError",
    "FailureHandlingError",
    "RemoteError",
]


class Error(Exception):
    """Base class of every ferry error."""

    #: The Rust error variant (``"StaleRef"``, ``"OverBudget"``, ...).
    kind: str = ""
    #: The exception name SpecForge raises for this error (``"KeyError"``, ...).
    python_exception: str = "RuntimeError"
    #: The variant's fields.
    details: dict[str, Any] = {}

    def __str__(self) -> str:
        # KeyError would print repr(message); ferry's messages read better as they are.
        return str(self.args[0]) if len(self.args) == 1 else super().__str__()


class InvalidArgumentError(Error, ValueError):
    """The caller passed something that can never work (bad shape, dtype, option, empty put)."""

    python_exception = "ValueError"


class UnknownDtypeError(InvalidArgumentError):
    """A dtype name ferry cannot store."""


class JsonError(Error, ValueError):
    """A JSON record that does not parse, or has unknown or missing fields."""

    python_exception = "ValueError"


class CorruptError(Error, ValueError):
    """A file or frame that is malformed: truncated, bad header, wrong sizes."""

    python_exception = "ValueError"


class NotAvailableError(Error, KeyError):
    """The sample or object is not available (SpecForge raises ``KeyError``)."""

    python_exception = "KeyError"


class NotFoundError(NotAvailableError):
    """The sample or object was never written, or was freed long ago."""


class StaleRefError(NotAvailableError):
    """The ref names a generation the store no longer serves: the sample was re-put (this
    class) or its generation was released or aborted (:class:`UseAfterFreeError`)."""


class UseAfterFreeError(StaleRefError):
    """The ref's generation was released or aborted; reading it again is refused."""


class ShortReadError(NotAvailableError):
    """An object held fewer bytes than its spec says."""


class MissingFeatureKeysError(NotAvailableError):
    """An offline feature file lacks keys its strategy needs."""


class StoreFullError(Error, MemoryError):
    """A put would exceed the store's resident-byte budget: the consumer is behind."""

    python_exception = "MemoryError"


class AuthError(Error, PermissionError):
    """A missing or wrong shared secret."""

    python_exception = "PermissionError"


class TimeoutError(Error, builtins.TimeoutError):  # noqa: A001 - ferry.TimeoutError, as asyncio's
    """A wait ran past its deadline."""

    python_exception = "TimeoutError"


class IoError(Error, OSError):
    """An OS error, with the path or action that caused it. Instances also derive from the
    matching ``OSError`` subclass (``FileNotFoundError``, ``PermissionError``, ...)."""

    python_exception = "OSError"


class BackendError(Error, RuntimeError):
    """A backend operation failed (other than a clean not-found or short read)."""


class DrainIncompleteError(Error, RuntimeError):
    """A bounded drain gave up with removals still pending."""


class PeerFailedError(Error, RuntimeError):
    """A peer of the control plane failed and said why."""


class PeerLostError(Error, ConnectionError):
    """A peer of a data-parallel group is gone (its connection closed mid-round)."""

    python_exception = "ConnectionError"


class ProtocolError(Error, RuntimeError):
    """A control-plane protocol rule was broken."""


class CollectiveError(Error, RuntimeError):
    """A failure every data-parallel rank raises identically."""


class FailureHandlingError(Error, RuntimeError):
    """An operation failed, and handling that failure failed too."""


class RemoteError(Error, RuntimeError):
    """An error a peer reported by message only, of no more specific class."""


_BY_VARIANT: dict[str, type[Error]] = {
    "InvalidArgument": InvalidArgumentError,
    "UnknownDtype": UnknownDtypeError,
    "Json": JsonError,
    "NotFound": NotFoundError,
    "StaleRef": StaleRefError,
    "UseAfterFree": UseAfterFreeError,
    "ShortRead": ShortReadError,
    "OverBudget": StoreFullError,
    "AuthFailed": AuthError,
    "Backend": BackendError,
    "Io": IoError,
    "Corrupt": CorruptError,
    "DrainIncomplete": DrainIncompleteError,
    "Timeout": TimeoutError,
    "MissingFeatureKeys": MissingFeatureKeysError,
    "Remote": RemoteError,
    "PeerFailed": PeerFailedError,
    "PeerLost": PeerLostError,
    "Protocol": ProtocolError,
    "Collective": CollectiveError,
    "FailureHandling": FailureHandlingError,
}

# The class for an error known only by SpecForge's exception name (a remote peer's error, or
# a variant this Python file does not list).
_BY_PYTHON_NAME: dict[str, type[Error]] = {
    "KeyError": NotAvailableError,
    "ValueError": InvalidArgumentError,
    "MemoryError": StoreFullError,
    "PermissionError": AuthError,
    "TimeoutError": TimeoutError,
    "RuntimeError": RemoteError,
}

_OS_CLASSES: dict[str, type[Error]] = {}


def _io_class(name: str) -> type[Error] | None:
    """``IoError`` mixed with the builtin ``OSError`` subclass ``name`` (cached); ``None`` if
    ``name`` is not one."""
    if name == "OSError":
        return IoError
    cls = _OS_CLASSES.get(name)
    if cls is None:
        base = getattr(builtins, name, None)
        if not (isinstance(base, type) and issubclass(base, OSError)):
            return None
        cls = type(f"IoError[{name}]", (IoError, base), {"__module__": __name__, "python_exception": name})
        _OS_CLASSES[name] = cls
    return cls


def _class_for(kind: str, python_exception: str) -> type[Error]:
    if kind == "Io":
        return _io_class(python_exception) or IoError
    if kind in _BY_VARIANT and kind != "Remote":
        return _BY_VARIANT[kind]
    # A remote peer's error, or a variant this file does not list: go by SpecForge's name.
    if python_exception in _BY_PYTHON_NAME:
        return _BY_PYTHON_NAME[python_exception]
    return _io_class(python_exception) or RemoteError


def _from_native(kind: str, python_exception: str, message: str, details_json: str) -> Error:
    """Builds the exception for a Rust error (called by the native module)."""
    err = _class_for(kind, python_exception)(message)
    err.kind = kind
    err.python_exception = python_exception
    try:
        details = json.loads(details_json)
    except ValueError:
        details = None
    if not isinstance(details, dict):
        details = {} if details is None else {"message": details}
    err.details = details
    for key, value in details.items():
        if not hasattr(err, key):
            setattr(err, key, value)
    return err


# The classes are ferry's public API: show and pickle them as `ferry.<Name>`.
for _name in __all__:
    globals()[_name].__module__ = "ferry"
del _name
