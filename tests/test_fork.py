"""os.fork() while mlxbuf threads run: the child starts with every lock free.

Each test runs a script in a fresh interpreter (``-X dev``) that forks
many times while the residency thread (keep-alive requests, and commits
of freed memory every millisecond), the queue worker and Python
threads churning allocations, commits and drops on the parent's device
(through a pool and directly) are all active. Each child, under a
watchdog that turns a hang into a traceback and a failed exit: opens a
new device and allocates, submits and waits on it; reads and writes the
buffers it inherited; finds every use of the inherited device's queue
refused with DeviceNotFound naming the parent process; drops everything
it inherited, pooled buffers and the pool included; and exits with status
0 and nothing on stderr. After each fork the parent checks its device
still runs work and sees none of the child's writes. A deadlock in the
parent fails through the subprocess timeout. A second script holds the
queue's worker so that a command buffer is surely in flight at the fork:
in the child it never finishes, and waiting for it raises.
"""

import pytest

from support import run_clean

ROUNDS = 20

SCRIPT = r"""
import faulthandler, gc, os, sys, threading, time, warnings
import numpy as np
import mlxbuf
# Imported here, not lazily in a child: compiling a module allocates
# heavily, and under the sanitizer pass (gcc 12's ASan runtime) a child
# forked from a thread hung in that compile in about 1 run of 3, also
# before the simulated Metal existed. The child keeps to what it tests.
import mlxbuf.interop

CHILD_SECONDS = 60
# Python 3.12+ warns that forking a process with threads may deadlock the
# child; that is what this script shows does not happen.
warnings.filterwarnings("ignore", message=r".*fork\(\) may lead to deadlocks", category=DeprecationWarning)

parent_pid = os.getpid()
dev = mlxbuf.Device(BACKEND)              # keep-alive on, from the environment
assert dev.residency_set.keepalive == (60, 0.001)
pool = mlxbuf.BufferPool(dev)
plain = dev.alloc_buffer(1 << 16, "u8", (1 << 16,))
pooled = [pool.alloc(4096, "u32", (1024,)) for _ in range(3)]
cached = pool.alloc(8192, "u8", (8192,))
del cached                                # the pool caches it
with dev.command_encoder() as enc:
    enc.fill(plain, 7)
    for i in range(3):
        enc.fill(pooled[i], 9)
big = dev.alloc_buffer(4 << 20, "u8", (4 << 20,))
running = dev.command_encoder()
running.fill(big, 3)
running.commit()                          # may still run at the first fork
pending = dev.command_encoder()
pending.copy(plain, pooled[0], 4096)      # never committed: holds both

stop = threading.Event()
errors = []


def churn(i):
    n = 0
    try:
        while not stop.is_set():
            a = pool.alloc(4096 * (i + 1), "u8", (4096 * (i + 1),))
            b = dev.alloc_buffer(8192, "u8", (8192,))
            enc = dev.command_encoder()
            enc.copy(a, b, 4096)
            enc.commit()
            if n % 2:
                enc.wait()
            b.numpy()[-1] = 1
            del a, b, enc
            n += 1
    except BaseException as exc:
        errors.append(exc)


def refused(call, *args):
    try:
        call(*args)
    except mlxbuf.DeviceNotFound as exc:
        text = str(exc)
        assert f"was opened in process {parent_pid}," in text, text
        assert "open a new device in this process" in text, text
        return
    raise AssertionError(f"{call.__qualname__} did not raise DeviceNotFound")


def child():
    global plain, pooled, pending, running, big, pool, dev
    faulthandler.dump_traceback_later(CHILD_SECONDS, exit=True)
    # A new device (and the child's own default device) works as anywhere.
    mine = mlxbuf.Device(BACKEND)
    a = mine.alloc_buffer(1 << 16, "u8", (1 << 16,))
    a.numpy()[:] = plain.numpy()
    b = mlxbuf.BufferPool(mine).alloc(1 << 16, "u8", (1 << 16,))
    with mine.command_encoder() as enc:
        enc.copy(a, b)
    assert (b.numpy() == 7).all()
    mine.residency_set.commit()
    mine.synchronize()
    assert mlxbuf.default_device() is not dev
    c = mlxbuf.default_device().alloc_buffer(4096, "u8", (4096,))
    with mlxbuf.default_device().command_encoder() as enc:
        enc.fill(c, 2)
    assert (c.numpy() == 2).all()

    # The inherited buffers' memory is the child's to read and write.
    view = plain.numpy()
    assert (view == 7).all()
    view[:] = 0x5A
    assert (plain.numpy() == 0x5A).all()
    for i, p in enumerate(pooled):
        assert (p.numpy() == 0x09090909).all()
        p.numpy()[0] = i
    assert pooled[2].numpy()[0] == 2

    # The inherited device's queue stayed in the parent.
    refused(dev.command_encoder)
    refused(pending.fill, plain, 1)
    refused(pending.commit)
    refused(pending.discard)
    refused(running.wait)
    refused(dev.synchronize)
    refused(dev.residency_set.commit)
    refused(dev.residency_set.flush_pending)
    refused(dev.set_residency_keepalive, 30, 0.5)
    refused(dev.alloc_buffer, 4096, "u8", (4096,))
    refused(pool.alloc, 4096, "u8", (4096,))
    refused(mlxbuf.BufferPool, dev)
    refused(dev.from_numpy, np.zeros(4096, np.uint8))
    refused(dev.compile_library, "kernel void k() {}")
    assert pending.status == "not_committed" and pending.hold_count == 2
    dev.stats()
    dev.residency_set.info()

    # Dropping what it inherited neither hangs nor caches: the plain
    # storage and the three pooled ones are freed (the encoder held two of
    # them), then the pool's cache goes with the pool. Nothing of it waits
    # for a residency commit (none comes here: the set is the parent's),
    # and what already waited at the fork stays as it was.
    before, waiting = dev.stats(), dev.residency_set.pending_release_count
    del view, p, pending, plain, pooled
    gc.collect()
    after = dev.stats()
    assert after.live_storages == before.live_storages - 4, (before, after)
    assert after.cached_storages == before.cached_storages, (before, after)
    assert after.deferred_release_bytes == before.deferred_release_bytes, (before, after)
    assert dev.residency_set.pending_release_count == waiting
    pool.close()
    del pool, running, big, dev, a, b
    gc.collect()


def forks():
    for _ in range(ROUNDS):
        time.sleep(0.002)
        pid = os.fork()
        if pid == 0:
            try:
                child()
            except BaseException:
                import traceback

                traceback.print_exc()
                os._exit(1)
            if FROM_THREAD:
                # This thread is the child's only one, and not one that
                # can end the interpreter.
                os._exit(0)
            sys.exit(0)                   # a normal exit: finalizers run
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, f"child exit status {status}"
        # The parent is unaffected and sees none of the child's writes.
        check = dev.alloc_buffer(4096, "u8", (4096,))
        with dev.command_encoder() as enc:
            enc.copy(plain, check, 4096)
        assert (check.numpy() == 7).all()
        assert pending.hold_count == 2
        assert not errors, errors


threads = [threading.Thread(target=churn, args=(i,), daemon=True) for i in range(3)]
for t in threads:
    t.start()
if FROM_THREAD:
    # os.fork() from a thread that is not the main one; the main thread
    # waits in join() meanwhile.
    failed = []

    def forks_recorded():
        try:
            forks()
        except BaseException as exc:
            failed.append(exc)

    forker = threading.Thread(target=forks_recorded, daemon=True)
    forker.start()
    forker.join(240)
    assert not forker.is_alive(), "the forking thread is stuck"
    if failed:
        raise failed[0]
else:
    forks()

stop.set()
for t in threads:
    t.join(60)
    assert not t.is_alive(), "a churning thread is stuck"
assert not errors, errors
assert dev.residency_set.keepalive_requests > 0
running.wait()
pending.discard()
dev.synchronize()
dev.residency_set.flush_pending()
# The residency thread's idle commit may be giving memory back still.
deadline = time.monotonic() + 60
while dev.residency_set.pending_release_count or dev.stats().deferred_release_bytes:
    assert time.monotonic() < deadline, "freed memory did not come back"
    time.sleep(0.002)
print("ok")
"""


