"""Device: opening, facts, environment switches, memory statistics and limits."""

import gc
import os
import subprocess
import sys
import threading

import pytest

import mlxbuf
from support import assert_names, release_deferred, run_threads

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(code, **env):
    """Run code in a fresh interpreter with extra environment; return the CompletedProcess."""
    full_env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for key, value in env.items():
        if value is None:
            full_env.pop(key, None)
        else:
            full_env[key] = value
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=120)


def test_facts(device, backend):
    assert device.backend == backend
    assert device.name
    assert device.has_unified_memory is True
    assert device.max_buffer_length > 0
    assert device.recommended_max_working_set_size > 0
    page = device.page_size
    assert page >= 4096 and page & (page - 1) == 0
    assert device.residency_sets_enabled in (True, False)
    assert backend in repr(device)


def test_host_facts_are_derived_from_the_machine(host_device):
    assert host_device.backend == "host"
    assert host_device.registry_id == 0
    assert host_device.residency_sets_enabled
    assert host_device.residency_disabled_reason == ""
    assert host_device.max_buffer_length <= host_device.recommended_max_working_set_size * 4


def test_each_device_has_its_own_counters(device, other_device):
    buf = device.alloc_buffer(8192, "u8", (8192,))
    assert device.active_memory >= 8192
    assert other_device.active_memory == 0
    assert other_device.residency_set is None or other_device.residency_set.allocation_count == 0
    del buf


def test_unknown_backend():
    with pytest.raises(mlxbuf.InvalidArgument) as exc:
        mlxbuf.Device("cuda")
    assert_names(exc, "'cuda'", "host", "metal")


def test_metal_without_metal_raises_device_not_found():
    from mlxbuf._cmetal import lib

    if lib.cm_backend_available(lib.CM_BACKEND_METAL):
        assert mlxbuf.Device("metal").backend == "metal"
        return
    with pytest.raises(mlxbuf.DeviceNotFound) as exc:
        mlxbuf.Device("metal")
    assert "Metal" in str(exc.value)


def test_backend_env_forces_auto(monkeypatch):
    monkeypatch.setenv("MLXBUF_BACKEND", "host")
    assert mlxbuf.Device("auto").backend == "host"
    assert mlxbuf.Device().backend == "host"
    monkeypatch.setenv("MLXBUF_BACKEND", "tpu")
    with pytest.raises(mlxbuf.InvalidArgument) as exc:
        mlxbuf.Device()
    assert_names(exc, "MLXBUF_BACKEND", "tpu")


def test_default_device_is_cached_and_thread_safe():
    seen = []
    barrier = threading.Barrier(4)

    def grab():
        barrier.wait()
        seen.append(mlxbuf.default_device())

    run_threads(grab, [()] * 4)
    assert len({id(d) for d in seen}) == 1
    assert seen[0] is mlxbuf.default_device()


def test_default_device_honours_backend_env_in_a_fresh_process():
    r = run_python("import mlxbuf; print(mlxbuf.default_device().backend)", MLXBUF_BACKEND="host")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "host"


