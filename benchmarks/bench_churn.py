"""Alloc/free churn: BufferPool hits and Device.alloc_buffer beside numpy, torch and mlx.

Run (never part of the plain test command), then print ns/op and ratios:

    python -m pytest benchmarks/bench_churn.py --benchmark-only --benchmark-json=churn.json
    python benchmarks/ratios.py --json churn.json

Groups (one per size, so a size reads at a glance):

- ``churn-4KiB``, ``churn-1MiB``: one allocation and its drop per op. The
  pool is warmed so every op is a cache hit (checked); ``Device.alloc_buffer``
  is unpooled and zero-filled, and stages a residency add and remove per op
  (never committed here, as in a decode loop between submissions). Peers:
  ``numpy.empty``, ``numpy.zeros``, ``torch.empty`` (CPU) and mlx
  (``mx.eval(mx.zeros(...))``, on its default device), each skipped with a
  reason when not importable. The callables are handed to ``benchmark``
  directly, so no Python wrapper adds to any of them except mlx's (two calls).
- ``pool-hit-live``: the 4 KiB pool hit with 100, 10k and 100k buffers of
  the same class alive in the pool (and in the residency set).
- ``pool-hit-breakdown``: 1000 ops per call, for where the hit's time goes:
  the two C calls alone through cffi, plus an ``ffi.gc`` destructor, the
  whole ``BufferPool.alloc``, and ``numpy.empty`` as the yardstick. The C
  rows reach into ``mlxbuf._cmetal`` and skip if its names change.

Sizes and counts: ``MLXBUF_BENCH_CHURN_SIZES`` and ``MLXBUF_BENCH_LIVE`` (see
conftest.py).
"""

import numpy as np
import pytest
from _benchutil import counts_from_env, size_label

SIZES = counts_from_env("MLXBUF_BENCH_CHURN_SIZES", "4K,1M")
LIVE_COUNTS = counts_from_env("MLXBUF_BENCH_LIVE", "100,10k,100k", binary=False)
SCALING_BYTES = 4096
BREAKDOWN_OPS = 1000

# Rounds of at least 200 us: at pytest-benchmark's default (5 us) most rounds
# here time one call, and the timer's own ~0.1-0.3 us would be counted in
# every op and squash the ratios. (A marker overrides --benchmark-min-time.)
pytestmark = pytest.mark.benchmark(min_time=0.0002, warmup=True, warmup_iterations=20000)

sizes = pytest.mark.parametrize("nbytes", SIZES, ids=size_label)


