"""The simulated Metal of a simulator build: test Metal code paths on Linux.

A simulator build (``MLXBUF_METAL_SIM=1 python3 -m pip install -e .`` on
Linux, with clang-19 and ObjFW) compiles mlxbuf's Metal backend unchanged
against a model of Metal that runs command buffers on a simulated GPU
thread and checks the rules Apple documents. In that build
``Device("metal")`` opens the simulated device (``"auto"`` and
``default_device()`` still choose the host backend), and this module
controls it. In every other build ``available()`` is False and the other
functions raise ``mlxbuf.Unsupported``.

The simulator cannot compile Metal Shading Language: a dispatch runs the
Python function registered for the kernel's name (``register_kernel``), so
dispatch code (bindings, offsets, grids, ordering) is tested on Linux
against a numpy reference of the kernel.

Everything here is process-wide and safe to call from any thread.
"""

from __future__ import annotations

import atexit
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from mlxbuf._cmetal import ffi, lib
from mlxbuf.errors import InvalidArgument, Unsupported

__all__ = ["available", "configure", "fail_next", "register_kernel", "stats", "validation_messages", "KernelFunction"]

#: ``fn(grid, threadgroup, buffers, constants)``: see ``register_kernel``.
KernelFunction = Callable[
    [tuple[int, int, int], tuple[int, int, int], list[npt.NDArray[np.uint8]], bytes],
    object,
]

_AVAILABLE = hasattr(lib, "msim_get_stats")
_FAULTS = (
    {
        "new_buffer": lib.MSIM_FAULT_NEW_BUFFER,
        "command_buffer": lib.MSIM_FAULT_COMMAND_BUFFER,
        "residency_set": lib.MSIM_FAULT_RESIDENCY_SET,
        "library": lib.MSIM_FAULT_LIBRARY,
    }
    if _AVAILABLE
    else {}
)
_MAX_LATENCY_US = 10_000_000
_MIN_BUFFER_LENGTH = 16384
_MAX_NAME = 127

_kernels: dict[str, KernelFunction] = {}
_kernels_lock = threading.Lock()
# Identifies this module's registrations in the simulator's registry.
_CTX = ffi.new("char[1]") if _AVAILABLE else None


def available() -> bool:
    """True in a simulator build, where ``Device("metal")`` opens the simulated device."""
    return _AVAILABLE


def _require() -> None:
    if not _AVAILABLE:
        raise Unsupported(
            "this build of mlxbuf has no simulated Metal: rebuild it with MLXBUF_METAL_SIM=1 "
            "(Linux, with clang-19 and ObjFW installed)"
        )


