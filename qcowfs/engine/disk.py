"""Disk: the one object the FUSE layer talks to.

It ties a Qcow2Image to its BitmapStore so that every guest write is recorded
in every recording dirty bitmap before it is acknowledged, and it owns the
ordered shutdown: store the bitmaps (clearing in_use), flush, close.
"""

from __future__ import annotations

import errno
import logging
from typing import Any, Iterable, Optional

from ..errors import BitmapError, ReadOnlyImage
from ..format.snapshot_table import Snapshot
from . import allocation, resize
from . import snapshots as snapshot_ops
from .bitmaps import BitmapStore
from .image import Qcow2Image
from .inflight import Busy
from .write_path import WriteRequest

log = logging.getLogger(__name__)


class Disk:
    def __init__(self, image: Qcow2Image, bitmap_sync: str = "close"):
        self.image = image
        # Read and validate the bitmap directory before anything is written to the image.
        self.bitmaps = BitmapStore(image, sync=bitmap_sync)
        image.start_writing()
        # in_use set durably before the first guest write is accepted
        self.bitmaps.activate()
        self.size = image.size
        #: read() into a buffer the next call reuses (Qcow2Image.read_view); bound, not wrapped:
        #: it is the hot path of every FUSE read
        self.read_view = image.read_view

    @property
    def read_only(self) -> bool:
        return self.image.read_only

    def read(self, offset: int, length: int) -> bytes | bytearray:
        return self.image.read(offset, length)

    def write(self, offset: int, data: Any) -> int:
        if self.image.read_only:
            raise ReadOnlyImage("disk is read-only", self.image.path)
        length = len(data)
        end = min(offset + length, self.size)
        if offset >= self.size:
            return 0
        if end - offset < length:
            data = memoryview(data)[: end - offset]
        # Mark first: a write that fails half-way may still have changed data on disk.
        self.bitmaps.mark(offset, end - offset)
        self.image.write(offset, data)
        return end - offset

    def begin_write(self, offset: int, data: Any) -> tuple[int, Optional[WriteRequest | Busy]]:
        """write(), for a caller that copies and commits its steps itself (fuse/concurrent_io.py):
        clip, mark the bitmaps, begin (write_path.py). Returns (bytes accepted, the request, or
        BUSY: a cluster of it is being allocated, ask again after that commit); None past the end."""
        if self.image.read_only:
            raise ReadOnlyImage("disk is read-only", self.image.path)
        length = len(data)
        end = min(offset + length, self.size)
        if offset >= self.size:
            return 0, None
        if end - offset < length:
            data = memoryview(data)[: end - offset]
        self.bitmaps.mark(offset, end - offset)  # before the data, as in write()
        return end - offset, self.image.begin_write(offset, data)

    def zero_range(self, offset: int, length: int) -> int:
        """Discard / zero [offset, offset+length) (clipped at the disk's end): reads give zeros
        after it, freed clusters go back to the host, and every recording bitmap marks the range
        (QEMU dirties discards too). Returns the bytes zeroed."""
        if self.image.read_only:
            raise ReadOnlyImage("disk is read-only", self.image.path)
        end = min(offset + length, self.size)
        if offset >= end:
            return 0
        self.bitmaps.mark(offset, end - offset)
        self.image.write_zeroes(offset, end - offset)
        return end - offset

    def grow(self, new_size: int) -> None:
        """truncate -s BIGGER disk.raw: the image grows as qemu-img resize grows it, the bitmaps
        with it (as QEMU resizes them); snapshots keep their own sizes. Shrinking: EPERM."""
        if self.image.read_only:
            raise ReadOnlyImage("disk is read-only", self.image.path)
        if new_size < self.size:
            resize.grow(self.image, new_size)  # refuses (ShrinkRefused, EPERM)
        self.bitmaps.resize(new_size, lambda: resize.grow(self.image, new_size))
        self.size = new_size

    def seek(self, offset: int, whence: int) -> Optional[int]:
        """SEEK_DATA / SEEK_HOLE over the guest disk (allocation.py); None: ENXIO."""
        return allocation.seek(self.image, offset, whence)

    # ------------------------------------------------------------------ snapshots
    def snapshots(self) -> list:
        return snapshot_ops.read_all(self.image)

    def snapshot_view(self, snap: Snapshot) -> snapshot_ops.SnapshotView:
        return snapshot_ops.SnapshotView(self.image, snap)

    def take_snapshot(self, name: str) -> Snapshot:
        return snapshot_ops.create(self.image, name)

    def delete_snapshot(self, snap_id: str) -> None:
        snapshot_ops.delete(self.image, snap_id)

    def checkpoint(
        self,
        name: str,
        disable: Iterable[str] = (),
        snapshot: bool = True,
        granularity: Optional[int] = None,
    ) -> dict:
        """As one step between two guest requests: internal snapshot NAME, persistent recording
        bitmap NAME (of `granularity`, default the cluster size), each bitmap in `disable`
        stopped. All of it or none of it (a failure undoes what was done); durable when this
        returns."""
        store = self.bitmaps
        if self.image.read_only:
            raise ReadOnlyImage("image is mounted read-only: no checkpoint", self.image.path)
        # everything that can be refused is refused before anything is written
        if name in store.bitmaps:
            raise BitmapError(
                f"a bitmap named {name!r} already exists", self.image.path, errno.EEXIST
            )
        for b in disable:
            store.usable(b)
        if snapshot:
            snapshot_ops.check_can_create(self.image, name)
        done: list = []
        try:
            snap = snapshot_ops.create(self.image, name) if snapshot else None
            if snap is not None:
                done.append(lambda: snapshot_ops.delete(self.image, snap.id))
            store.create(name, granularity)
            done.append(lambda: store.remove(name))
            for b in disable:
                if store.get(b).enabled:
                    store.disable(b)
                    done.append(lambda b=b: store.enable(b))
            store.sync_directory()
            self.image.flush()
        except BaseException:
            for undo in reversed(done):
                try:
                    undo()
                except (
                    Exception
                ) as e:  # keep undoing the rest; the first error is what the user sees
                    log.error("%s: undoing a failed checkpoint %r: %s", self.image.path, name, e)
            raise
        return {
            "checkpoint": name,
            "snapshot": snap.info() if snap is not None else None,
            "bitmap": name,
            "disabled": list(disable),
        }

    def flush(self) -> None:
        self.image.flush()

    def close(self) -> None:
        """Clean shutdown: store bitmaps (in_use cleared), flush metadata, close files."""
        try:
            if not self.image.read_only:
                self.bitmaps.store()
        finally:
            # close the files even if storing failed; close() itself may raise the flush error
            self.image.close()
