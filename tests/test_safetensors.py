"""safetensors: strict header parsing, zero-copy loading, saving, windows."""

import errno
import gc
import json
import os
import struct

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import mlxbuf
from mlxbuf.safetensors import (
    MAX_HEADER_BYTES,
    SafetensorsError,
    load_safetensors,
    parse_header,
    plan_windows,
    read_header,
    safetensors_metadata,
    save_safetensors,
)
from support import assert_names

try:
    import safetensors.numpy as st_numpy
except ImportError:  # pragma: no cover - depends on the environment
    st_numpy = None

needs_safetensors = pytest.mark.skipif(st_numpy is None, reason="the safetensors package is not installed")

NUMPY_DTYPES = ["f32", "f16", "f64", "u8", "u16", "u32", "u64", "i8", "i16", "i32", "i64", "bool"]


def make_file(header, data=b"", *, pad=True, raw_header=None):
    """Bytes of a safetensors file with the given header dict (or raw header bytes)."""
    text = raw_header if raw_header is not None else json.dumps(header).encode()
    if pad and raw_header is None:
        text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def sample_arrays():
    rng = np.random.default_rng(0)
    return {
        "w": rng.standard_normal((3, 5)).astype(np.float32),
        "b": np.arange(7, dtype=np.int64),
        "h": rng.standard_normal((2, 2, 2)).astype(np.float16),
        "mask": np.array([True, False, True]),
        "bytes": np.arange(5, dtype=np.uint8),
        "scalar": np.array(3.5, dtype=np.float64),
        "empty": np.zeros((0, 4), dtype=np.float32),
    }


# ---- loading and saving -------------------------------------------------------


def test_round_trip_contents_dtypes_shapes(device, tmp_path):
    arrays = sample_arrays()
    path = tmp_path / "m.safetensors"
    save_safetensors(path, arrays, metadata={"format": "np", "note": "ünïcode"})
    loaded = load_safetensors(path, device)
    assert list(loaded) == list(arrays) or set(loaded) == set(arrays)
    for name, array in arrays.items():
        buf = loaded[name]
        assert buf.device is device
        assert buf.shape == array.shape
        assert buf.dtype == mlxbuf.as_dtype(array.dtype)
        np.testing.assert_array_equal(buf.numpy(), array)
    assert safetensors_metadata(path) == {"format": "np", "note": "ünïcode"}


def test_loaded_tensors_are_views_of_one_read_only_mapping(device, tmp_path):
    arrays = sample_arrays()
    path = tmp_path / "m.safetensors"
    save_safetensors(path, arrays)
    header = read_header(path)
    loaded = load_safetensors(path, device)
    mapped = [loaded[e.name] for e in header.tensors if e.nbytes]
    storages = {int(mlxbuf._cmetal.ffi.cast("uintptr_t", b._storage)) for b in mapped}
    assert len(storages) == 1
    with open(path, "rb") as f:
        raw = f.read()
    for entry in header.tensors:
        if not entry.nbytes:
            continue
        buf = loaded[entry.name]
        assert buf.storage_kind == "mapped"
        assert not buf.writable
        # The view sits at the tensor's file offset inside the whole-file mapping.
        assert buf.byte_offset == header.data_start + entry.begin
        assert bytes(buf.memoryview()) == raw[header.data_start + entry.begin : header.data_start + entry.end]
        with pytest.raises(ValueError):
            buf.numpy()[...] = 0


def test_loading_costs_no_copy_and_mapping_outlives_the_dict(device, tmp_path):
    path = tmp_path / "m.safetensors"
    save_safetensors(path, {"a": np.arange(4096, dtype=np.float32)})
    before = device.stats().alloc_count
    loaded = load_safetensors(path, device)
    assert device.stats().alloc_count == before  # a mapping, not an allocation
    a = loaded.pop("a").numpy()
    del loaded
    gc.collect()
    np.testing.assert_array_equal(a, np.arange(4096, dtype=np.float32))


