"""DLPack: export (__dlpack__), import (mlxbuf.from_dlpack), capsule ownership."""

import ctypes
import gc
import subprocess
import sys
import threading
import weakref

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import mlxbuf
from mlxbuf._cmetal import ffi, lib
from support import assert_names

try:
    import torch
except ImportError:  # pragma: no cover - depends on the environment
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="PyTorch is not installed")

_GetName = ctypes.PYFUNCTYPE(ctypes.c_char_p, ctypes.py_object)(("PyCapsule_GetName", ctypes.pythonapi))
_GetPointer = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.py_object, ctypes.c_char_p)(
    ("PyCapsule_GetPointer", ctypes.pythonapi)
)

NUMPY_DTYPES = ["f32", "f16", "f64", "u8", "u16", "u32", "u64", "i8", "i16", "i32", "i64", "bool"]


def capsule_name(capsule):
    return _GetName(capsule).decode()


def managed(capsule):
    """The DLManagedTensor(Versioned) inside an unconsumed capsule, as cffi cdata."""
    name = capsule_name(capsule)
    kind = "DLManagedTensorVersioned *" if name == "dltensor_versioned" else "DLManagedTensor *"
    return ffi.cast(kind, _GetPointer(capsule, name.encode()))


def refcount(buf):
    return buf._info().refcount


class Producer:
    """Hands out a prepared capsule, like a foreign library would."""

    def __init__(self, capsule, device=(1, 0)):
        self.capsule, self.device = capsule, device

    def __dlpack__(self, **kwargs):
        return self.capsule

    def __dlpack_device__(self):
        return self.device


class LegacyProducer(Producer):
    """A producer from before the 2023 array API: no keyword arguments."""

    def __dlpack__(self):
        return self.capsule


def np_view(x, **kwargs):
    """numpy's view of a DLPack producer. device="cpu" asks for dl_device=(1, 0):
    numpy cannot read a kDLMetal tensor, Metal buffers offer their CPU address."""
    return np.from_dlpack(x, device="cpu", **kwargs)


def filled(device, shape=(4, 6), dtype="f32"):
    dt = mlxbuf.as_dtype(dtype)
    n = int(np.prod(shape))
    buf = device.alloc_buffer(max(n * dt.size, 1), dt, shape)
    buf.numpy()[...] = (np.arange(n) % 7).reshape(shape).astype(dt.numpy)
    return buf


# ---- export -------------------------------------------------------------------------


def test_dlpack_device(device):
    buf = filled(device)
    expected = (8, 0) if device.backend == "metal" else (1, 0)
    assert buf.__dlpack_device__() == expected


def test_numpy_from_dlpack_aliases(device):
    buf = filled(device)
    arr = np_view(buf)
    assert arr.ctypes.data == buf.data_ptr
    assert arr.shape == buf.shape and arr.dtype == np.float32
    arr[1, 2] = 42
    assert buf.numpy()[1, 2] == 42
    buf.numpy()[3, 5] = -1
    assert arr[3, 5] == -1


def test_plain_numpy_from_dlpack_on_host(host_device):
    buf = filled(host_device)
    arr = np.from_dlpack(buf)
    assert arr.ctypes.data == buf.data_ptr
    np.testing.assert_array_equal(arr, buf.numpy())


def test_numpy_from_dlpack_honours_the_view_offset(device):
    buf = filled(device, (64,), "i32")
    view = buf.slice_view(40, 5).view(shape=(5, 1))
    arr = np_view(view)
    assert arr.ctypes.data == buf.data_ptr + 40
    np.testing.assert_array_equal(arr[:, 0], buf.numpy()[10:15])


def test_numpy_array_keeps_storage_alive(device):
    buf = filled(device)
    expected = buf.numpy().copy()
    arr = np_view(buf)
    live = device.stats().live_storages
    del buf
    gc.collect()
    assert device.stats().live_storages == live
    np.testing.assert_array_equal(arr, expected)
    del arr
    gc.collect()
    assert device.stats().live_storages == live - 1
    assert device.active_memory == 0


@pytest.mark.parametrize("dtype", NUMPY_DTYPES)
def test_every_dtype_through_numpy(device, dtype):
    buf = filled(device, (3, 5), dtype)
    np.testing.assert_array_equal(np_view(buf), buf.numpy())


