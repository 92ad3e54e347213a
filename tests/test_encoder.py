"""CommandEncoder: copy/fill, offsets, status, errors, context manager and in-flight holds."""

import gc
import subprocess
import sys
import weakref

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
    held = a.allocated_size + b.allocated_size
    del a, b
    gc.collect()
    assert device.active_memory == held  # the encoder still holds both
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


def test_wait_returns_after_every_hold_is_released(device):
    """wait() means the holds are gone, each semantic asserted directly:
    pooled storages are back in their pool, dropped storages' removals are
    staged, external memory's owner is released, writer counts are zero."""
    pool = mlxbuf.BufferPool(device)
    rs = device.residency_set
    owner = np.arange(4096, dtype=np.uint8)
    owner_ref = weakref.ref(owner)
    external = mlxbuf.Buffer.from_raw(device, owner.ctypes.data, owner.nbytes, owner=owner) \
        if device.backend == "host" else device.from_numpy(owner, copy=True)
    del owner
    pooled = pool.alloc(4096, "u8", (4096,))
    scratch = device.alloc_buffer(4096, "u8", (4096,))
    kept = device.alloc_buffer(4096, "u8", (4096,))
    registered = rs.allocation_count if rs is not None else 0
    enc = device.command_encoder()
    enc.copy(external, pooled)
    enc.copy(pooled, scratch)
    enc.copy(scratch, kept)
    enc.fill(pooled, 7)
    # The pooled storage stays registered in its pool; the others' removals
    # are staged once they die (on Metal the external one is a registered
    # device copy, on host an unregistered wrap).
    dropped_registered = sum(rs.contains(b) for b in (external, scratch)) if rs is not None else 0
    del external, pooled, scratch
    gc.collect()
    assert enc.hold_count == 4
    assert pool.free_count == 0, "a held pooled storage went back to its pool"
    if rs is not None:
        assert rs.allocation_count == registered, "a held storage's removal was staged"
    enc.commit()
    enc.wait()
    assert enc.hold_count == 0
    assert pool.free_count == 1, "the pooled storage is not back in its pool after wait()"
    if rs is not None:
        assert rs.allocation_count == registered - dropped_registered, \
            "the dropped storages' removals are not staged after wait()"
        assert rs.pending
    if device.backend == "host":
        assert owner_ref() is None, "the external memory's owner outlived wait()"
    assert kept._info().inflight_writers == 0
    stats = device.stats()
    assert stats.completed == stats.submitted
    assert (kept.numpy() == np.arange(4096, dtype=np.uint8)).all()
    pool.close()


# The C completion must release the holds before it marks the command buffer
# done and wakes wait(). Dropping an external storage's owner takes the GIL,
# and here each owner's finalizer lets the GIL go again (a short sleep), so
# the thread returning from wait() gets it while owners remain: with the
# order swapped, owners are still alive right after wait() in most rounds.
HOLDS_BEFORE_WAKE = r"""
import sys, time, weakref, numpy as np, mlxbuf

class Owner:
    def __init__(self):
        self.memory = np.ones(256, np.uint8)

    def __del__(self):
        time.sleep(0.0002)

dev = mlxbuf.Device("host")
alive = 0
rounds = int(sys.argv[1])
for _ in range(rounds):
    owners = [Owner() for _ in range(16)]
    refs = [weakref.ref(o) for o in owners]
    enc = dev.command_encoder()
    for o in owners:
        enc.fill(mlxbuf.Buffer.from_raw(dev, o.memory.ctypes.data, o.memory.nbytes, owner=o), 7)
    del owners, o
    enc.commit()
    enc.wait()
    if any(r() is not None for r in refs):
        alive += 1
print(alive, rounds)
"""


def test_wait_returns_after_the_holds_are_released_many_rounds():
    proc = subprocess.run([sys.executable, "-c", HOLDS_BEFORE_WAKE, "200"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    alive, rounds = map(int, proc.stdout.split())
    assert alive == 0, f"the owner of a held storage was alive right after wait() in {alive} of {rounds} rounds"


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
