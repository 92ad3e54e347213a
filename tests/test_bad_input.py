"""Bad-input catalog: every public entry point, fed what it must refuse.

One table: each row calls one entry point with a wrong type, a negative or
huge value (sizes near 2**64, shapes whose product overflows 64 bits), an
out-of-range offset, or a closed or foreign object, and names the
exception it must raise and the fragments its message must contain (the
bad value, and the limit where there is one). After every row nothing has
leaked, and after the whole table the process still allocates, computes
and frees correctly.

Rows that other files already test one by one are not repeated here:
zero/negative/float/bool/None sizes, unknown dtypes and simple bad shapes
of Device.alloc_buffer and BufferPool.alloc (test_buffer.py,
test_pool.py), bad slices and views of a 4 KiB buffer (test_buffer.py),
fill values and copy sizes (test_encoder.py), as_dtype spellings
(test_dtypes_errors.py), keep-alive strings and negatives
(test_residency.py), malformed safetensors files (test_safetensors.py).
The arithmetic at the limits (size classes near 2**64, offset + length in
C) is checked at the C boundary at the end of this file.
"""

import ctypes
import math

import numpy as np
import pytest

import mlxbuf
from mlxbuf._cmetal import ffi, lib
from support import assert_names

U64 = 1 << 64
BIG_SHAPE = (1 << 32, 1 << 32, 1 << 32)  # 2**96 elements
BIG = math.prod(BIG_SHAPE)


class Ctx:
    """The objects the rows act on (built fresh for each row)."""

    def __init__(self, device, other, tmp_path):
        self.dev = device
        self.other = other
        self.buf = device.alloc_buffer(4096, "f32", (1024,))
        self.foreign = other.alloc_buffer(64, "u8", (64,))
        self.pool = mlxbuf.BufferPool(device)
        self.closed = mlxbuf.BufferPool(device)
        self.closed.close()
        self.enc = device.command_encoder()
        self.done = device.command_encoder()
        self.done.commit_and_wait()
        self.rs = device.residency_set
        self.file = tmp_path / "data.bin"
        self.file.write_bytes(bytes(range(256)) * 16)
        self.readonly = device.map_file(self.file)
        self.max = device.max_buffer_length


def row(name, call, cls, *fragments):
    return pytest.param(call, cls, fragments, id=name)


