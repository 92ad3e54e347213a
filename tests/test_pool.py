"""BufferPool: reuse only after the last reference, size classes, residency at steady state, limits."""

import gc
import threading

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import mlxbuf
from mlxbuf._cmetal import ffi, lib
from support import allocated_size_of, assert_names, page_aligned_array, run_threads

KIB = 1 << 10
MIB = 1 << 20



def counts(pool):
    s = pool.stats()
    return (s.free_count, s.free_bytes, s.in_use_count, s.in_use_bytes, s.requested_bytes, s.hits, s.misses)


def test_reuse_after_the_last_reference_returns_the_same_storage(pool):
    a = pool.alloc(4096, "f32", (1024,))
    assert a.storage_kind == "pooled"
    assert pool.in_use_count == 1 and pool.free_count == 0
    address = a.contents_ptr
    del a
    assert pool.free_count == 1 and pool.in_use_count == 0
    b = pool.alloc(4096, "u8", (4096,))
    assert b.contents_ptr == address
    s = pool.stats()
    assert (s.hits, s.misses) == (1, 1)


def test_fresh_storages_are_zeroed_reused_ones_are_not_unless_asked(pool):
    a = pool.alloc(4096, "u8", (4096,))
    assert not a.numpy().any()
    a.numpy()[:] = 7
    del a
    b = pool.alloc(4096, "u8", (4096,))
    assert (b.numpy() == 7).all()  # documented: not re-zeroed
    del b
    c = pool.alloc(4096, "u8", (4096,), zero=True)
    assert not c.numpy().any()


HOLDERS = {
    "clone": lambda b: b.clone(),
    "slice": lambda b: b.slice_view(64, 8),
    "view": lambda b: b.view("u8"),
    "numpy": lambda b: b.numpy(),
    "array_interface": lambda b: np.asarray(b),
    "memoryview": lambda b: b.memoryview(),
}


@pytest.mark.parametrize("holder", sorted(HOLDERS))
def test_no_reuse_while_anything_holds_the_storage(pool, holder):
    a = pool.alloc(4096, "f32", (1024,))
    address = a.contents_ptr
    keep = HOLDERS[holder](a)
    del a
    gc.collect()
    assert pool.free_count == 0
    b = pool.alloc(4096, "f32", (1024,))
    assert b.contents_ptr != address
    del keep
    gc.collect()
    assert pool.free_count == 1
    c = pool.alloc(4096, "f32", (1024,))
    assert c.contents_ptr == address


def test_no_reuse_while_in_flight(device, pool):
    a = pool.alloc(4096, "u8", (4096,))
    other = device.alloc_buffer(4096, "u8", (4096,))
    address = a.contents_ptr
    enc = device.command_encoder()
    enc.copy(other, a)
    del a
    assert pool.free_count == 0
    assert pool.alloc(4096, "u8", (4096,)).contents_ptr != address
    enc.commit_and_wait()
    assert pool.free_count == 2  # a came back once the command buffer completed
    x, y = pool.alloc(4096, "u8", (1,)), pool.alloc(4096, "u8", (1,))
    assert address in (x.contents_ptr, y.contents_ptr)


