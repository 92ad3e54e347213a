"""Residency staging and flushing, command-buffer submission, and a decode token.

Run (never part of the plain test command):

    python -m pytest benchmarks/bench_residency.py --benchmark-only

Groups:

- ``residency-stage-flush``: N allocations of 4 KiB + N drops + one
  ``flush_pending()`` (one residency commit), for N in 1, 100, 1000
  (``MLXBUF_BENCH_STAGE_N`` overrides). The same loop on a device opened
  with residency off is the baseline: the difference is what staging
  2N changes and one commit cost.
- ``submit``: ``commit()`` of an empty command buffer onto an idle queue
  (the encoder made and the queue drained outside the timing), empty
  commits back to back, ``commit_and_wait()`` of an empty one and of one
  4 KiB copy (encoder creation included in all but the first);
  ``numpy.copyto`` of 4 KiB as the yardstick for the copy itself.
- ``decode-token``: one simulated decode token, as ``python -m mlxbuf``
  prints it: 440 scratch allocations of 4 KiB, all dropped, then one
  submission (a 4 KiB copy, commit_and_wait). Unpooled it costs one
  residency commit, pooled none at steady state (both checked and kept in
  extra_info); 440 ``numpy.empty`` calls are the host-only yardstick.
"""

import gc

import numpy as np
import pytest
from _benchutil import counts_from_env, size_label

import mlxbuf

STAGE_COUNTS = counts_from_env("MLXBUF_BENCH_STAGE_N", "1,100,1000", binary=False)
SCRATCH_BYTES = 4096
DECODE_SCRATCH_ALLOCS = 440
SUBMIT_ROUNDS = 2000

# Rounds of at least 200 us, so the timer's own cost stays out of the figures
# (a marker overrides --benchmark-min-time).
pytestmark = pytest.mark.benchmark(min_time=0.0002, warmup=True, warmup_iterations=200)


def _residency_set(device):
    rs = device.residency_set
    if rs is None:
        pytest.skip(f"residency sets are off on this device ({device.residency_disabled_reason or 'switched off'})")
    return rs


@pytest.fixture(scope="module", params=["on", "off"], ids=lambda p: f"residency-{p}")
def stage_device(request):
    """A device of the benchmarked backend with residency on (or off: the baseline)."""
    backend = mlxbuf.default_device().backend
    dev = mlxbuf.Device(backend, residency=request.param == "on")
    if request.param == "on":
        _residency_set(dev)
    yield dev
    gc.collect()
    dev.synchronize()


@pytest.fixture
def copy_pair(device):
    """(src, dst): two 4 KiB buffers on ``device``, src filled with a pattern."""
    src = device.alloc_buffer(SCRATCH_BYTES, "u8", (SCRATCH_BYTES,))
    dst = device.alloc_buffer(SCRATCH_BYTES, "u8", (SCRATCH_BYTES,))
    src.numpy()[:] = np.arange(SCRATCH_BYTES, dtype=np.uint8)
    return src, dst


# ---- staging + flushing ---------------------------------------------------------


@pytest.mark.parametrize("n", STAGE_COUNTS, ids=lambda n: f"N={n}")
def test_stage_and_flush(benchmark, stage_device, n):
    benchmark.group = "residency-stage-flush"
    rs = stage_device.residency_set
    alloc, shape = stage_device.alloc_buffer, (SCRATCH_BYTES,)
    flush = rs.flush_pending if rs is not None else (lambda: False)

    def run():
        scratch = [alloc(SCRATCH_BYTES, "u8", shape) for _ in range(n)]
        scratch.clear()
        return flush()

    if rs is not None:
        before = rs.commit_count
        assert run() is True
        assert rs.commit_count == before + 1
    benchmark(run)
    benchmark.extra_info.update(
        impl=f"{n} allocs + {n} drops + flush, residency {'on' if rs is not None else 'off'}", n=n, nbytes=SCRATCH_BYTES, residency=rs is not None,
        residency_commits_per_call=1 if rs is not None else 0, yardstick=rs is None,
    )


# ---- submission -----------------------------------------------------------------


