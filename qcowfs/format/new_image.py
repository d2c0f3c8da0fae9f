"""A new qcow2 image laid out in one piece (what a backup file is): no I/O.

qcow2.txt lets every cluster but the header's live anywhere, so a writer that knows up front
how many data clusters it will write can place them first and the metadata after them:

    cluster 0                     header, backing format extension, backing file name
    clusters 1 .. E               an encrypted image's LUKS header (crypt_method 2: qcow2.txt
                                  "Full disk encryption header pointer"), else none
    clusters E+1 .. E+D           data slots, in guest order (one per planned data cluster)
    then                          L2 tables (one per L1 entry in use), the L1 table,
                                  the refcount blocks, the refcount table

A slot whose cluster turned out to hold only zeros is never written and never referenced:
its refcount is 0, which is free space, not a leak (qemu-img check counts a leak only where a
refcount is above the references). Refcounts are 16 bits (refcount_order 4, QEMU's default),
the image is version 3 (compat 1.1: zero clusters exist only there), standard L2 entries.
"""

from __future__ import annotations

import dataclasses
import sys
from array import array
from typing import Iterable, Optional

from .entries import COPIED, ZERO_FLAG, to_be
from .header import (
    COMPRESSION_ZLIB,
    EXT_CRYPTO,
    Extension,
    Header,
    div_round_up,
    l1_entries_needed,
)

