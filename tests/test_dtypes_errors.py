"""DType spellings and facts; the error hierarchy and the status-code table."""

import numpy as np
import pytest

import mlxbuf
from mlxbuf import DType
from mlxbuf._cmetal import lib
from mlxbuf.errors import check, error_for
from support import assert_names

SIZES = {"f32": 4, "f16": 2, "bf16": 2, "u8": 1, "u16": 2, "u32": 4, "i32": 4,
         "i8": 1, "i16": 2, "i64": 8, "u64": 8, "f64": 8, "bool": 1}


def test_members_and_sizes():
    assert {dt.name for dt in DType} == set(SIZES)
    for dt in DType:
        assert dt.size == SIZES[dt.name]
        assert str(dt) == dt.name


@pytest.mark.parametrize("dt", [d for d in DType if d is not DType.BF16], ids=str)
def test_every_spelling_maps_to_the_member(dt):
    for spelling in (dt, dt.name, dt.long_name, dt.numpy, dt.numpy.type, dt.name.upper()):
        assert mlxbuf.as_dtype(spelling) is dt
    assert dt.numpy.itemsize == dt.size


def test_module_aliases():
    assert mlxbuf.float32 is DType.F32
    assert mlxbuf.uint8 is DType.U8
    assert mlxbuf.bfloat16 is DType.BF16
    assert mlxbuf.bool_ is DType.BOOL
    assert mlxbuf.int64 is DType.I64


def test_bfloat16_through_ml_dtypes():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    assert DType.BF16.numpy == np.dtype(ml_dtypes.bfloat16)
    assert mlxbuf.as_dtype(ml_dtypes.bfloat16) is DType.BF16
    assert mlxbuf.as_dtype("bfloat16") is DType.BF16


def test_dlpack_codes():
    assert DType.F32.dlpack == (2, 32, 1)
    assert DType.BF16.dlpack == (4, 16, 1)
    assert DType.I8.dlpack == (0, 8, 1)
    assert DType.U64.dlpack == (1, 64, 1)
    assert DType.BOOL.dlpack == (6, 8, 1)


@pytest.mark.parametrize("bad", ["f33", "float128", None, 3, 2.5, [1], ">f4", np.complex64, "complex64", object])
def test_unknown_dtypes_raise_naming_the_value(bad):
    with pytest.raises(mlxbuf.UnsupportedDtype) as exc:
        mlxbuf.as_dtype(bad)
    assert isinstance(exc.value, TypeError)
    assert_names(exc, repr(bad), "f32", "float32", "bf16")


def test_error_hierarchy():
    assert issubclass(mlxbuf.BufferAllocationError, MemoryError)
    assert issubclass(mlxbuf.InvalidArgument, ValueError)
    assert issubclass(mlxbuf.UnsupportedDtype, TypeError)
    assert issubclass(mlxbuf.Unsupported, NotImplementedError)
    assert issubclass(mlxbuf.FileError, OSError)
    for cls in (mlxbuf.DeviceNotFound, mlxbuf.BufferAllocationError, mlxbuf.InvalidArgument,
                mlxbuf.UnsupportedDtype, mlxbuf.ResidencySetError, mlxbuf.CommandBufferError,
                mlxbuf.ShaderCompilationError, mlxbuf.KernelNotFound, mlxbuf.Unsupported, mlxbuf.FileError):
        assert issubclass(cls, mlxbuf.MlxError)
    e = mlxbuf.BufferAllocationError("no room", bytes=123)
    assert e.bytes == 123 and "no room" in str(e)
    s = mlxbuf.ShaderCompilationError("line 3: error", name="kernels")
    assert s.name == "kernels" and s.message == "line 3: error"


@pytest.mark.parametrize(
    "status, cls",
    [
        (lib.CM_ERR_INVALID_ARGUMENT, mlxbuf.InvalidArgument),
        (lib.CM_ERR_OUT_OF_MEMORY, mlxbuf.BufferAllocationError),
        (lib.CM_ERR_DEVICE_NOT_FOUND, mlxbuf.DeviceNotFound),
        (lib.CM_ERR_UNSUPPORTED, mlxbuf.Unsupported),
        (lib.CM_ERR_RESIDENCY, mlxbuf.ResidencySetError),
        (lib.CM_ERR_COMMAND_BUFFER, mlxbuf.CommandBufferError),
        (lib.CM_ERR_SHADER_COMPILATION, mlxbuf.ShaderCompilationError),
        (lib.CM_ERR_KERNEL_NOT_FOUND, mlxbuf.KernelNotFound),
        (lib.CM_ERR_IO, mlxbuf.FileError),
        (lib.CM_ERR_INTERNAL, mlxbuf.MlxError),
    ],
)
def test_status_table(status, cls):
    with pytest.raises(cls) as exc:
        check(status, bytes=7)
    assert exc.value.status == status
    assert exc.value.bytes == 7
    check(lib.CM_OK)


def test_unknown_status_keeps_the_raw_code():
    exc = error_for(9999)
    assert type(exc) is mlxbuf.MlxError
    assert exc.status == 9999
    assert "9999" in str(exc)


def test_check_uses_the_thread_local_c_message(host_device):
    with pytest.raises(mlxbuf.BufferAllocationError) as exc:
        host_device.alloc_buffer(host_device.max_buffer_length + 1, "u8", (1,))
    assert exc.value.status == lib.CM_ERR_OUT_OF_MEMORY
    assert_names(exc, host_device.max_buffer_length + 1, host_device.max_buffer_length)
