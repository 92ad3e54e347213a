"""Interop: DLPack, external memory, file mappings and safetensors.

One import site for the hooks ``Buffer`` and ``Device`` delegate to; each
concept lives in its own module:

- ``mlxbuf.dlpack``: ``Buffer.__dlpack__`` / ``__dlpack_device__`` and
  ``from_dlpack``;
- ``mlxbuf.external``: ``Buffer.from_raw`` and ``Device.from_numpy``;
- ``mlxbuf.mapping``: ``Device.map_file``;
- ``mlxbuf.safetensors``: ``load_safetensors`` / ``save_safetensors``.
"""

from mlxbuf.dlpack import dlpack_device, from_dlpack, to_dlpack
from mlxbuf.external import from_numpy, from_raw
from mlxbuf.mapping import map_file
from mlxbuf.safetensors import (
    SafetensorsError,
    load_safetensors,
    read_header,
    safetensors_metadata,
    save_safetensors,
)

__all__ = [
    "to_dlpack",
    "dlpack_device",
    "from_dlpack",
    "from_raw",
    "from_numpy",
    "map_file",
    "load_safetensors",
    "save_safetensors",
    "safetensors_metadata",
    "read_header",
    "SafetensorsError",
]
