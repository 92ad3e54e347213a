"""Buffer: allocation, metadata, clones, slices, views and zero-copy CPU access."""

import copy
import gc
import random
import threading

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import mlxbuf
from mlxbuf import DType
from support import assert_names, run_threads


def test_alloc_is_zero_filled_page_aligned_and_described(device):
    buf = device.alloc_buffer(4096, "f32", (32, 32))
    assert buf.dtype is DType.F32
    assert buf.shape == (32, 32)
    assert buf.ndim == 2 and len(buf) == 32
    assert buf.element_count == 1024
    assert buf.byte_len == 4096
    assert buf.nbytes == 4096
    assert buf.byte_offset == 0
    assert buf.contents_ptr % device.page_size == 0
    assert buf.data_ptr == buf.contents_ptr
    assert buf.device is device
    assert buf.storage_kind == "device"
    assert buf.writable
    assert not buf.numpy().any()
    r = repr(buf)
    for part in ("f32", "(32, 32)", "4096"):
        assert part in r


@pytest.mark.parametrize("spelling", [DType.F16, "f16", "float16", np.float16, np.dtype("float16")], ids=repr)
def test_dtype_spellings(device, spelling):
    buf = device.alloc_buffer(64, spelling, [4, 8])
    assert buf.dtype is DType.F16
    assert buf.shape == (4, 8)
    assert buf.numpy().dtype == np.float16


