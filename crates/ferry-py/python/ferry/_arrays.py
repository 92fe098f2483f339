"""Array helpers: torch tensors in and out, and bfloat16 without numpy support for it.

torch is optional: nothing here imports it unless a torch tensor is passed in or
:func:`to_torch` is called.

bfloat16. numpy has no bfloat16 dtype. ferry returns bfloat16 features as arrays of
``ml_dtypes.bfloat16`` when the ``ml_dtypes`` package is importable (``pip install
ml_dtypes``; the dtype JAX and TensorFlow use), else as ``uint16`` arrays holding the raw
bfloat16 bit patterns (the upper 16 bits of the float32 value, little-endian, as torch stores
them). Pick one per store with ``open_store(..., bfloat16="auto" | "ml_dtypes" | "uint16")``.
On put, ``ml_dtypes.bfloat16`` arrays and torch bfloat16 tensors need nothing; a ``uint16``
(or ``int16``) array of bit patterns needs ``dtypes={"name": "bfloat16"}``. Either way
:func:`to_torch` gives a ``torch.bfloat16`` tensor over the same memory.
"""

from __future__ import annotations

from typing import Any

import numpy

from ferry._errors import InvalidArgumentError, UnknownDtypeError

__all__ = ["bfloat16_dtype", "to_dlpack", "to_torch"]


def _is_torch(obj: Any) -> bool:
    module = type(obj).__module__
    return module == "torch" or module.startswith("torch.")


def bfloat16_dtype() -> Any:
    """``ml_dtypes.bfloat16`` if ml_dtypes is importable, else ``None``."""
    try:
        import ml_dtypes
    except ImportError:
        return None
    return ml_dtypes.bfloat16


# The dtypes ferry stores, as torch and SpecForge name them.
_FERRY_DTYPES = ("float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool")


def _as_numpy(obj: Any, name: str = "?") -> tuple[numpy.ndarray, str | None]:
    """A put's input as a numpy array sharing its memory where possible, and the ferry dtype
    its bits hold when the array's own dtype does not say (torch bfloat16). A torch dtype
    ferry cannot store is refused here, by its torch name (numpy may not even have it)."""
    if _is_torch(obj):
        import torch

        dname = str(obj.dtype).removeprefix("torch.")
        if dname not in _FERRY_DTYPES:
            raise UnknownDtypeError(
                f"feature {name!r}: torch dtype {dname} is not a ferry dtype ({', '.join(_FERRY_DTYPES)})"
            )
        t = obj.detach()
        if t.device.type != "cpu":
            t = t.cpu()  # one copy off the device
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy(), "bfloat16"
        return t.numpy(), None  # shares memory; a non-contiguous tensor gives a strided view
    return numpy.asarray(obj), None


def _as_numpy_out(obj: Any, name: str) -> numpy.ndarray:
    """A get_into destination as a numpy array over the same memory."""
    if _is_torch(obj):
        import torch

        if obj.device.type != "cpu":
            raise InvalidArgumentError(f"get_into: the tensor for feature {name!r} is on {obj.device}, not the CPU")
        t = obj.detach()
        if t.dtype == torch.bfloat16:
            t = t.view(torch.int16)
        return t.numpy()
    raise TypeError(
        f"get_into: the destination for feature {name!r} must be a numpy array or a CPU torch tensor, "
        f"not {type(obj).__name__}"
    )