def test_capsule_kinds_follow_max_version(device):
    buf = filled(device)
    assert capsule_name(buf.__dlpack__()) == "dltensor"
    assert capsule_name(buf.__dlpack__(max_version=(0, 8))) == "dltensor"
    for max_version, minor in [((1, 0), 0), ((1, 1), 1), ((1, 7), 1), ((2, 0), 1)]:
        cap = buf.__dlpack__(max_version=max_version)
        assert capsule_name(cap) == "dltensor_versioned"
        m = managed(cap)
        assert (m.version.major, m.version.minor) == (1, minor)
        assert m.flags == 0


def test_exported_tensor_fields(device):
    buf = filled(device, (64,), "f32")
    view = buf.slice_view(16, 12).view(shape=(3, 4))
    for cap in (view.__dlpack__(), view.__dlpack__(max_version=(1, 0))):
        t = managed(cap).dl_tensor
        assert t.ndim == 2
        assert [t.shape[i] for i in range(2)] == [3, 4]
        assert [t.strides[i] for i in range(2)] == [4, 1]
        assert (t.dtype.code, t.dtype.bits, t.dtype.lanes) == (lib.kDLFloat, 32, 1)
        if device.backend == "host":
            assert t.device.device_type == lib.kDLCPU and t.device.device_id == 0
            assert int(ffi.cast("uintptr_t", t.data)) + t.byte_offset == buf.data_ptr + 16
        else:  # Metal: the MTLBuffer and the offset inside it
            info = buf._info()
            assert t.device.device_type == lib.kDLMetal
            assert int(ffi.cast("uintptr_t", t.data)) == info.native_handle
            assert t.byte_offset == info.native_offset + 16


def test_zero_dim_export(device):
    buf = filled(device, (), "i64")
    buf.numpy()[()] = 77
    arr = np_view(buf)
    assert arr.shape == () and arr[()] == 77


def test_unconsumed_capsules_release_exactly_once(device):
    buf = filled(device)
    assert refcount(buf) == 1
    caps = [buf.__dlpack__(), buf.__dlpack__(max_version=(1, 0)), buf.__dlpack__(max_version=(1, 1))]
    assert refcount(buf) == 4
    caps.pop()
    assert refcount(buf) == 3
    caps.pop()
    assert refcount(buf) == 2
    caps.pop()
    assert refcount(buf) == 1


def test_unconsumed_capsule_alone_keeps_and_then_frees_the_storage(device):
    buf = filled(device)
    frees = device.stats().free_count
    cap = buf.__dlpack__(max_version=(1, 0))
    del buf
    gc.collect()
    assert device.stats().free_count == frees
    assert device.active_memory > 0
    del cap
    assert device.stats().free_count == frees + 1
    assert device.active_memory == 0


@pytest.mark.parametrize("max_version", [None, (1, 0)])
def test_consumed_capsule_is_left_to_its_consumer(device, max_version):
    buf = filled(device)
    cap = buf.__dlpack__(max_version=max_version, dl_device=(1, 0))
    arr = np.from_dlpack(Producer(cap))
    assert capsule_name(cap).startswith("used_")
    assert refcount(buf) == 2
    del cap
    gc.collect()
    assert refcount(buf) == 2  # the capsule's destructor left the tensor alone
    assert arr.ctypes.data == buf.data_ptr
    del arr
    gc.collect()
    assert refcount(buf) == 1


def test_deleter_runs_from_another_thread(device):
    buf = filled(device)
    holder = [np_view(buf)]
    t = threading.Thread(target=holder.clear)
    t.start()
    t.join()
    gc.collect()
    assert refcount(buf) == 1


def test_read_only_storage(device, tmp_path):
    path = tmp_path / "ro.bin"
    path.write_bytes(np.arange(16, dtype=np.float32).tobytes())
    buf = device.map_file(path, dtype="f32")
    cap = buf.__dlpack__(max_version=(1, 0))
    assert managed(cap).flags & lib.CM_DLPACK_FLAG_READ_ONLY
    arr = np_view(buf)  # numpy asks for a versioned capsule
    assert arr.ctypes.data == buf.data_ptr
    assert not arr.flags.writeable
    # A legacy capsule cannot say read-only: a copy, or BufferError with copy=False.
    legacy = buf.__dlpack__()
    t = managed(legacy).dl_tensor
    assert int(ffi.cast("uintptr_t", t.data)) != buf.data_ptr
    with pytest.raises(BufferError) as excinfo:
        buf.__dlpack__(copy=False)
    assert_names(excinfo, "read-only", "legacy")


