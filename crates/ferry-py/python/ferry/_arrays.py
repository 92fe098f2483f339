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

from ferry._errors import InvalidArgumentError

__all__ = ["bfloat16_dtype", "to_torch"]


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


def _as_numpy(obj: Any) -> tuple[numpy.ndarray, str | None]:
    """A put's input as a numpy array sharing its memory where possible, and the ferry dtype
    its bits hold when the array's own dtype does not say (torch bfloat16)."""
    if _is_torch(obj):
        import torch

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
    they are. Needs torch.
    """
    import torch

    if _is_torch(array):
        return array
    array = numpy.asarray(array)
    if dtype == "bfloat16" or array.dtype.name == "bfloat16":
        if array.dtype.itemsize != 2:
            raise InvalidArgumentError(f"a {array.dtype} array cannot hold bfloat16 values")
        return torch.from_numpy(array.view(numpy.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def _to_torch_dict(tensors: dict[str, Any], dtypes: dict[str, str]) -> dict[str, Any]:
    """``Lease.to_torch``: every array as a torch tensor over the same memory."""
    return {name: to_torch(value, dtypes.get(name)) for name, value in tensors.items()}
