"""python -m mlxbuf: device facts, zero-copy views, residency and pool figures, churn timings."""

from __future__ import annotations

import argparse
import os
import sys
import timeit
from collections.abc import Sequence

import numpy as np

import mlxbuf

DECODE_SCRATCH_ALLOCS = 440  # scratch buffers of one simulated decode token
SCRATCH_BYTES = 4096
BATCH = 64  # buffers per alloc_batch call in the churn timings

DESCRIPTION = (
    "Print this machine's mlxbuf device facts, show zero-copy views, count the "
    "residency commits of a simulated decode token and of pool churn, and time "
    "allocation churn against numpy."
)


def _fmt_bytes(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable: the TiB case returns")


def _facts(dev: mlxbuf.Device) -> None:
    print(f"mlxbuf {mlxbuf.__version__}")
    print(f"backend                 {dev.backend}")
    print(f"device                  {dev.name}")
    print(f"unified memory          {dev.has_unified_memory}")
    print(f"max buffer length       {_fmt_bytes(dev.max_buffer_length)}")
    print(f"recommended working set {_fmt_bytes(dev.recommended_max_working_set_size)}")
    print(f"page size               {dev.page_size} bytes")
    reason = "" if dev.residency_sets_enabled else f" ({dev.residency_disabled_reason or 'switched off'})"
    print(f"residency sets          {'on' if dev.residency_sets_enabled else 'off'}{reason}")


def _views(dev: mlxbuf.Device) -> None:
    print("\n-- zero-copy views")
    buf = dev.alloc_buffer(4096, "f32", (1024,))
    arr = buf.numpy()
    arr[:] = np.arange(1024, dtype=np.float32)
    print(f"{buf!r} at 0x{buf.contents_ptr:x}")
    sl = buf.slice_view(256, 16)
    view = sl.numpy()
    print(f"slice_view(256, 16)     data_ptr 0x{sl.data_ptr:x}, numpy view at 0x{view.ctypes.data:x}: "
          f"{'same address' if view.ctypes.data == sl.data_ptr else 'DIFFERENT ADDRESS'}")
    print(f"slice contents          {view[:4].tolist()} ... (elements 64..79 of the buffer)")
    view[0] = -1.0
    print(f"write through the slice arr[64] == {arr[64]} (aliases the same bytes)")
    del buf, sl
    print(f"numpy views outlive the Buffers: arr[64:67] = {arr[64:67].tolist()}")


def _decode_token(dev: mlxbuf.Device, enc_src: mlxbuf.Buffer, enc_dst: mlxbuf.Buffer) -> None:
    scratch = [dev.alloc_buffer(SCRATCH_BYTES, "f32", (SCRATCH_BYTES // 4,)) for _ in range(DECODE_SCRATCH_ALLOCS)]
    del scratch
    with dev.command_encoder() as enc:
        enc.copy(enc_src, enc_dst)


def _residency(dev: mlxbuf.Device) -> None:
    print("\n-- residency: one simulated decode token")
    rs = dev.residency_set
    if rs is None:
        print(f"residency sets are off ({dev.residency_disabled_reason or 'switched off'}): nothing to commit")
        return
    src = dev.alloc_buffer(256, "u8", (256,))
    dst = dev.alloc_buffer(256, "u8", (256,))
    rs.flush_pending()
    before = rs.commit_count
    _decode_token(dev, src, dst)
    cost = rs.commit_count - before
    print(f"{DECODE_SCRATCH_ALLOCS} scratch allocations + {DECODE_SCRATCH_ALLOCS} drops + 1 submission "
          f"-> {cost} residency commit(s) (expected 1; one commit per call would be {2 * DECODE_SCRATCH_ALLOCS})")


def _pool(dev: mlxbuf.Device) -> None:
    print("\n-- pool: steady-state churn")
    pool = mlxbuf.BufferPool(dev)
    src = dev.alloc_buffer(256, "u8", (256,))
    dst = dev.alloc_buffer(256, "u8", (256,))
    shape = (SCRATCH_BYTES // 4,)

    def token() -> None:
        scratch = [pool.alloc(SCRATCH_BYTES, "f32", shape) for _ in range(32)]
        with dev.command_encoder() as enc:
            enc.copy(src, dst)
        del scratch

    token()  # warm the cache
    rs = dev.residency_set
    before = rs.commit_count if rs is not None else 0
    tokens = 20
    for _ in range(tokens):
        token()
    after = rs.commit_count if rs is not None else 0
    s = pool.stats()
    print(f"{tokens} tokens x 32 pooled allocations: {after - before} residency commits (expected 0), "
          f"hits {s.hits}, misses {s.misses}, cached {s.free_count} ({_fmt_bytes(s.free_bytes)})")
    pool.close()


def _churn(dev: mlxbuf.Device, number: int) -> None:
    print(f"\n-- alloc/free churn, {SCRATCH_BYTES}-byte buffers (best of 5 x {number})")
    pool = mlxbuf.BufferPool(dev)
    shape = (SCRATCH_BYTES // 4,)
    requests = [(SCRATCH_BYTES, "f32", shape)] * BATCH
    pool.alloc_batch(requests)  # BATCH storages cached: every timed op is a hit
    names = {
        "np": np, "f32": np.float32, "shape": shape, "pool": pool, "dev": dev, "n": SCRATCH_BYTES,
        "make": pool.allocator(SCRATCH_BYTES, "f32", shape), "requests": requests,
    }
    # (name, statement, buffers per statement)
    cases = [
        ("numpy.empty", "np.empty(shape, f32)", 1),
        ("numpy.zeros", "np.zeros(shape, f32)", 1),
        ("BufferPool.alloc", "pool.alloc(n, 'f32', shape)", 1),
        ("BufferPool.allocator()", "make()", 1),
        (f"alloc_batch of {BATCH}", "pool.alloc_batch(requests)", BATCH),
        ("Device.alloc_buffer", "dev.alloc_buffer(n, 'f32', shape)", 1),
    ]
    results = {name: float("inf") for name, _, _ in cases}
    # Interleaved rounds, best of each: other processes' load hits every
    # case alike instead of skewing one ratio.
    for _ in range(5):
        for name, stmt, per in cases:
            runs = max(number // per, 1)
            seconds = timeit.timeit(stmt, globals=names, number=runs)
            results[name] = min(results[name], seconds / (runs * per) * 1e9)
    base = results["numpy.empty"]
    for name, _, per in cases:
        ns = results[name]
        unit = "ns/buffer" if per > 1 else "ns/op    "
        print(f"{name:<24}{ns:8.0f} {unit}  {ns / base:5.2f}x numpy.empty")
    if dev.residency_set is not None:
        dev.residency_set.flush_pending()
    pool.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; returns the process exit status."""
    parser = argparse.ArgumentParser(prog="python -m mlxbuf", description=DESCRIPTION)
    parser.add_argument("--backend", default="auto", choices=["auto", "host", "metal"],
                        help="device to open (default: auto, as mlxbuf.default_device)")
    parser.add_argument("--number", type=int, default=20000, help="iterations per churn timing run (default: 20000)")
    args = parser.parse_args(argv)
    dev = mlxbuf.Device(args.backend)
    # Each section is flushed as it ends, so a reader that stops early (a
    # pipe into head) ends the run at the next section, not after it.
    for section in (_facts, _views, _residency, _pool):
        section(dev)
        sys.stdout.flush()
    _churn(dev, args.number)
    sys.stdout.flush()
    dev.synchronize()
    return 0


def run(argv: Sequence[str] | None = None) -> int:
    """main(), ending quietly when stdout is closed early (``... | head``)."""
    try:
        return main(argv)
    except BrokenPipeError:
        # Python's own advice: point stdout at devnull so the flush at exit
        # does not fail a second time, and exit like a program killed by
        # SIGPIPE would want to be seen (status 1, nothing on stderr).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(run())