CASES = [
    # ---- Device ------------------------------------------------------------------------
    row("Device(int)", lambda c: mlxbuf.Device(3), mlxbuf.InvalidArgument, "3", "'host'"),
    row("Device(bytes)", lambda c: mlxbuf.Device(b"host"), mlxbuf.InvalidArgument, "b'host'"),
    row("alloc 2**64-1", lambda c: c.dev.alloc_buffer(U64 - 1, "u8", (1,)), mlxbuf.BufferAllocationError,
        str(U64 - 1), "maximum buffer length"),
    row("alloc 2**63 as numpy", lambda c: c.dev.alloc_buffer(np.uint64(1 << 63), "u8", (1,)),
        mlxbuf.BufferAllocationError, str(1 << 63)),
    row("alloc max+1", lambda c: c.dev.alloc_buffer(c.max + 1, "u8", (1,)), mlxbuf.BufferAllocationError,
        "maximum buffer length"),
    row("alloc shape product 2**96", lambda c: c.dev.alloc_buffer(4096, "u8", BIG_SHAPE), mlxbuf.InvalidArgument,
        str(BIG), "4096"),
    row("alloc dim 2**64", lambda c: c.dev.alloc_buffer(4096, "u8", (U64,)), mlxbuf.InvalidArgument, str(U64)),
    row("alloc numpy negative dim", lambda c: c.dev.alloc_buffer(4096, "u8", (np.int64(-3),)),
        mlxbuf.InvalidArgument, "-3"),
    row("alloc shape dict", lambda c: c.dev.alloc_buffer(16, "u8", {1: 2}), mlxbuf.InvalidArgument, "{1: 2}"),
    row("alloc dtype object", lambda c: c.dev.alloc_buffer(16, object, (1,)), mlxbuf.UnsupportedDtype, "object"),
    row("memory limit 0", lambda c: c.dev.set_memory_limit(0), mlxbuf.InvalidArgument, "0", "at least 1"),
    row("memory limit -1", lambda c: c.dev.set_memory_limit(-1), mlxbuf.InvalidArgument, "-1"),
    row("memory limit 2**64", lambda c: c.dev.set_memory_limit(U64), mlxbuf.InvalidArgument, str(U64)),
    row("memory limit str", lambda c: c.dev.set_memory_limit("1G"), mlxbuf.InvalidArgument, "'1G'"),
    row("memory limit bool", lambda c: c.dev.set_memory_limit(True), mlxbuf.InvalidArgument, "True"),
    row("memory limit float", lambda c: c.dev.set_memory_limit(1.5), mlxbuf.InvalidArgument, "1.5"),
    row("keep-alive NaN", lambda c: c.dev.set_residency_keepalive(float("nan")), mlxbuf.InvalidArgument, "nan"),
    row("keep-alive inf", lambda c: c.dev.set_residency_keepalive(float("inf")), mlxbuf.InvalidArgument,
        "inf", "1e9"),
    row("keep-alive 10**400", lambda c: c.dev.set_residency_keepalive(10**400), mlxbuf.InvalidArgument,
        "keep-alive seconds 1000"),
    row("keep-alive None", lambda c: c.dev.set_residency_keepalive(None), mlxbuf.InvalidArgument, "None"),
    row("keep-alive interval NaN", lambda c: c.dev.set_residency_keepalive(1, float("nan")),
        mlxbuf.InvalidArgument, "interval nan"),
    row("keep-alive interval 1 ns", lambda c: c.dev.set_residency_keepalive(1, 1e-9), mlxbuf.InvalidArgument,
        "1e-09", "0.001"),
    # Expectations per backend: the host backend has no compute at all.
    row("compile a broken kernel", lambda c: c.dev.compile_library("kernel void f( {}", name="broken"),
        {"host": (mlxbuf.Unsupported, ("Metal",)),
         "metal": (mlxbuf.ShaderCompilationError, ("broken", "program_source:1"))}),
    # ---- BufferPool --------------------------------------------------------------------
    row("pool of a str", lambda c: mlxbuf.BufferPool("host"), mlxbuf.InvalidArgument, "'host'"),
    row("pool cache 2**63", lambda c: mlxbuf.BufferPool(c.dev, 1 << 63), mlxbuf.InvalidArgument, str(1 << 63)),
    row("pool cache str", lambda c: mlxbuf.BufferPool(c.dev, "big"), mlxbuf.InvalidArgument, "'big'"),
    row("pool alloc 2**64-1", lambda c: c.pool.alloc(U64 - 1, "u8", (1,)), mlxbuf.BufferAllocationError,
        str(U64 - 1), "maximum buffer length"),
    row("pool alloc shape 2**96", lambda c: c.pool.alloc(16, "u8", BIG_SHAPE), mlxbuf.InvalidArgument, str(BIG)),
    row("pool size_class 2**64-1", lambda c: c.pool.size_class(U64 - 1), mlxbuf.BufferAllocationError,
        str(U64 - 1)),
    row("pool size_class 2**64", lambda c: c.pool.size_class(U64), mlxbuf.InvalidArgument, str(U64)),
    row("pool size_class 0", lambda c: c.pool.size_class(0), mlxbuf.InvalidArgument, "0 bytes"),
    row("pool set_cache_limit -1", lambda c: c.pool.set_cache_limit(-1), mlxbuf.InvalidArgument, "-1"),
    row("batch of an int", lambda c: c.pool.alloc_batch(5), mlxbuf.InvalidArgument, "5"),
    row("batch of None", lambda c: c.pool.alloc_batch(None), mlxbuf.InvalidArgument, "None"),
    row("batch request not a triple", lambda c: c.pool.alloc_batch([(16, "u8", (1,)), 7]), mlxbuf.InvalidArgument,
        "request 1", "7"),
    row("batch 2**64-1", lambda c: c.pool.alloc_batch([(16, "u8", (1,)), (U64 - 1, "u8", (1,))]),
        mlxbuf.BufferAllocationError, "batch request 1 of 2", str(U64 - 1)),
    row("batch shape 2**96", lambda c: c.pool.alloc_batch([(16, "u8", BIG_SHAPE)]), mlxbuf.InvalidArgument, str(BIG)),
    row("register an int", lambda c: c.pool.register_existing(5), mlxbuf.InvalidArgument, "5"),
    row("register foreign", lambda c: c.pool.register_existing(c.foreign), mlxbuf.InvalidArgument, "another device"),
    row("closed alloc", lambda c: c.closed.alloc(16, "u8", (1,)), mlxbuf.InvalidArgument, "closed"),
    row("closed batch", lambda c: c.closed.alloc_batch([(16, "u8", (1,))]), mlxbuf.InvalidArgument, "closed"),
    row("closed register", lambda c: c.closed.register_existing(c.buf), mlxbuf.InvalidArgument, "closed"),
    row("closed clear", lambda c: c.closed.clear(), mlxbuf.InvalidArgument, "closed"),
    row("closed stats", lambda c: c.closed.stats(), mlxbuf.InvalidArgument, "closed"),
    row("closed size_class", lambda c: c.closed.size_class(16), mlxbuf.InvalidArgument, "closed"),
    # ---- Buffer views ------------------------------------------------------------------
    row("slice offset 2**64", lambda c: c.buf.slice_view(U64, 1), mlxbuf.InvalidArgument, str(U64)),
    row("slice offset 2**64-1", lambda c: c.buf.slice_view(U64 - 1, 1), mlxbuf.InvalidArgument, str(U64 - 1), "4096"),
    row("slice count 2**62", lambda c: c.buf.slice_view(0, 1 << 62), mlxbuf.InvalidArgument, str(1 << 62), "4096"),
    row("slice count 2**64", lambda c: c.buf.slice_view(0, U64), mlxbuf.InvalidArgument, str(U64)),
    row("slice offset str", lambda c: c.buf.slice_view("0", 1), mlxbuf.InvalidArgument, "'0'"),
    row("view shape 2**96", lambda c: c.buf.view("u8", BIG_SHAPE), mlxbuf.InvalidArgument, str(BIG), "4096"),
    row("view dtype object", lambda c: c.buf.view(object()), mlxbuf.UnsupportedDtype, "object"),
    row("view shape str", lambda c: c.buf.view(shape="ab"), mlxbuf.InvalidArgument, "'ab'"),
    row("reshape -1", lambda c: c.buf.reshape(-1), mlxbuf.InvalidArgument, "-1"),
    row("reshape 2**64 x 0", lambda c: c.buf.reshape(U64, 0), mlxbuf.InvalidArgument, str(U64)),
    row("reshape 2**96", lambda c: c.buf.reshape(*BIG_SHAPE), mlxbuf.InvalidArgument, "1024", str(BIG_SHAPE)),
    row("as_slice int dtype", lambda c: c.buf.as_slice(3), mlxbuf.UnsupportedDtype, "3"),
    row("dlpack stream 5", lambda c: c.buf.__dlpack__(stream=5), BufferError, "stream 5"),
    row("dlpack max_version str", lambda c: c.buf.__dlpack__(max_version="x"), BufferError, "'x'"),
    row("dlpack kDLMetal on host", lambda c: c.buf.__dlpack__(dl_device=(8, 0)),
        {"host": (BufferError, ("(8, 0)",)), "metal": None}),
    row("dlpack kDLCUDA", lambda c: c.buf.__dlpack__(dl_device=(2, 0)), BufferError, "(2, 0)"),
    # ---- CommandEncoder ----------------------------------------------------------------
    row("copy from an int", lambda c: c.enc.copy(5, c.buf), mlxbuf.InvalidArgument, "5"),
    row("copy nbytes 2**64", lambda c: c.enc.copy(c.buf, c.buf.slice_view(0, 4), U64), mlxbuf.InvalidArgument,
        str(U64)),
    row("copy nbytes 2**64-1", lambda c: c.enc.copy(c.buf, c.foreign.view("u8"), U64 - 1), mlxbuf.InvalidArgument,
        "another device"),
    row("copy nbytes float", lambda c: c.enc.copy(c.buf, c.buf, 1.5), mlxbuf.InvalidArgument, "1.5"),
    row("copy into read-only", lambda c: c.enc.copy(c.buf.view("u8", (16,)), c.readonly.slice_view(0, 16)),
        mlxbuf.InvalidArgument, "read-only"),
    row("copy after commit", lambda c: c.done.copy(c.buf, c.dev.alloc_buffer(4096, "u8", (4096,))),
        mlxbuf.CommandBufferError, "already committed"),
    row("fill an int", lambda c: c.enc.fill(5, 1), mlxbuf.InvalidArgument, "5"),
    row("fill 2**64", lambda c: c.enc.fill(c.buf, U64), mlxbuf.InvalidArgument, str(U64), "255"),
    row("fill read-only", lambda c: c.enc.fill(c.readonly, 1), mlxbuf.InvalidArgument, "read-only"),
    row("fill foreign", lambda c: c.enc.fill(c.foreign, 1), mlxbuf.InvalidArgument, "another device"),
    row("fill after commit", lambda c: c.done.fill(c.buf, 1), mlxbuf.CommandBufferError, "already committed"),
    row("dispatch None", lambda c: c.enc.dispatch(None, 1, 1), mlxbuf.InvalidArgument, "None"),
    row("discard after commit", lambda c: c.done.discard(), mlxbuf.CommandBufferError, "already committed"),
    row("commit twice", lambda c: c.done.commit(), mlxbuf.CommandBufferError, "already committed"),
    # ---- ResidencySet ------------------------------------------------------------------
    row("contains an int", lambda c: c.rs.contains(5), mlxbuf.InvalidArgument, "5"),
    row("in with a str", lambda c: "buf" in c.rs, mlxbuf.InvalidArgument, "'buf'"),
    row("shard cap 0", lambda c: c.rs.set_shard_cap(0), mlxbuf.InvalidArgument, "0"),
    row("shard cap 2**64", lambda c: c.rs.set_shard_cap(U64), mlxbuf.InvalidArgument, str(U64)),
    row("shard cap float", lambda c: c.rs.set_shard_cap(1.5), mlxbuf.InvalidArgument, "1.5"),
    # ---- interop -----------------------------------------------------------------------
    row("map_file missing", lambda c: c.dev.map_file(c.file.with_name("missing.bin")), mlxbuf.FileError,
        "cannot open", "missing.bin", "No such file"),
    row("map_file offset 2**64", lambda c: c.dev.map_file(c.file, U64), mlxbuf.InvalidArgument, str(U64)),
    row("map_file offset 2**63", lambda c: c.dev.map_file(c.file, 1 << 63), mlxbuf.InvalidArgument,
        str(1 << 63), "4096-byte file"),
    row("map_file length 2**64-1", lambda c: c.dev.map_file(c.file, 1, U64 - 1), mlxbuf.InvalidArgument,
        str(U64 - 1), "4096-byte file"),
    row("map_file length 0", lambda c: c.dev.map_file(c.file, 0, 0), mlxbuf.InvalidArgument, "0"),
    row("map_file length str", lambda c: c.dev.map_file(c.file, 0, "3"), mlxbuf.InvalidArgument, "'3'"),
    row("map_file shape 2**96", lambda c: c.dev.map_file(c.file, shape=BIG_SHAPE), mlxbuf.InvalidArgument, str(BIG)),
    row("map_file uneven dtype", lambda c: c.dev.map_file(c.file, 1, dtype="f64"), mlxbuf.InvalidArgument,
        "4095", "f64"),
    row("map_file path None", lambda c: c.dev.map_file(None), TypeError, "NoneType"),
    row("map_file a directory", lambda c: c.dev.map_file(c.file.parent), mlxbuf.FileError, "regular file",
        "a directory"),
    row("from_dlpack an int", lambda c: mlxbuf.from_dlpack(5), TypeError, "int", "__dlpack__"),
    row("from_dlpack device str", lambda c: mlxbuf.from_dlpack(np.arange(3.0), device="host"), mlxbuf.InvalidArgument,
        "'host'"),
    row("from_raw NULL", lambda c: mlxbuf.Buffer.from_raw(c.dev, 0, 16), mlxbuf.InvalidArgument, "NULL"),
    row("from_raw pointer -1", lambda c: mlxbuf.Buffer.from_raw(c.dev, -1, 16), mlxbuf.InvalidArgument, "-1"),
    row("from_raw pointer 2**64", lambda c: mlxbuf.Buffer.from_raw(c.dev, U64, 16), mlxbuf.InvalidArgument, str(U64)),
    row("from_raw length 2**64", lambda c: mlxbuf.Buffer.from_raw(c.dev, 4096, U64), mlxbuf.InvalidArgument, str(U64)),
    row("from_raw length 0", lambda c: mlxbuf.Buffer.from_raw(c.dev, 4096, 0), mlxbuf.InvalidArgument, "0"),
    row("from_raw shape 2**96", lambda c: mlxbuf.Buffer.from_raw(c.dev, 4096, 16, "u8", BIG_SHAPE),
        mlxbuf.InvalidArgument, str(BIG)),
    row("from_raw device None", lambda c: mlxbuf.Buffer.from_raw(None, 4096, 16), mlxbuf.InvalidArgument, "None"),
    # On Metal an integer handle must be an id<MTLBuffer>: messaging anything
    # else is undefined behaviour (the caller's promise), so the row is host's.
    row("from_raw native on host", lambda c: mlxbuf.Buffer.from_raw(c.dev, 0x1234),
        {"host": (mlxbuf.Unsupported, ("0x1234",)), "metal": None}),
    row("from_numpy object array", lambda c: c.dev.from_numpy(np.array([object()])), mlxbuf.UnsupportedDtype, "O"),
    row("from_numpy complex", lambda c: c.dev.from_numpy(np.zeros(3, np.complex64)), mlxbuf.UnsupportedDtype,
        "complex64"),
    row("load_safetensors missing", lambda c: mlxbuf.load_safetensors(c.file.with_name("none.safetensors")),
        mlxbuf.FileError, "none.safetensors", "No such file"),
    row("load_safetensors device str", lambda c: mlxbuf.load_safetensors(c.file, device="host"),
        mlxbuf.InvalidArgument, "'host'"),
    row("load_safetensors not safetensors", lambda c: mlxbuf.load_safetensors(c.file, device=c.dev),
        mlxbuf.InvalidArgument, "data.bin", "header length"),
    row("save_safetensors an int", lambda c: mlxbuf.save_safetensors(c.file.with_name("o.st"), 5), TypeError, "5"),
    row("DType lookup 2**64", lambda c: mlxbuf.as_dtype(U64), mlxbuf.UnsupportedDtype, str(U64)),
    row("DType attribute", lambda c: mlxbuf.DType("f128"), ValueError, "'f128'"),
]


