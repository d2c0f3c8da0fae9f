"""Internal snapshots (QEMU's block/qcow2-snapshot.c): list, read, create, delete.

Refcounts count paths: a cluster reached from the active L1 and from one snapshot's L1 has
refcount 2, even when both reach it through the same L2 table (qemu-img check counts so).
Creating a snapshot therefore raises by one every L2 table and every data cluster the active
L1 reaches, and clears COPIED in the active entries (they are shared now: the write path
copies them before changing them); deleting lowers what the snapshot's L1 reaches and sets
COPIED again where an active entry's refcount fell back to 1.

On creation the L1 copy and the refcount
increases are durable (and the COPIED changes after them, flush_metadata's order) before a
new snapshot table is written and the header switched to it in one write; on deletion the
header is switched to a table without the snapshot first, then the refcounts fall. A crash
before the switch leaves no snapshot, after it a complete one; no data is ever lost or shared
wrongly. One window cannot be closed, in QEMU either (reproduced with blkdebug on qemu-img
snapshot -c/-d): a refcount and the COPIED flag of the entry that points at it live in different
clusters, so a crash between the two writes leaves a COPIED/refcount mismatch that qemu-img check
counts as a corruption. Only harmless kinds occur (COPIED set on a refcount of 2 whose extra
reference is a leak; COPIED clear on a refcount of 1, which costs one needless copy), and
`qemu-img check -r all` / `qcowfs check --repair=all` mend them; the power-loss harness accepts
exactly these, only while a snapshot step was under way.

A SnapshotView is a Reader over the snapshot's own L1 and the image's geometry, shared L2
cache, host files and backing file: tables and clusters shared with the active disk are never
changed in place (the write path copies them), so the view's bytes never change while
disk.raw is written. Creating and deleting change the active mapping through its own methods
(ActiveMap.set_l1_entry, changed_l2) and the cache through its (L2Cache.drop).

Crash order: docs/crash-ordering.md, "Internal snapshots".
"""

from __future__ import annotations

import errno
import logging
import time
from typing import TYPE_CHECKING, Any, Iterable

from ..errors import CorruptImage, SnapshotError
from ..format import snapshot_table
from ..format.entries import (
    COMPRESSED,
    COPIED,
    OFFSET_MASK,
    be_array,
    compressed_host_clusters,
    to_be,
)
from ..format.header import div_round_up
from ..format.snapshot_table import Snapshot
from .cluster_map import ClusterMap
from .read_path import Reader

if TYPE_CHECKING:
    from .image import Qcow2Image

log = logging.getLogger(__name__)


