"""Helpers shared by the tests (imported as `support`; tests/ is on sys.path under pytest)."""

import gc
import os


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
