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

import ctypes
import gc
import os
import pathlib
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import mlxbuf
from mlxbuf import metalsim
from mlxbuf._cmetal import ffi, lib
from support import assert_names, page_aligned_array, page_aligned_ctypes, wait_until_released

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
    with pytest.raises(mlxbuf.BufferAllocationError) as exc:
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
def test_latency_delays_every_command_buffer(sim):
    """The GPU thread holds each command buffer latency_us before running it,
    so wait() cannot return sooner (a lower bound, not a measurement)."""
    metalsim.configure(latency_us=200_000)
    dev = mlxbuf.Device("metal")
    a = dev.alloc_buffer(64, "u8", (64,))
    began = time.monotonic()
    for value in (7, 8):
        with dev.command_encoder() as enc:
            enc.fill(a, value)
    assert time.monotonic() - began >= 0.4
    assert (a.numpy() == 8).all()


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
@pytest.mark.metal_exception
@pytest.mark.parametrize(
    "selector, error, fragments",
    [
        ("commit", mlxbuf.CommandBufferError, ("simulated exception", "commit")),
        ("commandBuffer", mlxbuf.CommandBufferError, ("simulated exception", "creating a command buffer")),
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
def test_a_nil_default_device_falls_back_to_the_listed_gpu(sim):
    """MTLCreateSystemDefaultDevice() returns nil in a command-line process
    without CoreGraphics; MTLCopyAllDevices() still lists the GPU, and the
    device opens on it (the same MTLDevice the default would have been)."""
    lib.msim_set_default_device_nil(1)
    try:
        assert lib.cm_backend_available(lib.CM_BACKEND_METAL)
        dev = mlxbuf.Device("metal")
        assert dev.registry_id == sim.registry_id and "simulated" in dev.name
        healthy(dev)
    finally:
        lib.msim_set_default_device_nil(0)


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
        enc.dispatch(kernel, 1, 1, buffers=[weights, out], writes=[1])
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


# ---- the Metal backend's other paths, through the simulator's knobs -------------------------
#
# What a Mac does rarely (memory Metal hands back unaligned, an exception
# from a Metal call, a foreign or non-Shared MTLBuffer) the simulator can
# provoke; each test sees mlxbuf's documented outcome and a healthy device.


@needs_sim
def test_unaligned_metal_memory_falls_back_to_a_page_aligned_mapping(sim):
    """newBufferWithLength: promises no page alignment; mlxbuf then maps
    memory itself and wraps it, freeing it from the buffer's deallocator."""
    lib.msim_misalign_next(1)
    before = metalsim.stats()
    buf = sim.alloc_buffer(4096, "u8", (4096,))
    assert buf.data_ptr % sim.page_size == 0
    buf.numpy()[:] = 7
    out = sim.alloc_buffer(4096, "u8", (4096,))
    with sim.command_encoder() as enc:
        enc.copy(buf, out)
    assert (out.numpy() == 7).all()
    after = metalsim.stats()
    assert after["buffers_created"] - before["buffers_created"] == 3  # the unaligned one, its stand-in, out
    del buf
    gc.collect()
    sim.residency_set.flush_pending()  # the set let go: the deallocator unmaps
    assert metalsim.stats()["deallocators_run"] == after["deallocators_run"] + 1
    healthy(sim)


@needs_sim
def test_unaligned_metal_memory_beyond_the_maximum_fails_cleanly(sim):
    metalsim.configure(max_buffer_length=20000)
    dev = mlxbuf.Device("metal")
    lib.msim_misalign_next(2)  # alloc_buffer tries twice
    with pytest.raises(mlxbuf.BufferAllocationError) as exc:
        dev.alloc_buffer(19000, "u8", (19000,))
    assert_names(exc, "page-aligned", "maximum buffer length")
    assert dev.alloc_buffer(19000, "u8", (19000,)).byte_len == 19000


@needs_sim
@pytest.mark.metal_exception
def test_exception_in_the_mapped_fallback(sim):
    lib.msim_misalign_next(2)
    lib.msim_raise_next(b"newBufferWithBytesNoCopy:length:options:deallocator:", 2)
    with pytest.raises(mlxbuf.BufferAllocationError) as exc:
        sim.alloc_buffer(4096, "u8", (4096,))
    assert_names(exc, "Metal raised", "simulated exception")
    healthy(sim)


@pytest.fixture
def handles():
    """Metal objects made outside mlxbuf; their own references go at the end."""
    made = []
    yield made
    for h in made:
        lib.msim_release(h)


@needs_sim
@pytest.mark.parametrize("options, heap", [(0, 0), (256, 0), (0, 1 << 20)], ids=["shared", "untracked", "heap"])
def test_from_raw_adopts_an_mtlbuffer_made_elsewhere(sim, handles, options, heap):
    handles.append(lib.msim_new_buffer(4096, options, heap))
    buf = mlxbuf.Buffer.from_raw(sim, handles[-1], dtype="u32")
    assert buf.shape == (1024,) and buf.storage_kind == "external"
    buf.numpy()[:] = np.arange(1024, dtype=np.uint32)
    out = sim.alloc_buffer(4096, "u32", (1024,))
    with sim.command_encoder() as enc:
        enc.copy(buf, out)
    np.testing.assert_array_equal(out.numpy(), np.arange(1024, dtype=np.uint32))


@needs_sim
@pytest.mark.parametrize(
    "make, error, fragments",
    [
        (lambda: lib.msim_new_fence(), mlxbuf.InvalidArgument, ("is not an MTLBuffer",)),
        (lambda: lib.msim_new_buffer(4096, 32, 0), mlxbuf.Unsupported, ("Private storage",)),
        (lambda: lib.msim_new_buffer(4096, 16, 0), mlxbuf.Unsupported, ("Managed storage",)),
    ],
    ids=["not-a-buffer", "private", "managed"],
)
def test_from_raw_refuses_what_it_cannot_view(sim, handles, make, error, fragments):
    handles.append(make())
    with pytest.raises(error) as exc:
        mlxbuf.Buffer.from_raw(sim, handles[-1])
    assert_names(exc, hex(handles[-1]), *fragments)
    healthy(sim)


@needs_sim
def test_from_raw_refuses_a_buffer_of_another_device(sim, handles):
    handles.append(lib.msim_new_buffer(4096, 0, 0))  # on sim's MTLDevice
    metalsim.configure(recommended_working_set=1 << 30)  # the next device is another MTLDevice
    other = mlxbuf.Device("metal")
    with pytest.raises(mlxbuf.InvalidArgument) as exc:
        mlxbuf.Buffer.from_raw(other, handles[-1])
    assert_names(exc, "belongs to Metal device registryID", hex(other.registry_id))
    assert mlxbuf.Buffer.from_raw(sim, handles[-1]).byte_len == 4096


@needs_sim
@pytest.mark.metal_exception
def test_exception_while_adopting(sim, handles):
    handles.append(lib.msim_new_buffer(4096, 0, 0))
    lib.msim_raise_next(b"storageMode", 1)
    with pytest.raises(mlxbuf.InvalidArgument) as exc:
        mlxbuf.Buffer.from_raw(sim, handles[-1])
    assert_names(exc, "Metal raised", "storageMode")
    assert mlxbuf.Buffer.from_raw(sim, handles[-1]).byte_len == 4096


@needs_sim
def test_wrapping_beyond_the_device_maximum(sim):
    metalsim.configure(max_buffer_length=16384)
    dev = mlxbuf.Device("metal")
    array = page_aligned_array(65536, np.uint8, 16384)
    with pytest.raises(mlxbuf.BufferAllocationError) as exc:
        dev.from_numpy(array, copy=False)
    assert_names(exc, "cannot wrap", "maximum buffer length")


@needs_sim
@pytest.mark.metal_exception
@pytest.mark.parametrize("knob", ["nil", "raise"])
def test_metal_refusing_to_wrap_memory(sim, knob):
    array = page_aligned_array(4096, np.uint8, 16384)
    if knob == "nil":
        metalsim.fail_next("new_buffer")
    else:
        lib.msim_raise_next(b"newBufferWithBytesNoCopy:length:options:deallocator:", 1)
    with pytest.raises(BufferError) as exc:
        sim.from_numpy(array, copy=False)
    assert_names(exc, "returned nil" if knob == "nil" else "Metal raised")
    assert sim.from_numpy(array, copy=False).data_ptr == array.ctypes.data


@needs_sim
@pytest.mark.metal_exception
def test_residency_set_exceptions_become_residency_set_errors(sim):
    """What a residency set raises is a ResidencySetError naming Metal's
    reason: at once when a call can report it (an add, an explicit commit,
    a submission's commit), else (a removal staged by a dying buffer, a
    commit by the threshold, a keep-alive request) from the next commit,
    which first redoes the work: nothing stays half-registered."""
    rs = sim.residency_set
    rs.set_release_policy(1 << 40, 0)
    base = metalsim.stats()["residency_members"]
    keep = sim.alloc_buffer(4096, "u8", (4096,))
    rs.flush_pending()

    # An add: the allocation fails and leaves nothing behind.
    active = sim.active_memory
    lib.msim_raise_next(b"addAllocation:", 1)
    with pytest.raises(mlxbuf.ResidencySetError) as exc:
        sim.alloc_buffer(4096, "u8", (4096,))
    assert_names(exc, "addAllocation:", "simulated exception")
    assert sim.active_memory == active and rs.allocation_count == 1

    # An explicit commit: the shard stays pending, the next commit applies it.
    buf = sim.alloc_buffer(4096, "u8", (4096,))
    lib.msim_raise_next(b"commit", 1)
    with pytest.raises(mlxbuf.ResidencySetError) as exc:
        rs.flush_pending()
    assert_names(exc, "commit", "simulated exception")
    assert rs.pending
    assert rs.flush_pending() is True
    assert metalsim.stats()["residency_members"] == base + 2

    # A submission's commit: nothing is submitted; committing again works.
    other = sim.alloc_buffer(4096, "u8", (4096,))
    enc = sim.command_encoder()
    enc.fill(other, 5)
    lib.msim_raise_next(b"commit", 1)
    with pytest.raises(mlxbuf.ResidencySetError):
        enc.commit()
    assert enc.status == "not_committed"
    enc.commit_and_wait()
    assert (other.numpy() == 5).all()
    del other
    rs.flush_pending()

    # A removal: recorded; the next commit stages it again, commits, gives
    # the memory back, and then reports it.
    lib.msim_raise_next(b"removeAllocation:", 1)
    del buf
    assert rs.pending_release_count == 1 and rs.allocation_count == 2  # still a member
    with pytest.raises(mlxbuf.ResidencySetError) as exc:
        rs.flush_pending()
    assert_names(exc, "removing a freed buffer", "failed earlier", "removeAllocation:")
    assert rs.pending_release_count == 0 and rs.allocation_count == 1
    assert metalsim.stats()["residency_members"] == base + 1
    assert metalsim.stats()["residency_held_bytes"] == 0
    assert rs.flush_pending() is False  # reported once

    # A commit by the release threshold: recorded, retried, reported.
    rs.release_threshold_bytes = 0
    lib.msim_raise_next(b"commit", 1)
    dead = sim.alloc_buffer(4096, "u8", (4096,))
    del dead  # past the threshold: commits here, and Metal raises
    assert rs.pending_release_count == 1
    with pytest.raises(mlxbuf.ResidencySetError) as exc:
        with sim.command_encoder() as enc:
            enc.fill(keep, 1)
    assert_names(exc, "residency commit made to release freed memory", "failed earlier")
    assert rs.pending_release_count == 0 and not rs.pending
    with sim.command_encoder() as enc:  # the failure was reported once
        enc.fill(keep, 1)

    # A keep-alive request: reported by the next commit. The submission
    # comes first, so that the keep-alive thread requests as soon as it is
    # switched on, and no submission races its failure.
    sim.command_encoder().commit_and_wait()
    raised = metalsim.stats()["exceptions_raised"]
    lib.msim_raise_next(b"requestResidency", 1)
    sim.set_residency_keepalive(30, 0.001)
    deadline = time.monotonic() + 30
    while metalsim.stats()["exceptions_raised"] == raised and time.monotonic() < deadline:
        time.sleep(0.005)
    sim.set_residency_keepalive(0)
    with pytest.raises(mlxbuf.ResidencySetError) as exc:
        rs.commit()
    assert_names(exc, "keep-alive residency request", "requestResidency")
    rs.commit()
    lib.msim_reset_faults()
    del keep
    healthy(sim)

    # At teardown nobody is left to tell: what Metal raises stays inside.
    for selector in (b"removeResidencySet:", b"endResidency", b"removeAllAllocations"):
        dev = mlxbuf.Device("metal")
        dev.alloc_buffer(64, "u8", (64,))
        lib.msim_raise_next(selector, 1)
        del dev  # device teardown destroys the sets
        gc.collect()
        lib.msim_raise_next(selector, 0)


# ---- deferred release, one membership per allocation, wrapped memory ---------------------


@needs_sim
def test_freed_memory_stays_held_only_until_the_idle_timeout(sim, tmp_path):
    """A program frees a file mapping and a buffer and stops submitting: the
    residency set lets go, and the memory goes back, after the idle timeout
    (before deferred release they stayed held until a submission that never
    came). A bounded wait: it fails only if that never happens."""
    rs = sim.residency_set
    rs.set_release_policy(1 << 40, 0.01)
    path = tmp_path / "weights.bin"
    path.write_bytes(bytes(1 << 20))
    mapped = sim.map_file(path)
    buf = sim.alloc_buffer(1 << 20, "u8", (1 << 20,))
    rs.flush_pending()
    before = metalsim.stats()
    del mapped, buf
    wait_until_released(sim)
    after = metalsim.stats()
    assert after["live_buffers"] == before["live_buffers"] - 2
    assert after["residency_held_bytes"] == 0
    assert after["residency_members"] == before["residency_members"] - 2
    assert after["deallocators_run"] == before["deallocators_run"] + 1  # the mapping's
    assert after["nocopy_unmapped_before_release"] == 0
    with open("/proc/self/maps") as f:
        assert str(path) not in f.read()


@needs_sim
def test_the_native_buffer_outlives_its_storage_until_the_removal_is_committed(sim):
    """Whatever Metal does with a set's members, mlxbuf itself keeps a
    freed storage's MTLBuffer until the commit that removes it."""
    rs = sim.residency_set
    rs.set_release_policy(1 << 40, 0)
    buf = sim.alloc_buffer(1 << 16, "u8", (1,))
    rs.flush_pending()
    live = metalsim.stats()["live_buffers"]
    frees = sim.stats().free_count
    del buf
    assert metalsim.stats()["live_buffers"] == live and sim.stats().free_count == frees
    assert sim.stats().current_allocated_size >= 1 << 16
    rs.flush_pending()
    assert metalsim.stats()["live_buffers"] == live - 1 and sim.stats().free_count == frees + 1
    assert metalsim.stats()["residency_held_bytes"] == 0


@needs_sim
def test_one_mtlbuffer_adopted_twice_is_one_member(sim, handles):
    """Two storages over one MTLBuffer share one membership (the set ignores
    a second add and one remove ends it): removing one must not evict the
    other, and the set counts the MTLBuffer once."""
    rs = sim.residency_set
    pool = mlxbuf.BufferPool(sim)
    handles.append(lib.msim_new_buffer(4096, 0, 0))
    x = mlxbuf.Buffer.from_raw(sim, handles[-1])
    y = mlxbuf.Buffer.from_raw(sim, handles[-1])
    base = (rs.allocation_count, rs.allocated_size, metalsim.stats()["residency_members"])
    pool.register_existing(x)
    pool.register_existing(y)
    assert rs.allocation_count == base[0] + 1 and rs.info().staged_adds == 1
    assert rs.allocated_size == base[1] + x.allocated_size == base[1] + 16384
    rs.flush_pending()
    assert metalsim.stats()["residency_members"] == base[2] + 1
    del x
    gc.collect()
    assert rs.contains(y) and rs.allocation_count == base[0] + 1
    rs.flush_pending()
    assert metalsim.stats()["residency_members"] == base[2] + 1  # still resident
    z = mlxbuf.Buffer.from_raw(sim, handles[-1])  # not registered itself
    assert rs.contains(z)  # its MTLBuffer is in the set
    del y
    gc.collect()
    assert not rs.contains(z) and rs.allocation_count == base[0]
    rs.flush_pending()
    assert metalsim.stats()["residency_members"] == base[2]
    del z


@needs_sim
def test_a_heap_buffer_makes_its_whole_heap_resident(sim, handles):
    """A buffer cut from a heap is resident as the whole heap: the set's
    member is the heap, counted at the heap's size, once however many
    storages use it."""
    rs = sim.residency_set
    pool = mlxbuf.BufferPool(sim)
    handles.append(lib.msim_new_buffer(4096, 0, 1 << 20))
    x = mlxbuf.Buffer.from_raw(sim, handles[-1])
    y = mlxbuf.Buffer.from_raw(sim, handles[-1])
    count, size = rs.allocation_count, rs.allocated_size
    pool.register_existing(x)
    pool.register_existing(y)
    assert rs.allocation_count == count + 1
    assert rs.allocated_size == size + (1 << 20)
    rs.flush_pending()
    members = metalsim.stats()["residency_members"]
    del x
    gc.collect()
    rs.flush_pending()
    assert rs.contains(y) and metalsim.stats()["residency_members"] == members
    del y
    gc.collect()
    rs.flush_pending()
    assert rs.allocation_count == count and rs.allocated_size == size
    assert metalsim.stats()["residency_members"] == members - 1


@needs_sim
def test_wrapped_memory_goes_back_when_the_mtlbuffer_dies(sim):
    """External memory and file mappings are released from the MTLBuffer's
    deallocator, exactly once: a command buffer that used the storage still
    holds the buffer after the storage died, and the memory must outlive
    that (before, mlxbuf released it right after dropping its own
    reference, while Metal could still touch it)."""
    released = []

    class Owner:
        def __init__(self, memory):
            self.memory = memory

        def __del__(self):
            self.memory = None  # unmaps the memory
            released.append(True)

    before = metalsim.stats()
    for _ in range(3):
        memory = page_aligned_ctypes(1 << 16)
        ext = mlxbuf.Buffer.from_raw(sim, ctypes.addressof(memory), 1 << 16, owner=Owner(memory))
        del memory
        enc = sim.command_encoder()
        enc.fill(ext, 7)
        del ext  # the command buffer holds the storage, Metal the MTLBuffer
        enc.commit_and_wait()
        lib.msim_drain()
    # Whichever thread drops Metal's last reference runs the deallocator,
    # possibly a moment after the command buffer completed (on Metal as
    # in the simulator, whose GPU thread may hold one until its
    # autorelease pool drains). A bounded wait: it fails only if the
    # memory never goes back.
    deadline = time.monotonic() + 30
    while len(released) < 3 and time.monotonic() < deadline:
        time.sleep(0.002)
    after = metalsim.stats()
    assert released == [True] * 3
    assert after["deallocators_run"] - before["deallocators_run"] == 3
    assert after["nocopy_unmapped_before_release"] == before["nocopy_unmapped_before_release"] == 0
    assert after["live_buffers"] == before["live_buffers"]


@needs_sim
def test_small_allocations_count_whole_metal_pages(sim):
    """Metal gives a 64-byte buffer a whole 16 KiB page (allocatedSize): the
    device's figures and its memory limit count that, not the 64 bytes."""
    before = sim.stats().current_allocated_size
    buf = sim.alloc_buffer(64, "u8", (64,))
    assert (buf.byte_len, buf.allocated_size) == (64, lib.MSIM_PAGE_SIZE)
    assert sim.active_memory == lib.MSIM_PAGE_SIZE
    assert sim.stats().current_allocated_size - before == lib.MSIM_PAGE_SIZE
    assert sim.residency_set.allocated_size == lib.MSIM_PAGE_SIZE
    # Room for two Metal pages and one page of the process: the third
    # buffer fits what the process's page size predicts, not what Metal
    # takes for it.
    assert sim.page_size < lib.MSIM_PAGE_SIZE
    limit = 2 * lib.MSIM_PAGE_SIZE + sim.page_size
    sim.set_memory_limit(limit)
    try:
        second = sim.alloc_buffer(64, "u8", (64,))
        with pytest.raises(mlxbuf.BufferAllocationError) as exc:
            sim.alloc_buffer(64, "u8", (64,))
        assert_names(exc, "64 bytes", "it takes 16384 bytes", "32768 bytes in use", f"limit is {limit} bytes")
        assert sim.active_memory == 2 * lib.MSIM_PAGE_SIZE  # the refused one gave its page back
    finally:
        sim.set_memory_limit(None)
    pool = mlxbuf.BufferPool(sim, cache_limit=2 * lib.MSIM_PAGE_SIZE)
    small = [pool.alloc(64, "u8", (64,)) for _ in range(3)]
    s = pool.stats()
    assert (s.in_use_bytes, s.in_use_allocated_bytes) == (3 * 64, 3 * lib.MSIM_PAGE_SIZE)
    del small
    s = pool.stats()  # the cache holds what fits its limit in pages
    assert (s.free_count, s.free_bytes, s.free_allocated_bytes, s.evictions) == (2, 128, 2 * lib.MSIM_PAGE_SIZE, 1)
    assert sim.stats().cached_bytes == 2 * lib.MSIM_PAGE_SIZE
    del buf, second
    pool.close()


@needs_sim
@pytest.mark.metal_exception
def test_residency_set_creation_failures(sim):
    lib.msim_raise_next(b"newResidencySetWithDescriptor:error:", 1)
    with pytest.raises(mlxbuf.ResidencySetError) as exc:
        sim.alloc_buffer(64, "u8", (64,))
    assert_names(exc, "Metal raised", "creating residency set")
    lib.msim_raise_next(b"newResidencySetWithDescriptor:error:", 1)
    with pytest.raises(mlxbuf.DeviceNotFound) as exc:
        mlxbuf.Device("metal")  # the probe at open
    assert_names(exc, "Metal raised", "opening the device")
    dev = mlxbuf.Device("metal")
    metalsim.configure(macos_version=14)  # the OS changed under an open device
    with pytest.raises(mlxbuf.ResidencySetError) as exc:
        dev.alloc_buffer(64, "u8", (64,))
    assert_names(exc, "macOS 15")
    metalsim.configure()
    healthy(dev)


@needs_sim
@pytest.mark.metal_exception
def test_exception_while_opening_the_device(sim):
    lib.msim_raise_next(b"newCommandQueue", 1)
    with pytest.raises(mlxbuf.DeviceNotFound) as exc:
        mlxbuf.Device("metal")
    assert_names(exc, "Metal raised", "newCommandQueue")
    healthy(mlxbuf.Device("metal"))


@needs_sim
@pytest.mark.metal_exception
def test_kernel_lookup_failures(sim):
    empty = sim.compile_library("// no kernels here\n", name="empty")
    with pytest.raises(mlxbuf.KernelNotFound) as exc:
        empty.kernel("add_one")
    assert_names(exc, "add_one", "functions: none")
    lib.msim_raise_next(b"newFunctionWithName:", 1)
    with pytest.raises(mlxbuf.ShaderCompilationError) as exc:
        sim.compile_library(ADD_SOURCE).kernel("add_one")
    assert_names(exc, "Metal raised", "creating kernel 'add_one'")
    healthy(sim)


@needs_sim
def test_builtin_kernels_failing_to_compile(sim):
    a = sim.alloc_buffer(4096, "u8", (4096,))
    b = sim.alloc_buffer(4096, "u8", (4096,))
    metalsim.fail_next("library")
    with pytest.raises(mlxbuf.MlxError) as exc:
        with sim.command_encoder() as enc:
            enc.copy(a.slice_view(1, 100), b)  # unaligned: the byte kernel
    assert_names(exc, "built-in copy/fill kernels failed to compile")
    with sim.command_encoder() as enc:
        enc.copy(a.slice_view(1, 100), b)
    healthy(sim)


@needs_sim
def test_byte_kernels_and_blits_in_one_command_buffer(sim):
    a = sim.alloc_buffer(4096, "u8", (4096,))
    b = sim.alloc_buffer(4096, "u8", (4096,))
    a.numpy()[:] = np.arange(4096) % 251
    with sim.command_encoder() as enc:
        enc.fill(b.slice_view(3, 5), 9)       # byte kernel (compute encoder)
        enc.copy(a.slice_view(0, 64), b.slice_view(64, 64))  # blit after compute
        enc.fill(b.slice_view(200, 3), 4)     # compute again
    out = b.numpy()
    assert out[3:8].tolist() == [9] * 5 and out[200:203].tolist() == [4] * 3
    np.testing.assert_array_equal(out[64:128], a.numpy()[:64])


def overlapping_copy(sim, handles, src, dst, n=2000, options=0):
    """Copy n bytes from byte src to byte dst between two storages that
    adopted one MTLBuffer (only the native pointers show the overlap);
    check the bytes moved as by memmove."""
    handles.append(lib.msim_new_buffer(4096, options, 0))
    x = mlxbuf.Buffer.from_raw(sim, handles[-1])
    y = mlxbuf.Buffer.from_raw(sim, handles[-1])
    x.numpy()[:] = np.arange(4096) % 256
    expected = x.numpy()[src : src + n].copy()
    with sim.command_encoder() as enc:
        enc.copy(x.slice_view(src, n), y.slice_view(dst, n))
    np.testing.assert_array_equal(y.numpy()[dst : dst + n], expected)


@needs_sim
def test_unaligned_overlapping_copy_between_two_views_of_one_mtlbuffer(sim, handles):
    """The byte kernel's path: through a scratch buffer, memmove semantics."""
    overlapping_copy(sim, handles, 1, 3)


@needs_sim
def test_aligned_overlapping_copy_between_two_views_of_one_mtlbuffer(sim, handles):
    """Regression: the two blits through the scratch buffer (source to
    scratch, scratch to destination) went to one blit encoder, whose
    commands Metal does not order ([blit-hazard]); the second now starts a
    new encoder. The autouse check fails the test on any validation error."""
    before = metalsim.stats()["encoders_created"]
    overlapping_copy(sim, handles, 0, 4)
    assert metalsim.stats()["encoders_created"] - before == 2


@needs_sim
def test_the_readme_dispatch_example_runs():
    """README "Test your Metal dispatch code on Linux": the example as written."""
    readme = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("### Test your Metal dispatch code on Linux", 1)[1]
    code = section.split("```py\n", 1)[1].split("```", 1)[0]
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


@needs_sim
@pytest.mark.parametrize(
    "selector, operation, error, fragments",
    [
        ("commandBuffer", "aligned copy", mlxbuf.CommandBufferError, ("no command buffer",)),
        ("blitCommandEncoder", "aligned copy", mlxbuf.CommandBufferError, ("no blit command encoder",)),
        ("blitCommandEncoder", "aligned fill", mlxbuf.CommandBufferError, ("no blit command encoder",)),
        ("computeCommandEncoder", "unaligned copy", mlxbuf.CommandBufferError, ("no compute command encoder",)),
        ("computeCommandEncoder", "dispatch", mlxbuf.CommandBufferError, ("no compute command encoder",)),
        ("newFunctionWithName:", "unaligned copy", mlxbuf.MlxError, ("mlxbuf_copy_bytes is missing",)),
        ("newComputePipelineStateWithFunction:error:", "unaligned copy", mlxbuf.MlxError, ("has no pipeline",)),
        ("newComputePipelineStateWithFunction:options:reflection:error:", "kernel", mlxbuf.ShaderCompilationError,
         ("cannot build a compute pipeline for 'add_one'",)),
    ],
)
def test_metal_returning_nil(sim, selector, operation, error, fragments):
    """Where Apple declares a result nullable, nil becomes a documented error."""
    dev = mlxbuf.Device("metal")  # fresh: its built-in kernels are not compiled yet
    a = dev.alloc_buffer(4096, "f32", (1024,))
    b = dev.alloc_buffer(4096, "f32", (1024,))
    kernel = dev.compile_library(ADD_SOURCE).kernel("add_one") if operation == "dispatch" else None
    assert lib.msim_nil_next(selector.encode(), 1) == 0
    with pytest.raises(error) as exc:
        if operation == "kernel":
            dev.compile_library(ADD_SOURCE).kernel("add_one")
        else:
            with dev.command_encoder() as enc:
                if operation == "aligned copy":
                    enc.copy(a, b)
                elif operation == "aligned fill":
                    enc.fill(b, 3)
                elif operation == "unaligned copy":
                    enc.copy(a.slice_view(1, 100), b)
                else:
                    enc.dispatch(kernel, 1024, 32, buffers=[a, b])
    assert_names(exc, *fragments)
    healthy(dev)


@needs_sim
def test_metal_returning_no_command_queue(sim):
    assert lib.msim_nil_next(b"newCommandQueue", 1) == 0
    with pytest.raises(mlxbuf.DeviceNotFound) as exc:
        mlxbuf.Device("metal")
    assert_names(exc, "newCommandQueue returned nil")


@needs_sim
def test_no_scratch_buffer_for_an_overlapping_copy(sim, handles):
    handles.append(lib.msim_new_buffer(4096, 0, 0))
    x = mlxbuf.Buffer.from_raw(sim, handles[-1])
    y = mlxbuf.Buffer.from_raw(sim, handles[-1])
    assert lib.msim_nil_next(b"newBufferWithLength:options:", 1) == 0
    with pytest.raises(mlxbuf.BufferAllocationError) as exc:
        with sim.command_encoder() as enc:
            enc.copy(x.slice_view(1, 200), y.slice_view(3, 200))
    assert_names(exc, "scratch buffer for an overlapping copy")
    healthy(sim)


@needs_sim
def test_a_function_that_is_not_a_kernel(sim):
    src = ADD_SOURCE + "vertex float4 vmain(uint vid [[vertex_id]]) { return float4(0); }\n"
    library = sim.compile_library(src)
    with pytest.raises(mlxbuf.KernelNotFound) as exc:
        library.kernel("vmain")
    assert_names(exc, "vmain", "not a kernel function")
    assert library.kernel("add_one").name == "add_one"


@needs_sim
@pytest.mark.metal_exception
def test_exception_reading_the_status_of_a_finished_command_buffer(sim):
    a = sim.alloc_buffer(64, "u8", (64,))
    lib.msim_raise_next(b"status", 1)
    with pytest.raises(mlxbuf.CommandBufferError) as exc:
        with sim.command_encoder() as enc:
            enc.fill(a, 1)
    assert_names(exc, "Metal raised", "reading the command buffer's status")
    healthy(sim)


@needs_sim
@pytest.mark.metal_exception
def test_exception_ending_an_encoder(sim, metalsim_validation):
    """endEncoding raising twice (on the way out, then on the error path)
    fails the submission; the encoder never ended, which Metal reports."""
    a = sim.alloc_buffer(64, "u8", (64,))
    lib.msim_raise_next(b"endEncoding", 2)
    with pytest.raises(mlxbuf.CommandBufferError) as exc:
        with sim.command_encoder() as enc:
            enc.fill(a, 1)
    assert_names(exc, "Metal raised", "endEncoding")
    assert [m[:19] for m in metalsim_validation.take()] == ["[encoder-not-ended]"]
    healthy(sim)


@needs_sim
def test_sources_and_names_that_are_not_utf8_at_the_c_boundary(sim):
    out = ffi.new("cm_library_t **")
    assert lib.cm_library_compile(sim._handle, b"kernel void \xff() {}", 0, out) == lib.CM_ERR_INVALID_ARGUMENT
    assert b"not valid UTF-8" in ffi.string(lib.cm_last_error())
    library = sim.compile_library(ADD_SOURCE)
    kernel = ffi.new("cm_kernel_t **")
    assert lib.cm_library_kernel(library._handle, b"add_\xff", kernel) == lib.CM_ERR_INVALID_ARGUMENT
    assert b"kernel name is not valid UTF-8" in ffi.string(lib.cm_last_error())


@needs_sim
@pytest.mark.metal_exception
def test_an_exception_through_metal_m_leaks_nothing(sim):
    """Regression: metal.m was built without -fobjc-arc-exceptions, so an
    exception from a Metal call leaked the objects ARC held in the frames it
    unwound (here the command buffer and its encoder, which hold a and b)."""
    a = sim.alloc_buffer(4096, "u8", (4096,))
    b = sim.alloc_buffer(4096, "u8", (4096,))
    sim.residency_set.flush_pending()
    gc.collect()
    sim.synchronize()
    live = metalsim.stats()["live_buffers"]
    lib.msim_raise_next(b"copyFromBuffer:sourceOffset:toBuffer:destinationOffset:size:", 1)
    with pytest.raises(mlxbuf.CommandBufferError):
        with sim.command_encoder() as enc:
            enc.copy(a, b)
    del a, b, enc
    gc.collect()
    sim.synchronize()
    sim.residency_set.flush_pending()
    assert metalsim.stats()["live_buffers"] == live - 2


# ---- compile options --------------------------------------------------------------------


@needs_sim
@pytest.mark.parametrize("macos", [15, 14], ids=["mathMode", "fastMathEnabled"])
def test_libraries_compile_without_fast_math_unless_asked(sim, macos):
    """Regression: libraries were compiled with options nil, which is Metal's
    fast math. Now user libraries are IEEE unless compile_library is given
    fast_math=True, and so are the built-in byte kernels. macOS 15 sets
    mathMode, macOS 14 fastMathEnabled (mathMode does not exist there: the
    simulator reports a macos15-api error if it is sent)."""
    metalsim.configure(macos_version=macos)
    dev = mlxbuf.Device("metal")
    before = metalsim.stats()
    ieee = dev.compile_library(ADD_SOURCE, name="ieee")
    assert ieee.fast_math is False and repr(ieee) == "Library('ieee', device=metal)"
    fast = dev.compile_library(ADD_SOURCE, "fast", fast_math=True)
    assert fast.fast_math is True and repr(fast) == "Library('fast', fast_math=True, device=metal)"
    a = dev.alloc_buffer(64, "u8", (64,))
    b = dev.alloc_buffer(64, "u8", (64,))
    with dev.command_encoder() as enc:  # unaligned: compiles the byte kernels
        enc.copy(a.slice_view(1, 10), b)
    after = metalsim.stats()
    assert after["libraries_compiled"] - before["libraries_compiled"] == 3
    assert after["libraries_fast_math"] - before["libraries_fast_math"] == 1


# ---- a queue at Metal's limit of 64 uncompleted command buffers -------------------------


def _wait_for(predicate, what, seconds=30):
    """Poll until predicate() holds; fail naming `what` after `seconds`
    (a bound on a hang, not a timing measurement)."""
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {seconds} s")
        time.sleep(0.01)


def _finishes(fn, seconds=5):
    """Run fn in a thread; True when it returned within `seconds` (it would
    otherwise wait for something only the test releases later, or for the
    simulator's 10 s watchdog)."""
    done = threading.Event()

    def run():
        fn()
        done.set()

    threading.Thread(target=run, daemon=True).start()
    return done.wait(seconds)


def _hold_the_queue(sim, gate):
    """Commit 64 command buffers, the first held on the GPU until gate is
    set: the queue is then at Metal's limit of uncompleted command buffers."""
    metalsim.register_kernel("hold_gpu", lambda grid, threadgroup, buffers, constants: gate.wait(60))
    kernel = sim.compile_library("kernel void hold_gpu(device uint *x [[buffer(0)]]) {}").kernel("hold_gpu")
    encoders = [sim.command_encoder() for _ in range(64)]
    encoders[0].dispatch(kernel, 1, 1, buffers=[sim.alloc_buffer(64, "u32", (16,))])
    for enc in encoders:
        enc.commit()
    return encoders


@needs_sim
def test_a_commit_refused_after_waiting_for_the_queue_gives_its_command_buffer_back(sim):
    """The encoder is discarded by another thread while its commit waits for
    the queue: the commit is refused, and the Metal command buffer it got
    goes back uncommitted (its place in the queue with it)."""
    gate = threading.Event()
    target = sim.alloc_buffer(4096, "u8", (4096,))
    waiting = sim.command_encoder()
    waiting.fill(target, 9)
    outcome = []

    def commit():
        try:
            waiting.commit()
            outcome.append("committed")
        except mlxbuf.CommandBufferError as exc:
            outcome.append(str(exc))

    committer = threading.Thread(target=commit)
    try:
        encoders = _hold_the_queue(sim, gate)
        before = metalsim.stats()
        committer.start()
        _wait_for(lambda: metalsim.stats()["command_buffers_blocked"] > before["command_buffers_blocked"],
                  "the commit blocking")
        waiting.discard()
    finally:
        gate.set()
        committer.join(60)
    assert len(outcome) == 1 and "discarded" in outcome[0]
    for enc in encoders:
        enc.wait()
    after = metalsim.stats()
    assert after["command_buffers_created"] - before["command_buffers_created"] == 1
    assert after["command_buffers_committed"] == before["command_buffers_committed"]
    assert not target.numpy().any()
    with sim.command_encoder() as enc:
        enc.fill(target, 1)
    assert (target.numpy() == 1).all()


@needs_sim
def test_a_commit_waiting_for_a_full_queue_stalls_only_its_own_thread(sim):
    """Metal's commandBuffer blocks while the queue has 64 uncompleted
    command buffers. Regression: it was called under the command buffer's
    encoder lock and the device's submit lock, so while one commit waited
    for the GPU, reading that encoder and fork() (whose handler takes every
    device's submit lock) waited too. Now the Metal command buffer is made
    before the commit takes a lock. The GPU here is held by a kernel until
    the test lets it go, so a probe that waited would wait for good."""
    gate = threading.Event()
    target = sim.alloc_buffer(4096, "u32", (1024,))
    blocked = sim.command_encoder()
    blocked.fill(target, 7)
    committer = threading.Thread(target=blocked.commit)
    try:
        encoders = _hold_the_queue(sim, gate)
        before = metalsim.stats()["command_buffers_blocked"]
        committer.start()
        _wait_for(lambda: metalsim.stats()["command_buffers_blocked"] > before, "the 65th commit blocking")
        assert _finishes(lambda: blocked.op_count), "reading the blocked commit's encoder waited for the GPU"

        def fork_and_reap():
            pid = os.fork()
            if pid == 0:
                os._exit(0)
            os.waitpid(pid, 0)

        assert _finishes(fork_and_reap), "fork() waited for the GPU"
        assert blocked.status == "not_committed"
    finally:
        gate.set()
        committer.join(60)
    blocked.wait()
    for enc in encoders:
        enc.wait()
    assert (target.numpy() == 0x07070707).all()


# ---- untracked buffers: ordered by a fence within, an event across command buffers -------

UNTRACKED = 256  # MTLResourceHazardTrackingModeUntracked


def untracked_buffer(handles, nbytes=4096):
    """An untracked MTLBuffer made outside mlxbuf (as MLX makes them), on
    the current simulated device; adopt it with Buffer.from_raw."""
    handles.append(lib.msim_new_buffer(nbytes, UNTRACKED, 0))
    return handles[-1]


@needs_sim
def test_untracked_work_within_one_command_buffer_is_ordered(sim, handles):
    """Regression: Metal does not order encoders that share an untracked
    buffer, and mlxbuf did not either ([untracked-hazard]). Now every
    encoder with untracked work waits for a fence the one before updated."""
    x = mlxbuf.Buffer.from_raw(sim, untracked_buffer(handles), dtype="f32")
    out = sim.alloc_buffer(4096, "f32", (1024,))
    kernel = sim.compile_library(ADD_SOURCE).kernel("add_one")
    before = metalsim.stats()
    with sim.command_encoder() as enc:
        enc.fill(x, 0)                                # blit: writes x
        enc.dispatch(kernel, 4, 4, buffers=[x, out])  # compute: reads x
        enc.copy(out, x)                              # blit: writes x
        enc.dispatch(kernel, 4, 4, buffers=[x, out])  # compute: reads x
    after = metalsim.stats()
    assert after["encoders_created"] - before["encoders_created"] == 4
    assert after["fences_created"] - before["fences_created"] == 1
    assert x.numpy()[:4].tolist() == [1.0] * 4 and out.numpy()[:4].tolist() == [2.0] * 4


@needs_sim
def test_untracked_work_across_command_buffers_is_ordered(sim, handles):
    """Regression: two command buffers that share an untracked buffer ran
    unordered ([untracked-hazard]). Now each waits for the value the one
    before it signals on the device's shared event."""
    metalsim.configure(latency_us=50_000)  # the first is still in flight
    dev = mlxbuf.Device("metal")
    x = mlxbuf.Buffer.from_raw(dev, untracked_buffer(handles), dtype="u32")
    out = dev.alloc_buffer(4096, "u32", (1024,))
    before = metalsim.stats()
    first = dev.command_encoder()
    first.fill(x, 2)
    first.commit()
    second = dev.command_encoder()
    second.copy(x, out)
    second.commit()
    second.wait()
    first.wait()
    assert (out.numpy() == 0x02020202).all()
    # first: its signal; second: the wait for it, and its own signal
    assert metalsim.stats()["event_commands"] - before["event_commands"] == 3


@needs_sim
@pytest.mark.parametrize("src, dst", [(0, 4), (1, 3)], ids=["blits", "byte-kernel"])
def test_overlapping_copy_within_an_untracked_buffer(sim, handles, src, dst):
    """The copy through a scratch buffer takes two encoders for blits, which
    an untracked buffer needs a fence between."""
    overlapping_copy(sim, handles, src, dst, options=UNTRACKED)


@needs_sim
def test_tracked_work_pays_nothing_for_ordering(sim, handles):
    """Only submissions that touch an untracked storage get fences and events."""
    a = sim.alloc_buffer(4096, "f32", (1024,))
    b = sim.alloc_buffer(4096, "f32", (1024,))
    handles.append(lib.msim_new_buffer(4096, 0, 0))
    c = mlxbuf.Buffer.from_raw(sim, handles[-1], dtype="f32")  # adopted, tracked
    kernel = sim.compile_library(ADD_SOURCE).kernel("add_one")
    before = metalsim.stats()
    for _ in range(3):
        with sim.command_encoder() as enc:
            enc.fill(a, 1)
            enc.copy(a, b)
            enc.dispatch(kernel, 16, 16, buffers=[b, c])
            enc.copy(c.slice_view(2, 8), a)
    after = metalsim.stats()
    assert after["fences_created"] == before["fences_created"]
    assert after["event_commands"] == before["event_commands"]


@needs_sim
def test_a_failed_untracked_command_buffer_does_not_stall_the_next(sim, handles):
    """A command buffer that fails stops before its event signal; its
    completion sets the value from the CPU, so the next one, which waits
    for it, runs (else the GPU would wait for good: the simulator reports
    [event-wait-timeout] after 10 s)."""
    x = mlxbuf.Buffer.from_raw(sim, untracked_buffer(handles), dtype="u32")
    metalsim.fail_next("command_buffer")
    first = sim.command_encoder()
    first.fill(x, 3)
    first.commit()
    second = sim.command_encoder()
    second.fill(x, 4)
    second.commit()
    with pytest.raises(mlxbuf.CommandBufferError):
        first.wait()
    second.wait()
    assert (x.numpy() == 0x04040404).all()


@needs_sim
def test_untracked_submissions_from_many_threads_stay_ordered(sim, handles):
    """Eight threads commit 12 command buffers each on one untracked buffer
    without waiting in between: more than the queue's 64 uncompleted, so
    commits also wait for the GPU. Event values follow commit order, so
    every command buffer waits for the one committed before it and no
    access goes unordered; each thread's last copy holds its last fill."""
    metalsim.configure(latency_us=1000)
    dev = mlxbuf.Device("metal")
    x = mlxbuf.Buffer.from_raw(dev, untracked_buffer(handles), dtype="u8")
    outs = [dev.alloc_buffer(4096, "u8", (4096,)) for _ in range(8)]
    errors = []

    def worker(i):
        try:
            encoders = []
            for r in range(12):
                enc = dev.command_encoder()
                enc.fill(x, 16 * i + r)
                enc.copy(x, outs[i])
                enc.commit()
                encoders.append(enc)
            for enc in encoders:
                enc.wait()
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and not any(t.is_alive() for t in threads)
    for i, out in enumerate(outs):
        assert (out.numpy() == 16 * i + 11).all()


@needs_sim
@pytest.mark.parametrize(
    "selector, fragment",
    [("newSharedEvent", "no shared event"), ("newFence", "no fence")],
)
def test_metal_returning_no_ordering_object(sim, selector, fragment, handles):
    """Where Metal declares the event or the fence nullable, nil fails the
    submission with CommandBufferError, and the next submission orders."""
    dev = mlxbuf.Device("metal")  # fresh: no ordering event yet
    x = mlxbuf.Buffer.from_raw(dev, untracked_buffer(handles), dtype="u32")
    assert lib.msim_nil_next(selector.encode(), 1) == 0
    with pytest.raises(mlxbuf.CommandBufferError) as exc:
        with dev.command_encoder() as enc:
            enc.fill(x, 5)
    assert_names(exc, fragment, "untracked")
    with dev.command_encoder() as enc:
        enc.fill(x, 6)
    assert (x.numpy() == 0x06060606).all()
    healthy(dev)


@needs_sim
@pytest.mark.metal_exception
def test_a_buffer_whose_tracking_metal_does_not_tell_is_ordered(sim, handles):
    """hazardTrackingMode raising while a buffer is adopted: the storage
    counts as untracked, and its work is ordered (a fence, an event)."""
    handles.append(lib.msim_new_buffer(4096, 0, 0))
    before = metalsim.stats()
    lib.msim_raise_next(b"hazardTrackingMode", 1)
    x = mlxbuf.Buffer.from_raw(sim, handles[-1], dtype="u32")
    with sim.command_encoder() as enc:
        enc.fill(x, 1)
    after = metalsim.stats()
    assert after["exceptions_raised"] - before["exceptions_raised"] == 1
    assert after["fences_created"] - before["fences_created"] == 1
    assert after["event_commands"] - before["event_commands"] == 1


@needs_sim
@pytest.mark.metal_exception
def test_an_exception_signalling_after_a_failed_command_buffer_stays_inside(handles):
    """The completion handler of a failed untracked command buffer sets the
    event from the CPU; if that raises, the failure is still reported."""
    dev = mlxbuf.Device("metal")  # its event is stuck afterwards: nothing else runs on it
    x = mlxbuf.Buffer.from_raw(dev, untracked_buffer(handles), dtype="u32")
    metalsim.fail_next("command_buffer")
    lib.msim_raise_next(b"signaledValue", 1)
    before = metalsim.stats()["exceptions_raised"]
    enc = dev.command_encoder()
    enc.fill(x, 1)
    with pytest.raises(mlxbuf.CommandBufferError) as exc:
        enc.commit_and_wait()
    assert_names(exc, "simulated GPU fault")
    assert metalsim.stats()["exceptions_raised"] - before == 1
