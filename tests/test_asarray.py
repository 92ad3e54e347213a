"""mlxbuf.asarray and Buffer.to: zero-copy where memory can be shared, copies otherwise."""

import array
import gc
import mmap

import numpy as np
import pytest

import mlxbuf
from mlxbuf import DType
from support import assert_names


def aligned(device, shape, dtype=np.float32):
    """A C-contiguous array starting on a page boundary (Metal wraps only those)."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape))
    raw = np.zeros(n * dtype.itemsize + device.page_size, np.uint8)
    start = -raw.ctypes.data % device.page_size
    out = raw[start : start + n * dtype.itemsize].view(dtype).reshape(shape)
    out[...] = np.arange(n).reshape(shape)
    return out


class Producer:
    """A DLPack producer that is not numpy (stands in for PyTorch, JAX, ...)."""

    def __init__(self, array):
        self._array = array

    def __dlpack__(self, **kwargs):
        return self._array.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._array.__dlpack_device__()


def test_a_numpy_array_is_shared_not_copied(device):
    source = aligned(device, (3, 4))
    buf = mlxbuf.asarray(source, device=device)
    assert (buf.dtype, buf.shape) == (DType.F32, (3, 4))
    assert buf.data_ptr == source.ctypes.data and buf.storage_kind == "external"
    source[1, 2] = -5
    assert buf.numpy()[1, 2] == -5
    buf.numpy()[0, 0] = 42
    assert source[0, 0] == 42
    del source
    gc.collect()
    assert buf.numpy()[0, 0] == 42  # the Buffer keeps the array alive
    assert mlxbuf.asarray(np.ones(3)).device is mlxbuf.default_device()


def test_copy_true_makes_a_device_allocation(device):
    source = aligned(device, (8,))
    buf = mlxbuf.asarray(source, device=device, copy=True)
    assert buf.data_ptr != source.ctypes.data and buf.storage_kind == "device"
    assert buf.numpy().tolist() == source.tolist()
    if device.residency_sets_enabled:
        assert buf.residency_set is not None
    source[:] = 0
    assert buf.numpy()[3] == 3


@pytest.mark.parametrize(
    "make, why",
    [
        (lambda: np.arange(12, dtype=np.float32).reshape(3, 4)[:, ::2], "C-contiguous"),
        (lambda: np.arange(4, dtype=">i4"), "byte order"),
        (lambda: np.zeros((0, 3), np.float32), "empty"),
    ],
    ids=["strided", "big-endian", "empty"],
)
def test_arrays_that_cannot_be_shared_are_copied_or_refused(device, make, why):
    source = make()
    buf = mlxbuf.asarray(source, device=device)
    assert buf.shape == source.shape and buf.numpy().tolist() == source.tolist()
    assert buf.storage_kind == "device"
    with pytest.raises(mlxbuf.InvalidArgument) as exc:
        mlxbuf.asarray(source, device=device, copy=False)
    assert isinstance(exc.value, ValueError)  # numpy 2's asarray(copy=False) convention
    assert_names(exc, "copy=False", why)


def test_read_only_sources_give_read_only_buffers(device):
    source = aligned(device, (16,))
    source.flags.writeable = False
    buf = mlxbuf.asarray(source, device=device)
    assert not buf.writable and not buf.numpy().flags.writeable
    assert mlxbuf.asarray(source, device=device, copy=True).writable


def test_dtype_converts_with_numpy_casting(device):
    source = np.array([[1.7, -2.2], [3.0, 250.9]])
    buf = mlxbuf.asarray(source, dtype="i32", device=device)
    assert buf.dtype is DType.I32 and buf.numpy().tolist() == [[1, -2], [3, 250]]
    same = aligned(device, (4,), np.int32)
    assert mlxbuf.asarray(same, dtype=np.int32, device=device).data_ptr == same.ctypes.data
    with pytest.raises(mlxbuf.InvalidArgument) as exc:
        mlxbuf.asarray(same, dtype="f16", device=device, copy=False)
    assert_names(exc, "i32", "f16")


def test_buffers_come_back_as_themselves_unless_asked_to_move_or_convert(device, other_device):
    buf = device.alloc_buffer(16, "u16", (8,))
    buf.numpy()[:] = np.arange(8)
    assert mlxbuf.asarray(buf) is buf and mlxbuf.asarray(buf, dtype="u16", device=device, copy=False) is buf
    copied = mlxbuf.asarray(buf, copy=True)
    assert copied is not buf and copied.contents_ptr != buf.contents_ptr
    moved = mlxbuf.asarray(buf[2:6], device=other_device)
    assert moved.device is other_device and moved.numpy().tolist() == [2, 3, 4, 5] and moved.byte_offset == 0
    wide = mlxbuf.asarray(buf, dtype="f32")
    assert wide.dtype is DType.F32 and wide.numpy().tolist() == list(range(8))
    with pytest.raises(mlxbuf.InvalidArgument, match="another device"):
        mlxbuf.asarray(buf, device=other_device, copy=False)
    with pytest.raises(mlxbuf.InvalidArgument, match="u16 to f32"):
        mlxbuf.asarray(buf, dtype="f32", copy=False)


def test_dlpack_producers_go_through_from_dlpack(device):
    source = aligned(device, (2, 5), np.int16)
    buf = mlxbuf.asarray(Producer(source), device=device)
    assert (buf.dtype, buf.shape) == (DType.I16, (2, 5))
    assert buf.numpy().tolist() == source.tolist()
    if device.backend == "host":
        assert buf.data_ptr == source.ctypes.data
    assert mlxbuf.asarray(Producer(source), device=device, copy=True).data_ptr != source.ctypes.data
    converted = mlxbuf.asarray(Producer(source), dtype="f64", device=device)
    assert converted.dtype is DType.F64 and converted.numpy().tolist() == source.tolist()
    strided = Producer(np.arange(10, dtype=np.int16)[::2])
    with pytest.raises(mlxbuf.InvalidArgument, match="copy=False"):
        mlxbuf.asarray(strided, device=device, copy=False)


def test_buffer_protocol_objects_share_their_memory(device):
    data = bytearray(range(16))
    buf = mlxbuf.asarray(data, device=device)
    assert (buf.dtype, buf.shape) == (DType.U8, (16,))
    if device.backend == "host":  # Metal needs page-aligned memory, which a bytearray is not
        data[3] = 99
        assert buf.numpy()[3] == 99
    frozen = mlxbuf.asarray(b"\x01\x02\x03", device=device)
    assert frozen.numpy().tolist() == [1, 2, 3] and (device.backend != "host" or not frozen.writable)
    doubles = mlxbuf.asarray(array.array("d", [1.5, 2.5]), device=device)
    assert doubles.dtype is DType.F64 and doubles.numpy().tolist() == [1.5, 2.5]
    window = mlxbuf.asarray(memoryview(bytes(range(10)))[4:7], device=device)
    assert window.numpy().tolist() == [4, 5, 6]
    with mmap.mmap(-1, device.page_size) as region:
        region[:4] = b"\x07\x08\x09\x0a"
        mapped = mlxbuf.asarray(region, device=device)
        assert mapped.numpy()[:4].tolist() == [7, 8, 9, 10]
        assert mapped.data_ptr % device.page_size == 0
        del mapped
        gc.collect()


def test_sequences_and_scalars_become_device_allocations(device):
    grid = mlxbuf.asarray([[1, 2, 3], [4, 5, 6]], device=device)
    assert (grid.dtype, grid.shape, grid.storage_kind) == (DType.I64, (2, 3), "device")
    assert grid.numpy().tolist() == [[1, 2, 3], [4, 5, 6]]
    halves = mlxbuf.asarray([0.5, 1.5], dtype=mlxbuf.float16, device=device)
    assert halves.dtype is DType.F16 and halves.numpy().tolist() == [0.5, 1.5]
    scalar = mlxbuf.asarray(2.5, device=device)
    assert scalar.shape == () and scalar.numpy()[()] == 2.5
    assert mlxbuf.asarray([], device=device).shape == (0,)
    assert mlxbuf.asarray([True, False], device=device).dtype is DType.BOOL
    with pytest.raises(mlxbuf.InvalidArgument, match="no memory to share"):
        mlxbuf.asarray([1, 2], device=device, copy=False)


@pytest.mark.parametrize(
    "obj, cls, fragment",
    [
        ([[1, 2], [3]], mlxbuf.InvalidArgument, "inhomogeneous"),
        ("text", mlxbuf.UnsupportedDtype, "elements are <U4"),
        ([1 + 2j], mlxbuf.UnsupportedDtype, "complex128"),
        (object(), mlxbuf.UnsupportedDtype, "elements are object"),
    ],
    ids=["ragged", "str", "complex", "object"],
)
def test_what_cannot_be_a_buffer_is_refused(device, obj, cls, fragment):
    with pytest.raises(cls, match=fragment):
        mlxbuf.asarray(obj, device=device)


def test_bad_arguments(device):
    with pytest.raises(mlxbuf.InvalidArgument, match="'host'"):
        mlxbuf.asarray([1], device="host")
    with pytest.raises(mlxbuf.UnsupportedDtype, match="f128"):
        mlxbuf.asarray([1], dtype="f128")


def test_to_returns_itself_on_its_device_and_copies_to_another(device, other_device):
    buf = device.alloc_buffer(64, "f32", (4, 4))
    buf.numpy()[:] = np.arange(16).reshape(4, 4)
    assert buf.to(device) is buf
    row = buf[1:3]
    moved = row.to(other_device)
    assert moved.device is other_device and moved.shape == (2, 4) and moved.byte_offset == 0
    assert moved.numpy().tolist() == buf.numpy()[1:3].tolist()
    moved.numpy()[:] = 0
    assert buf.numpy()[1, 0] == 4
    assert other_device.active_memory == moved.allocated_size >= 32
    with pytest.raises(mlxbuf.InvalidArgument, match="Device"):
        buf.to("host")


def test_bf16_through_ml_dtypes(device):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    source = np.array([1, 2, 3], dtype=ml_dtypes.bfloat16)
    buf = mlxbuf.asarray(source, device=device)
    assert buf.dtype is DType.BF16 and [float(x) for x in buf] == [1, 2, 3]
    assert mlxbuf.asarray(buf, dtype="f32").numpy().tolist() == [1.0, 2.0, 3.0]
