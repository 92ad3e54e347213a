"""safetensors files: a strict header parser, zero-copy loading and saving.

A safetensors file is an 8-byte little-endian header length N, N bytes of
JSON describing every tensor (dtype, shape and ``data_offsets`` relative to
the end of the header), then the data. Loading maps the file once and makes
one zero-copy view per tensor, so opening costs O(header) whatever the size
of the weights. Files larger than the device's maximum buffer length are
mapped as a few windows chosen so that every tensor lies wholly inside one.

The parser treats the file as untrusted input and refuses whatever the
reference reader (the ``safetensors`` package) refuses: truncation, lengths
beyond the file, invalid JSON or UTF-8, lone surrogates, unknown dtypes,
dimensions that are not non-negative 64-bit integers (and empty shapes
no array can have, e.g. [2**64, 0]), offsets out of range,
shapes that disagree with their byte ranges, and a data section that the
tensors do not tile exactly (no hole, no overlap, no trailing byte; an empty
tensor sits where the previous one ends). It is stricter in three places:
duplicate JSON keys, unknown keys in an entry and tensors not aligned to
their element size are refused too. Every failure raises SafetensorsError
naming the file, the tensor or byte offset, and the limit, before any view
is made.

The usual header (the form writers produce) is read by a scanner in C
(cmetal/safetensors.c) in one pass; anything else, valid or not, goes to
the Python parser here, which alone accepts unusual headers and words every
error.
"""

from __future__ import annotations

import fcntl
import gc
import json
import os
import re
import secrets
import stat
import struct
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np
from numpy.typing import NDArray

from mlxbuf._cmetal import ffi, lib
from mlxbuf.buffer import empty_shape_problem
from mlxbuf.dtypes import DType, as_dtype
from mlxbuf.errors import InvalidArgument, check, file_errors, not_a_regular_file

if TYPE_CHECKING:
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
_DTYPE_AND_SIZE = {name: (dt, dt.size) for name, dt in SAFETENSORS_DTYPES.items()}
_ENTRY_KEYS = ("dtype", "shape", "data_offsets")
_METADATA_KEY = "__metadata__"
# A JSON \u escape of a UTF-16 surrogate: only these can put a lone
# surrogate into a decoded string (raw surrogates are invalid UTF-8).
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abcdefABCDEF]")


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


class SafetensorsHeader:
    """A validated safetensors header.

    ``tensors`` keeps the file's order; ``metadata`` is the ``__metadata__``
    string map or None. The per-tensor fields are kept as parallel lists
    (``names``, ``dtypes``, ``shapes``, ``begins``, ``ends``): a header of a
    million tensors then costs a few lists, and ``tensors`` makes the
    TensorEntry objects only when asked. Immutable; safe to share between
    threads.
    """

    __slots__ = ("header_len", "file_size", "metadata", "names", "dtypes", "shapes", "begins", "ends",
                 "_entries", "_index")

    def __init__(
        self,
        header_len: int,
        file_size: int,
        names: list[str],
        dtypes: list[DType],
        shapes: list[tuple[int, ...]],
        begins: list[int],
        ends: list[int],
        metadata: dict[str, str] | None,
    ) -> None:
        self.header_len = header_len
        self.file_size = file_size
        self.names = names
        self.dtypes = dtypes
        self.shapes = shapes
        self.begins = begins
        self.ends = ends
        self.metadata = metadata
        self._entries: tuple[TensorEntry, ...] | None = None
        self._index: dict[str, int] | None = None

    @property
    def data_start(self) -> int:
        """File offset of the data section (8 + header length)."""
        return 8 + self.header_len

    @property
    def data_len(self) -> int:
        """Bytes from the data section's start to the end of the file."""
        return self.file_size - self.data_start

    @property
    def tensors(self) -> tuple[TensorEntry, ...]:
        """Every tensor as a TensorEntry, in the file's order."""
        if self._entries is None:
            self._entries = tuple(map(TensorEntry, self.names, self.dtypes, self.shapes, self.begins, self.ends))
        return self._entries

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, name: str) -> TensorEntry:
        if self._index is None:
            self._index = {n: i for i, n in enumerate(self.names)}
        i = self._index[name]
        return TensorEntry(name, self.dtypes[i], self.shapes[i], self.begins[i], self.ends[i])

    def __repr__(self) -> str:
        return f"SafetensorsHeader({len(self.names)} tensors, {self.file_size}-byte file)"


