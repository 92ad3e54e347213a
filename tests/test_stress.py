"""Thread stress: four workers churn one device while a fifth thread loops gc.collect().

The workers allocate (device and a shared pool, under a memory limit that
some allocations hit, so the trim-and-retry path runs concurrently), make
clones, slices and numpy views, write a pattern only they know into every
buffer and check it later (two live buffers sharing bytes would clobber
each other's pattern), encode copies and fills, commit without waiting,
drop buffers while their command buffers are in flight, flush and commit
residency (while a small release threshold and a 2 ms idle timer commit
removals from the freeing threads and the residency thread), clear the
pool, build reference cycles for the collector, and
hand buffers and numpy views to each other through a queue, so storages
die on threads other than the ones that made them: another worker, the
collector, or the host queue's worker thread.

The run must end with every counter back where it started: nothing
in use, nothing live, nothing resident, every submitted command buffer
completed. A thread still running after the join timeout is a deadlock
and fails the test.

It runs once per backend (the `backend` fixture): on the simulated Metal
the storages are MTLBuffers, the command buffers run on the simulator's GPU
thread and die on its completion thread.

MLXBUF_STRESS_SECONDS sets the churn time (default 3 s; e.g. 600 for a
long run).
"""

import collections
import faulthandler
import gc
import os
import queue
import random
import tempfile
import threading
import time

import numpy as np
import pytest

import mlxbuf
from support import release_deferred

SECONDS = float(os.environ.get("MLXBUF_STRESS_SECONDS", "3"))
WORKERS = 4
# Beyond the churn time, how long joining may take before we call it a
# deadlock: generous, as sanitizers and valgrind slow everything down.
JOIN_GRACE = 120.0
MEMORY_LIMIT = 4 << 20
SIZES = [16, 100, 4096, 5000, 16384, 65536, 200_000, 300_000]


def pattern(n, tag):
    """n bytes that only the owner of tag writes (a different tag gives a
    different sequence, not a shifted one)."""
    key = np.uint32(tag * 0x9E3779B1 & 0xFFFFFFFF)
    return ((np.arange(n, dtype=np.uint32) * np.uint32(2654435761) + key) >> np.uint32(16)).astype(np.uint8)


class Owned:
    """A buffer and the pattern its owner wrote into its whole view."""

    __slots__ = ("buf", "tag")

    def __init__(self, buf, tag):
        self.buf = buf
        self.tag = tag
        buf.as_slice("u8")[:] = pattern(buf.nbytes, tag)

    def check(self):
        got = self.buf.as_slice("u8")
        if not np.array_equal(got, pattern(self.buf.nbytes, self.tag)):
            raise AssertionError(f"buffer of tag {self.tag} was overwritten by someone else")


