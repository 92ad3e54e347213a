"""DLPack exchange (the Python array API's ``__dlpack__`` protocol, DLPack 1.1).

Export (``Buffer.__dlpack__``)
- A capsule named ``"dltensor_versioned"`` (a DLManagedTensorVersioned)
  when the consumer passes ``max_version >= (1, 0)``, a legacy
  ``"dltensor"`` capsule when it passes no ``max_version`` (MLX, older
  numpy and PyTorch).
- The tensor holds one reference to the storage; its deleter is pure C (an
  atomic release and a free), so consumers may call it from any thread at
  any time, also after interpreter shutdown. A capsule nobody consumed
  calls the deleter once when it is collected; a consumed capsule (renamed
  ``"used_dltensor*"``) is left to its consumer.
- Host storages export as kDLCPU ``(1, 0)``. Metal storages export as
  kDLMetal ``(8, 0)`` with the ``id<MTLBuffer>`` as ``data`` and the view's
  offset (plus the storage's offset inside the MTLBuffer) as
  ``byte_offset``, the convention of PyTorch MPS and MLX; ``dl_device=(1,
  0)`` exports the same memory as kDLCPU through the shared contents
  pointer, still without a copy. numpy cannot read kDLMetal, so on Metal
  use ``numpy.from_dlpack(buf, device="cpu")`` (or ``buf.numpy()``).
- Synchronisation: mlxbuf has no stream a consumer could order work on, so
  ``stream=None`` (the default) waits for every submitted command buffer
  that writes the storage before exporting: the consumer sees finished
  data. ``stream=-1`` (the array API's "no synchronisation") skips the
  wait; any other stream raises BufferError. Pending readers are not
  waited for: a consumer that writes while the GPU reads races, as with
  any shared memory.
- Every argument is checked before anything is exported (a malformed
  ``max_version``, ``dl_device`` or ``stream`` raises BufferError, a
  ``copy`` that is not a bool or None TypeError), and a failure after the
  export frees the tensor again: no call leaves a reference behind.
- ``copy=True`` exports a fresh copy (flag IS_COPIED). ``copy=None`` also
  copies where a view cannot be expressed: a read-only storage through a
  legacy capsule, which has no read-only flag (``copy=False`` raises
  BufferError there). Read-only storages set READ_ONLY in versioned
  capsules.

Import (``mlxbuf.from_dlpack``)
- Zero-copy when the memory can back a storage: C-contiguous kDLCPU
  memory on the host backend (page-aligned on Metal), kDLMetal buffers on
  Metal. The storage then owns the producer's tensor and calls its deleter
  once, when the storage dies, which keeps the producer's memory alive.
- Otherwise (strided, empty, unaligned) a copy into a fresh allocation,
  unless ``copy=False`` (BufferError). ``copy=True`` always copies.
- Before either, the tensor is checked as untrusted input: a NULL data
  pointer with elements to read, or bytes (data + byte_offset, plus the
  extent of shape x strides) beyond either end of the address space or
  farther from data than any object can be, raise BufferError. The copy
  reads exactly the checked range.
- Exception-safe: whatever raises, the tensor has one owner (the capsule,
  whose destructor gives it back, or the storage) and its deleter runs once.

The PyCapsule calls go through ctypes.pythonapi because cffi cannot make a
PyObject; the capsule's destructor and names come from C (pycapsule.c and
interop.c) so that nothing a capsule points at is a Python object that
shutdown could free first.
"""

from __future__ import annotations

import ctypes
import datetime
import operator
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from mlxbuf._cmetal import ffi, lib
from mlxbuf.buffer import Buffer
from mlxbuf.dtypes import DType
from mlxbuf.errors import InvalidArgument, UnsupportedDtype, error_for, last_error_message

if TYPE_CHECKING:
    from typing_extensions import CapsuleType

    from mlxbuf.device import Device

__all__ = ["to_dlpack", "dlpack_device", "from_dlpack", "SupportsDLPack", "kDLCPU", "kDLMetal"]


class SupportsDLPack(Protocol):
    """Any DLPack producer: an object with a ``__dlpack__`` method (numpy, PyTorch, MLX, a Buffer)."""

    def __dlpack__(self) -> Any: ...

kDLCPU = lib.kDLCPU
kDLMetal = lib.kDLMetal
# Pinned host memory of CUDA / ROCm is plain CPU memory to us.
_CPU_LIKE = frozenset((lib.kDLCPU, lib.kDLCUDAHost, lib.kDLROCMHost))
_NO_SYNC_STREAM = -1
_U32_MAX = (1 << 32) - 1

