"""Every file failure of every file path: a FileError that is also the matching builtin.

load_safetensors, safetensors_metadata, read_header, save_safetensors and
Device.map_file raise mlxbuf.FileError for a path they cannot use, and that
exception is also FileNotFoundError / PermissionError / IsADirectoryError /
NotADirectoryError (else a plain OSError), with errno, strerror and filename
set, so both ``except mlxbuf.MlxError`` and ``except FileNotFoundError``
work. Special files (FIFOs, sockets, devices) are refused without blocking:
a FIFO used to hang every reader forever in open().
"""

import errno
import os
import shutil
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest

import mlxbuf
from mlxbuf.safetensors import read_header
from support import assert_names


def _readers(device):
    """(name, call(path)) for every function that reads a file."""
    return [
        ("load_safetensors", lambda p: mlxbuf.load_safetensors(p, device)),
        ("safetensors_metadata", mlxbuf.safetensors_metadata),
        ("read_header", read_header),
        ("map_file", lambda p: device.map_file(p)),
        ("map_file writable", lambda p: device.map_file(p, writable=True)),
    ]


def _every_call(device):
    return _readers(device) + [("save_safetensors", lambda p: mlxbuf.save_safetensors(p, {"a": np.ones(2)}))]


def _check(excinfo, builtin, code, path):
    exc = excinfo.value
    assert isinstance(exc, mlxbuf.FileError) and isinstance(exc, mlxbuf.MlxError)
    assert isinstance(exc, builtin)
    assert exc.errno == code
    assert exc.filename == str(path)
    assert exc.strerror
    assert_names(excinfo, str(path))


def test_missing_path(device, tmp_path):
    missing = tmp_path / "no-such-dir" / "absent.bin"
    for name, call in _every_call(device):
        with pytest.raises(FileNotFoundError) as excinfo:
            call(missing)
        _check(excinfo, FileNotFoundError, errno.ENOENT, missing)
        assert_names(excinfo, "No such file")


def test_a_directory(device, tmp_path):
    for name, call in _every_call(device):
        with pytest.raises(IsADirectoryError) as excinfo:
            call(tmp_path)
        _check(excinfo, IsADirectoryError, errno.EISDIR, tmp_path)


def test_a_path_through_a_file(device, tmp_path):
    plain = tmp_path / "plain.bin"
    plain.write_bytes(b"x" * 64)
    inside = plain / "inner.bin"
    for name, call in _every_call(device):
        with pytest.raises(NotADirectoryError) as excinfo:
            call(inside)
        _check(excinfo, NotADirectoryError, errno.ENOTDIR, inside)


PERMISSION_SCRIPT = r"""
import sys, numpy as np, mlxbuf
from mlxbuf.safetensors import read_header
path = sys.argv[1]
dev = mlxbuf.Device("host")
calls = [lambda: mlxbuf.load_safetensors(path, dev), lambda: mlxbuf.safetensors_metadata(path),
         lambda: read_header(path), lambda: dev.map_file(path),
         lambda: mlxbuf.save_safetensors(path + ".new", {"a": np.ones(2)})]
for call in calls:
    try:
        call()
    except PermissionError as exc:
        assert isinstance(exc, mlxbuf.FileError), type(exc)
        assert exc.errno == 13 and exc.filename.startswith(path), (exc.errno, exc.filename)
    else:
        raise SystemExit("no PermissionError")
print("ok")
"""


def test_permission_denied(tmp_path):
    """A file of mode 000 in a directory of mode 500. Root ignores file
    modes, so as root the check runs without the capabilities that let it
    (setpriv drops CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH)."""
    private = tmp_path / "private"
    private.mkdir()
    path = private / "secret.safetensors"
    mlxbuf.save_safetensors(path, {"a": np.ones(2)})
    path.chmod(0)
    private.chmod(0o500)
    command = [sys.executable, "-c", PERMISSION_SCRIPT, str(path)]
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv: nothing can deny root a file")
        command = [setpriv, "--bounding-set", "-dac_override,-dac_read_search", *command]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=120)
    finally:
        private.chmod(0o700)
        path.chmod(0o600)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def _call_with_timeout(call, path, unblock, timeout=10.0):
    """call(path) on a thread: the exception it raised, or a failure if it
    blocked (then ``unblock()`` releases the thread)."""
    outcome = []

    def run():
        try:
            call(path)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome.append(exc)
        else:
            outcome.append(None)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        unblock()
        t.join(timeout)
        pytest.fail(f"{call} blocked on {path}")
    return outcome[0]


def test_a_fifo_is_refused_without_blocking(device, tmp_path):
    """load_safetensors, safetensors_metadata and map_file opened a FIFO
    with a blocking open() and waited for a writer forever."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)

    def unblock():
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)

    for name, call in _every_call(device):
        exc = _call_with_timeout(call, fifo, unblock)
        assert isinstance(exc, mlxbuf.FileError), (name, exc)
        assert "a FIFO" in str(exc) and str(fifo) in str(exc), (name, str(exc))
        assert exc.filename == str(fifo) and exc.errno == errno.ENODEV
    assert os.path.exists(fifo) and not os.path.isfile(fifo), "save replaced the FIFO"


def test_a_socket_and_a_device_are_refused(device, tmp_path):
    sock_path = tmp_path / "sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.bind(str(sock_path))
        for path, kind in ((sock_path, "a socket"), ("/dev/null", "a character device")):
            for name, call in _readers(device):
                with pytest.raises(mlxbuf.FileError) as excinfo:
                    call(path)
                assert_names(excinfo, kind, str(path))
                assert excinfo.value.filename == str(path)
        with pytest.raises(mlxbuf.FileError) as excinfo:
            mlxbuf.save_safetensors(sock_path, {"a": np.ones(2)})
        assert_names(excinfo, "a socket")
    finally:
        server.close()
    assert os.path.exists("/dev/null") and not os.path.isfile("/dev/null")


def test_file_error_classes():
    from mlxbuf.errors import file_error

    cases = [
        (errno.ENOENT, FileNotFoundError),
        (errno.EACCES, PermissionError),
        (errno.EPERM, PermissionError),
        (errno.EISDIR, IsADirectoryError),
        (errno.ENOTDIR, NotADirectoryError),
        (errno.EEXIST, FileExistsError),
        (errno.EIO, OSError),
        (None, OSError),
    ]
    for code, builtin in cases:
        exc = file_error("cannot open 'x': why", code, "x")
        assert isinstance(exc, builtin) and isinstance(exc, mlxbuf.FileError)
        assert exc.errno == code and exc.filename == "x"
        assert str(exc) == "cannot open 'x': why"
        if builtin is OSError:
            assert type(exc) is mlxbuf.FileError
    with pytest.raises(mlxbuf.MlxError):
        raise file_error("m", errno.ENOENT, "x")


SYSFS_FILE = "/sys/devices/system/cpu/online"


@pytest.mark.skipif(not os.path.isfile(SYSFS_FILE), reason=f"{SYSFS_FILE} is Linux's")
def test_mmap_failure_keeps_its_errno(device):
    """A failure inside the C core's mmap reaches Python with the system
    call's errno (the C core keeps errno for the binding): sysfs files are
    regular, say 4096 bytes, and refuse mmap with ENODEV."""
    with pytest.raises(mlxbuf.FileError) as excinfo:
        device.map_file(SYSFS_FILE, 0, 16)
    assert excinfo.value.errno == errno.ENODEV
    assert excinfo.value.filename == SYSFS_FILE
    assert_names(excinfo, SYSFS_FILE, "No such device")
