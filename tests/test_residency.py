"""Residency: staging on alloc/drop, at most one commit per submission, per-device counters."""

import ctypes
import gc
import time

import pytest

import mlxbuf
from support import allocated_size_of, assert_names, page_aligned_ctypes, run_clean, wait_until_released

DECODE_SCRATCH = 440


@pytest.fixture
def rs(device):
    if not device.residency_sets_enabled:
        pytest.skip(f"residency off on this device: {device.residency_disabled_reason}")
    return device.residency_set


def test_new_device_starts_at_zero(rs):
    assert rs.allocation_count == 0
    assert rs.committed_allocation_count == 0
    assert rs.commit_count == 0
    assert rs.pending is False
    assert rs.allocated_size == 0


def test_alloc_stages_an_add_without_committing(device, rs):
    buf = device.alloc_buffer(8192, "u8", (8192,))
    assert rs.allocation_count == 1
    assert rs.allocated_size == buf.allocated_size >= 8192
    assert rs.pending is True
    assert rs.committed_allocation_count == 0
    assert rs.commit_count == 0
    assert rs.contains(buf) and buf in rs
    assert buf.residency_set == rs


def test_flush_commits_only_when_pending(device, rs):
    buf = device.alloc_buffer(4096, "u8", (4096,))
    assert rs.flush_pending() is True
    assert rs.commit_count == 1
    assert rs.committed_allocation_count == 1
    assert rs.pending is False
    assert rs.flush_pending() is False
    assert rs.commit_count == 1
    rs.commit()
    assert rs.commit_count == 2
    del buf


def test_last_reference_stages_the_remove(device, rs):
    buf = device.alloc_buffer(4096, "u8", (4096,))
    rs.flush_pending()
    clone, sl, view, arr = buf.clone(), buf.slice_view(0, 8), buf.view("u32"), buf.numpy()
    assert rs.allocation_count == 1
    assert rs.info().staged_adds == 1
    del buf, clone, sl, view
    gc.collect()
    assert rs.pending is False
    assert rs.allocation_count == 1
    del arr
    gc.collect()
    assert rs.allocation_count == 0
    assert rs.pending is True
    assert rs.committed_allocation_count == 1
    assert rs.info().staged_removes == 1
    assert rs.commit_count == 1


def test_clones_and_slices_never_register_twice(device, rs):
    buf = device.alloc_buffer(4096, "f32", (1024,))
    views = [buf.clone(), buf.slice_view(16, 4), buf.view("u8"), buf.reshape(32, 32)]
    arrays = [buf.numpy(), buf.as_slice("u8")]
    assert rs.allocation_count == 1
    assert rs.info().staged_adds == 1
    views.clear()
    arrays.clear()
    gc.collect()
    assert rs.contains(buf)
    assert rs.info().staged_removes == 0


def test_hundred_allocs_hundred_drops_one_commit(device, rs):
    src = device.alloc_buffer(64, "u8", (64,))
    dst = device.alloc_buffer(64, "u8", (64,))
    rs.flush_pending()
    before = rs.commit_count
    bufs = [device.alloc_buffer(4096, "u8", (4096,)) for _ in range(100)]
    assert rs.allocation_count == 102
    del bufs
    gc.collect()
    assert rs.allocation_count == 2
    assert rs.pending
    enc = device.command_encoder()
    enc.copy(src, dst)
    enc.commit_and_wait()
    assert rs.commit_count - before == 1
    assert rs.pending is False
    assert rs.committed_allocation_count == 2


def test_decode_tokens_cost_one_commit_each(device, rs):
    weights = device.alloc_buffer(1 << 16, "f16", (1 << 15,))
    out = device.alloc_buffer(1 << 16, "f16", (1 << 15,))
    rs.flush_pending()
    per_token = []
    for _ in range(5):
        before = rs.commit_count
        scratch = [device.alloc_buffer(4096, "f32", (1024,)) for _ in range(DECODE_SCRATCH)]
        with device.command_encoder() as enc:
            enc.copy(weights, out)
            enc.copy(weights, scratch[0].view("f16"), 4096)
        del scratch
        gc.collect()
        # The token's drops are staged now and ride on the next submission.
        per_token.append(rs.commit_count - before)
    assert per_token == [1, 1, 1, 1, 1]
    assert rs.info().staged_adds == 2 + 5 * DECODE_SCRATCH


