"""External memory: Buffer.from_raw and Device.from_numpy."""

import ctypes
import gc
import subprocess
import sys
import threading
import weakref

import numpy as np
import pytest

import mlxbuf
from support import assert_names, page_aligned_array


class Owner:
    """A weak-referenceable owner of a ctypes block of memory."""

    def __init__(self, n):
        self.block = (ctypes.c_uint8 * n)()
        self.address = ctypes.addressof(self.block)


# ---- from_raw (host memory) ---------------------------------------------------


def test_from_raw_aliases_memory(host_device):
    owner = Owner(64)
    buf = mlxbuf.Buffer.from_raw(host_device, owner.address, 64, "u32", (4, 4), owner=owner)
    assert buf.contents_ptr == owner.address
    assert buf.storage_kind == "external"
    owner.block[4] = 9
    assert buf.numpy()[0, 1] == 9
    buf.numpy()[3, 3] = 0x01020304
    assert bytes(owner.block[60:64]) == (0x01020304).to_bytes(4, sys.byteorder)


def test_from_raw_keeps_owner_alive_until_last_reference(host_device):
    owner = Owner(32)
    ref = weakref.ref(owner)
    buf = mlxbuf.Buffer.from_raw(host_device, owner.address, 32, owner=owner)
    view = buf.slice_view(8, 4)
    del owner, buf
    gc.collect()
    assert ref() is not None
    del view
    gc.collect()
    assert ref() is None


def test_from_raw_owner_survives_while_a_command_buffer_holds_it(host_device):
    owner = Owner(4096)
    ref = weakref.ref(owner)
    buf = mlxbuf.Buffer.from_raw(host_device, owner.address, 4096, owner=owner)
    seen = owner.block  # the memory itself, to check the fill landed
    enc = host_device.command_encoder()
    enc.fill(buf, 0x3C)
    del owner, buf
    gc.collect()
    assert ref() is not None  # encoded, not yet committed: the hold keeps it
    enc.commit()
    enc.wait()
    assert bytes(seen) == b"\x3c" * 4096
    del enc
    gc.collect()
    assert ref() is None


def test_from_raw_owner_released_from_the_worker_thread(host_device):
    # The command buffer's completion drops the last reference on the host
    # backend's worker thread: the owner must still be released (with the GIL).
    owners = [Owner(4096) for _ in range(8)]
    refs = [weakref.ref(o) for o in owners]
    enc = host_device.command_encoder()
    for o in owners:
        enc.fill(mlxbuf.Buffer.from_raw(host_device, o.address, 4096, owner=o), 1)
    del owners, o
    gc.collect()
    enc.commit()
    enc.wait()
    gc.collect()
    assert all(r() is None for r in refs)


def test_from_raw_owner_refcount_is_balanced(host_device):
    owner = Owner(16)
    base = sys.getrefcount(owner)
    buf = mlxbuf.Buffer.from_raw(host_device, owner.address, 16, owner=owner)
    assert sys.getrefcount(owner) == base + 1
    del buf
    gc.collect()
    assert sys.getrefcount(owner) == base


def test_from_raw_failure_does_not_leak_the_owner(host_device):
    owner = Owner(16)
    base = sys.getrefcount(owner)
    host_device._debug_fail_alloc(1)
    with pytest.raises(mlxbuf.BufferAllocationError):
        mlxbuf.Buffer.from_raw(host_device, owner.address, 16, owner=owner)
    host_device._debug_fail_alloc(0)
    assert sys.getrefcount(owner) == base


def test_from_raw_release_from_another_thread(host_device):
    owner = Owner(16)
    ref = weakref.ref(owner)
    holder = [mlxbuf.Buffer.from_raw(host_device, owner.address, 16, owner=owner)]
    del owner
    t = threading.Thread(target=holder.clear)
    t.start()
    t.join()
    gc.collect()
    assert ref() is None


