"""Disk: the one object the FUSE layer talks to.

It ties a Qcow2Image to its BitmapStore so that every guest write is recorded
in every recording dirty bitmap before it is acknowledged, and it owns the
ordered shutdown: store the bitmaps (clearing in_use), flush, close.
"""

from __future__ import annotations

import logging

from . import snapshots as snapshot_ops
from .bitmaps import BitmapStore
from .errors import ReadOnlyImage
from .image import Qcow2Image

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

    def read(self, offset: int, length: int):
        return self.image.read(offset, length)

    def write(self, offset: int, data) -> int:
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

    # ------------------------------------------------------------------ snapshots
    def snapshots(self) -> list:
        return snapshot_ops.read_all(self.image)

    def snapshot_view(self, snap) -> snapshot_ops.SnapshotView:
        return snapshot_ops.SnapshotView(self.image, snap)

    def take_snapshot(self, name: str):
        return snapshot_ops.create(self.image, name)

    def delete_snapshot(self, snap_id: str) -> None:
        snapshot_ops.delete(self.image, snap_id)

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
