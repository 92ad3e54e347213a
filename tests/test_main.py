"""`python -m mlxbuf` runs and prints the figures it promises."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_python_dash_m_mlxbuf():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run(
        [sys.executable, "-m", "mlxbuf", "--backend", "host", "--number", "2000"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "backend                 host" in out
    assert "same address" in out and "DIFFERENT" not in out
    assert "-> 1 residency commit(s)" in out
    assert "0 residency commits (expected 0)" in out
    for name in ("numpy.empty", "BufferPool.alloc", "Device.alloc_buffer"):
        assert name in out
    assert r.stderr == ""