def test_empty_submission_changes_no_counter(device, rs):
    keep = device.alloc_buffer(4096, "u8", (4096,))
    rs.flush_pending()
    before = rs.info()
    enc = device.command_encoder()
    enc.commit_and_wait()
    assert enc.status == "completed"
    after = rs.info()
    assert after == before
    del keep


def test_commit_count_is_per_device(backend):
    a, b = mlxbuf.Device(backend), mlxbuf.Device(backend)
    if not a.residency_sets_enabled:
        pytest.skip("residency off")
    keep = a.alloc_buffer(4096, "u8", (1,))
    a.residency_set.flush_pending()
    assert a.residency_set.commit_count == 1
    assert b.residency_set.commit_count == 0
    assert not b.residency_set.contains(keep)
    del keep


def test_no_residency_registers_nothing(backend, monkeypatch):
    monkeypatch.setenv("MLXBUF_NO_RESIDENCY", "1")
    dev = mlxbuf.Device(backend)
    assert dev.residency_set is None
    bufs = [dev.alloc_buffer(4096, "u8", (4096,)) for _ in range(10)]
    pool = mlxbuf.BufferPool(dev)
    pooled = pool.alloc(4096, "u8", (4096,))
    pool.register_existing(bufs[0])  # a no-op without residency
    with dev.command_encoder() as enc:
        enc.copy(bufs[0], bufs[1])
        enc.fill(pooled, 4)
    assert (pooled.numpy() == 4).all()
    assert all(b.residency_set is None for b in bufs)


def test_sharding_spreads_storages_and_commits_per_dirty_shard(device, rs):
    page = device.page_size
    unit = allocated_size_of(device, page)  # shards count allocated bytes
    old = rs.set_shard_cap(2 * unit)
    assert old > 2 * unit
    assert rs.shard_cap == 2 * unit
    bufs = [device.alloc_buffer(page, "u8", (page,)) for _ in range(6)]
    assert rs.shard_count == 3
    shards = rs.shards()
    assert [s.allocation_count for s in shards] == [2, 2, 2]
    assert [s.allocated_size for s in shards] == [2 * unit] * 3
    assert all(s.pending for s in shards)
    assert rs.flush_pending() is True
    assert rs.commit_count == 3
    del bufs[5]
    assert [s.pending for s in rs.shards()] == [False, False, True]
    assert rs.flush_pending() is True
    assert rs.commit_count == 4


def test_default_shard_cap_keeps_a_decode_token_in_one_shard(device, rs):
    bufs = [device.alloc_buffer(4096, "f32", (1024,)) for _ in range(DECODE_SCRATCH)]
    assert rs.shard_count == 1
    del bufs


def test_shard_cap_must_be_positive(device, rs):
    with pytest.raises(mlxbuf.InvalidArgument) as exc:
        rs.shard_cap = 0
    assert_names(exc, "0")


def test_keepalive_requests_residency_after_a_submission(device, rs):
    keep = device.alloc_buffer(4096, "u8", (4096,))
    device.set_residency_keepalive(5.0, 0.01)
    assert rs.keepalive == (5.0, 0.01)
    device.command_encoder().commit_and_wait()
    deadline = time.monotonic() + 10
    while rs.keepalive_requests == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert rs.keepalive_requests > 0
    device.set_residency_keepalive(0)
    assert rs.keepalive[0] == 0
    del keep


def test_residency_repr_and_info(device, rs):
    keep = device.alloc_buffer(4096, "u8", (4096,))
    info = rs.info()
    assert info.enabled and info.allocation_count == 1 and info.pending
    assert "allocations=1" in repr(rs)
    del keep


def test_contains_foreign_buffer_is_false(device, other_device, rs):
    foreign = other_device.alloc_buffer(4096, "u8", (1,))
    assert rs.contains(foreign) is False


@pytest.mark.parametrize(
    "args, fragments",
    [(("soon",), ["'soon'"]), ((-1,), ["-1"]), ((1, 0), ["interval", "0"]), ((1, "x"), ["'x'"])],
)
def test_keepalive_arguments(device, rs, args, fragments):
    with pytest.raises(mlxbuf.InvalidArgument) as exc:
        device.set_residency_keepalive(*args)
    assert_names(exc, *fragments)
    assert rs.keepalive[0] == 0


# ---- deferred release: freed memory waits for the commit that removes it ----------