_CapsuleType = type(datetime.datetime_CAPI)

# Private prototypes rather than ctypes.pythonapi's shared function
# objects, whose argtypes other libraries may set differently.
_api = ctypes.pythonapi
_PyCapsule_New = ctypes.PYFUNCTYPE(ctypes.py_object, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)(
    ("PyCapsule_New", _api)
)
_PyCapsule_IsValid = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.py_object, ctypes.c_char_p)(("PyCapsule_IsValid", _api))
_PyCapsule_GetPointer = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.py_object, ctypes.c_char_p)(
    ("PyCapsule_GetPointer", _api)
)
_PyCapsule_SetName = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.py_object, ctypes.c_void_p)(("PyCapsule_SetName", _api))

# Static C strings: a capsule keeps its name by pointer.
_NAME = {v: int(ffi.cast("uintptr_t", lib.cm_dlpack_capsule_name(v, 0))) for v in (0, 1)}
_USED_NAME = {v: int(ffi.cast("uintptr_t", lib.cm_dlpack_capsule_name(v, 1))) for v in (0, 1)}
_NAME_BYTES = {v: ffi.string(lib.cm_dlpack_capsule_name(v, 0)) for v in (0, 1)}
_DESTRUCTOR = int(ffi.cast("uintptr_t", lib.cm_py_capsule_destructor()))

_BY_DLPACK = {dt.dlpack: dt for dt in DType}
_UINT_BY_SIZE = {1: DType.U8, 2: DType.U16, 4: DType.U32, 8: DType.U64}


# ---- export -----------------------------------------------------------------


def dlpack_device(buf: Buffer) -> tuple[int, int]:
    """``(kDLMetal, 0)`` for a Metal buffer, ``(kDLCPU, 0)`` for a host buffer."""
    return (kDLMetal, 0) if buf.device.backend == "metal" else (kDLCPU, 0)


def _int_pair(value: Any, what: str, lowest: int, highest: int) -> tuple[int, int]:
    """``value`` as a pair of ints in [lowest, highest], else BufferError naming it."""
    try:
        first, second = value
        if isinstance(first, (bool, np.bool_)) or isinstance(second, (bool, np.bool_)):
            raise TypeError
        pair = (operator.index(first), operator.index(second))
    except (TypeError, ValueError):
        raise BufferError(f"{what} must be a pair of integers, got {value!r}") from None
    if not all(lowest <= v <= highest for v in pair):
        raise BufferError(f"{what} {value!r} is out of range: each must be in [{lowest}, {highest}]")
    return pair


def _copy_of(buf: Buffer) -> Buffer:
    """A fresh allocation holding this view's bytes (the caller waited for writers)."""
    nbytes = buf.nbytes
    out = buf.device.alloc_buffer(max(nbytes, buf.dtype.size), buf.dtype, buf.shape)
    if nbytes:
        ffi.memmove(out._memory(), ffi.cast("uint8_t *", buf._memory()) + buf.byte_offset, nbytes)
    return out