def _int(value: Any, what: str, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InvalidArgument(f"{what} must be an int, got {value!r}")
    value = int(value)
    if value < low or (high is not None and value > high):
        limit = f"at least {low}" if high is None else f"{low} to {high}"
        raise InvalidArgument(f"{what} {value} is out of range: expected {limit}")
    return value


def configure(
    *,
    macos_version: int = 15,
    latency_us: int = 0,
    max_buffer_length: int | None = None,
    recommended_working_set: int | None = None,
) -> None:
    """Configure the simulated device; applies to devices opened afterwards.

    ``macos_version`` is the macOS the simulator reports (below 15 the
    residency-set API is absent, so new devices run with residency off);
    it is process-wide, so change it only while no simulated device is in
    use. ``latency_us`` delays every command buffer on the GPU thread (to
    expose races). ``max_buffer_length`` and ``recommended_working_set``
    are the device's limits in bytes (None: half and three quarters of
    physical memory). Calling ``configure()`` with no argument restores the
    defaults.
    """
    _require()
    major = _int(macos_version, "macos_version", 11, 99)
    latency = _int(latency_us, "latency_us", 0, _MAX_LATENCY_US)
    max_len = 0 if max_buffer_length is None else _int(max_buffer_length, "max_buffer_length", _MIN_BUFFER_LENGTH)
    working = 0 if recommended_working_set is None else _int(recommended_working_set, "recommended_working_set", 1)
    if lib.msim_configure(major, latency, max_len, working) != 0:  # pragma: no cover - checked above
        raise InvalidArgument("the simulator refused the configuration")


def fail_next(what: str, count: int = 1) -> None:
    """Make the next ``count`` operations of one kind fail (``count=0`` disarms).

    ``what`` is ``"new_buffer"`` (newBuffer... returns nil: BufferAllocationError),
    ``"command_buffer"`` (the command buffer completes with status Error:
    CommandBufferError from ``wait()``), ``"residency_set"`` (residency-set
    creation fails with an NSError: residency turns off on a device being
    opened, or ResidencySetError) or ``"library"`` (compilation fails:
    ShaderCompilationError).
    """
    _require()
    if what not in _FAULTS:
        raise InvalidArgument(f"unknown fault {what!r}; expected one of {', '.join(map(repr, _FAULTS))}")
    lib.msim_fail_next(_FAULTS[what], _int(count, "count", 0))


def register_kernel(name: str, fn: KernelFunction | None) -> None:
    """Run ``fn`` whenever a kernel function called ``name`` is dispatched
    on the simulated device (``fn=None`` removes it).

    ``fn(grid, threadgroup, buffers, constants)`` runs on the simulated GPU
    thread, in queue order, once per dispatch: ``grid`` and ``threadgroup``
    are 3-tuples; ``buffers`` are writable ``uint8`` numpy arrays, one per
    bound buffer in argument order, each from the bound offset to the end
    of its MTLBuffer (read-only where the memory is, e.g. a read-only file
    mapping); ``constants`` are the bytes of the bound constants, in
    argument order. The arrays are valid during the call only. An exception
    fails the command buffer with the exception's text.
    """
    _require()
    if not isinstance(name, str) or not name or len(name.encode("utf-8")) > _MAX_NAME:
        raise InvalidArgument(f"kernel name must be a non-empty str of at most {_MAX_NAME} bytes, got {name!r}")
    if fn is not None and not callable(fn):
        raise InvalidArgument(f"kernel implementation must be callable or None, got {fn!r}")
    with _kernels_lock:
        if fn is None:
            _kernels.pop(name, None)
            lib.msim_register_kernel(name.encode("utf-8"), ffi.NULL, ffi.NULL)
        else:
            _kernels[name] = fn
            lib.msim_register_kernel(name.encode("utf-8"), lib.mlxbuf_metalsim_kernel, _CTX)


def stats() -> dict[str, int]:
    """The simulator's process-wide counters (bytes are ``allocatedSize``, 16 KiB pages).

    Among them: ``live_buffers``, ``live_bytes``, ``residency_commits``
    (native commits on residency sets), ``residency_adds``,
    ``residency_removes``, ``residency_held_bytes`` (buffers released by
    their owner that only residency sets still hold),
    ``command_buffers_committed``, ``command_buffers_completed`` and
    ``validation_errors``.
    """
    _require()
    out = ffi.new("msim_stats_t *")
    lib.msim_get_stats(out)
    return {name: int(getattr(out, name)) for name, _ in ffi.typeof("msim_stats_t").fields}


def validation_messages() -> list[str]:
    """Every broken Metal rule recorded so far, oldest first (the newest 4096 are kept).

    Each message starts with the rule in brackets, e.g. ``"[blit-alignment] ..."``.
    """
    _require()
    total = lib.msim_validation_count()
    buf = ffi.new("char[]", 4096)
    out = []
    for i in range(max(0, total - 4096), total):
        n = lib.msim_validation_message(i, buf, 4096)
        if n:
            out.append(ffi.string(buf).decode("utf-8", "replace"))
    return out


if _AVAILABLE:

    def _write_error(args: Any, text: str) -> None:
        data = text.encode("utf-8", "replace")[: max(0, args.error_cap - 1)]
        ffi.memmove(args.error, data + b"\0", len(data) + 1)

    def _trampoline_failed(exc: Any, value: Any, tb: Any) -> int:
        return 1  # the command buffer fails rather than pass silently

    @ffi.def_extern(onerror=_trampoline_failed)  # type: ignore[untyped-decorator]
    def mlxbuf_metalsim_kernel(ctx: Any, args: Any) -> int:
        """The simulator's entry into the registered Python kernels (GPU thread)."""
        name = ffi.string(args.name).decode("utf-8", "replace")
        fn = _kernels.get(name)
        if fn is None:
            _write_error(args, f"no Python implementation registered for kernel {name!r}")
            return 1
        buffers = []
        for i in range(args.nbuffers):
            n = args.lengths[i]
            arr = np.frombuffer(ffi.buffer(args.buffers[i], n), dtype=np.uint8) if n else np.empty(0, np.uint8)
            if not args.writable[i]:
                arr.flags.writeable = False
            buffers.append(arr)
        constants = bytes(ffi.buffer(args.constants, args.constants_len)) if args.constants_len else b""
        grid = (int(args.grid[0]), int(args.grid[1]), int(args.grid[2]))
        group = (int(args.threadgroup[0]), int(args.threadgroup[1]), int(args.threadgroup[2]))
        try:
            fn(grid, group, buffers, constants)
        except BaseException as exc:  # reported as the command buffer's error
            _write_error(args, f"{type(exc).__name__}: {exc}")
            return 1
        return 0

    @atexit.register
    def _unregister_at_exit() -> None:
        # Registered after mlxbuf.device's own exit hook, so this runs
        # first: let the GPU thread finish what uses Python kernels, then
        # stop calling into an interpreter that is going away.
        lib.msim_drain()
        lib.msim_unregister_kernels_with_ctx(_CTX)
