"""Refcount computation and rebuild (what `qemu-img check -r all` does for refcounts).

Walks every structure that holds a host cluster (qcow2-facts "Refcounts":
header, L1s, L2s, data, refcount table and blocks, snapshot table and snapshot
L1s, bitmap directory, tables and data) and counts references. Used to rebuild
refcounts when a lazy-refcounts image is found with the dirty bit set.
"""

from __future__ import annotations

import collections
import logging
import struct

from . import format as fmt
from .format import div_round_up
from .refcounts import RefcountBlock

log = logging.getLogger(__name__)


def snapshot_l1_tables(img) -> list:
    """(l1_offset, l1_size) of every internal snapshot, and the snapshot table's extent."""
    h = img.header
    out = []
    pos = h.snapshots_offset
    for _ in range(h.nb_snapshots):
        hdr = img.file.pread(40, pos)
        if len(hdr) < 40:
            break
        l1_off, l1_size = struct.unpack_from(">QI", hdr, 0)
        id_len, name_len = struct.unpack_from(">HH", hdr, 12)
        extra = struct.unpack_from(">I", hdr, 36)[0]
        out.append((l1_off, l1_size))
        pos += fmt.align_up(40 + extra + id_len + name_len, 8)
    return out, pos - h.snapshots_offset


def compute_refcounts(img) -> collections.Counter:
    """Expected refcount of every host cluster, from the metadata."""
    cs = img.cluster_size
    cb = img.cluster_bits
    h = img.header
    counts: collections.Counter = collections.Counter()

    def ref_range(offset: int, length: int) -> None:
        if length <= 0:
            return
        for c in range(offset >> cb, (offset + length - 1 >> cb) + 1):
            counts[c] += 1

    ref_range(0, cs)  # header cluster
    snaps, snap_table_len = snapshot_l1_tables(img)
    if h.nb_snapshots:
        ref_range(h.snapshots_offset, snap_table_len)
    l1s = [(h.l1_table_offset, h.l1_size, True)] + [(o, n, False) for o, n in snaps]
    ext = img.extended
    step = 2 if ext else 1
    for l1_off, l1_size, active in l1s:
        ref_range(l1_off, l1_size * 8)
        if active:
            l1 = img.l1
        else:
            raw = img.file.pread(l1_size * 8, l1_off)
            from .image import _be_array

            l1 = _be_array(raw)
        for e in l1:
            l2_off = e & fmt.OFFSET_MASK
            if not l2_off:
                continue
            counts[l2_off >> cb] += 1
            t = img._load_l2(l2_off)
            for k in range(0, len(t), step):
                le = t[k]
                if le & fmt.QCOW_OFLAG_COMPRESSED:
                    for c in img.compressed_host_clusters(le, cb):
                        counts[c] += 1
                    continue
                off = le & fmt.OFFSET_MASK
                if off and not h.has_data_file:
                    counts[off >> cb] += 1
    # refcount table and blocks
    ref_range(h.refcount_table_offset, h.refcount_table_clusters * cs)
    for bi in range(len(img.refcounts.table)):
        off = img.refcounts.block_offset(bi)
        if off:
            counts[off >> cb] += 1
    # bitmaps
    if h.bitmaps_ext:
        from .bitmaps import BitmapStore

        store = BitmapStore(img)
        ref_range(store.dir_offset, store.dir_size)
        for bm in store.bitmaps.values():
            for c in store._table_clusters(bm):
                counts[c] += 1
    for e in h.extensions:
        if e.magic == fmt.EXT_CRYPTO and len(e.data) >= 16:
            off, length = struct.unpack(">QQ", e.data[:16])
            ref_range(off, length)
    return counts


def rebuild_refcounts(img) -> int:
    """Rewrite every refcount block from computed counts (image must be writable); returns
    the number of entries changed. Clears the dirty bit afterwards."""
    counts = compute_refcounts(img)
    rc = img.refcounts
    epb = rc.entries_per_block
    changed = 0
    max_cluster = max(counts) if counts else 0
    nblocks = div_round_up(max_cluster + 1, epb)
    # existing blocks: fix entries
    for bi in range(max(nblocks, len(rc.table))):
        blk = rc.block(bi) if bi < len(rc.table) else None
        if blk is None:
            if any(counts.get(c) for c in range(bi * epb, (bi + 1) * epb)):
                # needs a block: update() creates it (and grows the table if needed)
                for c in range(bi * epb, (bi + 1) * epb):
                    v = counts.get(c, 0)
                    if v:
                        cur = rc.get(c)
                        if cur != v:
                            rc.update(c, v - cur)
                            changed += 1
            continue
        for i in range(epb):
            c = bi * epb + i
            v = counts.get(c, 0)
            if blk.get(i) != v:
                blk.set(i, v)
                rc.dirty.add(bi)
                changed += 1
    rc.free_hint = 0
    rc.write_dirty()
    img.file.flush()
    if img.header.incompatible_features & fmt.INCOMPAT_DIRTY:
        img.header.incompatible_features &= ~fmt.INCOMPAT_DIRTY
        img.file.pwrite(img.header.incompatible_features.to_bytes(8, "big"), 72)
        img.file.flush()
    log.info("%s: refcounts rebuilt (%d entries changed)", img.path, changed)
    return changed
