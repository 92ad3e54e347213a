"""DLPack: export (__dlpack__), import (mlxbuf.from_dlpack), capsule ownership."""

import ctypes
import gc
import subprocess
import sys
import threading
import weakref

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mlxbuf
from mlxbuf._cmetal import ffi, lib
from support import assert_names, fuzz_examples, release_deferred

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
    assert device.active_memory == 0
    release_deferred(device)
    assert device.stats().free_count == frees + 1


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


# ---- hostile producers: hand-built tensors -------------------------------------------------

_CapsuleNew = ctypes.PYFUNCTYPE(ctypes.py_object, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p)(
    ("PyCapsule_New", ctypes.pythonapi)
)
_DESTRUCTOR = int(ffi.cast("uintptr_t", lib.cm_py_capsule_destructor()))
U64 = 1 << 64


class HandMade:
    """A DLManagedTensor(Versioned) with any field values, whose deleter counts its calls.

    ``data`` is an address (int); ``capsule()`` wraps the tensor in a capsule
    with mlxbuf's capsule destructor, which runs the deleter of a capsule
    nobody consumed, as producers do.
    """

    def __init__(self, data, shape, strides=None, byte_offset=0, dtype=(lib.kDLFloat, 32, 1),
                 device=(lib.kDLCPU, 0), versioned=True):
        self.deleted = 0
        self.versioned = versioned
        kind = "DLManagedTensorVersioned" if versioned else "DLManagedTensor"
        self.managed = ffi.new(f"{kind} *")
        self._shape = ffi.new("int64_t[]", list(shape) or [1])
        self._strides = ffi.new("int64_t[]", list(strides)) if strides is not None else ffi.NULL

        def deleter(_self):
            self.deleted += 1

        self._deleter = ffi.callback(f"void({kind} *)", deleter)
        if versioned:
            self.managed.version.major, self.managed.version.minor = 1, 1
        self.managed.deleter = self._deleter
        t = self.managed.dl_tensor
        t.data = ffi.cast("void *", data)
        t.device.device_type, t.device.device_id = device
        t.ndim = len(shape)
        t.dtype.code, t.dtype.bits, t.dtype.lanes = dtype
        t.shape = self._shape
        t.strides = self._strides
        t.byte_offset = byte_offset

    def capsule(self):
        name = b"dltensor_versioned" if self.versioned else b"dltensor"
        return _CapsuleNew(int(ffi.cast("uintptr_t", self.managed)), name, _DESTRUCTOR)


def refused_and_given_back(made, device, copy, fragment):
    """Importing the hand-made tensor raises BufferError naming ``fragment``,
    makes no storage, and leaves the capsule to give the tensor back once."""
    caps = [made.capsule()]
    with pytest.raises(BufferError) as excinfo:
        mlxbuf.from_dlpack(caps[0], device=device, copy=copy)
    assert_names(excinfo, fragment)
    del excinfo
    assert device.stats().live_storages == 0
    assert given_back(made, caps)


def given_back(made, caps):
    """Dropping the only reference to an unconsumed capsule (``caps``, a
    one-element list) gives the tensor back exactly once."""
    assert capsule_name(caps[0]).startswith("dltensor")
    caps.clear()  # reference counting frees it: no collection needed
    return made.deleted == 1


@pytest.mark.parametrize("copy", [None, True, False])
@pytest.mark.parametrize("strides", [None, (1, 2)], ids=["contiguous", "strided"])
def test_null_data_is_refused_on_every_path(host_device, copy, strides):
    """A NULL data pointer with elements to read was copied from (copy=True,
    or a strided tensor with copy=None), handing out whatever lay at low
    addresses: the copy path now refuses what the zero-copy path refuses."""
    refused_and_given_back(HandMade(0, (2, 2), strides), host_device, copy, "NULL")


def test_null_data_of_an_empty_tensor_is_fine(host_device):
    made = HandMade(0, (3, 0))
    buf = mlxbuf.from_dlpack(made.capsule(), device=host_device)
    assert buf.shape == (3, 0) and buf.numpy().size == 0
    gc.collect()
    assert made.deleted == 1


