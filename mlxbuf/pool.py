"""BufferPool: a size-class cache of storages for allocation churn."""

from __future__ import annotations

import dataclasses
import gc
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, SupportsIndex

from mlxbuf._cmetal import ffi, lib
from mlxbuf.buffer import Buffer, _adopt, _int_arg, _prepare, _result, _shape_arg, _shape_fits, _tls
from mlxbuf.dtypes import _LOOKUP as _DTYPES
from mlxbuf.dtypes import as_dtype
from mlxbuf.errors import InvalidArgument, check, error_for

if TYPE_CHECKING:
    from mlxbuf.buffer import ShapeLike
    from mlxbuf.device import Device
    from mlxbuf.dtypes import DTypeLike

__all__ = ["BufferPool", "PoolStats"]

_pool_alloc = lib.cm_pool_alloc
_release = lib.cm_storage_release
_gc = ffi.gc
_new = object.__new__
_OOM = lib.CM_ERR_OUT_OF_MEMORY
_U64_LIMIT = 1 << 64


@dataclasses.dataclass(frozen=True)
class PoolStats:
    """A snapshot of a pool's counters.

    Three byte figures that users tend to confuse, kept apart:
    ``in_use_bytes`` (size-class bytes of pooled storages alive outside the
    cache), ``requested_bytes`` (what was asked for them, before rounding)
    and ``free_bytes`` (size-class bytes idle in the cache).
    An immutable value, safe to share between threads.
    """

    free_count: int
    free_bytes: int
    in_use_count: int
    in_use_bytes: int
    requested_bytes: int
    cache_limit: int
    hits: int
    misses: int
    evictions: int

    @property
    def rounding_waste_bytes(self) -> int:
        """Bytes in use beyond what was requested (size-class rounding)."""
        return self.in_use_bytes - self.requested_bytes


