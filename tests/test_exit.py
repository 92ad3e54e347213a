"""Exit safety: interpreters that end with mlxbuf objects still alive exit with status 0 and print nothing.

Each test runs a script in a fresh interpreter (``-X dev``: the debug
memory allocator and every warning on) and requires status 0, the
script's "ok" and an empty stderr. Covered elsewhere and not repeated
here: a non-empty pool, live numpy views, an uncommitted encoder and a
command buffer in flight (test_device.py); unconsumed DLPack capsules
(test_dlpack.py); external storages (test_external.py). This file adds
live file mappings, the keep-alive thread, a thread still allocating and
committing at exit, forked children, exits from inside an encoder block,
and everything at once.
"""

import os
import subprocess
import sys

import pytest

from support import ROOT, run_clean as run


def test_live_file_mappings(tmp_path):
    path = tmp_path / "data.bin"
    path.write_bytes(bytes(3 * 4096 + 5))
    run(
        f"""
import numpy as np, mlxbuf
dev = mlxbuf.Device("host")
ro = dev.map_file({str(path)!r})
rw = dev.map_file({str(path)!r}, 4096, writable=True, dtype="u8")
view = rw.numpy()
view[:4] = [1, 2, 3, 4]                 # shared with the file, never unmapped by hand
tail = dev.map_file({str(path)!r}, 4097).numpy()
del rw
dst = dev.alloc_buffer(ro.nbytes, "u8", (ro.nbytes,))
enc = dev.command_encoder()
enc.copy(ro, dst)                       # holds the read-only mapping, maybe in flight at exit
enc.commit()
del ro, dst
print("ok")
"""
    )
    # The writes reached the file although the child never unmapped.
    assert path.read_bytes()[4096:4100] == bytes([1, 2, 3, 4])


@pytest.mark.parametrize("how", ["api", "env"])
def test_keepalive_thread_running(how):
    setup = "dev.set_residency_keepalive(60, 0.001)" if how == "api" else ""
    run(
        f"""
import mlxbuf
dev = mlxbuf.Device("host")
{setup}
bufs = [dev.alloc_buffer(1 << 16, "u8", (1 << 16,)) for _ in range(4)]
for b in bufs:
    with dev.command_encoder() as enc:
        enc.fill(b, 1)
enc = dev.command_encoder()
enc.copy(bufs[0], bufs[1])
enc.commit()                             # keep-alive is active, and this is in flight
assert dev.residency_set.keepalive[0] == 60
late = dev.alloc_buffer(4096, "u8", (1,))   # a staged add nobody commits
print("ok")
""",
        **({"MLXBUF_RESIDENCY_KEEPALIVE": "60,0.001"} if how == "env" else {}),
    )


def test_threads_still_churning_at_exit():
    run(
        """
import threading, mlxbuf
dev = mlxbuf.Device("host")
pool = mlxbuf.BufferPool(dev)
started = threading.Barrier(4)

def churn(i):
    started.wait()
    while True:
        a = pool.alloc(4096 * (i + 1), "u8", (4096,))
        b = dev.alloc_buffer(8192, "u8", (8192,))
        enc = dev.command_encoder()
        enc.copy(a, b)
        enc.commit()
        view = b.numpy()
        del a, b, enc

for i in range(3):
    threading.Thread(target=churn, args=(i,), daemon=True).start()
started.wait()
print("ok")
"""
    )


def test_forked_child_exits_with_the_parents_objects():
    """The child inherits a device whose queue and keep-alive threads stayed
    in the parent; ending the child normally (finalizers run) must not wait
    for them. (tests/test_fork.py covers what a child may do.)"""
    run(
        """
import os, sys, mlxbuf
dev = mlxbuf.Device("host")
dev.set_residency_keepalive(60, 0.001)
pool = mlxbuf.BufferPool(dev)
bufs = [pool.alloc(4096, "u8", (4096,)) for _ in range(3)]
with dev.command_encoder() as enc:
    enc.fill(bufs[0], 7)
views = [b.numpy() for b in bufs]
pid = os.fork()
if pid == 0:
    mine = mlxbuf.Device("host").alloc_buffer(4096, "u8", (4096,))
    mine.numpy()[:] = views[0]
    assert mine.numpy()[0] == 7
    del bufs, pool
    sys.exit(0)
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0, status
# The parent is unaffected.
with dev.command_encoder() as enc:
    enc.copy(bufs[0], bufs[1])
assert (bufs[1].numpy() == 7).all()
print("ok")
"""
    )


def test_exit_raised_inside_an_encoder_block():
    proc = subprocess.run(
        [
            sys.executable,
            "-X",
            "dev",
            "-c",
            """
import sys, mlxbuf
dev = mlxbuf.Device("host")
a = dev.alloc_buffer(1 << 20, "u8", (1 << 20,))
with dev.command_encoder() as enc:
    enc.fill(a, 1)
    del a
    sys.exit(3)
""",
        ],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=ROOT),
        timeout=120,
    )
    assert proc.returncode == 3
    assert proc.stderr == ""


def test_everything_alive_at_once(tmp_path):
    path = tmp_path / "w.bin"
    path.write_bytes(bytes(range(256)) * 64)
    run(
        f"""
import ctypes, gc, numpy as np, mlxbuf
dev = mlxbuf.Device("host")
other = mlxbuf.Device("host")
dev.set_residency_keepalive(30, 0.005)
pool = mlxbuf.BufferPool(dev)
closed = mlxbuf.BufferPool(dev, cache_limit=1 << 16)
held = [closed.alloc(4096, "u8", (4096,)) for _ in range(2)]
closed.close()                                  # its in-use storages outlive it
cached = [pool.alloc(n, "u8", (1,)) for n in (100, 4096, 1 << 20)]
del cached                                      # a non-empty cache at exit
big = dev.alloc_buffer(64 << 20, "u8", (64 << 20,))
small = pool.alloc(4096, "f32", (1024,))
mapped = dev.map_file({str(path)!r})
array = np.arange(1 << 16, dtype=np.uint8)
external = dev.from_numpy(array)
block = (ctypes.c_uint8 * 4096)()
raw = mlxbuf.Buffer.from_raw(dev, ctypes.addressof(block), 4096, owner=block)
capsule = small.__dlpack__(max_version=(1, 0))
legacy = small.__dlpack__()
imported = mlxbuf.from_dlpack(small, device=other)
views = [small.numpy(), mapped.numpy(), external.numpy(), raw.slice_view(8, 8).numpy()]
inflight = dev.command_encoder()
inflight.fill(big, 3)                            # 64 MiB: still running at exit
inflight.copy(mapped, held[0], 4096)
inflight.copy(external, held[1], 4096)
inflight.commit()
pending = dev.command_encoder()
pending.copy(small, held[1], 4096)               # never committed
cycle = [small, pending, views]
cycle.append(cycle)
del big, held, small, mapped, external, raw, pending, cycle, array, block
print("ok")
"""
    )