def _f32_shape(nbytes):
    return (nbytes // 4,)


def _churn(benchmark, nbytes, impl):
    benchmark.group = f"churn-{size_label(nbytes)}"
    benchmark.extra_info.update(impl=impl, nbytes=nbytes)


# ---- mlxbuf ---------------------------------------------------------------------


@sizes
def test_pool_hit(benchmark, pool, nbytes):
    _churn(benchmark, nbytes, "BufferPool.alloc")
    shape = _f32_shape(nbytes)
    pool.alloc(nbytes, "f32", shape)  # one storage of the class cached
    misses = pool.stats().misses
    benchmark(pool.alloc, nbytes, "f32", shape)
    assert pool.stats().misses == misses, "a timed BufferPool.alloc missed the cache"


@sizes
def test_device_alloc(benchmark, device, nbytes):
    _churn(benchmark, nbytes, "Device.alloc_buffer")
    shape = _f32_shape(nbytes)
    assert not device.alloc_buffer(nbytes, "f32", shape).numpy().any()
    benchmark(device.alloc_buffer, nbytes, "f32", shape)
    if device.residency_set is not None:
        device.residency_set.flush_pending()


# ---- peers ----------------------------------------------------------------------


@sizes
def test_numpy_empty(benchmark, nbytes):
    _churn(benchmark, nbytes, "numpy.empty")
    benchmark(np.empty, _f32_shape(nbytes), np.float32)


@sizes
def test_numpy_zeros(benchmark, nbytes):
    _churn(benchmark, nbytes, "numpy.zeros")
    benchmark(np.zeros, _f32_shape(nbytes), np.float32)


@sizes
def test_torch_empty(benchmark, nbytes):
    torch = pytest.importorskip("torch", reason="torch is not installed (pip install torch; CPU wheels suffice)")
    _churn(benchmark, nbytes, "torch.empty")
    benchmark(torch.empty, _f32_shape(nbytes), dtype=torch.float32)


@sizes
def test_mlx_zeros_eval(benchmark, nbytes):
    mx = pytest.importorskip(
        "mlx.core", reason="mlx is not importable (Apple Silicon: pip install mlx; Linux: pip install 'mlx[cpu]')"
    )
    _churn(benchmark, nbytes, "mlx.zeros+eval")
    shape = _f32_shape(nbytes)
    zeros, evaluate, f32 = mx.zeros, mx.eval, mx.float32

    def run():
        evaluate(zeros(shape, dtype=f32))

    benchmark(run)
    benchmark.extra_info["device"] = str(mx.default_device())


# ---- scaling with live buffers ---------------------------------------------------


@pytest.mark.parametrize("live", LIVE_COUNTS, ids=lambda n: f"{n}-live")
def test_pool_hit_with_live_buffers(benchmark, pool, live):
    benchmark.group = "pool-hit-live"
    benchmark.extra_info.update(impl="BufferPool.alloc", nbytes=SCALING_BYTES, live=live)
    shape = _f32_shape(SCALING_BYTES)
    held = [pool.alloc(SCALING_BYTES, "f32", shape) for _ in range(live)]
    pool.alloc(SCALING_BYTES, "f32", shape)
    stats = pool.stats()
    assert stats.in_use_count == live and stats.free_count == 1
    benchmark(pool.alloc, SCALING_BYTES, "f32", shape)
    assert pool.stats().misses == stats.misses, "a timed BufferPool.alloc missed the cache"
    del held


# ---- where the pool hit spends its time -------------------------------------------


def _breakdown(benchmark, impl):
    benchmark.group = "pool-hit-breakdown"
    benchmark.extra_info.update(impl=impl, nbytes=SCALING_BYTES, ops_per_call=BREAKDOWN_OPS)


@pytest.fixture
def c_pool(device):
    """``(lib, ffi, pool handle, result struct)`` of a C pool of its own, or a skip."""
    try:
        from mlxbuf._cmetal import ffi, lib

        out = ffi.new("cm_pool_t **")
        status = lib.cm_pool_create(device._handle, -1, out)
        res = ffi.new("cm_alloc_result_t *")
    except (AttributeError, ImportError, TypeError) as exc:
        pytest.skip(f"mlxbuf's C internals changed ({exc}); the breakdown needs cm_pool_create/cm_pool_alloc")
    assert status == 0
    handle = ffi.gc(out[0], lib.cm_pool_release)
    yield lib, ffi, handle, res
    ffi.release(handle)


def test_breakdown_c_calls(benchmark, c_pool):
    _breakdown(benchmark, "C: cm_pool_alloc + cm_storage_release")
    lib, _, handle, res = c_pool
    alloc, release, n, ops = lib.cm_pool_alloc, lib.cm_storage_release, SCALING_BYTES, range(BREAKDOWN_OPS)
    assert alloc(handle, n, 0, res) == 0
    release(res.storage)

    def run():
        for _ in ops:
            alloc(handle, n, 0, res)
            release(res.storage)

    benchmark(run)


def test_breakdown_c_calls_with_ffi_gc(benchmark, c_pool):
    _breakdown(benchmark, "C + ffi.gc(storage, release)")
    lib, ffi, handle, res = c_pool
    alloc, release, gc, n, ops = lib.cm_pool_alloc, lib.cm_storage_release, ffi.gc, SCALING_BYTES, range(BREAKDOWN_OPS)

    def run():
        for _ in ops:
            alloc(handle, n, 0, res)
            gc(res.storage, release, n)

    benchmark(run)


def test_breakdown_pool_alloc(benchmark, pool):
    _breakdown(benchmark, "BufferPool.alloc")
    alloc, n, shape, ops = pool.alloc, SCALING_BYTES, _f32_shape(SCALING_BYTES), range(BREAKDOWN_OPS)
    alloc(n, "f32", shape)

    def run():
        for _ in ops:
            alloc(n, "f32", shape)

    benchmark(run)


def test_breakdown_numpy_empty(benchmark):
    _breakdown(benchmark, "numpy.empty")
    empty, shape, f32, ops = np.empty, _f32_shape(SCALING_BYTES), np.float32, range(BREAKDOWN_OPS)

    def run():
        for _ in ops:
            empty(shape, f32)

    benchmark(run)


def test_breakdown_empty_loop(benchmark):
    _breakdown(benchmark, "empty loop (overhead of the rows above)")
    ops = range(BREAKDOWN_OPS)

    def run():
        for _ in ops:
            pass

    benchmark(run)

