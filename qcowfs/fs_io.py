"""Guest reads and writes with their host data I/O on threads: several requests in flight.

The FUSE layer (fs.py) hands a request here when another one is waiting at the device or
already running on a thread; alone (queue depth 1) it is served inline, as before, because a
trip through a thread costs more than it saves when nothing else could run meanwhile.

Every decision stays on the trio thread and is made between two awaits, so it is atomic
(trio's rule): mapping, allocation and copy-on-write planning (Qcow2Image.plan_write),
bitmap marking (Disk.plan_write, before the data), commits of new L2 entries after the data
(commit_write), flush ordering. Only the copies run on threads (io_threads.py). The rules:

- a request whose clusters another request is allocating waits for that commit (BUSY), as
  QEMU's wait on in-flight cluster allocations; reads meanwhile see the old mapping;
- requests that change metadata in other ways (fsync, discard, resize, snapshots, bitmap
  commands, checkpoints) first let every running copy finish (quiesce(): QEMU's drain);
  requests arriving meanwhile are served inline, so a drain always ends;
- no cluster is freed while a copy runs (Qcow2Image.io_inflight), so none is reused under it;
- fsync covers every acknowledged write: a write is acknowledged after its copy completed and
  its entries were committed, and the flush writes those entries after the data.

Reads get one buffer per worker task (a reply is sent before that worker reads its next
request); the inline path keeps Qcow2Image.read_view's single reused buffer, which is safe
because an inline read replies before any other request runs.
"""

from __future__ import annotations

import mmap
import os
from typing import Optional

import trio

from .disk import Disk
from .fuseloop import FastLoop
from .io_threads import IoThreads
from .write_path import BUSY

#: reads shorter than this stay inline even under load: a 4 KiB copy out of the page cache
#: costs less than the trip through a thread (scripts/bench, docs/performance.md)
DEFAULT_READ_MIN = 65536


class ConcurrentIo:
    def __init__(self, disk: Disk, loop: FastLoop, threads: IoThreads, read_min: int = DEFAULT_READ_MIN):
        self.disk = disk
        self.image = disk.image
        self.loop = loop
        self.threads = threads
        self.read_min = read_min
        self.running = 0  # requests waiting for their copy
        self.draining = 0  # handlers in quiesce()
        self._changed = trio.lowlevel.ParkingLot()  # woken at every commit and completion
        self._buffers: dict = {}  # worker task -> its read buffer
        self.waits = 0  # requests that waited for another's allocation (BUSY) or a drain

    def wanted(self) -> bool:
        """Whether a request should go through here: another one is running or waiting."""
        return bool(self.running) or self.loop.pending()

    async def write(self, offset: int, data) -> int:
        disk = self.disk
        if not self.draining:
            while True:
                n, plan = disk.plan_write(offset, data)
                if plan is not BUSY:
                    break
                self.waits += 1
                await self._changed.park()
            if plan is not None:
                return await self._copy(n, plan)
        # inline: never over a cluster another request is allocating
        while self.image.busy(offset, len(data)):
            self.waits += 1
            await self._changed.park()
        return disk.write(offset, data)

    async def _copy(self, n: int, plan) -> int:
        image = self.image
        self.running += 1
        try:
            await self.threads.run(plan.write_data)
        except BaseException:
            image.abort_write(plan)
            raise
        else:
            image.commit_write(plan)
        finally:
            self.running -= 1
            self._changed.unpark_all()
        return n

    async def read(self, offset: int, size: int) -> Optional[memoryview]:
        """The guest bytes, or None: read inline (not one contiguous data run, or draining)."""
        image = self.image
        if self.draining:
            return None
        length = min(size, image.size - offset)
        host = image.data_host(offset, length)
        if host < 0:
            return None
        buf = self._buffer(length)
        image.io_inflight += 1
        self.running += 1
        try:
            got = await self.threads.run(os.preadv, image.data_file.fd, (buf,), host)
        finally:
            image.io_inflight -= 1
            self.running -= 1
            self._changed.unpark_all()
        return buf if got == length else None  # short: inline again, which reports it

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
        if not self.running:
            return
        self.draining += 1
        self.waits += 1
        try:
            while self.running:
                await self._changed.park()
        finally:
            self.draining -= 1