class _Pairs(list):  # type: ignore[type-arg]
    """A JSON object as its (key, value) pairs in file order: a dict would
    merge duplicate keys silently, and a list subclass tells an object from
    an array."""

    __slots__ = ()


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not valid JSON")


@contextmanager
def _gc_paused() -> Iterator[None]:
    """No cyclic garbage collection inside the block.

    Parsing a large header creates millions of containers (and loading as
    many Buffers), none of them garbage: the collections their allocation
    triggers walk them again and again (the full ones all of them), which
    made json.loads of a million-tensor header more than twice as slow.
    The collector is process-wide: another thread only sees its
    collections delayed until the block ends.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _json_kind(value: object) -> str:
    return "object" if type(value) is _Pairs else type(value).__name__


def _lone_surrogate(text: str) -> str | None:
    """The first lone UTF-16 surrogate in ``text`` as ``\\uXXXX``, else None:
    such a string is not Unicode text, cannot be encoded as UTF-8, and the
    reference reader refuses it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"\\u{ord(text[exc.start]):04x}"
    return None


def _refuse_lone_surrogates(names: list[str], metadata: dict[str, str] | None, fail: Any) -> None:
    for name in names:
        bad = _lone_surrogate(name)
        if bad:
            raise fail(f"the name holds a lone surrogate ({bad}): not valid Unicode", name)
    for key, value in (metadata or {}).items():
        bad = _lone_surrogate(key) or _lone_surrogate(value)
        if bad:
            raise fail(f"{_METADATA_KEY} entry {key!r} holds a lone surrogate ({bad}): not valid Unicode")


def _metadata(info: object, fail: Any) -> dict[str, str] | None:
    """The ``__metadata__`` map (None for JSON null, as the reference reads it)."""
    if info is None:
        return None
    if type(info) is not _Pairs or not all(type(v) is str for _, v in info):
        raise fail(f"{_METADATA_KEY} must map strings to strings")
    metadata = dict(info)
    if len(metadata) != len(info):
        raise fail(f"{_METADATA_KEY} has a duplicate key")
    return metadata


def _entry_fields(info: list[tuple[str, Any]], name: str, fail: Any) -> tuple[Any, Any, Any]:
    """(dtype, shape, data_offsets) of an entry whose keys are not the usual
    three in the usual order: any order is fine, anything else is not."""
    fields = dict(info)
    if len(fields) != len(info):
        dup = next(k for i, (k, _) in enumerate(info) if any(k == other for other, _ in info[:i]))
        raise fail(f"entry has a duplicate key {dup!r}", name)
    missing = [k for k in _ENTRY_KEYS if k not in fields]
    if missing:
        raise fail(f"entry lacks {', '.join(sorted(missing))}", name)
    extra = sorted(k for k in fields if k not in _ENTRY_KEYS)
    if extra:
        raise fail(f"entry has unknown keys {', '.join(extra)}", name)
    return fields["dtype"], fields["shape"], fields["data_offsets"]


def _refuse_duplicates(names: list[str], fail: Any) -> NoReturn:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise fail(f"duplicate key {name!r}")
        seen.add(name)
    raise AssertionError("_refuse_duplicates called without a duplicate")


def _check_tiling(names: list[str], begins: list[int], ends: list[int], fail: Any) -> int:
    """Sort the tensors by (begin, end), as the reference reader does, and
    check that each begins where the previous one ends; return the end of
    the last one."""
    pos = previous = 0
    for begin, end, i in sorted(zip(begins, ends, range(len(names)))):
        if begin > pos:
            raise fail(f"data bytes [{pos}, {begin}) before it belong to no tensor", names[i])
        if begin < pos:  # never for the first: pos starts at 0
            other = f"tensor {names[previous]!r} at [{begins[previous]}, {ends[previous]})"
            if begin == end:
                raise fail(f"this empty tensor at data offset {begin} lies inside {other}: it must sit "
                           f"where a tensor ends", names[i])
            raise fail(f"bytes [{begin}, {end}) overlap {other}", names[i])
        pos, previous = end, i
    return pos