@pytest.mark.parametrize(
    "byte_offset, strides, copy",
    [
        (U64 - 16, None, None),  # gave a writable Buffer 16 bytes before the producer's memory
        (U64 - 16, None, True),
        (1 << 63, None, True),  # segfaulted
        ((1 << 63) + (1 << 62), None, None),
        (0, (-(1 << 50),), True),  # negative strides below address 0
        (0, ((1 << 61),), True),  # positive strides past 2**64
        (U64 - 8, (1,), True),
    ],
    ids=["offset-2**64-16", "offset-2**64-16-copy", "offset-2**63-copy", "offset-3*2**62", "strides-below-0",
         "strides-past-2**64", "offset-near-end-strided"],
)
def test_address_range_that_wraps_is_refused(host_device, byte_offset, strides, copy):
    backing = np.arange(16, dtype=np.float32)
    made = HandMade(backing.ctypes.data, (4,), strides, byte_offset=byte_offset)
    refused_and_given_back(made, host_device, copy, "outside the address space")


@settings(max_examples=fuzz_examples(100), deadline=None)
@given(
    start=st.integers(0, 256),
    shape=st.lists(st.integers(0, 4), min_size=0, max_size=3),
    strides=st.one_of(st.none(), st.lists(st.integers(-9, 9), min_size=3, max_size=3)),
    wild=st.sampled_from([0, 1 << 63, (1 << 63) + (1 << 62), U64 - 4096, U64 - 1]),
    null=st.booleans(),
    versioned=st.booleans(),
    copy=st.sampled_from([None, True]),
)
def test_hand_made_tensors_fuzz(start, shape, strides, wild, null, versioned, copy):
    """Random fields over a real array: an import either reads exactly the
    elements the fields describe, or raises BufferError; the tensor is given
    back exactly once either way. (Offsets that merely point at unmapped
    memory are a lying producer no consumer can detect; every value of
    ``wild`` is one no memory can be at.)"""
    backing = (np.arange(1024) % 251).astype(np.float32)
    strides = None if strides is None else strides[: len(shape)]
    n = int(np.prod(shape))
    data = 0 if null else backing.ctypes.data + 4 * 512  # room on both sides for negative strides
    byte_offset = 4 * start + wild if 4 * start + wild < U64 else wild - 4 * start
    made = HandMade(data, shape, strides, byte_offset=byte_offset, versioned=versioned)
    caps = [made.capsule()]
    el_strides = strides
    if el_strides is None:
        el_strides, step = [0] * len(shape), 1
        for i in reversed(range(len(shape))):
            el_strides[i], step = step, step * shape[i]
    valid = n == 0 or not (null or wild)
    try:
        buf = mlxbuf.from_dlpack(caps[0], device=mlxbuf.default_device(), copy=copy)
    except BufferError:
        buf = None  # the traceback (which holds the capsule) goes with the except block
    if buf is None:
        assert not valid
        assert given_back(made, caps)
        return
    assert valid, "an import of a tensor outside the address space succeeded"
    expected = np.empty(shape, np.float32)
    for index in np.ndindex(*shape):
        expected[index] = backing[512 + start + sum(i * s for i, s in zip(index, el_strides))]
    np.testing.assert_array_equal(buf.numpy(), expected)
    del buf
    caps.clear()
    assert made.deleted == 1


def test_legacy_hand_made_tensor_with_a_wrapping_offset(host_device):
    backing = np.zeros(4, np.float32)
    made = HandMade(backing.ctypes.data, (4,), byte_offset=U64 - 4, versioned=False)
    refused_and_given_back(made, host_device, True, "outside the address space")


# ---- export arguments: checked before anything is exported ---------------------------------


