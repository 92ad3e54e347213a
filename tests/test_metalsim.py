"""mlxbuf.metalsim, and mlxbuf on the simulated Metal through it.

- The module's surface: available() and Unsupported outside a simulator
  build (both builds run that test), argument checks, stats keys.
- Every fault knob through mlxbuf: the documented exception, then a
  healthy device (allocate, copy, compute, nothing left behind).
- register_kernel: numpy reference kernels run in queue order; a failing
  kernel fails its command buffer with the kernel's message.
- Regression tests for what the simulator found in metal.m, and the
  residency figures the README quotes, counted by the simulator.

Tests that need the simulator skip with that reason in other builds.
"""

import gc
import os
import sys

import numpy as np
import pytest

import mlxbuf
from mlxbuf import metalsim
from mlxbuf._cmetal import lib
from support import assert_names

needs_sim = pytest.mark.skipif(
    not metalsim.available(), reason="needs a simulator build (MLXBUF_METAL_SIM=1 python3 -m pip install -e .)"
)

ADD_SOURCE = """
kernel void add_one(device const float *a [[buffer(0)]],
                    device float *out [[buffer(1)]],
                    uint i [[thread_position_in_grid]]) {
    out[i] = a[i] + 1.0f;
}
"""


def add_one(grid, threadgroup, buffers, constants):
    n = grid[0]
    buffers[1][: 4 * n].view(np.float32)[:] = buffers[0][: 4 * n].view(np.float32) + 1


@pytest.fixture
def sim():
    """A fresh simulated device with default configuration and no armed fault."""
    metalsim.configure()
    lib.msim_reset_faults()
    metalsim.register_kernel("add_one", add_one)
    dev = mlxbuf.Device("metal")
    yield dev
    gc.collect()
    dev.synchronize()
    lib.msim_reset_faults()
    metalsim.configure()


def healthy(dev):
    """Allocate, copy, fill, compute and free on dev; nothing stays behind."""
    before = dev.stats()
    a = dev.alloc_buffer(4096, "f32", (1024,))
    b = dev.alloc_buffer(4096, "f32", (1024,))
    a.numpy()[:] = np.arange(1024, dtype=np.float32)
    kernel = dev.compile_library(ADD_SOURCE).kernel("add_one")
    with dev.command_encoder() as enc:
        enc.dispatch(kernel, 1024, 32, buffers=[a, b])
    assert b.numpy()[:4].tolist() == [1.0, 2.0, 3.0, 4.0]
    with dev.command_encoder() as enc:
        enc.copy(b, a)
        enc.fill(b, 0)
    assert a.numpy()[1023] == 1024.0 and not b.numpy().any()
    del a, b
    gc.collect()
    dev.synchronize()
    after = dev.stats()
    assert after.active_bytes == before.active_bytes and after.live_storages == before.live_storages


# ---- the module's surface ------------------------------------------------------------


def test_outside_a_simulator_build_everything_but_available_is_unsupported(monkeypatch):
    monkeypatch.setattr(metalsim, "_AVAILABLE", False)
    assert metalsim.available() is False
    calls = [
        lambda: metalsim.configure(),
        lambda: metalsim.fail_next("new_buffer"),
        lambda: metalsim.register_kernel("k", add_one),
        lambda: metalsim.stats(),
        lambda: metalsim.validation_messages(),
    ]
    for call in calls:
        with pytest.raises(mlxbuf.Unsupported) as exc:
            call()
        assert_names(exc, "MLXBUF_METAL_SIM=1")


def test_available_matches_the_build():
    """In a simulator build "metal" is the simulated device; in a plain
    Linux build there is no Metal device at all."""
    if metalsim.available():
        assert "simulated" in mlxbuf.Device("metal").name
        assert mlxbuf.Device("auto").backend == "host" or os.environ.get("MLXBUF_BACKEND") == "metal"
    elif sys.platform.startswith("linux"):
        with pytest.raises(mlxbuf.DeviceNotFound):
            mlxbuf.Device("metal")


@needs_sim
def test_stats_has_the_documented_counters():
    s = metalsim.stats()
    for key in ("live_buffers", "live_bytes", "residency_commits", "residency_adds", "residency_removes",
                "residency_held_bytes", "command_buffers_committed", "command_buffers_completed",
                "validation_errors"):
        assert isinstance(s[key], int) and s[key] >= 0, key


