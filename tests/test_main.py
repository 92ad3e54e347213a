"""`python -m mlxbuf` runs and prints the figures it promises."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


ENV = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


def run_demo(number):
    r = subprocess.run(
        [sys.executable, "-m", "mlxbuf", "--backend", "host", "--number", str(number)],
        capture_output=True, text=True, env=ENV, timeout=120,
    )
    assert r.returncode == 0, r.stderr
    return r


def test_python_dash_m_mlxbuf():
    r = run_demo(2000)
    out = r.stdout
    assert "backend                 host" in out
    assert "same address" in out and "DIFFERENT" not in out
    assert "-> 1 residency commit(s)" in out
    assert "0 residency commits (expected 0)" in out
    for name in ("numpy.empty", "BufferPool.alloc", "Device.alloc_buffer"):
        assert name in out
    assert r.stderr == ""


def test_churn_table_has_every_row_against_numpy_empty():
    r = run_demo(640)
    table = r.stdout[r.stdout.index("-- alloc/free churn"):].splitlines()[1:]
    rows = {line[:24].strip(): line[24:] for line in table if line.strip()}
    assert list(rows) == ["numpy.empty", "numpy.zeros", "BufferPool.alloc", "BufferPool.allocator()",
                          "alloc_batch of 64", "Device.alloc_buffer"]
    assert rows["numpy.empty"].endswith("1.00x numpy.empty")
    assert "ns/buffer" in rows["alloc_batch of 64"]


def test_a_reader_that_stops_early_ends_the_run_quietly():
    # `python -m mlxbuf | head -3`: the pipe closes after three lines.
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlxbuf", "--backend", "host", "--number", "200000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV,
    )
    lines = [proc.stdout.readline() for _ in range(3)]
    proc.stdout.close()
    _, err = proc.communicate(timeout=120)
    assert lines[0].startswith(b"mlxbuf ")
    assert err == b"", err.decode()
    assert proc.returncode == 1