def to_dlpack(
    buf: Buffer,
    *,
    stream: int | None = None,
    max_version: tuple[int, int] | None = None,
    dl_device: tuple[int, int] | None = None,
    copy: bool | None = None,
) -> CapsuleType:
    """Export ``buf`` as a DLPack capsule (``Buffer.__dlpack__``; see the module docstring).

    Every argument is checked before anything is exported, and a failure
    after the export frees the tensor again: a call that raises leaves no
    reference behind.
    """
    if max_version is None:
        versioned, minor = False, 0
    else:
        major, minor = _int_pair(max_version, "max_version", 0, _U32_MAX)
        versioned = major >= 1
        minor = lib.CM_DLPACK_MINOR_VERSION if major > 1 else min(minor, lib.CM_DLPACK_MINOR_VERSION)
    if copy is not None and type(copy) is not bool:
        raise TypeError(f"copy must be True, False or None, got {copy!r}")
    if stream is not None and (type(stream) is not int or stream != _NO_SYNC_STREAM):
        raise BufferError(
            f"unsupported stream {stream!r}: mlxbuf exports with stream=None (after waiting for "
            f"submitted writers) or stream=-1 (no synchronisation)"
        )
    native = dlpack_device(buf)
    device_type = native[0]
    if dl_device is not None:
        target = _int_pair(dl_device, "dl_device", -(1 << 31), (1 << 31) - 1)
        if target == (kDLCPU, 0) and buf.device.has_unified_memory:
            device_type = kDLCPU
        elif target != native:
            raise BufferError(
                f"cannot export to DLPack device {target}: this buffer is on {native} and can also be "
                f"exported as (1, 0) (kDLCPU)"
            )
    if copy is False and not versioned and not buf.writable:
        raise BufferError(
            "a read-only buffer cannot be exported through a legacy DLPack capsule without a copy "
            "(it has no read-only flag); ask for max_version=(1, 0) or allow a copy"
        )
    if stream is None:
        buf.wait_idle()

    flags = 0
    if copy is True:
        buf, flags = _copy_of(buf), lib.CM_DLPACK_FLAG_IS_COPIED
    elif not versioned and not buf.writable:
        buf = _copy_of(buf)

    shape = buf.shape
    shape_arr = ffi.new("int64_t[]", list(shape) or [1])
    view = ffi.new("cm_dlpack_view_t *")
    view.byte_offset = buf.byte_offset
    view.ndim = len(shape)
    view.shape = shape_arr
    view.strides = ffi.NULL
    view.dtype.code, view.dtype.bits, view.dtype.lanes = buf.dtype.dlpack
    view.device_type = device_type
    view.device_id = 0
    view.flags = flags
    out = ffi.new("void **")
    status = lib.cm_dlpack_export(buf._storage, view, 1 if versioned else 0, out)
    if status == lib.CM_ERR_UNSUPPORTED:
        raise BufferError(last_error_message())
    if status:
        raise error_for(status)
    managed = out[0]
    try:
        if versioned:
            ffi.cast("DLManagedTensorVersioned *", managed).version.minor = minor
        return _PyCapsule_New(int(ffi.cast("uintptr_t", managed)), _NAME[versioned], _DESTRUCTOR)
    except BaseException:
        lib.cm_dlpack_delete(managed, 1 if versioned else 0)
        raise


# ---- import -----------------------------------------------------------------


def _request_capsule(obj: Any, device: Device, copy: bool | None) -> Any:
    """Ask a producer for a capsule this device can read, newest protocol first."""
    exporter = getattr(obj, "__dlpack__", None)
    if exporter is None:
        raise TypeError(f"{type(obj).__name__} does not support DLPack (it has no __dlpack__ method)")
    kwargs: dict[str, Any] = {"max_version": (lib.CM_DLPACK_MAJOR_VERSION, lib.CM_DLPACK_MINOR_VERSION)}
    if copy is False:
        kwargs["copy"] = False
    device_of = getattr(obj, "__dlpack_device__", None)
    if device_of is not None:
        dev_type = int(device_of()[0])
        readable = dev_type in _CPU_LIKE or (dev_type == kDLMetal and device.backend == "metal")
        if not readable:
            kwargs["dl_device"] = (kDLCPU, 0)
    try:
        return exporter(**kwargs)
    except TypeError:
        # Producers older than the 2023 array API take no keywords.
        return exporter()


def _dtype_of(info: Any) -> DType:
    dt = _BY_DLPACK.get((info.dtype.code, info.dtype.bits, info.dtype.lanes))
    if dt is None:
        raise UnsupportedDtype(
            f"DLPack dtype (code {info.dtype.code}, {info.dtype.bits} bits, {info.dtype.lanes} lanes) "
            f"has no mlxbuf equivalent"
        )
    return dt


def _tensor(ptr: Any, versioned: int) -> Any:
    kind = "DLManagedTensorVersioned *" if versioned else "DLManagedTensor *"
    return ffi.cast(kind, ptr).dl_tensor


def _copy_from_tensor(device: Device, t: Any, info: Any, dt: DType, shape: tuple[int, ...]) -> Buffer:
    """A fresh Buffer with the contents of the (CPU-readable, maybe strided) tensor t.

    Reads only the bytes cm_dlpack_describe found the tensor to address
    ([info.low, info.low + info.span), checked non-NULL and inside the
    address space), so the copy refuses exactly what a zero-copy import
    refuses.
    """
    if info.device_type not in _CPU_LIKE:
        raise BufferError(
            f"cannot copy a tensor of DLPack device type {info.device_type}: mlxbuf reads CPU memory "
            f"(and, on a Metal device, kDLMetal buffers)"
        )
    out = device.alloc_buffer(max(info.nbytes, dt.size), dt, shape)
    if info.nbytes == 0:
        return out
    size = dt.size
    if t.strides == ffi.NULL:
        strides = [0] * len(shape)
        step = size
        for i in reversed(range(len(shape))):
            strides[i], step = step, step * shape[i]
    else:
        # A dimension of length 1 is never stepped along: its stride may be
        # anything (numpy and PyTorch leave arbitrary values there).
        strides = [t.strides[i] * size if shape[i] > 1 else 0 for i in range(len(shape))]
    raw = np.frombuffer(ffi.buffer(ffi.cast("uint8_t *", info.low), info.span), dtype=np.uint8)
    unit = _UINT_BY_SIZE[size].numpy
    src = np.lib.stride_tricks.as_strided(
        raw[info.origin :].view(unit), shape=shape, strides=strides, writeable=False
    )
    dst = out.as_slice(_UINT_BY_SIZE[size], wait=False).reshape(shape)
    np.copyto(dst, src)
    return out