def test_freed_memory_waits_for_the_next_submission(device, rs):
    """The set holds a member until its removal is committed, so a freed
    buffer's memory (and native buffer) is given back right after that
    commit, which the next submission makes."""
    rs.set_release_policy(1 << 40, 0)  # neither size nor time: only commits
    keep = device.alloc_buffer(64, "u8", (64,))
    buf = device.alloc_buffer(1 << 20, "u8", (1 << 20,))
    rs.flush_pending()
    size = buf.allocated_size
    frees = device.stats().free_count
    del buf
    gc.collect()
    s = device.stats()
    assert (s.active_bytes, s.deferred_release_bytes) == (keep.allocated_size, size)
    assert (rs.pending_release_count, rs.pending_release_bytes) == (1, size)
    assert s.free_count == frees and s.current_allocated_size >= keep.allocated_size + size
    device.command_encoder().commit_and_wait()  # an empty one: nothing pending but the removal
    s = device.stats()
    assert (s.deferred_release_bytes, rs.pending_release_count, s.free_count) == (0, 0, frees + 1)
    assert s.current_allocated_size >= keep.allocated_size


def test_release_threshold_commits_without_a_submission(device, rs):
    """Past the threshold the removals are committed (one commit) and the
    memory given back by the free that crossed it."""
    unit = allocated_size_of(device, 1 << 18)
    assert rs.set_release_policy(2 * unit, 0)[0] == 64 << 20  # the default threshold
    assert rs.release_policy == (2 * unit, 0.0)
    bufs = [device.alloc_buffer(1 << 18, "u8", (1,)) for _ in range(3)]
    rs.flush_pending()
    commits = rs.commit_count
    del bufs[:2]
    assert rs.pending_release_bytes == 2 * unit and rs.commit_count == commits  # not above it
    del bufs[0]
    assert rs.pending_release_count == 0 and device.stats().deferred_release_bytes == 0
    assert rs.commit_count == commits + 1
    # Threshold 0: every removal is committed at once (the Rust crate's way).
    rs.release_threshold_bytes = 0
    buf = device.alloc_buffer(64, "u8", (1,))
    del buf
    assert rs.pending_release_count == 0 and rs.commit_count == commits + 2


def test_release_idle_timeout_commits_from_the_residency_thread(device, rs):
    """A program that frees memory and stops submitting gets it back after
    the idle timeout: the residency thread commits. A bounded wait, not a
    timing assertion: it fails only if the commit never comes."""
    rs.set_release_policy(1 << 40, 0.01)
    buf = device.alloc_buffer(1 << 20, "u8", (1 << 20,))
    rs.flush_pending()
    commits = rs.commit_count
    del buf
    wait_until_released(device)
    assert rs.commit_count == commits + 1
    assert not rs.pending
    # Lowering the timeout applies to what already waits.
    rs.set_release_policy(1 << 40, 3600)
    buf = device.alloc_buffer(64, "u8", (1,))
    del buf
    assert rs.pending_release_count == 1
    rs.release_idle_seconds = 0.01
    wait_until_released(device)


def test_lowering_the_threshold_below_what_waits_commits_it(device, rs):
    rs.set_release_policy(1 << 40, 0)
    bufs = [device.alloc_buffer(1 << 16, "u8", (1,)) for _ in range(4)]
    del bufs
    assert rs.pending_release_count == 4
    rs.release_threshold_bytes = 1  # lowering below what waits commits now
    assert rs.pending_release_count == 0


def test_memory_limit_commits_waiting_removals_before_it_fails(device, rs):
    """Freed memory still held by the set counts against the limit; an
    allocation over it first commits the waiting removals, then fits."""
    rs.set_release_policy(1 << 40, 0)
    unit = allocated_size_of(device, 4096)
    keep = device.alloc_buffer(4096, "u8", (1,))
    device.set_memory_limit(keep.allocated_size + 2 * unit)
    try:
        dead = device.alloc_buffer(2 * unit, "u8", (1,))
        commits = rs.commit_count
        del dead
        assert device.stats().deferred_release_bytes == 2 * unit
        again = device.alloc_buffer(2 * unit, "u8", (1,))
        assert rs.commit_count == commits + 1 and device.stats().deferred_release_bytes == 0
        with pytest.raises(mlxbuf.BufferAllocationError) as exc:
            device.alloc_buffer(4096, "u8", (1,))
        assert_names(exc, "waiting for a residency commit", "memory limit")
        del again
    finally:
        device.set_memory_limit(None)