class Worker:
    def __init__(self, idx, dev, pool, handoff, stop):
        self.idx = idx
        self.dev = dev
        self.pool = pool
        self.handoff = handoff
        self.stop = stop
        self.rng = random.Random(idx)
        self.ops = collections.Counter()
        self.error = None
        self.tag = idx << 40
        self.kept = []
        self.inflight = []

    def next_tag(self):
        self.tag += 1
        return self.tag

    def alloc(self):
        n = self.rng.choice(SIZES)
        try:
            if self.rng.random() < 0.5:
                buf = self.pool.alloc(n, "u8", (n,))
                self.ops["pool alloc"] += 1
            else:
                buf = self.dev.alloc_buffer(n, "u8", (n,))
                self.ops["device alloc"] += 1
        except mlxbuf.BufferAllocationError as exc:
            assert exc.bytes == n
            self.ops["allocation refused by the memory limit"] += 1
            return None
        return Owned(buf, self.next_tag())

    def step(self):
        r = self.rng.random()
        if r < 0.25:
            owned = self.alloc()
            if owned is not None:
                owned.check()
                self.kept.append(owned)
        elif r < 0.35 and self.kept:
            # A view of the bytes outlives its Buffer and dies elsewhere.
            owned = self.kept.pop(self.rng.randrange(len(self.kept)))
            owned.check()
            kind = self.rng.choice(["buffer", "numpy", "slice", "clone"])
            item = {
                "buffer": lambda: owned,
                "numpy": lambda: (owned.buf.numpy(), owned.tag),
                "slice": lambda: Owned(owned.buf.slice_view(0, owned.buf.nbytes // 2), self.next_tag()),
                "clone": lambda: Owned(owned.buf.clone(), owned.tag),
            }[kind]()
            del owned
            try:
                self.handoff.put_nowait((self.idx, item))
                self.ops["handed to another thread"] += 1
            except queue.Full:
                pass
        elif r < 0.45:
            try:
                sender, item = self.handoff.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, tuple):
                arr, tag = item
                assert np.array_equal(arr, pattern(arr.nbytes, tag)), "a handed-over numpy view changed"
            else:
                item.check()
            del item
            if sender != self.idx:
                self.ops["dropped on another thread"] += 1
        elif r < 0.65 and len(self.kept) >= 2:
            self.encode()
        elif r < 0.70:
            rs = self.dev.residency_set
            rs.flush_pending() if self.rng.random() < 0.7 else rs.commit()
            self.ops["residency flush/commit"] += 1
        elif r < 0.73:
            self.pool.clear()
            self.ops["pool clear"] += 1
        elif r < 0.78:
            owned = self.alloc()
            if owned is not None:
                cycle = [owned.buf.numpy(), owned]
                cycle.append(cycle)
                self.ops["reference cycle left to the collector"] += 1
        elif r < 0.88 and self.kept:
            owned = self.kept.pop(self.rng.randrange(len(self.kept)))
            owned.check()
            self.ops["drop"] += 1
        elif self.inflight:
            enc, checks = self.inflight.pop(0)
            enc.wait()
            for owned in checks:
                owned.check()
            self.ops["wait"] += 1
        while len(self.kept) > 12:
            self.kept.pop(0).check()

    def encode(self):
        """Copy one kept buffer into a fresh one and fill another fresh one;
        commit without waiting; keep the results to check, or drop them
        while in flight."""
        src = self.kept[self.rng.randrange(len(self.kept))]
        dst = self.alloc()
        filled = self.alloc()
        if dst is None or filled is None:
            return
        enc = self.dev.command_encoder()
        n = min(src.buf.nbytes, dst.buf.nbytes)
        enc.copy(src.buf, dst.buf, n)
        value = self.rng.randrange(256)
        enc.fill(filled.buf, value)
        enc.commit()
        self.ops["commit"] += 1
        expect = pattern(dst.buf.nbytes, dst.tag)
        expect[:n] = pattern(src.buf.nbytes, src.tag)[:n]
        if self.rng.random() < 0.5:
            # Drop everything while the work is in flight: the command
            # buffer's holds keep the storages alive until it completes.
            del dst, filled
            if self.rng.random() < 0.5:
                self.inflight.append((enc, []))
            self.ops["dropped while in flight"] += 1
            return
        enc.wait()
        assert np.array_equal(dst.buf.as_slice("u8"), expect), "copy result differs"
        assert (filled.buf.as_slice("u8") == value).all(), "fill result differs"
        dst.buf.as_slice("u8")[:] = pattern(dst.buf.nbytes, dst.tag)
        filled.buf.as_slice("u8")[:] = pattern(filled.buf.nbytes, filled.tag)
        self.kept += [dst, filled]
        self.ops["checked copy and fill"] += 1

    def run(self):
        try:
            while not self.stop.is_set():
                self.step()
            for owned in self.kept:
                owned.check()
            for enc, _ in self.inflight:
                enc.wait()
        except BaseException as exc:  # reported by the main thread
            self.error = exc
        finally:
            self.kept = []
            self.inflight = []


def test_threads_churn_and_everything_comes_back(backend):
    dev = mlxbuf.Device(backend, residency=True)
    rs = dev.residency_set
    pool = mlxbuf.BufferPool(dev, cache_limit=2 << 20)
    dev.set_memory_limit(MEMORY_LIMIT)
    # Freed memory goes back from three places at once: the workers'
    # commits, the release threshold (inline in whichever thread frees past
    # it) and the residency thread's idle timer.
    rs.set_release_policy(256 << 10, 0.002)
    start = dev.stats()
    assert start.active_bytes == 0 and rs.allocation_count == 0

    stop = threading.Event()
    handoff = queue.Queue(maxsize=64)
    workers = [Worker(i, dev, pool, handoff, stop) for i in range(WORKERS)]
    collections_run = [0]
    gc_errors = []

    def collector():
        try:
            while not stop.is_set():
                t0 = time.perf_counter()
                gc.collect()
                collections_run[0] += 1
                # A full collection holds the GIL for milliseconds (pytest
                # and hypothesis own many objects): pause as long again so
                # the workers run too.
                time.sleep(max(0.001, time.perf_counter() - t0))
        except BaseException as exc:  # pragma: no cover - reported below
            gc_errors.append(exc)

    threads = [threading.Thread(target=w.run, name=f"worker-{w.idx}", daemon=True) for w in workers]
    threads.append(threading.Thread(target=collector, name="collector", daemon=True))
    # If a deadlock ever took the GIL with it, the join below could not
    # time out; faulthandler still dumps every stack and ends the run.
    faulthandler.dump_traceback_later(SECONDS + 2 * JOIN_GRACE, exit=True)
    began = time.monotonic()
    try:
        for t in threads:
            t.start()
        time.sleep(SECONDS)
        stop.set()
        deadline = time.monotonic() + JOIN_GRACE
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        stuck = [t.name for t in threads if t.is_alive()]
        if stuck:
            with tempfile.TemporaryFile("w+") as f:
                faulthandler.dump_traceback(f, all_threads=True)
                f.seek(0)
                stacks = f.read()
            pytest.fail(f"deadlock: {stuck} still running {JOIN_GRACE:.0f} s after the stop\n{stacks}")
    finally:
        faulthandler.cancel_dump_traceback_later()
    elapsed = time.monotonic() - began

    for w in workers:
        if w.error is not None:
            raise w.error
    assert not gc_errors, gc_errors

    while not handoff.empty():
        handoff.get_nowait()
    gc.collect()
    dev.synchronize()
    gc.collect()

    ops = sum((w.ops for w in workers), collections.Counter())
    total = sum(ops.values())
    summary = ", ".join(f"{k} {v}" for k, v in sorted(ops.items()))
    print(f"\nstress: {WORKERS} workers, {elapsed:.1f} s, {total} operations ({summary}), {collections_run[0]} gc.collect() runs")
    assert ops["commit"] > 0 and ops["dropped on another thread"] > 0 and ops["dropped while in flight"] > 0
    assert collections_run[0] > 0

    s = pool.stats()
    assert (s.in_use_count, s.in_use_bytes, s.requested_bytes) == (0, 0, 0)
    stats = dev.stats()
    assert stats.submitted == stats.completed == ops["commit"]
    assert stats.active_bytes == stats.cached_bytes == s.free_allocated_bytes
    assert stats.live_storages == stats.cached_storages == s.free_count
    pool.close()
    release_deferred(dev)  # the residency thread may be giving some back still
    stats = dev.stats()
    assert stats.active_bytes == start.active_bytes, "memory did not come back"
    assert stats.live_storages == 0 and stats.alloc_count == stats.free_count
    assert stats.deferred_release_bytes == 0 and rs.pending_release_count == 0
    assert rs.allocation_count == 0 and rs.allocated_size == 0 and not rs.pending
    assert stats.peak_bytes <= MEMORY_LIMIT