def _failer(path: str) -> Any:
    """The function that makes this file's SafetensorsError (naming the tensor when given)."""

    def fail(message: str, tensor: str | None = None) -> SafetensorsError:
        where = f"tensor {tensor!r}: " if tensor is not None else ""
        return SafetensorsError(f"{path}: {where}{message}", path=path, tensor=tensor)

    return fail


def _check_header_len(header_len: int, file_size: int, fail: Any) -> None:
    if header_len > MAX_HEADER_BYTES:
        raise fail(f"header length {header_len} exceeds the {MAX_HEADER_BYTES}-byte limit")
    if 8 + header_len > file_size:
        raise fail(f"header length {header_len} goes beyond the file: only {file_size - 8} bytes follow the length")


def parse_header(
    prefix: bytes | bytearray | memoryview, file_size: int, *, path: str = "<bytes>"
) -> SafetensorsHeader:
    """Validate a safetensors header and return a SafetensorsHeader.

    ``prefix`` holds at least the file's first ``8 + N`` bytes (more is
    ignored) and ``file_size`` is the whole file's size. Raises
    SafetensorsError for every malformed header.
    """
    fail = _failer(path)
    if file_size < 8 or len(prefix) < 8:
        raise fail(f"truncated file of {file_size} bytes: the 8-byte header length is missing")
    (header_len,) = struct.unpack_from("<Q", prefix, 0)
    _check_header_len(header_len, file_size, fail)
    if len(prefix) < 8 + header_len:
        raise fail(f"truncated header: {len(prefix) - 8} of {header_len} bytes")
    return _parse_json(memoryview(prefix)[8 : 8 + header_len], header_len, file_size, fail)