def test_copy_true_exports_a_copy(device):
    buf = filled(device)
    cap = buf.__dlpack__(max_version=(1, 0), dl_device=(1, 0), copy=True)
    m = managed(cap)
    assert m.flags & lib.CM_DLPACK_FLAG_IS_COPIED
    arr = np.from_dlpack(Producer(cap))
    assert arr.ctypes.data != buf.data_ptr
    np.testing.assert_array_equal(arr, buf.numpy())
    arr[0, 0] = 99
    assert buf.numpy()[0, 0] != 99
    assert np_view(buf, copy=True).ctypes.data != buf.data_ptr


def test_copy_false_is_served_zero_copy(device):
    buf = filled(device)
    assert np_view(buf, copy=False).ctypes.data == buf.data_ptr


def test_dl_device(device):
    buf = filled(device)
    t = managed(buf.__dlpack__(max_version=(1, 0), dl_device=(1, 0))).dl_tensor
    assert t.device.device_type == lib.kDLCPU
    assert int(ffi.cast("uintptr_t", t.data)) == buf.data_ptr
    assert np.from_dlpack(buf, device="cpu").ctypes.data == buf.data_ptr
    with pytest.raises(BufferError) as excinfo:
        buf.__dlpack__(max_version=(1, 0), dl_device=(2, 0))
    assert_names(excinfo, "(2, 0)")
    with pytest.raises(BufferError):
        buf.__dlpack__(dl_device="cpu")


def test_stream(device):
    buf = filled(device)
    assert capsule_name(buf.__dlpack__(stream=-1)) == "dltensor"
    with pytest.raises(BufferError) as excinfo:
        buf.__dlpack__(stream=1)
    assert_names(excinfo, "stream 1")


def test_bad_max_version(device):
    with pytest.raises(BufferError):
        filled(device).__dlpack__(max_version="1.0")


def test_export_waits_for_submitted_writers(device):
    buf = device.alloc_buffer(1 << 22, "u8", (1 << 22,))
    enc = device.command_encoder()
    enc.fill(buf, 0x77)
    enc.commit()
    arr = np_view(buf)
    assert (arr == 0x77).all()
    enc.wait()


def test_bf16_exports_as_kdlbfloat(device):
    buf = device.alloc_buffer(8, "bf16", (4,))
    t = managed(buf.__dlpack__(max_version=(1, 0))).dl_tensor
    assert (t.dtype.code, t.dtype.bits) == (lib.kDLBfloat, 16)


@given(
    dtype=st.sampled_from(NUMPY_DTYPES),
    shape=st.lists(st.integers(0, 5), min_size=0, max_size=4).map(tuple),
    offset_elems=st.integers(0, 16),
    versioned=st.booleans(),
)
def test_export_matches_numpy_view(dtype, shape, offset_elems, versioned):
    dev = mlxbuf.default_device()
    dt = mlxbuf.as_dtype(dtype)
    n = int(np.prod(shape))
    buf = dev.alloc_buffer((n + offset_elems) * dt.size + 8, "u8", ((n + offset_elems) * dt.size + 8,))
    buf.numpy()[:] = np.arange(buf.nbytes) % 2
    view = buf.view(dt, (n + offset_elems,)).slice_view(offset_elems * dt.size, n).view(shape=shape)
    arr = np.from_dlpack(Producer(view.__dlpack__(max_version=(1, 0) if versioned else None, dl_device=(1, 0))))
    np.testing.assert_array_equal(arr, view.numpy())
    if n:
        assert arr.ctypes.data == view.data_ptr


# ---- import -------------------------------------------------------------------------


def test_from_dlpack_numpy_zero_copy_keeps_producer_alive(device):
    base = np.zeros(4096 + 16384, np.uint8)
    start = -base.ctypes.data % 16384
    array = base[start : start + 4096].view(np.float32)
    array[:] = np.arange(1024)
    ref = weakref.ref(base)
    buf = mlxbuf.from_dlpack(array, device=device)
    assert buf.data_ptr == array.ctypes.data
    assert buf.storage_kind == "external"
    assert buf.dtype is mlxbuf.DType.F32 and buf.shape == (1024,)
    array[3] = -5
    assert buf.numpy()[3] == -5
    del array, base
    gc.collect()
    assert ref() is not None
    assert buf.numpy()[1023] == 1023
    del buf
    gc.collect()
    assert ref() is None


