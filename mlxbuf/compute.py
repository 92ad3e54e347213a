"""Compute: compiled shader libraries and their kernels (Metal only)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mlxbuf._cmetal import ffi, lib
from mlxbuf.errors import InvalidArgument, Unsupported, error_for

if TYPE_CHECKING:
    from mlxbuf.device import Device

__all__ = ["Library", "Kernel"]


class Library:
    """A compiled Metal Shading Language library; ``kernel(name)`` gives its functions.

    Owns one C reference to the library. Safe to use from any thread.
    """

    __slots__ = ("_device", "_handle", "_name", "_fast_math", "__weakref__")

    # The slots' types (annotations only, no class attributes).
    _device: Device
    _handle: Any
    _name: str
    _fast_math: bool

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("a Library is made by Device.compile_library(source)")

    @classmethod
    def _compile(cls, device: Device, source: str | bytes, name: str, fast_math: bool) -> Library:
        if isinstance(source, bytes):
            source = source.decode("utf-8")
        if not isinstance(source, str):
            raise InvalidArgument(f"shader source must be a str, got {type(source).__name__}")
        if not isinstance(fast_math, bool):
            raise InvalidArgument(f"fast_math must be True or False, got {fast_math!r}")
        flags = lib.CM_COMPILE_FAST_MATH if fast_math else 0
        out = ffi.new("cm_library_t **")
        status = lib.cm_library_compile(device._handle, source.encode("utf-8"), flags, out)
        if status:
            exc = error_for(status, name=name)
            if isinstance(exc, Unsupported) and not str(exc):
                exc = Unsupported(
                    f"the {device.backend} backend cannot compile shaders: compute kernels need Metal",
                    status=status,
                )
            raise exc
        library = cls.__new__(cls)
        library._device = device
        library._handle = ffi.gc(out[0], lib.cm_library_release)
        library._name = name
        library._fast_math = fast_math
        return library

    @property
    def device(self) -> Device:
        """The Device the library was compiled for."""
        return self._device

    @property
    def name(self) -> str:
        """The name given at compile time (used in error messages)."""
        return self._name

    @property
    def fast_math(self) -> bool:
        """Whether the library was compiled with fast math (``compile_library(..., fast_math=True)``)."""
        return self._fast_math

    def kernel(self, name: str) -> Kernel:
        """The compute pipeline of function ``name`` (KernelNotFound if there is none).

        Pipelines are cached per (library, name) in C.
        """
        if not isinstance(name, str):
            raise InvalidArgument(f"kernel name must be a str, got {name!r}")
        out = ffi.new("cm_kernel_t **")
        status = lib.cm_library_kernel(self._handle, name.encode("utf-8"), out)
        if status:
            raise error_for(status, name=name)
        return Kernel._adopt(self, ffi.gc(out[0], lib.cm_kernel_release))

    def __repr__(self) -> str:
        fast = ", fast_math=True" if self._fast_math else ""
        return f"Library({self._name!r}{fast}, device={self._device.backend})"


class Kernel:
    """A compute pipeline: one function of a Library, ready to dispatch.

    Owns one C reference to the pipeline. Immutable; safe to use from any thread.
    """

    __slots__ = ("_library", "_handle", "_info", "__weakref__")

    # The slots' types (annotations only, no class attributes).
    _library: Library
    _handle: Any
    _info: Any

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("a Kernel is made by Library.kernel(name)")

    @classmethod
    def _adopt(cls, library: Library, handle: Any) -> Kernel:
        info = ffi.new("cm_kernel_info_t *")
        status = lib.cm_kernel_info(handle, info)
        if status:
            raise error_for(status)
        k = cls.__new__(cls)
        k._library = library
        k._handle = handle
        k._info = info
        return k

    @property
    def name(self) -> str:
        """The function's name."""
        return ffi.string(self._info.name).decode("utf-8", "replace")

    @property
    def library(self) -> Library:
        """The Library the kernel comes from."""
        return self._library

    @property
    def max_total_threads_per_threadgroup(self) -> int:
        """Most threads one threadgroup of this pipeline may have."""
        return self._info.max_total_threads_per_threadgroup

    @property
    def thread_execution_width(self) -> int:
        """SIMD width: threadgroup sizes should be multiples of it."""
        return self._info.thread_execution_width

    def __repr__(self) -> str:
        return (
            f"Kernel({self.name!r}, max_total_threads_per_threadgroup={self.max_total_threads_per_threadgroup}, "
            f"thread_execution_width={self.thread_execution_width})"
        )
