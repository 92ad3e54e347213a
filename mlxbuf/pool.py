"""BufferPool: a size-class cache of storages for allocation churn."""

from __future__ import annotations

import array
import dataclasses
import gc
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, SupportsIndex

from mlxbuf._cmetal import ffi, lib
from mlxbuf.buffer import _NO_REQUEST, Buffer, _exact_shape, _int_arg, _plan_for, _recall, _result, _tls
from mlxbuf.errors import InvalidArgument, MlxError, check, error_for

if TYPE_CHECKING:
    from mlxbuf.buffer import ShapeLike, _LastRequest, _Layout, _Plan
    from mlxbuf.device import Device
    from mlxbuf.dtypes import DTypeLike

__all__ = ["BufferPool", "PoolStats"]

_pool_alloc = lib.cm_pool_alloc
_release = lib.cm_storage_release
_gc = ffi.gc
_new = object.__new__
_OOM = lib.CM_ERR_OUT_OF_MEMORY


def _uint64s(values: array.array[int]) -> Any:
    """A ``uint64_t[]`` cdata over an array("Q") (which it keeps alive)."""
    return ffi.from_buffer("uint64_t[]", values)


def _position(request: object, requests: list[Any]) -> int:
    """The index of the first occurrence of ``request`` (the object itself) in ``requests``."""
    return next(i for i, r in enumerate(requests) if r is request)


