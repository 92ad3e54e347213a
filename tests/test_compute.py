"""Compute: Unsupported on the host backend; libraries, kernels and dispatch on Metal.

On the simulated Metal the kernels run as numpy references registered with
mlxbuf.metalsim.register_kernel (the simulator cannot compile MSL); on a
Mac the MSL itself runs.
"""

import json
import struct
import threading

import numpy as np
import pytest

import mlxbuf
from mlxbuf import metalsim
from support import assert_names

ADD_SOURCE = """
#include <metal_stdlib>
using namespace metal;
kernel void add_scalar(device const float *a [[buffer(0)]],
                       device float *out [[buffer(1)]],
                       constant float &k [[buffer(2)]],
                       uint i [[thread_position_in_grid]]) {
    out[i] = a[i] + k;
}
"""


def test_host_backend_has_no_compute(host_device):
    with pytest.raises(mlxbuf.Unsupported) as exc:
        host_device.compile_library(ADD_SOURCE)
    assert isinstance(exc.value, NotImplementedError)
    assert_names(exc, "compute", "host")


def test_library_and_kernel_objects_are_not_constructible():
    for cls in (mlxbuf.Library, mlxbuf.Kernel, mlxbuf.CommandEncoder, mlxbuf.ResidencySet):
        with pytest.raises(TypeError):
            cls()


def add_scalar_reference(grid, threadgroup, buffers, constants):
    """ADD_SOURCE's add_scalar in numpy: out[i] = a[i] + k for i < grid width."""
    n = grid[0]
    a = buffers[0][: 4 * n].view(np.float32)
    out = buffers[1][: 4 * n].view(np.float32)
    out[:] = a + np.frombuffer(constants[:4], np.float32)[0]


@pytest.fixture
def metal_device():
    if metalsim.available():
        metalsim.register_kernel("add_scalar", add_scalar_reference)
    return mlxbuf.Device("metal")


@pytest.mark.requires_metal
def test_dispatch_binds_buffers_at_their_offsets(metal_device):
    lib = metal_device.compile_library(ADD_SOURCE, name="add")
    kernel = lib.kernel("add_scalar")
    assert kernel.name == "add_scalar"
    assert kernel.max_total_threads_per_threadgroup > 0
    assert kernel.thread_execution_width > 0
    a = metal_device.alloc_buffer(4096, "f32", (1024,))
    out = metal_device.alloc_buffer(4096, "f32", (1024,))
    a.numpy()[:] = np.arange(1024, dtype=np.float32)
    with metal_device.command_encoder() as enc:
        enc.dispatch(kernel, 16, 16, buffers=[a.slice_view(64, 16), out.slice_view(128, 16)], constants=[0.5])
    res = out.numpy()
    assert res[32:48].tolist() == [x + 0.5 for x in range(16, 32)]
    assert not res[:32].any() and not res[48:].any()


@pytest.mark.requires_metal
def test_shader_errors(metal_device):
    with pytest.raises(mlxbuf.ShaderCompilationError) as exc:
        metal_device.compile_library("kernel void broken(", name="broken_lib")
    assert exc.value.name == "broken_lib"
    assert exc.value.message
    lib = metal_device.compile_library(ADD_SOURCE)
    with pytest.raises(mlxbuf.KernelNotFound) as exc:
        lib.kernel("missing")
    assert_names(exc, "missing")


@pytest.mark.parametrize("value", [1, "yes", None], ids=["int", "str", "none"])
def test_fast_math_must_be_true_or_false(device, value):
    with pytest.raises(mlxbuf.InvalidArgument) as exc:
        device.compile_library(ADD_SOURCE, fast_math=value)
    assert_names(exc, "fast_math", repr(value))


def test_host_backend_has_no_compute_with_fast_math_either(host_device):
    with pytest.raises(mlxbuf.Unsupported):
        host_device.compile_library(ADD_SOURCE, fast_math=True)


# ---- writes=: which buffers a kernel writes ------------------------------------------

COPY_SOURCE = """
kernel void copy_words(device const uint *src [[buffer(0)]],
                       device uint *dst [[buffer(1)]],
                       uint i [[thread_position_in_grid]]) { dst[i] = src[i]; }
"""


def copy_words_reference(grid, threadgroup, buffers, constants):
    n = 4 * grid[0]
    buffers[1][:n] = buffers[0][:n]


@pytest.fixture
def copy_kernel(metal_device):
    if metalsim.available():
        metalsim.register_kernel("copy_words", copy_words_reference)
    return metal_device.compile_library(COPY_SOURCE).kernel("copy_words")


