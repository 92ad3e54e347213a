"""CommandEncoder: one command buffer, its operations, and its submission."""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Literal, SupportsIndex, TypeAlias, Union

import numpy as np

from mlxbuf._cmetal import ffi, lib
from mlxbuf.buffer import Buffer, _int_arg
from mlxbuf.errors import InvalidArgument, check

if TYPE_CHECKING:
    from types import TracebackType

    from mlxbuf.buffer import ShapeLike
    from mlxbuf.compute import Kernel
    from mlxbuf.device import Device

__all__ = ["CommandEncoder", "KernelConstant"]

# A value ``CommandEncoder.dispatch`` can bind as a kernel constant: Python
# ints bind as 32-bit ints, floats as float32, bools as uint8, numpy
# scalars and arrays as their own type, bytes-like objects as they are.
KernelConstant: TypeAlias = Union[int, float, bytes, bytearray, memoryview, "np.generic", "np.ndarray"]

_STATUS_NAMES = {
    lib.CM_CB_NOT_COMMITTED: "not_committed",
    lib.CM_CB_COMMITTED: "committed",
    lib.CM_CB_COMPLETED: "completed",
    lib.CM_CB_ERROR: "error",
    lib.CM_CB_DISCARDED: "discarded",
}


def _grid3(value: Any, what: str) -> Any:
    """An int or a sequence of 1-3 positive ints as a uint64_t[3], padded with 1."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        dims = [value]
    elif isinstance(value, (tuple, list)) and 1 <= len(value) <= 3:
        dims = list(value)
    else:
        raise InvalidArgument(f"{what} must be an int or 1-3 ints, got {value!r}")
    dims = [_int_arg(d, f"{what} dimension", minimum=1) for d in dims]
    return ffi.new("uint64_t[3]", dims + [1] * (3 - len(dims)))


def _constant_bytes(value: Any, index: int) -> bytes:
    """The bytes a kernel constant binds as.

    Python ints become 32-bit ints (int32, or uint32 from 2**31 up), floats
    become float32 and bools a uint8, matching MSL's `int`/`uint`/`float`/
    `bool` constants; numpy scalars and arrays keep their own type; bytes-like
    objects are passed as they are.
    """
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, (np.generic, np.ndarray)):
        return np.ascontiguousarray(value).tobytes()
    if isinstance(value, bool):
        return struct.pack("<B", value)
    if isinstance(value, int):
        if -(1 << 31) <= value < (1 << 31):
            return struct.pack("<i", value)
        if 0 <= value < (1 << 32):
            return struct.pack("<I", value)
        raise InvalidArgument(
            f"constant {index} = {value} does not fit in 32 bits; pass a numpy scalar (e.g. np.int64) for wider types"
        )
    if isinstance(value, float):
        return struct.pack("<f", value)
    raise InvalidArgument(
        f"constant {index} must be an int, float, bool, numpy scalar/array or bytes, got {value!r}"
    )


def _written_flags(writes: Iterable[SupportsIndex] | None, nbuffers: int) -> Any:
    """``writes`` (indices into the dispatch's buffers) as a uint8_t[nbuffers]
    of flags for the C call, or NULL for "every buffer"."""
    if writes is None:
        return ffi.NULL
    if isinstance(writes, (str, bytes)) or not isinstance(writes, Iterable):
        raise InvalidArgument(f"writes must be a collection of buffer indices, got {writes!r}")
    flags = [0] * max(nbuffers, 1)
    for index in writes:
        i = _int_arg(index, "writes index")
        if i >= nbuffers:
            raise InvalidArgument(f"writes index {i} is out of range: the dispatch binds {nbuffers} buffers")
        flags[i] = 1
    return ffi.new("uint8_t[]", flags)


class CommandEncoder:
    """One command buffer on a device's queue: encode copies, fills and
    dispatches, then ``commit()`` (returns at once) and ``wait()``.

    ``commit*`` first flushes pending residency changes (one native commit
    if anything is pending, none otherwise). The command buffer holds a C
    reference to every storage it uses from encode time until it completes
    (or is discarded), so nothing it touches is freed, reused by a pool or
    removed from residency meanwhile, whatever Python drops. Command buffers
    of one device complete in submission order.

    As a context manager, leaving the block commits (unless already
    committed) and waits; an exception inside the block discards the work.

    Owns one C reference to its command buffer; a submitted command buffer
    keeps itself alive until it completes. Encode from one thread at a
    time; ``status`` and ``wait()`` may be used from any thread.
    """

    __slots__ = ("_device", "_handle", "__weakref__")

    # The slots' types (annotations only, no class attributes).
    _device: Device
    _handle: Any

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("a CommandEncoder is made by Device.command_encoder()")

    def __reduce__(self) -> tuple[Any, ...]:
        raise TypeError("a CommandEncoder cannot be pickled: it is one command buffer of one device's queue")

    @classmethod
    def _create(cls, device: Device) -> CommandEncoder:
        out = ffi.new("cm_cmdbuf_t **")
        check(lib.cm_cmdbuf_create(device._handle, out))
        enc = cls.__new__(cls)
        enc._device = device
        enc._handle = ffi.gc(out[0], lib.cm_cmdbuf_release)
        return enc

    @property
    def device(self) -> Device:
        """The Device whose queue runs this command buffer."""
        return self._device

    def _own(self, buffer: object, role: str) -> Buffer:
        if not isinstance(buffer, Buffer):
            raise InvalidArgument(f"{role} must be a Buffer, got {buffer!r}")
        if buffer._device._handle != self._device._handle:
            raise InvalidArgument(f"{role} {buffer!r} belongs to another device than this encoder's")
        return buffer

    # ---- operations ----

    def copy(self, src: Buffer, dst: Buffer, nbytes: SupportsIndex | None = None) -> None:
        """Copy ``nbytes`` (default ``src.nbytes``) from ``src``'s view to ``dst``'s view,
        each starting at its own byte offset."""
        self._own(src, "copy source")
        self._own(dst, "copy destination")
        nbytes = src.nbytes if nbytes is None else _int_arg(nbytes, "copy nbytes")
        if nbytes > src.nbytes:
            raise InvalidArgument(f"copy of {nbytes} bytes exceeds the {src.nbytes}-byte source view")
        if nbytes > dst.nbytes:
            raise InvalidArgument(f"copy of {nbytes} bytes exceeds the {dst.nbytes}-byte destination view")
        check(
            lib.cm_cmdbuf_copy(self._handle, src._storage, src.byte_offset, dst._storage, dst.byte_offset, nbytes)
        )

    def fill(self, buffer: Buffer, value: int | np.integer[Any]) -> None:
        """Set every byte of ``buffer``'s view to ``value`` (an int in 0..255)."""
        self._own(buffer, "fill target")
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            raise InvalidArgument(f"fill value must be an int in 0..255, got {value!r}")
        if not 0 <= value <= 255:
            raise InvalidArgument(f"fill value {int(value)} is outside 0..255 (one byte)")
        check(lib.cm_cmdbuf_fill(self._handle, buffer._storage, buffer.byte_offset, buffer.nbytes, int(value)))

    def dispatch(
        self,
        kernel: Kernel,
        grid: ShapeLike,
        threadgroup: ShapeLike,
        buffers: Iterable[Buffer] = (),
        constants: Iterable[KernelConstant] = (),
        writes: Iterable[SupportsIndex] | None = None,
    ) -> None:
        """Encode a compute dispatch of ``grid`` threads in threadgroups of
        ``threadgroup`` threads (ints or 1-3 ints each).

        ``buffers`` bind at indices 0.. at their own byte offsets;
        ``constants`` bind after them: Python ints as 32-bit ints (int32,
        or uint32 from 2**31 up), floats as float32 and bools as uint8,
        matching MSL's ``int``/``uint``/``float``/``bool``; numpy scalars
        and arrays keep their own type; bytes-like objects bind as they
        are. Metal only: the host backend has no kernels to dispatch.

        ``writes`` names the buffers the kernel writes, as indices into
        ``buffers``; by default it writes all of them. Only written buffers
        make ``numpy()`` and the other CPU views wait for this command
        buffer, and a read-only buffer (a read-only file mapping, say) may
        be bound only when it is not among them: InvalidArgument otherwise.

        Each buffer's byte offset (as Metal sees it) must be a multiple of
        the alignment the kernel's argument needs (its element size, at
        least 4 bytes): InvalidArgument names the buffer, the offset and
        the alignment. A view at another offset (a tensor inside a
        safetensors file, say) binds through an aligned copy: ``view.copy()``.
        """
        from mlxbuf.compute import Kernel

        if not isinstance(kernel, Kernel):
            raise InvalidArgument(f"dispatch needs a Kernel (from Library.kernel), got {kernel!r}")
        grid3 = _grid3(grid, "grid")
        tg3 = _grid3(threadgroup, "threadgroup")
        buffers = list(buffers)
        constants = list(constants)
        if len(buffers) + len(constants) > lib.CM_MAX_KERNEL_ARGS:
            raise InvalidArgument(
                f"{len(buffers)} buffers + {len(constants)} constants exceed the "
                f"{lib.CM_MAX_KERNEL_ARGS} kernel argument slots"
            )
        for i, b in enumerate(buffers):
            self._own(b, f"buffer {i}")
        written = _written_flags(writes, len(buffers))
        blobs = [_constant_bytes(c, i) for i, c in enumerate(constants)]
        bufs = ffi.new("cm_storage_t *[]", [b._storage for b in buffers] or [ffi.NULL])
        offsets = ffi.new("uint64_t[]", [b.byte_offset for b in buffers] or [0])
        consts = ffi.new("uint8_t[]", b"".join(blobs) or b"\0")
        sizes = ffi.new("uint64_t[]", [len(b) for b in blobs] or [0])
        check(
            lib.cm_cmdbuf_dispatch(
                self._handle,
                kernel._handle,
                grid3,
                tg3,
                bufs,
                offsets,
                written,
                len(buffers),
                consts,
                sizes,
                len(blobs),
            )
        )

    # ---- submission ----

    def commit(self) -> None:
        """Flush pending residency, submit, and return without waiting."""
        check(lib.cm_cmdbuf_commit(self._handle))

    def wait(self) -> None:
        """Block until the command buffer completed and released its holds;
        CommandBufferError if it failed or was never committed."""
        check(lib.cm_cmdbuf_wait(self._handle))

    def commit_and_wait(self) -> None:
        """commit() then wait()."""
        self.commit()
        self.wait()

    def discard(self) -> None:
        """Drop the encoded work of a command buffer never committed, releasing its holds."""
        check(lib.cm_cmdbuf_discard(self._handle))

    @property
    def status(self) -> str:
        """``"not_committed"``, ``"committed"``, ``"completed"``, ``"error"`` or ``"discarded"``."""
        code = lib.cm_cmdbuf_status(self._handle)
        return _STATUS_NAMES.get(code, f"unknown({code})")

    @property
    def op_count(self) -> int:
        """Operations encoded so far."""
        return lib.cm_cmdbuf_op_count(self._handle)

    @property
    def hold_count(self) -> int:
        """Storages the command buffer holds right now (0 once completed or discarded)."""
        return lib.cm_cmdbuf_hold_count(self._handle)

    def __enter__(self) -> CommandEncoder:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> Literal[False]:
        status = lib.cm_cmdbuf_status(self._handle)
        if exc_type is not None:
            if status == lib.CM_CB_NOT_COMMITTED:
                self.discard()
            elif status == lib.CM_CB_COMMITTED:
                # Submitted work still runs; wait so its holds are released
                # before the exception propagates, but keep that exception.
                lib.cm_cmdbuf_wait(self._handle)
            return False
        if status == lib.CM_CB_NOT_COMMITTED:
            self.commit()
            status = lib.CM_CB_COMMITTED
        if status != lib.CM_CB_DISCARDED:
            self.wait()
        return False

    def __repr__(self) -> str:
        return f"CommandEncoder(status={self.status!r}, ops={self.op_count}, device={self._device.backend})"
