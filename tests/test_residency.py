"""Residency: staging on alloc/drop, at most one commit per submission, per-device counters."""

import gc
import time

import pytest

import mlxbuf
from support import assert_names

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
    assert rs.allocated_size == 8192
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
    old = rs.set_shard_cap(2 * page)
    assert old > 2 * page
    assert rs.shard_cap == 2 * page
    bufs = [device.alloc_buffer(page, "u8", (page,)) for _ in range(6)]
    assert rs.shard_count == 3
    shards = rs.shards()
    assert [s.allocation_count for s in shards] == [2, 2, 2]
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