def read_all(img: Qcow2Image) -> list:
    """The image's snapshots, from its snapshot table."""
    h = img.header
    if not h.nb_snapshots:
        return []
    # the table's size is not stored: walk the entries' fixed parts to find it, then read it whole
    size = 0
    for _ in range(h.nb_snapshots):
        size = -(-size // 8) * 8
        head = img.file.pread(snapshot_table.HEAD_SIZE, h.snapshots_offset + size)
        size += snapshot_table.HEAD_SIZE + snapshot_table.variable_size(head)
        if size > snapshot_table.MAX_TABLE_SIZE:
            raise CorruptImage("snapshot table exceeds QEMU's 64 MiB limit", img.path)
    raw = img.file.pread(size, h.snapshots_offset)
    try:
        return snapshot_table.parse(raw, h.nb_snapshots, img.size, img.geo.v3)
    except Exception as e:  # FormatError, or struct errors on a damaged table
        raise CorruptImage(f"snapshot table: {e}", img.path) from None


class SnapshotView(Reader):
    """A read-only guest disk as it was when the snapshot was taken."""

    def __init__(self, image: Qcow2Image, snap: Snapshot):
        cs = image.geo.cluster_size
        n = snap.l1_size
        if snap.l1_table_offset % cs or (n and snap.l1_table_offset + 8 * n > image.file.size):
            raise CorruptImage(
                f"snapshot {snap.id}: L1 table at 0x{snap.l1_table_offset:x} is not "
                "cluster aligned or lies past the end of the file",
                image.path,
            )
        l1 = be_array(image.file.pread(8 * n, snap.l1_table_offset)) if n else be_array(b"")
        mapping = ClusterMap(image.geo, l1, image.l2, snap.disk_size, image.corrupt)
        super().__init__(mapping, image.file, image.data_io, image.backing)
        self.snapshot = snap
        self.image = image
        self.path = image.path
        self.read_only = True

    @property
    def l1(self) -> Any:
        return self.mapping.l1


def _check_can_snapshot(img: Qcow2Image) -> None:
    if img.read_only:
        raise SnapshotError(
            "image is mounted read-only: snapshots cannot be taken or deleted",
            img.path,
            errno.EROFS,
        )
    if img.geo.has_data_file:
        log.error(
            "%s: internal snapshots are not possible in an image with an external data file (QEMU's rule)",
            img.path,
        )
        raise SnapshotError(
            "internal snapshots are not possible with an external data file",
            img.path,
            errno.EOPNOTSUPP,
        )


def _data_clusters(entry: int, cluster_bits: int) -> Iterable[int]:
    """Host clusters one L2 entry holds a reference to (none for unallocated/plain zero)."""
    if entry & COMPRESSED:
        return compressed_host_clusters(entry, cluster_bits)
    off = entry & OFFSET_MASK
    return (off >> cluster_bits,) if off else ()


def _write_table(img: Qcow2Image, snaps: list) -> tuple:
    """Write a snapshot table for snaps to new clusters, durable with its refcounts; (offset, size)."""
    data = snapshot_table.build(snaps)
    if not data:
        return 0, 0
    cs = img.geo.cluster_size
    n = div_round_up(len(data), cs)
    off = img.refcounts.allocate(n)
    img.file.pwrite(data + bytes(n * cs - len(data)), off)
    img.flush_metadata()  # the new clusters' refcounts
    img.file.flush()
    return off, len(data)


def _switch_table(img: Qcow2Image, snaps: list, new: tuple, old: tuple) -> None:
    """One header write points at the new table; then the old table's clusters are freed."""
    h = img.header
    h.nb_snapshots = len(snaps)
    h.snapshots_offset = new[0]
    img.write_header()  # nb_snapshots and snapshots_offset share a sector: one atomic write; flushed
    old_off, old_size = old
    if old_size:
        cs = img.geo.cluster_size
        for c in range(old_off // cs, div_round_up(old_off + old_size, cs)):
            img.refcounts.update(c, -1)
        img.refcounts.write_dirty()
        img.file.flush()


def _table_extent(img: Qcow2Image, snaps: list) -> tuple:
    return img.header.snapshots_offset, len(snapshot_table.build(snaps)) if snaps else 0


def check_can_create(img: Qcow2Image, name: str) -> list:
    """Refuse (SnapshotError) a snapshot NAME that create() could not take; the table otherwise."""
    _check_can_snapshot(img)
    if not name or "\0" in name:
        raise SnapshotError(f"invalid snapshot name {name!r}", img.path, errno.EINVAL)
    snaps = read_all(img)
    if any(s.name == name for s in snaps):
        raise SnapshotError(f"a snapshot named {name!r} already exists", img.path, errno.EEXIST)
    if len(snaps) >= 65536:
        raise SnapshotError("an image holds at most 65536 snapshots", img.path, errno.ENOSPC)
    if img.refcounts.max_refcount < 2:
        raise SnapshotError(
            f"{img.refcounts.bits}-bit refcounts cannot count a second reference: no "
            "internal snapshots in this image",
            img.path,
            errno.EOPNOTSUPP,
        )
    return snaps


def create(img: Qcow2Image, name: str, *, now: Any = None) -> Snapshot:
    """Take an internal snapshot NAME of the active disk, durable when this returns."""
    snaps = check_can_create(img, name)
    # one instant: whatever serves writes from a copy of the mapping (fuse/lanes.py) stops
    # here, and the writes it was serving are complete before the copy is taken
    img.active.changed_all()
    img.flush()  # every acknowledged write is in the metadata the copy is taken from
    cs, cb = img.geo.cluster_size, img.geo.cluster_bits
    rc = img.refcounts
    active = img.active
    l1 = active.l1
    if rc.max_refcount < 0xFFFF:
        _check_headroom(img)
    # 1. the L1 copy
    l1_off = 0
    if len(l1):
        raw = to_be(l1)
        l1_off = rc.allocate(div_round_up(len(raw), cs))
        img.file.pwrite(raw + bytes(-len(raw) % cs), l1_off)
    # 2. one more reference to everything the active L1 reaches; active entries lose COPIED
    step = 2 if img.geo.extended else 1
    for i in range(len(l1)):
        e = l1[i]
        l2_off = e & OFFSET_MASK
        if not l2_off:
            continue
        t = img.l2.load(l2_off)
        changed = False
        for k in range(0, len(t), step):
            x = t[k]
            for c in _data_clusters(x, cb):
                rc.update(c, 1)
            if x & COPIED:
                t[k] = x & ~COPIED
                changed = True
        if changed:
            active.changed_l2(l2_off)
        rc.update(l2_off >> cb, 1)
        if e & COPIED:
            active.set_l1_entry(i, e & ~COPIED)
    img.flush_metadata()  # refcounts, then the L2 and L1 entries without COPIED; the L1 copy too
    img.file.flush()
    # 3. the table with the new entry, then the header
    t_now = time.time() if now is None else now
    snap = Snapshot(
        id=snapshot_table.next_id(snaps),
        name=name,
        l1_table_offset=l1_off,
        l1_size=len(l1),
        disk_size=img.size,
        date_sec=int(t_now),
        date_nsec=int((t_now % 1) * 1e9),
    )
    old = _table_extent(img, snaps)
    new = _write_table(img, snaps + [snap])
    _switch_table(img, snaps + [snap], new, old)
    log.info("%s: took internal snapshot %r (id %s)", img.path, name, snap.id)
    return snap


def _check_headroom(img: Qcow2Image) -> None:
    """Narrow refcounts: refuse before writing anything if one more reference would overflow."""
    rc, cb = img.refcounts, img.geo.cluster_bits
    step = 2 if img.geo.extended else 1
    for e in img.active.l1:
        l2_off = e & OFFSET_MASK
        if not l2_off:
            continue
        clusters = [l2_off >> cb]
        t = img.l2.load(l2_off)
        for k in range(0, len(t), step):
            clusters.extend(_data_clusters(t[k], cb))
        for c in clusters:
            if rc.get(c) >= rc.max_refcount:
                raise SnapshotError(
                    f"cluster {c} is already referenced {rc.max_refcount} times, the most "
                    f"{rc.bits}-bit refcounts can count: no more snapshots",
                    img.path,
                    errno.ERANGE,
                )


def delete(img: Qcow2Image, snap_id: str) -> None:
    """Delete the snapshot with this id and free what only it held; durable when this returns."""
    _check_can_snapshot(img)
    snaps = read_all(img)
    target = next((s for s in snaps if s.id == snap_id), None)
    if target is None:
        raise SnapshotError(f"no snapshot with id {snap_id}", img.path, errno.ENOENT)
    rest = [s for s in snaps if s is not target]
    img.flush()
    cs, cb = img.geo.cluster_size, img.geo.cluster_bits
    rc = img.refcounts
    # 1. the table without it, and the header: from here on nothing references its L1
    old = _table_extent(img, snaps)
    new = _write_table(img, rest)
    _switch_table(img, rest, new, old)
    # 2. what its L1 reached loses one reference; its L1 is freed
    view = SnapshotView(img, target)
    step = 2 if img.geo.extended else 1
    freed_tables = []
    for e in view.l1:
        l2_off = e & OFFSET_MASK
        if not l2_off:
            continue
        t = img.l2.load(l2_off)
        for k in range(0, len(t), step):
            for c in _data_clusters(t[k], cb):
                rc.update(c, -1)
        if rc.update(l2_off >> cb, -1) == 0:
            freed_tables.append(l2_off)
    if target.l1_size:
        for c in range(
            target.l1_table_offset // cs,
            div_round_up(target.l1_table_offset + 8 * target.l1_size, cs),
        ):
            rc.update(c, -1)
    for off in freed_tables:
        img.l2.drop(off)  # free space now: never read through a stale cached copy
    # 3. active entries whose refcount fell back to 1 are COPIED again (written after the refcounts)
    _restore_copied(img)
    img.flush_metadata()
    img.file.flush()
    log.info("%s: deleted internal snapshot %r (id %s)", img.path, target.name, target.id)


def _restore_copied(img: Qcow2Image) -> None:
    cb = img.geo.cluster_bits
    rc = img.refcounts
    active = img.active
    l1 = active.l1
    step = 2 if img.geo.extended else 1
    for i in range(len(l1)):
        e = l1[i]
        l2_off = e & OFFSET_MASK
        if not l2_off or rc.get(l2_off >> cb) != 1:
            continue
        if not e & COPIED:
            active.set_l1_entry(i, e | COPIED)
        t = img.l2.load(l2_off)
        changed = False
        for k in range(0, len(t), step):
            x = t[k]
            off = x & OFFSET_MASK
            if off and not x & (COPIED | COMPRESSED) and rc.get(off >> cb) == 1:
                t[k] = x | COPIED
                changed = True
        if changed:
            active.changed_l2(l2_off)