class BufferPool:
    """A cache of storages by size class, for allocation churn.

    Policy:

    - A request of n bytes is served from its size class (``size_class(n)``,
      ``buffer.byte_len``): the smallest multiple of a granule at or above n.
      Below 1 MiB the granule is 1/8 of n's power of two (at least 16 bytes):
      8 classes per power of two, waste under 12.5 % from 128 bytes up.
      From 1 MiB it is 1/64 of n's power of two (at least a page): waste
      under 1.6 %, every class a whole number of pages. (The seed's
      power-of-two buckets waste up to 100 %.)
    - A cached storage of the class is reused when there is one (a hit,
      newest first), else a fresh, zero-filled one is allocated on the
      device (a miss).
    - A storage goes back to the cache only when its last reference dies:
      every clone, slice, view, numpy array and submitted command buffer
      using it. Two live buffers never share bytes.
    - Reused storages are NOT re-zeroed; pass ``zero=True`` to ``alloc`` to
      get zeroed bytes either way.
    - Cached storages stay registered in the device's residency set, so
      steady-state churn costs no residency commits; they leave it when
      evicted or cleared.
    - The cache holds at most ``cache_limit`` bytes (None: a quarter of
      the device's recommended working set, at most 1 GiB: thousands of
      small scratch storages); beyond it the oldest cached storages, across
      classes, are evicted first.
    - When the device runs out of memory (or hits its memory limit) C
      frees every pool cache and retries; Python then collects garbage once
      and retries once before raising BufferAllocationError.

    Owns one C reference to the pool; storages it handed out keep the C
    pool alive. ``close()`` (idempotent; also on leaving a ``with`` block)
    frees the cache now. Safe to use from any thread; storages may return
    from any thread.
    """

    __slots__ = ("_device", "_handle", "__weakref__")

    # The slots' types (annotations only, no class attributes).
    _device: Device
    _handle: Any

    def __init__(self, device: Device, cache_limit: SupportsIndex | None = None) -> None:
        from mlxbuf.device import Device

        if not isinstance(device, Device):
            raise InvalidArgument(f"BufferPool needs a Device, got {device!r}")
        limit = -1 if cache_limit is None else _int_arg(cache_limit, "cache_limit")
        if limit >= 1 << 63:
            raise InvalidArgument(f"cache_limit {limit} does not fit in 63 bits")
        out = ffi.new("cm_pool_t **")
        check(lib.cm_pool_create(device._handle, limit, out))
        self._device = device
        self._handle = ffi.gc(out[0], lib.cm_pool_release)

    def _live_handle(self) -> Any:
        handle = self._handle
        if handle is None:
            raise InvalidArgument("this BufferPool is closed")
        return handle

    @property
    def device(self) -> Device:
        """The Device the pool allocates on."""
        return self._device

    # ---- allocation ----

    def alloc(self, byte_len: SupportsIndex, dtype: DTypeLike, shape: ShapeLike, *, zero: bool = False) -> Buffer:
        """A Buffer of ``byte_len``'s size class viewed as ``dtype``/``shape``.

        Cached storages are reused without re-zeroing unless ``zero=True``;
        fresh ones are zero-filled. The storage returns to the pool when its
        last reference dies.
        """
        # The hot path of allocation churn: validation, the C call and the
        # Buffer construction are inlined (the same steps as buffer._prepare
        # and buffer._adopt) because every Python call here costs about as
        # much as numpy.empty.
        handle = self._handle
        if handle is None:
            self._live_handle()
        try:
            dt = _DTYPES[dtype]
        except (KeyError, TypeError):
            dt = as_dtype(dtype)
        if type(shape) is tuple and len(shape) == 1 and type(shape[0]) is int and shape[0] >= 0:
            count = shape[0]
        else:
            shape, count = _shape_arg(shape)
        if type(byte_len) is not int or byte_len <= 0 or byte_len >= _U64_LIMIT:
            byte_len = _int_arg(byte_len, "byte_len", minimum=1)
        # The fast path's shape is a tuple of one int, which mypy cannot narrow to.
        if count * dt.size > byte_len:
            _shape_fits(dt, shape, count, byte_len)  # type: ignore[arg-type]
        try:
            res = _tls.res
        except AttributeError:
            res = _result()
        status = _pool_alloc(handle, byte_len, 1 if zero else 0, res)
        if status:
            self._alloc_failed(status, handle, byte_len, zero, res)
        # Read the shared per-thread result before allocating Python objects
        # (see Device.alloc_buffer).
        storage = res.storage
        class_len = res.byte_len
        buf = _new(Buffer)
        buf._device = self._device
        buf._storage = _gc(storage, _release, class_len)
        buf._dtype = dt
        buf._shape = shape  # type: ignore[assignment]  # (int,): see above
        buf._byte_offset = 0
        buf._byte_len = class_len
        return buf

    def _alloc_failed(self, status: int, handle: Any, byte_len: int, zero: bool, res: Any) -> None:
        if status == _OOM:
            # C already gave back the pool caches; dead buffers may still sit
            # in Python reference cycles.
            gc.collect()
            status = _pool_alloc(handle, byte_len, 1 if zero else 0, res)
            if not status:
                return
        raise error_for(status, bytes=byte_len)

    def allocator(
        self, byte_len: SupportsIndex, dtype: DTypeLike, shape: ShapeLike, *, zero: bool = False
    ) -> Callable[[], Buffer]:
        """A function of no arguments that allocates ``alloc(byte_len, dtype, shape)``.

        For the fixed scratch shapes of a decode loop: the request is
        validated once, here, and each call then costs only the C allocation
        and the Buffer, about a quarter less than ``alloc()``. Calling it
        after ``close()`` raises InvalidArgument, like ``alloc()``.
        """
        byte_len, dt, shape = _prepare(byte_len, dtype, shape)
        handle = self._live_handle()
        device = self._device
        zero_flag = 1 if zero else 0
        pool = self

        def allocate() -> Buffer:
            # The same steps as alloc() after its validation (kept inline:
            # a helper call here would cost a tenth of the allocation).
            if pool._handle is None:
                pool._live_handle()
            try:
                res = _tls.res
            except AttributeError:
                res = _result()
            status = _pool_alloc(handle, byte_len, zero_flag, res)
            if status:
                pool._alloc_failed(status, handle, byte_len, zero, res)
            storage = res.storage
            class_len = res.byte_len
            buf = _new(Buffer)
            buf._device = device
            buf._storage = _gc(storage, _release, class_len)
            buf._dtype = dt
            buf._shape = shape
            buf._byte_offset = 0
            buf._byte_len = class_len
            return buf

        allocate.__qualname__ = f"BufferPool.allocator({byte_len}, {dt}, {shape})"
        return allocate

    def alloc_batch(
        self, requests: Iterable[tuple[SupportsIndex, DTypeLike, ShapeLike]], *, zero: bool = False
    ) -> list[Buffer]:
        """A list of Buffers for ``requests`` of ``(byte_len, dtype, shape)``: all or nothing.

        Every request is validated before anything is allocated; the
        allocations stage at most one residency change set (one commit).
        """
        handle = self._live_handle()
        try:
            requests = list(requests)
        except TypeError:
            raise InvalidArgument(f"requests must be an iterable of (byte_len, dtype, shape), got {requests!r}") from None
        checked = []
        for i, request in enumerate(requests):
            try:
                byte_len, dtype, shape = request
            except (TypeError, ValueError):
                raise InvalidArgument(f"request {i} must be (byte_len, dtype, shape), got {request!r}") from None
            checked.append(_prepare(byte_len, dtype, shape))
        n = len(checked)
        if n == 0:
            return []
        lens = ffi.new("uint64_t[]", [c[0] for c in checked])
        results = ffi.new("cm_alloc_result_t[]", n)
        status = lib.cm_pool_alloc_batch(handle, lens, n, 1 if zero else 0, results)
        if status == _OOM:
            gc.collect()
            status = lib.cm_pool_alloc_batch(handle, lens, n, 1 if zero else 0, results)
        if status:
            raise error_for(status, bytes=sum(c[0] for c in checked))
        return [_adopt(Buffer, self._device, results + i, dt, shape) for i, (_, dt, shape) in enumerate(checked)]

    def register_existing(self, buffer: Buffer) -> None:
        """Add ``buffer``'s storage to the device's residency set without pooling it.

        For exactly-sized buffers made elsewhere (external memory, wrapped
        MTLBuffers). Idempotent; a no-op when the storage is already
        registered or residency is off. InvalidArgument for a buffer of
        another device.
        """
        if not isinstance(buffer, Buffer):
            raise InvalidArgument(f"register_existing needs a Buffer, got {buffer!r}")
        self._live_handle()
        if buffer._device._handle != self._device._handle:
            raise InvalidArgument(
                f"{buffer!r} belongs to another device ({buffer._device.name!r}) than this pool's"
            )
        if not self._device.residency_sets_enabled:
            return
        check(lib.cm_residency_register(self._device._handle, buffer._storage))

    def clear(self) -> None:
        """Free every cached storage (staging its residency removal)."""
        check(lib.cm_pool_clear(self._live_handle()))

    def close(self) -> None:
        """Free the cache now and drop the pool; idempotent. Buffers still in
        use stay valid and are freed (not cached) when their last reference dies."""
        handle, self._handle = self._handle, None
        if handle is not None:
            # Not ffi.release(handle): another thread may be inside alloc()
            # with this handle, and releasing would free the C pool under
            # it. A zero cache limit frees the cache now and makes every
            # storage that comes back later be freed instead of cached; the
            # C reference goes when the last Python reference to the handle
            # does.
            lib.cm_pool_set_cache_limit(handle, 0, ffi.NULL)

    def __enter__(self) -> BufferPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        """True after close()."""
        return self._handle is None

    # ---- sizes and statistics ----

    def size_class(self, n: SupportsIndex) -> int:
        """The byte_len a request of n bytes gets from this pool."""
        n = _int_arg(n, "request size")
        out = ffi.new("uint64_t *")
        check(lib.cm_pool_size_class(self._live_handle(), n, out))
        return out[0]

    def stats(self) -> PoolStats:
        """A PoolStats snapshot (counts, bytes, hits, misses, evictions)."""
        out = ffi.new("cm_pool_stats_t *")
        check(lib.cm_pool_stats(self._live_handle(), out))
        return PoolStats(**{f.name: getattr(out, f.name) for f in dataclasses.fields(PoolStats)})

    @property
    def free_count(self) -> int:
        """Storages idle in the cache."""
        return self.stats().free_count

    @property
    def free_bytes(self) -> int:
        """Size-class bytes idle in the cache."""
        return self.stats().free_bytes

    @property
    def in_use_count(self) -> int:
        """Pooled storages alive outside the cache."""
        return self.stats().in_use_count

    @property
    def in_use_bytes(self) -> int:
        """Size-class bytes of the pooled storages in use."""
        return self.stats().in_use_bytes

    @property
    def requested_bytes(self) -> int:
        """Bytes asked for by the storages in use (before size-class rounding)."""
        return self.stats().requested_bytes

    @property
    def cache_limit(self) -> int:
        """Most bytes the cache holds; setting it evicts oldest-first until the cache fits."""
        return self.stats().cache_limit

    @cache_limit.setter
    def cache_limit(self, limit: SupportsIndex) -> None:
        self.set_cache_limit(limit)

    def set_cache_limit(self, limit: SupportsIndex) -> int:
        """Set the cache limit in bytes; return the old one."""
        limit = _int_arg(limit, "cache_limit")
        old = ffi.new("uint64_t *")
        check(lib.cm_pool_set_cache_limit(self._live_handle(), limit, old))
        return old[0]

    def __repr__(self) -> str:
        if self._handle is None:
            return "BufferPool(closed)"
        s = self.stats()
        return (
            f"BufferPool(in_use={s.in_use_count} ({s.in_use_bytes} bytes), "
            f"free={s.free_count} ({s.free_bytes} bytes), cache_limit={s.cache_limit}, "
            f"device={self._device.backend})"
        )