def test_save_buffers_and_views(device, tmp_path):
    buf = device.alloc_buffer(64, "i32", (16,))
    buf.numpy()[:] = np.arange(16)
    view = buf.slice_view(16, 8).view(shape=(2, 4))
    path = tmp_path / "v.safetensors"
    save_safetensors(path, {"whole": buf, "view": view})
    loaded = load_safetensors(path, device)
    np.testing.assert_array_equal(loaded["whole"].numpy(), np.arange(16))
    np.testing.assert_array_equal(loaded["view"].numpy(), np.arange(4, 12).reshape(2, 4))


def test_saved_tensors_are_aligned_and_header_padded(tmp_path):
    path = tmp_path / "a.safetensors"
    save_safetensors(path, {"u8": np.arange(3, dtype=np.uint8), "f64": np.ones(3), "i16": np.ones(5, np.int16)})
    header = read_header(path)
    assert header.data_start % 8 == 0
    for entry in header.tensors:
        assert (header.data_start + entry.begin) % entry.dtype.size == 0


def test_saving_over_a_loaded_file_keeps_old_buffers_valid(device, tmp_path):
    path = tmp_path / "m.safetensors"
    save_safetensors(path, {"x": np.full(1024, 1.0, np.float32)})
    old = load_safetensors(path, device)["x"]
    save_safetensors(path, {"x": np.full(10, 2.0, np.float32)})
    np.testing.assert_array_equal(old.numpy(), np.full(1024, 1.0, np.float32))
    np.testing.assert_array_equal(load_safetensors(path, device)["x"].numpy(), np.full(10, 2.0, np.float32))
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_save_waits_for_submitted_writers(device, tmp_path):
    buf = device.alloc_buffer(1 << 20, "u8", (1 << 20,))
    enc = device.command_encoder()
    enc.fill(buf, 0x5A)
    enc.commit()
    path = tmp_path / "w.safetensors"
    save_safetensors(path, {"b": buf})
    enc.wait()
    assert (load_safetensors(path, device)["b"].numpy() == 0x5A).all()


def test_only_empty_tensors(device, tmp_path):
    path = tmp_path / "e.safetensors"
    save_safetensors(path, {"e": np.zeros((0,), np.float32)})
    loaded = load_safetensors(path, device)
    assert loaded["e"].shape == (0,)
    assert loaded["e"].numpy().size == 0


def test_empty_file_of_tensors(device, tmp_path):
    path = tmp_path / "none.safetensors"
    save_safetensors(path, {}, metadata={"k": "v"})
    before = device.stats()
    assert load_safetensors(path, device) == {}
    after = device.stats()
    assert (after.alloc_count, after.live_storages) == (before.alloc_count, before.live_storages)
    assert safetensors_metadata(path) == {"k": "v"}


def test_default_device(tmp_path):
    path = tmp_path / "d.safetensors"
    save_safetensors(path, {"a": np.ones(3, np.float32)})
    assert mlxbuf.load_safetensors(path)["a"].device is mlxbuf.default_device()


@pytest.mark.parametrize(
    "tensors, metadata, fragment",
    [
        ({1: np.ones(2)}, None, "not a string"),
        ({"__metadata__": np.ones(2)}, None, "reserved"),
        ({"a": [1, 2]}, None, "Buffers or numpy arrays"),
        ({"a": np.ones(2)}, {"k": 1}, "strings to strings"),
        ({"a": np.ones(2, np.complex64)}, None, "complex64"),
    ],
    ids=["int-name", "reserved-name", "list-value", "bad-metadata", "complex"],
)
def test_save_rejects_bad_input(tmp_path, tensors, metadata, fragment):
    with pytest.raises((mlxbuf.InvalidArgument, TypeError)) as excinfo:
        save_safetensors(tmp_path / "x.safetensors", tensors, metadata)
    assert_names(excinfo, fragment)
    assert list(tmp_path.iterdir()) == []


