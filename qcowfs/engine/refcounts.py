"""Refcount table and blocks: reading, updating, allocating clusters.

qcow2.txt "Host cluster management": every host cluster holding metadata or
data has a refcount; refcount_bits = 1 << refcount_order; a block holds
cluster_size * 8 / refcount_bits entries. Widths below 8 bits are packed
least-significant-bit first; wider entries are big-endian.

Crash-ordering rules this module keeps (QEMU's; numbered as in docs/crash-ordering.md):
- a new refcount block refcounts itself, is written and flushed, and only then is
  hooked into the refcount table (rule 5);
- a grown refcount table is written and flushed before the header switches to it
  in one write, and the old table is freed afterwards (rule 6).
Updates to existing blocks are cached and written by write_dirty(); the image
layer flushes them before any L2 table that references the new clusters (rule 1).
"""

from __future__ import annotations

import sys
from array import array
from typing import Any, Callable, Optional

from ..errors import CorruptImage, RefcountOverflow, TableLimit
from ..format.entries import be_array, to_be
from ..format.header import HEADER_FIELD_OFFSETS, REFT_RESERVED_MASK, Header, div_round_up
from .hostfile import HostFile

_LITTLE = sys.byteorder == "little"
_ARRAY_CODES = {16: "H", 32: "I", 64: "Q"}


def _array_code(bits: int) -> str:
    code = _ARRAY_CODES[bits]
    if bits == 32 and array("I").itemsize != 4:
        code = "L"
    return code


class RefcountBlock:
    """One refcount block in memory, in native integer form for fast get/set."""

    __slots__ = ("bits", "entries", "data", "mask")

    #: an array of native integers (16 bits and wider) or the raw bytes (8 bits and narrower)
    data: Any

    def __init__(self, bits: int, raw: bytes):
        self.bits = bits
        self.entries = len(raw) * 8 // bits
        self.mask = (1 << bits) - 1
        if bits >= 16:
            self.data = array(_array_code(bits), raw)
            if _LITTLE:
                self.data.byteswap()
        else:
            self.data = bytearray(raw)

    def get(self, i: int) -> int:
        bits = self.bits
        if bits >= 8:
            return self.data[i]
        bit = i * bits
        return (self.data[bit >> 3] >> (bit & 7)) & self.mask

    def set(self, i: int, value: int) -> None:
        bits = self.bits
        if bits >= 8:
            self.data[i] = value
            return
        bit = i * bits
        shift = bit & 7
        b = self.data[bit >> 3]
        self.data[bit >> 3] = (b & ~(self.mask << shift) & 0xFF) | (value << shift)

    def first_free(self, start: int) -> int:
        """Index of the first zero entry at or after start, or -1."""
        bits = self.bits
        if bits >= 16:
            try:
                return self.data.index(0, start)
            except ValueError:
                return -1
        if bits == 8:
            return self.data.find(0, start)
        for i in range(start, self.entries):
            if self.get(i) == 0:
                return i
        return -1

    def first_used(self, start: int, end: int) -> int:
        """Index of the first non-zero entry in [start, end), or -1 (one slice compare when all are zero)."""
        if self.bits >= 8:
            seg = self.data[start:end]
            if self.bits == 8:
                if not seg.strip(b"\0"):
                    return -1
            elif seg == array(seg.typecode, bytes(len(seg) * seg.itemsize)):
                return -1
        for i in range(start, end):
            if self.get(i):
                return i
        return -1

    def set_run(self, start: int, end: int, value: int) -> None:
        """Set entries [start, end) to value (slice assignment for 8-bit and wider refcounts)."""
        if self.bits >= 16:
            self.data[start:end] = array(self.data.typecode, [value]) * (end - start)
        elif self.bits == 8:
            self.data[start:end] = bytes([value]) * (end - start)
        else:
            for i in range(start, end):
                self.set(i, value)

    def to_bytes(self) -> bytes:
        if self.bits >= 16:
            if _LITTLE:
                a = array(self.data.typecode, self.data)
                a.byteswap()
                return a.tobytes()
            return self.data.tobytes()
        return bytes(self.data)


