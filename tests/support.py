"""Helpers shared by the tests (imported as `support`; tests/ is on sys.path under pytest)."""

import gc
import os
import threading


def assert_names(excinfo, *fragments):
    """Assert the raised exception's message names every fragment (values, limits)."""
    message = str(excinfo.value)
    for fragment in fragments:
        assert str(fragment) in message, f"{fragment!r} not in {message!r}"


def settle():
    """Collect garbage so dropped buffers in cycles release their storages."""
    gc.collect()


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
