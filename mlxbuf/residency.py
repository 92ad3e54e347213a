"""ResidencySet: a view over one device's residency bookkeeping (Metal MTLResidencySet)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, SupportsIndex

from mlxbuf._cmetal import ffi, lib
from mlxbuf.errors import InvalidArgument, check

if TYPE_CHECKING:
    from mlxbuf.buffer import Buffer
    from mlxbuf.device import Device

__all__ = ["ResidencySet", "ResidencyInfo", "ShardInfo"]


@dataclasses.dataclass(frozen=True)
class ShardInfo:
    """One residency shard (one MTLResidencySet on Metal) at a point in time.

    An immutable value, safe to share between threads.
    """

    index: int
    allocation_count: int
    committed_allocation_count: int
    allocated_size: int
    pending: bool
    commit_count: int


@dataclasses.dataclass(frozen=True)
class ResidencyInfo:
    """A snapshot of a device's residency counters.

    ``allocation_count`` and ``allocated_size`` count native allocations
    (see ResidencySet) and their allocated bytes. ``staged_adds`` /
    ``staged_removes`` count every add/remove staged since the device
    opened; ``keepalive_requests`` the re-requests the keep-alive thread
    made. ``pending_release_count`` / ``pending_release_bytes`` are the
    freed buffers whose memory waits for the commit that removes them, and
    ``release_threshold_bytes`` / ``release_idle_seconds`` the release
    policy. An immutable value, safe to share between threads.
    """

    enabled: bool
    allocation_count: int
    committed_allocation_count: int
    allocated_size: int
    pending: bool
    commit_count: int
    staged_adds: int
    staged_removes: int
    shard_count: int
    shard_cap_bytes: int
    keepalive_requests: int
    keepalive_seconds: float
    keepalive_interval: float
    pending_release_count: int
    pending_release_bytes: int
    release_threshold_bytes: int
    release_idle_seconds: float


class ResidencySet:
    """The residency set of one device: the allocations the GPU keeps resident.

    Allocating stages an add and a storage's last reference stages a remove;
    staging never commits. ``CommandEncoder.commit*`` flushes: one native
    commit per dirty shard, none when nothing is pending. Storages are
    spread over shards of a soft byte cap (``shard_cap``). The host backend
    keeps exactly the books Metal would.

    Membership is per native allocation: an MTLBuffer, however many buffers
    share it (the same MTLBuffer wrapped twice with ``Buffer.from_raw`` is
    one member, removed when the last of them dies), or the MTLHeap a buffer
    was cut from, which a residency set makes resident as a whole.
    ``allocation_count`` counts those members and ``allocated_size`` their
    allocated bytes (whole pages; a heap counts its full size, once).

    The set holds a member until its removal is committed, so the memory of
    a freed buffer is given back right after that commit (never while a
    command buffer uses it). It comes no later than the first of: the next
    submission, the moment the freed bytes waiting pass
    ``release_threshold_bytes`` (default 64 MiB), and
    ``release_idle_seconds`` (default 1 s) after the oldest of them was
    freed, from a background thread that sleeps while nothing waits (see
    ``set_release_policy``). A residency failure that no call could report
    (a removal staged as a buffer died, a commit made by the threshold or
    the timer) raises ResidencySetError from the next ``commit``,
    ``flush_pending`` or ``CommandEncoder.commit``, which retries the work
    (a command buffer is then not submitted: commit it again).

    A view: it holds the device, not a copy of its state, and every
    property reads the current counters. Safe to use from any thread.
    """

    __slots__ = ("_device",)

    _device: Device  # the slot's type (an annotation only)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("a ResidencySet is obtained from Device.residency_set")

    def __reduce__(self) -> tuple[Any, ...]:
        raise TypeError("a ResidencySet cannot be pickled: pickle its Device and read residency_set there")

    @classmethod
    def _for_device(cls, device: Device) -> ResidencySet:
        rs = cls.__new__(cls)
        rs._device = device
        return rs

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ResidencySet):
            return NotImplemented
        return self._device._handle == other._device._handle

    def __hash__(self) -> int:
        return hash(int(ffi.cast("uintptr_t", self._device._handle)))

    @property
    def device(self) -> Device:
        """The Device whose residency this is."""
        return self._device

    def info(self) -> ResidencyInfo:
        """A ResidencyInfo snapshot of every counter."""
        out = self._raw()
        values = {f.name: getattr(out, f.name) for f in dataclasses.fields(ResidencyInfo)}
        values["enabled"] = bool(values["enabled"])
        values["pending"] = bool(values["pending"])
        return ResidencyInfo(**values)

    def _raw(self) -> Any:
        out = ffi.new("cm_residency_info_t *")
        check(lib.cm_residency_info(self._device._handle, out))
        return out

    @property
    def allocation_count(self) -> int:
        """Native allocations in the set (MTLBuffers and heaps), staged changes included."""
        return self._raw().allocation_count

    @property
    def committed_allocation_count(self) -> int:
        """Allocations in the set as of the last commit."""
        return self._raw().committed_allocation_count

    @property
    def allocated_size(self) -> int:
        """Allocated bytes of the set's members (whole pages; a heap's full size), staged changes included."""
        return self._raw().allocated_size

    @property
    def pending(self) -> bool:
        """True when something was staged since the last commit."""
        return bool(self._raw().pending)

    @property
    def commit_count(self) -> int:
        """Native commits issued on this device so far (every shard counted)."""
        return self._raw().commit_count

    @property
    def staged_adds(self) -> int:
        """Adds staged since the device opened."""
        return self._raw().staged_adds

    @property
    def staged_removes(self) -> int:
        """Removes staged since the device opened."""
        return self._raw().staged_removes

    @property
    def shard_count(self) -> int:
        """Residency shards in use (MTLResidencySets on Metal)."""
        return self._raw().shard_count

    @property
    def shard_cap(self) -> int:
        """Soft byte cap of one shard; new storages go to the first shard with room."""
        return self._raw().shard_cap_bytes

    @shard_cap.setter
    def shard_cap(self, cap_bytes: SupportsIndex) -> None:
        self.set_shard_cap(cap_bytes)

    def set_shard_cap(self, cap_bytes: SupportsIndex) -> int:
        """Set the shard cap in bytes (storages already placed stay); return the old cap."""
        from mlxbuf.buffer import _int_arg

        cap_bytes = _int_arg(cap_bytes, "shard cap", minimum=1)
        old = ffi.new("uint64_t *")
        check(lib.cm_residency_set_shard_cap(self._device._handle, cap_bytes, old))
        return old[0]

    def shards(self) -> list[ShardInfo]:
        """A ShardInfo per shard."""
        out = ffi.new("cm_residency_shard_info_t *")
        result = []
        for i in range(self.shard_count):
            check(lib.cm_residency_shard_info(self._device._handle, i, out))
            result.append(
                ShardInfo(
                    i,
                    out.allocation_count,
                    out.committed_allocation_count,
                    out.allocated_size,
                    bool(out.pending),
                    out.commit_count,
                )
            )
        return result

    @property
    def keepalive(self) -> tuple[float, float]:
        """``(seconds, interval)`` of the keep-alive; ``(0.0, ...)`` when off."""
        out = self._raw()
        return (out.keepalive_seconds, out.keepalive_interval)

    @property
    def keepalive_requests(self) -> int:
        """Residency re-requests made by the keep-alive thread."""
        return self._raw().keepalive_requests

    def set_keepalive(self, seconds: float, interval: float | None = None) -> None:
        """Same as Device.set_residency_keepalive."""
        self._device.set_residency_keepalive(seconds, interval)

    @property
    def pending_release_count(self) -> int:
        """Freed buffers whose memory waits for the commit that removes them."""
        return self._raw().pending_release_count

    @property
    def pending_release_bytes(self) -> int:
        """Allocated bytes of the freed buffers waiting for their removal's commit."""
        return self._raw().pending_release_bytes

    @property
    def release_policy(self) -> tuple[int, float]:
        """``(threshold_bytes, idle_seconds)``: see ``set_release_policy``."""
        out = self._raw()
        return (out.release_threshold_bytes, out.release_idle_seconds)

    def set_release_policy(self, threshold_bytes: SupportsIndex, idle_seconds: float) -> tuple[int, float]:
        """Bound how long freed memory waits for the commit that removes it;
        return the old ``(threshold_bytes, idle_seconds)``.

        A freed buffer's removal is committed (and its memory given back) at
        the next submission at the latest, and sooner once the bytes waiting
        pass ``threshold_bytes`` (0: every removal is committed at once, the
        Rust mlx-native crate's behaviour; 2**64 - 1: no size bound) or once
        the oldest of them waited ``idle_seconds`` (0: no time bound; else
        0.001 to 1e9). Defaults: 64 MiB and 1 s, or
        ``MLXBUF_RESIDENCY_RELEASE_BYTES`` and
        ``MLXBUF_RESIDENCY_RELEASE_SECONDS`` when set. Lowering either
        applies at once.
        """
        from mlxbuf.buffer import _int_arg
        from mlxbuf.device import _float_arg

        threshold_bytes = _int_arg(threshold_bytes, "release threshold", minimum=0)
        idle_seconds = _float_arg(idle_seconds, "release idle timeout")
        old_threshold = ffi.new("uint64_t *")
        old_idle = ffi.new("double *")
        check(
            lib.cm_residency_set_release_policy(
                self._device._handle, threshold_bytes, idle_seconds, old_threshold, old_idle
            )
        )
        return (old_threshold[0], old_idle[0])

    @property
    def release_threshold_bytes(self) -> int:
        """Freed bytes waiting above which their removals are committed at once."""
        return self._raw().release_threshold_bytes

    @release_threshold_bytes.setter
    def release_threshold_bytes(self, threshold_bytes: SupportsIndex) -> None:
        self.set_release_policy(threshold_bytes, self._raw().release_idle_seconds)

    @property
    def release_idle_seconds(self) -> float:
        """Seconds the oldest freed buffer waits before its removal is committed (0: no time bound)."""
        return self._raw().release_idle_seconds

    @release_idle_seconds.setter
    def release_idle_seconds(self, idle_seconds: float) -> None:
        self.set_release_policy(self._raw().release_threshold_bytes, idle_seconds)

    def commit(self) -> None:
        """Commit every shard now, pending or not."""
        check(lib.cm_residency_commit(self._device._handle))

    def flush_pending(self) -> bool:
        """Commit the shards with staged changes; return whether anything was committed."""
        out = ffi.new("uint64_t *")
        check(lib.cm_residency_flush(self._device._handle, out))
        return out[0] > 0

    def contains(self, buffer: Buffer) -> bool:
        """Whether ``buffer``'s native allocation (its MTLBuffer, or the heap it
        was cut from) is in the set, staged view: also when another buffer over
        the same MTLBuffer registered it. False for another device's buffer."""
        from mlxbuf.buffer import Buffer

        if not isinstance(buffer, Buffer):
            raise InvalidArgument(f"a residency set contains Buffers, got {buffer!r}")
        if buffer._device._handle != self._device._handle:
            return False
        out = ffi.new("int *")
        check(lib.cm_residency_contains(self._device._handle, buffer._storage, out))
        return bool(out[0])

    def __contains__(self, buffer: Buffer) -> bool:
        return self.contains(buffer)

    def __repr__(self) -> str:
        i = self._raw()
        return (
            f"ResidencySet(allocations={i.allocation_count}, committed={i.committed_allocation_count}, "
            f"bytes={i.allocated_size}, pending={bool(i.pending)}, commits={i.commit_count}, "
            f"shards={i.shard_count})"
        )
