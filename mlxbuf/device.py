"""Device: one opened backend device (Metal or host), its allocator and statistics."""

from __future__ import annotations

import atexit
import dataclasses
import gc
import os
import threading
import weakref
from typing import TYPE_CHECKING, Any, SupportsIndex

from mlxbuf._cmetal import ffi, lib
from mlxbuf.buffer import _NO_REQUEST, Buffer, _int_arg, _plan_for, _recall, _result, _tls
from mlxbuf.errors import DeviceNotFound, InvalidArgument, check, error_for

if TYPE_CHECKING:
    from numpy.typing import ArrayLike

    from mlxbuf.buffer import ShapeLike, _LastRequest, _Plan
    from mlxbuf.compute import Library
    from mlxbuf.dtypes import DTypeLike
    from mlxbuf.encoder import CommandEncoder
    from mlxbuf.residency import ResidencySet

__all__ = ["Device", "DeviceStats", "default_device"]

_BACKENDS = {"auto": lib.CM_BACKEND_AUTO, "host": lib.CM_BACKEND_HOST, "metal": lib.CM_BACKEND_METAL}
_BACKEND_NAMES = {lib.CM_BACKEND_HOST: "host", lib.CM_BACKEND_METAL: "metal"}
_U64_MAX = (1 << 64) - 1
_release = lib.cm_storage_release
_gc = ffi.gc
_new = object.__new__

_release_device = lib.cm_device_release
_storage_alloc = lib.cm_storage_alloc
_OOM = lib.CM_ERR_OUT_OF_MEMORY


@dataclasses.dataclass(frozen=True)
class DeviceStats:
    """A snapshot of a device's counters (bytes unless named otherwise).

    Memory is counted in allocated bytes, what a storage really occupies:
    whole pages (16 KiB on Apple Silicon, so a 64-byte buffer counts 16384),
    not the bytes asked for (``Buffer.byte_len``).

    - ``active_bytes``: live device-owned storages (allocations, pool
      storages, file mappings), pool caches included (``cached_bytes`` is
      that part); external storages are not counted.
    - ``deferred_release_bytes``: freed device-owned storages whose memory
      waits for the residency commit that removes them from the residency
      set (see ``ResidencySet.set_release_policy``); not in
      ``active_bytes``.
    - ``memory_limit``: an allocation that would take ``active_bytes +
      deferred_release_bytes`` above it fails (after pool caches are given
      back and waiting removals committed).
    - ``current_allocated_size``: what the backend says it holds for the
      device (Metal's ``currentAllocatedSize``: every resource of the
      MTLDevice, made by mlxbuf or not; host: its own allocations and wraps).

    An immutable value, safe to share between threads.
    """

    active_bytes: int
    peak_bytes: int
    live_storages: int
    cached_bytes: int
    cached_storages: int
    deferred_release_bytes: int
    memory_limit: int
    current_allocated_size: int
    alloc_count: int
    free_count: int
    submitted: int
    completed: int


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def _parse_keepalive(text: str) -> tuple[float, float | None]:
    """``"seconds[,interval]"`` -> (seconds, interval or None)."""
    parts = [p.strip() for p in text.split(",")]
    try:
        if len(parts) not in (1, 2):
            raise ValueError
        seconds = float(parts[0])
        interval = float(parts[1]) if len(parts) == 2 else None
    except ValueError:
        raise InvalidArgument(
            f"MLXBUF_RESIDENCY_KEEPALIVE={text!r}: expected 'seconds' or 'seconds,interval' (numbers)"
        ) from None
    return seconds, interval


def _parse_bytes_env(name: str, text: str, minimum: int = 1) -> int:
    try:
        value = int(text.strip(), 0)
    except ValueError:
        raise InvalidArgument(f"{name}={text!r}: expected a byte count (an integer)") from None
    if value < minimum:
        need = "must be positive" if minimum > 0 else "must not be negative"
        raise InvalidArgument(f"{name}={text!r}: {need}")
    return value