@needs_safetensors
@pytest.mark.parametrize("dtype", NUMPY_DTYPES)
def test_safetensors_package_reads_what_we_write(device, tmp_path, dtype):
    rng = np.random.default_rng(1)
    array = (rng.standard_normal((4, 3)) * 50).astype(np.dtype(mlxbuf.as_dtype(dtype).numpy))
    buf = device.from_numpy(array, copy=True)
    path = tmp_path / "ours.safetensors"
    save_safetensors(path, {"t": buf, "n": array[:2]})
    theirs = st_numpy.load_file(str(path))
    np.testing.assert_array_equal(theirs["t"], array)
    np.testing.assert_array_equal(theirs["n"], array[:2])


@needs_safetensors
def test_we_read_what_the_safetensors_package_writes(device, tmp_path):
    arrays = {k: v for k, v in sample_arrays().items()}
    path = tmp_path / "theirs.safetensors"
    st_numpy.save_file(arrays, str(path), metadata={"origin": "safetensors"})
    loaded = load_safetensors(path, device)
    assert set(loaded) == set(arrays)
    for name, array in arrays.items():
        np.testing.assert_array_equal(loaded[name].numpy(), array)
        assert loaded[name].shape == array.shape
    assert safetensors_metadata(path) == {"origin": "safetensors"}


def test_bf16_round_trip_as_raw_bits(device, tmp_path):
    bits = np.array([0x3F80, 0x4000, 0xC040], dtype=np.uint16)  # 1.0, 2.0, -3.0
    buf = device.from_numpy(bits, copy=True).view("bf16")
    path = tmp_path / "bf.safetensors"
    save_safetensors(path, {"x": buf})
    assert read_header(path)["x"].dtype is mlxbuf.DType.BF16
    loaded = load_safetensors(path, device)["x"]
    assert loaded.dtype is mlxbuf.DType.BF16
    np.testing.assert_array_equal(loaded.as_slice("u16"), bits)


# ---- windows for files beyond max_buffer_length ---------------------------------