@pytest.fixture(scope="module")
def health():
    """Whether each row left the device as it found it, for the last test."""
    return []


@pytest.mark.parametrize("call, cls, fragments", CASES)
def test_bad_input(device, other_device, tmp_path, call, cls, fragments):
    ctx = Ctx(device, other_device, tmp_path)
    before = device.stats()
    rs_before = device.residency_set.allocation_count if device.residency_set else 0
    if isinstance(cls, dict):
        if cls[device.backend] is None:
            pytest.skip(f"this row only has a defined outcome on {', '.join(k for k, v in cls.items() if v)}")
        cls, fragments = cls[device.backend]
    with pytest.raises(cls) as excinfo:
        call(ctx)
    assert_names(excinfo, *fragments)
    del excinfo  # its traceback may reference what the call made
    after = device.stats()
    # Nothing made, nothing leaked, nothing half-registered.
    assert after.active_bytes == before.active_bytes
    assert after.live_storages == before.live_storages
    assert (device.residency_set.allocation_count if device.residency_set else 0) == rs_before
    assert ctx.enc.op_count == 0 and ctx.enc.hold_count == 0
    assert ctx.pool.in_use_count == 0


def test_still_healthy_after_the_catalog(device, pool):
    """Runs after the table (file order): allocate, compute, free."""
    a = device.alloc_buffer(1 << 20, "f32", (1 << 18,))
    b = pool.alloc(1 << 20, "f32", (1 << 18,))
    a.numpy()[:] = np.arange(1 << 18, dtype=np.float32)
    with device.command_encoder() as enc:
        enc.copy(a, b)
        enc.fill(a.slice_view(0, 4), 0xFF)
    np.testing.assert_array_equal(b.numpy(), np.arange(1 << 18, dtype=np.float32))
    assert (a.as_slice("u8")[:16] == 0xFF).all()
    del a, b
    assert pool.in_use_count == 0
    pool.clear()
    assert device.active_memory == 0


