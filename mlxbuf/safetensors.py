"""safetensors files: a strict header parser, zero-copy loading and saving.

A safetensors file is an 8-byte little-endian header length N, N bytes of
JSON describing every tensor (dtype, shape and ``data_offsets`` relative to
the end of the header), then the data. Loading maps the file once and makes
one zero-copy view per tensor, so opening costs O(header) whatever the size
of the weights. Files larger than the device's maximum buffer length are
mapped as a few windows chosen so that every tensor lies wholly inside one.

The parser treats the file as untrusted input: every way a header can lie
(truncation, lengths beyond the file, bad JSON, unknown dtypes, offsets out
of range, overlapping or misaligned tensors, shapes that disagree with
their byte ranges) raises SafetensorsError naming the file, the tensor and
the limit, before any view is made.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

from mlxbuf.dtypes import DType, as_dtype
from mlxbuf.errors import InvalidArgument

if TYPE_CHECKING:
    from numpy.typing import NDArray

    from mlxbuf.buffer import Buffer
    from mlxbuf.device import Device

__all__ = [
    "SafetensorsError",
    "TensorEntry",
    "SafetensorsHeader",
    "SAFETENSORS_DTYPES",
    "MAX_HEADER_BYTES",
    "parse_header",
    "read_header",
    "safetensors_metadata",
    "plan_windows",
    "load_safetensors",
    "save_safetensors",
]

# The safetensors reference implementation refuses headers above 100 MB; a
# larger length is a corrupt or hostile file, and reading it would cost
# that much memory before any check could fail.
MAX_HEADER_BYTES = 100_000_000

SAFETENSORS_DTYPES = {
    "F64": DType.F64,
    "F32": DType.F32,
    "F16": DType.F16,
    "BF16": DType.BF16,
    "I64": DType.I64,
    "I32": DType.I32,
    "I16": DType.I16,
    "I8": DType.I8,
    "U64": DType.U64,
    "U32": DType.U32,
    "U16": DType.U16,
    "U8": DType.U8,
    "BOOL": DType.BOOL,
}
_NAME_OF = {dt: name for name, dt in SAFETENSORS_DTYPES.items()}
_ENTRY_KEYS = frozenset(("dtype", "shape", "data_offsets"))
_METADATA_KEY = "__metadata__"


class SafetensorsError(InvalidArgument):
    """A malformed safetensors file; the message names the file, the tensor and the problem.

    ``path`` is the file (or ``"<bytes>"``), ``tensor`` the tensor at fault
    or None.
    """

    def __init__(
        self, message: str = "", path: str | None = None, tensor: str | None = None, **context: Any
    ) -> None:
        super().__init__(message, **context)
        self.path = path
        self.tensor = tensor


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors header.

    ``begin``/``end`` are byte offsets from the start of the data section
    (the file offset of the data section is ``SafetensorsHeader.data_start``).
    Immutable; safe to share between threads.
    """

    name: str
    dtype: DType
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor's data."""
        return self.end - self.begin


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated safetensors header.

    ``tensors`` keeps the file's order; ``metadata`` is the ``__metadata__``
    string map or None. Immutable; safe to share between threads.
    """

    header_len: int
    file_size: int
    tensors: tuple[TensorEntry, ...]
    metadata: dict[str, str] | None

    @property
    def data_start(self) -> int:
        """File offset of the data section (8 + header length)."""
        return 8 + self.header_len

    @property
    def data_len(self) -> int:
        """Bytes from the data section's start to the end of the file."""
        return self.file_size - self.data_start

    def __getitem__(self, name: str) -> TensorEntry:
        for entry in self.tensors:
            if entry.name == name:
                return entry
        raise KeyError(name)


def _shape_ok(shape: object) -> bool:
    return isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not valid JSON")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"duplicate key {key!r}")
        seen[key] = value
    return seen