@pytest.mark.parametrize("where", ["main", "thread"], ids=["fork_from_main", "fork_from_thread"])
def test_fork_while_threads_use_the_device(backend, where):
    """Python forks from whichever thread calls os.fork(), holding the GIL
    while the other threads may be inside mlxbuf's C calls without it."""
    run_clean(
        f"BACKEND = {backend!r}\nROUNDS = {ROUNDS}\nFROM_THREAD = {where == 'thread'}\n" + SCRIPT,
        timeout=300,
        MLXBUF_RESIDENCY_KEEPALIVE="60,0.001",
        MLXBUF_RESIDENCY_RELEASE_SECONDS="0.001",
    )


IN_FLIGHT = r"""
import ctypes, faulthandler, mmap, os, threading
import mlxbuf


class Gate:
    # The owner of an external buffer: its release, run by the queue's
    # worker when the first command buffer completes, holds the worker
    # until the parent opens the gate, so the second one is in flight at
    # the fork.
    entered = threading.Event()
    opened = threading.Event()

    def __del__(self):
        Gate.entered.set()
        Gate.opened.wait()


dev = mlxbuf.Device(BACKEND)
mapping = mmap.mmap(-1, 4096)            # page-aligned: Metal wraps only that
block = (ctypes.c_uint8 * 4096).from_buffer(mapping)
ext = mlxbuf.Buffer.from_raw(dev, ctypes.addressof(block), 4096, owner=Gate())
first = dev.command_encoder()
first.fill(ext, 1)
del ext                                   # first's hold is the last reference
first.commit()
assert Gate.entered.wait(60)
big = dev.alloc_buffer(1 << 20, "u8", (1 << 20,))
second = dev.command_encoder()
second.fill(big, 3)
second.commit()
pid = os.fork()
if pid == 0:
    faulthandler.dump_traceback_later(60, exit=True)
    for call in (big.numpy, second.wait):
        try:
            call()
        except mlxbuf.DeviceNotFound as exc:
            assert "open a new device in this process" in str(exc), exc
        else:
            raise AssertionError(f"{call.__qualname__} did not raise DeviceNotFound")
    # The host queue's worker, held by the gate, never ran the fill; a GPU
    # (the simulated Metal) runs command buffers apart from the thread
    # that completes them, so there it may have run before the fork.
    assert BACKEND != "host" or (big.numpy(wait=False) == 0).all()
    assert second.status == "committed"
    del big, second
    os._exit(0)
try:
    _, status = os.waitpid(pid, 0)
finally:
    Gate.opened.set()                     # even when the child failed
assert os.waitstatus_to_exitcode(status) == 0, f"child exit status {status}"
second.wait()
assert (big.numpy() == 3).all()
first.wait()
print("ok")
"""


def test_work_in_flight_at_the_fork_never_finishes_in_the_child(backend):
    run_clean(f"BACKEND = {backend!r}\n" + IN_FLIGHT, timeout=120)