# ---- arithmetic at the limits, at the C boundary ------------------------------------------


@pytest.mark.parametrize(
    "n, page, expected",
    [
        (1, 4096, 16),
        (129, 4096, 144),
        ((1 << 20) + 1, 4096, (1 << 20) + (1 << 14)),
        ((1 << 64) - (1 << 57), 4096, (1 << 64) - (1 << 57)),  # the largest class: exact
        ((1 << 64) - (1 << 57) + 1, 4096, None),  # rounding up would pass 2**64
        ((1 << 64) - 1, 4096, None),
        (1 << 20, 1 << 63, 1 << 63),  # a page of 2**63 bytes
        ((1 << 63) + 1, 1 << 63, None),
        (0, 4096, None),
        (4096, 0, None),
        (4096, 3, None),
    ],
)
def test_size_class_refuses_to_wrap(n, page, expected):
    out = ffi.new("uint64_t *")
    status = lib.cm_size_class(n, page, out)
    if expected is None:
        assert status == lib.CM_ERR_INVALID_ARGUMENT and out[0] == 0
        message = ffi.string(lib.cm_last_error()).decode()
        assert str(n) in message or str(page) in message, message
    else:
        assert status == 0 and out[0] == expected
        assert out[0] >= n


def test_size_class_at_the_device_maximum(device, pool):
    top = device.max_buffer_length
    assert pool.size_class(top) == top
    assert pool.size_class(top - 1) == top  # a class past the maximum falls back to the page
    with pytest.raises(mlxbuf.BufferAllocationError) as exc:
        pool.size_class(top + 1)
    assert_names(exc, top + 1, top)