def test_commit_empty(benchmark, device):
    # The queue is idle, as between two decode tokens: commit wakes the
    # worker thread (on Metal, hands the buffer to the driver).
    benchmark.group = "submit"
    benchmark.extra_info["impl"] = "commit(), empty, idle queue"

    def setup():
        device.synchronize()
        return (device.command_encoder(),), {}

    benchmark.pedantic(lambda enc: enc.commit(), setup=setup, rounds=SUBMIT_ROUNDS, warmup_rounds=50)
    device.synchronize()


def test_commit_empty_busy_queue(benchmark, device):
    # Back-to-back submissions: the worker is already awake.
    benchmark.group = "submit"
    benchmark.extra_info["impl"] = "command_encoder() + commit(), empty, back to back"
    make = device.command_encoder

    def run():
        make().commit()

    benchmark(run)
    device.synchronize()


def test_commit_and_wait_empty(benchmark, device):
    benchmark.group = "submit"
    benchmark.extra_info["impl"] = "command_encoder() + commit_and_wait(), empty"
    make = device.command_encoder

    def run():
        make().commit_and_wait()

    benchmark(run)


def test_commit_and_wait_copy(benchmark, device, copy_pair):
    benchmark.group = "submit"
    benchmark.extra_info.update(impl=f"command_encoder() + copy {size_label(SCRATCH_BYTES)} + commit_and_wait()")
    src, dst = copy_pair
    make = device.command_encoder

    def run():
        enc = make()
        enc.copy(src, dst)
        enc.commit_and_wait()

    benchmark(run)
    assert (dst.numpy() == src.numpy()).all()


def test_numpy_copyto(benchmark):
    benchmark.group = "submit"
    benchmark.extra_info.update(impl=f"numpy.copyto {size_label(SCRATCH_BYTES)}", yardstick=True)
    src = np.arange(SCRATCH_BYTES, dtype=np.uint8)
    dst = np.empty_like(src)
    benchmark(np.copyto, dst, src)


# ---- one decode token -------------------------------------------------------------


def _token(alloc, make, src, dst):
    shape = (SCRATCH_BYTES // 4,)
    scratch = [alloc(SCRATCH_BYTES, "f32", shape) for _ in range(DECODE_SCRATCH_ALLOCS)]
    scratch.clear()
    enc = make()
    enc.copy(src, dst)
    enc.commit_and_wait()


def _commits_per_token(device, token):
    rs = device.residency_set
    if rs is None:
        return None
    before = rs.commit_count
    token()
    return rs.commit_count - before


def test_decode_token_device_alloc(benchmark, device, copy_pair):
    benchmark.group = "decode-token"
    src, dst = copy_pair

    def token():
        _token(device.alloc_buffer, device.command_encoder, src, dst)

    commits = _commits_per_token(device, token)
    assert commits in (None, 1)
    benchmark(token)
    benchmark.extra_info.update(
        impl=f"{DECODE_SCRATCH_ALLOCS} x Device.alloc_buffer + 1 submission", residency_commits_per_token=commits
    )


def test_decode_token_pool(benchmark, device, pool, copy_pair):
    benchmark.group = "decode-token"
    src, dst = copy_pair

    def token():
        _token(pool.alloc, device.command_encoder, src, dst)

    token()  # fills the cache: every later token is all hits
    commits = _commits_per_token(device, token)
    assert commits in (None, 0)
    misses = pool.stats().misses
    benchmark(token)
    assert pool.stats().misses == misses
    benchmark.extra_info.update(
        impl=f"{DECODE_SCRATCH_ALLOCS} x BufferPool.alloc + 1 submission", residency_commits_per_token=commits
    )


def test_decode_token_numpy_empty(benchmark):
    benchmark.group = "decode-token"
    benchmark.extra_info.update(impl=f"{DECODE_SCRATCH_ALLOCS} x numpy.empty (no submission)", yardstick=True)
    shape, f32 = (SCRATCH_BYTES // 4,), np.float32

    def token():
        scratch = [np.empty(shape, f32) for _ in range(DECODE_SCRATCH_ALLOCS)]
        scratch.clear()

    benchmark(token)
