"""CommandEncoder: copy/fill, offsets, status, errors, context manager and in-flight holds."""

import gc

import numpy as np
import pytest

import mlxbuf
from mlxbuf.encoder import _constant_bytes
from support import assert_names

MIB = 1 << 20


def pattern(n, seed=1):
    return (np.arange(n, dtype=np.uint32) * 2654435761 + seed).astype(np.uint8)


def test_copy_and_fill(device):
    src = device.alloc_buffer(4096, "u8", (4096,))
    dst = device.alloc_buffer(4096, "u8", (4096,))
    src.numpy()[:] = pattern(4096)
    enc = device.command_encoder()
    enc.copy(src, dst)
    assert enc.op_count == 1
    enc.commit_and_wait()
    assert (dst.numpy() == pattern(4096)).all()
    with device.command_encoder() as enc:
        enc.fill(dst, 0xAB)
    assert (dst.numpy() == 0xAB).all()


def test_copy_nbytes_and_slices_bind_at_their_own_offsets(device):
    src = device.alloc_buffer(4096, "u8", (4096,))
    dst = device.alloc_buffer(4096, "u8", (4096,))
    src.numpy()[:] = pattern(4096)
    with device.command_encoder() as enc:
        enc.copy(src.slice_view(1000, 100), dst.slice_view(3000, 200), nbytes=64)
    out = dst.numpy()
    assert (out[3000:3064] == pattern(4096)[1000:1064]).all()
    assert not out[:3000].any() and not out[3064:].any()


def test_fill_a_slice_touches_only_the_slice(device):
    buf = device.alloc_buffer(4096, "f32", (1024,))
    with device.command_encoder() as enc:
        enc.fill(buf.slice_view(400, 10), 0xFF)
    raw = buf.as_slice("u8")
    assert (raw[400:440] == 0xFF).all()
    assert not raw[:400].any() and not raw[440:].any()


def test_status_transitions(device):
    buf = device.alloc_buffer(MIB, "u8", (MIB,))
    enc = device.command_encoder()
    assert enc.status == "not_committed"
    enc.fill(buf, 1)
    enc.commit()
    assert enc.status in ("committed", "completed")
    enc.wait()
    assert enc.status == "completed"
    enc.wait()  # waiting again is fine
    assert enc.hold_count == 0
    assert "completed" in repr(enc)


def test_holds_from_encode_time(device):
    a = device.alloc_buffer(4096, "u8", (4096,))
    b = device.alloc_buffer(4096, "u8", (4096,))
    enc = device.command_encoder()
    enc.copy(a, b)
    enc.fill(a, 1)
    assert enc.hold_count == 2
    del a, b
    gc.collect()
    assert device.active_memory == 8192  # the encoder still holds both
    enc.discard()
    assert enc.status == "discarded"
    assert enc.hold_count == 0
    assert device.active_memory == 0


def test_dropping_everything_after_a_non_blocking_commit(device):
    """The command buffer's holds keep its storages alive: new same-size
    buffers written before the wait cannot land on them."""
    n = 4 * MIB
    expected = pattern(n, seed=7)
    src = device.alloc_buffer(n, "u8", (n,))
    mid = device.alloc_buffer(n, "u8", (n,))
    dst = device.alloc_buffer(n, "u8", (n,))
    src.numpy()[:] = expected
    enc = device.command_encoder()
    for _ in range(4):
        enc.copy(src, mid)
        enc.copy(mid, dst)
    enc.commit()
    del src, mid
    gc.collect()
    fresh = [device.alloc_buffer(n, "u8", (n,)) for _ in range(4)]
    for buf in fresh:
        buf.numpy(wait=False)[:] = 0x55
    del buf
    enc.wait()
    assert (dst.numpy() == expected).all()
    del fresh
    gc.collect()
    assert device.active_memory == n


def test_dropping_everything_with_a_pool(device):
    pool = mlxbuf.BufferPool(device)
    n = MIB
    expected = pattern(n, seed=3)
    src = pool.alloc(n, "u8", (n,))
    dst = pool.alloc(n, "u8", (n,))
    src.numpy()[:] = expected
    enc = device.command_encoder()
    enc.copy(src, dst)
    src_address = src.contents_ptr
    del src
    gc.collect()
    # Encoded but not committed: the hold keeps src out of the cache.
    assert pool.free_count == 0
    other = pool.alloc(n, "u8", (n,))
    assert other.contents_ptr != src_address
    other.numpy()[:] = 0
    enc.commit_and_wait()
    assert (dst.numpy() == expected).all()
    assert pool.free_count == 1  # src came back once the command buffer completed
    pool.close()


def test_numpy_waits_for_submitted_writers(device):
    n = 16 * MIB
    buf = device.alloc_buffer(n, "u8", (n,))
    enc = device.command_encoder()
    for value in (1, 2, 3, 4):
        enc.fill(buf, value)
    enc.commit()
    assert (buf.numpy() == 4).all()
    assert buf.memoryview()[n - 1] == 4
    enc.wait()


def test_command_buffers_complete_in_submission_order(device):
    buf = device.alloc_buffer(MIB, "u8", (MIB,))
    encoders = []
    for value in range(1, 9):
        enc = device.command_encoder()
        enc.fill(buf, value)
        enc.commit()
        encoders.append(enc)
    encoders[-1].wait()
    assert all(e.status == "completed" for e in encoders)
    assert (buf.numpy() == 8).all()