@dataclasses.dataclass(frozen=True)
class PoolStats:
    """A snapshot of a pool's counters.

    Byte figures that users tend to confuse, kept apart:
    ``requested_bytes`` (what was asked for the storages in use, before
    rounding), ``in_use_bytes`` and ``free_bytes`` (size-class bytes, a
    buffer's ``byte_len``, of pooled storages alive outside the cache and
    idle in it), and ``in_use_allocated_bytes`` and
    ``free_allocated_bytes`` (what those storages occupy: whole pages, so a
    64-byte class takes 16 KiB on Apple Silicon). ``cache_limit`` bounds
    ``free_allocated_bytes``, and the device's ``active_memory`` counts
    allocated bytes too.
    An immutable value, safe to share between threads.
    """

    free_count: int
    free_bytes: int
    free_allocated_bytes: int
    in_use_count: int
    in_use_bytes: int
    in_use_allocated_bytes: int
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
      under 1.6 %, every class a whole number of pages. (The Rust
      mlx-native crate's power-of-two buckets waste up to 100 %.)
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
    - The cache holds at most ``cache_limit`` allocated bytes (what its
      storages occupy, whole pages; None: a quarter of the device's
      recommended working set, at most 1 GiB: thousands of small scratch
      storages); beyond it the oldest cached storages, across classes, are
      evicted first.
    - When the device runs out of memory (or hits its memory limit) C
      frees every pool cache and retries; Python then collects garbage once
      and retries once before raising BufferAllocationError. A request
      above the device's max_buffer_length raises BufferAllocationError
      at once.
    - Each distinct request ``(byte_len, dtype, shape)`` is validated once
      and its plan kept (at most a few hundred per pool), so a repeated
      ``alloc`` costs about what a prepared ``allocator()`` does.

    Owns one C reference to the pool; storages it handed out keep the C
    pool alive. ``close()`` (idempotent; also on leaving a ``with`` block)
    frees the cache now. Safe to use from any thread; storages may return
    from any thread. Not picklable (it is a cache of device memory).
    """

    __slots__ = ("_device", "_handle", "_plans", "_last", "__weakref__")

    # The slots' types (annotations only, no class attributes).
    _device: Device
    _handle: Any
    _plans: dict[Any, _Plan]  # validated requests (buffer._plan_for); emptied by close()
    _last: _LastRequest  # the last request, its handle and layout (buffer._NO_REQUEST)

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
        self._plans = {}
        self._last = _NO_REQUEST

    def __reduce__(self) -> tuple[Any, ...]:
        raise TypeError("a BufferPool cannot be pickled: it caches device memory; make a new pool where needed")

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

    def alloc(self, byte_len: SupportsIndex, dtype: DTypeLike, shape: ShapeLike, zero: bool = False) -> Buffer:
        """A Buffer of ``byte_len``'s size class viewed as ``dtype``/``shape``.

        Cached storages are reused without re-zeroing unless ``zero=True``;
        fresh ones are zero-filled. The storage returns to the pool when its
        last reference dies.
        """
        # The hot path of allocation churn: every Python step here costs a
        # fair fraction of numpy.empty, so a repeated request reuses its
        # validated plan (buffer._plan_for says when a plan counts as a hit)
        # and the Buffer is built inline.
        last_len, last_dtype, last_shape, handle, layout = self._last
        if byte_len is not last_len or dtype is not last_dtype or shape is not last_shape:
            # buffer._recall, inlined: a call here costs a tenth of the
            # allocation for a loop over several scratch shapes.
            try:
                plan = self._plans[byte_len, dtype, shape]
            except (KeyError, TypeError):
                plan, byte_len = self._plan(byte_len, dtype, shape)
                exact = plan[0] is shape
            else:
                exact = plan[0] is shape or _exact_shape(shape)
                if type(byte_len) is not int or not exact:
                    plan, byte_len = self._plan(byte_len, dtype, shape)
            _, handle, layout = plan
            if exact:
                self._last = (byte_len, dtype, shape, handle, layout)
        try:
            res = _tls.res
        except AttributeError:
            res = _result()
        status = _pool_alloc(handle, byte_len, 1 if zero else 0, res)
        if status:
            self._alloc_failed(status, handle, byte_len, zero, res)
        # Read the shared per-thread result before allocating Python objects
        # (see Device.alloc_buffer).
        storage = _gc(res.storage, _release)
        buf = _new(Buffer)
        buf._device = self._device
        buf._storage = storage
        buf._layout = layout
        return buf

    def _plan(self, byte_len: Any, dtype: Any, shape: Any) -> tuple[_Plan, int]:
        handle = self._live_handle()

        def size_class(n: int) -> int:
            out = ffi.new("uint64_t *")
            check(lib.cm_pool_size_class(handle, n, out), bytes=n)
            return int(out[0])

        return _plan_for(self._plans, handle, byte_len, dtype, shape, size_class)

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
        validated here, and each call then costs only the C allocation and
        the Buffer (``alloc`` of a repeated request comes close, through
        its kept plan). Calling it after ``close()`` raises InvalidArgument,
        like ``alloc()``.
        """
        plan, n = self._plan(byte_len, dtype, shape)
        _, handle, layout = plan
        device = self._device
        zero_flag = 1 if zero else 0
        pool = self

        def allocate() -> Buffer:
            # The same steps as alloc() after its plan lookup (kept inline:
            # a helper call here would cost a tenth of the allocation).
            if pool._handle is None:
                pool._live_handle()
            try:
                res = _tls.res
            except AttributeError:
                res = _result()
            status = _pool_alloc(handle, n, zero_flag, res)
            if status:
                pool._alloc_failed(status, handle, n, zero, res)
            storage = _gc(res.storage, _release)
            buf = _new(Buffer)
            buf._device = device
            buf._storage = storage
            buf._layout = layout
            return buf

        allocate.__qualname__ = f"BufferPool.allocator({n}, {layout[0]}, {layout[1]})"
        return allocate

    def alloc_batch(
        self, requests: Iterable[tuple[SupportsIndex, DTypeLike, ShapeLike]], *, zero: bool = False
    ) -> list[Buffer]:
        """A list of Buffers for ``requests`` of ``(byte_len, dtype, shape)``: all or nothing.

        The fastest way to get many buffers: each distinct request is
        validated once (``[(4096, "f32", (1024,))] * 64`` is one request,
        and its plan is the one ``alloc`` keeps), everything is allocated
        in one C call, and building the Buffers is the only work per buffer.
        Every request is validated before anything is allocated; the
        allocations stage at most one residency change set (one commit).
        """
        handle = self._live_handle()
        try:
            requests = list(requests)
        except TypeError:
            raise InvalidArgument(f"requests must be an iterable of (byte_len, dtype, shape), got {requests!r}") from None
        count = len(requests)
        if count == 0:
            return []
        lens, layout, layouts = self._batch_plans(requests, count)
        results = ffi.new("cm_alloc_result_t[]", count)
        zero_flag = 1 if zero else 0
        status = lib.cm_pool_alloc_batch(handle, lens, count, zero_flag, results)
        if status == _OOM:
            gc.collect()
            status = lib.cm_pool_alloc_batch(handle, lens, count, zero_flag, results)
        if status:
            raise error_for(status, bytes=sum(lens[0:count]))
        device = self._device
        out: list[Buffer] = []
        append = out.append
        try:
            if layouts is None:
                for r in results:
                    buf = _new(Buffer)
                    buf._device = device
                    buf._storage = _gc(r.storage, _release)
                    buf._layout = layout
                    append(buf)
            else:
                for r, layout in zip(results, layouts):
                    buf = _new(Buffer)
                    buf._device = device
                    buf._storage = _gc(r.storage, _release)
                    buf._layout = layout
                    append(buf)
        except BaseException:
            # Interrupted (KeyboardInterrupt, MemoryError): the references
            # not yet owned by a Buffer go back now.
            for r in results[len(out) :]:
                _release(r.storage)
            raise
        return out

    def _batch_plans(self, requests: list[Any], count: int) -> tuple[Any, _Layout, list[_Layout] | None]:
        """``(uint64_t[] of byte_lens, layout, layouts)``: ``layouts`` is None
        when every request is the first one (all get ``layout``), else one
        layout per request.

        One plan per distinct request object, and the per-request steps in
        C (map, dict, array) rather than Python bytecode; the common case,
        one request object repeated, needs no dict at all.
        """
        first = requests[0]
        for request in requests:
            if request is not first:
                break
        else:
            byte_len, layout = self._batch_plan(first, requests, count)
            return _uint64s(array.array("Q", [byte_len]) * count), layout, None
        ids = list(map(id, requests))
        planned = {key: self._batch_plan(r, requests, count) for key, r in dict(zip(ids, requests)).items()}
        lens = _uint64s(array.array("Q", [planned[i][0] for i in ids]))
        return lens, planned[ids[0]][1], [planned[i][1] for i in ids]

    def _batch_plan(self, request: Any, requests: list[Any], count: int) -> tuple[int, _Layout]:
        """``(byte_len, layout)`` of one batch request; errors name its position."""
        try:
            byte_len, dtype, shape = request
        except (TypeError, ValueError):
            index = _position(request, requests)
            raise InvalidArgument(f"request {index} must be (byte_len, dtype, shape), got {request!r}") from None
        try:
            _, layout, byte_len = _recall(self, byte_len, dtype, shape)
        except MlxError as exc:
            exc.args = (f"batch request {_position(request, requests)} of {count}: {exc}", *exc.args[1:])
            raise
        return byte_len, layout

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
        self._plans = {}
        self._last = _NO_REQUEST
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
        check(lib.cm_pool_size_class(self._live_handle(), n, out), bytes=n)
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
        """Most allocated bytes the cache holds (``PoolStats.free_allocated_bytes``); setting it evicts oldest-first until the cache fits."""
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
