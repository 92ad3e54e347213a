"""Pickling: Buffers by value onto the default device, Devices by backend name."""

import copy
import io
import pickle
import subprocess
import sys

import numpy as np
import pytest

import mlxbuf
from mlxbuf import DType
from support import assert_names


def values(dt, n):
    """n distinct, exactly representable values of dt (bf16 through ml_dtypes)."""
    if dt is DType.BOOL:
        return np.arange(n) % 3 == 0
    if dt is DType.BF16:
        ml_dtypes = pytest.importorskip("ml_dtypes")
        return (np.arange(n) - 3).astype(ml_dtypes.bfloat16)
    return (np.arange(n) * 3 - 5).astype(dt.numpy) if dt.name[0] != "u" else np.arange(n, dtype=dt.numpy) * 3


@pytest.mark.parametrize("protocol", [2, 4, 5])
@pytest.mark.parametrize("dt", list(DType), ids=str)
def test_round_trip_of_an_offset_view_for_every_dtype(device, dt, protocol):
    base = device.alloc_buffer(64 * dt.size, dt, (64,))
    base.numpy()[:] = values(dt, 64)
    view = base.slice_view(5 * dt.size, 12).view(dt, (3, 4))
    restored = pickle.loads(pickle.dumps(view, protocol=protocol))
    assert restored.device is mlxbuf.default_device()
    assert (restored.dtype, restored.shape, restored.byte_offset, restored.nbytes) == (dt, (3, 4), 0, view.nbytes)
    assert bytes(restored.memoryview()) == bytes(view.memoryview())
    np.testing.assert_array_equal(restored.numpy(), base.numpy()[5:17].reshape(3, 4))
    assert restored.contents_ptr != base.contents_ptr  # a new storage
    restored.numpy()[...] = values(dt, 12).reshape(3, 4)[::-1]
    np.testing.assert_array_equal(base.numpy(), values(dt, 64))


def test_pickle_protocol_5_can_hand_the_bytes_out_of_band(device):
    buf = device.alloc_buffer(4096, "f32", (1024,))
    buf.numpy()[:] = np.arange(1024)
    buffers = []
    data = pickle.dumps(buf, protocol=5, buffer_callback=buffers.append)
    assert len(data) < 256 and len(buffers) == 1  # the bytes are not in the pickle
    assert buffers[0].raw().nbytes == 4096
    restored = pickle.loads(data, buffers=buffers)
    np.testing.assert_array_equal(restored.numpy(), np.arange(1024, dtype=np.float32))


def test_empty_zero_d_and_read_only_buffers_round_trip(device, tmp_path):
    empty = device.alloc_buffer(8, "f64", (0, 3))
    assert pickle.loads(pickle.dumps(empty)).shape == (0, 3)
    scalar = device.alloc_buffer(2, "i16", ())
    scalar.numpy()[()] = -7
    assert pickle.loads(pickle.dumps(scalar)).numpy()[()] == -7
    path = tmp_path / "data.bin"
    path.write_bytes(bytes(range(200)))
    mapped = device.map_file(path, 10, 20)  # read-only mapping
    restored = pickle.loads(pickle.dumps(mapped, protocol=5))
    assert bytes(restored.memoryview()) == bytes(range(10, 30)) and restored.writable


def test_unpickles_on_the_default_device_of_the_loading_process(tmp_path):
    dev = mlxbuf.Device("host", residency=False)
    buf = dev.alloc_buffer(12, "u32", (3,))
    buf.numpy()[:] = [7, 8, 9]
    path = tmp_path / "buf.pickle"
    path.write_bytes(pickle.dumps(buf))
    code = (
        "import pickle, sys, mlxbuf; b = pickle.loads(open(sys.argv[1], 'rb').read()); "
        "print(b.device is mlxbuf.default_device(), b.numpy().tolist(), b.residency_set is not None)"
    )
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "[7,", "8,", "9]", "True"]


def test_a_corrupt_pickle_is_refused_naming_the_sizes():
    from mlxbuf.buffer import _unpickle

    with pytest.raises(mlxbuf.InvalidArgument) as exc:
        _unpickle("f32", (4,), b"\0" * 15)
    assert_names(exc, "16 bytes", "15")
    with pytest.raises(mlxbuf.UnsupportedDtype):
        _unpickle("f128", (1,), b"\0" * 16)


def test_device_pickles_as_its_backend_and_copies_as_itself(device):
    restored = pickle.loads(pickle.dumps(device))
    assert isinstance(restored, mlxbuf.Device) and restored is not device
    assert restored.backend == device.backend
    assert restored.alloc_buffer(16, "u8", (16,)).device is restored
    assert copy.copy(device) is device and copy.deepcopy(device) is device
    # deepcopy of a structure keeps buffers on their device
    buf = device.alloc_buffer(16, "u8", (16,))
    twin_dev, twin_buf = copy.deepcopy((device, buf))
    assert twin_dev is device and twin_buf.device is device and twin_buf.contents_ptr != buf.contents_ptr


def test_handles_that_cannot_be_pickled_say_so(device, pool):
    encoder = device.command_encoder()
    for obj, fragment in ((pool, "BufferPool"), (encoder, "CommandEncoder")):
        with pytest.raises(TypeError, match=fragment):
            pickle.dumps(obj)
    if device.residency_set is not None:
        with pytest.raises(TypeError, match="ResidencySet"):
            pickle.dumps(device.residency_set)
    encoder.discard()


def test_a_pickled_buffer_inside_a_larger_structure(device):
    buf = device.alloc_buffer(16, "u8", (4, 4))
    buf.numpy()[:] = np.arange(16).reshape(4, 4)
    stream = io.BytesIO()
    pickle.dump({"weights": [buf, buf[1:3]]}, stream)
    stream.seek(0)
    loaded = pickle.load(stream)["weights"]
    assert loaded[0].numpy().tolist() == buf.numpy().tolist()
    assert loaded[1].numpy().tolist() == [[4, 5, 6, 7], [8, 9, 10, 11]]
