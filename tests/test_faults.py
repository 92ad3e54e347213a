"""Fault injection: allocations that fail raise the documented errors and leave nothing behind.

``cm_device_debug_fail_alloc(dev, nth, min_bytes)`` makes the nth backend
allocation from now fail (and, with min_bytes, every one of at least
min_bytes): device allocations, pool misses, external wraps and file
mappings. On a failure the core gives back every pool cache of the device
and retries once if that freed anything; Python then collects garbage and
retries once more. Each test checks the error (class, ``.bytes``, a message
naming the size) and that nothing leaked or stayed half-registered:
active memory, live storages, residency counts and staged adds, pool
counts, open file descriptors and mappings, owners' reference counts.
"""

import ctypes
import gc
import os
import sys

import numpy as np
import pytest

import mlxbuf
from mlxbuf._cmetal import ffi, lib
from support import assert_names, page_aligned_array, page_aligned_ctypes, release_deferred

KIB = 1 << 10
MIB = 1 << 20


def inject(device, nth=0, min_bytes=0):
    """Switch fault injection on (or off with the defaults)."""
    assert lib.cm_device_debug_fail_alloc(device._handle, nth, min_bytes) == 0


@pytest.fixture(autouse=True)
def _no_leftover_faults(device):
    yield
    inject(device)


def snapshot(device, *pools):
    """Everything a failed allocation must leave as it was."""
    s = device.stats()
    rs = device.residency_set
    res = (rs.allocation_count, rs.allocated_size, rs.staged_adds, rs.staged_removes) if rs is not None else ()
    pool_counts = tuple(
        (p.free_count, p.free_bytes, p.in_use_count, p.in_use_bytes, p.requested_bytes) for p in pools
    )
    return (s.active_bytes, s.live_storages, s.cached_bytes, s.cached_storages, s.alloc_count, s.free_count), res, pool_counts


def refcount(buf):
    """C references to buf's storage."""
    info = ffi.new("cm_storage_info_t *")
    assert lib.cm_storage_info(buf._storage, info) == 0
    return info.refcount


def open_fds():
    return set(os.listdir("/proc/self/fd"))


def mapped(path):
    with open("/proc/self/maps") as f:
        return str(path) in f.read()


# ---- device allocations ----------------------------------------------------------------


def test_device_allocation_failure_leaves_nothing(device):
    keep = device.alloc_buffer(4096, "u8", (4096,))
    before = snapshot(device)
    inject(device, min_bytes=64 * KIB)
    with pytest.raises(mlxbuf.BufferAllocationError) as exc:
        device.alloc_buffer(100 * KIB, "f32", (25 * KIB,))
    assert exc.value.bytes == 100 * KIB
    assert isinstance(exc.value, MemoryError)
    assert_names(exc, "100.0 KiB", "injected")
    assert snapshot(device) == before
    small = device.alloc_buffer(4096, "u8", (4096,))  # below min_bytes: still works
    inject(device)
    again = device.alloc_buffer(100 * KIB, "u8", (1,))
    assert not again.numpy().any()
    del keep, small, again
    assert device.active_memory == 0


def test_device_allocation_gives_the_pool_caches_back_and_retries(device, pool):
    other = mlxbuf.BufferPool(device)
    cached = [pool.alloc(64 * KIB, "u8", (1,)) for _ in range(3)] + [other.alloc(4096, "u8", (1,))]
    del cached
    assert (pool.free_count, other.free_count) == (3, 1)
    rs = device.residency_set
    registered = rs.allocation_count if rs is not None else 0
    inject(device, nth=1)
    buf = device.alloc_buffer(8192, "u8", (8192,))  # first try fails, the retry after the trim succeeds
    # Every pool of the device gave its cache back, and those storages
    # left the residency set; nothing else changed.
    assert (pool.free_count, other.free_count) == (0, 0)
    assert device.active_memory == buf.allocated_size
    assert device.stats().cached_storages == 0
    if rs is not None:
        assert rs.allocation_count == registered - 4 + 1
    del buf
    other.close()


# ---- pools -------------------------------------------------------------------------------


