"""Buffer: a typed, shaped view over one reference-counted storage."""

from __future__ import annotations

import builtins
import math
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, SupportsIndex, TypeAlias, Union

import numpy as np

from mlxbuf._cmetal import ffi, lib
from mlxbuf.dtypes import _LOOKUP as _DTYPES
from mlxbuf.dtypes import DType, DTypeLike, as_dtype
from mlxbuf.errors import InvalidArgument, check

if TYPE_CHECKING:
    from numpy.typing import DTypeLike as NumpyDTypeLike
    from numpy.typing import NDArray
    from typing_extensions import CapsuleType

    from mlxbuf.device import Device
    from mlxbuf.residency import ResidencySet

__all__ = ["Buffer", "ShapeLike"]

# What every function taking a shape accepts: a tuple or list of
# non-negative ints (numpy integers too), or one int for a 1-D shape.
ShapeLike: TypeAlias = Union[Sequence[SupportsIndex], int, "np.integer[Any]"]

_new = object.__new__
_gc = ffi.gc
_release = lib.cm_storage_release
_UINT8_PTR = ffi.typeof("uint8_t *")
_ALLOC_RESULT = ffi.typeof("cm_alloc_result_t *")
_STORAGE_INFO = ffi.typeof("cm_storage_info_t *")
_U64_LIMIT = 1 << 64
_KINDS = {
    lib.CM_STORAGE_DEVICE: "device",
    lib.CM_STORAGE_POOLED: "pooled",
    lib.CM_STORAGE_EXTERNAL: "external",
    lib.CM_STORAGE_MAPPED: "mapped",
}

# One result struct per thread: cffi releases the GIL around C calls, so a
# struct shared between threads could be overwritten mid-read, and a fresh
# ffi.new per allocation costs as much as the allocation itself.
_tls = threading.local()


def _result() -> Any:
    try:
        return _tls.res
    except AttributeError:
        res = _tls.res = ffi.new(_ALLOC_RESULT)
        return res


# ---- validation helpers (shared with device, pool and encoder) ----------------


def _int_arg(value: Any, what: str, *, minimum: int = 0) -> int:
    """``value`` as an int >= minimum and < 2**64, else InvalidArgument naming it.

    bools are refused: ``alloc_buffer(True, ...)`` is a bug, not a 1-byte request.
    """
    if type(value) is not int:
        if isinstance(value, bool) or isinstance(value, np.bool_):
            raise InvalidArgument(f"{what} must be an integer, got the bool {value!r}")
        try:
            value = value.__index__()
        except (AttributeError, TypeError):
            raise InvalidArgument(f"{what} must be an integer, got {value!r} ({type(value).__name__})") from None
    if value < minimum:
        qualifier = {0: "non-negative", 1: "positive"}.get(minimum, f">= {minimum}")
        raise InvalidArgument(f"{what} must be {qualifier}, got {value}")
    if value >= _U64_LIMIT:
        raise InvalidArgument(f"{what} {value} does not fit in 64 bits")
    return value


def _shape_arg(shape: Any) -> tuple[tuple[int, ...], int]:
    """``(tuple_of_ints, element_count)`` for a tuple/list (or int) of non-negative ints."""
    if type(shape) is tuple:
        count = 1
        for d in shape:
            if type(d) is not int or d < 0:
                break
            count *= d
        else:
            return shape, count
    if isinstance(shape, (tuple, list)):
        dims = tuple(_int_arg(d, f"dimension {i} of shape {tuple(shape)!r}") for i, d in enumerate(shape))
        return dims, math.prod(dims)
    if isinstance(shape, (int, np.integer)) and not isinstance(shape, (bool, np.bool_)):
        n = _int_arg(shape, "shape")
        return (n,), n
    raise InvalidArgument(f"shape must be a tuple or list of non-negative ints, got {shape!r} ({type(shape).__name__})")


def _dtype_arg(dtype: Any) -> DType:
    try:
        return _DTYPES[dtype]
    except (KeyError, TypeError):
        return as_dtype(dtype)