def test_from_raw_accepts_pointer_types(host_device):
    owner = Owner(8)
    for pointer in (owner.address, ctypes.c_void_p(owner.address), ctypes.pointer(owner.block),
                    mlxbuf._cmetal.ffi.cast("void *", owner.address)):
        buf = mlxbuf.Buffer.from_raw(host_device, pointer, 8, owner=owner)
        assert buf.contents_ptr == owner.address


def test_from_raw_read_only(host_device):
    owner = Owner(8)
    buf = mlxbuf.Buffer.from_raw(host_device, owner.address, 8, owner=owner, writable=False)
    assert not buf.writable
    assert not buf.numpy().flags.writeable


def test_external_storage_is_not_resident_nor_counted(host_device):
    owner = Owner(4096)
    buf = mlxbuf.Buffer.from_raw(host_device, owner.address, 4096, owner=owner)
    assert host_device.active_memory == 0
    assert buf.residency_set is None
    pool = mlxbuf.BufferPool(host_device)
    pool.register_existing(buf)
    pool.register_existing(buf)
    assert host_device.residency_set.contains(buf)
    assert host_device.residency_set.allocation_count == 1
    pool.close()


@pytest.mark.parametrize(
    "args, kwargs, error, fragments",
    [
        ((10,), {"dtype": "f32"}, mlxbuf.InvalidArgument, ["10-byte", "4-byte"]),
        ((16,), {"dtype": "f32", "shape": (5,)}, mlxbuf.InvalidArgument, ["20 bytes", "16-byte"]),
        ((0,), {}, mlxbuf.InvalidArgument, ["byte_len"]),
        ((-1,), {}, mlxbuf.InvalidArgument, ["byte_len", "-1"]),
    ],
    ids=["partial-element", "shape-too-big", "zero-length", "negative-length"],
)
def test_from_raw_bad_arguments(host_device, args, kwargs, error, fragments):
    owner = Owner(16)
    with pytest.raises(error) as excinfo:
        mlxbuf.Buffer.from_raw(host_device, owner.address, *args, owner=owner, **kwargs)
    assert_names(excinfo, *fragments)


def test_from_raw_null_pointer(host_device):
    with pytest.raises(mlxbuf.InvalidArgument) as excinfo:
        mlxbuf.Buffer.from_raw(host_device, 0, 16)
    assert_names(excinfo, "NULL")


def test_native_handles_need_metal(host_device):
    with pytest.raises(mlxbuf.Unsupported) as excinfo:
        mlxbuf.Buffer.from_raw(host_device, 0x1000)
    assert_names(excinfo, "host backend", "0x1000")


@pytest.mark.requires_metal
def test_from_raw_wraps_an_mtlbuffer():  # pragma: no cover - needs Metal
    device = mlxbuf.Device("metal")
    src = device.alloc_buffer(4096, "u8", (4096,))
    handle = src._info().native_handle
    wrapped = mlxbuf.Buffer.from_raw(device, handle, dtype="u32")
    assert wrapped.contents_ptr == src.contents_ptr
    assert wrapped.shape == (1024,)


# ---- from_numpy ---------------------------------------------------------------------


def test_from_numpy_is_zero_copy_and_keeps_array_alive(device):
    array = page_aligned_array(1024, np.float32, 16384)
    array[:] = np.arange(1024)
    ref = weakref.ref(array.base)
    buf = device.from_numpy(array)
    assert buf.data_ptr == array.ctypes.data
    assert buf.shape == (1024,) and buf.dtype is mlxbuf.DType.F32
    array[5] = -1
    assert buf.numpy()[5] == -1
    del array
    gc.collect()
    assert ref() is not None
    assert buf.numpy()[1023] == 1023
    del buf
    gc.collect()
    assert ref() is None


@pytest.mark.parametrize("dtype", ["f32", "f16", "f64", "u8", "u16", "u32", "u64", "i8", "i16", "i32", "i64", "bool"])
def test_from_numpy_every_dtype(device, dtype):
    np_dtype = mlxbuf.as_dtype(dtype).numpy
    array = page_aligned_array(12, np_dtype, 16384).reshape(3, 4)
    array[...] = (np.arange(12) % 2).reshape(3, 4).astype(np_dtype)
    buf = device.from_numpy(array)
    assert buf.dtype is mlxbuf.as_dtype(dtype)
    assert buf.shape == (3, 4)
    np.testing.assert_array_equal(buf.numpy(), array)