def test_pool_miss_frees_the_cache_and_retries(device, pool):
    cached = [pool.alloc(64 * KIB, "u8", (1,)) for _ in range(2)]
    del cached
    stats = pool.stats()
    assert stats.free_count == 2
    inject(device, nth=1)
    buf = pool.alloc(200 * KIB, "u8", (200 * KIB,))
    assert buf.byte_len == pool.size_class(200 * KIB)
    s = pool.stats()
    assert (s.free_count, s.free_bytes, s.in_use_count) == (0, 0, 1)
    assert (s.hits, s.misses) == (stats.hits, stats.misses + 1)
    assert device.active_memory == buf.allocated_size
    del buf
    assert pool.free_count == 1


def test_pool_persistent_failure_raises_with_the_size(device, pool):
    keep = pool.alloc(4096, "u8", (1,))
    dead = pool.alloc(4096, "u8", (1,))
    dead_size = dead.allocated_size
    del dead
    inject(device, min_bytes=MIB)
    before = snapshot(device, pool)
    with pytest.raises(mlxbuf.BufferAllocationError) as exc:
        pool.alloc(3 * MIB, "u8", (1,))
    assert exc.value.bytes == 3 * MIB
    assert_names(exc, "3.0 MiB", "injected")
    # The documented price of the failure: the cache was given back first.
    device_counts, res, ((free, free_bytes, in_use, in_use_bytes, requested),) = snapshot(device, pool)
    assert (free, free_bytes) == (0, 0)
    assert (in_use, in_use_bytes, requested) == before[2][0][2:]
    assert device_counts[0] == before[0][0] - dead_size
    assert pool.alloc(4096, "u8", (1,)).byte_len == 4096  # small requests still work
    del keep


def test_batch_retry_after_a_failure_in_the_middle(device, pool):
    """The third of four allocations fails once: the two made before it go
    back to the cache, and the retry reuses them."""
    rs = device.residency_set
    adds = rs.staged_adds if rs is not None else 0
    inject(device, nth=3)
    bufs = pool.alloc_batch([(4096, "u8", (4096,)), (8192, "u8", (1,)), (16384, "u8", (1,)), (100, "u8", (100,))])
    assert [b.byte_len for b in bufs] == [4096, 8192, 16384, 112]
    assert len({b.contents_ptr for b in bufs}) == 4
    s = pool.stats()
    assert (s.in_use_count, s.free_count, s.hits, s.misses) == (4, 0, 2, 4)
    assert device.active_memory == sum(b.allocated_size for b in bufs)
    if rs is not None:
        assert rs.staged_adds - adds == 4  # cached storages stayed registered
    del bufs
    assert pool.in_use_count == 0


def test_batch_persistent_failure_is_all_or_nothing(device, pool):
    before_device = device.stats()
    inject(device, min_bytes=MIB)
    with pytest.raises(mlxbuf.BufferAllocationError) as exc:
        pool.alloc_batch([(4096, "u8", (1,)), (2 * MIB, "u8", (1,)), (8192, "u8", (1,))])
    assert exc.value.bytes == 4096 + 2 * MIB + 8192
    assert_names(exc, "batch request 1 of 3")
    s = pool.stats()
    assert (s.in_use_count, s.in_use_bytes, s.requested_bytes) == (0, 0, 0)
    # The allocation made before the failing one is cached, not leaked,
    # and the one after it was never made.
    assert (s.free_count, s.free_bytes) == (1, 4096)
    stats = device.stats()
    assert stats.active_bytes == before_device.active_bytes + s.free_allocated_bytes >= 4096
    assert stats.live_storages == before_device.live_storages + 1


# ---- file mappings -----------------------------------------------------------------------


