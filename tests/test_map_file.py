"""Device.map_file: zero-copy file-backed buffers."""

import gc
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mlxbuf
from support import assert_names, fuzz_examples, release_deferred

FILE_BYTES = 3 * 4096 + 123


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "data.bin"
    payload = (np.arange(FILE_BYTES) * 7 % 251).astype(np.uint8).tobytes()
    path.write_bytes(payload)
    return path, payload


def mapped_paths():
    with open("/proc/self/maps") as f:
        return f.read()


def test_whole_file_contents(device, data_file):
    path, payload = data_file
    buf = device.map_file(path)
    assert buf.dtype is mlxbuf.DType.U8
    assert buf.shape == (FILE_BYTES,)
    assert buf.storage_kind == "mapped"
    assert bytes(buf.memoryview()) == payload


@pytest.mark.parametrize("offset", [0, 1, 4095, 4096, 4097, FILE_BYTES - 1])
def test_any_offset_is_rounded_internally(device, data_file, offset):
    path, payload = data_file
    buf = device.map_file(path, offset)
    assert buf.nbytes == FILE_BYTES - offset
    assert buf.byte_offset == 0
    assert bytes(buf.memoryview()) == payload[offset:]


def test_offset_and_length(device, data_file):
    path, payload = data_file
    buf = device.map_file(path, 4100, 300)
    assert buf.shape == (300,)
    assert bytes(buf.memoryview()) == payload[4100:4400]


def test_dtype_and_shape(device, data_file):
    path, payload = data_file
    buf = device.map_file(path, 8, 64, dtype="u32", shape=(4, 4))
    np.testing.assert_array_equal(buf.numpy(), np.frombuffer(payload[8:72], np.uint32).reshape(4, 4))
    flat = device.map_file(path, 0, 64, dtype=np.float32)
    assert flat.shape == (16,)


def test_read_only_by_default(device, data_file):
    path, _ = data_file
    buf = device.map_file(path)
    assert not buf.writable
    arr = buf.numpy()
    assert not arr.flags.writeable
    with pytest.raises(ValueError):
        arr[0] = 1
    assert buf.memoryview().readonly


def test_writable_mapping_writes_the_file(device, data_file):
    path, payload = data_file
    buf = device.map_file(path, 4096, 16, writable=True)
    assert buf.writable
    buf.numpy()[:] = 0xAB
    with open(path, "rb") as f:  # MAP_SHARED: the page cache is the file
        content = f.read()
    assert content[4096:4112] == b"\xab" * 16
    assert content[:4096] == payload[:4096] and content[4112:] == payload[4112:]


def test_mapping_outlives_the_path(device, data_file):
    path, payload = data_file
    buf = device.map_file(path, 10)
    os.unlink(path)
    gc.collect()
    assert bytes(buf.memoryview()) == payload[10:]


def test_mapping_is_closed_with_the_last_reference(device, data_file):
    path, _ = data_file
    buf = device.map_file(path)
    arr = buf.slice_view(5, 10).numpy()
    del buf
    gc.collect()
    assert str(path) in mapped_paths()
    del arr
    gc.collect()
    # The residency set holds the mapping until its removal is committed.
    if device.residency_sets_enabled:
        assert str(path) in mapped_paths()
        assert device.residency_set.pending_release_count == 1
    release_deferred(device)
    assert str(path) not in mapped_paths()


def test_mapped_storage_joins_residency_and_active_memory(device, data_file):
    path, _ = data_file
    before = device.active_memory
    buf = device.map_file(path, 100, 1000)
    # The pages mapped (offset 100 sits in the first).
    assert buf.allocated_size >= device.page_size and buf.allocated_size % device.page_size == 0
    assert device.active_memory == before + buf.allocated_size
    if device.residency_sets_enabled:
        assert device.residency_set.contains(buf)
        assert buf.residency_set is not None
    del buf
    gc.collect()
    assert device.active_memory == before


def test_map_commands_see_the_file(device, data_file):
    path, payload = data_file
    src = device.map_file(path, 3, 256)
    dst = device.alloc_buffer(256, "u8", (256,))
    with device.command_encoder() as enc:
        enc.copy(src, dst)
    assert bytes(dst.memoryview()) == payload[3:259]


