"""The mlxbuf exception hierarchy and the one place C status codes become exceptions."""

from __future__ import annotations

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
    """A file operation failed (file-backed buffers); the message names the path and the reason."""

    def __str__(self) -> str:
        # OSError's own str() becomes "[Errno n] None: filename" once errno
        # and filename are set as attributes, dropping the message.
        return str(self.args[0]) if self.args else ""


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