@pytest.mark.parametrize("dt", [d for d in DType if d is not DType.BF16], ids=str)
def test_numpy_round_trip_for_every_dtype(device, dt):
    buf = device.alloc_buffer(64, dt, (64 // dt.size,))
    arr = buf.numpy()
    assert arr.dtype == dt.numpy and arr.shape == buf.shape
    arr[:] = np.arange(arr.size).astype(dt.numpy)
    assert (np.asarray(buf) == arr).all()


def test_bf16_numpy_needs_ml_dtypes(device):
    pytest.importorskip("ml_dtypes")
    buf = device.alloc_buffer(16, "bf16", (8,))
    arr = buf.numpy()
    arr[:] = [1, 2, 3, 4, 5, 6, 7, 8]
    assert np.asarray(buf).dtype == DType.BF16.numpy
    assert np.asarray(buf).astype(np.float32).tolist() == [1, 2, 3, 4, 5, 6, 7, 8]


def test_buffers_cannot_be_constructed_directly():
    with pytest.raises(TypeError):
        mlxbuf.Buffer()


def test_clone_shares_the_storage(device):
    buf = device.alloc_buffer(4096, "u32", (1024,))
    twin = buf.clone()
    assert twin is not buf and twin != buf
    assert twin.contents_ptr == buf.contents_ptr
    twin.numpy()[5] = 77
    assert buf.numpy()[5] == 77
    size = buf.allocated_size
    assert twin.allocated_size == size >= 4096
    assert device.active_memory == size
    del buf
    gc.collect()
    assert device.active_memory == size  # the clone still holds it
    del twin
    assert device.active_memory == 0


@pytest.mark.parametrize("how", [copy.copy, copy.deepcopy, mlxbuf.Buffer.copy], ids=["copy", "deepcopy", "method"])
def test_copies_hold_the_views_bytes_in_a_new_storage(device, how):
    # numpy's copies: the view's bytes only, in memory shared with nothing.
    buf = device.alloc_buffer(4096, "u8", (100,))
    buf.numpy()[:] = np.arange(100)
    view = buf.slice_view(10, 50).view("u8", (5, 10))
    dup = how(view)
    assert dup.device is device and dup.storage_kind == "device"
    assert dup.contents_ptr != buf.contents_ptr
    assert (dup.dtype, dup.shape, dup.byte_offset, dup.byte_len) == (DType.U8, (5, 10), 0, 50)
    assert dup.numpy().ravel().tolist() == list(range(10, 60))
    dup.numpy()[:] = 1
    assert buf.numpy().tolist() == list(range(100))
    # Counted in allocated bytes: whole pages, not the 50 bytes asked for.
    assert dup.allocated_size >= 50 and dup.allocated_size % device.page_size == 0
    assert device.active_memory == buf.allocated_size + dup.allocated_size


def test_copy_waits_for_submitted_writers(device):
    buf = device.alloc_buffer(1 << 20, "u8", (1 << 20,))
    with device.command_encoder() as enc:
        enc.fill(buf, 7)
        enc.commit()
        dup = buf.copy()
    assert (dup.numpy() == 7).all()


def test_copy_of_an_empty_view(device):
    buf = device.alloc_buffer(64, "f32", (16,))
    dup = buf[3:3].copy()
    assert dup.shape == (0,) and dup.nbytes == 0 and dup.byte_len == 4


def test_slice_views_start_at_their_offset_on_the_cpu(device):
    buf = device.alloc_buffer(4096, "f32", (1024,))
    buf.numpy()[:] = np.arange(1024, dtype=np.float32)
    sl = buf.slice_view(256, 16)
    assert sl.shape == (16,) and sl.byte_offset == 256 and sl.byte_len == 4096
    assert sl.nbytes == 64
    assert sl.data_ptr == buf.contents_ptr + 256
    view = sl.numpy()
    assert view.ctypes.data == sl.data_ptr
    assert view.tolist() == list(range(64, 80))
    assert np.asarray(sl).ctypes.data == sl.data_ptr
    assert bytes(sl.memoryview()) == np.arange(64, 80, dtype=np.float32).tobytes()
    assert sl.as_slice("u8").size == 64
    view[:] = -1
    assert buf.numpy()[63] == 63 and buf.numpy()[64] == -1 and buf.numpy()[79] == -1 and buf.numpy()[80] == 80


def test_slice_offsets_are_from_the_allocation_base(device):
    buf = device.alloc_buffer(4096, "u8", (4096,))
    outer = buf.slice_view(1000, 100)
    inner = outer.slice_view(8, 4)
    assert inner.byte_offset == 8
    assert inner.data_ptr == buf.contents_ptr + 8


def test_slice_to_the_end_and_empty_slices(device):
    buf = device.alloc_buffer(4096, "f32", (1024,))
    last = buf.slice_view(4092, 1)
    assert last.numpy().shape == (1,)
    empty = buf.slice_view(4096, 0)
    assert empty.numpy().shape == (0,)
    assert empty.nbytes == 0


def test_view_reinterprets_from_the_byte_offset(device):
    buf = device.alloc_buffer(4096, "u8", (4096,))
    buf.numpy()[:8] = [1, 0, 0, 0, 2, 0, 0, 0]
    as_u32 = buf.view("u32", (2,))
    assert as_u32.numpy().tolist() == [1, 2]
    assert buf.view("u32").shape == (1024,)
    assert buf.view(shape=(64, 64)).shape == (64, 64)
    tail = buf.slice_view(4000, 96)
    assert tail.view("u32", (24,)).byte_offset == 4000
    assert tail.view("f64").shape == (12,)
    with pytest.raises(mlxbuf.InvalidArgument) as exc:
        tail.view("u32", (25,))
    assert_names(exc, "(25,)", 100, 96, 4000, 4096)


def test_reshape(device):
    buf = device.alloc_buffer(4096, "f32", (1024,))
    assert buf.reshape(32, 32).shape == (32, 32)
    assert buf.reshape((4, 256)).numpy().shape == (4, 256)
    with pytest.raises(mlxbuf.InvalidArgument) as exc:
        buf.reshape(3, 3)
    assert_names(exc, "(3, 3)", 1024)


def test_as_slice_and_memoryview(device):
    buf = device.alloc_buffer(4096, "f32", (2, 3))
    flat = buf.as_slice()
    assert flat.shape == (6,) and flat.dtype == np.float32
    raw = buf.as_slice("u8")
    assert raw.shape == (24,)
    mv = buf.memoryview()
    assert mv.nbytes == 24 and not mv.readonly
    mv[0:4] = np.float32(2.5).tobytes()
    assert buf.numpy()[0, 0] == 2.5
    odd = buf.view("u8", (6,))
    with pytest.raises(mlxbuf.InvalidArgument) as exc:
        odd.as_slice("f32")
    assert_names(exc, 6, "f32")


def test_array_interface_aliases_and_keeps_alive(device):
    buf = device.alloc_buffer(4096, "i16", (2048,))
    arr = np.asarray(buf)
    assert arr.ctypes.data == buf.data_ptr
    assert arr.flags.writeable
    assert arr.dtype == np.int16 and arr.shape == (2048,)
    arr[7] = -3
    size = buf.allocated_size
    del buf
    gc.collect()
    assert device.active_memory == size
    assert arr[7] == -3
    del arr
    gc.collect()
    assert device.active_memory == 0


def test_numpy_views_keep_the_storage_alive_after_every_buffer_dies(device):
    buf = device.alloc_buffer(1 << 20, "u8", (1 << 20,))
    whole = buf.numpy()
    part = buf.slice_view(4096, 16).numpy()
    mv = buf.slice_view(8192, 16).memoryview()
    address = buf.contents_ptr
    del buf
    gc.collect()
    assert device.active_memory == 1 << 20
    # Allocations made now must not land on the still-referenced bytes.
    others = [device.alloc_buffer(1 << 20, "u8", (1 << 20,)) for _ in range(4)]
    assert all(o.contents_ptr != address for o in others)
    for o in others:
        o.numpy()[:] = 0xEE
    whole[:] = 5
    assert (part == 5).all() and bytes(mv) == b"\x05" * 16
    assert whole.ctypes.data == address
    del whole, part
    gc.collect()
    assert device.active_memory == 5 << 20
    del mv
    gc.collect()
    assert device.active_memory == 4 << 20


def test_equality_is_identity(device):
    a = device.alloc_buffer(16, "u8", (16,))
    assert a == a
    assert a != a.clone()
    assert len({a, a, a.clone()}) == 2


# ---- bad input: class, message naming the value and limit, healthy afterwards ----

BAD_ALLOCS = [
    ("zero bytes", (0, "f32", (0,)), mlxbuf.InvalidArgument, ["0"]),
    ("negative", (-1, "f32", (1,)), mlxbuf.InvalidArgument, ["-1"]),
    ("float size", (4096.0, "f32", (1,)), mlxbuf.InvalidArgument, ["4096.0"]),
    ("string size", ("4096", "f32", (1,)), mlxbuf.InvalidArgument, ["'4096'"]),
    ("bool size", (True, "u8", (1,)), mlxbuf.InvalidArgument, ["True"]),
    ("none size", (None, "u8", (1,)), mlxbuf.InvalidArgument, ["None"]),
    ("2**64", (1 << 64, "u8", (1,)), mlxbuf.InvalidArgument, [str(1 << 64)]),
    ("shape too big", (16, "f32", (5,)), mlxbuf.InvalidArgument, ["(5,)", "20", "16"]),
    ("shape overflow", (4096, "f32", (1 << 40, 1 << 40)), mlxbuf.InvalidArgument, [str(1 << 82), "4096"]),
    ("negative dim", (16, "f32", (-1,)), mlxbuf.InvalidArgument, ["-1"]),
    ("float dim", (16, "f32", (2.5,)), mlxbuf.InvalidArgument, ["2.5"]),
    ("bool dim", (16, "f32", (True,)), mlxbuf.InvalidArgument, ["True"]),
    ("string shape", (16, "f32", "abc"), mlxbuf.InvalidArgument, ["'abc'"]),
    ("none shape", (16, "f32", None), mlxbuf.InvalidArgument, ["None"]),
    ("unknown dtype", (16, "f33", (1,)), mlxbuf.UnsupportedDtype, ["'f33'", "f32"]),
    ("numpy complex", (16, np.complex64, (1,)), mlxbuf.UnsupportedDtype, ["complex64"]),
]


@pytest.mark.parametrize("args, cls, fragments", [b[1:] for b in BAD_ALLOCS], ids=[b[0] for b in BAD_ALLOCS])
def test_bad_allocations(device, args, cls, fragments):
    with pytest.raises(cls) as exc:
        device.alloc_buffer(*args)
    assert_names(exc, *fragments)
    assert device.active_memory == 0
    assert device.alloc_buffer(16, "u8", (16,)).numpy().sum() == 0


def test_above_max_buffer_length_is_a_memory_error(device):
    # numpy, CuPy and PyTorch raise MemoryError for an allocation the
    # device cannot satisfy; the message still names the size and the limit.
    too_big = device.max_buffer_length + 1
    with pytest.raises(mlxbuf.BufferAllocationError) as exc:
        device.alloc_buffer(too_big, "u8", (1,))
    assert isinstance(exc.value, MemoryError) and not isinstance(exc.value, ValueError)
    assert exc.value.bytes == too_big
    assert_names(exc, too_big, device.max_buffer_length)
    assert device.active_memory == 0


def _bad_views(buf):
    return [
        ("slice past the end", lambda: buf.slice_view(4090, 16), mlxbuf.InvalidArgument, ["16", "4090", "4096"]),
        ("slice offset past the end", lambda: buf.slice_view(5000, 0), mlxbuf.InvalidArgument, ["5000", "4096"]),
        ("negative slice offset", lambda: buf.slice_view(-4, 1), mlxbuf.InvalidArgument, ["-4"]),
        ("negative slice length", lambda: buf.slice_view(0, -1), mlxbuf.InvalidArgument, ["-1"]),
        ("float slice offset", lambda: buf.slice_view(1.5, 1), mlxbuf.InvalidArgument, ["1.5"]),
        ("view too big", lambda: buf.view("f64", (513,)), mlxbuf.InvalidArgument, ["(513,)", "4104", "4096"]),
        ("view bad dtype", lambda: buf.view("q99"), mlxbuf.UnsupportedDtype, ["'q99'"]),
        ("view negative dim", lambda: buf.view(shape=(-2, 2)), mlxbuf.InvalidArgument, ["-2"]),
        ("uneven reinterpret", lambda: buf.slice_view(0, 3).view("f64"), mlxbuf.InvalidArgument, ["12", "f64"]),
        ("as_slice uneven", lambda: buf.slice_view(0, 3).as_slice("f64"), mlxbuf.InvalidArgument, ["12", "f64"]),
        ("as_slice bad dtype", lambda: buf.as_slice("zz"), mlxbuf.UnsupportedDtype, ["'zz'"]),
    ]


BAD_VIEW_NAMES = [case[0] for case in _bad_views(None)]


@pytest.mark.parametrize("name", BAD_VIEW_NAMES)
def test_bad_views(device, name):
    buf = device.alloc_buffer(4096, "f32", (1024,))
    fn, cls, fragments = {case[0]: case[1:] for case in _bad_views(buf)}[name]
    with pytest.raises(cls) as exc:
        fn()
    assert_names(exc, *fragments)
    assert buf.numpy().shape == (1024,)
    assert device.active_memory == buf.allocated_size


@given(
    offset=st.integers(0, 5000),
    count=st.integers(0, 1200),
    dtype=st.sampled_from([DType.U8, DType.F16, DType.F32, DType.F64]),
)
def test_slice_bounds_property(offset, count, dtype):
    dev = mlxbuf.default_device()
    buf = dev.alloc_buffer(4096, dtype, (4096 // dtype.size,))
    fits = offset + count * dtype.size <= 4096
    if fits:
        sl = buf.slice_view(offset, count)
        arr = sl.numpy()
        assert arr.shape == (count,)
        if count:
            assert arr.ctypes.data == buf.contents_ptr + offset
    else:
        with pytest.raises(mlxbuf.InvalidArgument):
            buf.slice_view(offset, count)


def test_four_threads_alloc_and_drop(device):
    start = device.active_memory
    errors = []
    barrier = threading.Barrier(4)

    def churn(seed):
        rng = random.Random(seed)
        try:
            barrier.wait()
            live = []
            for _ in range(300):
                n = rng.choice([16, 4096, 10000, 1 << 16])
                b = device.alloc_buffer(n, "u8", (n,))
                if rng.random() < 0.3:
                    live.append(b.clone())
                if rng.random() < 0.3:
                    live.append(b.slice_view(n // 2, n // 4).numpy())
                b.numpy()[:] = seed
                if len(live) > 20:
                    del live[: rng.randrange(len(live))]
            live.clear()
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    run_threads(churn, [(i,) for i in range(4)])
    gc.collect()
    assert not errors
    assert device.active_memory == start
    assert device.stats().live_storages == 0
