"""What is in flight between a write's plan and its commit: the one owner of in-flight cluster
allocations and in-flight host data I/O (QEMU keeps both on BDRVQcow2State: cluster_allocs,
and the requests a drain waits for).

- A guest cluster being allocated (copy-on-write, a fresh cluster) by one request is reserved
  from its plan to its commit: another write to it waits (Busy), as QEMU's requests wait in
  handle_dependencies; reads meanwhile see the old mapping.
- While any host data I/O runs, no cluster is freed (Qcow2Image.flush_metadata keeps the
  pending frees for a later flush), so no cluster is reused under a copy still running.

Touched only by the thread that makes metadata decisions, between two awaits.
"""

from __future__ import annotations


class Busy:
    """A write's answer when a cluster it needs is being allocated by another request: wait for
    that request's commit, then plan again."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "BUSY"


BUSY = Busy()


class InFlight:
    def __init__(self) -> None:
        #: guest clusters reserved by a planned, uncommitted write
        self.allocating: set[int] = set()
        #: host data reads and writes running (on I/O threads)
        self.io = 0

    def begin_io(self) -> None:
        self.io += 1

    def end_io(self) -> None:
        self.io -= 1

    @property
    def idle(self) -> bool:
        """No host data I/O runs: clusters may be freed."""
        return self.io == 0

    def reserve(self, first: int, last: int) -> None:
        self.allocating.update(range(first, last + 1))

    def release(self, first: int, last: int) -> None:
        self.allocating.difference_update(range(first, last + 1))

    def busy(self, first: int, last: int) -> bool:
        """Whether a guest cluster in [first, last] is reserved by another write."""
        allocating = self.allocating
        if not allocating:
            return False
        if last - first < len(allocating):
            return not allocating.isdisjoint(range(first, last + 1))
        return any(first <= ci <= last for ci in allocating)
