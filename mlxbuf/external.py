"""External memory as Buffers: Buffer.from_raw and Device.from_numpy.

An external storage wraps memory mlxbuf did not allocate. It is not
registered in the residency set (``BufferPool.register_existing`` can add
it) and does not count in ``Device.active_memory``. Whatever owns the
memory is kept alive until the storage dies, which may be after Python
dropped its last Buffer: a submitted command buffer holds the storage until
it completes. The owner's reference is dropped by C (``cm_py_release_object``),
so it is released correctly from the host backend's worker thread too.
"""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING, Any, SupportsIndex

import numpy as np

from mlxbuf._cmetal import ffi, lib
from mlxbuf.buffer import Buffer, _dtype_arg, _int_arg, _shape_arg
from mlxbuf.dtypes import as_dtype
from mlxbuf.errors import InvalidArgument, check, error_for

if TYPE_CHECKING:
    from numpy.typing import ArrayLike

    from mlxbuf.buffer import ShapeLike
    from mlxbuf.device import Device
    from mlxbuf.dtypes import DType, DTypeLike

__all__ = ["from_raw", "from_numpy", "wrap_memory"]

# Private prototypes rather than ctypes.pythonapi's shared function
# objects, whose argtypes other libraries may set differently.
_Py_IncRef = ctypes.PYFUNCTYPE(None, ctypes.py_object)(("Py_IncRef", ctypes.pythonapi))
_Py_DecRef = ctypes.PYFUNCTYPE(None, ctypes.py_object)(("Py_DecRef", ctypes.pythonapi))
_RELEASE_OBJECT = ffi.addressof(lib, "cm_py_release_object")
_UNSUPPORTED = lib.CM_ERR_UNSUPPORTED


def _address(pointer: Any, what: str) -> int:
    """An int address from an int, a cffi pointer or a ctypes pointer/c_void_p."""
    if isinstance(pointer, ffi.CData):
        return int(ffi.cast("uintptr_t", pointer))
    if isinstance(pointer, ctypes.c_void_p):
        return pointer.value or 0
    if isinstance(pointer, ctypes._Pointer):
        return ctypes.cast(pointer, ctypes.c_void_p).value or 0
    return _int_arg(pointer, what)


def wrap_memory(
    device: Device, address: int, byte_len: int, *, owner: object = None, writable: bool = True
) -> tuple[int, Any]:
    """``(status, result)``: wrap ``byte_len`` bytes at ``address`` as an
    external storage of ``device`` keeping ``owner`` alive until it dies.

    On success ``result`` (a ``cm_alloc_result_t *``) holds one storage
    reference for the caller. A non-zero status is returned, not raised, so
    callers can fall back to a copy on CM_ERR_UNSUPPORTED (Metal needs
    page-aligned memory); the C message is still the thread's last error.
    """
    res = ffi.new("cm_alloc_result_t *")
    if owner is None:
        release, ctx = ffi.NULL, ffi.NULL
    else:
        # One reference travels with the storage; C drops it (taking the
        # GIL from whatever thread frees the storage).
        _Py_IncRef(owner)
        release, ctx = _RELEASE_OBJECT, ffi.cast("void *", id(owner))
    status = lib.cm_storage_wrap_external(
        device._handle, ffi.cast("void *", address), byte_len, 1 if writable else 0, release, ctx, res
    )
    if status and owner is not None:
        _Py_DecRef(owner)
    return status, res