def test_from_numpy_read_only_array_gives_read_only_buffer(host_device):
    array = np.arange(8, dtype=np.int32)
    array.flags.writeable = False
    buf = host_device.from_numpy(array)
    assert buf.data_ptr == array.ctypes.data
    assert not buf.writable
    with pytest.raises(ValueError):
        buf.numpy()[0] = 1


@pytest.mark.parametrize(
    "make, why",
    [
        (lambda: np.arange(20, dtype=np.int32)[::2], "C-contiguous"),
        (lambda: np.arange(10, dtype=">i4"), "byte order"),
        (lambda: np.frombuffer(b"\0" + np.arange(4, dtype=np.int32).tobytes(), dtype=np.int32, offset=1), "aligned"),
        (lambda: np.zeros((0, 3), np.float32), "empty"),
    ],
    ids=["strided", "big-endian", "unaligned", "empty"],
)
def test_from_numpy_copies_what_it_cannot_wrap(device, make, why):
    array = make()
    buf = device.from_numpy(array)
    assert buf.shape == array.shape
    np.testing.assert_array_equal(buf.numpy(), array)
    if array.size:
        assert buf.data_ptr != array.ctypes.data
    assert buf.storage_kind == "device"
    with pytest.raises(BufferError) as excinfo:
        device.from_numpy(make(), copy=False)
    assert_names(excinfo, why)


def test_from_numpy_copy_true_always_copies(device):
    array = page_aligned_array(16, np.int16, 16384)
    buf = device.from_numpy(array, copy=True)
    assert buf.data_ptr != array.ctypes.data
    assert buf.storage_kind == "device"
    array[0] = 7
    assert buf.numpy()[0] == 0


def test_from_numpy_of_a_list_and_a_scalar(device):
    buf = device.from_numpy([[1.0, 2.0], [3.0, 4.0]])
    np.testing.assert_array_equal(buf.numpy(), [[1.0, 2.0], [3.0, 4.0]])
    scalar = device.from_numpy(np.float32(2.5))
    assert scalar.shape == () and scalar.numpy() == np.float32(2.5)


def test_from_numpy_unsupported_dtype(device):
    with pytest.raises(mlxbuf.UnsupportedDtype):
        device.from_numpy(np.zeros(3, np.complex64))


def test_from_numpy_unaligned_on_host_is_still_zero_copy(host_device):
    array = np.arange(100, dtype=np.uint8)[3:]
    buf = host_device.from_numpy(array)
    assert buf.data_ptr == array.ctypes.data


@pytest.mark.requires_metal
def test_from_numpy_unaligned_on_metal_copies():  # pragma: no cover - needs Metal
    device = mlxbuf.Device("metal")
    array = np.arange(100, dtype=np.uint8)[3:]
    buf = device.from_numpy(array)
    assert buf.data_ptr != array.ctypes.data
    with pytest.raises(BufferError):
        device.from_numpy(array, copy=False)


# ---- interpreter shutdown --------------------------------------------------------------

SHUTDOWN_SCRIPT = r"""
import ctypes, numpy as np, mlxbuf
dev = mlxbuf.Device("host")
# External storages alive at exit, one held by an in-flight command buffer,
# one only by a numpy view: their owners are released during shutdown.
arr = np.arange(1 << 16, dtype=np.uint8)
held = dev.from_numpy(arr)
enc = dev.command_encoder()
enc.fill(held, 1)
enc.commit()
block = (ctypes.c_uint8 * 4096)()
view = mlxbuf.Buffer.from_raw(dev, ctypes.addressof(block), 4096, owner=block).numpy()
cycle = [dev.from_numpy(np.ones(10))]
cycle.append(cycle)
print("ok")
"""


def test_external_storages_alive_at_interpreter_exit():
    proc = subprocess.run([sys.executable, "-c", SHUTDOWN_SCRIPT], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
    assert proc.stderr == ""
