"""mlxbuf.asarray: a Buffer from anything array-like, zero-copy where the memory can be shared."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from mlxbuf.buffer import Buffer, _dtype_arg
from mlxbuf.dtypes import DType, as_dtype
from mlxbuf.errors import InvalidArgument, UnsupportedDtype

if TYPE_CHECKING:
    from numpy.typing import NDArray

    from mlxbuf.device import Device
    from mlxbuf.dtypes import DTypeLike

__all__ = ["asarray"]


def asarray(obj: Any, dtype: DTypeLike | None = None, device: Device | None = None, copy: bool | None = None) -> Buffer:
    """A Buffer with ``obj``'s elements, sharing its memory where it can.

    ``obj`` may be
    - a Buffer: itself when it is on ``device`` with ``dtype``, else a
      copy (``Buffer.to``, or a dtype conversion);
    - a numpy array: its memory, wrapped by ``Device.from_numpy``, when it
      is C-contiguous, aligned, native-endian and not empty (on Metal also
      page-aligned), else a copy;
    - any other DLPack producer (PyTorch, MLX, JAX CPU arrays, ...):
      through ``mlxbuf.from_dlpack``;
    - an object with the buffer protocol (bytes, bytearray, memoryview,
      array.array, mmap): its memory, read with the buffer's item format
      (bytes and bytearray are u8);
    - anything ``numpy.asarray`` takes (nested sequences, scalars, objects
      with ``__array__``): nested sequences and scalars are always copied.

    ``dtype`` (any spelling ``mlxbuf.as_dtype`` takes) converts the
    elements when it differs, with numpy's casting (a copy). ``device``
    defaults to the Buffer's own device for a Buffer, else
    ``mlxbuf.default_device()``.

    ``copy``: None (the default) shares memory where it can and copies
    otherwise; True always copies into a fresh allocation of ``device``;
    False never copies and raises InvalidArgument (a ValueError, as numpy
    2's ``asarray(copy=False)`` raises ValueError) naming why a copy would
    be needed.

    Copies are fresh device allocations: in the residency set and counted
    in ``active_memory``. A Buffer sharing memory mlxbuf did not allocate
    keeps its source alive, is not registered in the residency set
    (``BufferPool.register_existing`` adds it), does not count in
    ``active_memory``, and is read-only when the source is.
    """
    from mlxbuf.device import Device, default_device

    if device is not None and not isinstance(device, Device):
        raise InvalidArgument(f"asarray needs a Device (or None), got device={device!r}")
    if copy is not None:
        copy = bool(copy)
    dt = None if dtype is None else _dtype_arg(dtype)
    if isinstance(obj, Buffer):
        return _from_buffer(obj, dt, obj.device if device is None else device, copy)
    target = default_device() if device is None else device
    if isinstance(obj, np.ndarray):
        return _from_array(obj, dt, target, copy, shared=True)
    if hasattr(obj, "__dlpack__"):
        return _from_producer(obj, dt, target, copy)
    try:
        view = memoryview(obj)
    except TypeError:
        view = None
    if view is not None:
        return _from_array(_numpy_of(view, obj), dt, target, copy, shared=True)
    array = _numpy_of(obj, obj)
    # numpy made the array itself (a nested sequence, a scalar) unless it
    # views memory someone else owns.
    return _from_array(array, dt, target, copy, shared=array.base is not None)


def _numpy_of(source: Any, obj: Any) -> NDArray[Any]:
    try:
        return np.asarray(source)
    except (ValueError, TypeError) as exc:
        raise InvalidArgument(f"asarray cannot read {type(obj).__name__} {_short(obj)} as an array: {exc}") from None


def _short(obj: Any) -> str:
    text = repr(obj)
    return text if len(text) <= 80 else text[:77] + "..."


def _no_copy(why: str) -> InvalidArgument:
    return InvalidArgument(f"asarray(copy=False) would need a copy: {why}")


def _from_buffer(buf: Buffer, dt: DType | None, target: Device, copy: bool | None) -> Buffer:
    same_device = target is buf.device or target._handle == buf.device._handle
    if dt is None or dt is buf.dtype:
        if same_device:
            return buf.copy() if copy else buf
        if copy is False:
            raise _no_copy(f"the Buffer is on another device ({buf.device!r}) than {target!r}")
        return buf.to(target)
    if copy is False:
        raise _no_copy(f"converting {buf.dtype} to {dt}")
    return _converted(buf.numpy(), dt, target)


def _from_array(array: NDArray[Any], dt: DType | None, target: Device, copy: bool | None, *, shared: bool) -> Buffer:
    """A Buffer of a numpy array; ``shared``: the array views its source's
    memory (so wrapping it shares that memory), rather than being a
    temporary numpy made."""
    native = array.dtype if array.dtype.isnative else array.dtype.newbyteorder("=")
    try:
        source = as_dtype(native)
    except UnsupportedDtype as exc:
        raise UnsupportedDtype(f"asarray: the elements are {native} ({exc})") from None
    if dt is not None and dt is not source:
        if copy is False:
            raise _no_copy(f"converting {source} to {dt}")
        return _converted(array, dt, target)
    if not shared:
        if copy is False:
            raise _no_copy("numpy had to build the array (a nested sequence or a scalar has no memory to share)")
        copy = True
    try:
        return target.from_numpy(array, copy=copy)
    except BufferError as exc:  # copy=False and the memory cannot back a storage
        raise _no_copy(str(exc)) from exc


def _from_producer(obj: Any, dt: DType | None, target: Device, copy: bool | None) -> Buffer:
    from mlxbuf.dlpack import from_dlpack

    try:
        buf = from_dlpack(obj, device=target, copy=copy)
    except BufferError as exc:
        if copy is False:
            raise _no_copy(str(exc)) from exc
        raise
    if dt is None or dt is buf.dtype:
        return buf
    if copy is False:
        raise _no_copy(f"converting {buf.dtype} to {dt}")
    return _converted(buf.numpy(), dt, target)


def _converted(array: NDArray[Any], dt: DType, target: Device) -> Buffer:
    """A fresh allocation of ``target`` holding ``array`` cast to ``dt`` (numpy's unsafe casting, as astype)."""
    shape = tuple(int(d) for d in array.shape)
    nbytes = math.prod(shape) * dt.size
    out = target.alloc_buffer(max(nbytes, dt.size), dt, shape)
    if nbytes:
        np.copyto(out.numpy(wait=False), array, casting="unsafe")
    return out
