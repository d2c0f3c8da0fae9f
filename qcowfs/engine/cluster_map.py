"""Cluster mapping (QEMU's qcow2-cluster.c): guest offset -> host offset through one L1 table
and the shared L2 cache, contiguous host runs, and, for the active disk, the L2 tables writes
go through (allocated, or copied away from a snapshot, on first use).

qcow2.txt "Cluster mapping": guest cluster ci lives in L1 entry ci >> l2_bits, L2 entry
ci & (l2_entries - 1); with extended L2 each entry is two words (offset, subcluster
bitmap). A ClusterMap reads (the active disk's, or a snapshot's L1); an ActiveMap is the
active disk's and also owns what writes change: the L1 entries to write, the host clusters
to free after the next flush, the guest size. Dirty L2 tables are the cache's (l2_cache.py);
Qcow2Image.flush_metadata writes all of it in crash-safe order (docs/crash-ordering.md).
"""

from __future__ import annotations

from array import array
from typing import Callable, Optional

from ..errors import CorruptImage
from ..format.entries import ALL_ALLOC as _ALL_ALLOC
from ..format.entries import COMPRESSED as _COMPRESSED
from ..format.entries import COPIED as _COPIED
from ..format.entries import L1E_RESERVED_MASK as _L1_RESERVED
from ..format.entries import OFFSET_MASK as _OFFSET
from ..format.entries import ZERO_FLAG as _ZERO
from ..format.entries import compressed_host_clusters
from .geometry import Geometry
from .l2_cache import L2Cache
from .refcounts import Refcounts

# What a guest range maps to (ClusterMap.map)
UNALLOCATED, ZERO, DATA, COMPRESSED = 0, 1, 2, 3


class ClusterMap:
    """What one L1 table maps: the active disk's (ActiveMap) or a snapshot's."""

    def __init__(
        self,
        geo: Geometry,
        l1: array,
        cache: L2Cache,
        size: int,
        corrupt: Callable[[str], CorruptImage],
    ):
        self.geo = geo
        self.l1 = l1
        self.cache = cache
        #: the guest size this L1 maps (a snapshot keeps the size it was taken at)
        self.size = size
        self.corrupt = corrupt
        # hot-path copies of the geometry (attribute lookups on self, not self.geo)
        self.cluster_bits = geo.cluster_bits
        self.cluster_size = geo.cluster_size
        self.l2_entries = geo.l2_entries
        self.l2_bits = geo.l2_bits
        self.extended = geo.extended

    def l2_for_read(self, l1_index: int) -> Optional[array]:
        if l1_index >= len(self.l1):
            raise self.corrupt("guest offset beyond the L1 table")
        e = self.l1[l1_index]
        if e & _L1_RESERVED:
            raise self.corrupt(f"L1 entry {l1_index} has reserved bits set")
        off = e & _OFFSET
        if off == 0:
            return None
        return self.cache.load(off)

    def map(self, pos: int, end: int) -> tuple:
        """(kind, host, nbytes): what the guest range starting at pos maps to, within one cluster.

        kind is UNALLOCATED, ZERO, DATA (host = host offset of pos) or COMPRESSED
        (host = the L2 entry)."""
        cb = self.cluster_bits
        ci = pos >> cb
        co = pos & (self.cluster_size - 1)
        n = min(end - pos, self.cluster_size - co)
        l2 = self.l2_for_read(ci >> self.l2_bits)
        if l2 is None:
            return UNALLOCATED, 0, n
        l2i = ci & (self.l2_entries - 1)
        if not self.extended:
            e = l2[l2i]
            if e & _COMPRESSED:
                return COMPRESSED, e, n
            if e & _ZERO:
                return ZERO, 0, n
            off = e & _OFFSET
            if off == 0 and not (self.geo.has_data_file and e & _COPIED):
                # offset 0 is valid in an external data file: COPIED tells (QEMU's qcow2_get_cluster_type)
                return UNALLOCATED, 0, n
            if off & (self.cluster_size - 1):
                raise self.corrupt(f"L2 entry for guest cluster {ci} is not cluster aligned")
            return DATA, off + co, n
        e = l2[2 * l2i]
        bm = l2[2 * l2i + 1]
        if e & _COMPRESSED:
            return COMPRESSED, e, n
        off = e & _OFFSET
        scb = self.geo.subcluster_bits
        sc = co >> scb
        alloc = bm & _ALL_ALLOC
        zero = bm >> 32
        if alloc & zero:
            raise self.corrupt(
                f"extended L2 entry for guest cluster {ci} marks a subcluster both allocated and zero"
            )
        if alloc and off == 0 and not (self.geo.has_data_file and e & _COPIED):
            raise self.corrupt(
                f"extended L2 entry for guest cluster {ci} has allocated subclusters but no offset"
            )
        bit = 1 << sc
        kind = DATA if alloc & bit else ZERO if zero & bit else UNALLOCATED
        # extend over following subclusters of the same kind
        last = (co + n - 1) >> scb
        j = sc + 1
        while j <= last:
            b = 1 << j
            k = DATA if alloc & b else ZERO if zero & b else UNALLOCATED
            if k != kind:
                break
            j += 1
        n = min(n, (j << scb) - co)
        if kind == DATA:
            if off & (self.cluster_size - 1):
                raise self.corrupt(f"L2 entry for guest cluster {ci} is not cluster aligned")
            return DATA, off + co, n
        return kind, 0, n

    def data_run(self, pos: int, end: int, host: int, n: int) -> int:
        """Extend a DATA mapping (n bytes at guest pos, host offset host) over the following
        clusters of [pos, end) that continue it on the host; returns the run's length. One
        array comparison for the common case (the rest of the request contiguous within one L2
        table), else cluster by cluster."""
        if pos + n >= end:
            return n
        cb = self.cluster_bits
        cs = self.cluster_size
        if not self.extended:
            ci = (pos + n) >> cb  # pos + n is cluster aligned here
            l2 = self.l2_for_read(ci >> self.l2_bits)
            if l2 is not None:
                i = ci & (self.l2_entries - 1)
                e = l2[i]
                if (e & _OFFSET) == host + n and not e & (_COMPRESSED | _ZERO):
                    want = min(((end - 1) >> cb) - ci + 1, self.l2_entries - i)
                    if want == 1 or l2[i : i + want] == array("Q", range(e, e + want * cs, cs)):
                        n = min(end - pos, n + want * cs)
        while pos + n < end:
            k2, h2, n2 = self.map(pos + n, end)
            if k2 != DATA or h2 != host + n:
                break
            n += n2
        return n