@needs_sim
@pytest.mark.parametrize(
    "kwargs, fragments",
    [
        ({"macos_version": 10}, ("10", "11 to 99")),
        ({"macos_version": "15"}, ("'15'",)),
        ({"latency_us": -1}, ("-1", "0 to 10000000")),
        ({"latency_us": 10**8}, (str(10**8), "0 to 10000000")),
        ({"max_buffer_length": 100}, ("100", "16384")),
        ({"recommended_working_set": 0}, ("0", "at least 1")),
    ],
    ids=["macos-10", "macos-str", "latency-negative", "latency-huge", "max-length-tiny", "working-set-0"],
)
def test_configure_refuses_out_of_range_values(kwargs, fragments):
    with pytest.raises(mlxbuf.InvalidArgument) as exc:
        metalsim.configure(**kwargs)
    assert_names(exc, *fragments)


@needs_sim
def test_fail_next_and_register_kernel_check_their_arguments():
    with pytest.raises(mlxbuf.InvalidArgument) as exc:
        metalsim.fail_next("gpu")
    assert_names(exc, "'gpu'", "'new_buffer'")
    with pytest.raises(mlxbuf.InvalidArgument) as exc:
        metalsim.fail_next("library", -1)
    assert_names(exc, "-1")
    with pytest.raises(mlxbuf.InvalidArgument) as exc:
        metalsim.register_kernel("", add_one)
    assert_names(exc, "''")
    with pytest.raises(mlxbuf.InvalidArgument) as exc:
        metalsim.register_kernel("k", 42)
    assert_names(exc, "42")


@needs_sim
def test_configure_applies_to_devices_opened_afterwards(sim):
    metalsim.configure(max_buffer_length=1 << 30, recommended_working_set=3 << 30)
    dev = mlxbuf.Device("metal")
    assert dev.max_buffer_length == 1 << 30
    assert dev.recommended_max_working_set_size == 3 << 30
    assert sim.max_buffer_length != 1 << 30
    with pytest.raises(mlxbuf.InvalidArgument) as exc:
        dev.alloc_buffer((1 << 30) + 1, "u8", (1,))
    assert_names(exc, str((1 << 30) + 1))
    healthy(dev)


@needs_sim
def test_simulated_macos_14_runs_with_residency_off(sim):
    metalsim.configure(macos_version=14)
    dev = mlxbuf.Device("metal")
    assert "macOS 14" in dev.name
    assert not dev.residency_sets_enabled
    assert "macOS 15" in dev.residency_disabled_reason
    healthy(dev)


@needs_sim
def test_latency_keeps_a_committed_command_buffer_in_flight(sim):
    metalsim.configure(latency_us=300_000)
    dev = mlxbuf.Device("metal")
    a = dev.alloc_buffer(64, "u8", (64,))
    enc = dev.command_encoder()
    enc.fill(a, 7)
    enc.commit()
    assert enc.status == "committed"
    enc.wait()
    assert enc.status == "completed" and (a.numpy() == 7).all()


# ---- fault knobs through mlxbuf ------------------------------------------------------------


@needs_sim
def test_fault_new_buffer(sim):
    # Two: Device.alloc_buffer collects garbage and retries once.
    metalsim.fail_next("new_buffer", 2)
    with pytest.raises(mlxbuf.BufferAllocationError) as exc:
        sim.alloc_buffer(4096, "u8", (4096,))
    assert_names(exc, "4096", "Metal returned no buffer")
    healthy(sim)


@needs_sim
def test_fault_command_buffer(sim):
    a = sim.alloc_buffer(64, "u8", (64,))
    metalsim.fail_next("command_buffer")
    enc = sim.command_encoder()
    enc.fill(a, 9)
    with pytest.raises(mlxbuf.CommandBufferError) as exc:
        enc.commit_and_wait()
    assert_names(exc, "simulated GPU fault", "MTLCommandBufferError 1")
    assert enc.status == "error"
    assert not a.numpy().any()
    healthy(sim)


@needs_sim
def test_fault_residency_set_at_open_turns_residency_off(sim):
    metalsim.fail_next("residency_set")
    dev = mlxbuf.Device("metal")
    assert not dev.residency_sets_enabled
    assert "could not be created" in dev.residency_disabled_reason
    healthy(dev)
    assert mlxbuf.Device("metal").residency_sets_enabled


@needs_sim
def test_fault_residency_set_on_first_registration(sim):
    metalsim.fail_next("residency_set")
    with pytest.raises(mlxbuf.ResidencySetError) as exc:
        sim.alloc_buffer(4096, "u8", (4096,))
    assert_names(exc, "could not be created")
    healthy(sim)


@needs_sim
def test_fault_library(sim):
    metalsim.fail_next("library")
    with pytest.raises(mlxbuf.ShaderCompilationError) as exc:
        sim.compile_library(ADD_SOURCE, name="lib")
    assert_names(exc, "lib", "compiler service")
    healthy(sim)