@pytest.mark.parametrize(
    "kwargs, error, fragments",
    [
        ({"offset": FILE_BYTES + 1}, mlxbuf.InvalidArgument, ["offset", str(FILE_BYTES + 1), str(FILE_BYTES)]),
        ({"offset": FILE_BYTES}, mlxbuf.InvalidArgument, ["nothing to map"]),
        ({"offset": 10, "length": FILE_BYTES}, mlxbuf.InvalidArgument, [str(FILE_BYTES), "offset 10"]),
        ({"length": 0}, mlxbuf.InvalidArgument, ["length"]),
        ({"offset": -1}, mlxbuf.InvalidArgument, ["offset", "-1"]),
        ({"length": 10, "dtype": "f32"}, mlxbuf.InvalidArgument, ["10-byte", "4-byte"]),
        ({"length": 16, "shape": (5,), "dtype": "f32"}, mlxbuf.InvalidArgument, ["20 bytes", "16-byte"]),
        ({"dtype": "c64"}, mlxbuf.UnsupportedDtype, ["c64"]),
    ],
    ids=["offset-beyond", "offset-at-end", "length-beyond", "zero-length", "negative-offset", "partial-element", "shape-too-big", "bad-dtype"],
)
def test_bad_ranges(device, data_file, kwargs, error, fragments):
    path, _ = data_file
    with pytest.raises(error) as excinfo:
        device.map_file(path, **kwargs)
    assert_names(excinfo, *fragments)
    gc.collect()
    assert device.active_memory == 0


def test_missing_file(device, tmp_path):
    missing = tmp_path / "absent.bin"
    with pytest.raises(mlxbuf.FileError) as excinfo:
        device.map_file(missing)
    assert isinstance(excinfo.value, OSError)
    assert excinfo.value.filename == str(missing)
    assert_names(excinfo, str(missing))


def test_empty_file(device, tmp_path):
    path = tmp_path / "empty.bin"
    path.write_bytes(b"")
    with pytest.raises(mlxbuf.InvalidArgument) as excinfo:
        device.map_file(path)
    assert_names(excinfo, "nothing to map")


def test_directory_is_rejected(device, tmp_path):
    with pytest.raises(mlxbuf.MlxError) as excinfo:
        device.map_file(tmp_path)
    assert_names(excinfo, "regular file")


def test_injected_failure_leaks_nothing(device, data_file):
    path, _ = data_file
    device._debug_fail_alloc(1)
    with pytest.raises(mlxbuf.BufferAllocationError):
        device.map_file(path)
    device._debug_fail_alloc(0)
    assert str(path) not in mapped_paths()
    assert device.active_memory == 0
    assert bytes(device.map_file(path, 0, 4).memoryview()) == data_file[1][:4]


@given(offset=st.integers(0, FILE_BYTES - 1), data=st.data())
def test_any_range_matches_the_file(tmp_path_factory, offset, data):
    length = data.draw(st.integers(1, FILE_BYTES - offset))
    path = tmp_path_factory.getbasetemp() / "prop.bin"
    if not path.exists():
        path.write_bytes(bytes(range(256)) * (FILE_BYTES // 256 + 1))
    payload = path.read_bytes()
    dev = mlxbuf.default_device()
    buf = dev.map_file(path, offset, length)
    assert bytes(buf.memoryview()) == payload[offset : offset + length]


EDGE_SIZES = [0, 1, 4095, 4096, 4097, 3 * 4096 + 123]
HOSTILE = st.one_of(
    st.integers(0, 5 * 4096),
    st.sampled_from([-1, 2**31, 2**32, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 2**80]),
)


@settings(max_examples=fuzz_examples(150), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    size=st.sampled_from(EDGE_SIZES),
    offset=HOSTILE,
    length=st.one_of(st.none(), HOSTILE),
    dtype=st.sampled_from(["u8", "f32", "f64", "bf16"]),
    shape=st.one_of(st.none(), st.lists(st.one_of(st.integers(0, 64), st.sampled_from([2**63, 2**64])), max_size=3)),
    writable=st.booleans(),
)
def test_hostile_ranges_map_exactly_or_raise(tmp_path_factory, size, offset, length, dtype, shape, writable):
    """Any offset, length, dtype and shape on files at page edges: either
    the Buffer is exactly those bytes of the file, or a clean MlxError
    (TypeError for what is not a number); nothing maps past the file."""
    path = tmp_path_factory.getbasetemp() / f"edge-{size}.bin"
    if not path.exists():
        path.write_bytes(bytes((i * 7) % 251 for i in range(size)))
    payload = path.read_bytes()
    dev = mlxbuf.Device("host")
    try:
        buf = dev.map_file(path, offset, length, dtype=dtype, shape=shape, writable=writable)
    except mlxbuf.MlxError:
        assert dev.active_memory == 0
        return
    span = size - offset if length is None else length
    assert 0 <= offset and offset + span <= size and span > 0
    assert bytes(buf.memoryview()) == payload[offset : offset + buf.nbytes]
    assert buf.nbytes <= span
