"""The mlxbuf exception hierarchy and the one place C status codes become exceptions."""

from __future__ import annotations

import errno as _errno
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from mlxbuf._cmetal import ffi, lib

__all__ = [
    "MlxError",
    "DeviceNotFound",
    "BufferAllocationError",
    "InvalidArgument",
    "IndexOutOfBounds",
    "UnsupportedDtype",
    "ResidencySetError",
    "CommandBufferError",
    "ShaderCompilationError",
    "KernelNotFound",
    "Unsupported",
    "FileError",
    "check",
    "file_error",
    "file_errors",
    "not_a_regular_file",
]


class MlxError(Exception):
    """Base class of every error mlxbuf raises.

    ``status`` is the C status code behind the error (``None`` when the error
    was raised by Python-side validation). Keyword arguments become
    attributes, so every class takes the context ``check`` gives it.
    """

    status: int | None = None

    def __init__(self, message: str = "", **context: Any) -> None:
        super().__init__(message)
        for key, value in context.items():
            setattr(self, key, value)


class DeviceNotFound(MlxError):
    """The requested backend has no device in this process (e.g. Metal on Linux),
    or the device was opened in the process this one was forked from.

    After ``os.fork()`` a device opened before the fork keeps its buffers'
    memory readable and writable in the child, and dropping them works, but
    its command queue and threads stayed in the parent: allocating on it,
    encoding, committing, waiting, synchronizing, residency commits,
    keep-alive and compute raise this error. Open a new Device in the child.
    """


class BufferAllocationError(MlxError, MemoryError):
    """An allocation failed or would exceed the device's memory limit.

    ``bytes`` is the size that was asked for; the message gives the bytes in
    use and the limit.
    """

    def __init__(self, message: str = "", bytes: int | None = None, **context: Any) -> None:
        super().__init__(message, **context)
        self.bytes = bytes


class InvalidArgument(MlxError, ValueError):
    """A value outside its limit: the message names the value and the limit."""


class IndexOutOfBounds(MlxError, IndexError):
    """An index past either end of an axis (``buf[i]``); the message names the
    index and the axis size, as numpy's IndexError does."""


class UnsupportedDtype(MlxError, TypeError):
    """A dtype mlxbuf does not know, or one that needs a missing package (bfloat16)."""


class ResidencySetError(MlxError):
    """A residency-set operation failed (or residency is switched off)."""


class CommandBufferError(MlxError):
    """A command buffer was misused (encode/commit after commit, wait before commit) or failed."""


class ShaderCompilationError(MlxError):
    """The shader compiler rejected a library.

    ``name`` is the library's name, ``message`` the compiler's output.
    """

    def __init__(self, message: str = "", name: str | None = None, **context: Any) -> None:
        super().__init__(f"{name}: {message}" if name else message, **context)
        self.name = name
        self.message = message


class KernelNotFound(MlxError):
    """A library has no function of the requested name."""


class Unsupported(MlxError, NotImplementedError):
    """A capability the backend lacks, e.g. compute kernels on the host backend."""


class FileError(MlxError, OSError):
    """A file operation failed: the message names the path and the reason.

    Also the builtin ``OSError`` subclass that matches ``errno``
    (``FileNotFoundError``, ``PermissionError``, ``IsADirectoryError``,
    ``NotADirectoryError``, ``FileExistsError``; plain ``OSError``
    otherwise), so ``except FileNotFoundError`` catches a missing file as it
    would for ``open()``. ``errno``, ``strerror`` and ``filename`` are set
    as on any OSError.
    """

    def __str__(self) -> str:
        # OSError's own str() becomes "[Errno n] None: filename" once errno
        # and filename are set as attributes, dropping the message.
        return str(self.args[0]) if self.args else ""


class FileNotFoundFileError(FileError, FileNotFoundError):
    """A FileError for a path that does not exist (also a FileNotFoundError)."""


class PermissionFileError(FileError, PermissionError):
    """A FileError for a path the process may not open (also a PermissionError)."""


class IsADirectoryFileError(FileError, IsADirectoryError):
    """A FileError for a directory where a file was expected (also an IsADirectoryError)."""


class NotADirectoryFileError(FileError, NotADirectoryError):
    """A FileError for a path through something that is not a directory (also a NotADirectoryError)."""


class FileExistsFileError(FileError, FileExistsError):
    """A FileError for a path that exists where it must not (also a FileExistsError)."""