@needs_sim
def test_fault_count_and_disarm(sim):
    metalsim.fail_next("new_buffer", 4)  # each alloc_buffer tries twice
    for _ in range(2):
        with pytest.raises(mlxbuf.BufferAllocationError):
            sim.alloc_buffer(64, "u8", (64,))
    sim.alloc_buffer(64, "u8", (64,))
    metalsim.fail_next("new_buffer", 5)
    metalsim.fail_next("new_buffer", 0)
    sim.alloc_buffer(64, "u8", (64,))


@needs_sim
@pytest.mark.parametrize(
    "selector, error, fragments",
    [
        ("commit", mlxbuf.CommandBufferError, ("simulated exception", "commit")),
        ("addCompletedHandler:", mlxbuf.CommandBufferError, ("simulated exception", "addCompletedHandler:")),
        ("blitCommandEncoder", mlxbuf.CommandBufferError, ("simulated exception", "blitCommandEncoder")),
        ("newBufferWithLength:options:", mlxbuf.BufferAllocationError, ("simulated exception",)),
        ("newLibraryWithSource:options:error:", mlxbuf.ShaderCompilationError, ("simulated exception",)),
    ],
)
def test_raise_knob_becomes_the_documented_error(sim, selector, error, fragments):
    """A Metal call raising an NSException surfaces as an mlxbuf error, not a crash."""
    a = sim.alloc_buffer(4096, "u8", (4096,))
    b = sim.alloc_buffer(4096, "u8", (4096,))
    # Nothing pending, so commit sends no residency-set commit (which
    # shares the selector), and Device.alloc_buffer retries once.
    sim.residency_set.flush_pending()
    assert lib.msim_raise_next(selector.encode(), 2) == 0
    with pytest.raises(error) as exc:
        if error is mlxbuf.BufferAllocationError:
            sim.alloc_buffer(4096, "u8", (4096,))
        elif error is mlxbuf.ShaderCompilationError:
            sim.compile_library(ADD_SOURCE)
        else:
            with sim.command_encoder() as enc:
                enc.copy(a, b)
    assert_names(exc, *fragments)
    assert lib.msim_raise_next(selector.encode(), 0) == 0
    del a, b
    healthy(sim)


@needs_sim
def test_nil_default_device_knob(sim):
    lib.msim_set_default_device_nil(1)
    with pytest.raises(mlxbuf.DeviceNotFound) as exc:
        mlxbuf.Device("metal")
    assert_names(exc, "MTLCreateSystemDefaultDevice")
    lib.msim_set_default_device_nil(0)
    healthy(mlxbuf.Device("metal"))


# ---- register_kernel ------------------------------------------------------------------------


@needs_sim
def test_kernels_run_in_queue_order_with_their_arguments(sim):
    seen = []

    def record(grid, threadgroup, buffers, constants):
        seen.append((grid, threadgroup, [len(b) for b in buffers], constants))
        buffers[0][0] = len(seen)

    src = "kernel void record(device uchar *out [[buffer(0)]], constant uint &k [[buffer(1)]]) {}"
    metalsim.register_kernel("record", record)
    kernel = sim.compile_library(src).kernel("record")
    out = sim.alloc_buffer(64, "u8", (64,))
    encoders = []
    for i in range(3):
        enc = sim.command_encoder()
        enc.dispatch(kernel, (8, 2), (4, 1), buffers=[out.slice_view(4 * i, 4)], constants=[i])
        enc.commit()
        encoders.append(enc)
    for enc in encoders:
        enc.wait()
    assert [s[3] for s in seen] == [i.to_bytes(4, "little") for i in range(3)]
    # Each binding spans to the end of the MTLBuffer (a whole page here).
    assert seen[0][:3] == ((8, 2, 1), (4, 1, 1), [4096])
    assert [s[2] for s in seen] == [[4096], [4092], [4088]]
    assert out.numpy()[[0, 4, 8]].tolist() == [1, 2, 3]


@needs_sim
def test_a_failing_kernel_fails_its_command_buffer(sim):
    def broken(grid, threadgroup, buffers, constants):
        raise ValueError("reference kernel says no")

    metalsim.register_kernel("add_one", broken)
    a = sim.alloc_buffer(64, "f32", (16,))
    kernel = sim.compile_library(ADD_SOURCE).kernel("add_one")
    with pytest.raises(mlxbuf.CommandBufferError) as exc:
        with sim.command_encoder() as enc:
            enc.dispatch(kernel, 16, 16, buffers=[a, a])
    assert_names(exc, "ValueError", "reference kernel says no", "add_one")