def test_map_file_failure_leaves_no_mapping_and_no_descriptor(device, tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(bytes(range(256)) * 64)
    before, fds = snapshot(device), open_fds()
    inject(device, nth=1)
    with pytest.raises(mlxbuf.BufferAllocationError) as exc:
        device.map_file(path, 100)
    assert_names(exc, "injected")
    assert snapshot(device) == before
    assert open_fds() == fds
    assert not mapped(path)
    buf = device.map_file(path, 100)
    assert bytes(buf.memoryview()[:3]) == bytes([100, 101, 102])


def test_load_safetensors_failure_leaves_nothing(device, tmp_path):
    path = tmp_path / "model.safetensors"
    mlxbuf.save_safetensors(path, {"w": np.arange(1000, dtype=np.float32), "b": np.ones(7, np.float16)})
    before, fds = snapshot(device), open_fds()
    inject(device, nth=1)
    with pytest.raises(mlxbuf.BufferAllocationError):
        mlxbuf.load_safetensors(path, device=device)
    assert snapshot(device) == before
    assert open_fds() == fds
    assert not mapped(path)
    tensors = mlxbuf.load_safetensors(path, device=device)
    np.testing.assert_array_equal(tensors["w"].numpy(), np.arange(1000, dtype=np.float32))


# ---- external memory -----------------------------------------------------------------------


def test_from_numpy_failure_keeps_the_array_and_its_refcount(device):
    # Page-aligned, so Metal too wraps it without copying.
    array = page_aligned_array(4096, np.uint8, 16384)
    array[:] = np.arange(4096, dtype=np.uint32).astype(np.uint8)
    base = sys.getrefcount(array)
    before = snapshot(device)
    inject(device, nth=1)
    with pytest.raises(mlxbuf.BufferAllocationError) as exc:
        device.from_numpy(array, copy=False)
    assert_names(exc, "injected")
    del exc
    assert sys.getrefcount(array) == base
    assert snapshot(device) == before
    assert device.from_numpy(array, copy=False).data_ptr == array.ctypes.data


def test_from_raw_failure_with_ctypes_memory(device):
    block = page_aligned_ctypes(256)
    base = sys.getrefcount(block)
    inject(device, min_bytes=1)
    with pytest.raises(mlxbuf.BufferAllocationError):
        mlxbuf.Buffer.from_raw(device, ctypes.addressof(block), 256, owner=block)
    inject(device)
    assert sys.getrefcount(block) == base
    buf = mlxbuf.Buffer.from_raw(device, ctypes.addressof(block), 256, owner=block)
    assert sys.getrefcount(block) == base + 1
    del buf
    gc.collect()
    assert sys.getrefcount(block) == base


def test_from_dlpack_failure_leaves_the_capsule_to_its_producer(device, other_device):
    src = other_device.alloc_buffer(4096, "f32", (1024,))
    src.numpy()[:] = np.arange(1024)

    base = refcount(src)
    capsule = src.__dlpack__(max_version=(1, 0))
    assert refcount(src) == base + 1
    inject(device, nth=1)
    with pytest.raises(mlxbuf.BufferAllocationError):
        mlxbuf.from_dlpack(capsule, device=device, copy=False)
    inject(device)
    # Not consumed: the capsule still owns the tensor, and its destructor
    # gives the reference back exactly once.
    assert refcount(src) == base + 1
    del capsule
    gc.collect()
    assert refcount(src) == base
    assert device.active_memory == 0


def test_dlpack_export_copy_failure(device):
    buf = device.alloc_buffer(8192, "u8", (8192,))
    before = snapshot(device)
    inject(device, min_bytes=1)
    with pytest.raises(mlxbuf.BufferAllocationError):
        buf.__dlpack__(max_version=(1, 0), copy=True)
    inject(device)
    assert snapshot(device) == before
    assert refcount(buf) == 1


# ---- every failure, one after another ------------------------------------------------------


def test_every_allocation_of_a_workload_can_fail(device, tmp_path):
    """Fail the 1st, 2nd, ... backend allocation of a small workload (device,
    pool, batch, mapping) with persistent failures switched on for that one
    run: each attempt either succeeds or raises BufferAllocationError, and
    afterwards everything comes back."""
    path = tmp_path / "data.bin"
    path.write_bytes(bytes(8192))

    def workload(pool):
        out = [device.alloc_buffer(4096, "u8", (1,))]
        out += [pool.alloc(n, "u8", (1,)) for n in (100, 5000, 64 * KIB)]
        out += pool.alloc_batch([(4096, "u8", (1,)), (20000, "u8", (1,))])
        out.append(device.map_file(path))
        with device.command_encoder() as enc:
            enc.fill(out[1], 7)
        return out

    for nth in range(1, 12):
        pool = mlxbuf.BufferPool(device)
        inject(device, nth=nth)
        try:
            made = workload(pool)
        except mlxbuf.BufferAllocationError:
            made = None
        inject(device)
        del made
        pool.close()
        gc.collect()
        device.synchronize()
        stats = device.stats()
        assert (stats.active_bytes, stats.live_storages) == (0, 0), f"leak after failing allocation {nth}"
        rs = device.residency_set
        if rs is not None:
            assert rs.allocation_count == 0 and rs.allocated_size == 0
        release_deferred(device)  # the mapping waited for its removal's commit
        assert device.stats().deferred_release_bytes == 0
        assert not mapped(path)
