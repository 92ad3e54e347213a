"""Compute: Unsupported on the host backend; libraries, kernels and dispatch on Metal.

On the simulated Metal the kernels run as numpy references registered with
mlxbuf.metalsim.register_kernel (the simulator cannot compile MSL); on a
Mac the MSL itself runs.
"""

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
