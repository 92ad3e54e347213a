"""Shared fixtures and size settings for the benchmarks.

The benchmark files are named ``bench_*.py`` so that no default pattern
collects them: the plain test command (``python -m pytest``, testpaths =
tests/) and ``python -m pytest .`` never run them. Naming this folder, or a
path inside it, does:

    python -m pytest benchmarks/ --benchmark-only

Environment overrides (for CI or a quick look; parsed in _benchutil.py), with
K/M/G suffixes:

- ``MLXBUF_BENCH_CHURN_SIZES`` — churn sizes, default ``4K,1M``.
- ``MLXBUF_BENCH_LIVE`` — live-buffer counts of the scaling group,
  default ``100,10k,100k`` (100k live 4 KiB buffers hold 400 MiB).
- ``MLXBUF_BENCH_STAGE_N`` — N of the residency stage-and-flush group,
  default ``1,100,1000``.
- ``MLXBUF_BACKEND`` — the device benchmarked (``host`` or ``metal``), as
  for ``mlxbuf.default_device()``.
"""

import gc
from pathlib import Path

import pytest

import mlxbuf

_HERE = Path(__file__).resolve().parent


def _inside_benchmarks(config):
    for arg in config.args:
        path = Path(str(arg).split("::", 1)[0]).resolve()
        if path == _HERE or _HERE in path.parents:
            return True
    return False


def pytest_collect_file(file_path, parent):
    # Collects bench_*.py only when the command line names this folder (or
    # something in it), so widening the test run never picks them up. A
    # bench file named on the command line is collected by pytest itself.
    if file_path.suffix != ".py" or not file_path.name.startswith("bench_"):
        return None
    if parent.session.isinitpath(file_path) or not _inside_benchmarks(parent.config):
        return None
    return pytest.Module.from_parent(parent, path=file_path)


@pytest.fixture(scope="session")
def device():
    """The benchmarked device (``mlxbuf.default_device()``), synchronized at the end."""
    dev = mlxbuf.default_device()
    yield dev
    gc.collect()
    dev.synchronize()


@pytest.fixture
def pool(device):
    """A fresh BufferPool on ``device``, closed after the benchmark."""
    p = mlxbuf.BufferPool(device)
    yield p
    p.close()
