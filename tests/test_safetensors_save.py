"""save_safetensors replaces a file atomically and leaves nothing behind.

A kill mid-save left a full-size temporary forever (80 kills: 9.5 GB),
saving over a 0600 file left it 0644, and saving to a symlink replaced the
link. Now: the new file is written where a kill leaves nothing (Linux
O_TMPFILE, unnamed until complete; elsewhere a locked temporary that the
next save to the same target removes), the target keeps its mode and
owner, and a symlink is followed to the file it names.
"""

import fcntl
import os
import signal
import stat
import subprocess
import sys
import time

import numpy as np
import pytest

import mlxbuf
from mlxbuf import safetensors as st_module
from mlxbuf.safetensors import load_safetensors, save_safetensors

SMALL = {"a": np.arange(16, dtype=np.float32)}
OTHER = {"b": np.arange(4, dtype=np.int64)}


def listing(directory):
    return sorted(p.name for p in directory.iterdir())


@pytest.fixture(params=["tmpfile", "named"])
def temp_kind(request, monkeypatch):
    """Both ways of writing the new file: O_TMPFILE, and a named, locked
    temporary (what systems without O_TMPFILE get)."""
    if request.param == "tmpfile" and not getattr(st_module, "_HAVE_O_TMPFILE", True):
        pytest.skip("this system has no O_TMPFILE")
    if request.param == "named":
        monkeypatch.setattr(st_module, "_HAVE_O_TMPFILE", False, raising=False)
    return request.param


def test_saving_leaves_only_the_target(tmp_path, temp_kind, host_device):
    path = tmp_path / "m.safetensors"
    save_safetensors(path, SMALL)
    save_safetensors(path, OTHER)
    assert listing(tmp_path) == ["m.safetensors"]
    assert set(load_safetensors(path, host_device)) == {"b"}


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o755, 0o444])
def test_the_target_keeps_its_mode(tmp_path, temp_kind, mode):
    path = tmp_path / "m.safetensors"
    save_safetensors(path, SMALL)
    path.chmod(mode)
    save_safetensors(path, OTHER)
    assert stat.S_IMODE(path.stat().st_mode) == mode


def test_a_new_file_gets_the_umask_mode(tmp_path, temp_kind):
    old = os.umask(0o027)
    try:
        save_safetensors(tmp_path / "new.safetensors", SMALL)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "new.safetensors").stat().st_mode) == 0o640


@pytest.mark.skipif(os.geteuid() != 0, reason="only root may give a file to another user")
def test_the_target_keeps_its_owner(tmp_path, temp_kind):
    path = tmp_path / "m.safetensors"
    save_safetensors(path, SMALL)
    os.chown(path, 12345, 23456)
    save_safetensors(path, OTHER)
    info = path.stat()
    assert (info.st_uid, info.st_gid) == (12345, 23456)


def test_a_symlink_is_followed_and_kept(tmp_path, temp_kind, host_device):
    real_dir = tmp_path / "real"
    real_dir.mkdir()
    real = real_dir / "weights.safetensors"
    save_safetensors(real, SMALL)
    real.chmod(0o600)
    link = tmp_path / "link.safetensors"
    link.symlink_to(os.path.relpath(real, tmp_path))
    chain = tmp_path / "chain.safetensors"
    chain.symlink_to(link)
    save_safetensors(chain, OTHER)
    assert link.is_symlink() and chain.is_symlink()
    assert set(load_safetensors(real, host_device)) == {"b"}
    assert stat.S_IMODE(real.stat().st_mode) == 0o600
    assert listing(tmp_path) == ["chain.safetensors", "link.safetensors", "real"]
    assert listing(real_dir) == ["weights.safetensors"]


def test_a_dangling_symlink_creates_its_target(tmp_path, temp_kind, host_device):
    link = tmp_path / "link.safetensors"
    link.symlink_to("made.safetensors")
    save_safetensors(link, SMALL)
    assert link.is_symlink()
    assert set(load_safetensors(tmp_path / "made.safetensors", host_device)) == {"a"}


class FailingFile:
    """A file whose writes fail once ``budget`` bytes went through (a full disk)."""

    def __init__(self, fd, mode, closefd=True, budget=100):
        self.f = open(fd, mode, closefd=closefd)
        self.budget = budget

    def write(self, data):
        n = len(memoryview(data).cast("B"))
        if n > self.budget:
            raise OSError(28, "No space left on device")
        self.budget -= n
        return self.f.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


