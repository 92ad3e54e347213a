"""mlxbuf: typed, reference-counted GPU buffers on Apple Silicon (Metal), with a host-memory backend.

Quick start::

    import numpy as np
    import mlxbuf
    dev = mlxbuf.default_device()
    buf = dev.alloc_buffer(4096, "f32", (1024,))
    arr = buf.numpy()          # zero-copy, aliases the buffer's bytes
    w = mlxbuf.asarray(np.ones((4, 4), np.float32))   # wraps the array's memory

See README.md for a tour; every public name has a docstring.
"""

from __future__ import annotations

__version__ = "0.1.0"

from typing import TYPE_CHECKING, Any

from mlxbuf.buffer import Buffer, ShapeLike
from mlxbuf.compute import Kernel, Library
from mlxbuf.conversion import asarray
from mlxbuf.device import Device, DeviceStats, default_device
from mlxbuf.dtypes import (
    DType,
    DTypeLike,
    as_dtype,
    bfloat16,
    bool_,
    float16,
    float32,
    float64,
    int8,
    int16,
    int32,
    int64,
    uint8,
    uint16,
    uint32,
    uint64,
)
from mlxbuf.encoder import CommandEncoder
from mlxbuf.errors import (
    BufferAllocationError,
    CommandBufferError,
    DeviceNotFound,
    FileError,
    IndexOutOfBounds,
    InvalidArgument,
    KernelNotFound,
    MlxError,
    ResidencySetError,
    ShaderCompilationError,
    Unsupported,
    UnsupportedDtype,
)
from mlxbuf.pool import BufferPool, PoolStats
from mlxbuf.residency import ResidencyInfo, ResidencySet, ShardInfo

if TYPE_CHECKING:
    # What __getattr__ resolves lazily, for type checkers ("x as x": re-exported).
    from mlxbuf.interop import from_dlpack as from_dlpack
    from mlxbuf.safetensors import SafetensorsError as SafetensorsError
    from mlxbuf.safetensors import load_safetensors as load_safetensors
    from mlxbuf.safetensors import safetensors_metadata as safetensors_metadata
    from mlxbuf.safetensors import save_safetensors as save_safetensors

# Interop lives in its own modules, imported on first use.
_LAZY = {
    "from_dlpack": "mlxbuf.interop",
    "load_safetensors": "mlxbuf.safetensors",
    "save_safetensors": "mlxbuf.safetensors",
    "safetensors_metadata": "mlxbuf.safetensors",
    "SafetensorsError": "mlxbuf.safetensors",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mlxbuf' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "__version__",
    "Buffer",
    "BufferAllocationError",
    "BufferPool",
    "CommandBufferError",
    "CommandEncoder",
    "DType",
    "DTypeLike",
    "Device",
    "DeviceNotFound",
    "DeviceStats",
    "FileError",
    "IndexOutOfBounds",
    "InvalidArgument",
    "Kernel",
    "KernelNotFound",
    "Library",
    "MlxError",
    "PoolStats",
    "ResidencyInfo",
    "ResidencySet",
    "ResidencySetError",
    "ShaderCompilationError",
    "ShapeLike",
    "ShardInfo",
    "Unsupported",
    "UnsupportedDtype",
    "as_dtype",
    "asarray",
    "default_device",
    "bfloat16",
    "bool_",
    "float16",
    "float32",
    "float64",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    *_LAZY,
]