@pytest.mark.parametrize(
    "src_off, dst_off, nbytes",
    [(U64 - 1, 0, 2), (0, U64 - 1, 2), (8, 0, U64 - 8), (4096, 0, 1), (0, 0, U64 - 1), (1, 1, 4096)],
)
def test_copy_offset_plus_length_never_wraps(device, src_off, dst_off, nbytes):
    a = device.alloc_buffer(4096, "u8", (4096,))
    b = device.alloc_buffer(4096, "u8", (4096,))
    cb = ffi.new("cm_cmdbuf_t **")
    assert lib.cm_cmdbuf_create(device._handle, cb) == 0
    cb = ffi.gc(cb[0], lib.cm_cmdbuf_release)
    assert lib.cm_cmdbuf_copy(cb, a._storage, src_off, b._storage, dst_off, nbytes) == lib.CM_ERR_INVALID_ARGUMENT
    message = ffi.string(lib.cm_last_error()).decode()
    assert str(nbytes) in message and "4096" in message, message
    assert lib.cm_cmdbuf_fill(cb, b._storage, max(src_off, dst_off), nbytes, 1) == lib.CM_ERR_INVALID_ARGUMENT
    assert lib.cm_cmdbuf_op_count(cb) == 0 and lib.cm_cmdbuf_hold_count(cb) == 0