def test_context_manager_commits_and_waits(device):
    buf = device.alloc_buffer(4096, "u8", (4096,))
    with device.command_encoder() as enc:
        enc.fill(buf, 9)
    assert enc.status == "completed"
    assert (buf.numpy() == 9).all()
    with device.command_encoder() as enc:
        enc.fill(buf, 10)
        enc.commit()
    assert enc.status == "completed"
    assert (buf.numpy() == 10).all()


def test_exception_in_the_block_discards(device):
    buf = device.alloc_buffer(4096, "u8", (4096,))
    submitted = device.stats().submitted
    with pytest.raises(RuntimeError):
        with device.command_encoder() as enc:
            enc.fill(buf, 5)
            raise RuntimeError("boom")
    assert enc.status == "discarded"
    assert enc.hold_count == 0
    assert not buf.numpy().any()
    assert device.stats().submitted == submitted


def test_misuse_raises_command_buffer_error(device):
    buf = device.alloc_buffer(4096, "u8", (4096,))
    enc = device.command_encoder()
    with pytest.raises(mlxbuf.CommandBufferError) as exc:
        enc.wait()
    assert_names(exc, "commit")
    enc.commit()
    with pytest.raises(mlxbuf.CommandBufferError) as exc:
        enc.commit()
    assert_names(exc, "already committed")
    with pytest.raises(mlxbuf.CommandBufferError):
        enc.fill(buf, 1)
    with pytest.raises(mlxbuf.CommandBufferError):
        enc.copy(buf, buf.clone())
    enc.wait()
    assert enc.op_count == 0


@pytest.mark.parametrize("value", [256, -1, 1000])
def test_fill_value_out_of_range(device, value):
    buf = device.alloc_buffer(64, "u8", (64,))
    enc = device.command_encoder()
    with pytest.raises(mlxbuf.InvalidArgument) as exc:
        enc.fill(buf, value)
    assert_names(exc, value, "255")
    assert enc.op_count == 0


@pytest.mark.parametrize("value", [1.5, "7", None, True])
def test_fill_value_wrong_type(device, value):
    buf = device.alloc_buffer(64, "u8", (64,))
    with pytest.raises(mlxbuf.InvalidArgument) as exc:
        device.command_encoder().fill(buf, value)
    assert_names(exc, repr(value))


def test_copy_that_does_not_fit(device):
    a = device.alloc_buffer(4096, "u8", (100,))
    b = device.alloc_buffer(4096, "u8", (50,))
    enc = device.command_encoder()
    with pytest.raises(mlxbuf.InvalidArgument) as exc:
        enc.copy(a, b)
    assert_names(exc, 100, 50)
    with pytest.raises(mlxbuf.InvalidArgument) as exc:
        enc.copy(b, a, nbytes=51)
    assert_names(exc, 51, 50)
    with pytest.raises(mlxbuf.InvalidArgument) as exc:
        enc.copy(a, b, nbytes=-1)
    assert_names(exc, -1)
    with pytest.raises(mlxbuf.InvalidArgument):
        enc.copy(a, np.zeros(10))
    assert enc.op_count == 0 and enc.hold_count == 0
    submitted = device.stats().submitted
    enc.commit_and_wait()
    assert device.stats().submitted == submitted + 1


def test_buffers_of_another_device(device, other_device):
    mine = device.alloc_buffer(64, "u8", (64,))
    theirs = other_device.alloc_buffer(64, "u8", (64,))
    enc = device.command_encoder()
    for call in (lambda: enc.copy(mine, theirs), lambda: enc.copy(theirs, mine), lambda: enc.fill(theirs, 1)):
        with pytest.raises(mlxbuf.InvalidArgument) as exc:
            call()
        assert_names(exc, "another device")
    assert enc.op_count == 0


def test_dispatch_needs_a_kernel(device):
    buf = device.alloc_buffer(64, "u8", (64,))
    with pytest.raises(mlxbuf.InvalidArgument) as exc:
        device.command_encoder().dispatch("add", 64, 64, buffers=[buf])
    assert_names(exc, "'add'", "Kernel")


def test_constant_packing():
    assert _constant_bytes(3, 0) == (3).to_bytes(4, "little")
    assert _constant_bytes(-2, 0) == (-2).to_bytes(4, "little", signed=True)
    assert _constant_bytes(3_000_000_000, 0) == (3_000_000_000).to_bytes(4, "little")
    assert _constant_bytes(1.5, 0) == np.float32(1.5).tobytes()
    assert _constant_bytes(True, 0) == b"\x01"
    assert _constant_bytes(np.int64(5), 0) == np.int64(5).tobytes()
    assert _constant_bytes(np.array([1, 2], np.uint16), 0) == np.array([1, 2], np.uint16).tobytes()
    assert _constant_bytes(b"\x01\x02", 0) == b"\x01\x02"
    with pytest.raises(mlxbuf.InvalidArgument) as exc:
        _constant_bytes(1 << 40, 2)
    assert_names(exc, 1 << 40, "constant 2")
    with pytest.raises(mlxbuf.InvalidArgument):
        _constant_bytes("x", 0)
