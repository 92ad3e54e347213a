"""Helpers shared by the tests (imported as `support`; tests/ is on sys.path under pytest)."""

import ctypes
import gc
import time
import mmap
import os
import subprocess
import sys
import threading

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def assert_names(excinfo, *fragments):
    """Assert the raised exception's message names every fragment (values, limits)."""
    message = str(excinfo.value)
    for fragment in fragments:
        assert str(fragment) in message, f"{fragment!r} not in {message!r}"


def settle():
    """Collect garbage so dropped buffers in cycles release their storages."""
    gc.collect()


def allocated_size_of(device, n):
    """What an n-byte storage occupies on device: whole pages of its
    backend's allocation granule (16 KiB on Apple Silicon)."""
    return device.alloc_buffer(n, "u8", (1,)).allocated_size


def release_deferred(device):
    """Commit the residency removals that freed memory waits for, so it is
    given back now (a no-op when residency is off: nothing waits then)."""
    rs = device.residency_set
    if rs is not None:
        rs.flush_pending()
        wait_until_released(device)


def wait_until_released(device, timeout=30):
    """Wait until no freed memory waits for its removal's commit or is being
    given back. A commit made by another thread (the residency thread's idle
    timer) unlists what it released at once but gives it back just after,
    outside its locks, so the figures settle a moment later. A bounded wait:
    it fails only if the memory never comes back."""
    rs = device.residency_set
    deadline = time.monotonic() + timeout
    while rs.pending_release_count or device.stats().deferred_release_bytes:
        assert time.monotonic() < deadline, (
            f"{rs.pending_release_count} freed storages ({device.stats().deferred_release_bytes} bytes) "
            f"still wait after {timeout} s"
        )
        time.sleep(0.002)


def hypothesis_profile():
    """The hypothesis profile of this run: MLXBUF_HYPOTHESIS_PROFILE, else
    HYPOTHESIS_PROFILE, else "ci" (what the plain test command runs)."""
    return os.environ.get("MLXBUF_HYPOTHESIS_PROFILE") or os.environ.get("HYPOTHESIS_PROFILE") or "ci"


def run_threads(target, args_list, timeout=60.0):
    """Run target(*args) on one thread per entry of args_list and join them
    all; a thread still alive after `timeout` seconds fails the test as a
    deadlock instead of hanging the run."""
    threads = [threading.Thread(target=target, args=args, daemon=True) for args in args_list]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    stuck = [t.name for t in threads if t.is_alive()]
    assert not stuck, f"threads still running after {timeout} s (deadlock?): {stuck}"


def page_aligned_array(n, dtype, page):
    """A numpy array of n elements whose data starts on a page boundary
    (Metal wraps only page-aligned memory without copying)."""
    itemsize = np.dtype(dtype).itemsize
    raw = np.zeros(n * itemsize + page, np.uint8)
    start = -raw.ctypes.data % page
    return raw[start : start + n * itemsize].view(dtype)


def page_aligned_ctypes(n):
    """A ctypes uint8 array of n bytes at the start of its own anonymous
    mapping (page-aligned; the array keeps the mapping alive)."""
    mapping = mmap.mmap(-1, max(n, mmap.PAGESIZE))
    return (ctypes.c_uint8 * n).from_buffer(mapping)


def run_clean(script, timeout=120, **env):
    """Run script in a fresh interpreter (``-X dev``: the debug allocator
    and every warning on) with extra environment; assert status 0, an empty
    stderr and "ok" as the last line of stdout; return stdout. A run longer
    than `timeout` seconds fails the test (subprocess.TimeoutExpired)
    instead of hanging it."""
    full_env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **env)
    proc = subprocess.run(
        [sys.executable, "-X", "dev", "-c", script], capture_output=True, text=True, env=full_env, timeout=timeout
    )
    assert proc.returncode == 0, f"exit status {proc.returncode}\nstderr:\n{proc.stderr}"
    assert proc.stderr == "", proc.stderr
    assert proc.stdout.splitlines()[-1:] == ["ok"], proc.stdout
    return proc.stdout


def fuzz_examples(default):
    """Examples for a fuzzing test: ``default`` under the plain test command,
    MLXBUF_FUZZ_EXAMPLES for a longer opt-in run (e.g. 100000, under
    .ci/sanitize.sh's build for memory errors too)."""
    return int(os.environ.get("MLXBUF_FUZZ_EXAMPLES", "") or default)