def parse_header(
    prefix: bytes | bytearray | memoryview, file_size: int, *, path: str = "<bytes>"
) -> SafetensorsHeader:
    """Validate a safetensors header and return a SafetensorsHeader.

    ``prefix`` holds at least the file's first ``8 + N`` bytes (more is
    ignored) and ``file_size`` is the whole file's size. Raises
    SafetensorsError for every malformed header.
    """

    def fail(message: str, tensor: str | None = None) -> SafetensorsError:
        where = f"tensor {tensor!r}: " if tensor is not None else ""
        return SafetensorsError(f"{path}: {where}{message}", path=path, tensor=tensor)

    if file_size < 8 or len(prefix) < 8:
        raise fail(f"truncated file of {file_size} bytes: the 8-byte header length is missing")
    (header_len,) = struct.unpack_from("<Q", prefix, 0)
    if header_len > MAX_HEADER_BYTES:
        raise fail(f"header length {header_len} exceeds the {MAX_HEADER_BYTES}-byte limit")
    if 8 + header_len > file_size:
        raise fail(f"header length {header_len} goes beyond the file: only {file_size - 8} bytes follow the length")
    if len(prefix) < 8 + header_len:
        raise fail(f"truncated header: {len(prefix) - 8} of {header_len} bytes")
    raw = bytes(prefix[8 : 8 + header_len])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise fail(f"header is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        doc = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise fail(f"header is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except ValueError as exc:
        raise fail(f"header is not valid JSON: {exc}") from None
    except RecursionError:
        raise fail("header is not valid JSON: nested too deeply") from None
    if not isinstance(doc, dict):
        raise fail(f"header must be a JSON object, not {type(doc).__name__}")

    data_len = file_size - 8 - header_len
    data_start = 8 + header_len
    metadata: dict[str, str] | None = None
    entries = []
    for name, info in doc.items():
        if name == _METADATA_KEY:
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise fail(f"{_METADATA_KEY} must map strings to strings")
            metadata = dict(info)
            continue
        if not isinstance(info, dict):
            raise fail(f"entry must be a JSON object, not {type(info).__name__}", name)
        missing = _ENTRY_KEYS - info.keys()
        if missing:
            raise fail(f"entry lacks {', '.join(sorted(missing))}", name)
        extra = info.keys() - _ENTRY_KEYS
        if extra:
            raise fail(f"entry has unknown keys {', '.join(sorted(extra))}", name)
        dtype_name = info["dtype"]
        dtype = SAFETENSORS_DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
        if dtype is None:
            known = " ".join(SAFETENSORS_DTYPES)
            raise fail(f"unsupported dtype {dtype_name!r} (mlxbuf reads {known})", name)
        shape = info["shape"]
        if not _shape_ok(shape):
            raise fail(f"shape {shape!r} is not a list of non-negative integers", name)
        offsets = info["data_offsets"]
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            raise fail(f"data_offsets {offsets!r} is not a pair of integers", name)
        begin, end = offsets
        if begin < 0 or end < begin:
            raise fail(f"data_offsets [{begin}, {end}] are not an ordered pair of non-negative offsets", name)
        if end > data_len:
            raise fail(f"data_offsets [{begin}, {end}] go beyond the {data_len}-byte data section", name)
        expected = math.prod(shape) * dtype.size
        if end - begin != expected:
            raise fail(
                f"shape {tuple(shape)} of {_NAME_OF[dtype]} needs {expected} bytes "
                f"but data_offsets [{begin}, {end}] hold {end - begin}",
                name,
            )
        if (data_start + begin) % dtype.size:
            raise fail(
                f"{_NAME_OF[dtype]} data at file byte {data_start + begin} is not aligned to its "
                f"{dtype.size}-byte elements",
                name,
            )
        entries.append(TensorEntry(name, dtype, tuple(shape), begin, end))

    previous = None
    for entry in sorted((e for e in entries if e.nbytes), key=lambda e: (e.begin, e.end)):
        if previous is not None and entry.begin < previous.end:
            raise fail(
                f"bytes [{entry.begin}, {entry.end}) overlap tensor {previous.name!r} at "
                f"[{previous.begin}, {previous.end})",
                entry.name,
            )
        previous = entry
    return SafetensorsHeader(header_len, file_size, tuple(entries), metadata)


def _read_header_fd(fd: int, path: str) -> SafetensorsHeader:
    size = os.fstat(fd).st_size
    prefix = os.pread(fd, 8, 0)
    if len(prefix) == 8:
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len <= MAX_HEADER_BYTES and 8 + header_len <= size:
            prefix += os.pread(fd, header_len, 8)
    return parse_header(prefix, size, path=path)


def read_header(path: str | os.PathLike[str]) -> SafetensorsHeader:
    """Read and validate the header of the safetensors file at ``path``.

    Reads only the header, never the data. Raises SafetensorsError for a
    malformed header and FileNotFoundError/OSError when the file cannot be
    read.
    """
    path = os.fspath(path)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        return _read_header_fd(fd, path)
    finally:
        os.close(fd)


def safetensors_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The ``__metadata__`` string map of a safetensors file ({} when it has none)."""
    return dict(read_header(path).metadata or {})


def plan_windows(
    ranges: Sequence[tuple[int, int]], max_len: int, page_size: int
) -> tuple[list[tuple[int, int]], list[int]]:
    """Cover byte ranges with as few mappable windows as possible.

    ``ranges`` is a list of ``(start, end)`` file offsets (end > start).
    Returns ``(windows, assignment)``: windows are ``(start, end)`` with a
    page-aligned start and ``round_up(end, page_size) - start <= max_len``
    (the bytes a Metal buffer over the pages really spans), and
    ``assignment[i]`` is the window that wholly contains ``ranges[i]``.
    Windows are grown greedily in file order, so the usual file (smaller
    than max_len) gets one window. Raises InvalidArgument for a range that
    no window can hold.
    """
    if max_len < page_size:
        raise InvalidArgument(f"window limit of {max_len} bytes is below the {page_size}-byte page")

    def span(start: int, end: int) -> int:
        return -(-end // page_size) * page_size - start

    order = sorted(range(len(ranges)), key=lambda i: ranges[i])
    windows: list[tuple[int, int]]
    assignment: list[Any]  # None until each range is placed below; ints on return
    windows, assignment = [], [None] * len(ranges)
    for i in order:
        start, end = ranges[i]
        if windows:
            w_start, w_end = windows[-1]
            if span(w_start, max(w_end, end)) <= max_len:
                windows[-1] = (w_start, max(w_end, end))
                assignment[i] = len(windows) - 1
                continue
        w_start = start - start % page_size
        if span(w_start, end) > max_len:
            raise InvalidArgument(
                f"{end - start} bytes at file offset {start} cannot fit in one buffer: "
                f"the device's maximum buffer length is {max_len} bytes"
            )
        windows.append((w_start, end))
        assignment[i] = len(windows) - 1
    return windows, assignment


def load_safetensors(
    path: str | os.PathLike[str], device: Device | None = None, *, _max_window: int | None = None
) -> dict[str, Buffer]:
    """Load every tensor of a safetensors file as a zero-copy Buffer.

    Returns ``{name: Buffer}`` in the file's order, each with the tensor's
    dtype and shape, all views of one read-only mapping of the file (or of
    a few windows when the file is larger than the device's maximum buffer
    length). Nothing is read beyond the header until a tensor is touched.
    ``device`` defaults to ``mlxbuf.default_device()``. Raises
    SafetensorsError for a malformed file. The file must not be truncated
    while its buffers are alive (the mapping would fault); save_safetensors
    replaces files atomically, so saving over a loaded file is safe.
    """
    from mlxbuf.mapping import map_fd

    from mlxbuf.device import Device, default_device

    if device is None:
        device = default_device()
    elif not isinstance(device, Device):
        raise InvalidArgument(f"load_safetensors needs a Device (or None), got device={device!r}")
    path = os.fspath(path)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        header = _read_header_fd(fd, path)
        data_start = header.data_start
        entries = header.tensors
        ranges = [(data_start + e.begin, data_start + e.end) for e in entries if e.nbytes]
        max_len = _max_window if _max_window is not None else device.max_buffer_length
        if ranges and header.file_size <= max_len:
            windows, assignment = [(0, header.file_size)], [0] * len(ranges)
        elif ranges:
            windows, assignment = plan_windows(ranges, max_len, device.page_size)
        else:
            windows, assignment = [], []
        mapped = [
            map_fd(device, fd, start, min(end, header.file_size) - start, writable=False, path=path)
            for start, end in windows
        ]
    finally:
        os.close(fd)

    out = {}
    k = 0
    for entry in entries:
        if entry.nbytes:
            (w_start, _), base = windows[assignment[k]], mapped[assignment[k]]
            k += 1
            view = base.slice_view(data_start + entry.begin - w_start, entry.nbytes)
        elif mapped:
            view = mapped[0].slice_view(0, 0)
        else:
            # No bytes anywhere to map: a tiny allocation carries the
            # zero-element shape.
            view = device.alloc_buffer(entry.dtype.size, "u8", (0,))
        out[entry.name] = view.view(entry.dtype, entry.shape)
    return out


def _tensor_bytes(name: str, value: object) -> tuple[DType, tuple[int, ...], Any]:
    """(DType, shape, bytes-like) of a Buffer or numpy array to save."""
    import numpy as np

    from mlxbuf.buffer import Buffer

    if isinstance(value, Buffer):
        value.wait_idle()
        return value.dtype, tuple(value.shape), value.as_slice("u8")
    if isinstance(value, np.ndarray):
        dtype = as_dtype(value.dtype if value.dtype.isnative else value.dtype.newbyteorder("="))
        array = np.ascontiguousarray(value)
        if not array.dtype.isnative:
            array = array.astype(array.dtype.newbyteorder("="))
        # ascontiguousarray makes 0-d arrays 1-d: the shape comes from value.
        return dtype, tuple(value.shape), array.reshape(-1).view(np.uint8)
    raise TypeError(f"tensor {name!r} is a {type(value).__name__}: save_safetensors takes Buffers or numpy arrays")


def save_safetensors(
    path: str | os.PathLike[str],
    tensors: Mapping[str, Buffer | NDArray[Any]],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write ``{name: Buffer or numpy array}`` to a safetensors file.

    Tensors are laid out by decreasing element size so that every tensor is
    aligned to its element size (the header is padded to 8 bytes), as the
    safetensors package does. ``metadata`` (str -> str) becomes the
    ``__metadata__`` entry. Waits for submitted command buffers that write
    the buffers. The file is written beside ``path`` and renamed over it,
    so buffers still mapping an older version of the file stay valid.
    """
    path = os.fspath(path)
    if metadata is not None:
        if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
        ):
            raise InvalidArgument("metadata must map strings to strings")
    if not isinstance(tensors, Mapping):
        raise TypeError(f"save_safetensors takes a dict of name -> Buffer or numpy array, got {tensors!r}")
    items = []
    for name, value in tensors.items():
        if not isinstance(name, str):
            raise InvalidArgument(f"tensor name {name!r} is not a string")
        if name == _METADATA_KEY:
            raise InvalidArgument(f"{_METADATA_KEY!r} is reserved for metadata and cannot name a tensor")
        dtype, shape, data = _tensor_bytes(name, value)
        items.append((name, dtype, shape, data))
    items.sort(key=lambda item: -item[1].size)

    header: dict[str, dict[str, Any]] = {}
    if metadata:
        header[_METADATA_KEY] = dict(metadata)
    offset = 0
    for name, dtype, shape, data in items:
        nbytes = len(memoryview(data).cast("B"))
        header[name] = {"dtype": _NAME_OF[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)

    tmp = f"{path}.tmp-{os.getpid()}-{id(items):x}"
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(text)))
            f.write(text)
            for _, _, _, data in items:
                f.write(memoryview(data).cast("B"))
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