def _parse_seconds_env(name: str, text: str) -> float:
    try:
        return float(text.strip())
    except ValueError:
        raise InvalidArgument(f"{name}={text!r}: expected a number of seconds") from None


def _float_arg(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            return float(value.__float__())
        except (AttributeError, TypeError, ValueError):
            raise InvalidArgument(f"{what} must be a number, got {value!r}") from None
    try:
        return float(value)
    except OverflowError:  # an int beyond the float range
        raise InvalidArgument(f"{what} {value} is out of range") from None


def _requested_backend(backend: Any) -> str:
    if not isinstance(backend, str) or backend.lower() not in _BACKENDS:
        raise InvalidArgument(f"unknown backend {backend!r}; expected one of 'auto', 'host', 'metal'")
    backend = backend.lower()
    if backend == "auto":
        forced = os.environ.get("MLXBUF_BACKEND", "").strip().lower()
        if forced:
            if forced not in _BACKENDS:
                raise InvalidArgument(f"MLXBUF_BACKEND={forced!r}; expected 'auto', 'host' or 'metal'")
            backend = forced
    return backend


# Open devices, so in-flight work can finish before the interpreter tears
# down the objects its completion would touch.
_open_devices: weakref.WeakSet[Device] = weakref.WeakSet()


@atexit.register
def _synchronize_open_devices() -> None:
    for dev in list(_open_devices):
        # A device inherited through fork refuses at once (its queue stayed
        # in the parent): nothing to wait for, nothing to report at exit.
        lib.cm_device_synchronize(dev._handle)


class Device:
    """One opened device: Metal where asked for and available, else host memory.

    ``Device("auto" | "host" | "metal")`` opens a new device each call, with
    its own command queue, residency set and counters. ``"auto"`` honours
    ``MLXBUF_BACKEND``; ``"metal"`` raises DeviceNotFound where there is no
    Metal device. ``residency=False`` (or ``MLXBUF_NO_RESIDENCY=1``) opens it
    with residency sets switched off. ``MLXBUF_RESIDENCY_SHARD_BYTES``,
    ``MLXBUF_RESIDENCY_KEEPALIVE=seconds[,interval]``,
    ``MLXBUF_RESIDENCY_RELEASE_BYTES`` and ``MLXBUF_RESIDENCY_RELEASE_SECONDS``
    (the release policy, see ``ResidencySet.set_release_policy``) are
    applied at open.

    A Device pickles as its backend name and unpickles as a newly opened
    Device of that backend; ``copy.copy`` and ``copy.deepcopy`` return the
    Device itself (it is a handle, like a file).

    Owns one C reference to the device, released when the Device is
    collected; buffers, pools and command buffers hold their own. Safe to
    use from any thread.
    """

    __slots__ = ("_handle", "_info", "_plans", "_last", "__weakref__")

    # The slots' types (annotations only, no class attributes).
    _handle: Any
    _info: Any
    _plans: dict[Any, _Plan]  # alloc_buffer's validated requests (buffer._plan_for)
    _last: _LastRequest  # the last request, its handle and layout (buffer._NO_REQUEST)

    def __init__(self, backend: str = "auto", *, residency: bool | None = None) -> None:
        wanted = _requested_backend(backend)
        if residency is None:
            residency = not _env_flag("MLXBUF_NO_RESIDENCY")
        flags = 0 if residency else lib.CM_DEVICE_NO_RESIDENCY
        out = ffi.new("cm_device_t **")
        status = lib.cm_device_open(_BACKENDS[wanted], flags, out)
        if status:
            exc = error_for(status)
            if isinstance(exc, DeviceNotFound) and not str(exc):
                exc = DeviceNotFound(f"no {wanted} device in this process", status=status)
            raise exc
        self._adopt(ffi.gc(out[0], _release_device))
        self._apply_env()

    @classmethod
    def _from_handle(cls, handle: Any) -> Device:
        """Wrap a ``cm_device_t *`` owning one C reference (``ffi.gc``'d by this call)."""
        dev = cls.__new__(cls)
        dev._adopt(ffi.gc(handle, _release_device))
        return dev

    def _adopt(self, handle: Any) -> None:
        self._handle = handle
        info = ffi.new("cm_device_info_t *")
        check(lib.cm_device_info(handle, info))
        self._info = info
        self._plans = {}
        self._last = _NO_REQUEST
        _open_devices.add(self)

    def __reduce__(self) -> tuple[Any, ...]:
        return (Device, (self.backend,))

    def __copy__(self) -> Device:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> Device:
        return self

    def _apply_env(self) -> None:
        shard = os.environ.get("MLXBUF_RESIDENCY_SHARD_BYTES", "").strip()
        if shard and self.residency_sets_enabled:
            # Not None: residency sets are enabled.
            self.residency_set.shard_cap = _parse_bytes_env("MLXBUF_RESIDENCY_SHARD_BYTES", shard)  # type: ignore[union-attr]
        keepalive = os.environ.get("MLXBUF_RESIDENCY_KEEPALIVE", "").strip()
        if keepalive and self.residency_sets_enabled:
            seconds, interval = _parse_keepalive(keepalive)
            self.set_residency_keepalive(seconds, interval)
        release_bytes = os.environ.get("MLXBUF_RESIDENCY_RELEASE_BYTES", "").strip()
        release_seconds = os.environ.get("MLXBUF_RESIDENCY_RELEASE_SECONDS", "").strip()
        if (release_bytes or release_seconds) and self.residency_sets_enabled:
            rs: ResidencySet = self.residency_set  # type: ignore[assignment]
            threshold, idle = rs.release_policy
            if release_bytes:
                threshold = _parse_bytes_env("MLXBUF_RESIDENCY_RELEASE_BYTES", release_bytes, minimum=0)
            if release_seconds:
                idle = _parse_seconds_env("MLXBUF_RESIDENCY_RELEASE_SECONDS", release_seconds)
            rs.set_release_policy(threshold, idle)

    # ---- facts ----

    @property
    def backend(self) -> str:
        """``"metal"`` or ``"host"``."""
        return _BACKEND_NAMES.get(self._info.backend, str(self._info.backend))

    @property
    def name(self) -> str:
        """The device's name (Metal: e.g. "Apple M2"; host: from the machine)."""
        return ffi.string(self._info.name).decode("utf-8", "replace")

    @property
    def has_unified_memory(self) -> bool:
        """True when CPU and GPU share memory (Apple Silicon; always on host)."""
        return bool(self._info.has_unified_memory)

    @property
    def max_buffer_length(self) -> int:
        """Largest single allocation, in bytes."""
        return self._info.max_buffer_length

    @property
    def recommended_max_working_set_size(self) -> int:
        """Bytes the device can use without hurting performance."""
        return self._info.recommended_max_working_set_size

    @property
    def page_size(self) -> int:
        """Allocation granularity in bytes."""
        return self._info.page_size

    @property
    def registry_id(self) -> int:
        """Metal's registryID (0 on the host backend)."""
        return self._info.registry_id

    @property
    def residency_sets_enabled(self) -> bool:
        """Whether allocations are registered in residency sets."""
        return bool(self._info.residency_enabled)

    @property
    def residency_disabled_reason(self) -> str:
        """Why residency sets are off ("" when they are on)."""
        return ffi.string(self._info.residency_disabled_reason).decode("utf-8", "replace")

    @property
    def residency_set(self) -> ResidencySet | None:
        """The device's ResidencySet, or None when residency is off.

        Each access returns a new view object (they compare equal); caching
        one here would make a Device <-> ResidencySet reference cycle.
        """
        if not self._info.residency_enabled:
            return None
        from mlxbuf.residency import ResidencySet

        return ResidencySet._for_device(self)

    def __repr__(self) -> str:
        residency = "on" if self.residency_sets_enabled else "off"
        return f"Device(backend={self.backend!r}, name={self.name!r}, residency={residency})"

    # ---- memory ----

    def stats(self) -> DeviceStats:
        """A DeviceStats snapshot of this device's counters."""
        out = ffi.new("cm_device_stats_t *")
        check(lib.cm_device_stats(self._handle, out))
        return DeviceStats(**{f.name: getattr(out, f.name) for f in dataclasses.fields(DeviceStats)})

    def _stat(self, field: str) -> int:
        out = ffi.new("cm_device_stats_t *")
        check(lib.cm_device_stats(self._handle, out))
        return getattr(out, field)

    @property
    def active_memory(self) -> int:
        """Allocated bytes of live storages of this device: whole pages, not the
        bytes asked for (pool caches included, external storages not; freed
        memory still held by the residency set is ``stats().deferred_release_bytes``)."""
        return self._stat("active_bytes")

    @property
    def peak_memory(self) -> int:
        """Largest active_memory since the device opened or reset_peak_memory()."""
        return self._stat("peak_bytes")

    def reset_peak_memory(self) -> None:
        """Restart peak_memory from the current active_memory."""
        lib.cm_device_reset_peak(self._handle)

    @property
    def memory_limit(self) -> int:
        """Allocations that would take active_memory plus the freed memory
        waiting for its residency commit (``stats().deferred_release_bytes``)
        above this many bytes fail."""
        return self._stat("memory_limit")

    @memory_limit.setter
    def memory_limit(self, limit: SupportsIndex | None) -> None:
        self.set_memory_limit(limit)

    def set_memory_limit(self, limit: SupportsIndex | None) -> int:
        """Set the memory limit in bytes (None: no limit); return the old one."""
        limit = _U64_MAX if limit is None else _int_arg(limit, "memory limit")
        old = ffi.new("uint64_t *")
        check(lib.cm_device_set_memory_limit(self._handle, limit, old))
        return old[0]

    def synchronize(self) -> None:
        """Block until every command buffer submitted so far has completed and released its holds."""
        check(lib.cm_device_synchronize(self._handle))

    def _debug_fail_alloc(self, fail_nth: int = 0, min_bytes: int = 0) -> None:
        """Test-only: make the fail_nth-th allocation from now (and, with
        min_bytes, every one of at least min_bytes) fail; (0, 0) switches it off."""
        check(lib.cm_device_debug_fail_alloc(self._handle, fail_nth, min_bytes))

    # ---- allocation ----

    def alloc_buffer(self, byte_len: SupportsIndex, dtype: DTypeLike, shape: ShapeLike) -> Buffer:
        """A new zero-filled Buffer of ``byte_len`` bytes viewed as ``dtype``/``shape``.

        ``byte_len`` must be > 0 and the shape must fit in it
        (InvalidArgument otherwise); above max_buffer_length, or beyond the
        device's memory, raises BufferAllocationError (a MemoryError). The
        storage is staged into the residency set (no commit). When memory
        runs out the garbage collector runs once and the allocation is
        retried once (the device's pool caches were already given back by C).
        """
        # The hot path of unpooled allocation, as in BufferPool.alloc: a
        # repeated request reuses its validated plan (buffer._plan_for says
        # when a plan counts as a hit).
        last_len, last_dtype, last_shape, handle, layout = self._last
        if byte_len is not last_len or dtype is not last_dtype or shape is not last_shape:
            handle, layout, byte_len = _recall(self, byte_len, dtype, shape)
        try:
            res = _tls.res
        except AttributeError:
            res = _result()
        status = _storage_alloc(handle, byte_len, res)
        if status:
            self._alloc_failed(status, byte_len, res)
        # Read the shared per-thread result before allocating Python objects:
        # an allocation can run the garbage collector, whose finalizers may
        # allocate (and so overwrite res) on this thread.
        storage = _gc(res.storage, _release)
        buf = _new(Buffer)
        buf._device = self
        buf._storage = storage
        buf._layout = layout
        return buf

    def _plan(self, byte_len: Any, dtype: Any, shape: Any) -> tuple[_Plan, int]:
        return _plan_for(self._plans, self._handle, byte_len, dtype, shape, _unrounded)

    def _alloc_failed(self, status: int, byte_len: int, res: Any) -> None:
        # Python may be holding dead buffers in reference cycles; collecting
        # them cannot make room for more than the device's maximum.
        if status == _OOM and byte_len <= self._info.max_buffer_length:
            gc.collect()
            status = _storage_alloc(self._handle, byte_len, res)
            if not status:
                return
        raise error_for(status, bytes=byte_len)

    def command_encoder(self) -> CommandEncoder:
        """A new CommandEncoder (one command buffer) on this device's queue."""
        from mlxbuf.encoder import CommandEncoder

        return CommandEncoder._create(self)

    def set_residency_keepalive(self, seconds: float, interval: float | None = None) -> None:
        """Keep residency requested for ``seconds`` after each submission,
        re-requesting every ``interval`` seconds (default: a quarter of
        ``seconds``, between 1 ms and 1 s) from a background thread that
        sleeps while there is nothing to keep alive; ``seconds=0`` switches
        it off. Off by default."""
        seconds = _float_arg(seconds, "keep-alive seconds")
        if interval is None:
            interval = min(max(seconds / 4, 0.001), 1.0) if seconds > 0 else 0.0
        interval = _float_arg(interval, "keep-alive interval")
        check(lib.cm_residency_set_keepalive(self._handle, seconds, interval))

    def compile_library(self, source: str | bytes, name: str = "library", *, fast_math: bool = False) -> Library:
        """Compile Metal Shading Language source into a Library.

        Floating point follows IEEE 754 by default (Metal's own default is
        fast math). ``fast_math=True`` lets the compiler assume no NaN or
        infinity and reorder arithmetic: faster kernels whose results may
        differ in the last bits, or wholly where NaN and infinity occur.
        ``name`` labels the library in error messages.

        ShaderCompilationError carries the compiler's message; the host
        backend raises Unsupported (it has no compute).
        """
        from mlxbuf.compute import Library

        return Library._compile(self, source, name, fast_math)

    # ---- interop hooks (mlxbuf.interop) ----

    def map_file(
        self,
        path: str | os.PathLike[str],
        offset: SupportsIndex = 0,
        length: SupportsIndex | None = None,
        *,
        dtype: DTypeLike = "u8",
        shape: ShapeLike | None = None,
        writable: bool = False,
    ) -> Buffer:
        """A zero-copy Buffer over ``length`` bytes of a file from ``offset`` (see mlxbuf.interop.map_file)."""
        from mlxbuf import interop

        return interop.map_file(self, path, offset, length, dtype=dtype, shape=shape, writable=writable)

    def from_numpy(self, array: ArrayLike, copy: bool | None = None) -> Buffer:
        """A Buffer over a numpy array's memory, zero-copy where possible (see mlxbuf.interop.from_numpy)."""
        from mlxbuf import interop

        return interop.from_numpy(self, array, copy=copy)


def _unrounded(n: int) -> int:
    """An unpooled storage is exactly the bytes asked for."""
    return n


_default_lock = threading.Lock()
# pid -> Device. A forked child opens its own and never releases the
# parent's, whose queue thread did not survive the fork.
_default: dict[int, Device] = {}


def default_device() -> Device:
    """The process's default Device: Metal where available, else host.

    ``MLXBUF_BACKEND=host|metal`` forces a backend (read at the first call).
    The same Device is returned on every call in a process; thread-safe.
    """
    pid = os.getpid()
    dev = _default.get(pid)
    if dev is None:
        with _default_lock:
            dev = _default.get(pid)
            if dev is None:
                dev = _default[pid] = Device("auto")
    return dev