@pytest.mark.parametrize(
    "kwargs, error, fragment",
    [
        ({"max_version": (1, -1)}, BufferError, "(1, -1)"),
        ({"max_version": (-1, 0)}, BufferError, "(-1, 0)"),
        ({"max_version": (1, 1 << 32)}, BufferError, str(1 << 32)),
        ({"max_version": (1,)}, BufferError, "(1,)"),
        ({"max_version": (1, 0, 0)}, BufferError, "(1, 0, 0)"),
        ({"max_version": (True, 0)}, BufferError, "True"),
        ({"max_version": "10"}, BufferError, "'10'"),
        ({"max_version": (1, 0.5)}, BufferError, "0.5"),
        ({"dl_device": (1,)}, BufferError, "(1,)"),
        ({"dl_device": (1, 1 << 40)}, BufferError, str(1 << 40)),
        ({"stream": "default"}, BufferError, "'default'"),
        ({"stream": 1.0}, BufferError, "1.0"),
        ({"copy": "yes"}, TypeError, "'yes'"),
        ({"copy": 1}, TypeError, "1"),
    ],
)
def test_bad_export_arguments_leak_nothing(device, kwargs, error, fragment):
    """max_version=(1, -1) raised OverflowError after the export had taken
    its storage reference: 1,000 such calls leaked 1 GiB."""
    buf = filled(device)
    live = device.stats().live_storages
    for _ in range(200):
        with pytest.raises(error) as excinfo:
            buf.__dlpack__(**kwargs)
    assert_names(excinfo, fragment)
    del excinfo
    gc.collect()
    assert refcount(buf) == 1
    assert device.stats().live_storages == live


def test_numpy_integers_are_fine_export_arguments(device):
    buf = filled(device)
    cap = buf.__dlpack__(max_version=(np.int64(1), np.uint8(0)), dl_device=(np.int32(1), np.int32(0)))
    assert capsule_name(cap) == "dltensor_versioned"


def test_a_failure_after_the_export_releases_it(device, monkeypatch):
    buf = filled(device)

    def fail(*args):
        raise MemoryError("injected")

    monkeypatch.setattr(mlxbuf.dlpack, "_PyCapsule_New", fail)
    for max_version in (None, (1, 0)):
        with pytest.raises(MemoryError):
            buf.__dlpack__(max_version=max_version)
    assert refcount(buf) == 1


# ---- import: exception-safe end to end ------------------------------------------------------


def test_a_failure_after_the_import_frees_the_tensor_once(host_device, monkeypatch):
    """The storage took the tensor; the Buffer around it then fails (injected
    in its shape validation): the storage is released and runs the
    producer's deleter exactly once, and the capsule, consumed, does not."""
    backing = np.arange(8, dtype=np.float32)
    made = HandMade(backing.ctypes.data, (8,))
    capsule = made.capsule()

    def fail(shape):
        raise RuntimeError("injected after the import")

    monkeypatch.setattr(mlxbuf.buffer, "_shape_arg", fail)
    with pytest.raises(RuntimeError):
        mlxbuf.from_dlpack(capsule, device=host_device)
    monkeypatch.undo()
    gc.collect()
    assert made.deleted == 1
    assert capsule_name(capsule) == "used_dltensor_versioned"
    del capsule
    gc.collect()
    assert made.deleted == 1
    assert host_device.stats().live_storages == 0


def test_a_failure_before_the_import_leaves_the_capsule_whole(host_device, monkeypatch):
    backing = np.arange(8, dtype=np.float32)
    made = HandMade(backing.ctypes.data, (8,))
    capsule = made.capsule()

    def fail(*args):
        raise RuntimeError("injected before the import")

    monkeypatch.setattr(mlxbuf.dlpack, "_PyCapsule_SetName", fail)
    with pytest.raises(RuntimeError):
        mlxbuf.from_dlpack(capsule, device=host_device)
    monkeypatch.undo()
    assert made.deleted == 0
    buf = mlxbuf.from_dlpack(capsule, device=host_device)  # still importable
    assert buf.data_ptr == backing.ctypes.data
    del buf
    gc.collect()
    assert made.deleted == 1


@pytest.mark.parametrize("copy", [None, False])
def test_a_failed_import_gives_the_tensor_back_to_the_capsule(host_device, copy):
    """The import claims the capsule first; when the wrap fails (an injected
    allocation failure) the claim is undone, so the capsule's destructor
    still frees the tensor."""
    backing = np.arange(8, dtype=np.float32)
    made = HandMade(backing.ctypes.data, (8,))
    caps = [made.capsule()]
    host_device._debug_fail_alloc(1)
    try:
        with pytest.raises(mlxbuf.BufferAllocationError):
            mlxbuf.from_dlpack(caps[0], device=host_device, copy=copy)
    finally:
        host_device._debug_fail_alloc(0)
    assert made.deleted == 0
    assert given_back(made, caps)
