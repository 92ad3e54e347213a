"""Packaging: `python -m build` makes an sdist and a wheel with no warning,
and the wheel installs into a fresh virtual environment and works there.

Slow (a build in an isolated environment, a virtual environment, an
install), and it needs the package index that pip is configured with."""

import email
import os
import pathlib
import subprocess
import sys
import tarfile
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def _env():
    env = dict(os.environ)
    # PYTHONDONTWRITEBYTECODE makes setuptools warn that it skips
    # byte-compiling: a fact of the calling shell, not of the project.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.pop("PYTHONPATH", None)
    return env


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    pytest.importorskip("build", reason="the build package is not installed (pip install build)")
    out = tmp_path_factory.mktemp("dist")
    r = subprocess.run([sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)],
                       capture_output=True, text=True, env=_env(), timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    return out, r.stdout + r.stderr


def test_sdist_and_wheel_build_without_warnings(dist):
    out, log = dist
    warnings = [line for line in log.splitlines() if "warning" in line.lower() or "deprecat" in line.lower()]
    assert not warnings, "\n".join(warnings)
    (sdist,) = out.glob("mlxbuf-*.tar.gz")
    (wheel,) = out.glob("mlxbuf-*.whl")
    with tarfile.open(sdist) as tar:
        names = {pathlib.PurePosixPath(n).relative_to(pathlib.PurePosixPath(n).parts[0]).as_posix()
                 for n in tar.getnames() if "/" in n}
    assert {"LICENSE", "build_ffi.py", "cmetal/cmetal.h", "mlxbuf/py.typed"} <= names
    with zipfile.ZipFile(wheel) as whl:
        listing = whl.namelist()
        metadata = email.message_from_bytes(whl.read(next(n for n in listing if n.endswith(".dist-info/METADATA"))))
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in listing)
    assert metadata["License-Expression"] == "MIT"
    assert any(n.startswith("mlxbuf/_cmetal") for n in listing)


def test_the_wheel_installs_into_a_fresh_venv_and_allocates(dist, tmp_path):
    out, _ = dist
    (wheel,) = out.glob("mlxbuf-*.whl")
    venv = tmp_path / "venv"
    env = _env()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=env, timeout=300)
    python = venv / "bin" / "python"
    r = subprocess.run([str(python), "-m", "pip", "install", "-q", str(wheel)], capture_output=True, text=True,
                       env=env, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    code = (
        "import mlxbuf; pool = mlxbuf.BufferPool(mlxbuf.Device('host')); "
        "buf = pool.alloc(4096, 'f32', (1024,)); buf.numpy()[:] = 2; "
        "print(mlxbuf.__file__); print(float(buf.numpy().sum()))"
    )
    r = subprocess.run([str(python), "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    where, total = r.stdout.split()
    assert pathlib.Path(where).is_relative_to(venv)  # the installed wheel, not the source tree
    assert total == "2048.0"