def test_load_through_several_windows(device, tmp_path):
    page = device.page_size
    arrays = {f"t{i}": np.full(page // 2 + 8 * i, i, np.uint8) for i in range(9)}
    arrays["big"] = np.arange(page, dtype=np.uint8)
    path = tmp_path / "w.safetensors"
    save_safetensors(path, arrays)
    loaded = load_safetensors(path, device, _max_window=2 * page)
    storages = {int(mlxbuf._cmetal.ffi.cast("uintptr_t", b._storage)) for b in loaded.values()}
    assert len(storages) > 1
    for name, array in arrays.items():
        np.testing.assert_array_equal(loaded[name].numpy(), array)
        assert loaded[name].byte_len <= 2 * page


def test_tensor_larger_than_a_window_is_rejected(device, tmp_path):
    page = device.page_size
    path = tmp_path / "big.safetensors"
    save_safetensors(path, {"big": np.zeros(3 * page, np.uint8)})
    with pytest.raises(mlxbuf.InvalidArgument) as excinfo:
        load_safetensors(path, device, _max_window=2 * page)
    assert_names(excinfo, str(3 * page), str(2 * page))


@st.composite
def range_sets(draw):
    page = draw(st.sampled_from([16, 64, 4096]))
    max_len = draw(st.integers(page, 8 * page))
    ranges, pos = [], draw(st.integers(0, 3 * page))
    for _ in range(draw(st.integers(0, 12))):
        pos += draw(st.integers(0, page))
        length = draw(st.integers(1, max(1, max_len - page)))
        ranges.append((pos, pos + length))
        pos += length
    return ranges, max_len, page


@given(range_sets())
def test_plan_windows_covers_every_range_within_limits(case):
    ranges, max_len, page = case

    def span(start, end):
        return -(-end // page) * page - (start - start % page)

    if any(span(start, end) > max_len for start, end in ranges):
        with pytest.raises(mlxbuf.InvalidArgument):
            plan_windows(ranges, max_len, page)
        return
    windows, assignment = plan_windows(ranges, max_len, page)
    assert len(assignment) == len(ranges)
    for (start, end), w in zip(ranges, assignment):
        w_start, w_end = windows[w]
        assert w_start <= start and end <= w_end
    for w_start, w_end in windows:
        assert w_start % page == 0
        assert -(-w_end // page) * page - w_start <= max_len
    # Greedy growth: every window but the last could not take the next range.
    assert len(windows) <= max(1, len(ranges))


def test_plan_windows_single_window_when_everything_fits():
    windows, assignment = plan_windows([(8, 100), (100, 400), (500, 4000)], 1 << 20, 4096)
    assert windows == [(0, 4000)] and assignment == [0, 0, 0]


# ---- the malformed-file catalog -------------------------------------------------

GOOD_ENTRY = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


def entry(**changes):
    e = dict(GOOD_ENTRY)
    e.update(changes)
    return e


MALFORMED = [
    # (id, file bytes, message fragments, tensor named)
    ("empty-file", b"", ["truncated", "0 bytes"], None),
    ("short-length", b"\x05\x00\x00", ["truncated", "3 bytes"], None),
    ("length-beyond-file", struct.pack("<Q", 100) + b"{}", ["header length 100", "beyond the file"], None),
    ("length-over-limit", struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{}", [str(MAX_HEADER_BYTES)], None),
    ("length-huge", struct.pack("<Q", (1 << 64) - 1), ["exceeds"], None),
    ("zero-length", struct.pack("<Q", 0), ["not valid JSON"], None),
    ("invalid-json", make_file(None, raw_header=b'{"a": '), ["not valid JSON"], None),
    ("invalid-utf8", make_file(None, raw_header=b'{"\xff": 1}'), ["UTF-8"], None),
    ("not-an-object", make_file([1, 2]), ["JSON object", "list"], None),
    ("duplicate-key", make_file(None, raw_header=b'{"a": {}, "a": {}}'), ["duplicate key 'a'"], None),
    ("nan", make_file(None, raw_header=b'{"__metadata__": {"x": NaN}}'), ["NaN"], None),
    ("deep-nesting", make_file(None, raw_header=b"[" * 100000 + b"]" * 100000), ["JSON"], None),
    ("entry-not-object", make_file({"a": [1]}, b"\0" * 8), ["JSON object"], "a"),
    ("missing-dtype", make_file({"a": {"shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8), ["lacks dtype"], "a"),
    ("missing-offsets", make_file({"a": {"dtype": "F32", "shape": [2]}}, b"\0" * 8), ["lacks data_offsets"], "a"),
    ("extra-key", make_file({"a": entry(extra=1)}, b"\0" * 8), ["unknown keys extra"], "a"),
    ("unknown-dtype", make_file({"a": entry(dtype="F8_E4M3")}, b"\0" * 8), ["'F8_E4M3'", "F32"], "a"),
    ("dtype-not-string", make_file({"a": entry(dtype=4)}, b"\0" * 8), ["unsupported dtype 4"], "a"),
    ("shape-negative", make_file({"a": entry(shape=[-2])}, b"\0" * 8), ["shape [-2]"], "a"),
    ("shape-float", make_file({"a": entry(shape=[2.0])}, b"\0" * 8), ["shape [2.0]"], "a"),
    ("shape-bool", make_file({"a": entry(shape=[True])}, b"\0" * 8), ["shape [True]"], "a"),
    ("shape-not-list", make_file({"a": entry(shape=2)}, b"\0" * 8), ["shape 2"], "a"),
    ("offsets-one", make_file({"a": entry(data_offsets=[0])}, b"\0" * 8), ["pair of integers"], "a"),
    ("offsets-float", make_file({"a": entry(data_offsets=[0, 8.0])}, b"\0" * 8), ["pair of integers"], "a"),
    ("offsets-reversed", make_file({"a": entry(data_offsets=[8, 0])}, b"\0" * 8), ["[8, 0]", "ordered"], "a"),
    ("offsets-negative", make_file({"a": entry(data_offsets=[-8, 0], shape=[2])}, b"\0" * 8), ["[-8, 0]"], "a"),
    ("offsets-beyond-data", make_file({"a": entry(data_offsets=[0, 8])}, b"\0" * 4), ["[0, 8]", "4-byte data"], "a"),
    ("truncated-data", make_file({"a": entry(shape=[4], data_offsets=[0, 16])}, b"\0" * 10), ["10-byte data"], "a"),
    ("shape-disagrees", make_file({"a": entry(shape=[3])}, b"\0" * 8), ["needs 12 bytes", "hold 8"], "a"),
    ("misaligned", make_file({"a": entry(data_offsets=[2, 10])}, b"\0" * 12), ["not aligned", "4-byte"], "a"),
    (
        "overlap",
        make_file({"a": entry(), "b": entry(data_offsets=[4, 12])}, b"\0" * 12),
        ["overlap tensor 'a'", "[4, 12)"],
        "b",
    ),
    ("metadata-not-strings", make_file({"__metadata__": {"k": 1}}), ["__metadata__", "strings"], None),
    ("metadata-not-object", make_file({"__metadata__": "x"}), ["__metadata__"], None),
]


@pytest.mark.parametrize("data, fragments, tensor", [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_files_raise_clear_errors(device, tmp_path, data, fragments, tensor):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(data)
    with pytest.raises(SafetensorsError) as excinfo:
        load_safetensors(path, device)
    assert isinstance(excinfo.value, mlxbuf.InvalidArgument)
    assert isinstance(excinfo.value, ValueError)
    assert_names(excinfo, str(path), *fragments)
    assert excinfo.value.tensor == tensor
    assert device.active_memory == 0


def test_missing_file_is_a_file_error_and_a_file_not_found_error(device, tmp_path):
    missing = tmp_path / "absent.safetensors"
    for call in (lambda: load_safetensors(missing, device), lambda: safetensors_metadata(missing),
                 lambda: read_header(missing)):
        with pytest.raises(FileNotFoundError) as excinfo:
            call()
        assert isinstance(excinfo.value, mlxbuf.FileError)
        assert excinfo.value.errno == errno.ENOENT
        assert excinfo.value.filename == str(missing)
        assert_names(excinfo, str(missing), "No such file")


def _valid_file():
    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.arange(5, dtype=np.int16)}
    text = json.dumps(
        {
            "__metadata__": {"m": "v"},
            "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
            "b": {"dtype": "I16", "shape": [5], "data_offsets": [24, 34]},
        }
    ).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + arrays["a"].tobytes() + arrays["b"].tobytes()


VALID = _valid_file()


@given(
    cut=st.integers(0, len(VALID)),
    flips=st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(1, 255)), max_size=3),
)
def test_corrupted_files_never_crash(tmp_path_factory, cut, flips):
    data = bytearray(VALID[:cut])
    for pos, mask in flips:
        if pos < len(data):
            data[pos] ^= mask
    path = tmp_path_factory.mktemp("fuzz") / "f.safetensors"
    path.write_bytes(bytes(data))
    dev = mlxbuf.Device("host")
    try:
        loaded = load_safetensors(path, dev)
    except SafetensorsError:
        return
    for buf in loaded.values():
        buf.numpy()  # every view lies inside the mapping: reading cannot fault


def test_header_accessors(tmp_path):
    path = tmp_path / "v.safetensors"
    path.write_bytes(VALID)
    header = read_header(path)
    assert header.file_size == len(VALID)
    assert header.data_len == 34
    assert header["a"].shape == (2, 3) and header["a"].nbytes == 24
    assert header.metadata == {"m": "v"}
    with pytest.raises(KeyError):
        header["missing"]
    assert os.path.getsize(path) == header.data_start + header.data_len