def to_torch(array: Any, dtype: str | None = None) -> Any:
    """A torch tensor over the same memory as ``array`` (no copy).

    bfloat16 arrays (``ml_dtypes.bfloat16``), and ``uint16``/``int16`` arrays when
    ``dtype="bfloat16"``, become ``torch.bfloat16`` tensors. torch tensors are returned as
    they are. Needs torch. torch has no read-only tensors: the tensor of a borrowed lease's
    array (read-only, over a daemon's shared memory every reader sees) must be treated as
    read-only (write to a ``.clone()``); torch warns about other read-only arrays itself.
    """
    import torch

    if _is_torch(array):
        return array
    exporter = (
        _dlpack_exporter(array) if isinstance(array, numpy.ndarray) and hasattr(torch, "from_dlpack") else None
    )
    if exporter is not None and not exporter.readonly:
        wants_bf16 = dtype == "bfloat16" or array.dtype.name == "bfloat16"
        if wants_bf16 == (exporter.dtype == "bfloat16"):
            # ferry's own buffer, whole: DLPack hands torch the buffer itself (bfloat16 as
            # kDLBfloat), and the tensor keeps it alive.
            return torch.from_dlpack(exporter)
    array = numpy.asarray(array)
    if dtype == "bfloat16" or array.dtype.name == "bfloat16":
        if array.dtype.itemsize != 2:
            raise InvalidArgumentError(f"a {array.dtype} array cannot hold bfloat16 values")
        return torch.from_numpy(array.view(numpy.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


class _WritableAliasOf:
    """An array interface over the memory of a read-only ``array``, declared writable. It
    holds ``array``, so the alias keeps the array (and its lease's pin) alive."""

    __slots__ = ("__array_interface__", "_array")

    def __init__(self, array: numpy.ndarray) -> None:
        interface = dict(array.__array_interface__)
        interface["data"] = (interface["data"][0], False)
        self.__array_interface__ = interface
        self._array = array


def _writable_alias(array: numpy.ndarray) -> numpy.ndarray:
    """A writable numpy view of read-only ``array``'s memory, with its dtype (the interface
    carries custom dtypes such as ``ml_dtypes.bfloat16`` as raw bytes of the same size)."""
    return numpy.asarray(_WritableAliasOf(array)).view(array.dtype)


def _dlpack_exporter(array: Any) -> Any:
    """The ``DLPackTensor`` over the ferry buffer under ``array``, or ``None``."""
    from ferry._ferry import _dlpack_exporter

    return _dlpack_exporter(array)


def to_dlpack(array: Any) -> Any:
    """A DLPack exporter (``ferry.DLPackTensor``) over the ferry buffer under ``array``.

    ``array`` is an array ferry returned (``Store.get``, a loader ``Batch``), whole and with its
    own dtype (a bfloat16 feature's ``ml_dtypes.bfloat16`` or ``uint16`` array exports as
    bfloat16). ``torch.from_dlpack``, ``numpy.from_dlpack``, ``jax.dlpack.from_dlpack``, ...
    take the buffer without a copy and keep it alive as long as their tensor, after the lease
    and the array are gone. Anything else (another array, a slice or a reinterpreting view, an
    empty feature, which has no buffer) is an ``InvalidArgumentError``: numpy arrays export
    themselves (``numpy.ndarray.__dlpack__``).
    """
    exporter = _dlpack_exporter(array)
    if exporter is None:
        raise InvalidArgumentError(
            f"to_dlpack: {type(array).__name__} is not a whole array over a ferry buffer "
            "(an array from Store.get or a Batch, unsliced, with its own dtype)"
        )
    return exporter


def _to_torch_dict(tensors: dict[str, Any], dtypes: dict[str, str]) -> dict[str, Any]:
    """``Lease.to_torch`` and ``Batch.to_torch``: every array as a torch tensor over the same
    memory.

    A borrowed lease's arrays are read-only, over a daemon's shared memory. torch has no
    read-only tensors and would warn, once per process, so that the caller's own read-only
    arrays would then go unwarned; the contract is documented instead (treat such tensors as
    read-only), and torch gets a writable alias of the same memory. No warning filter is
    touched: ``warnings.catch_warnings`` swaps the process-wide filters under other threads."""
    return {
        name: to_torch(_writable_alias(value) if _is_read_only_array(value) else value, dtypes.get(name))
        for name, value in tensors.items()
    }


def _is_read_only_array(value: Any) -> bool:
    return isinstance(value, numpy.ndarray) and not value.flags.writeable