#: version 3 header with the compression type field, as QEMU >= 5.1 writes it
HEADER_LENGTH = 112
REFCOUNT_ORDER = 4  # 16-bit refcounts
REFCOUNT_BYTES = 2


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where everything of a new image goes, in clusters (see the module docstring)."""

    size: int
    cluster_bits: int
    data_slots: int
    #: the L1 indexes that get an L2 table, in order; the i-th gets cluster l2_start + i
    l2_indexes: tuple[int, ...]
    l1_entries: int
    l1_clusters: int
    refblocks: int
    reftable_clusters: int
    #: clusters of the LUKS header, right after the header's (0: not encrypted)
    crypt_clusters: int = 0

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def data_start(self) -> int:
        """Host offset of data slot 0."""
        return (1 + self.crypt_clusters) << self.cluster_bits

    @property
    def l2_start(self) -> int:
        return 1 + self.crypt_clusters + self.data_slots

    @property
    def l1_start(self) -> int:
        return self.l2_start + len(self.l2_indexes)

    @property
    def refblock_start(self) -> int:
        return self.l1_start + self.l1_clusters

    @property
    def reftable_start(self) -> int:
        return self.refblock_start + self.refblocks

    @property
    def total_clusters(self) -> int:
        return self.reftable_start + self.reftable_clusters

    @property
    def file_size(self) -> int:
        return self.total_clusters << self.cluster_bits

    def slot_offset(self, slot: int) -> int:
        return (1 + self.crypt_clusters + slot) << self.cluster_bits


def plan(
    size: int,
    cluster_bits: int,
    data_slots: int,
    l2_indexes: Iterable[int],
    crypt_header_bytes: int = 0,
) -> Layout:
    """The layout of an image of `size` guest bytes with `data_slots` data clusters whose L2
    entries live in the tables of `l2_indexes` (L1 indexes), and an encryption header of
    `crypt_header_bytes` (0: none)."""
    cs = 1 << cluster_bits
    l2s = tuple(sorted(set(l2_indexes)))
    l1_entries = l1_entries_needed(size, cluster_bits, 8)
    l1_clusters = max(1, div_round_up(8 * l1_entries, cs))
    crypt_clusters = div_round_up(crypt_header_bytes, cs)
    per_block = cs // REFCOUNT_BYTES
    fixed = 1 + crypt_clusters + data_slots + len(l2s) + l1_clusters
    # the refcount structures cover themselves too: grow them until they do
    blocks, table = 1, 1
    while True:
        total = fixed + blocks + table
        need_blocks = div_round_up(total, per_block)
        need_table = max(1, div_round_up(8 * need_blocks, cs))
        if need_blocks <= blocks and need_table <= table:
            break
        blocks, table = max(blocks, need_blocks), max(table, need_table)
    return Layout(
        size, cluster_bits, data_slots, l2s, l1_entries, l1_clusters, blocks, table, crypt_clusters
    )


def metadata(
    layout: Layout,
    tables: dict[int, array],
    used_slots: Iterable[int],
    backing_file: Optional[str] = None,
    crypt_header: Optional[bytes] = None,
) -> list[tuple[int, bytes]]:
    """The (host offset, bytes) writes that make the image: the LUKS header, L2 tables, L1
    table, refcount blocks and table, and last the header (written last, it is what makes the
    file a qcow2 image).

    tables maps each L1 index of layout.l2_indexes to its L2 entries (native order: data_entry(),
    ZERO_ENTRY or 0); used_slots are the slots those entries reference (refcount 1; the other
    slots are free space). crypt_header: the LUKS header and key material for an encrypted image
    (the layout planned its clusters; the data slots hold data encrypted with its master key)."""
    cb = layout.cluster_bits
    cs = layout.cluster_size
    where = {idx: layout.l2_start + i for i, idx in enumerate(layout.l2_indexes)}
    out: list[tuple[int, bytes]] = []
    extensions = []
    if crypt_header is not None:
        if not crypt_header or div_round_up(len(crypt_header), cs) != layout.crypt_clusters:
            raise ValueError(
                f"an encryption header of {len(crypt_header)} bytes in a layout planned for "
                f"{layout.crypt_clusters} clusters"
            )
        # qcow2.txt: cluster aligned, its length in bytes; the rest of its last cluster reads
        # as zeros (the file was truncated to size, so it is a hole)
        out.append((cs, crypt_header))
        extensions.append(
            Extension(EXT_CRYPTO, cs.to_bytes(8, "big") + len(crypt_header).to_bytes(8, "big"))
        )
    elif layout.crypt_clusters:
        raise ValueError("a layout with an encryption header, and no header given")
    for idx in layout.l2_indexes:
        t = tables[idx]
        if len(t) != cs // 8:
            raise ValueError(f"L2 table {idx} has {len(t)} entries, not {cs // 8}")
        out.append((where[idx] << cb, to_be(t)))
    l1 = array("Q", bytes(8 * layout.l1_clusters * (cs // 8)))
    for idx, c in where.items():
        l1[idx] = (c << cb) | COPIED
    out.append((layout.l1_start << cb, to_be(l1)))
    # refcounts: header, used data slots, every metadata cluster
    per_block = cs // REFCOUNT_BYTES
    counts = array("H", bytes(REFCOUNT_BYTES * layout.refblocks * per_block))
    for c in range(1 + layout.crypt_clusters):
        counts[c] = 1
    for s in used_slots:
        counts[1 + layout.crypt_clusters + s] = 1
    for c in range(layout.l2_start, layout.total_clusters):
        counts[c] = 1
    if sys.byteorder == "little":  # refcount blocks are big-endian (qcow2.txt)
        counts.byteswap()
    out.append((layout.refblock_start << cb, counts.tobytes()))
    reftable = array("Q", bytes(layout.reftable_clusters * cs))
    for b in range(layout.refblocks):
        reftable[b] = (layout.refblock_start + b) << cb
    out.append((layout.reftable_start << cb, to_be(reftable)))
    h = Header(
        version=3,
        backing_file_offset=0,
        backing_file_size=0,
        cluster_bits=cb,
        size=layout.size,
        crypt_method=2 if crypt_header is not None else 0,
        l1_size=layout.l1_entries,
        l1_table_offset=layout.l1_start << cb,
        refcount_table_offset=layout.reftable_start << cb,
        refcount_table_clusters=layout.reftable_clusters,
        nb_snapshots=0,
        snapshots_offset=0,
        refcount_order=REFCOUNT_ORDER,
        header_length=HEADER_LENGTH,
        compression_type=COMPRESSION_ZLIB,
        backing_file=backing_file,
        backing_format="qcow2" if backing_file is not None else None,
        extensions=extensions,
        crypto_header=(cs, len(crypt_header)) if crypt_header is not None else None,
    )
    out.append((0, h.build()))
    return out


def data_entry(layout: Layout, slot: int) -> int:
    """The L2 entry of a data cluster in `slot` (refcount 1: COPIED, as qcow2.txt requires)."""
    return layout.slot_offset(slot) | COPIED


ZERO_ENTRY = ZERO_FLAG
