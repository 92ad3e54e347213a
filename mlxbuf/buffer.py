"""Buffer: a typed, shaped view over one reference-counted storage."""

from __future__ import annotations

import builtins
import inspect
import math
import operator
import pickle
import threading
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Callable, Protocol, SupportsIndex, TypeAlias, Union

import numpy as np

from mlxbuf._cmetal import ffi, lib
from mlxbuf.dtypes import _LOOKUP as _DTYPES
from mlxbuf.dtypes import DType, DTypeLike, as_dtype
from mlxbuf.errors import IndexOutOfBounds, InvalidArgument, check

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

# A view's metadata in one immutable tuple: (dtype, shape, byte offset from
# the allocation base, byte length of the whole allocation). One tuple
# instead of four attributes makes a Buffer two attribute stores cheaper to
# build, and the allocation paths build it once per request (see _Plan).
_Layout: TypeAlias = "tuple[DType, tuple[int, ...], int, int]"

# A validated allocation request: (the shape object it was validated for,
# the C handle to allocate from, the Layout every Buffer of it gets).
_Plan: TypeAlias = "tuple[Any, Any, _Layout]"

_new = object.__new__
_gc = ffi.gc
_release = lib.cm_storage_release
_UINT8_PTR = ffi.typeof("uint8_t *")
_ALLOC_RESULT = ffi.typeof("cm_alloc_result_t *")
_STORAGE_INFO = ffi.typeof("cm_storage_info_t *")
_U64_LIMIT = 1 << 64
_DIM_LIMIT = (1 << 63) - 1
_KINDS = {
    lib.CM_STORAGE_DEVICE: "device",
    lib.CM_STORAGE_POOLED: "pooled",
    lib.CM_STORAGE_EXTERNAL: "external",
    lib.CM_STORAGE_MAPPED: "mapped",
}
# How repr() names a storage of each kind.
_NOUNS = {
    "device": "allocation",
    "pooled": "pooled allocation",
    "external": "external memory region",
    "mapped": "file mapping",
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
    """``(tuple_of_ints, element_count)`` for a tuple/list (or int) of non-negative ints.

    A shape with elements is bounded by the bytes it needs, which the
    callers check. A shape without elements (a zero dimension) needs no
    byte, so its other dimensions are checked here: see empty_shape_problem.
    """
    if type(shape) is tuple:
        count = 1
        for d in shape:
            if type(d) is not int or d < 0:
                break
            count *= d
        else:
            if count == 0:
                _check_empty_shape(shape)
            return shape, count
    if isinstance(shape, (tuple, list)):
        dims = tuple(_dim_arg(d, f"dimension {i} of shape {tuple(shape)!r}") for i, d in enumerate(shape))
        count = math.prod(dims)
        if count == 0:
            _check_empty_shape(dims)
        return dims, count
    if isinstance(shape, (int, np.integer)) and not isinstance(shape, (bool, np.bool_)):
        n = _dim_arg(shape, "shape")
        return (n,), n
    raise InvalidArgument(f"shape must be a tuple or list of non-negative ints, got {shape!r} ({type(shape).__name__})")


def _dim_arg(value: Any, what: str) -> int:
    d = value if type(value) is int and value > _DIM_LIMIT else _int_arg(value, what)
    if d > _DIM_LIMIT:
        raise InvalidArgument(f"{what} is {d}, beyond the int64 limit {_DIM_LIMIT} of a dimension")
    return d


# numpy refuses an array whose non-zero dimensions times its element size
# pass 2**63 - 1, even when another dimension is 0; elements are at most 8
# bytes.
MAX_EMPTY_EXTENT = _DIM_LIMIT // 8


def empty_shape_problem(shape: tuple[int, ...]) -> str | None:
    """Why a shape with a zero dimension cannot be an array, or None.

    ``(2**64 + 1, 0)`` holds no byte, yet no array (numpy's, DLPack's) can
    have it: the non-zero dimensions must multiply to at most
    MAX_EMPTY_EXTENT (2**60 - 1), which also keeps every dimension in int64.
    """
    extent = math.prod(d for d in shape if d)
    if extent > MAX_EMPTY_EXTENT:
        return (
            f"shape {shape} holds no element, but its non-zero dimensions multiply to {extent}, beyond "
            f"{MAX_EMPTY_EXTENT} (2**60 - 1: numpy's limit for 8-byte elements)"
        )
    return None


def _check_empty_shape(shape: tuple[int, ...]) -> None:
    problem = empty_shape_problem(shape)
    if problem:
        raise InvalidArgument(problem)


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
    dt = _dtype_arg(dtype)
    shape, count = _shape_arg(shape)
    if count * dt.size > byte_len:
        _shape_fits(dt, shape, count, byte_len)
    return byte_len, dt, shape


# ---- validated plans: what the allocation hot paths reuse ---------------------
#
# Device.alloc_buffer and BufferPool.alloc keep, per device or pool, a dict
# from a request as the caller passed it, ``(byte_len, dtype, shape)``, to
# its _Plan, so a repeated request skips validation. Equal is not enough to
# reuse a plan: 4096.0 == 4096 and (2.0,) == (2,) hash alike, and a float
# must be refused every time, not only after an int made the plan. So a
# hit counts only when byte_len is an int and the shape is the very object
# the plan was validated for (a literal or a reused tuple) or, failing
# that, _exact_shape; anything else is validated again, which then finds
# the plan under the validated request.
#
# In front of the dict, each keeps its last request: when byte_len, dtype
# and shape are the very objects of the last request (a loop allocating
# one scratch shape), that request's plan is reused without hashing. Only
# shapes made of ints are kept so (a list, or a tuple of objects with
# __index__, could have changed since).

PLAN_CACHE_LIMIT = 256  # plans per device or pool; the oldest goes first
# The last request of a device or pool: (byte_len, dtype, shape, handle, layout).
_LastRequest: TypeAlias = "tuple[Any, Any, Any, Any, _Layout]"
# The last request before any: objects no caller can pass.
_NO_REQUEST: _LastRequest = (object(), object(), object(), None, (DType.U8, (), 0, 0))
_plans_lock = threading.Lock()


def _plan_for(
    plans: dict[Any, _Plan],
    handle: Any,
    byte_len: Any,
    dtype: Any,
    shape: Any,
    class_len: Callable[[int], int],
) -> tuple[_Plan, int]:
    """``(plan, byte_len as an int)`` of a request that missed ``plans``:
    validated, then kept.

    ``class_len(n)`` is the byte_len a storage for n bytes gets (the pool's
    size class, or n itself). Thread-safe: concurrent misses of one request
    keep one plan; lookups need no lock (single dict operations).
    """
    n, dt, dims = _prepare(byte_len, dtype, shape)
    key = (n, dtype, dims)  # a list shape is kept under its tuple
    try:
        plan = plans.get(key)
    except TypeError:  # an unhashable dtype: not kept
        return (dims, handle, (dt, dims, 0, class_len(n))), n
    if plan is not None:
        return plan, n
    plan = (dims, handle, (dt, dims, 0, class_len(n)))
    with _plans_lock:
        kept = plans.setdefault(key, plan)
        if len(plans) > PLAN_CACHE_LIMIT:
            del plans[next(iter(plans))]
    return kept, n


class _PlanOwner(Protocol):
    """A Device or BufferPool, as far as the plan cache is concerned."""

    _plans: dict[Any, _Plan]
    _last: _LastRequest

    def _plan(self, byte_len: Any, dtype: Any, shape: Any) -> tuple[_Plan, int]: ...


def _recall(owner: _PlanOwner, byte_len: Any, dtype: Any, shape: Any) -> tuple[Any, _Layout, int]:
    """``(handle, layout, byte_len)`` of a request that is not ``owner``'s
    last one: from its plans when a plan counts as a hit (see above), else
    validated by ``owner._plan``; it then becomes the last request."""
    try:
        plan = owner._plans[byte_len, dtype, shape]
    except (KeyError, TypeError):
        plan, byte_len = owner._plan(byte_len, dtype, shape)
        exact = plan[0] is shape
    else:
        exact = plan[0] is shape or _exact_shape(shape)
        if type(byte_len) is not int or not exact:
            plan, byte_len = owner._plan(byte_len, dtype, shape)
    _, handle, layout = plan
    if exact:  # ints only, immutable: safe to recognise by identity next time
        owner._last = (byte_len, dtype, shape, handle, layout)
    return handle, layout, byte_len


def _exact_shape(shape: Any) -> bool:
    """Whether ``shape`` is made of ints only (a tuple of them, or one int):
    then a plan found under an equal shape is this shape's plan."""
    if type(shape) is tuple:
        for d in shape:
            if type(d) is not int:
                return False
        return True
    return type(shape) is int


def _unpickle(dtype: str, shape: Any, data: Any) -> Buffer:
    """Rebuild a pickled Buffer on ``mlxbuf.default_device()`` (see Buffer.__reduce_ex__)."""
    from mlxbuf.device import default_device

    dt = as_dtype(dtype)
    dims, count = _shape_arg(shape)
    nbytes = count * dt.size
    with memoryview(data) as view:
        if view.nbytes != nbytes:
            raise InvalidArgument(
                f"a pickled Buffer of shape {dims} {dt} needs {nbytes} bytes, the pickle holds {view.nbytes}"
            )
        out = default_device().alloc_buffer(max(nbytes, dt.size), dt, dims)
        if nbytes:
            ffi.memmove(out._memory(), view, nbytes)
    return out


# ---- Buffer ---------------------------------------------------------------------

_NOT_CONSTRUCTIBLE = (
    "Buffer objects are not made by calling Buffer(); get one from Device.alloc_buffer, "
    "BufferPool.alloc (or alloc_batch, allocator), mlxbuf.asarray, Device.from_numpy, "
    "mlxbuf.from_dlpack, Device.map_file, mlxbuf.load_safetensors or Buffer.from_raw"
)


class Buffer:
    """A typed, shaped view (dtype, shape, byte offset) of one storage.

    Not constructed directly: ``Buffer(...)`` raises TypeError. Buffers come
    from ``Device.alloc_buffer``, ``BufferPool.alloc`` (``alloc_batch``,
    ``allocator``), ``mlxbuf.asarray``, ``Device.from_numpy``,
    ``mlxbuf.from_dlpack``, ``Device.map_file``, ``mlxbuf.load_safetensors``
    and ``Buffer.from_raw``; views of a Buffer from ``buf[i:j]``, ``buf[i]``,
    ``clone``, ``view``, ``reshape`` and ``slice_view``.

    Memory is shared between CPU and GPU (Metal StorageModeShared, or host
    memory): ``numpy()``, ``memoryview()`` and ``__array_interface__`` give
    zero-copy CPU views of this view's bytes, the byte offset honoured.

    Copies: ``clone()`` and indexing alias the bytes (``clone`` is the Rust
    mlx-native crate's ``Clone``); ``copy()``, ``copy.copy``,
    ``copy.deepcopy`` and ``to(other_device)`` copy this view's bytes into
    a new storage, as numpy's copies do. A Buffer pickles by value (dtype,
    shape, bytes) and unpickles on ``mlxbuf.default_device()``.
    Equality is identity.

    Shares its storage with clones, slices, views and numpy arrays made from
    it; the last of them frees the storage (or returns it to its pool).
    Metadata is immutable, so a Buffer may be used from any thread; writes to
    the bytes need the caller's own synchronisation.
    """

    # _storage: the cm_storage_t* cdata, ffi.gc'd to drop Python's one C
    #   reference; shared by every Buffer over the storage.
    # _layout: (dtype, shape, byte_offset, byte_len), see _Layout.
    # _contents: the storage's base address (a non-owning uint8_t* cdata);
    #   the allocation hot paths leave it unset and _base() reads it from C
    #   on first use.
    # _mem: made on first CPU view by _memory(); unset until then, which
    #   keeps allocation free of a second ffi.gc and a Python destructor.
    __slots__ = ("_device", "_storage", "_layout", "_contents", "_mem", "__weakref__")

    # The slots' types (annotations only, no class attributes).
    _device: Device
    _storage: Any
    _layout: _Layout
    _contents: Any
    _mem: Any

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """Not callable: raises TypeError naming the ways to get a Buffer."""
        raise TypeError(_NOT_CONSTRUCTIBLE)

    # help(Buffer) shows no misleading Buffer(*args, **kwargs) signature.
    __init__.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY)]
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
        storage = _gc(storage, _release)
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
        buf._layout = (dt, shape, byte_offset, byte_len)
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
        buf._layout = (dt, shape, byte_offset, self._layout[3])
        return buf

    # ---- metadata ----

    @property
    def dtype(self) -> DType:
        """The element type (a DType)."""
        return self._layout[0]

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape, a tuple of ints."""
        return self._layout[1]

    @property
    def ndim(self) -> int:
        """Number of dimensions."""
        return len(self._layout[1])

    @property
    def element_count(self) -> int:
        """Number of elements: the product of the shape."""
        return math.prod(self._layout[1])

    @property
    def size(self) -> int:
        """Number of elements (numpy's spelling of ``element_count``)."""
        return math.prod(self._layout[1])

    @property
    def byte_offset(self) -> int:
        """Offset of this view's first byte from the allocation base."""
        return self._layout[2]

    @property
    def byte_len(self) -> int:
        """Length in bytes of the whole underlying allocation (a pool's size class for pooled buffers);
        ``allocated_size`` is what it occupies."""
        return self._layout[3]

    @property
    def nbytes(self) -> int:
        """Bytes this view covers: element_count x dtype.size."""
        dt, shape, _, _ = self._layout
        return math.prod(shape) * dt.size

    @property
    def contents_ptr(self) -> int:
        """CPU address of the allocation base, as an int."""
        return int(ffi.cast("uintptr_t", self._base()))

    @property
    def data_ptr(self) -> int:
        """CPU address of this view's first byte (contents_ptr + byte_offset)."""
        return int(ffi.cast("uintptr_t", self._base())) + self._layout[2]

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
    def allocated_size(self) -> int:
        """Bytes the whole underlying allocation occupies: ``byte_len`` rounded
        up to whole pages by the backend (16 KiB on Apple Silicon, so a 64-byte
        buffer occupies 16384), which is what ``Device.active_memory`` and the
        memory limit count. For a file mapping, the pages mapped; for external
        memory, the pages wrapped."""
        return self._info().allocated_size

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
        """``Buffer(f32, shape=(3, 4), nbytes=48, offset=120 of a 174-byte file
        mapping, device=host)``: this view first, then the allocation (left
        out when the view covers all of it)."""
        dt, shape, offset, byte_len = self._layout
        nbytes = math.prod(shape) * dt.size
        where = ""
        if offset or nbytes != byte_len:
            noun = _NOUNS.get(self.storage_kind, "storage")
            where = f", offset={offset} of a {byte_len}-byte {noun}"
        return f"Buffer({dt}, shape={shape}, nbytes={nbytes}{where}, device={self._device.backend})"

    # ---- the first axis: len, indexing, iteration (numpy semantics) ----

    def __len__(self) -> int:
        """The length of the first axis; TypeError for a 0-d Buffer, as in numpy."""
        shape = self._layout[1]
        if not shape:
            raise TypeError("len() of a 0-d Buffer")
        return shape[0]

    def __getitem__(self, key: SupportsIndex | slice) -> Any:
        """Basic indexing on the first axis, as numpy does it, without copying.

        - ``buf[i:j]`` (step 1; negative and omitted bounds as in numpy): a
          Buffer view of those rows sharing the storage.
        - ``buf[i]`` (negative counts from the end): the row as a Buffer view
          for an N-D Buffer, the element as a numpy scalar (a copy of its
          value) for a 1-D one. IndexOutOfBounds (an IndexError) past either
          end.

        Anything else (steps other than 1, index arrays, bools, Ellipsis,
        None, tuples) raises InvalidArgument: index ``buf.numpy()``, a
        zero-copy numpy view, for those.
        """
        dt, shape, offset, _ = self._layout
        if type(key) is slice:
            return self._rows(key, dt, shape, offset)
        if isinstance(key, (bool, np.bool_)):
            raise InvalidArgument(_unsupported_index(key))
        try:
            i = operator.index(key)
        except TypeError:
            raise InvalidArgument(_unsupported_index(key)) from None
        if not shape:
            raise IndexOutOfBounds("too many indices: a 0-d Buffer has no axis to index; use buf.numpy()[()]")
        n = shape[0]
        if not -n <= i < n:
            raise IndexOutOfBounds(f"index {i} is out of bounds for axis 0 with size {n}")
        if i < 0:
            i += n
        rest = shape[1:]
        row = self._derive(dt, rest, offset + i * math.prod(rest) * dt.size)
        return row if rest else row.numpy()[()]

    def _rows(self, key: slice, dt: DType, shape: tuple[int, ...], offset: int) -> Buffer:
        if not shape:
            raise IndexOutOfBounds("too many indices: a 0-d Buffer has no axis to slice; use buf.numpy()")
        try:
            start, stop, step = key.indices(shape[0])
        except (TypeError, ValueError):
            raise InvalidArgument(_unsupported_index(key)) from None
        if step != 1:
            raise InvalidArgument(_unsupported_index(key))
        rest = shape[1:]
        return self._derive(dt, (max(stop - start, 0), *rest), offset + start * math.prod(rest) * dt.size)

    def __iter__(self) -> Iterator[Any]:
        """The first axis: rows as Buffer views (N-D), elements as numpy scalars (1-D)."""
        dt, shape, offset, _ = self._layout
        if not shape:
            raise TypeError("iteration over a 0-d Buffer")
        if len(shape) == 1:
            return iter(self.numpy())
        rest = shape[1:]
        row = math.prod(rest) * dt.size
        return (self._derive(dt, rest, offset + i * row) for i in range(shape[0]))

    # ---- views sharing the storage ----

    def clone(self) -> Buffer:
        """A new Buffer over the same storage, dtype, shape and offset; no data
        is copied (the Rust mlx-native crate's ``Clone``). ``copy()`` copies."""
        dt, shape, offset, _ = self._layout
        return self._derive(dt, shape, offset)

    def slice_view(self, byte_offset: SupportsIndex, n_elements: SupportsIndex) -> Buffer:
        """A 1-D view of ``n_elements`` elements of this dtype starting ``byte_offset``
        bytes from the allocation base (not from this view's offset), as in
        the Rust mlx-native crate. ``buf[i:j]`` slices from this view instead.

        Raises InvalidArgument when the slice does not fit in the allocation.
        """
        dt, _, _, byte_len = self._layout
        byte_offset = _int_arg(byte_offset, "slice byte_offset")
        n_elements = _int_arg(n_elements, "slice n_elements")
        end = byte_offset + n_elements * dt.size
        if end > byte_len:
            raise InvalidArgument(
                f"slice of {n_elements} {dt} elements ({n_elements * dt.size} bytes) "
                f"at byte {byte_offset} exceeds the {byte_len}-byte buffer"
            )
        return self._derive(dt, (n_elements,), byte_offset)

    def view(self, dtype: DTypeLike | None = None, shape: ShapeLike | None = None) -> Buffer:
        """The same bytes with new metadata, starting at this view's byte_offset.

        ``shape`` must fit in the bytes from byte_offset to the end of the
        allocation. Without a shape: the same shape if the dtype is unchanged,
        else a 1-D view of this view's nbytes reinterpreted (which must be a
        whole number of the new elements).
        """
        own, own_shape, offset, byte_len = self._layout
        dt = own if dtype is None else _dtype_arg(dtype)
        available = byte_len - offset
        if shape is None:
            if dt is own:
                return self._derive(dt, own_shape, offset)
            nbytes = self.nbytes
            if nbytes % dt.size:
                raise InvalidArgument(
                    f"cannot view {nbytes} bytes as {dt}: not a whole number of {dt.size}-byte elements"
                )
            return self._derive(dt, (nbytes // dt.size,), offset)
        shape, count = _shape_arg(shape)
        if count * dt.size > available:
            raise InvalidArgument(
                f"shape {shape} of {dt} needs {count * dt.size} bytes, but only {available} bytes "
                f"remain from byte {offset} of the {byte_len}-byte buffer"
            )
        return self._derive(dt, shape, offset)

    def reshape(self, *shape: SupportsIndex | Sequence[SupportsIndex]) -> Buffer:
        """This view with a new shape of the same element count (numpy's spelling)."""
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = shape[0]  # type: ignore[assignment]  # reshape((2, 3)), numpy's other spelling
        shape, count = _shape_arg(tuple(shape))
        dt, own_shape, offset, _ = self._layout
        if count != math.prod(own_shape):
            raise InvalidArgument(
                f"cannot reshape {math.prod(own_shape)} elements of shape {own_shape} into {shape}"
            )
        return self._derive(dt, shape, offset)

    # ---- copies (new storages) ----

    def copy(self) -> Buffer:
        """A new Buffer on the same device holding a copy of this view's bytes.

        Like numpy's ``ndarray.copy``: the copy covers this view only (its
        byte_offset is 0) and shares nothing with this Buffer. It is a fresh
        device allocation (in the residency set, counted in active_memory).
        Waits for submitted command buffers that write this storage first.
        ``copy.copy`` and ``copy.deepcopy`` do the same; ``clone()`` aliases.
        """
        return self._copy_to(self._device)

    def __copy__(self) -> Buffer:
        return self._copy_to(self._device)

    def __deepcopy__(self, memo: dict[int, Any]) -> Buffer:
        return self._copy_to(self._device)

    def to(self, device: Device) -> Buffer:
        """This Buffer on ``device``: itself when it is already there, else
        ``copy()`` onto ``device`` (a fresh allocation of this view's bytes)."""
        from mlxbuf.device import Device

        if not isinstance(device, Device):
            raise InvalidArgument(f"Buffer.to needs a Device, got {device!r}")
        if device is self._device or device._handle == self._device._handle:
            return self
        return self._copy_to(device)

    def _copy_to(self, device: Device) -> Buffer:
        dt, shape, offset, _ = self._layout
        nbytes = math.prod(shape) * dt.size
        self.wait_idle()
        # An empty view still gets one element's bytes: a storage is never 0 bytes.
        out = device.alloc_buffer(max(nbytes, dt.size), dt, shape)
        if nbytes:
            ffi.memmove(out._memory(), ffi.cast(_UINT8_PTR, self._memory()) + offset, nbytes)
        return out

    def __reduce_ex__(self, protocol: SupportsIndex) -> tuple[Any, ...]:
        """Pickle by value: dtype, shape and this view's bytes, rebuilt on
        ``mlxbuf.default_device()``. Protocol 5 hands the bytes over as a
        PickleBuffer (no intermediate copy; out-of-band where the pickler
        takes buffer_callback)."""
        data = self.memoryview()
        payload: Any = pickle.PickleBuffer(data) if operator.index(protocol) >= 5 else data.tobytes()
        dt, shape, _, _ = self._layout
        return (_unpickle, (dt.name, shape, payload))

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
        return ffi.buffer(self._memory(), self._layout[3])

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
        dt, shape, offset, _ = self._layout
        arr = np.ndarray(shape, dtype=dt.numpy, buffer=self._bytes_buffer(), offset=offset)
        if not info.writable:
            arr.flags.writeable = False
        return arr

    def as_slice(self, dtype: DTypeLike | None = None, wait: bool = True) -> NDArray[Any]:
        """A 1-D zero-copy numpy array of this view's bytes read as ``dtype``
        (default: this dtype). InvalidArgument if the bytes are not a whole
        number of elements."""
        own, _, offset, _ = self._layout
        dt = own if dtype is None else _dtype_arg(dtype)
        nbytes = self.nbytes
        if nbytes % dt.size:
            raise InvalidArgument(
                f"cannot view {nbytes} bytes as {dt}: not a whole number of {dt.size}-byte elements"
            )
        return self._derive(dt, (nbytes // dt.size,), offset).numpy(wait=wait)

    def memoryview(self, wait: bool = True) -> builtins.memoryview:
        """A zero-copy memoryview (format "B") of this view's bytes; read-only
        for read-only storages. Waits for submitted writers unless ``wait=False``."""
        info = self._info()
        if wait and info.inflight_writers:
            self.wait_idle()
        start = self._layout[2]
        mv = memoryview(self._bytes_buffer())[start : start + self.nbytes]
        return mv if info.writable else mv.toreadonly()

    @property
    def __array_interface__(self) -> dict[str, Any]:
        """numpy's array interface (version 3): ``np.asarray(buf)`` aliases this
        view and keeps the Buffer (hence the storage) alive. Waits for
        submitted writers like ``numpy()``. Absent for bf16, which the array
        interface cannot describe: numpy then uses ``__array__``."""
        dt, shape, _, _ = self._layout
        if dt is DType.BF16:
            raise AttributeError("__array_interface__ cannot describe bf16; numpy uses __array__")
        info = self._info()
        if info.inflight_writers:
            self.wait_idle()
        return {
            "version": 3,
            "shape": shape,
            "typestr": dt.numpy.str,
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
                raise ValueError(f"converting {self.dtype} to {np.dtype(dtype)} needs a copy")
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


def _unsupported_index(key: object) -> str:
    kind = {
        slice: "a slice with a step other than 1 (or bounds that are not integers)",
        tuple: "a tuple (multi-axis) index",
        type(Ellipsis): "Ellipsis",
        type(None): "None (a new axis)",
        bool: "a bool (a mask)",
        np.bool_: "a bool (a mask)",
    }.get(type(key), "an index array or other object")
    return (
        f"Buffer indexing takes an integer or a slice with step 1 on the first axis, got {key!r} "
        f"({kind}); index buf.numpy(), a zero-copy numpy view, for anything else"
    )
