"""Shared fixtures: one `device` fixture over every available backend.

MLXBUF_TEST_BACKENDS=host,metal narrows (or names) the backends to test;
by default every backend this machine can open is used. Tests that need a
Metal device carry the `requires_metal` marker and skip elsewhere.
"""

import gc
import os

import pytest
from hypothesis import HealthCheck, settings

import mlxbuf
from mlxbuf._cmetal import lib
from support import hypothesis_profile

settings.register_profile(
    "ci", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.register_profile("dev", max_examples=20, deadline=None)
settings.register_profile("long", max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# MLXBUF_HYPOTHESIS_PROFILE=long (or HYPOTHESIS_PROFILE) picks a profile; the
# plain test command runs "ci". tests/test_stateful.py sizes its state
# machine from the same name (2,000 examples under "ci").
settings.load_profile(hypothesis_profile())

# Under .ci/sanitize.sh the child interpreters some tests start exit with
# live buffers, pools and mappings on purpose (that is what they test): what
# they leave behind at exit is not a leak, so LeakSanitizer is off in them.
# ASan and UBSan stay on there, and this process keeps its own leak check.
if os.environ.get("MLXBUF_SANITIZER_RUN") and "ASAN_OPTIONS" in os.environ:
    os.environ["ASAN_OPTIONS"] = os.environ["ASAN_OPTIONS"].replace("detect_leaks=1", "detect_leaks=0")

_CODES = {"host": lib.CM_BACKEND_HOST, "metal": lib.CM_BACKEND_METAL}
AVAILABLE = [name for name, code in _CODES.items() if lib.cm_backend_available(code)]
METAL_AVAILABLE = "metal" in AVAILABLE
NO_METAL_REASON = "needs a Metal device (Apple Silicon macOS); this machine has none"


def _requested_backends():
    wanted = os.environ.get("MLXBUF_TEST_BACKENDS", "").strip()
    if not wanted:
        return AVAILABLE
    names = [w.strip().lower() for w in wanted.split(",") if w.strip()]
    unknown = [n for n in names if n not in _CODES]
    if unknown:
        raise pytest.UsageError(f"MLXBUF_TEST_BACKENDS names unknown backends {unknown}; use host and/or metal")
    return names


BACKENDS = _requested_backends()


def pytest_collection_modifyitems(config, items):
    if METAL_AVAILABLE:
        return
    skip = pytest.mark.skip(reason=NO_METAL_REASON)
    for item in items:
        if "requires_metal" in item.keywords:
            item.add_marker(skip)


def _backend_params():
    return [
        pytest.param(name, id=name, marks=() if name in AVAILABLE else pytest.mark.skip(reason=NO_METAL_REASON))
        for name in BACKENDS
    ]


@pytest.fixture(params=_backend_params())
def backend(request):
    """The name of the backend under test."""
    return request.param


@pytest.fixture
def device(backend):
    """A fresh Device of each tested backend: counters start at zero."""
    dev = mlxbuf.Device(backend)
    yield dev
    gc.collect()
    dev.synchronize()


@pytest.fixture
def other_device(backend):
    """A second, independent Device of the same backend."""
    dev = mlxbuf.Device(backend)
    yield dev
    dev.synchronize()


@pytest.fixture
def host_device():
    """A fresh host-backend Device (for behaviour only the host can show, e.g. Unsupported compute)."""
    dev = mlxbuf.Device("host")
    yield dev
    gc.collect()
    dev.synchronize()


@pytest.fixture
def pool(device):
    """A BufferPool on `device`, closed after the test."""
    p = mlxbuf.BufferPool(device)
    yield p
    p.close()

