"""Guest reads and writes with their host data I/O on threads: several requests in flight.

When threads pay: a trip through one costs about 50 us of handoffs (futexes, the GIL, a trio
reschedule; measured on 2 cores, more under load), so it pays only when the host I/O itself
waits longer than that (a disk, a network file system, writeback throttling) and another
request could be served meanwhile. Copies into and out of the host page cache are CPU work
that a second thread cannot speed up on a busy 2-core machine; there, measured, threads made
every queue-depth job slower (docs/performance.md). So the FUSE layer (fuse/operations.py) serves requests
inline and samples how long the host kept them *waiting* (wall time minus the thread's CPU
time, counted only when it blocked: preemption on a busy machine is not the host's doing):
once that average passes SLOW_WAIT_NS, requests that find another one waiting or running go to
the threads, and the threads' own samples tell when the host is fast again.

Every decision stays on the trio thread and is made between two awaits, so it is atomic
(trio's rule): bitmap marking (Disk.begin_write, before the data), then the write's one
sequence (engine/write_path.py): mapping, allocation and copy-on-write planning of a step,
its copy (here, on a thread when that pays), the commit of its new L2 entries after the data;
flush ordering. Only the copies run on threads (io_threads.py). The rules:

- a request whose clusters another request is allocating waits for that commit (BUSY, the
  engine's InFlight reservations), as QEMU's wait on in-flight cluster allocations; reads
  meanwhile see the old mapping;
- requests that change metadata in other ways (fsync, discard, resize, snapshots, bitmap
  commands, checkpoints) first let every running copy finish (quiesce(): QEMU's drain);
  requests arriving meanwhile are served inline, so a drain always ends;
- no cluster is freed while a copy runs (InFlight.begin_io/end_io), so none is reused under it;
- fsync covers every acknowledged write: a write is acknowledged after its copy completed and
  its entries were committed, and the flush writes those entries after the data.

Reads on threads get one buffer per worker task (a reply is sent before that worker reads its
next request); the inline path keeps Qcow2Image.read_view's single reused buffer, which is
safe because an inline read replies before any other request runs.

The policy (which request goes to a thread, the sampling that tells whether the host is slow)
lives here only: the FUSE operations ask offload_read() / write_must_wait() and call the
inline or the awaiting form.
"""

from __future__ import annotations

import logging
import mmap
import os
from typing import Any, Callable

import trio

from ..engine.disk import Disk
from ..engine.inflight import Busy
from ..engine.write_path import WritePlan
from .io_threads import IoThreads, host_wait_ns, host_wait_start
from .request_loop import FastLoop

log = logging.getLogger(__name__)


#: average host wait per request above which requests under load go to the threads: a few
#: times the ~50 us a trip through a thread costs
SLOW_WAIT_NS = 200_000
#: inline requests are timed one in this many (two clock reads, one a syscall)
SAMPLE_EVERY = 16


