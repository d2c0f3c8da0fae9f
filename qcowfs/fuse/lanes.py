"""Request lanes: every core serves disk.raw, the metadata stays with one owner.

A lane (pyfuse3's lanes.h, qcowfs' patch patches/pyfuse3-3.5.0-request-lanes.patch) is a
thread with its own clone of the FUSE device (FUSE_DEV_IOC_CLONE, as libfuse's multi-threaded
loop with clone_fd and QEMU's multi-queue FUSE export use): it reads a request, serves it from
start to reply in C without the GIL when it can, and otherwise hands it to the trio thread
(the metadata owner), whose reply goes back to the lane's descriptor. What a lane serves alone:

- reads of disk.raw whose clusters are allocated data, zero, or unallocated with nothing below;
- writes into allocated clusters that change no metadata: not shared with a snapshot, every
  granule already dirty in every recording bitmap (durably in intent mode), not all-zero whole
  clusters (those become zero clusters, detect-zeroes=unmap), not O_SYNC/O_DSYNC.

Everything else (first writes and copy-on-write, discard, resize, snapshots, bitmap commands,
fsync, the bitmap files, directory operations, writes that dirty a clean granule) goes to the
trio thread unchanged. The lanes work from a map (engine/host_map.py) this module publishes:
lazily, a whole L2 table's worth of clusters the first time a request handed over touches it,
and again for the clusters each handed-over request touched. Before any mapping changes
(ActiveMap.on_change) or a bitmap starts to record more (BitmapStore.on_change) the affected
entries are withdrawn and the trio thread waits until no lane still uses them, so a freed
cluster is never written by a lane, a snapshot is one instant, and no acknowledged write
escapes a bitmap.

fsync: a lane replies to a write after its pwrite returned, so the fdatasync an fsync runs
covers every write acknowledged before it; the lanes change no metadata to flush.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Optional

import pyfuse3

from ..engine import host_map
from ..engine.disk import Disk

log = logging.getLogger(__name__)

#: touched ranges kept before they are published on the request path after all
MAX_TOUCHED = 256
#: the map's reach past the disk's size at mount, for growth (truncate) while mounted; clusters
#: beyond it are served by the trio thread
GROWTH_FACTOR = 4


def available() -> Optional[str]:
    """None if this pyfuse3 has request lanes, else why not."""
    if not hasattr(pyfuse3, "lanes_start"):
        return "this pyfuse3 has no request lanes (qcowfs' patch; scripts/build-pyfuse3 builds it)"
    if (pyfuse3.LANE_READ, pyfuse3.LANE_WRITE, pyfuse3.LANE_ZERO) != (
        host_map.READ,
        host_map.WRITE,
        host_map.ZERO,
    ):
        return "this pyfuse3's request lanes encode map entries differently"
    return None


def unsupported(disk: Disk) -> Optional[str]:
    """Why this image's disk cannot be served by lanes (None: it can)."""
    geo = disk.image.geo
    if geo.extended:
        return "extended L2 entries (subclusters) are served by the metadata thread"
    return None