def _parse_json(raw: bytes | bytearray | memoryview, header_len: int, file_size: int, fail: Any) -> SafetensorsHeader:
    try:
        text = str(raw, "utf-8")
    except UnicodeDecodeError as exc:
        raise fail(f"header is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    with _gc_paused():
        if _FAST_SCAN:
            header = _scan(raw, text, header_len, file_size, fail)
            if header is not None:
                return header
        return _parse_text(text, header_len, file_size, fail)


# The C scanner (cmetal/safetensors.c) reads the usual header in one pass
# and gives up on anything else, which the Python parser below then reads:
# it accepts nothing the Python parser would refuse (tests compare them).
# False sends every header through the Python parser.
_FAST_SCAN = True
_TENSOR_FIELDS = ("name_offset", "name_length", "begin", "end", "dims_index", "ndim", "dtype")


def _tensor_record() -> np.dtype[Any]:
    """cm_safetensors_tensor_t as a numpy record, laid out by cffi's offsets."""
    c_type = "cm_safetensors_tensor_t"
    formats = [np.uint64] * 5 + [np.uint32] * 2
    offsets = [ffi.offsetof(c_type, name) for name in _TENSOR_FIELDS]
    return np.dtype({"names": _TENSOR_FIELDS, "formats": formats, "offsets": offsets,
                     "itemsize": ffi.sizeof(c_type)})


_TENSOR_RECORD = _tensor_record()
_SCAN_DTYPES = tuple(
    SAFETENSORS_DTYPES[ffi.string(lib.cm_safetensors_dtype_name(i)).decode()]
    for i in range(lib.CM_SAFETENSORS_DTYPE_COUNT)
)


def _shape_tuples(
    dims: NDArray[np.int64], first: NDArray[np.uint64], ndim: NDArray[np.uint32]
) -> list[tuple[int, ...]]:
    """Each tensor's dimensions as a tuple: per rank, zip() over columns
    builds the tuples in C (a tuple(...) per tensor costs twice as much)."""
    n = len(ndim)
    ranks = np.unique(ndim).tolist()
    if ranks == [0]:
        return [()] * n
    shapes: list[tuple[int, ...]] = [()] * n
    for rank in ranks:
        which = np.flatnonzero(ndim == rank)
        if rank == 0:
            continue
        base = first[which].astype(np.int64)
        tuples = list(zip(*(dims[base + j].tolist() for j in range(rank))))
        if len(which) == n:
            return tuples
        for i, shape in zip(which.tolist(), tuples):
            shapes[i] = shape
    return shapes


def _scan(
    raw: bytes | bytearray | memoryview, text: str, header_len: int, file_size: int, fail: Any
) -> SafetensorsHeader | None:
    """The header from the C scanner, or None when it gave up (the Python
    parser then decides). Builds the same lists the Python parser does."""
    data_start = 8 + header_len
    out = ffi.new("cm_safetensors_scan_t **")
    status = lib.cm_safetensors_scan(ffi.from_buffer(raw), header_len, data_start, file_size - data_start, out)
    if status == lib.CM_ERR_UNSUPPORTED:
        return None
    check(status)
    scan = ffi.gc(out[0], lib.cm_safetensors_scan_release)
    n = scan.count
    records = np.frombuffer(ffi.buffer(scan.tensors, n * _TENSOR_RECORD.itemsize), dtype=_TENSOR_RECORD)
    starts = records["name_offset"]
    # map() over slices: the per-name work stays in C.
    names = list(map(text.__getitem__, map(slice, starts.tolist(), (starts + records["name_length"]).tolist())))
    if len(set(names)) != n:
        return None  # a duplicate name: the Python parser names it
    dims = np.frombuffer(ffi.buffer(scan.dims, scan.dims_count * 8), dtype=np.int64)
    shapes = _shape_tuples(dims, records["dims_index"], records["ndim"])
    dtypes = list(map(_SCAN_DTYPES.__getitem__, records["dtype"].tolist()))
    begins, ends = records["begin"].tolist(), records["end"].tolist()
    span = None
    if scan.metadata_offset >= 0:
        span = text[scan.metadata_offset : scan.metadata_offset + scan.metadata_length]
    del records
    ffi.release(scan)
    metadata = None
    if span is not None:
        try:
            value = json.loads(span, object_pairs_hook=_Pairs, parse_constant=_reject_constant)
        except ValueError:
            return None
        metadata = _metadata(value, fail)
        if _SURROGATE_ESCAPE.search(span):
            _refuse_lone_surrogates([], metadata, fail)
    return SafetensorsHeader(header_len, file_size, names, dtypes, shapes, begins, ends, metadata)


def _parse_text(text: str, header_len: int, file_size: int, fail: Any) -> SafetensorsHeader:
    try:
        doc = json.loads(text, object_pairs_hook=_Pairs, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise fail(f"header is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except ValueError as exc:
        raise fail(f"header is not valid JSON: {exc}") from None
    except RecursionError:
        raise fail("header is not valid JSON: nested too deeply") from None
    if type(doc) is not _Pairs:
        raise fail(f"header must be a JSON object, not {_json_kind(doc)}")
    escaped_surrogates = _SURROGATE_ESCAPE.search(text) is not None
    del text
    if len({key for key, _ in doc}) != len(doc):
        _refuse_duplicates([key for key, _ in doc], fail)

    data_start = 8 + header_len
    data_len = file_size - data_start
    names: list[str] = []
    dtypes: list[DType] = []
    shapes: list[tuple[int, ...]] = []
    begins: list[int] = []
    ends: list[int] = []
    metadata: dict[str, str] | None = None
    dtype_of = _DTYPE_AND_SIZE
    # The reference reader sorts tensors by (begin, end) and then needs
    # each to begin where the previous ends. Writers lay tensors out in
    # file order, so that check runs here as the entries go by, and the
    # sort only for a file whose order differs.
    pos = 0
    in_order = True
    for i, (name, info) in enumerate(doc):
        # Drop each entry's parsed JSON once read: the peak stays one
        # header's worth of objects, not two.
        doc[i] = None
        if name == _METADATA_KEY:
            metadata = _metadata(info, fail)
            continue
        if type(info) is not _Pairs:
            raise fail(f"entry must be a JSON object, not {_json_kind(info)}", name)
        if len(info) == 3 and info[0][0] == "dtype" and info[1][0] == "shape" and info[2][0] == "data_offsets":
            dtype_name, shape, offsets = info[0][1], info[1][1], info[2][1]
        else:
            dtype_name, shape, offsets = _entry_fields(info, name, fail)
        try:
            dt, size = dtype_of[dtype_name]
        except (KeyError, TypeError):
            known = " ".join(dtype_of)
            raise fail(f"unsupported dtype {dtype_name!r} (mlxbuf reads {known})", name) from None
        if type(shape) is not list:
            raise fail(f"shape {shape!r} is not a list of non-negative integers", name)
        count = 1
        for d in shape:
            if type(d) is not int or d < 0:
                raise fail(f"shape {shape!r} is not a list of non-negative integers", name)
            count *= d
        if count == 0:
            problem = empty_shape_problem(tuple(shape))
            if problem:
                raise fail(problem, name)
        if type(offsets) is not list or len(offsets) != 2:
            raise fail(f"data_offsets {offsets!r} is not a pair of integers", name)
        begin, end = offsets
        if type(begin) is not int or type(end) is not int:
            raise fail(f"data_offsets {offsets!r} is not a pair of integers", name)
        if begin < 0 or end < begin:
            raise fail(f"data_offsets [{begin}, {end}] are not an ordered pair of non-negative offsets", name)
        if end > data_len:
            raise fail(f"data_offsets [{begin}, {end}] go beyond the {data_len}-byte data section", name)
        if end - begin != count * size:
            raise fail(
                f"shape {tuple(shape)} of {_NAME_OF[dt]} needs {count * size} bytes "
                f"but data_offsets [{begin}, {end}] hold {end - begin}",
                name,
            )
        if size > 1 and (data_start + begin) % size:
            raise fail(
                f"{_NAME_OF[dt]} data at file byte {data_start + begin} is not aligned to its "
                f"{size}-byte elements",
                name,
            )
        if begin != pos:
            in_order = False
        pos = end
        names.append(name)
        dtypes.append(dt)
        shapes.append(tuple(shape))
        begins.append(begin)
        ends.append(end)
    del doc

    if not in_order:
        pos = _check_tiling(names, begins, ends, fail)
    if pos != data_len:
        raise fail(
            f"{data_len - pos} bytes at data offset {pos} (file byte {data_start + pos}) belong to no "
            f"tensor: the tensors must cover the {data_len}-byte data section exactly"
        )
    if escaped_surrogates:
        _refuse_lone_surrogates(names, metadata, fail)
    return SafetensorsHeader(header_len, file_size, names, dtypes, shapes, begins, ends, metadata)


def _read_header_fd(fd: int, size: int, path: str) -> SafetensorsHeader:
    fail = _failer(path)
    with file_errors(path, "cannot read"):
        prefix = os.pread(fd, 8, 0)
    if size < 8 or len(prefix) < 8:
        raise fail(f"truncated file of {size} bytes: the 8-byte header length is missing")
    (header_len,) = struct.unpack("<Q", prefix)
    _check_header_len(header_len, size, fail)
    raw = bytearray(header_len)
    view = memoryview(raw)
    got = 0
    with file_errors(path, "cannot read"):
        # preadv may return less than asked (a signal, a huge read).
        while got < header_len:
            n = os.preadv(fd, [view[got:]], 8 + got)
            if n == 0:
                raise fail(f"truncated header: {got} of {header_len} bytes (the file shrank while read)")
            got += n
    view.release()
    return _parse_json(raw, header_len, size, fail)


def read_header(path: str | os.PathLike[str]) -> SafetensorsHeader:
    """Read and validate the header of the safetensors file at ``path``.

    Reads only the header, never the data. Raises SafetensorsError for a
    malformed header and FileError (also the matching FileNotFoundError,
    PermissionError, ...) when the path cannot be read or is not a regular
    file.
    """
    from mlxbuf.mapping import open_regular_file

    path = os.fspath(path)
    fd, size = open_regular_file(path)
    try:
        return _read_header_fd(fd, size, path)
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
    SafetensorsError for a malformed file and FileError (also the matching
    FileNotFoundError, PermissionError, ...) when the path cannot be read or
    is not a regular file. The file must not be truncated while its buffers
    are alive (the mapping would fault); save_safetensors replaces files
    atomically, so saving over a loaded file is safe.
    """
    from mlxbuf.device import Device, default_device
    from mlxbuf.mapping import map_fd, open_regular_file

    if device is None:
        device = default_device()
    elif not isinstance(device, Device):
        raise InvalidArgument(f"load_safetensors needs a Device (or None), got device={device!r}")
    path = os.fspath(path)
    fd, size = open_regular_file(path)
    try:
        header = _read_header_fd(fd, size, path)
        data_start, file_size = header.data_start, header.file_size
        max_len = _max_window if _max_window is not None else device.max_buffer_length
        nonempty: list[int] = []
        assignment: list[int] = []
        if len(header) and file_size <= max_len:
            windows = [(0, file_size)]
        else:
            nonempty = [i for i, (b, e) in enumerate(zip(header.begins, header.ends)) if e > b]
            ranges = [(data_start + header.begins[i], data_start + header.ends[i]) for i in nonempty]
            windows, assignment = plan_windows(ranges, max_len, device.page_size) if ranges else ([], [])
        mapped = [
            map_fd(device, fd, start, min(end, file_size) - start, writable=False, path=path)
            for start, end in windows
        ]
    finally:
        os.close(fd)
    with _gc_paused():
        return _views(device, header, windows, mapped, nonempty, assignment)


def _views(
    device: Device,
    header: SafetensorsHeader,
    windows: list[tuple[int, int]],
    mapped: list[Buffer],
    nonempty: list[int],
    assignment: list[int],
) -> dict[str, Buffer]:
    """One view per tensor into the mapped windows (all sharing them)."""
    data_start = header.data_start
    names, dtypes, shapes, begins = header.names, header.dtypes, header.shapes, header.begins
    if not names:
        return {}
    if not assignment:
        # One window from byte 0: a tensor's view sits at its file offset.
        base = mapped[0] if mapped else device.alloc_buffer(8, "u8", (8,))
        # Views share the base's CPU-view owner: made once here rather than
        # once per tensor on first touch.
        base._memory()
        derive = base._derive
        if not mapped:
            # No window means no tensor holds a byte: a tiny allocation
            # carries the zero-element shapes.
            return {name: derive(dt, shape, 0) for name, dt, shape in zip(names, dtypes, shapes)}
        return dict(zip(names, map(derive, dtypes, shapes, map(data_start.__add__, begins))))
    window_of = dict(zip(nonempty, assignment))
    for buf in mapped:
        buf._memory()
    out = {}
    for i, (name, dt, shape, begin) in enumerate(zip(names, dtypes, shapes, begins)):
        w = window_of.get(i)
        if w is None:  # an empty tensor: any window carries its shape
            out[name] = mapped[0]._derive(dt, shape, 0)
        else:
            out[name] = mapped[w]._derive(dt, shape, data_start + begin - windows[w][0])
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
    the buffers.

    The file is replaced atomically: the data goes to a new file beside the
    target, which is renamed over it once complete, so buffers still mapping
    an older version stay valid and a reader never sees half a file. A
    process killed while saving leaves the target as it was and no
    temporary behind (on Linux the new file has no name until it is
    complete; elsewhere the next save to the same target removes the
    temporaries of dead saves). A symlink is followed: the file it points to
    is replaced and the link kept. The new file keeps the replaced file's
    permission bits (and owner and group where the process may set them).
    Raises FileError (also the matching FileNotFoundError, PermissionError,
    ...) when the file cannot be written or the target exists and is not a
    regular file, InvalidArgument for names or metadata the format cannot
    hold.
    """
    path = os.fspath(path)
    if metadata is not None:
        if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
        ):
            raise InvalidArgument("metadata must map strings to strings")
        for key, meta_value in metadata.items():
            bad = _lone_surrogate(key) or _lone_surrogate(meta_value)
            if bad:
                raise InvalidArgument(
                    f"metadata entry {key!r} holds a lone surrogate ({bad}): not valid Unicode, which "
                    f"safetensors headers must be"
                )
    if not isinstance(tensors, Mapping):
        raise TypeError(f"save_safetensors takes a dict of name -> Buffer or numpy array, got {tensors!r}")
    items = []
    for name, value in tensors.items():
        if not isinstance(name, str):
            raise InvalidArgument(f"tensor name {name!r} is not a string")
        if name == _METADATA_KEY:
            raise InvalidArgument(f"{_METADATA_KEY!r} is reserved for metadata and cannot name a tensor")
        bad = _lone_surrogate(name)
        if bad:
            raise InvalidArgument(
                f"tensor name {name!r} holds a lone surrogate ({bad}): not valid Unicode, which "
                f"safetensors headers must be"
            )
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
    header_bytes = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)
    if len(header_bytes) > MAX_HEADER_BYTES:
        raise InvalidArgument(
            f"the header of {len(items)} tensors takes {len(header_bytes)} bytes, beyond the {MAX_HEADER_BYTES}-byte "
            f"limit of safetensors readers: split the tensors over several files"
        )

    def write(f: Any) -> None:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for _, _, _, data in items:
            f.write(memoryview(data).cast("B"))

    _replace_atomically(path, write)


# ---- atomic replacement --------------------------------------------------------

# Named temporaries (where O_TMPFILE is missing) are "<target>.tmp-<hex>"
# beside the target; their writer holds an exclusive flock on them while it
# lives, so a temporary nobody locks belongs to a dead save.
_TMP_INFIX = ".tmp-"
_HAVE_O_TMPFILE = hasattr(os, "O_TMPFILE")


def _replace_atomically(path: str, write: Any) -> None:
    """Write a new file with ``write(f)`` and rename it over ``path`` (see
    save_safetensors for the guarantees)."""
    # Follow symlinks: the link stays, the file it names is replaced.
    target = os.path.realpath(path)
    directory, base = os.path.split(target)
    with file_errors(path, "cannot save to"):
        try:
            old = os.stat(target)
        except FileNotFoundError:
            old = None
        if old is not None and not stat.S_ISREG(old.st_mode):
            raise not_a_regular_file(path, old.st_mode, "cannot save to")
        _remove_dead_temporaries(directory, base)
        fd, tmp = _open_temporary(directory, base)
        try:
            if old is not None:
                _copy_owner_and_mode(fd, old)
            with open(fd, "wb", closefd=False) as f:
                write(f)
            if tmp is None:
                tmp = _link_temporary(fd, directory, base)
            os.replace(tmp, target)
            tmp = None
        finally:
            os.close(fd)
            if tmp is not None:
                _unlink_quietly(tmp)


def _open_temporary(directory: str, base: str) -> tuple[int, str | None]:
    """``(fd, name)`` of a new, exclusively locked file in ``directory``;
    name is None for an O_TMPFILE file, which has none until linked."""
    if _HAVE_O_TMPFILE:
        try:
            fd = os.open(directory or ".", os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o666)
        except OSError:
            pass  # the file system cannot (EOPNOTSUPP, EISDIR on old kernels)
        else:
            # linkat needs /proc to name the open file; without it, fall back.
            if os.path.exists(f"/proc/self/fd/{fd}"):
                fcntl.flock(fd, fcntl.LOCK_EX)
                return fd, None
            os.close(fd)
    while True:
        tmp = os.path.join(directory, f"{base}{_TMP_INFIX}{secrets.token_hex(8)}")
        try:
            fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_CLOEXEC", 0), 0o666)
        except FileExistsError:
            continue
        # A cleaner that opens it before this lock could remove it: then the
        # rename below fails and the save raises, leaving the target as it was.
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd, tmp


def _link_temporary(fd: int, directory: str, base: str) -> str:
    """Give the complete O_TMPFILE file a name beside the target (rename
    cannot take an unnamed file); the lock keeps cleaners away."""
    dir_fd = os.open(directory or ".", os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        while True:
            name = f"{base}{_TMP_INFIX}{secrets.token_hex(8)}"
            try:
                # A dir_fd makes os.link call linkat(AT_SYMLINK_FOLLOW), which
                # follows /proc's link to the open file; plain link() cannot.
                os.link(f"/proc/self/fd/{fd}", name, dst_dir_fd=dir_fd, follow_symlinks=True)
            except FileExistsError:
                continue
            return os.path.join(directory, name)
    finally:
        os.close(dir_fd)


def _copy_owner_and_mode(fd: int, old: os.stat_result) -> None:
    try:
        os.fchown(fd, old.st_uid, old.st_gid)
    except PermissionError:
        # Only root may give a file away; a group the user is in still works.
        try:
            os.fchown(fd, -1, old.st_gid)
        except PermissionError:
            pass
    # After chown, which clears the set-id bits.
    os.fchmod(fd, stat.S_IMODE(old.st_mode))


def _remove_dead_temporaries(directory: str, base: str) -> None:
    """Remove the temporaries of saves to the same target whose process
    died (its lock is gone); a live save keeps its lock and its file."""
    prefix = base + _TMP_INFIX
    try:
        names = [n for n in os.listdir(directory or ".") if n.startswith(prefix)]
    except OSError:
        return
    for name in names:
        stale = os.path.join(directory, name)
        try:
            flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
            fd = os.open(stale, flags)
        except OSError:
            continue
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a save in progress
            _unlink_quietly(stale)
        finally:
            os.close(fd)


def _unlink_quietly(name: str) -> None:
    try:
        os.unlink(name)
    except OSError:
        pass