class ConcurrentIo:
    def __init__(self, disk: Disk, loop: FastLoop, threads: IoThreads, always: bool = False):
        self.disk = disk
        self.image = disk.image
        self.loop = loop
        self.threads = threads
        self.inflight = disk.image.inflight  # host data I/O running on threads (begin_io/end_io)
        self.draining = 0  # handlers in quiesce()
        self._changed = trio.lowlevel.ParkingLot()  # woken at every commit and completion
        self._buffers: dict = {}  # worker task -> its read buffer
        self.always = always  # offload=always: under load, however fast the host
        self.slow = always  # the host keeps requests waiting: offload under load
        self.slow_spells = 0  # times it turned slow
        self.wait_ns = 0  # moving average of the host's wait per sampled request
        self.ticks = 0  # inline requests seen (sampling clock)
        threads.on_sample = self.note
        self.waits = 0  # requests that waited for another's allocation (BUSY) or a drain

    def wanted(self) -> bool:
        """Whether a request should go to a thread: the host is slow and another request is
        running or waiting."""
        return self.slow and (bool(self.inflight.io) or self.loop.pending())

    def note(self, wait_ns: int) -> None:
        """One sample of how long the host kept a request waiting (not working)."""
        self.wait_ns += (wait_ns - self.wait_ns) >> 3
        slow = self.always or self.wait_ns > SLOW_WAIT_NS
        if slow != self.slow:
            self.slow = slow
            self.slow_spells += slow
            log.info(
                "%s: host I/O %s (%d us average wait): %s",
                self.image.path,
                "slow" if slow else "fast again",
                self.wait_ns // 1000,
                "requests under load go to the I/O threads" if slow else "serving inline",
            )

    def _timed(self, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args) inline, noting how long the host kept it waiting."""
        before = host_wait_start()
        result = fn(*args)
        self.note(host_wait_ns(before))
        return result

    def _tick(self) -> bool:
        """Whether this inline request is one to time (one in SAMPLE_EVERY)."""
        self.ticks += 1
        return not self.ticks % SAMPLE_EVERY

    # ------------------------------------------------------------------ reads
    def offload_read(self) -> bool:
        return self.wanted()

    def read_inline(self, offset: int, size: int) -> memoryview:
        """A read on the trio thread, into Qcow2Image.read_view's reused buffer (pyfuse3 sends
        the reply before it reads the next request)."""
        if self._tick():
            return self._timed(self.disk.read_view, offset, size)
        return self.disk.read_view(offset, size)

    async def read(self, offset: int, size: int) -> memoryview:
        """A read on a thread when it is one contiguous data run, so the requests behind it are
        served while the host works; inline otherwise (holes, zeros, draining, short)."""
        image = self.image
        length = min(size, image.size - offset)
        host = image.data_host(offset, length)
        if host < 0 or self.draining:
            return self.read_inline(offset, size)
        buf = self._buffer(length)
        self.inflight.begin_io()
        self.loop.hand_over()
        try:
            got = await self.threads.run(os.preadv, image.data_file.fd, (buf,), host)
        finally:
            self.inflight.end_io()
            self._changed.unpark_all()
        return buf if got == length else self.read_inline(offset, size)

    # ------------------------------------------------------------------ writes
    def write_must_wait(self) -> bool:
        """Whether a write takes the awaiting path: a copy is running (a cluster it needs may be
        reserved: it may have to wait) or the policy offloads."""
        return bool(self.inflight.io) or self.wanted()

    def write_inline(self, offset: int, data: Any) -> int:
        """A write on the trio thread, start to end (nothing is in flight: nothing to wait for)."""
        if self._tick():
            return self._timed(self.disk.write, offset, data)
        return self.disk.write(offset, data)

    async def write(self, offset: int, data: Any) -> int:
        """A guest write: the engine's sequence (engine/write_path.py), each step's copy on a
        thread when the policy offloads, after waiting out any request allocating one of its
        clusters."""
        offload = self.wanted()
        disk = self.disk
        while True:
            n, req = disk.begin_write(offset, data)
            if not isinstance(req, Busy):
                break
            self.waits += 1
            self.loop.hand_over()
            await self._changed.park()
        if req is None:
            return n
        writer = self.image.writer
        try:
            for plan in req.steps:
                if offload and plan.runs and not self.draining:
                    await self._copy(plan)
                else:
                    writer.run(plan)
        finally:
            writer.end(req)
            self._changed.unpark_all()
        return n

    async def _copy(self, plan: WritePlan) -> None:
        inflight, writer = self.inflight, self.image.writer
        inflight.begin_io()
        self.loop.hand_over()
        try:
            await self.threads.run(plan.copy)
        except BaseException:
            inflight.end_io()
            writer.abort(plan)
            raise
        else:
            inflight.end_io()
            writer.commit(plan)
        finally:
            self._changed.unpark_all()

    def _buffer(self, n: int) -> memoryview:
        task = trio.lowlevel.current_task()
        buf = self._buffers.get(task)
        if buf is None or len(buf) < n:
            # page aligned, as Qcow2Image.read_view's (read_path.py)
            buf = memoryview(mmap.mmap(-1, max(n, mmap.PAGESIZE)))
            self._buffers[task] = buf
        return buf[:n]

    async def quiesce(self) -> None:
        """Return when no copy runs; the caller then changes metadata without awaiting."""
        if not self.inflight.io:
            return
        self.draining += 1
        self.waits += 1
        try:
            while self.inflight.io:
                self.loop.hand_over()
                await self._changed.park()
        finally:
            self.draining -= 1