@pytest.mark.parametrize("dtype", NUMPY_DTYPES)
def test_from_dlpack_every_dtype(host_device, dtype):
    array = (np.arange(12) % 2).reshape(3, 4).astype(mlxbuf.as_dtype(dtype).numpy)
    buf = mlxbuf.from_dlpack(array, device=host_device)
    assert buf.dtype is mlxbuf.as_dtype(dtype)
    np.testing.assert_array_equal(buf.numpy(), array)
    assert buf.data_ptr == array.ctypes.data


def test_from_dlpack_does_not_count_or_register(host_device):
    array = np.ones(1024, np.float32)
    buf = mlxbuf.from_dlpack(array, device=host_device)
    assert host_device.active_memory == 0
    assert buf.residency_set is None


def test_from_dlpack_strided_copies(device):
    array = np.arange(60, dtype=np.int32).reshape(6, 10)[::2, 7:1:-2]
    buf = mlxbuf.from_dlpack(array, device=device)
    np.testing.assert_array_equal(buf.numpy(), array)
    assert buf.storage_kind == "device"
    with pytest.raises(BufferError) as excinfo:
        mlxbuf.from_dlpack(array, device=device, copy=False)
    assert_names(excinfo, "contiguous")


def test_from_dlpack_copy_true(device):
    array = np.arange(16, dtype=np.int16)
    buf = mlxbuf.from_dlpack(array, device=device, copy=True)
    assert buf.data_ptr != array.ctypes.data
    np.testing.assert_array_equal(buf.numpy(), array)


def test_from_dlpack_read_only_producer(host_device):
    array = np.arange(8, dtype=np.float64)
    array.flags.writeable = False
    buf = mlxbuf.from_dlpack(array, device=host_device)
    assert buf.data_ptr == array.ctypes.data
    assert not buf.writable


def test_from_dlpack_empty_and_zero_dim(device):
    empty = mlxbuf.from_dlpack(np.zeros((3, 0), np.float32), device=device)
    assert empty.shape == (3, 0) and empty.numpy().size == 0
    scalar = mlxbuf.from_dlpack(np.array(7, np.int8), device=device)
    assert scalar.shape == () and scalar.numpy()[()] == 7


def test_from_dlpack_round_trip_between_devices(device, other_device):
    buf = filled(device, (5, 3), "i16")
    again = mlxbuf.from_dlpack(buf, device=other_device)
    assert again.device is other_device
    np.testing.assert_array_equal(again.numpy(), buf.numpy())
    if device.backend == "host":
        assert again.data_ptr == buf.data_ptr
        assert refcount(buf) == 2  # the import holds the exporter's tensor
        del again
        gc.collect()
        assert refcount(buf) == 1


def test_from_dlpack_same_device_clones(device):
    buf = filled(device)
    again = mlxbuf.from_dlpack(buf)
    assert again is not buf and again._storage == buf._storage
    copied = mlxbuf.from_dlpack(buf, copy=True)
    assert copied.data_ptr != buf.data_ptr
    np.testing.assert_array_equal(copied.numpy(), buf.numpy())


def test_from_dlpack_legacy_producer_and_raw_capsule(host_device, other_device):
    src = filled(other_device)
    buf = mlxbuf.from_dlpack(LegacyProducer(src.__dlpack__(dl_device=(1, 0))), device=host_device)
    np.testing.assert_array_equal(buf.numpy(), src.numpy())
    cap = src.__dlpack__(max_version=(1, 0), dl_device=(1, 0))
    buf2 = mlxbuf.from_dlpack(cap, device=host_device)
    assert capsule_name(cap) == "used_dltensor_versioned"
    with pytest.raises(BufferError) as excinfo:
        mlxbuf.from_dlpack(cap, device=host_device)
    assert_names(excinfo, "consumed")
    del buf, buf2, cap
    gc.collect()
    assert refcount(src) == 1


def test_from_dlpack_rejects_newer_major_and_frees_it(host_device):
    src = filled(host_device)
    cap = src.__dlpack__(max_version=(1, 0))
    managed(cap).version.major = 2
    with pytest.raises(BufferError) as excinfo:
        mlxbuf.from_dlpack(cap, device=host_device)
    assert_names(excinfo, "2.", "major version 1")
    assert capsule_name(cap) == "dltensor_versioned"
    del cap, excinfo  # the traceback's frames hold the capsule too
    gc.collect()
    assert refcount(src) == 1


def test_from_dlpack_unknown_dtype(host_device):
    with pytest.raises(mlxbuf.UnsupportedDtype) as excinfo:
        mlxbuf.from_dlpack(np.zeros(4, np.complex64), device=host_device)
    assert_names(excinfo, "code 5", "64 bits")