class Lanes:
    """The lanes of one mount, and the map they serve from."""

    def __init__(self, disk: Disk, nodeid: int, count: int):
        self.disk = disk
        self.image = image = disk.image
        self.nodeid = nodeid
        self.count = count
        self.efd = -1
        self.size = image.size
        self.published: set[int] = set()  # L2 table indexes published whole
        self._touched: list[tuple[int, int]] = []  # ranges to publish (publish_touched)
        self.waits = 0  # invalidations that had to wait for a lane
        geo = image.geo
        self.cluster_bits = geo.cluster_bits
        self.l2_bits = geo.l2_bits
        self.l2_entries = geo.l2_entries
        self._prev_read_only: Optional[Callable[[], Any]] = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> int:
        """Start the lanes (after pyfuse3.init, before the request loop); the eventfd the loop
        waits on for hand-offs."""
        image = self.image
        writable = not image.read_only
        size = image.size
        self.efd = pyfuse3.lanes_start(
            self.count,
            self.nodeid,
            image.data_file.fd,
            self.cluster_bits,
            size,
            max(size * GROWTH_FACTOR, 1 << 30),
            writable,
            image.writer.can_zero_detect(),
        )
        image.active.on_change = self._mapping_changes
        self.disk.bitmaps.on_change = self._bitmaps_change
        self._prev_read_only = image.on_read_only
        image.on_read_only = self._read_only
        log.info(
            "%s: %d request lanes serve reads and in-place writes (the rest: the metadata thread)",
            image.path,
            self.count,
        )
        return self.efd

    def stop(self) -> None:
        """Stop the lanes (each finishes its request) before the image is closed; log what they
        did. Idempotent."""
        if self.efd < 0:
            return
        pyfuse3.lanes_stop()
        self.efd = -1
        self.image.active.on_change = None
        self.disk.bitmaps.on_change = None
        stats = pyfuse3.lanes_stats() or {}
        served = stats.get("reads", 0) + stats.get("writes", 0)
        log.info(
            "request lanes: %d lanes served %d reads and %d writes themselves, handed %d "
            "requests to the metadata thread; %d requests began while another lane was serving "
            "one (at most %d lanes at once); lanes added %d times for a slow host; %d map "
            "withdrawals waited for a lane; map: %d chunks held, %d freed to stay within its "
            "bound",
            stats.get("lanes", 0),
            stats.get("reads", 0),
            stats.get("writes", 0),
            stats.get("handed", 0),
            stats.get("overlapped", 0),
            stats.get("max_active", 0),
            stats.get("grown", 0),
            self.waits,
            stats.get("chunks", 0),
            stats.get("evicted", 0),
        )
        if stats.get("error"):
            log.warning("request lanes: a lane stopped on %s", os.strerror(int(stats["error"])))
        if not served and not stats.get("handed"):
            log.debug("request lanes: no request reached them")

    # ------------------------------------------------------------------ publishing
    def touched(self, offset: int, length: int) -> None:
        """A request handed over touched [offset, offset+length): what the lanes may serve
        there is published before the request loop next waits (publish_touched), not on this
        request's path: measured, publishing on it cost 1 MiB first writes 17% (a request
        stream of first writes leaves the loop a moment between two of them anyway)."""
        if length <= 0 or self.efd < 0:
            return
        self._touched.append((offset, length))
        if len(self._touched) >= MAX_TOUCHED:
            self.publish_touched()

    def publish_touched(self) -> None:
        """Publish what the requests handed over since the last call touched (from the mapping
        as it is now)."""
        touched, self._touched = self._touched, []
        if self.efd < 0:
            return
        for offset, length in touched:
            self._publish_range(offset, length)

    def _publish_range(self, offset: int, length: int) -> None:
        size = self.image.size
        if size != self.size:  # grown (truncate): the lanes serve up to the new end
            self.size = size
            pyfuse3.lanes_set_size(size)
        cb = self.cluster_bits
        first = offset >> cb
        last = (min(offset + length, self.image.size) - 1) >> cb
        if last < first:
            return
        lb = self.l2_bits
        for t in range(first >> lb, (last >> lb) + 1):
            t0 = t << lb
            if t not in self.published:
                self.published.add(t)
                lo, hi = t0, t0 + self.l2_entries - 1
            else:
                lo, hi = max(first, t0), min(last, t0 + self.l2_entries - 1)
            hi = min(hi, (self.image.size - 1) >> cb)
            if hi >= lo:
                self._publish(lo, hi - lo + 1)

    def _publish(self, first: int, count: int) -> None:
        image = self.image
        bitmaps = self.disk.bitmaps
        reader = image.reader
        backing_size = reader.backing_size if reader.backing is not None else 0
        entries = host_map.entries(
            image.active,
            first,
            count,
            backing_size=backing_size,
            file_size=image.file.size,
            writable=not image.read_only,
            marked=bitmaps.all_marked if bitmaps.recording else None,
        )
        pyfuse3.lanes_publish(first, entries)

    # ------------------------------------------------------------------ withdrawing
    def _mapping_changes(self, first: int, count: int) -> None:
        """ActiveMap.on_change: before clusters [first, first+count) (0: all) change mapping."""
        if count == 0:
            self.published.clear()
        if pyfuse3.lanes_invalidate(first, count):
            self.waits += 1

    def _bitmaps_change(self) -> None:
        """BitmapStore.on_change: no lane writes past a bitmap that starts to record more."""
        self._mapping_changes(0, 0)

    def _read_only(self) -> None:
        """The image turned read-only (corruption found): no lane writes any more."""
        pyfuse3.lanes_set_writable(False)
        self._mapping_changes(0, 0)
        if self._prev_read_only is not None:
            self._prev_read_only()

    # ------------------------------------------------------------------ the request loop's side
    def has_touched(self) -> bool:
        return bool(self._touched)

    @staticmethod
    def pending() -> bool:
        return bool(pyfuse3.lanes_pending())

    @staticmethod
    def clear_signal() -> None:
        pyfuse3.lanes_clear_signal()