def test_default_device_metal_env_without_metal():
    from mlxbuf._cmetal import lib

    if lib.cm_backend_available(lib.CM_BACKEND_METAL):
        pytest.skip("this build has a Metal backend (a Mac or the simulated Metal), so MLXBUF_BACKEND=metal succeeds")
    r = run_python(
        "import mlxbuf\n"
        "try:\n    mlxbuf.default_device()\n"
        "except mlxbuf.DeviceNotFound as e:\n    print('DeviceNotFound', e)\n",
        MLXBUF_BACKEND="metal",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("DeviceNotFound")


def test_no_residency_env(monkeypatch, backend):
    monkeypatch.setenv("MLXBUF_NO_RESIDENCY", "1")
    dev = mlxbuf.Device(backend)
    assert dev.residency_sets_enabled is False
    assert dev.residency_set is None
    assert dev.residency_disabled_reason
    buf = dev.alloc_buffer(4096, "f32", (1024,))
    assert buf.residency_set is None
    with dev.command_encoder() as enc:
        enc.fill(buf, 3)
    assert (buf.numpy().view("u1") == 3).all()


def test_no_residency_keyword(backend):
    dev = mlxbuf.Device(backend, residency=False)
    assert dev.residency_set is None


def test_residency_env_overrides_at_open(monkeypatch, host_device):
    monkeypatch.setenv("MLXBUF_RESIDENCY_SHARD_BYTES", str(1 << 20))
    monkeypatch.setenv("MLXBUF_RESIDENCY_KEEPALIVE", "2.5,0.5")
    dev = mlxbuf.Device("host")
    assert dev.residency_set.shard_cap == 1 << 20
    assert dev.residency_set.keepalive == (2.5, 0.5)
    dev.set_residency_keepalive(0)
    assert dev.residency_set.keepalive[0] == 0


@pytest.mark.parametrize(
    "name, value",
    [("MLXBUF_RESIDENCY_SHARD_BYTES", "lots"), ("MLXBUF_RESIDENCY_SHARD_BYTES", "-5"),
     ("MLXBUF_RESIDENCY_KEEPALIVE", "soon"), ("MLXBUF_RESIDENCY_KEEPALIVE", "1,2,3")],
)
def test_bad_residency_env_values(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(mlxbuf.InvalidArgument) as exc:
        mlxbuf.Device("host")
    assert_names(exc, name, value)


def test_active_and_peak_memory(device):
    assert device.active_memory == 0
    a = device.alloc_buffer(4096, "u8", (4096,))
    b = device.alloc_buffer(3 * 4096, "u8", (4096,))
    sa, sb = a.allocated_size, b.allocated_size
    assert sa >= 4096 and sb >= 3 * 4096
    assert device.active_memory == sa + sb
    assert device.peak_memory == sa + sb
    del b
    assert device.active_memory == sa
    assert device.peak_memory == sa + sb
    device.reset_peak_memory()
    assert device.peak_memory == sa
    del a
    assert device.active_memory == 0
    stats = device.stats()
    assert stats.live_storages == 0
    # Dead, but their memory waits for the commit that removes them from
    # the residency set (no waiting without residency).
    waiting = sa + sb if device.residency_sets_enabled else 0
    assert stats.deferred_release_bytes == waiting
    assert stats.free_count == 2 - (2 if waiting else 0)
    release_deferred(device)
    stats = device.stats()
    assert stats.deferred_release_bytes == 0
    assert stats.alloc_count == stats.free_count == 2


def test_memory_limit_returns_old_value_and_refuses_beyond_it(device):
    original = device.memory_limit
    assert original > 0
    keep = device.alloc_buffer(4096, "u8", (4096,))
    page = keep.allocated_size  # the limit counts whole pages
    old = device.set_memory_limit(3 * page)
    assert old == original
    assert device.memory_limit == 3 * page
    ok = device.alloc_buffer(2 * page, "u8", (1,))
    with pytest.raises(mlxbuf.BufferAllocationError) as exc:
        device.alloc_buffer(100, "u8", (1,))  # 100 bytes take a page
    assert exc.value.bytes == 100
    assert isinstance(exc.value, MemoryError)
    assert_names(exc, 100, 3 * page)
    assert device.active_memory == 3 * page
    del ok
    # ok's memory may wait for its residency removal's commit: the
    # allocation commits it, and then fits.
    again = device.alloc_buffer(4096, "u8", (1,))
    assert device.stats().deferred_release_bytes == 0
    assert device.set_memory_limit(None) == 3 * page
    del keep, again


def test_out_of_memory_collects_garbage_and_retries(device):
    """A dead buffer kept by a reference cycle is collected before giving up."""
    gc.collect()
    gc.disable()
    try:
        cycle = [device.alloc_buffer(8 * 4096, "u8", (1,))]
        cycle.append(cycle)
        del cycle
        device.set_memory_limit(10 * 4096)
        buf = device.alloc_buffer(8 * 4096, "u8", (1,))
        assert device.active_memory == 8 * 4096
        del buf
    finally:
        gc.enable()
        device.set_memory_limit(None)


def test_injected_failure_is_retried_once(device):
    device._debug_fail_alloc(fail_nth=1)
    buf = device.alloc_buffer(4096, "u8", (4096,))  # the first try fails, the retry succeeds
    assert device.stats().alloc_count == 1
    device._debug_fail_alloc(min_bytes=1 << 20)
    with pytest.raises(mlxbuf.BufferAllocationError) as exc:
        device.alloc_buffer(1 << 20, "u8", (1,))
    assert exc.value.bytes == 1 << 20
    small = device.alloc_buffer(4096, "u8", (1,))
    device._debug_fail_alloc(0, 0)
    assert device.active_memory == buf.allocated_size + small.allocated_size
    del buf, small


def test_synchronize_waits_for_everything(device):
    bufs = [device.alloc_buffer(1 << 16, "u8", (1 << 16,)) for _ in range(4)]
    encoders = []
    for i, b in enumerate(bufs):
        enc = device.command_encoder()
        enc.fill(b, i + 1)
        enc.commit()
        encoders.append(enc)
    device.synchronize()
    assert all(e.status == "completed" for e in encoders)
    assert device.stats().completed == device.stats().submitted == 4
    for i, b in enumerate(bufs):
        assert (b.numpy(wait=False) == i + 1).all()


def test_exit_with_work_in_flight_is_clean():
    r = run_python(
        "import mlxbuf\n"
        "d = mlxbuf.Device('host')\n"
        "p = mlxbuf.BufferPool(d)\n"
        "bufs = [p.alloc(1 << 20, 'u8', (1 << 20,)) for _ in range(8)]\n"
        "views = [b.numpy() for b in bufs]\n"
        "enc = d.command_encoder()\n"
        "for a, b in zip(bufs, bufs[1:]):\n    enc.copy(a, b)\n"
        "enc.commit()\n"
        "pending = d.command_encoder(); pending.fill(bufs[0], 1)\n"
    )
    assert r.returncode == 0
    assert r.stderr == ""