def test_dlpack_export_offset_plus_length_never_wraps(device):
    buf = device.alloc_buffer(4096, "u8", (4096,))
    shape = ffi.new("int64_t[1]", [2])
    view = ffi.new("cm_dlpack_view_t *")
    view.ndim, view.shape, view.strides = 1, shape, ffi.NULL
    view.dtype.code, view.dtype.bits, view.dtype.lanes = mlxbuf.DType.U8.dlpack
    view.device_type = lib.kDLCPU
    out = ffi.new("void **")
    for offset in (U64 - 1, U64 - 2, 4095):
        view.byte_offset = offset
        assert lib.cm_dlpack_export(buf._storage, view, 1, out) == lib.CM_ERR_INVALID_ARGUMENT
        assert out[0] == ffi.NULL
    shape[0] = (1 << 63) - 1
    view.byte_offset = 0
    view.dtype.bits = 64
    assert lib.cm_dlpack_export(buf._storage, view, 1, out) == lib.CM_ERR_INVALID_ARGUMENT


def test_dlpack_import_of_an_overflowing_shape(device, other_device):
    """A producer's shape whose product passes 2**64 (strides absent) is
    refused before anything is wrapped; the capsule stays its producer's."""
    src = other_device.alloc_buffer(64, "u8", (64,))
    capsule = src.__dlpack__()
    api = ctypes.pythonapi
    get = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.py_object, ctypes.c_char_p)(("PyCapsule_GetPointer", api))
    tensor = ffi.cast("DLManagedTensor *", get(capsule, b"dltensor")).dl_tensor
    shape = ffi.new("int64_t[3]", list(BIG_SHAPE))
    saved = (tensor.shape, tensor.strides, tensor.ndim)
    tensor.shape, tensor.strides, tensor.ndim = shape, ffi.NULL, 3
    try:
        with pytest.raises(BufferError) as exc:
            mlxbuf.from_dlpack(capsule, device=device)
        assert_names(exc, "overflows 64 bits")
    finally:
        tensor.shape, tensor.strides, tensor.ndim = saved
    assert device.active_memory == 0
    again = mlxbuf.from_dlpack(capsule, device=device)  # still unconsumed and valid
    assert again.data_ptr == src.data_ptr