def test_release_policy_arguments(device, rs):
    before = rs.release_policy
    for args, fragments in [
        ((-1, 1.0), ["-1"]),
        ((1 << 64, 1.0), [str(1 << 64)]),
        ((0, -1.0), ["-1", "0.001"]),
        ((0, 1e-4), ["0.0001", "0.001"]),
        ((0, float("nan")), ["nan"]),
        ((0, "soon"), ["'soon'"]),
        ((True, 1.0), ["True"]),
    ]:
        with pytest.raises(mlxbuf.InvalidArgument) as exc:
            rs.set_release_policy(*args)
        assert_names(exc, *fragments)
    assert rs.release_policy == before
    assert rs.set_release_policy((1 << 64) - 1, 1e9) == before
    assert rs.release_policy == ((1 << 64) - 1, 1e9)


@pytest.mark.parametrize(
    "name, value",
    [("MLXBUF_RESIDENCY_RELEASE_BYTES", "-1"), ("MLXBUF_RESIDENCY_RELEASE_BYTES", "lots"),
     ("MLXBUF_RESIDENCY_RELEASE_SECONDS", "soon"), ("MLXBUF_RESIDENCY_RELEASE_SECONDS", "-2")],
)
def test_bad_release_env_values(backend, monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(mlxbuf.InvalidArgument) as exc:
        mlxbuf.Device(backend)
    assert_names(exc, value)


def test_release_env_values_apply_at_open(backend, monkeypatch):
    monkeypatch.setenv("MLXBUF_RESIDENCY_RELEASE_BYTES", "0x100000")
    monkeypatch.setenv("MLXBUF_RESIDENCY_RELEASE_SECONDS", "0.25")
    rs = mlxbuf.Device(backend).residency_set
    assert rs.release_policy == (1 << 20, 0.25)
    monkeypatch.delenv("MLXBUF_RESIDENCY_RELEASE_SECONDS")
    monkeypatch.setenv("MLXBUF_RESIDENCY_RELEASE_BYTES", "0")
    assert mlxbuf.Device(backend).residency_set.release_policy == (0, 1.0)  # the default timeout


def test_no_residency_gives_memory_back_at_once(backend):
    dev = mlxbuf.Device(backend, residency=False)
    buf = dev.alloc_buffer(1 << 20, "u8", (1,))
    frees = dev.stats().free_count
    del buf
    s = dev.stats()
    assert (s.active_bytes, s.deferred_release_bytes, s.free_count) == (0, 0, frees + 1)


def test_device_teardown_gives_back_what_waits(backend):
    dev = mlxbuf.Device(backend)
    dev.residency_set.set_release_policy(1 << 40, 0)
    owner_gone = []

    class Owner:
        def __del__(self):
            owner_gone.append(True)

    memory = page_aligned_ctypes(1 << 16)
    ext = mlxbuf.Buffer.from_raw(dev, ctypes.addressof(memory), 1 << 16, owner=Owner())
    mlxbuf.BufferPool(dev).register_existing(ext)
    bufs = [dev.alloc_buffer(1 << 16, "u8", (1,)) for _ in range(3)]
    del ext, bufs
    gc.collect()
    assert dev.residency_set.pending_release_count == 4 and not owner_gone
    del dev
    gc.collect()
    assert owner_gone == [True]


def test_the_device_can_die_on_the_residency_thread(backend):
    """An external owner's release, run by the residency thread after its
    idle commit, drops the device's last reference there: the thread
    finishes the device's teardown itself (it cannot join itself)."""
    script = f"""
import ctypes, gc, mmap, os, threading, time
import mlxbuf

baseline = len(os.listdir("/proc/self/task"))
gone = threading.Event()

class Owner:
    def __init__(self, dev):
        self.dev = dev
    def __del__(self):
        self.dev = None                   # the Device's last reference
        gone.set()

dev = mlxbuf.Device({backend!r})
dev.residency_set.set_release_policy(1 << 40, 0.01)
mapping = mmap.mmap(-1, 1 << 16)
memory = (ctypes.c_uint8 * (1 << 16)).from_buffer(mapping)
ext = mlxbuf.Buffer.from_raw(dev, ctypes.addressof(memory), 1 << 16, owner=Owner(dev))
pool = mlxbuf.BufferPool(dev)
pool.register_existing(ext)
pool.close()
del ext, pool, dev
gc.collect()
assert gone.wait(60)
deadline = time.monotonic() + 60
while len(os.listdir("/proc/self/task")) > baseline and time.monotonic() < deadline:
    time.sleep(0.01)
assert len(os.listdir("/proc/self/task")) <= baseline, "the device's threads did not end"
print("ok")
"""
    run_clean(script, timeout=120)