def _shape_fits(dt: DType, shape: tuple[int, ...], count: int, byte_len: int, where: str = "buffer") -> None:
    need = count * dt.size
    if need > byte_len:
        raise InvalidArgument(
            f"shape {shape} of {dt} needs {need} bytes, more than the {byte_len}-byte {where}"
        )


def _prepare(byte_len: Any, dtype: Any, shape: Any) -> tuple[int, DType, tuple[int, ...]]:
    """Validate an allocation request: ``(byte_len, DType, shape)``.

    C checks the device maximum (it knows the limit); Python checks what
    cffi cannot pass to C (non-ints, negatives, > 64 bits) and what C never
    sees (the dtype and the shape).
    """
    if type(byte_len) is not int or byte_len <= 0 or byte_len >= _U64_LIMIT:
        byte_len = _int_arg(byte_len, "byte_len", minimum=1)
    try:
        dt = _DTYPES[dtype]
    except (KeyError, TypeError):
        dt = as_dtype(dtype)
    shape, count = _shape_arg(shape)
    if count * dt.size > byte_len:
        _shape_fits(dt, shape, count, byte_len)
    return byte_len, dt, shape


def _adopt(cls: type[Buffer], device: Device, res: Any, dt: DType, shape: tuple[int, ...]) -> Buffer:
    """A Buffer owning the one C reference in ``res`` (an allocation result)."""
    # Read every field before creating a GC-tracked object: cdata and int
    # reads cannot start a collection, object creation can, and a finalizer
    # allocating on this thread would reuse the per-thread result struct.
    storage = res.storage
    contents = res.contents
    byte_len = res.byte_len
    buf = _new(cls)
    buf._device = device
    # The C function itself is the destructor: no Python frame runs when the
    # last reference dies, so it also works while the interpreter tears
    # modules down.
    buf._storage = _gc(storage, _release, byte_len)
    buf._contents = contents
    buf._dtype = dt
    buf._shape = shape
    buf._byte_offset = 0
    buf._byte_len = byte_len
    return buf


# ---- Buffer ---------------------------------------------------------------------