@needs_sim
def test_a_kernel_without_implementation_is_a_validation_error(sim, metalsim_validation):
    metalsim.register_kernel("add_one", None)
    a = sim.alloc_buffer(64, "f32", (16,))
    kernel = sim.compile_library(ADD_SOURCE).kernel("add_one")
    with pytest.raises(mlxbuf.CommandBufferError) as exc:
        with sim.command_encoder() as enc:
            enc.dispatch(kernel, 16, 16, buffers=[a, a])
    assert_names(exc, "add_one", "no implementation")
    messages = metalsim_validation.take()
    assert len(messages) == 1 and messages[0].startswith("[no-kernel-implementation]")


@needs_sim
def test_read_only_memory_reaches_kernels_read_only(sim, tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(bytes(range(256)) * 64)
    weights = sim.map_file(path)
    out = sim.alloc_buffer(4096, "u8", (4096,))
    flags = []

    def copy_first(grid, threadgroup, buffers, constants):
        flags.append((buffers[0].flags.writeable, buffers[1].flags.writeable))
        buffers[1][:16] = buffers[0][:16]

    metalsim.register_kernel("copy_first", copy_first)
    src = "kernel void copy_first(device const uchar *w [[buffer(0)]], device uchar *o [[buffer(1)]]) {}"
    kernel = sim.compile_library(src).kernel("copy_first")
    with sim.command_encoder() as enc:
        enc.dispatch(kernel, 1, 1, buffers=[weights, out])
    assert flags == [(False, True)]
    assert out.numpy()[:16].tolist() == list(range(16))


# ---- what the simulator found in metal.m -----------------------------------------------------


@needs_sim
def test_dependent_blits_get_their_own_encoder_independent_ones_share_one(sim):
    """Regression: dependent copies and fills of one command buffer went to
    one blit encoder, whose commands Metal does not order (the simulator
    reports [blit-hazard]); now a dependent one starts a new encoder."""
    a, b, c = (sim.alloc_buffer(4096, "u32", (1024,)) for _ in range(3))
    a.numpy()[:] = np.arange(1024, dtype=np.uint32)
    before = metalsim.stats()["encoders_created"]
    with sim.command_encoder() as enc:  # independent: one encoder
        enc.fill(b, 1)
        enc.fill(c, 2)
    assert metalsim.stats()["encoders_created"] - before == 1
    before = metalsim.stats()["encoders_created"]
    with sim.command_encoder() as enc:  # read after write: a -> b -> c
        enc.copy(a, b)
        enc.copy(b, c)
    assert metalsim.stats()["encoders_created"] - before == 2
    np.testing.assert_array_equal(c.numpy(), np.arange(1024, dtype=np.uint32))
    before = metalsim.stats()["encoders_created"]
    with sim.command_encoder() as enc:  # write after read, write after write
        enc.copy(c, b)
        enc.fill(c.slice_view(2048, 4), 0)  # elements 512..515
        enc.fill(c.slice_view(2048, 4), 0xFF)
    assert metalsim.stats()["encoders_created"] - before == 3
    np.testing.assert_array_equal(b.numpy(), np.arange(1024, dtype=np.uint32))
    assert c.numpy()[512:516].tolist() == [0xFFFFFFFF] * 4


# ---- the figures the README quotes --------------------------------------------------------


@needs_sim
def test_decode_token_costs_one_native_residency_commit(sim):
    """440 scratch allocations + 440 drops + 1 submission: the simulator
    counts the native commit calls on MTLResidencySet."""
    src = sim.alloc_buffer(256, "u8", (256,))
    dst = sim.alloc_buffer(256, "u8", (256,))
    sim.residency_set.flush_pending()
    before = metalsim.stats()
    scratch = [sim.alloc_buffer(4096, "f32", (1024,)) for _ in range(440)]
    del scratch
    with sim.command_encoder() as enc:
        enc.copy(src, dst)
    after = metalsim.stats()
    assert after["residency_commits"] - before["residency_commits"] == 1
    assert after["residency_adds"] - before["residency_adds"] == 440
    assert after["residency_removes"] - before["residency_removes"] == 440


@needs_sim
def test_pooled_steady_state_costs_no_native_residency_commit(sim):
    pool = mlxbuf.BufferPool(sim)
    src = sim.alloc_buffer(256, "u8", (256,))
    dst = sim.alloc_buffer(256, "u8", (256,))

    def token():
        scratch = [pool.alloc(4096, "f32", (1024,)) for _ in range(32)]
        with sim.command_encoder() as enc:
            enc.copy(src, dst)
        del scratch

    token()
    before = metalsim.stats()
    for _ in range(20):
        token()
    after = metalsim.stats()
    assert after["residency_commits"] == before["residency_commits"]
    assert after["residency_adds"] == before["residency_adds"]
    pool.close()
