"""Shared fixtures: one `device` fixture over every available backend.

MLXBUF_TEST_BACKENDS=host,metal narrows (or names) the backends to test;
by default every backend this machine can open is used: host everywhere,
metal on Apple Silicon macOS and in a simulator build (MLXBUF_METAL_SIM=1,
where "metal" is the simulated Metal). Tests that need a Metal device
carry the `requires_metal` marker and skip elsewhere.

MLXBUF_BACKEND=metal (the simulator's README command) means the run is
about Metal: it fails at once where this build has no Metal backend,
instead of passing on host alone, and mlxbuf's own meaning of the variable
applies inside the tests too (Device("auto") and default_device() open
Metal), so the tests that do not name a backend run on Metal as well.

On the simulator, an autouse fixture fails every test after which a new
Metal validation error was recorded (a broken Metal rule is a bug in
mlxbuf until shown otherwise); a test that breaks a rule on purpose takes
the `metalsim_validation` fixture and consumes the messages it expects.
"""

import collections
import gc
import os

import pytest
from hypothesis import HealthCheck, settings

import mlxbuf
from mlxbuf import metalsim
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
# Freed memory waits for the residency commit that removes it, which comes
# at the next submission, past a size threshold, or after an idle timeout
# (1 s by default). Timing must not decide what a test sees: a slow run
# (sanitizers, valgrind, a busy machine) would cross 1 s between a drop and
# the submission it is counted against, so the timer is set an hour off
# here (the residency thread still starts, runs and stops in every test);
# the tests of the timer set their own.
os.environ.setdefault("MLXBUF_RESIDENCY_RELEASE_SECONDS", "3600")

if os.environ.get("MLXBUF_SANITIZER_RUN") and "ASAN_OPTIONS" in os.environ:
    os.environ["ASAN_OPTIONS"] = os.environ["ASAN_OPTIONS"].replace("detect_leaks=1", "detect_leaks=0")

_CODES = {"host": lib.CM_BACKEND_HOST, "metal": lib.CM_BACKEND_METAL}
AVAILABLE = [name for name, code in _CODES.items() if lib.cm_backend_available(code)]
METAL_AVAILABLE = "metal" in AVAILABLE
NO_METAL_REASON = (
    "needs a Metal device: Apple Silicon macOS, or a simulator build of mlxbuf "
    "(MLXBUF_METAL_SIM=1 python3 -m pip install -e .); this build has none"
)


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


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "metal_exception: raises an Objective-C exception through cmetal/metal.m on the simulated "
        "Metal (metal.m is built with -fobjc-arc-exceptions, so what ARC held in the frames it "
        "unwinds is released; the sanitizer pass of the simulator checks it)",
    )
    if os.environ.get("MLXBUF_BACKEND", "").strip().lower() == "metal" and not METAL_AVAILABLE:
        raise pytest.UsageError(
            "MLXBUF_BACKEND=metal asks to test the Metal backend, which this build of mlxbuf "
            "does not have; on Linux build the simulated Metal first: "
            'MLXBUF_METAL_SIM=1 python3 -m pip install -e ".[test]"'
        )


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



# ---- the simulated Metal's validation layer ------------------------------------


class ValidationLog:
    """The simulator's validation messages recorded since a test began."""

    def __init__(self):
        self.start = lib.msim_validation_count() if metalsim.available() else 0

    def new(self):
        """Messages recorded since the start (or the last take())."""
        if not metalsim.available():
            return []
        lib.msim_drain()
        count = lib.msim_validation_count()
        if count == self.start:
            return []
        messages = metalsim.validation_messages()
        return messages[max(0, len(messages) - (count - self.start)):]

    def take(self):
        """The new messages; they no longer fail the test."""
        messages = self.new()
        self.start += len(messages)
        return messages


@pytest.fixture(autouse=True)
def _no_new_validation_errors(request):
    """After every test on a simulator build: no Metal rule was broken."""
    log = ValidationLog()
    request.node._metalsim_log = log
    yield
    if not metalsim.available():
        return
    messages = log.new()
    if messages:
        shown = "\n  ".join(messages[:20])
        more = f"\n  ... and {len(messages) - 20} more" if len(messages) > 20 else ""
        pytest.fail(f"the simulated Metal recorded {len(messages)} validation error(s):\n  {shown}{more}", pytrace=False)


@pytest.fixture
def metalsim_validation(request):
    """The test's ValidationLog: take() the messages a test provokes on purpose."""
    if not metalsim.available():
        pytest.skip("needs the simulated Metal (a MLXBUF_METAL_SIM=1 build)")
    return request.node._metalsim_log


_RUN_BY_BACKEND = collections.Counter()


def pytest_runtest_logreport(report):
    if report.when == "call" and report.passed:
        callspec = getattr(report, "_mlxbuf_backend", None)
        if callspec:
            _RUN_BY_BACKEND[callspec] += 1


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    params = getattr(getattr(item, "callspec", None), "params", {})
    if "backend" in params:
        report._mlxbuf_backend = params["backend"]


def pytest_terminal_summary(terminalreporter):
    if _RUN_BY_BACKEND:
        counts = ", ".join(f"{name} {n}" for name, n in sorted(_RUN_BY_BACKEND.items()))
        terminalreporter.write_line(f"tests passed per backend parameter: {counts}")
    if metalsim.available():
        stats = metalsim.stats()
        terminalreporter.write_line(
            f"simulated Metal: {stats['validation_errors']} validation error(s) recorded, "
            f"{stats['command_buffers_completed']} command buffers run, "
            f"{stats['residency_commits']} residency commits"
        )