class Buffer:
    """A typed, shaped view (dtype, shape, byte offset) of one storage.

    Memory is shared between CPU and GPU (Metal StorageModeShared, or host
    memory): ``numpy()``, ``memoryview()`` and ``__array_interface__`` give
    zero-copy CPU views of this view's bytes, the byte offset honoured.
    Buffers are made by ``Device.alloc_buffer``, ``BufferPool.alloc`` and the
    interop functions, never by calling ``Buffer(...)``. Equality is identity.

    Shares its storage with clones, slices, views and numpy arrays made from
    it; the last of them frees the storage (or returns it to its pool).
    Metadata is immutable, so a Buffer may be used from any thread; writes to
    the bytes need the caller's own synchronisation.
    """

    # _storage: the cm_storage_t* cdata, ffi.gc'd to drop Python's one C
    #   reference; shared by every Buffer over the storage.
    # _contents: the storage's base address (a non-owning uint8_t* cdata);
    #   the allocation hot paths leave it unset and _base() reads it from C
    #   on first use.
    # _mem: made on first CPU view by _memory(); unset until then, which
    #   keeps allocation free of a second ffi.gc and a Python destructor.
    __slots__ = (
        "_device", "_storage", "_contents", "_mem", "_dtype", "_shape", "_byte_offset", "_byte_len",
        "__weakref__",
    )

    # The slots' types (annotations only, no class attributes).
    _device: Device
    _storage: Any
    _contents: Any
    _mem: Any
    _dtype: DType
    _shape: tuple[int, ...]
    _byte_offset: int
    _byte_len: int

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError(
            "Buffer objects are made by Device.alloc_buffer, BufferPool.alloc, "
            "Device.map_file, mlxbuf.from_dlpack or Buffer.from_raw"
        )

    # ---- construction (internal) ----

    @classmethod
    def _from_storage(
        cls,
        device: Device,
        storage: Any,
        contents: Any,
        byte_len: int,
        dtype: DTypeLike,
        shape: ShapeLike,
        byte_offset: SupportsIndex = 0,
    ) -> Buffer:
        """Wrap ``storage`` (a ``cm_storage_t *``), taking ownership of one C reference.

        ``contents`` is the storage's CPU address (cdata or int) and
        ``byte_len`` its length. The reference is released when the last
        Buffer or numpy view sharing it dies.
        """
        if not isinstance(contents, ffi.CData) or ffi.typeof(contents) != _UINT8_PTR:
            contents = ffi.cast(_UINT8_PTR, contents)
        # Own the reference before validating, so a bad argument releases it.
        storage = _gc(storage, _release, byte_len)
        dt = _dtype_arg(dtype)
        shape, count = _shape_arg(shape)
        byte_offset = _int_arg(byte_offset, "byte_offset")
        if byte_offset + count * dt.size > byte_len:
            raise InvalidArgument(
                f"shape {shape} of {dt} at byte {byte_offset} exceeds the {byte_len}-byte storage"
            )
        buf = _new(cls)
        buf._device = device
        buf._storage = storage
        buf._contents = contents
        buf._dtype = dt
        buf._shape = shape
        buf._byte_offset = byte_offset
        buf._byte_len = byte_len
        return buf

    def _derive(self, dt: DType, shape: tuple[int, ...], byte_offset: int) -> Buffer:
        """A Buffer sharing this one's storage (and its one C reference)."""
        buf = _new(type(self))
        buf._device = self._device
        buf._storage = self._storage
        try:
            buf._contents = self._contents
            buf._mem = self._mem
        except AttributeError:
            pass
        buf._dtype = dt
        buf._shape = shape
        buf._byte_offset = byte_offset
        buf._byte_len = self._byte_len
        return buf

    # ---- metadata ----

    @property
    def dtype(self) -> DType:
        """The element type (a DType)."""
        return self._dtype

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape, a tuple of ints."""
        return self._shape

    @property
    def ndim(self) -> int:
        """Number of dimensions."""
        return len(self._shape)

    @property
    def element_count(self) -> int:
        """Number of elements: the product of the shape."""
        return math.prod(self._shape)

    @property
    def byte_offset(self) -> int:
        """Offset of this view's first byte from the allocation base."""
        return self._byte_offset

    @property
    def byte_len(self) -> int:
        """Length in bytes of the whole underlying allocation (a pool's size class for pooled buffers)."""
        return self._byte_len

    @property
    def nbytes(self) -> int:
        """Bytes this view covers: element_count x dtype.size."""
        return math.prod(self._shape) * self._dtype.size

    @property
    def contents_ptr(self) -> int:
        """CPU address of the allocation base, as an int."""
        return int(ffi.cast("uintptr_t", self._base()))

    @property
    def data_ptr(self) -> int:
        """CPU address of this view's first byte (contents_ptr + byte_offset)."""
        return int(ffi.cast("uintptr_t", self._base())) + self._byte_offset

    @property
    def device(self) -> Device:
        """The Device that owns the storage."""
        return self._device

    @property
    def residency_set(self) -> ResidencySet | None:
        """The device's ResidencySet if the storage is registered in it, else None."""
        rs = self._device.residency_set
        if rs is not None and rs.contains(self):
            return rs
        return None

    @property
    def storage_kind(self) -> str:
        """How the storage was made: "device", "pooled", "external" or "mapped"."""
        return _KINDS.get(self._info().kind, "unknown")

    @property
    def writable(self) -> bool:
        """False for read-only storages (e.g. a file mapped without writable=True)."""
        return bool(self._info().writable)

    def _info(self) -> Any:
        info = ffi.new(_STORAGE_INFO)
        check(lib.cm_storage_info(self._storage, info))
        return info

    def __repr__(self) -> str:
        offset = f", byte_offset={self._byte_offset}" if self._byte_offset else ""
        return (
            f"Buffer(dtype={self._dtype}, shape={self._shape}, byte_len={self._byte_len}"
            f"{offset}, device={self._device.backend})"
        )

    def __len__(self) -> int:
        if not self._shape:
            raise TypeError("len() of a 0-d Buffer")
        return self._shape[0]

    # ---- views sharing the storage ----

    def clone(self) -> Buffer:
        """A new Buffer over the same storage, dtype, shape and offset; no data is copied."""
        return self._derive(self._dtype, self._shape, self._byte_offset)

    __copy__ = clone

    def __deepcopy__(self, memo: dict[int, Any]) -> Buffer:
        """A new allocation on the same device with a copy of the whole storage's bytes."""
        self.wait_idle()
        other = self._device.alloc_buffer(self._byte_len, "u8", (self._byte_len,))
        ffi.memmove(other._memory(), self._memory(), self._byte_len)
        return other._derive(self._dtype, self._shape, self._byte_offset)

    def slice_view(self, byte_offset: SupportsIndex, n_elements: SupportsIndex) -> Buffer:
        """A 1-D view of ``n_elements`` elements of this dtype starting ``byte_offset``
        bytes from the allocation base (not from this view's offset), as in the seed.

        Raises InvalidArgument when the slice does not fit in the allocation.
        """
        byte_offset = _int_arg(byte_offset, "slice byte_offset")
        n_elements = _int_arg(n_elements, "slice n_elements")
        end = byte_offset + n_elements * self._dtype.size
        if end > self._byte_len:
            raise InvalidArgument(
                f"slice of {n_elements} {self._dtype} elements ({n_elements * self._dtype.size} bytes) "
                f"at byte {byte_offset} exceeds the {self._byte_len}-byte buffer"
            )
        return self._derive(self._dtype, (n_elements,), byte_offset)

    def view(self, dtype: DTypeLike | None = None, shape: ShapeLike | None = None) -> Buffer:
        """The same bytes with new metadata, starting at this view's byte_offset.

        ``shape`` must fit in the bytes from byte_offset to the end of the
        allocation. Without a shape: the same shape if the dtype is unchanged,
        else a 1-D view of this view's nbytes reinterpreted (which must be a
        whole number of the new elements).
        """
        dt = self._dtype if dtype is None else _dtype_arg(dtype)
        available = self._byte_len - self._byte_offset
        if shape is None:
            if dt is self._dtype:
                return self._derive(dt, self._shape, self._byte_offset)
            nbytes = self.nbytes
            if nbytes % dt.size:
                raise InvalidArgument(
                    f"cannot view {nbytes} bytes as {dt}: not a whole number of {dt.size}-byte elements"
                )
            return self._derive(dt, (nbytes // dt.size,), self._byte_offset)
        shape, count = _shape_arg(shape)
        if count * dt.size > available:
            raise InvalidArgument(
                f"shape {shape} of {dt} needs {count * dt.size} bytes, but only {available} bytes "
                f"remain from byte {self._byte_offset} of the {self._byte_len}-byte buffer"
            )
        return self._derive(dt, shape, self._byte_offset)

    def reshape(self, *shape: SupportsIndex | Sequence[SupportsIndex]) -> Buffer:
        """This view with a new shape of the same element count (numpy's spelling)."""
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = shape[0]  # type: ignore[assignment]  # reshape((2, 3)), numpy's other spelling
        shape, count = _shape_arg(tuple(shape))
        if count != math.prod(self._shape):
            raise InvalidArgument(
                f"cannot reshape {math.prod(self._shape)} elements of shape {self._shape} into {shape}"
            )
        return self._derive(self._dtype, shape, self._byte_offset)

    # ---- CPU access (zero-copy) ----

    def wait_idle(self) -> None:
        """Block until no submitted command buffer writes this storage."""
        check(lib.cm_storage_wait_idle(self._storage))

    def _memory(self) -> Any:
        """The owning ``uint8_t *`` cdata over the whole storage.

        Its destructor's closure holds the storage handle, so whatever is
        built on it (ffi.buffer, numpy arrays, memoryviews) keeps the storage
        alive; a pointer derived from it would not.
        """
        try:
            return self._mem
        except AttributeError:
            mem = self._mem = _gc(self._base(), lambda _p, _keep=self._storage: None)
            return mem

    def _base(self) -> Any:
        """The storage's base address as a non-owning ``uint8_t *`` cdata."""
        try:
            return self._contents
        except AttributeError:
            contents = self._contents = self._info().contents
            return contents

    def _bytes_buffer(self) -> Any:
        return ffi.buffer(self._memory(), self._byte_len)

    def numpy(self, wait: bool = True) -> NDArray[Any]:
        """A zero-copy numpy array of this view: its shape and dtype, offset honoured.

        The array aliases the storage's bytes and keeps the storage alive as
        long as it lives. With ``wait=True`` (the default) it first waits for
        submitted command buffers that write the storage, so the CPU sees
        their results; ``wait=False`` skips that (the caller synchronises).
        Read-only storages give read-only arrays.
        """
        info = self._info()
        if wait and info.inflight_writers:
            self.wait_idle()
        arr = np.ndarray(
            self._shape, dtype=self._dtype.numpy, buffer=self._bytes_buffer(), offset=self._byte_offset
        )
        if not info.writable:
            arr.flags.writeable = False
        return arr

    def as_slice(self, dtype: DTypeLike | None = None, wait: bool = True) -> NDArray[Any]:
        """A 1-D zero-copy numpy array of this view's bytes read as ``dtype``
        (default: this dtype). InvalidArgument if the bytes are not a whole
        number of elements."""
        dt = self._dtype if dtype is None else _dtype_arg(dtype)
        nbytes = self.nbytes
        if nbytes % dt.size:
            raise InvalidArgument(
                f"cannot view {nbytes} bytes as {dt}: not a whole number of {dt.size}-byte elements"
            )
        return self._derive(dt, (nbytes // dt.size,), self._byte_offset).numpy(wait=wait)

    def memoryview(self, wait: bool = True) -> builtins.memoryview:
        """A zero-copy memoryview (format "B") of this view's bytes; read-only
        for read-only storages. Waits for submitted writers unless ``wait=False``."""
        info = self._info()
        if wait and info.inflight_writers:
            self.wait_idle()
        start = self._byte_offset
        mv = memoryview(self._bytes_buffer())[start : start + self.nbytes]
        return mv if info.writable else mv.toreadonly()

    @property
    def __array_interface__(self) -> dict[str, Any]:
        """numpy's array interface (version 3): ``np.asarray(buf)`` aliases this
        view and keeps the Buffer (hence the storage) alive. Waits for
        submitted writers like ``numpy()``. Absent for bf16, which the array
        interface cannot describe: numpy then uses ``__array__``."""
        if self._dtype is DType.BF16:
            raise AttributeError("__array_interface__ cannot describe bf16; numpy uses __array__")
        info = self._info()
        if info.inflight_writers:
            self.wait_idle()
        return {
            "version": 3,
            "shape": self._shape,
            "typestr": self._dtype.numpy.str,
            "data": (self.data_ptr, not info.writable),
            "strides": None,
        }

    def __array__(self, dtype: NumpyDTypeLike | None = None, copy: bool | None = None) -> NDArray[Any]:
        """numpy's conversion hook (used for bf16, which the array interface
        cannot describe): the zero-copy view unless a dtype change or
        ``copy=True`` asks for a copy."""
        arr = self.numpy()
        if dtype is not None and np.dtype(dtype) != arr.dtype:
            if copy is False:
                raise ValueError(f"converting {self._dtype} to {np.dtype(dtype)} needs a copy")
            return arr.astype(dtype)
        return arr.copy() if copy else arr

    # ---- interop (mlxbuf.interop) ----

    def __dlpack__(
        self,
        *,
        stream: int | None = None,
        max_version: tuple[int, int] | None = None,
        dl_device: tuple[int, int] | None = None,
        copy: bool | None = None,
    ) -> CapsuleType:
        """Export as a DLPack capsule (see mlxbuf.interop)."""
        from mlxbuf import interop

        return interop.to_dlpack(self, stream=stream, max_version=max_version, dl_device=dl_device, copy=copy)

    def __dlpack_device__(self) -> tuple[int, int]:
        """``(1, 0)`` (kDLCPU) on the host backend, ``(8, 0)`` (kDLMetal) on Metal."""
        from mlxbuf import interop

        return interop.dlpack_device(self)

    @classmethod
    def from_raw(cls, *args: Any, **kwargs: Any) -> Buffer:
        """Wrap externally allocated memory or an MTLBuffer (see mlxbuf.interop.from_raw)."""
        from mlxbuf import interop

        return interop.from_raw(*args, **kwargs)
