"""The validated-request cache behind Device.alloc_buffer, BufferPool.alloc and
alloc_batch: a repeated request skips validation, but never accepts what a
fresh request would refuse."""

import threading

import numpy as np
import pytest

import mlxbuf
from mlxbuf.buffer import PLAN_CACHE_LIMIT
from support import run_threads

SHAPE = (1024,)


@pytest.fixture(params=["alloc_buffer", "pool.alloc", "alloc_batch"])
def alloc(request, device, pool):
    """One allocation entry point, called like Device.alloc_buffer."""
    if request.param == "alloc_buffer":
        return device.alloc_buffer
    if request.param == "pool.alloc":
        return pool.alloc
    return lambda n, dtype, shape: pool.alloc_batch([(n, dtype, shape)])[0]


# Each is equal to, and hashes like, a valid request made first.
LOOKALIKES = [
    ("float byte_len", (4096.0, "f32", SHAPE), ["4096.0"]),
    ("bool dim", (4, "u8", (True,)), ["True"]),
    ("float dim", (4096, "f32", (1024.0,)), ["1024.0"]),
    ("numpy float dim", (4096, "f32", (np.float64(1024),)), ["1024"]),
    ("numpy float byte_len", (np.float32(4096), "f32", SHAPE), ["4096"]),
]


@pytest.mark.parametrize("bad, fragments", [c[1:] for c in LOOKALIKES], ids=[c[0] for c in LOOKALIKES])
def test_a_cached_request_never_lets_an_equal_lookalike_through(alloc, bad, fragments):
    good = (int(bad[0]), bad[1], tuple(int(d) for d in bad[2]))
    for _ in range(3):  # cached, then recalled as the last request, then from the dict
        assert alloc(*good).shape == good[2]
    for _ in range(2):
        with pytest.raises(mlxbuf.InvalidArgument) as exc:
            alloc(*bad)
        for fragment in fragments:
            assert fragment in str(exc.value)
    assert alloc(*good).shape == good[2]


def test_equal_requests_in_new_objects_reuse_the_plan_with_the_same_result(alloc):
    first = alloc(4096, "f32", SHAPE)
    for dims in ((1024,), tuple([1024]), [1024], (np.int64(1024),), 1024):
        again = alloc(4096, "f32", dims)
        assert (again.shape, again.dtype, again.byte_len) == (first.shape, first.dtype, first.byte_len)
    assert alloc(np.int64(4096), np.float32, SHAPE).shape == SHAPE


def test_a_list_shape_changed_between_calls_is_read_again(alloc):
    shape = [2, 8]
    assert alloc(64, "f32", shape).shape == (2, 8)
    shape[0] = 1
    assert alloc(64, "f32", shape).shape == (1, 8)
    shape[1] = 20
    with pytest.raises(mlxbuf.InvalidArgument, match="80"):
        alloc(64, "f32", shape)


def test_the_cache_is_bounded(device, pool):
    for i in range(PLAN_CACHE_LIMIT + 50):
        device.alloc_buffer(16, "u8", (i % 17,))
        pool.alloc(16 + i, "u8", (i % 17,))
    assert len(device._plans) <= PLAN_CACHE_LIMIT and len(pool._plans) <= PLAN_CACHE_LIMIT
    assert pool.alloc(16, "u8", (0,)).shape == (0,)  # evicted plans are made again


def test_a_closed_pool_refuses_even_its_last_request(device):
    pool = mlxbuf.BufferPool(device)
    pool.alloc(4096, "f32", SHAPE)
    pool.alloc(4096, "f32", SHAPE)
    pool.close()
    for _ in range(2):
        with pytest.raises(mlxbuf.InvalidArgument, match="closed"):
            pool.alloc(4096, "f32", SHAPE)
    with pytest.raises(mlxbuf.InvalidArgument, match="closed"):
        pool.alloc_batch([(4096, "f32", SHAPE)])


def test_threads_sharing_a_pool_get_the_buffers_they_asked_for(device, pool):
    shapes = [((n * 4,), n * 16) for n in range(1, 9)]
    errors = []
    barrier = threading.Barrier(4)

    def worker(seed):
        barrier.wait()
        try:
            for i in range(400):
                shape, n = shapes[(i * (seed + 1)) % len(shapes)]
                buf = pool.alloc(n, "f32", shape) if i % 2 else device.alloc_buffer(n, "f32", shape)
                if buf.shape != shape or buf.nbytes != n:
                    errors.append((shape, n, buf))
                buf.numpy()[:] = seed
                assert (buf.numpy() == seed).all()
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    run_threads(worker, [(s,) for s in range(4)])
    assert not errors


def test_batch_validates_each_distinct_request_and_keeps_order(pool):
    a = (4096, "f32", SHAPE)
    b = (100, "u8", [10, 10])
    c = (4096.0, "f32", SHAPE)  # equal to a, and refused
    bufs = pool.alloc_batch([a, b, a, b, a])
    assert [x.shape for x in bufs] == [SHAPE, (10, 10), SHAPE, (10, 10), SHAPE]
    assert len({x.contents_ptr for x in bufs}) == 5
    before = pool.stats()
    with pytest.raises(mlxbuf.InvalidArgument, match="batch request 2 of 3.*4096.0"):
        pool.alloc_batch([a, a, c])
    after = pool.stats()
    assert (after.in_use_count, after.misses, after.hits) == (before.in_use_count, before.misses, before.hits)


class Dim:
    """A dimension whose value can change after it was validated."""

    def __init__(self, n):
        self.n = n

    def __index__(self):
        return self.n


def test_a_shape_of_objects_is_read_again_each_time(alloc):
    dim = Dim(4)
    shape = (dim, 2)
    assert alloc(64, "f32", shape).shape == (4, 2)
    assert alloc(64, "f32", shape).shape == (4, 2)
    dim.n = 2
    assert alloc(64, "f32", shape).shape == (2, 2)
    dim.n = 100
    with pytest.raises(mlxbuf.InvalidArgument, match="800"):
        alloc(64, "f32", shape)


def test_a_reused_shape_object_becomes_the_remembered_request(pool):
    pool.alloc(4096, "f32", (1024,))
    loop_shape = tuple([1024])  # equal, not the object the plan was made from
    pool.alloc(4096, "f32", loop_shape)
    assert pool._last[2] is loop_shape
    listed = [1024]
    pool.alloc(4096, "f32", listed)
    assert pool._last[2] is loop_shape  # a list is never remembered