# OSError(errno, ...) itself picks the builtin subclass of an errno: asking
# it keeps this table in step with Python's own mapping.
_FILE_ERROR_BY_BUILTIN: dict[type[OSError], type[FileError]] = {
    FileNotFoundError: FileNotFoundFileError,
    PermissionError: PermissionFileError,
    IsADirectoryError: IsADirectoryFileError,
    NotADirectoryError: NotADirectoryFileError,
    FileExistsError: FileExistsFileError,
}


def file_error(message: str, errno: int | None, filename: str | None, strerror: str | None = None) -> FileError:
    """The FileError for a failure with ``errno`` on ``filename``: the
    subclass that is also the matching builtin, with errno, strerror and
    filename set. The one place file failures become exceptions."""
    builtin = type(OSError(errno, "")) if errno else OSError
    exc = _FILE_ERROR_BY_BUILTIN.get(builtin, FileError)(message)
    exc.errno = errno
    exc.strerror = strerror if strerror is not None else (os.strerror(errno) if errno else None)
    exc.filename = filename
    return exc


@contextmanager
def file_errors(filename: str, action: str) -> Iterator[None]:
    """Turn an OSError raised inside the block into the matching FileError
    "{action} {filename!r}: {reason}" (a FileError passes through)."""
    try:
        yield
    except FileError:
        raise
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise file_error(f"{action} {filename!r}: {reason}", exc.errno, filename, exc.strerror) from None


def not_a_regular_file(filename: str, mode: int, action: str) -> FileError:
    """The FileError for a path that exists but is not a regular file
    (a directory, FIFO, socket or device): mlxbuf maps and replaces regular
    files only, and opening the others can block or has side effects."""
    kind = (
        "a directory" if stat.S_ISDIR(mode)
        else "a FIFO" if stat.S_ISFIFO(mode)
        else "a socket" if stat.S_ISSOCK(mode)
        else "a character device" if stat.S_ISCHR(mode)
        else "a block device" if stat.S_ISBLK(mode)
        else "not a regular file"
    )
    reason = f"not a regular file ({kind})" if kind != "not a regular file" else kind
    # EISDIR for a directory, as open() for writing says; ENODEV for the
    # rest, as mmap() says for a file it cannot map.
    code = _errno.EISDIR if stat.S_ISDIR(mode) else _errno.ENODEV
    return file_error(f"{action} {filename!r}: {reason}", code, filename, reason)


_BY_STATUS: dict[int, type[MlxError]] = {
    lib.CM_ERR_INVALID_ARGUMENT: InvalidArgument,
    lib.CM_ERR_OUT_OF_MEMORY: BufferAllocationError,
    lib.CM_ERR_DEVICE_NOT_FOUND: DeviceNotFound,
    lib.CM_ERR_UNSUPPORTED: Unsupported,
    lib.CM_ERR_RESIDENCY: ResidencySetError,
    lib.CM_ERR_COMMAND_BUFFER: CommandBufferError,
    lib.CM_ERR_SHADER_COMPILATION: ShaderCompilationError,
    lib.CM_ERR_KERNEL_NOT_FOUND: KernelNotFound,
    lib.CM_ERR_IO: FileError,
    lib.CM_ERR_INTERNAL: MlxError,
}


def last_error_message() -> str:
    """The calling thread's last C error message ('' if none)."""
    return ffi.string(lib.cm_last_error()).decode("utf-8", "replace")


def error_for(status: int, **context: Any) -> MlxError:
    """The exception for C status ``status``, with the thread's last C message.

    ``context`` sets attributes on the exception (``bytes=`` for
    BufferAllocationError, ``name=`` for ShaderCompilationError, ...); an
    unknown code gives a plain MlxError that keeps the raw code in ``status``.
    """
    message = last_error_message()
    cls = _BY_STATUS.get(status)
    if cls is None:
        exc = MlxError(f"mlxbuf C core returned unknown status {status}: {message or 'no message'}", **context)
    else:
        if status == lib.CM_ERR_INTERNAL:
            message = f"internal error in the mlxbuf C core (please report): {message}"
        exc = cls(message, **context)
    exc.status = status
    return exc


def check(status: int, **context: Any) -> None:
    """Raise the exception for a non-zero C status; return None for CM_OK."""
    if status:
        raise error_for(status, **context)