class Refcounts:
    """The refcount structures of one image, with a write-back cache of blocks."""

    def __init__(
        self, file: HostFile, header: Header, write_header_field: Callable[[int, bytes], None]
    ):
        self.file = file
        self.header = header
        self.cluster_size = header.cluster_size
        self.cluster_bits = header.cluster_bits
        self.bits = header.refcount_bits
        self.max_refcount = (1 << self.bits) - 1
        self.entries_per_block = self.cluster_size * 8 // self.bits
        self._write_header_field = write_header_field
        self.blocks: dict[int, RefcountBlock] = {}
        self.dirty: set[int] = set()
        self.free_hint = 0
        self._load_table()

    # ------------------------------------------------------------------ table
    def _load_table(self) -> None:
        h = self.header
        n = h.refcount_table_clusters * self.cluster_size // 8
        raw = self.file.pread(n * 8, h.refcount_table_offset)
        if len(raw) < n * 8:
            raise CorruptImage("refcount table lies past the end of the file", self.file.path)
        self.table = be_array(raw)

    def block_offset(self, bi: int) -> int:
        if bi >= len(self.table):
            return 0
        e = self.table[bi]
        if e & REFT_RESERVED_MASK:
            raise CorruptImage(f"refcount table entry {bi} has reserved bits set", self.file.path)
        return e & ~REFT_RESERVED_MASK

    def block(self, bi: int) -> RefcountBlock | None:
        """The refcount block with index bi, or None if it is not allocated."""
        blk = self.blocks.get(bi)
        if blk is not None:
            return blk
        off = self.block_offset(bi)
        if off == 0:
            return None
        if off % self.cluster_size:
            raise CorruptImage(f"refcount block {bi} is not cluster aligned", self.file.path)
        raw = self.file.pread(self.cluster_size, off)
        if len(raw) < self.cluster_size:
            raise CorruptImage(f"refcount block {bi} lies past the end of the file", self.file.path)
        blk = RefcountBlock(self.bits, raw)
        self.blocks[bi] = blk
        return blk

    # ------------------------------------------------------------------ queries
    def get(self, cluster: int) -> int:
        bi, i = divmod(cluster, self.entries_per_block)
        blk = self.block(bi)
        return blk.get(i) if blk is not None else 0

    def update(self, cluster: int, delta: int) -> int:
        """Add delta to a cluster's refcount in the cache; returns the new value."""
        bi, i = divmod(cluster, self.entries_per_block)
        blk = self.block(bi)
        if blk is None:
            if delta < 0:
                raise CorruptImage(
                    f"refcount of cluster {cluster} would drop below zero", self.file.path
                )
            self._create_block(bi)
            blk = self.block(bi)
            assert blk is not None
        value = blk.get(i) + delta
        if value < 0:
            raise CorruptImage(
                f"refcount of cluster {cluster} would drop below zero", self.file.path
            )
        if value > self.max_refcount:
            raise RefcountOverflow(
                f"refcount of cluster {cluster} would overflow {self.bits}-bit refcounts",
                self.file.path,
            )
        blk.set(i, value)
        self.dirty.add(bi)
        if value == 0 and cluster < self.free_hint:
            self.free_hint = cluster
        return value

    # ------------------------------------------------------------------ allocation
    def _next_free(self, c: int) -> int:
        """The first cluster at or after c whose refcount is 0."""
        epb = self.entries_per_block
        while True:
            bi, i = divmod(c, epb)
            blk = self.block(bi) if bi < len(self.table) else None
            if blk is None:
                return c
            j = blk.first_free(i)
            if j >= 0:
                return bi * epb + j
            c = (bi + 1) * epb

    def _missing_blocks(self, first: int, count: int) -> list:
        epb = self.entries_per_block
        return [
            b
            for b in range(first // epb, (first + count - 1) // epb + 1)
            if b >= len(self.table) or self.block_offset(b) == 0
        ]

    def allocate(self, n: int) -> int:
        """Allocate n contiguous clusters with refcount 1 (in the cache); returns the host offset.

        Refcount blocks missing for the run are placed in front of it (QEMU too puts new
        blocks next to the clusters they describe), so any run length can be contiguous."""
        c = self.free_hint
        while True:
            c = self._next_free(c)
            k = 0
            while True:
                missing = self._missing_blocks(c, n + k)
                if len(missing) == k:
                    break
                k = len(missing)
            busy = self._first_used(c + 1, c + n + k)
            if busy is not None:
                c = busy + 1
                continue
            if missing and missing[-1] >= len(self.table):
                self._grow_table(missing[-1])
                continue
            if missing:
                self._place_blocks(missing, c)
                c += len(missing)
            break
        self._set_free_run_to_one(c, n)
        self.free_hint = c + n
        return c << self.cluster_bits

    def _first_used(self, start: int, end: int) -> Optional[int]:
        """The first cluster in [start, end) with a non-zero refcount, or None."""
        epb = self.entries_per_block
        c = start
        while c < end:
            bi, i = divmod(c, epb)
            j = min(epb, i + (end - c))
            blk = self.block(bi) if bi < len(self.table) else None
            if blk is not None:
                k = blk.first_used(i, j)
                if k >= 0:
                    return bi * epb + k
            c = bi * epb + j
        return None

    def _set_free_run_to_one(self, c: int, n: int) -> None:
        """Refcount 1 for the free clusters [c, c+n), a block's share at a time."""
        epb = self.entries_per_block
        end = c + n
        while c < end:
            bi, i = divmod(c, epb)
            j = min(epb, i + (end - c))
            blk = self.block(bi)
            if blk is None:  # not placed by allocate(): let update() create it
                for x in range(c, bi * epb + j):
                    self.update(x, 1)
            else:
                blk.set_run(i, j, 1)
                self.dirty.add(bi)
            c = bi * epb + j

    def _place_blocks(self, indexes: list, at: int) -> None:
        """Create refcount blocks `indexes` in the free clusters at, at+1, ...; each is refcounted
        (by itself, a sibling or an existing block), written and flushed, then hooked into the
        table (rule 5)."""
        cs = self.cluster_size
        epb = self.entries_per_block
        new = {bi: RefcountBlock(self.bits, bytes(cs)) for bi in indexes}
        for j in range(len(indexes)):
            x = at + j
            xb = x // epb
            if xb in new:
                new[xb].set(x % epb, 1)
            else:
                self.update(x, 1)
        for j, bi in enumerate(indexes):
            self.file.pwrite(new[bi].to_bytes(), (at + j) * cs)
        self.write_dirty()
        self.file.flush()
        # Hook them in dependency order: a block whose own refcount lives in another new
        # block is hooked only after that block's table entry is durable (else a crash can
        # leave a referenced refcount block with refcount 0). Levels cannot cycle: the
        # blocks sit in ascending clusters and cover ascending ranges.
        position = {bi: at + j for j, bi in enumerate(indexes)}

        def level(bi: int) -> int:
            holder = position[bi] // epb
            return 0 if holder == bi or holder not in new else level(holder) + 1

        by_level: dict = {}
        for bi in indexes:
            by_level.setdefault(level(bi), []).append(bi)
        for lvl in sorted(by_level):
            for bi in by_level[lvl]:
                offset = position[bi] * cs
                self.table[bi] = offset
                self.file.pwrite(
                    offset.to_bytes(8, "big"), self.header.refcount_table_offset + bi * 8
                )
                self.blocks[bi] = new[bi]
            self.file.flush()

    def _create_block(self, bi: int) -> None:
        """Create refcount block bi at the first cluster of the range it covers (so it refcounts
        itself), write and flush it, then hook it into the table (rule 5)."""
        if bi >= len(self.table):
            self._grow_table(bi)
            return
        cs = self.cluster_size
        epb = self.entries_per_block
        cluster = bi * epb
        blk = RefcountBlock(self.bits, bytes(cs))
        blk.set(0, 1)
        offset = cluster * cs
        self.file.pwrite(blk.to_bytes(), offset)
        self.file.flush()
        self.table[bi] = offset
        self.file.pwrite(offset.to_bytes(8, "big"), self.header.refcount_table_offset + bi * 8)
        self.file.flush()
        self.blocks[bi] = blk

    def _grow_table(self, bi: int) -> None:
        """Grow the refcount table so that it holds entry bi (rule 6).

        The new blocks and the new table are placed in a fresh area starting at the
        first cluster covered by block bi: blocks first, then the table; the blocks
        refcount the whole area. Everything is written and flushed before the
        header switches to the new table in one write; the old table is freed last.
        """
        cs = self.cluster_size
        epb = self.entries_per_block
        old_len = len(self.table)
        area = bi * epb
        nblocks = 1
        while True:
            entries = max(bi + nblocks, old_len * 2)
            entries = div_round_up(entries * 8, cs) * cs // 8
            table_clusters = div_round_up(entries * 8, cs)
            needed_blocks = div_round_up(nblocks + table_clusters, epb)
            if needed_blocks <= nblocks and entries >= bi + nblocks:
                break
            nblocks = needed_blocks
        if table_clusters * cs > 8 * 1024 * 1024:
            raise TableLimit("refcount table would exceed QEMU's 8 MiB limit", self.file.path)
        new_blocks = {}
        area_len = nblocks + table_clusters
        for j in range(nblocks):
            blk = RefcountBlock(self.bits, bytes(cs))
            lo = (bi + j) * epb
            for k in range(max(area, lo), min(area + area_len, lo + epb)):
                blk.set(k - lo, 1)
            new_blocks[bi + j] = blk
        new_table = array("Q", bytes(entries * 8))
        new_table[:old_len] = self.table
        for j in range(nblocks):
            new_table[bi + j] = (area + j) * cs
        for j, blk in enumerate(new_blocks.values()):
            self.file.pwrite(blk.to_bytes(), (area + j) * cs)
        table_offset = (area + nblocks) * cs
        self.file.pwrite(to_be(new_table), table_offset)
        self.file.flush()
        old_offset = self.header.refcount_table_offset
        old_clusters = self.header.refcount_table_clusters
        # refcount_table_offset (8 bytes at 48) and refcount_table_clusters (4 at 56) in one write
        # refcount_table_offset and refcount_table_clusters are adjacent in the header
        self._write_header_field(
            HEADER_FIELD_OFFSETS["refcount_table_offset"],
            table_offset.to_bytes(8, "big") + table_clusters.to_bytes(4, "big"),
        )
        self.file.flush()
        self.header.refcount_table_offset = table_offset
        self.header.refcount_table_clusters = table_clusters
        self.table = new_table
        self.blocks.update(new_blocks)
        for k in range(old_clusters):
            self.update((old_offset // cs) + k, -1)

    # ------------------------------------------------------------------ write-back
    def write_dirty(self) -> bool:
        """Write every dirty block (no flush). Returns True if anything was written."""
        if not self.dirty:
            return False
        for bi in sorted(self.dirty):
            self.file.pwrite(self.blocks[bi].to_bytes(), self.block_offset(bi))
        self.dirty.clear()
        return True

    def drop_clean_cache(self, keep: int = 256) -> None:
        """Forget clean cached blocks beyond `keep` (bounds memory on huge images)."""
        if len(self.blocks) <= keep:
            return
        for bi in list(self.blocks):
            if bi not in self.dirty and len(self.blocks) > keep:
                del self.blocks[bi]