def _consume(capsule: Any, device: Device, copy: bool | None) -> Buffer:
    """A Buffer from an unconsumed capsule: the tensor itself (the storage
    then owns it) or a copy (the capsule keeps it, and its destructor gives
    it back to the producer).

    Exception-safe: the capsule is renamed to "used" before the import
    takes the tensor and renamed back if the import fails, and the storage
    goes straight into Buffer._from_storage, which owns it before anything
    else can fail. So whatever raises, the tensor has exactly one owner (the
    capsule or the storage) and its deleter runs once.
    """
    if _PyCapsule_IsValid(capsule, _NAME_BYTES[1]):
        versioned = 1
    elif _PyCapsule_IsValid(capsule, _NAME_BYTES[0]):
        versioned = 0
    else:
        raise BufferError("not an unconsumed DLPack capsule (it was consumed already, or is another kind)")
    ptr = ffi.cast("void *", _PyCapsule_GetPointer(capsule, _NAME_BYTES[versioned]))
    info = ffi.new("cm_dlpack_import_info_t *")
    # A failure here leaves the capsule unconsumed: its own destructor
    # gives the tensor back to the producer.
    if lib.cm_dlpack_describe(ptr, versioned, info):
        raise BufferError(last_error_message())
    dt = _dtype_of(info)
    t = _tensor(ptr, versioned)
    shape = tuple(int(t.shape[i]) for i in range(info.ndim))
    if copy is not True:
        res = ffi.new("cm_alloc_result_t *")
        # Claimed before the import: the capsule's destructor then leaves
        # the tensor alone whatever happens next.
        _PyCapsule_SetName(capsule, _USED_NAME[versioned])
        status = -1
        try:
            status = lib.cm_dlpack_import(device._handle, ptr, versioned, 1, res, info)
        finally:
            if status != 0:
                # Not taken: the capsule owns the tensor again.
                _PyCapsule_SetName(capsule, _NAME[versioned])
        if status == 0:
            return Buffer._from_storage(
                device, res.storage, res.contents, res.byte_len, dt, shape, byte_offset=info.byte_offset
            )
        if status != lib.CM_ERR_UNSUPPORTED:
            raise error_for(status)
        if copy is False:
            raise BufferError(f"cannot import without a copy: {last_error_message()}")
    return _copy_from_tensor(device, t, info, dt, shape)


def from_dlpack(
    obj: SupportsDLPack | CapsuleType, device: Device | None = None, copy: bool | None = None
) -> Buffer:
    """A Buffer over the memory of any DLPack producer (numpy, PyTorch, MLX, ...).

    ``obj`` is an object with ``__dlpack__`` (or a DLPack capsule, which is
    consumed). ``device`` defaults to the Buffer's own device for an
    mlxbuf Buffer, else ``mlxbuf.default_device()``. ``copy=None``:
    zero-copy where the memory can back a storage (keeping the producer's
    memory alive for as long as the storage lives), else a copy;
    ``copy=True`` always copies; ``copy=False`` raises BufferError where a
    copy would be needed. An mlxbuf Buffer on the same device comes back as
    a clone sharing its storage. Imported storages are not registered in
    the residency set and do not count in ``active_memory``.
    """
    if isinstance(obj, Buffer) and (device is None or device is obj.device):
        if copy is True:
            obj.wait_idle()
            return _copy_of(obj)
        return obj.clone()
    from mlxbuf.device import Device, default_device

    if device is None:
        device = default_device()
    elif not isinstance(device, Device):
        raise InvalidArgument(f"from_dlpack needs a Device (or None), got device={device!r}")
    capsule = obj if type(obj) is _CapsuleType else _request_capsule(obj, device, copy)
    return _consume(capsule, device, copy)