@pytest.fixture
def weights_file(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(np.arange(1024, dtype=np.uint32).tobytes())
    return path


@pytest.mark.requires_metal
def test_a_read_only_mapping_binds_when_the_kernel_does_not_write_it(metal_device, copy_kernel, weights_file):
    """Regression: every bound buffer counted as written, so a read-only
    file mapping could be bound to no kernel at all."""
    weights = metal_device.map_file(weights_file, dtype="u32")
    out = metal_device.alloc_buffer(4096, "u32", (1024,))
    with metal_device.command_encoder() as enc:
        enc.dispatch(copy_kernel, 1024, 64, buffers=[weights, out], writes=[1])
    np.testing.assert_array_equal(out.numpy(), np.arange(1024, dtype=np.uint32))


@pytest.mark.requires_metal
@pytest.mark.parametrize("writes", [None, [0, 1], (0,)], ids=["default-all", "both", "only-it"])
def test_a_read_only_mapping_among_the_written_buffers_is_refused(metal_device, copy_kernel, weights_file, writes):
    weights = metal_device.map_file(weights_file, dtype="u32")
    out = metal_device.alloc_buffer(4096, "u32", (1024,))
    enc = metal_device.command_encoder()
    with pytest.raises(mlxbuf.InvalidArgument) as exc:
        enc.dispatch(copy_kernel, 1024, 64, buffers=[weights, out], writes=writes)
    assert_names(exc, "buffer 0", "read-only file mapping", "copy_words", "writes=")
    assert enc.op_count == 0 and enc.hold_count == 0
    enc.discard()


@pytest.mark.requires_metal
@pytest.mark.parametrize(
    "writes, fragments",
    [([2], ("writes index 2", "2 buffers")), ([-1], ("writes index", "-1")), ([True], ("bool",)),
     ("1", ("collection",)), (1, ("collection",)), ([1.0], ("1.0",))],
    ids=["past-the-end", "negative", "bool", "str", "int", "float"],
)
def test_writes_must_be_indices_of_the_bound_buffers(metal_device, copy_kernel, writes, fragments):
    a = metal_device.alloc_buffer(4096, "u32", (1024,))
    b = metal_device.alloc_buffer(4096, "u32", (1024,))
    enc = metal_device.command_encoder()
    with pytest.raises(mlxbuf.InvalidArgument) as exc:
        enc.dispatch(copy_kernel, 1024, 64, buffers=[a, b], writes=writes)
    assert_names(exc, *fragments)
    enc.discard()


@pytest.mark.requires_metal
def test_only_written_buffers_wait_for_the_gpu(metal_device, copy_kernel):
    """A buffer the kernel only reads is no in-flight writer: its numpy()
    returns at once while the command buffer runs; the written one waits.
    On the simulator the kernel holds the GPU until the test lets it go, so
    the command buffer is certainly still running when numpy() is called."""
    gate = threading.Event()
    if metalsim.available():
        def held(grid, threadgroup, buffers, constants):
            gate.wait(60)
            copy_words_reference(grid, threadgroup, buffers, constants)

        metalsim.register_kernel("copy_words", held)
    src = metal_device.alloc_buffer(4096, "u32", (1024,))
    dst = metal_device.alloc_buffer(4096, "u32", (1024,))
    src.numpy()[:] = np.arange(1024, dtype=np.uint32)
    enc = metal_device.command_encoder()
    enc.dispatch(copy_kernel, 1024, 64, buffers=[src, dst], writes=[1])
    enc.commit()
    try:
        assert src._info().inflight_writers == 0 and dst._info().inflight_writers == 1
        assert src.numpy()[5] == 5
        if metalsim.available():
            assert enc.status == "committed"
    finally:
        gate.set()
    np.testing.assert_array_equal(dst.numpy(), np.arange(1024, dtype=np.uint32))
    enc.wait()


# ---- buffer offsets: aligned to what the kernel's argument needs --------------------------

ALIGN_SOURCE = """
kernel void widen(device const uchar *bytes [[buffer(0)]],
                  device float4 *vectors [[buffer(1)]],
                  device float *scalars [[buffer(2)]],
                  uint i [[thread_position_in_grid]]) { scalars[i] = vectors[i].x + bytes[i]; }
"""


@pytest.fixture
def widen(metal_device):
    if metalsim.available():
        metalsim.register_kernel("widen", lambda grid, threadgroup, buffers, constants: None)
    return metal_device.compile_library(ALIGN_SOURCE).kernel("widen")


@pytest.mark.requires_metal
@pytest.mark.parametrize(
    "index, offset, alignment",
    [(0, 2, 4), (1, 8, 16), (1, 4, 16), (2, 6, 4)],
    ids=["uchar-at-2", "float4-at-8", "float4-at-4", "float-at-6"],
)
def test_a_misaligned_buffer_offset_is_refused(metal_device, widen, index, offset, alignment):
    """Regression: offsets went to setBuffer:offset:atIndex: unchecked. Each
    must be a multiple of its argument's element alignment (from the
    pipeline's reflection: 16 for float4), at least 4 (uchar too)."""
    buffers = [metal_device.alloc_buffer(4096, "u8", (4096,)) for _ in range(3)]
    views = [b.slice_view(16, 64) for b in buffers]
    views[index] = buffers[index].slice_view(offset, 64)
    enc = metal_device.command_encoder()
    with pytest.raises(mlxbuf.InvalidArgument) as exc:
        enc.dispatch(widen, 16, 16, buffers=views)
    assert_names(exc, f"buffer {index} binds at byte offset {offset}", f"aligned to {alignment} bytes",
                 "widen", "Buffer.copy()")
    assert enc.op_count == 0
    views[index] = buffers[index].slice_view(alignment * 2, 64)
    enc.dispatch(widen, 16, 16, buffers=views)
    enc.commit_and_wait()


@pytest.mark.requires_metal
def test_a_buffer_the_kernel_does_not_declare_needs_four_byte_alignment(metal_device, widen):
    """Reflection says nothing about [[buffer(3)]]: a word is required."""
    buffers = [metal_device.alloc_buffer(4096, "u8", (4096,)) for _ in range(4)]
    enc = metal_device.command_encoder()
    with pytest.raises(mlxbuf.InvalidArgument) as exc:
        enc.dispatch(widen, 16, 16, buffers=buffers[:3] + [buffers[3].slice_view(2, 8)])
    assert_names(exc, "buffer 3 binds at byte offset 2", "aligned to 4 bytes")
    enc.dispatch(widen, 16, 16, buffers=buffers[:3] + [buffers[3].slice_view(4, 8)])
    enc.commit_and_wait()


HALF_SOURCE = """
kernel void add_one_half(device const half *a [[buffer(0)]],
                         device half *out [[buffer(1)]],
                         uint i [[thread_position_in_grid]]) { out[i] = a[i] + 1.0h; }
"""


def add_one_half_reference(grid, threadgroup, buffers, constants):
    n = grid[0]
    buffers[1][: 2 * n].view(np.float16)[:] = buffers[0][: 2 * n].view(np.float16) + 1


def _half_tensor_two_bytes_in(path):
    """A safetensors file whose f16 tensor starts 2 bytes into the data
    section (after a 2-byte u8 tensor): aligned for its elements, as the
    format asks, but not to the 4 bytes a kernel's buffer offset needs."""
    header = json.dumps({
        "tag": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
        "w": {"dtype": "F16", "shape": [1024], "data_offsets": [2, 2050]},
    }).encode()
    header += b" " * (-len(header) % 8)
    data = b"ab" + np.arange(1024, dtype=np.float16).tobytes()
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return 8 + len(header) + 2


@pytest.mark.requires_metal
def test_a_misaligned_safetensors_tensor_binds_through_one_copy(metal_device, tmp_path):
    """A tensor at an offset its kernel cannot bind (here 2 mod 4) is
    refused naming Buffer.copy(), which gives an aligned buffer in one call,
    and that binds."""
    if metalsim.available():
        metalsim.register_kernel("add_one_half", add_one_half_reference)
    path = tmp_path / "odd.safetensors"
    offset = _half_tensor_two_bytes_in(path)
    w = mlxbuf.load_safetensors(path, device=metal_device)["w"]
    assert w.byte_offset == offset and offset % 4 == 2
    kernel = metal_device.compile_library(HALF_SOURCE).kernel("add_one_half")
    out = metal_device.alloc_buffer(2048, "f16", (1024,))
    with metal_device.command_encoder() as enc:
        with pytest.raises(mlxbuf.InvalidArgument) as exc:
            enc.dispatch(kernel, 1024, 64, buffers=[w, out], writes=[1])
        assert_names(exc, f"buffer 0 binds at byte offset {offset}", "aligned to 4 bytes", "Buffer.copy()")
        enc.dispatch(kernel, 1024, 64, buffers=[w.copy(), out], writes=[1])
    np.testing.assert_array_equal(out.numpy(), np.arange(1024, dtype=np.float16) + 1)
