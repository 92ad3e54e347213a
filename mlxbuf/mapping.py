"""File-backed Buffers: Device.map_file.

A mapped storage is the file's pages themselves (``mmap``, ``MAP_SHARED``;
on Metal wrapped by ``newBufferWithBytesNoCopy``), so mapping costs no copy
and no read until a byte is touched. The C core rounds the offset down to a
page and remembers the difference, so any offset works. The mapping does
not depend on the file descriptor, the path or the file staying linked: it
is unmapped when the last reference to the storage dies. Mapped storages
join the residency set like allocations and count in ``active_memory``.

The one thing a mapping cannot survive is the file shrinking underneath
it: touching a page past the new end raises SIGBUS. Replace files
atomically (write a new file, then rename) while buffers map them, as
``save_safetensors`` does.
"""

from __future__ import annotations

import os
import stat
from typing import TYPE_CHECKING, SupportsIndex

from mlxbuf._cmetal import ffi, lib
from mlxbuf.buffer import Buffer, _dtype_arg, _int_arg
from mlxbuf.errors import InvalidArgument, error_for, file_error, file_errors, not_a_regular_file
from mlxbuf.external import _default_shape

if TYPE_CHECKING:
    from mlxbuf.buffer import ShapeLike
    from mlxbuf.device import Device
    from mlxbuf.dtypes import DTypeLike

__all__ = ["map_file", "map_fd", "open_regular_file"]

_OPEN_FLAGS = getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)


def open_regular_file(path: str, *, writable: bool = False) -> tuple[int, int]:
    """``(fd, size)`` of the regular file at ``path``, opened for reading
    (and writing when ``writable``); the caller closes ``fd``.

    Anything but a regular file (directory, FIFO, socket, device) raises
    FileError, as does any failure to open, naming the path. The type is
    checked before the open, so a device is never opened, and again on the
    open file, with an open that does not block: a FIFO swapped in between
    would otherwise wait for a writer forever.
    """
    action = "cannot open" + (" for writing" if writable else "")
    with file_errors(path, action):
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):
            raise not_a_regular_file(path, mode, action)
        fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | _OPEN_FLAGS)
    try:
        with file_errors(path, action):
            info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise not_a_regular_file(path, info.st_mode, action)
        # Reads of a regular file ignore O_NONBLOCK; cleared anyway so that
        # nothing downstream inherits a surprising flag.
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd, info.st_size


def map_fd(
    device: Device, fd: int, offset: int, length: int, *, writable: bool = False, path: str | None = None
) -> Buffer:
    """A 1-D u8 Buffer over ``length`` bytes of the open file ``fd`` from
    ``offset``; the caller keeps ownership of ``fd`` (the mapping does not
    need it once this returns)."""
    res = ffi.new("cm_alloc_result_t *")
    status = lib.cm_storage_map_file(device._handle, fd, offset, length, 1 if writable else 0, res)
    if status:
        # C leaves the failed system call's errno; read it before the next
        # C call (the message's) replaces it.
        errno = ffi.errno
        exc = error_for(status)
        if path is None:
            raise exc
        message = f"{path}: {exc.args[0]}"
        if status == lib.CM_ERR_IO:
            raise file_error(message, errno or None, path)
        exc.args = (message,)
        raise exc
    return Buffer._from_storage(device, res.storage, res.contents, res.byte_len, "u8", (res.byte_len,))


def map_file(
    device: Device,
    path: str | os.PathLike[str],
    offset: SupportsIndex = 0,
    length: SupportsIndex | None = None,
    *,
    dtype: DTypeLike = "u8",
    shape: ShapeLike | None = None,
    writable: bool = False,
) -> Buffer:
    """A zero-copy Buffer over ``length`` bytes of the file at ``path`` from ``offset``.

    ``length=None`` maps to the end of the file. The Buffer is 1-D ``u8`` by
    default; ``dtype``/``shape`` view the bytes otherwise (the shape must
    fit; without one the range must be a whole number of elements).
    ``writable=True`` opens the file for writing and shares writes with it
    (other readers see them at once); otherwise the Buffer is read-only and
    its numpy views refuse writes. Raises FileError when the file cannot be
    opened, InvalidArgument for a range outside the file, and
    BufferAllocationError (a MemoryError) for one longer than the device's
    maximum buffer length.
    """
    dt = _dtype_arg(dtype)
    path = os.fspath(path)
    offset = _int_arg(offset, "offset")
    if length is not None:
        length = _int_arg(length, "length", minimum=1)
    fd, size = open_regular_file(path, writable=writable)
    try:
        if offset > size:
            raise InvalidArgument(f"{path}: offset {offset} is beyond the end of the {size}-byte file")
        span = size - offset if length is None else length
        if span == 0:
            raise InvalidArgument(f"{path}: nothing to map at offset {offset} of the {size}-byte file")
        if span > size - offset:
            raise InvalidArgument(
                f"{path}: mapping {span} bytes at offset {offset} exceeds the {size}-byte file"
            )
        shape = _default_shape(span, dt, shape, "file range")
        base = map_fd(device, fd, offset, span, writable=writable, path=path)
    finally:
        os.close(fd)
    return base.view(dt, shape)
