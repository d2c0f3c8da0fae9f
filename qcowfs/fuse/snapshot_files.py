"""`.snapshots/`: the image's internal snapshots as read-only files (part of the FUSE layer).

One regular file per snapshot, named by the snapshot's name, or by its ID where the name
cannot be a file name (empty, '.', '..', a '/', or a name two snapshots share). Reading one
gives the guest disk as it was when the snapshot was taken (SnapshotView: the image's read
path and L2 cache); `touch NAME` takes a snapshot, `rm NAME` deletes one.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import TYPE_CHECKING, Optional

import pyfuse3

from ..engine.snapshots import SnapshotView
from ..format.snapshot_table import Snapshot

if TYPE_CHECKING:
    from ..engine.disk import Disk
    from .options import MountOptions


class SnapshotDir:
    """The snapshot half of QcowOperations (a mixin: it uses the operations' disk, inodes and
    options)."""

    disk: Disk
    options: MountOptions
    next_inode: int
    next_fh: int

    def _init_snapshots(self) -> None:
        self.snap_inodes: dict[str, int] = {}  # snapshot id -> inode
        self.inode_snaps: dict[int, str] = {}
        self.snap_handles: dict[int, SnapshotView] = {}
        self._snaps: Optional[list[Snapshot]] = None  # cached table, reread after a change
        self._views: dict[str, SnapshotView] = {}

    def snapshot_files(self) -> dict[bytes, Snapshot]:
        """file name (bytes) -> Snapshot."""
        if self._snaps is None:
            self._snaps = self.disk.snapshots()
        names: dict[str, list[Snapshot]] = {}
        for s in self._snaps:
            names.setdefault(s.name, []).append(s)
        out = {}
        for s in self._snaps:
            ok = s.name not in ("", ".", "..") and "/" not in s.name and len(names[s.name]) == 1
            out[os.fsencode(s.name if ok else s.id)] = s
        return out

    def snapshots_changed(self) -> None:
        self._snaps = None

    def snap_inode(self, snap: Snapshot) -> int:
        ino = self.snap_inodes.get(snap.id)
        if ino is None:
            ino = self.next_inode
            self.next_inode += 1
            self.snap_inodes[snap.id] = ino
            self.inode_snaps[ino] = snap.id
        return ino

    def snapshot_by_inode(self, inode: int) -> Optional[Snapshot]:
        sid = self.inode_snaps.get(inode)
        if sid is None:
            return None
        return next((s for s in self.snapshot_files().values() if s.id == sid), None)

    def snapshot_attr(self, a: pyfuse3.EntryAttributes, snap: Snapshot) -> None:
        a.st_mode = stat.S_IFREG | self.options.mode(0o444, True)
        a.st_nlink = 1
        a.st_size = snap.disk_size
        a.st_mtime_ns = a.st_ctime_ns = snap.date_sec * 1_000_000_000 + snap.date_nsec
        a.entry_timeout = 0
        a.attr_timeout = 1

    def open_snapshot(self, snap: Snapshot, writing: bool) -> pyfuse3.FileInfo:
        if writing:
            raise pyfuse3.FUSEError(errno.EROFS)
        view = self._views.get(snap.id)
        if view is None:
            view = self._views[snap.id] = self.disk.snapshot_view(snap)
        fh = self.next_fh
        self.next_fh += 1
        self.snap_handles[fh] = view
        return pyfuse3.FileInfo(fh=fh, direct_io=True)

    def take_snapshot(self, name: bytes) -> Snapshot:
        snap = self.disk.take_snapshot(os.fsdecode(name))
        self.snapshots_changed()
        return snap

    def delete_snapshot(self, name: bytes) -> None:
        snap = self.snapshot_files().get(name)
        if snap is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        # open handles keep reading what they read: the view holds its own copy of the L1, and
        # freed clusters may be reused, so close them off instead
        for fh, v in list(self.snap_handles.items()):
            if v.snapshot.id == snap.id:
                del self.snap_handles[fh]
        self._views.pop(snap.id, None)
        self.disk.delete_snapshot(snap.id)
        self.snapshots_changed()
        ino = self.snap_inodes.pop(snap.id, None)
        if ino is not None:
            self.inode_snaps.pop(ino, None)