def _default_shape(byte_len: int, dt: DType, shape: ShapeLike | None, what: str) -> tuple[int, ...]:
    if shape is not None:
        shape, count = _shape_arg(shape)
        if count * dt.size > byte_len:
            raise InvalidArgument(f"shape {shape} of {dt} needs {count * dt.size} bytes, more than the {byte_len}-byte {what}")
        return shape
    if byte_len % dt.size:
        raise InvalidArgument(
            f"the {byte_len}-byte {what} is not a whole number of {dt.size}-byte {dt} elements; pass a shape"
        )
    return (byte_len // dt.size,)


def from_raw(
    device: Device,
    pointer: Any,
    byte_len: SupportsIndex | None = None,
    dtype: DTypeLike = "u8",
    shape: ShapeLike | None = None,
    *,
    owner: object = None,
    writable: bool = True,
) -> Buffer:
    """Wrap memory allocated elsewhere as a Buffer of ``device`` without copying.

    - ``byte_len`` given: ``pointer`` is a CPU address (int, cffi or ctypes
      pointer) of ``byte_len`` bytes. ``owner`` (any object, typically the
      one that owns the memory) is kept alive until the storage dies, also
      while a submitted command buffer still uses it after Python dropped
      the Buffer. Metal needs a page-aligned address (Unsupported
      otherwise). The caller guarantees the memory stays valid for that
      long when ``owner`` is None.
    - ``byte_len`` None: ``pointer`` is a native buffer handle, an
      ``id<MTLBuffer>`` as an int, which the storage retains (Metal only;
      the host backend raises Unsupported).

    ``dtype`` defaults to u8 and ``shape`` to 1-D over the whole memory.
    ``writable=False`` (memory only) gives read-only numpy views. The storage is not
    registered in the residency set (``BufferPool.register_existing`` adds
    it) and does not count in ``active_memory``.
    """
    from mlxbuf.device import Device

    if not isinstance(device, Device):
        raise InvalidArgument(f"from_raw needs a Device, got {device!r}")
    dt = _dtype_arg(dtype)
    address = _address(pointer, "pointer")
    if byte_len is None:
        res = ffi.new("cm_alloc_result_t *")
        check(lib.cm_storage_wrap_native(device._handle, address, res))
        try:
            shape = _default_shape(res.byte_len, dt, shape, "native buffer")
        except BaseException:
            lib.cm_storage_release(res.storage)
            raise
        return Buffer._from_storage(device, res.storage, res.contents, res.byte_len, dt, shape)
    byte_len = _int_arg(byte_len, "byte_len", minimum=1)
    shape = _default_shape(byte_len, dt, shape, "memory")
    status, res = wrap_memory(device, address, byte_len, owner=owner, writable=writable)
    if status:
        raise error_for(status)
    return Buffer._from_storage(device, res.storage, res.contents, res.byte_len, dt, shape)


def from_numpy(device: Device, array: ArrayLike, copy: bool | None = None) -> Buffer:
    """A Buffer with ``array``'s dtype, shape and contents.

    ``copy=None``: zero-copy when the array is C-contiguous, aligned,
    native-endian and not empty (and, on Metal, page-aligned), keeping the
    array alive while the storage lives; a copy otherwise. ``copy=True``
    always copies into a fresh device allocation; ``copy=False`` raises
    BufferError where a copy would be needed. A zero-copy Buffer of a
    read-only array is read-only. Objects that are not ndarrays go through
    ``numpy.asarray`` first.
    """
    if not isinstance(array, np.ndarray):
        array = np.asarray(array)
    dt = as_dtype(array.dtype if array.dtype.isnative else array.dtype.newbyteorder("="))
    shape = tuple(int(d) for d in array.shape)
    why = None
    if copy is not True:
        if not array.flags.c_contiguous:
            why = "the array is not C-contiguous"
        elif not array.dtype.isnative:
            why = "the array is not in native byte order"
        elif not array.flags.aligned:
            why = "the array is not aligned to its elements"
        elif array.nbytes == 0:
            why = "the array is empty: there is no memory to wrap"
        else:
            status, res = wrap_memory(
                device, array.ctypes.data, array.nbytes, owner=array, writable=array.flags.writeable
            )
            if not status:
                return Buffer._from_storage(device, res.storage, res.contents, res.byte_len, dt, shape)
            if status != _UNSUPPORTED:
                raise error_for(status)
            why = error_for(status).args[0]
        if copy is False:
            raise BufferError(f"cannot wrap the array without a copy: {why}")
    buf = device.alloc_buffer(max(array.nbytes, dt.size), dt, shape)
    if array.size:
        target = buf.numpy(wait=False)
        source = array if array.dtype.isnative else array.astype(array.dtype.newbyteorder("="))
        np.copyto(target, source, casting="no")
    return buf