def test_steady_state_churn_costs_no_residency_commit(device, pool):
    rs = device.residency_set
    if rs is None:
        pytest.skip("residency off")
    src = device.alloc_buffer(256, "u8", (256,))
    dst = device.alloc_buffer(256, "u8", (256,))

    def token():
        scratch = [pool.alloc(n, "f32", (n // 4,)) for n in (4096, 8192, 65536) * 10]
        with device.command_encoder() as enc:
            enc.copy(src, dst)
        del scratch

    token()
    token()
    before = rs.info()
    for _ in range(10):
        token()
    after = rs.info()
    assert after.commit_count == before.commit_count
    assert after.staged_adds == before.staged_adds
    assert after.staged_removes == before.staged_removes
    assert pool.stats().misses == 30


def test_cached_storages_stay_resident_until_cleared(device, pool):
    rs = device.residency_set
    if rs is None:
        pytest.skip("residency off")
    bufs = [pool.alloc(4096, "u8", (1,)) for _ in range(5)]
    del bufs
    assert pool.free_count == 5
    assert rs.allocation_count == 5
    pool.clear()
    assert pool.free_count == 0 and pool.free_bytes == 0
    assert rs.allocation_count == 0
    assert rs.pending
    assert device.active_memory == 0


def test_byte_len_is_the_size_class(pool):
    buf = pool.alloc(5000, "u8", (5000,))
    assert buf.byte_len == pool.size_class(5000) >= 5000
    assert buf.shape == (5000,)
    s = pool.stats()
    assert s.requested_bytes == 5000
    assert s.in_use_bytes == buf.byte_len
    assert s.rounding_waste_bytes == buf.byte_len - 5000


@given(st.data())
def test_size_class_waste_bound(data):
    pool = _shared_pool()
    n = data.draw(st.integers(min_value=1, max_value=pool.device.max_buffer_length))
    c = pool.size_class(n)
    assert c >= n
    if n >= 4 * KIB:
        assert (c - n) / n < 0.125
    if n >= MIB:
        assert c % pool.device.page_size == 0
    assert pool.size_class(max(1, n - 1)) <= c  # monotonic
    assert c <= pool.device.max_buffer_length


@given(st.integers(min_value=1, max_value=(1 << 64) - 1))
def test_size_class_arithmetic_never_wraps(n):
    out = ffi.new("uint64_t *")
    rc = lib.cm_size_class(n, 16 * KIB, out)
    if rc == 0:
        assert n <= out[0] < 1 << 64
        if n >= 4 * KIB:
            assert (out[0] - n) / n < 0.125
    else:
        assert rc == lib.CM_ERR_INVALID_ARGUMENT and out[0] == 0
        assert n > (1 << 64) - (1 << 58)


_POOL = []


def _shared_pool():
    if not _POOL:
        _POOL.append(mlxbuf.BufferPool(mlxbuf.default_device()))
    return _POOL[0]


@given(st.lists(st.integers(min_value=1, max_value=4 * MIB), min_size=1, max_size=20))
def test_pool_buffers_never_overlap(sizes):
    pool = _shared_pool()
    bufs = [pool.alloc(n, "u8", (n,)) for n in sizes]
    spans = sorted((b.contents_ptr, b.contents_ptr + b.byte_len) for b in bufs)
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert end <= start
    for i, b in enumerate(bufs):
        b.numpy()[:] = i
    for i, b in enumerate(bufs):
        assert (b.numpy() == i % 256).all()


def test_alloc_batch(device, pool):
    rs = device.residency_set
    if rs is not None:
        rs.flush_pending()
        before = rs.commit_count
    bufs = pool.alloc_batch([(4096, "f32", (1024,)), (100, "u8", [10, 10]), (MIB, np.float16, (MIB // 2,))])
    assert [b.shape for b in bufs] == [(1024,), (10, 10), (MIB // 2,)]
    assert len({b.contents_ptr for b in bufs}) == 3
    assert pool.in_use_count == 3
    if rs is not None:
        with device.command_encoder():
            pass
        assert rs.commit_count - before == 1
    assert pool.alloc_batch([]) == []


def test_alloc_batch_is_all_or_nothing(device, pool):
    before = counts(pool)
    with pytest.raises(mlxbuf.InvalidArgument) as exc:
        pool.alloc_batch([(4096, "u8", (1,)), (16, "f32", (5,))])
    assert_names(exc, "(5,)", 16)
    with pytest.raises(mlxbuf.InvalidArgument) as exc:
        pool.alloc_batch([(4096, "u8", (1,)), (4096, "u8")])
    assert_names(exc, "request 1")
    with pytest.raises(mlxbuf.BufferAllocationError):
        pool.alloc_batch([(4096, "u8", (1,)), (device.max_buffer_length + 1, "u8", (1,))])
    assert counts(pool) == before
    device._debug_fail_alloc(min_bytes=MIB)
    with pytest.raises(mlxbuf.BufferAllocationError) as exc:
        pool.alloc_batch([(4096, "u8", (1,)), (MIB, "u8", (1,))])
    device._debug_fail_alloc(0, 0)
    assert exc.value.bytes == 4096 + MIB
    s = pool.stats()
    # Nothing stays handed out; the 4 KiB storage made before the failure
    # is cached, not leaked.
    assert (s.in_use_count, s.in_use_bytes, s.requested_bytes) == (0, 0, 0)
    assert s.free_bytes == 4096
    assert device.active_memory == s.free_allocated_bytes == allocated_size_of(device, 4096)


def test_register_existing(device, pool):
    rs = device.residency_set
    buf = device.alloc_buffer(4096, "u8", (4096,))
    n = rs.allocation_count if rs is not None else 0
    pool.register_existing(buf)  # already registered: nothing changes
    pool.register_existing(buf)
    assert (rs.allocation_count if rs is not None else 0) == n
    assert pool.in_use_count == 0 and pool.free_count == 0


def test_register_existing_adds_an_external_storage_once(device, pool):
    rs = device.residency_set
    if rs is None:
        pytest.skip("residency off")
    memory = page_aligned_array(4096, np.uint8, 16384)  # Metal wraps only page-aligned memory
    res = ffi.new("cm_alloc_result_t *")
    rc = lib.cm_storage_wrap_external(
        device._handle, ffi.cast("void *", memory.ctypes.data), 4096, 1, ffi.NULL, ffi.NULL, res
    )
    assert rc == 0
    ext = mlxbuf.Buffer._from_storage(device, res.storage, res.contents, res.byte_len, "u8", (4096,))
    assert ext.storage_kind == "external"
    assert not rs.contains(ext)
    pool.register_existing(ext)
    assert rs.contains(ext)
    count = rs.allocation_count
    pool.register_existing(ext)
    assert rs.allocation_count == count
    assert pool.in_use_count == 0
    ext.numpy()[:3] = [1, 2, 3]
    assert memory[:3].tolist() == [1, 2, 3]
    del ext
    gc.collect()
    assert rs.allocation_count == count - 1


def test_register_existing_refuses_another_devices_buffer(pool, other_device):
    foreign = other_device.alloc_buffer(4096, "u8", (1,))
    with pytest.raises(mlxbuf.InvalidArgument) as exc:
        pool.register_existing(foreign)
    assert_names(exc, "another device")
    with pytest.raises(mlxbuf.InvalidArgument):
        pool.register_existing(np.zeros(3))


def test_cache_limit_evicts_oldest_first(device):
    page = allocated_size_of(device, 4096)  # what a 4096-byte storage occupies
    pool = mlxbuf.BufferPool(device, cache_limit=3 * page)
    assert pool.cache_limit == 3 * page
    bufs = [pool.alloc(4096, "u8", (1,)) for _ in range(5)]
    addresses = [b.contents_ptr for b in bufs]
    for i in range(5):
        bufs[i] = None  # returned in order: 0 is the oldest in the cache
    s = pool.stats()
    assert s.free_count == 3 and s.free_bytes == 3 * 4096 and s.evictions == 2
    assert s.free_allocated_bytes == 3 * page
    again = {pool.alloc(4096, "u8", (1,)).contents_ptr for _ in range(1)}
    assert again <= set(addresses[2:])
    pool.close()


def test_lowering_the_cache_limit_evicts_now(device, pool):
    page = allocated_size_of(device, 4096)
    bufs = [pool.alloc(4096, "u8", (1,)) for _ in range(6)]
    del bufs
    assert pool.free_count == 6
    old = pool.set_cache_limit(2 * page)
    assert old > 6 * page
    assert pool.free_count == 2 and pool.stats().evictions == 4
    pool.cache_limit = 0
    assert pool.free_count == 0
    assert device.active_memory == 0


def test_default_cache_limit_keeps_dozens_of_small_storages(pool):
    bufs = [pool.alloc(4096, "u8", (1,)) for _ in range(64)]
    del bufs
    assert pool.free_count == 64


def test_memory_limit_trims_the_cache_then_raises(device, pool):
    bufs = [pool.alloc(64 * KIB, "u8", (1,)) for _ in range(4)]
    del bufs
    assert pool.free_bytes == 4 * 64 * KIB
    device.set_memory_limit(4 * 64 * KIB + 4096)
    try:
        big = pool.alloc(128 * KIB, "u8", (1,))  # needs the cache given back
        assert pool.free_bytes <= 2 * 64 * KIB
        with pytest.raises(mlxbuf.BufferAllocationError) as exc:
            pool.alloc(MIB, "u8", (1,))
        assert exc.value.bytes == MIB
        assert_names(exc, "limit")
        del big
    finally:
        device.set_memory_limit(None)


def test_gc_retry_frees_cycles(device, pool):
    gc.collect()
    gc.disable()
    try:
        cycle = [device.alloc_buffer(8 * 4096, "u8", (1,))]
        cycle.append(cycle)
        del cycle
        device.set_memory_limit(10 * 4096)
        buf = pool.alloc(8 * 4096, "u8", (1,))
        del buf
    finally:
        gc.enable()
        device.set_memory_limit(None)


BAD_REQUESTS = [
    ("zero", (0, "u8", (0,)), mlxbuf.InvalidArgument, ["0"]),
    ("negative", (-4096, "u8", (1,)), mlxbuf.InvalidArgument, ["-4096"]),
    ("float", (4096.5, "u8", (1,)), mlxbuf.InvalidArgument, ["4096.5"]),
    ("bool", (False, "u8", (1,)), mlxbuf.InvalidArgument, ["False"]),
    ("2**64", (1 << 64, "u8", (1,)), mlxbuf.InvalidArgument, [str(1 << 64)]),
    ("dtype", (4096, "x7", (1,)), mlxbuf.UnsupportedDtype, ["'x7'"]),
    ("shape", (16, "f64", (3,)), mlxbuf.InvalidArgument, ["(3,)", "24", "16"]),
    ("dims", (16, "u8", ("a",)), mlxbuf.InvalidArgument, ["'a'"]),
]


@pytest.mark.parametrize("args, cls, fragments", [b[1:] for b in BAD_REQUESTS], ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_leave_counts_unchanged(device, pool, args, cls, fragments):
    keep = pool.alloc(4096, "u8", (1,))
    before = counts(pool)
    with pytest.raises(cls) as exc:
        pool.alloc(*args)
    assert_names(exc, *fragments)
    assert counts(pool) == before
    del keep


def test_request_above_max_buffer_length(device, pool):
    before = counts(pool)
    with pytest.raises(mlxbuf.BufferAllocationError) as exc:
        pool.alloc(device.max_buffer_length + 1, "u8", (1,))
    assert exc.value.bytes == device.max_buffer_length + 1
    assert_names(exc, device.max_buffer_length + 1, device.max_buffer_length)
    assert counts(pool) == before


def test_close_is_idempotent_and_buffers_outlive_it(device):
    pool = mlxbuf.BufferPool(device)
    live = pool.alloc(4096, "u8", (4096,))
    dead = pool.alloc(4096, "u8", (4096,))
    del dead
    assert pool.free_count == 1
    pool.close()
    pool.close()
    assert pool.closed
    assert device.active_memory == live.allocated_size
    live.numpy()[:] = 1
    with pytest.raises(mlxbuf.InvalidArgument) as exc:
        pool.alloc(4096, "u8", (1,))
    assert_names(exc, "closed")
    assert "closed" in repr(pool)
    del live
    assert device.active_memory == 0


def test_context_manager_closes(device):
    with mlxbuf.BufferPool(device) as pool:
        pool.alloc(4096, "u8", (1,))
    assert pool.closed


def test_constructor_arguments(device):
    with pytest.raises(mlxbuf.InvalidArgument):
        mlxbuf.BufferPool("host")
    with pytest.raises(mlxbuf.InvalidArgument) as exc:
        mlxbuf.BufferPool(device, cache_limit=-1)
    assert_names(exc, "-1")


def test_threads_churn_the_pool(device, pool):
    errors = []

    def churn(seed):
        try:
            for i in range(500):
                n = (4096, 5000, 65536)[(i + seed) % 3]
                b = pool.alloc(n, "u8", (n,))
                b.numpy()[:8] = seed
                keep = b.clone() if i % 7 == 0 else None
                del b, keep
        except Exception as e:  # pragma: no cover
            errors.append(e)

    run_threads(churn, [(s,) for s in range(4)])
    gc.collect()
    assert not errors
    assert pool.in_use_count == 0
    pool.clear()
    assert device.active_memory == 0


def test_close_while_another_thread_allocates(device):
    """close() must not free the C pool under an alloc() already past its
    closed check on another thread (it once did, through ffi.release)."""
    for _ in range(50):
        pool = mlxbuf.BufferPool(device)
        started = threading.Event()
        kept = []

        def churn(pool, started, kept):
            started.set()
            for _ in range(200):
                try:
                    kept.append(pool.alloc(4096, "u8", (4096,)))
                except mlxbuf.InvalidArgument:
                    return  # closed: the documented error

        t = threading.Thread(target=churn, args=(pool, started, kept))
        t.start()
        started.wait()
        pool.close()
        t.join(timeout=30)
        assert not t.is_alive()
        assert pool.closed
        for buf in kept[-3:]:
            buf.numpy()[:] = 7  # buffers made before close stay valid
        kept.clear()
        gc.collect()
    assert device.stats().cached_bytes == 0


def test_allocator_makes_the_same_buffers_as_alloc(device, pool):
    make = pool.allocator(4000, "f32", (1000,))
    a = make()
    assert (a.dtype, a.shape, a.byte_len) == (mlxbuf.DType.F32, (1000,), pool.size_class(4000))
    assert not a.numpy().any()  # fresh storages are zero-filled
    a.numpy()[:] = 5
    address = a.contents_ptr
    del a
    b = make()  # the cached storage comes back, not re-zeroed
    assert b.contents_ptr == address
    assert b.numpy()[0] == 5
    zeroing = pool.allocator(4000, "f32", (1000,), zero=True)
    del b
    c = zeroing()
    assert c.contents_ptr == address and not c.numpy().any()
    assert pool.stats().hits == 2


def test_allocator_validates_once_and_stops_at_close(device):
    pool = mlxbuf.BufferPool(device)
    with pytest.raises(mlxbuf.InvalidArgument, match="4096"):
        pool.allocator(16, "f32", (1024,))  # 4096 bytes do not fit in 16
    with pytest.raises(mlxbuf.UnsupportedDtype, match="f128"):
        pool.allocator(16, "f128", (1,))
    make = pool.allocator(64, "u8", (64,))
    keep = make()
    pool.close()
    with pytest.raises(mlxbuf.InvalidArgument, match="closed"):
        make()
    keep.numpy()[:] = 1  # made before close: still valid
