"""Cluster mapping (QEMU's qcow2-cluster.c and the L2 half of qcow2-cache.c): the L2 table
cache, guest offset -> host offset lookups, contiguous host runs, and the L2 tables
writes go through (allocated, or copied away from a snapshot, on first use).

qcow2.txt "Cluster mapping": guest cluster ci lives in L1 entry ci >> l2_bits, L2 entry
ci & (l2_entries - 1); with extended L2 each entry is two words (offset, subcluster
bitmap). Cached tables are arrays of native integers (entries.be_array); dirty ones are
written back by Qcow2Image.flush_metadata, after the refcounts they depend on.
"""

from __future__ import annotations

import collections
from array import array
from typing import Callable, Optional

from ..errors import CorruptImage
from ..format import header as fmt
from ..format.entries import ALL_ALLOC as _ALL_ALLOC
from ..format.entries import COMPRESSED as _COMPRESSED
from ..format.entries import COPIED as _COPIED
from ..format.entries import L1E_RESERVED_MASK as _L1_RESERVED
from ..format.entries import OFFSET_MASK as _OFFSET
from ..format.entries import ZERO_FLAG as _ZERO
from ..format.entries import be_array, compressed_host_clusters
from .hostfile import HostFile
from .refcounts import Refcounts

# What a guest range maps to (ClusterMap.map)
UNALLOCATED, ZERO, DATA, COMPRESSED = 0, 1, 2, 3


class ClusterMap:
    """The mapping half of Qcow2Image (a mixin: the state is the image's, set up by its _open)."""

    path: str
    read_only: bool
    header: fmt.Header
    file: HostFile
    data_file: HostFile
    size: int
    cluster_bits: int
    cluster_size: int
    extended: bool
    l2_entries: int
    l2_bits: int
    subcluster_bits: int
    has_data_file: bool
    v3: bool
    l1: array
    l1_dirty: set
    l2_cache: "collections.OrderedDict[int, array]"
    l2_dirty: set
    l2_cache_max: int
    pending_frees: list
    metadata_dirty: bool
    refcounts: Refcounts
    corrupt: Callable[[str], CorruptImage]
    flush_metadata: Callable[[], None]

    def _load_l2(self, offset: int) -> array:
        t = self.l2_cache.get(offset)
        if t is not None:
            self.l2_cache.move_to_end(offset)
            return t
        cs = self.cluster_size
        if offset & (cs - 1):
            raise self.corrupt(f"L2 table offset 0x{offset:x} is not cluster aligned")
        raw = self.file.pread(cs, offset)
        if len(raw) < cs:
            raise self.corrupt(f"L2 table at 0x{offset:x} lies past the end of the file")
        t = be_array(raw)
        self._cache_l2(offset, t)
        return t

    #: the same, for the engine's other modules (snapshots.py); the hot paths call _load_l2
    def load_l2(self, offset: int) -> array:
        return self._load_l2(offset)

    def _cache_l2(self, offset: int, table: array) -> None:
        self.l2_cache[offset] = table
        if len(self.l2_cache) > self.l2_cache_max:
            victim = next(iter(self.l2_cache))
            if victim in self.l2_dirty:
                # Writing a dirty L2 table needs the refcounts it depends on first.
                self.flush_metadata()
            self.l2_cache.pop(victim, None)
            self.refcounts.drop_clean_cache()

    def _l2_for_read(self, l1_index: int) -> Optional[array]:
        if l1_index >= len(self.l1):
            raise self.corrupt("guest offset beyond the L1 table")
        e = self.l1[l1_index]
        if e & _L1_RESERVED:
            raise self.corrupt(f"L1 entry {l1_index} has reserved bits set")
        off = e & _OFFSET
        if off == 0:
            return None
        return self._load_l2(off)

    def map(self, pos: int, end: int) -> tuple:
        """(kind, host, nbytes): what the guest range starting at pos maps to, within one cluster.

        kind is UNALLOCATED, ZERO, DATA (host = host offset of pos) or COMPRESSED
        (host = the L2 entry)."""
        cb = self.cluster_bits
        ci = pos >> cb
        co = pos & (self.cluster_size - 1)
        n = min(end - pos, self.cluster_size - co)
        l2 = self._l2_for_read(ci >> self.l2_bits)
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
            if off == 0 and not (self.has_data_file and e & _COPIED):
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
        scb = self.subcluster_bits
        sc = co >> scb
        alloc = bm & _ALL_ALLOC
        zero = bm >> 32
        if alloc & zero:
            raise self.corrupt(f"extended L2 entry for guest cluster {ci} marks a subcluster both allocated and zero")
        if alloc and off == 0 and not (self.has_data_file and e & _COPIED):
            raise self.corrupt(f"extended L2 entry for guest cluster {ci} has allocated subclusters but no offset")
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

    def _data_run(self, pos: int, end: int, host: int, n: int) -> int:
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
            l2 = self._l2_for_read(ci >> self.l2_bits)
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

    def _l2_for_write(self, l1_index: int) -> array:
        """The active L2 table for l1_index, allocated or copied (if shared with a snapshot) as needed."""
        e = self.l1[l1_index]
        off = e & _OFFSET
        cs = self.cluster_size
        if off and e & _COPIED:
            t = self._load_l2(off)
            return t
        if off:
            # Shared with a snapshot (refcount > 1): copy it; data refcounts already count both users.
            old = self._load_l2(off)
            t = array("Q", old)
            self.pending_frees.append(off >> self.cluster_bits)
        else:
            t = array("Q", bytes(cs))
        new = self.refcounts.allocate(1)
        self.l1[l1_index] = new | _COPIED
        self.l1_dirty.add(l1_index)
        self._cache_l2(new, t)
        self.l2_dirty.add(new)
        self.metadata_dirty = True
        return t

    def _l2_location(self, ci: int) -> tuple:
        l1i = ci >> self.l2_bits
        t = self._l2_for_write(l1i)
        self.l2_dirty.add(self.l1[l1i] & _OFFSET)
        self.metadata_dirty = True
        return t, ci & (self.l2_entries - 1)

    def _free_entry_clusters(self, e: int) -> None:
        """Queue the host clusters an old L2 entry referenced for a refcount decrement after flush."""
        if self.header.has_data_file:
            return  # external data clusters are not refcounted
        if e & _COMPRESSED:
            self.pending_frees.extend(compressed_host_clusters(e, self.cluster_bits))
            return
        off = e & _OFFSET
        if off:
            self.pending_frees.append(off >> self.cluster_bits)