@pytest.mark.parametrize("failure", ["iteration", "write", "rename"])
def test_a_failed_save_leaves_the_target_and_no_temporary(tmp_path, temp_kind, host_device, monkeypatch, failure):
    path = tmp_path / "m.safetensors"
    save_safetensors(path, SMALL)
    tensors = {"big": np.ones(1 << 16, np.float32)}
    if failure == "iteration":
        class Exploding(dict):
            def items(self):
                yield "ok", np.ones(4)
                raise RuntimeError("the caller's dict failed mid-iteration")

        tensors, error = Exploding(), RuntimeError
    elif failure == "write":
        monkeypatch.setattr(st_module, "open", FailingFile, raising=False)
        error = OSError
    else:
        def no_rename(*args):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(st_module.os, "replace", no_rename)
        error = OSError
    with pytest.raises(error) as excinfo:
        save_safetensors(path, tensors)
    if error is OSError:
        assert isinstance(excinfo.value, mlxbuf.FileError) and excinfo.value.errno == 28
        assert excinfo.value.filename == str(path)
    monkeypatch.undo()
    assert listing(tmp_path) == ["m.safetensors"]
    np.testing.assert_array_equal(load_safetensors(path, host_device)["a"].numpy(), SMALL["a"])


def test_a_live_save_keeps_its_temporary(tmp_path):
    """Another process's save in progress holds a lock on its temporary: the
    cleanup of dead temporaries leaves it alone."""
    path = tmp_path / "m.safetensors"
    live = tmp_path / "m.safetensors.tmp-0123456789abcdef"
    live.write_bytes(b"partial")
    dead = tmp_path / "m.safetensors.tmp-fedcba9876543210"
    dead.write_bytes(b"partial")
    other = tmp_path / "other.safetensors.tmp-0000000000000000"
    other.write_bytes(b"someone else's")
    fd = os.open(live, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        save_safetensors(path, SMALL)
    finally:
        os.close(fd)
    assert listing(tmp_path) == ["m.safetensors", "m.safetensors.tmp-0123456789abcdef",
                                 "other.safetensors.tmp-0000000000000000"]


def test_a_special_target_is_not_replaced(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(mlxbuf.FileError):
        save_safetensors(fifo, SMALL)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


# ---- a real kill, mid-save -----------------------------------------------------------------

KILL_SCRIPT = r"""
import sys, numpy as np
import mlxbuf.safetensors as st
if sys.argv[2] == "named":
    st._HAVE_O_TMPFILE = False
big = np.ones(int(sys.argv[3]) // 4, np.float32)
print("saving", flush=True)
st.save_safetensors(sys.argv[1], {"big": big})
print("saved", flush=True)
"""

BIG = 256 << 20


def _open_new_files(pid, target):
    """Sizes of the new files beside ``target`` that process pid has open:
    regular files in its directory other than the target itself. (The save
    also opens the directory to list it, and a directory has a size too:
    counting it killed the save before its temporary existed.)"""
    sizes = []
    fd_dir = f"/proc/{pid}/fd"
    for name in os.listdir(fd_dir):
        try:
            link = os.readlink(os.path.join(fd_dir, name))
        except OSError:
            continue
        if os.path.dirname(link) == str(target.parent) and link != str(target):
            try:
                info = os.stat(os.path.join(fd_dir, name))
            except OSError:
                continue
            if stat.S_ISREG(info.st_mode):
                sizes.append(info.st_size)
    return sizes


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="watches the saving process through /proc")
def test_sigkill_mid_save_leaves_the_target_and_no_debris(tmp_path, temp_kind, host_device):
    """A subprocess saves 256 MiB over an existing file and is killed with
    SIGKILL once the new file is partly written. The old file must be
    intact; with O_TMPFILE nothing else may exist, and with a named
    temporary the next save must remove the dead one."""
    path = tmp_path / "m.safetensors"
    save_safetensors(path, SMALL)
    before = path.read_bytes()
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(path), temp_kind, str(BIG)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "saving"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            sizes = _open_new_files(proc.pid, path)
            if any(0 < size < BIG for size in sizes):
                break
            if proc.poll() is not None:
                pytest.fail("the save finished before it could be killed")
            time.sleep(0.001)
        else:
            pytest.fail("never saw the new file being written")
        proc.send_signal(signal.SIGKILL)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert path.read_bytes() == before
    debris = [name for name in listing(tmp_path) if name != "m.safetensors"]
    if temp_kind == "tmpfile":
        assert debris == []
    else:
        assert len(debris) == 1 and debris[0].startswith("m.safetensors.tmp-")
        assert (tmp_path / debris[0]).stat().st_size > 0
    save_safetensors(path, OTHER)
    assert listing(tmp_path) == ["m.safetensors"]
    assert set(load_safetensors(path, host_device)) == {"b"}