def test_from_dlpack_needs_the_protocol():
    with pytest.raises(TypeError) as excinfo:
        mlxbuf.from_dlpack([1, 2, 3])
    assert_names(excinfo, "list", "__dlpack__")


def test_from_dlpack_foreign_device_needs_copy(host_device, other_device):
    src = filled(other_device)
    cap = src.__dlpack__(max_version=(1, 0))
    managed(cap).dl_tensor.device.device_type = lib.kDLCUDA
    with pytest.raises(BufferError) as excinfo:
        mlxbuf.from_dlpack(Producer(cap, (2, 0)), device=host_device)
    assert_names(excinfo, "device type 2")


@given(
    shape=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    dtype=st.sampled_from(["f32", "i64", "u8", "f16"]),
    steps=st.lists(st.integers(-2, 3).filter(bool), min_size=3, max_size=3),
)
def test_from_dlpack_matches_numpy_for_any_layout(shape, dtype, steps):
    big = [n * abs(s) for n, s in zip(shape, steps)]
    base = (np.arange(int(np.prod(big))) % 11).astype(mlxbuf.as_dtype(dtype).numpy).reshape(big)
    array = base[tuple(slice(None, None, s) for s in steps[: len(shape)])]
    dev = mlxbuf.default_device()
    buf = mlxbuf.from_dlpack(array, device=dev)
    assert buf.shape == array.shape
    np.testing.assert_array_equal(buf.numpy(), array)
    # Metal wraps only page-aligned memory; anything else is copied.
    wrappable = dev.backend == "host" or array.ctypes.data % dev.page_size == 0
    assert (buf.data_ptr == array.ctypes.data) == (array.flags.c_contiguous and wrappable)


# ---- torch (when installed) ------------------------------------------------------------


@needs_torch
def test_torch_from_dlpack_aliases_and_keeps_alive(host_device):  # pragma: no cover - needs torch
    buf = filled(host_device)
    tensor = torch.from_dlpack(buf)
    assert tensor.data_ptr() == buf.data_ptr
    tensor[0, 0] = 123
    assert buf.numpy()[0, 0] == 123
    del buf
    gc.collect()
    assert tensor[0, 0].item() == 123


@needs_torch
def test_from_dlpack_of_a_torch_tensor(host_device):  # pragma: no cover - needs torch
    tensor = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    buf = mlxbuf.from_dlpack(tensor, device=host_device)
    assert buf.data_ptr == tensor.data_ptr()
    np.testing.assert_array_equal(buf.numpy(), tensor.numpy())


# ---- interpreter shutdown ---------------------------------------------------------------

SHUTDOWN_SCRIPT = r"""
import numpy as np, mlxbuf
dev = mlxbuf.Device("host")
buf = dev.alloc_buffer(4096, "f32", (1024,))
# Left for shutdown: an unconsumed capsule of each kind, a numpy consumer,
# and an import whose deleter belongs to numpy.
caps = [buf.__dlpack__(), buf.__dlpack__(max_version=(1, 0))]
arr = np.from_dlpack(buf)
imported = mlxbuf.from_dlpack(np.arange(10.0), device=dev)
cycle = [caps, arr]
cycle.append(cycle)
print("ok")
"""


def test_capsules_alive_at_interpreter_exit():
    proc = subprocess.run([sys.executable, "-c", SHUTDOWN_SCRIPT], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
    assert proc.stderr == ""


def test_bf16_round_trip_between_devices(device, other_device):
    bits = np.array([0x3F80, 0x4000, 0xC040, 0x0000], dtype=np.uint16)
    buf = device.from_numpy(bits, copy=True).view("bf16")
    again = mlxbuf.from_dlpack(buf, device=other_device)
    assert again.dtype is mlxbuf.DType.BF16
    np.testing.assert_array_equal(again.as_slice("u16"), bits)


def test_kdlmetal_tensor_on_a_host_device_is_refused(host_device, other_device):
    src = filled(other_device)
    cap = src.__dlpack__(max_version=(1, 0))
    managed(cap).dl_tensor.device.device_type = lib.kDLMetal
    with pytest.raises(BufferError) as excinfo:
        mlxbuf.from_dlpack(cap, device=host_device, copy=False)
    assert_names(excinfo, "kDLMetal", "host")
    with pytest.raises(BufferError) as excinfo:
        mlxbuf.from_dlpack(cap, device=host_device)
    assert_names(excinfo, "device type 8")
    assert capsule_name(cap) == "dltensor_versioned"