class ActiveMap(ClusterMap):
    """The active disk's mapping, and what its writes change until the next flush."""

    def __init__(
        self,
        geo: Geometry,
        l1: array,
        cache: L2Cache,
        size: int,
        corrupt: Callable[[str], CorruptImage],
        refcounts: Refcounts,
    ):
        super().__init__(geo, l1, cache, size, corrupt)
        self.refcounts = refcounts
        #: L1 indexes whose entries changed in memory
        self.l1_dirty: set[int] = set()
        #: host clusters whose refcount drops once no entry on disk references them any more
        self.pending_frees: list[int] = []
        #: something (L1, L2 entries, frees) waits for the next flush
        self.metadata_dirty = False
        #: called with (first guest cluster, count) before the mapping of those clusters changes
        #: in memory, count 0 for all of them: what serves requests from a copy of the mapping
        #: (fuse/lanes.py) forgets it, and waits until nothing uses the old host clusters
        self.on_change: Optional[Callable[[int, int], None]] = None

    def l2_for_write(self, l1_index: int) -> array:
        """The active L2 table for l1_index, allocated or copied (if shared with a snapshot) as needed."""
        e = self.l1[l1_index]
        off = e & _OFFSET
        cs = self.cluster_size
        if off and e & _COPIED:
            return self.cache.load(off)
        if off:
            # Shared with a snapshot (refcount > 1): copy it; data refcounts already count both users.
            old = self.cache.load(off)
            t = array("Q", old)
            self.pending_frees.append(off >> self.cluster_bits)
        else:
            t = array("Q", bytes(cs))
        new = self.refcounts.allocate(1)
        # dirty and cached before the L1 entry points at it: an eviction's write-back in between
        # then writes the table before that entry (docs/crash-ordering.md rule 4)
        self.cache.mark_dirty(new)
        self.cache.insert(new, t)
        self.set_l1_entry(l1_index, new | _COPIED)
        return t

    def l2_location(self, ci: int, count: int = 1) -> tuple[array, int]:
        """The writable L2 table holding guest cluster ci's entry, and the entry's index; the
        table counts as changed, and so do the `count` entries from ci on (within the table)."""
        self.changing(ci, count)
        l1i = ci >> self.l2_bits
        t = self.l2_for_write(l1i)
        self.cache.mark_dirty(self.l1[l1i] & _OFFSET)
        self.metadata_dirty = True
        return t, ci & (self.l2_entries - 1)

    def changing(self, first: int, count: int) -> None:
        """The mapping of guest clusters [first, first+count) (count 0: all) is about to
        change: on_change, before it does. A caller about to change many entries one by one
        (zeroing a range) says so once first; the per-entry calls then find nothing to wait for."""
        if self.on_change is not None:
            self.on_change(first, count)

    def changed_all(self) -> None:
        """Every cluster's mapping is about to change (snapshots)."""
        self.changing(0, 0)

    def set_l1_entry(self, l1_index: int, value: int) -> None:
        self.changing(l1_index << self.l2_bits, self.l2_entries)
        self.l1[l1_index] = value
        self.l1_dirty.add(l1_index)
        self.metadata_dirty = True

    def changed_l2(self, offset: int) -> None:
        """A cached table at offset was changed in place (snapshots move COPIED flags)."""
        self.changed_all()  # which guest clusters the table maps is not known here
        self.cache.mark_dirty(offset)
        self.metadata_dirty = True

    def resized(self, size: int, l1: Optional[array] = None) -> None:
        """The disk grew to size (resize.py), with a new L1 table already on disk when the old
        one was too small (after a flush: nothing of the old one was dirty)."""
        self.changed_all()
        if l1 is not None:
            assert not self.l1_dirty, "the L1 table moved with entries not yet written"
            self.l1 = l1
        self.size = size

    def l1_entry_written(self, l1_index: int, value: int) -> None:
        """An L1 entry repair wrote to the disk itself: memory follows, nothing to write."""
        self.changing(l1_index << self.l2_bits, self.l2_entries)
        self.l1[l1_index] = value

    def free_later(self, clusters: list[int]) -> None:
        self.pending_frees.extend(clusters)

    def free_entry_clusters(self, e: int) -> None:
        """Queue the host clusters an old L2 entry referenced for a refcount decrement after flush."""
        if self.geo.has_data_file:
            return  # external data clusters are not refcounted
        if e & _COMPRESSED:
            self.pending_frees.extend(compressed_host_clusters(e, self.cluster_bits))
            return
        off = e & _OFFSET
        if off:
            self.pending_frees.append(off >> self.cluster_bits)
