"""The consistency check, in the spirit of `qemu-img check` (block/qcow2-refcount.c).

The checker walks every structure that holds a host cluster (header, active and
snapshot L1/L2 tables, data and compressed clusters, refcount table and blocks,
snapshot table, bitmap directory/tables/data, LUKS header area), counts the
references, and compares them with the stored refcounts:
  stored > counted -> leak (harmless, wasted space)      [qemu-img: "Leaked cluster"]
  stored < counted -> corruption (a cluster in use could be reallocated)
It also reports what qemu-img reports as corruptions (reserved bits, unaligned
offsets, references past the end of the file, wrong COPIED flags in the active
tables, invalid bitmap table entries) and, beyond qemu-img, bitmaps left in_use
(inconsistent) and a bitmaps extension whose autoclear bit was dropped.

The walk follows QEMU's qcow2_check_refcounts() so that `qcowfs check --json`
prints the same numbers as `qemu-img check --output=json` (QEMU is the oracle):
- a damaged entry (reserved bits, unaligned offset) is a corruption but still a
  reference: the clusters it points at are counted, so it does not also show up
  as a leak; a reference that runs one cluster or more past the end of the file
  is a corruption and is not counted;
- allocated-clusters counts guest clusters of the active L1 whose L2 entry holds
  a host cluster (normal, zero-allocated or compressed; with an external data
  file the data clusters too), not host clusters; compressed-clusters counts
  the compressed ones; fragmented-clusters counts every compressed cluster and
  every normal/zero-allocated one whose host offset does not follow the previous
  such entry's of the same L2 table (one cluster further on);
- image-end-offset is (highest cluster with a stored or counted refcount + 1)
  * cluster_size, looking only at clusters inside the file;
- total-clusters is the virtual size in clusters.
qemu-img leaves keys that are zero out of its JSON (except check-errors);
qcowfs always prints them.

Exit codes follow qemu-img check: 0 clean, 2 corruptions, 3 leaks only.
It never raises on a damaged image: every problem becomes a finding. Repairs are
in repair.py, opening an image for `qcowfs check` in offline.py, the report in report.py.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import struct
from array import array
from typing import TYPE_CHECKING, Callable, Optional, Protocol, Union

from ..errors import QcowError
from ..format import header as fmt
from ..format.entries import be_array, compressed_descriptor
from ..format.header import div_round_up

if TYPE_CHECKING:
    from .bitmaps import BitmapImage
    from .cluster_map import ActiveMap
    from .l2_cache import L2Cache
    from .refcounts import RefcountBlock

    # for type checking only: bitmaps.py is imported where the bitmaps are checked
    class CheckedImage(BitmapImage, Protocol):
        """What the checker uses of an open image: a Qcow2Image, which cannot be named here
        (image.py imports repair.py, which imports this module); it walks the bitmap directory too."""

        @property
        def active(self) -> ActiveMap: ...

        @property
        def l2(self) -> L2Cache: ...


log = logging.getLogger(__name__)

#: bits 9-63 of a refcount table entry (QEMU's REFT_OFFSET_MASK)
_REFT_OFFSET_MASK = ~fmt.REFT_RESERVED_MASK & ((1 << 64) - 1)
#: QEMU's block layer fails (EIO) any request that ends past this offset (BDRV_MAX_LENGTH:
#: INT64_MAX aligned down to 1 GiB)
_BDRV_MAX_LENGTH = ((1 << 63) - 1) & ~((1 << 30) - 1)


@dataclasses.dataclass
class CheckResult:
    filename: str
    corruptions: int = 0
    leaks: int = 0
    check_errors: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0
    image_end_offset: int = 0
    messages: list = dataclasses.field(default_factory=list)
    warnings: list = dataclasses.field(default_factory=list)

    @property
    def exit_code(self) -> int:
        if self.check_errors:
            return 1
        if self.corruptions:
            return 2
        if self.leaks:
            return 3
        return 0

    def to_json(self) -> dict:
        """qemu-img check's keys (all of them, zeros included), then qcowfs' messages and warnings."""
        d = {
            "filename": self.filename,
            "format": "qcow2",
            "check-errors": self.check_errors,
            "corruptions": self.corruptions,
            "leaks": self.leaks,
            "corruptions-fixed": self.corruptions_fixed,
            "leaks-fixed": self.leaks_fixed,
            "total-clusters": self.total_clusters,
            "allocated-clusters": self.allocated_clusters,
            "fragmented-clusters": self.fragmented_clusters,
            "compressed-clusters": self.compressed_clusters,
            "image-end-offset": self.image_end_offset,
            "messages": self.messages,
            "warnings": self.warnings,
        }
        return d


class Checker:
    """One pass over an open Qcow2Image (read-only or writable for repair)."""

    def __init__(
        self,
        img: CheckedImage,
        progress: Optional[Callable[[float], None]] = None,
        repair: Optional[str] = None,
    ):
        self.img = img
        #: 'all': fix what QEMU fixes during the walk itself (an unaligned zero-allocated entry
        #: becomes a plain zero entry), counted in res.corruptions_fixed
        self.repair = repair
        #: QEMU's "rebuild": the refcount structures cannot be trusted for an in-place repair
        self.rebuild = False
        self.cs = img.geo.cluster_size
        self.cb = img.geo.cluster_bits
        self.file_size = img.file.size
        self.max_refcount = (1 << img.header.refcount_bits) - 1
        self.counts: collections.Counter = collections.Counter()
        self.res = CheckResult(img.path)
        self.progress = progress
        #: (table offset, index, entry, is_l1, data_file) of active-table entries whose COPIED flag must match
        self.copied_checks: list = []

    # ------------------------------------------------------------------ findings
    def corruption(self, msg: str) -> None:
        self.res.corruptions += 1
        if len(self.res.messages) < 1000:
            self.res.messages.append(f"ERROR {msg}")

    def ref(self, offset: int, length: int, what: str) -> bool:
        """Count references to every cluster of [offset, offset+length) (QEMU's qcow2_inc_refcounts_imrt).

        The last cluster of the file may be partly allocated, so a range may run past the end of
        the file by less than a cluster; one cluster or more is a corruption and counts nothing
        (returns False)."""
        if length <= 0:
            return True
        if offset + length - self.file_size >= self.cs:
            self.corruption(
                f"{what} at offset 0x{offset:x} (0x{length:x} bytes) runs past the end of the file "
                f"(0x{self.file_size:x}) by a cluster or more"
            )
            return False
        counts = self.counts
        for c in range(offset >> self.cb, ((offset + length - 1) >> self.cb) + 1):
            n = counts[c]
            if n >= self.max_refcount:
                self.corruption(
                    f"{what}: reference count of cluster {c} overflows "
                    f"{self.img.header.refcount_bits}-bit refcounts"
                )
                continue
            counts[c] = n + 1
        return True

    # ------------------------------------------------------------------ walk
    def run(self) -> CheckResult:
        """QEMU's calculate_refcounts() order: header, active L1, snapshot L1s, snapshot table,
        refcount table, encryption header, bitmaps, refcount blocks (last: a refcount block must
        end up referenced exactly once)."""
        img = self.img
        h = img.header
        self.res.total_clusters = div_round_up(img.size, self.cs)
        self.ref(0, self.cs, "header")
        snaps = self._read_snapshot_table()
        l1s = [(h.l1_table_offset, h.l1_size, True)] + [(o, n, False) for o, n in snaps]
        total = sum(n for _, n, _ in l1s) or 1
        done = 0
        for l1_off, l1_size, active in l1s:

            def tick(k: int, base: int = done) -> None:
                self._tick((base + k) / total)

            self._check_l1(l1_off, l1_size, active, tick)
            done += l1_size
        if h.nb_snapshots:
            self.ref(h.snapshots_offset, self.snapshots_size, "snapshot table")
        self.ref(h.refcount_table_offset, h.refcount_table_clusters * self.cs, "refcount table")
        for e in h.extensions:
            if e.magic == fmt.EXT_CRYPTO and len(e.data) >= 16:
                off, length = struct.unpack(">QQ", e.data[:16])
                self.ref(off, length, "encryption header")
        self._check_bitmaps()
        self._check_refcount_blocks()
        self._compare_refcounts()
        self._check_copied()
        return self.res

    def _tick(self, frac: float) -> None:
        if self.progress:
            self.progress(min(frac, 1.0) * 0.9)

    def _read_snapshot_table(self) -> list:
        """(L1 offset, L1 size) of every snapshot whose L1 can be walked; sets snapshots_size."""
        img = self.img
        h = img.header
        out: list = []
        self.snapshots_size = 0
        if not h.nb_snapshots:
            return out
        if h.has_data_file:
            self.corruption(f"{h.nb_snapshots} snapshots in an image with an external data file")
        pos = h.snapshots_offset
        for i in range(h.nb_snapshots):
            pos = fmt.align_up(pos, 8)
            hdr = img.file.pread(40, pos)
            if len(hdr) < 40:
                self.corruption(f"snapshot table entry {i} lies past the end of the file")
                break
            l1_off, l1_size = struct.unpack_from(">QI", hdr, 0)
            id_len, name_len = struct.unpack_from(">HH", hdr, 12)
            extra = struct.unpack_from(">I", hdr, 36)[0]
            if l1_off % self.cs:
                self.corruption(
                    f"snapshot {i}: L1 table offset 0x{l1_off:x} is not cluster aligned"
                )
            elif l1_size * 8 > fmt.MAX_L1_SIZE:
                self.corruption(f"snapshot {i}: L1 table is too large ({l1_size} entries)")
            else:
                out.append((l1_off, l1_size))
            pos += 40 + extra + id_len + name_len
        self.snapshots_size = pos - h.snapshots_offset
        return out

    def _check_l1(
        self, l1_off: int, l1_size: int, active: bool, tick: Callable[[int], None]
    ) -> None:
        """QEMU's check_refcounts_l1(): a damaged L1 entry is reported and still followed."""
        img = self.img

        if not l1_size:
            return
        self.ref(l1_off, l1_size * 8, "L1 table")
        if l1_off + l1_size * 8 > _BDRV_MAX_LENGTH:
            # QEMU cannot even read it: "I/O error in check_refcounts_l1", the check fails (exit 1)
            self.res.check_errors += 1
            self.res.messages.append(f"ERROR cannot read the L1 table at 0x{l1_off:x}")
            return
        l1 = (
            img.active.l1
            if active
            else be_array(img.file.pread(l1_size * 8, l1_off).ljust(l1_size * 8, b"\0"))
        )
        for i, e in enumerate(l1):
            if i % 64 == 0:
                tick(i)
            if not e:
                continue
            if e & fmt.L1E_RESERVED_MASK:
                self.corruption(f"L1 entry {i} has reserved bits set (0x{e:x})")
            off = e & fmt.OFFSET_MASK
            self.ref(off, self.cs, "L2 table")
            if off % self.cs:
                self.corruption(f"L2 table offset 0x{off:x} (L1 entry {i}) is not cluster aligned")
            # QEMU's check_oflag_copied() looks at active entries with a non-zero offset only
            copied = active and off != 0
            if copied:
                self.copied_checks.append((l1_off, i, e, True, False))
            raw = img.file.pread(self.cs, off).ljust(self.cs, b"\0")
            self._check_l2(be_array(raw), off, active, copied)

    def _check_l2(self, t: array, l2_off: int, active: bool, copied: bool) -> None:
        """QEMU's check_refcounts_l2(); active: count allocated/compressed/fragmented clusters
        (QEMU's CHECK_FRAG_INFO, given for the active L1 only)."""
        img = self.img
        cs = self.cs
        data_file = img.header.has_data_file
        ext = img.geo.extended
        step = 2 if ext else 1
        res = self.res
        next_contiguous = 0
        for k in range(0, len(t), step):
            e = t[k]
            bm = t[k + 1] if ext else 0
            if not e and not bm:
                continue
            idx = k // step
            if e & fmt.QCOW_OFLAG_COMPRESSED:
                if e & fmt.QCOW_OFLAG_COPIED:
                    self.corruption(
                        f"compressed L2 entry {idx} in table 0x{l2_off:x} has COPIED set"
                    )
                    e &= ~fmt.QCOW_OFLAG_COPIED
                if data_file:
                    self.corruption(
                        f"compressed L2 entry {idx} in table 0x{l2_off:x} in an image with "
                        f"an external data file"
                    )
                    continue
                if bm:
                    self.corruption(
                        f"compressed extended L2 entry {idx} in table 0x{l2_off:x} has a subcluster bitmap"
                    )
                    continue
                off, nsec = compressed_descriptor(e, self.cb)
                self.ref(off, nsec * 512 - (off & 511), "compressed cluster")
                if active:
                    res.allocated_clusters += 1
                    res.compressed_clusters += 1
                    res.fragmented_clusters += (
                        1  # QEMU: compressed clusters are fragmented by nature
                    )
                continue
            if e & fmt.L2E_RESERVED_MASK:
                # a corruption, but the entry still holds its cluster (QEMU goes on with it)
                self.corruption(
                    f"L2 entry {idx} in table 0x{l2_off:x} has reserved bits set (0x{e:x})"
                )
            off = e & fmt.OFFSET_MASK
            # QEMU's qcow2_get_cluster_type(): with extended L2 bit 0 means nothing (the
            # subcluster bitmap says what reads as zero), so it is not checked either
            if not off and not (data_file and e & fmt.QCOW_OFLAG_COPIED):
                # unallocated or zero-plain
                if bm & 0xFFFFFFFF:
                    self.corruption(
                        f"extended L2 entry {idx} in table 0x{l2_off:x} has allocated "
                        f"subclusters but no offset"
                    )
                continue
            # normal or zero-allocated: holds a host cluster
            if bm & (bm >> 32) & 0xFFFFFFFF:
                self.corruption(
                    f"extended L2 entry {idx} in table 0x{l2_off:x} marks subclusters "
                    f"both allocated and zero"
                )
            if off % cs:
                if ext:
                    has_data = bool(bm & 0xFFFFFFFF)
                else:
                    has_data = not e & fmt.QCOW_OFLAG_ZERO
                if not has_data and self.repair == "all":
                    # QEMU's fix_l2_entry_by_zero(): a preallocated zero cluster at an unaligned
                    # offset becomes a plain zero cluster; its cluster is then not counted
                    self._zero_entry(l2_off, k, ext, bm)
                    continue
                self.corruption(
                    f"cluster offset 0x{off:x} (L2 entry {idx} in table 0x{l2_off:x}) is not cluster aligned"
                )
            if active:
                res.allocated_clusters += 1
                if next_contiguous and off != next_contiguous:
                    res.fragmented_clusters += 1
                next_contiguous = off + cs
            if not data_file:  # external data clusters are not refcounted
                self.ref(off, cs, "data cluster")
            if copied:
                self.copied_checks.append((l2_off, k, e, False, data_file))

    def _zero_entry(self, l2_off: int, k: int, ext: bool, bm: int) -> None:
        img = self.img
        if ext:
            raw = struct.pack(">QQ", 0, ((bm | (bm << 32)) >> 32 << 32) & ((1 << 64) - 1))
        else:
            raw = struct.pack(">Q", fmt.QCOW_OFLAG_ZERO)
        img.file.pwrite(raw, l2_off + 8 * k)
        img.file.flush()
        img.l2.clear()
        self.res.corruptions_fixed += 1
        if len(self.res.messages) < 1000:
            self.res.messages.append(
                f"Repairing L2 entry {k // (2 if ext else 1)} in table 0x{l2_off:x}: "
                f"unaligned preallocated zero cluster made a plain zero cluster"
            )

    def _check_refcount_blocks(self) -> None:
        """QEMU's check_refblocks(): after every other reference is counted, each refcount block
        must be inside the file and referenced exactly once (by the refcount table)."""
        rc = self.img.refcounts
        nb_clusters = self._nb_clusters()
        for bi, e in enumerate(rc.table):
            if e & fmt.REFT_RESERVED_MASK:
                self.corruption(f"refcount table entry {bi} has reserved bits set (0x{e:x})")
                self.rebuild = True
                continue
            off = e & _REFT_OFFSET_MASK
            if off % self.cs:
                self.corruption(f"refcount block {bi} at 0x{off:x} is not cluster aligned")
                self.rebuild = True
                continue
            c = off >> self.cb
            if c >= nb_clusters:
                # (qemu-img check -r all grows the file to cover it; qcowfs does not)
                self.corruption(f"refcount block {bi} at 0x{off:x} lies outside the image")
                continue
            if off:
                self.ref(off, self.cs, f"refcount block {bi}")
                if self.counts[c] != 1:
                    self.corruption(
                        f"refcount block {bi} at 0x{off:x} refcount={self.counts[c]} "
                        f"(referenced by something else too)"
                    )
                    self.rebuild = True

    def _check_bitmaps(self) -> None:
        img = self.img
        h = img.header
        if h.stale_bitmaps_ext is not None:
            self.res.warnings.append(
                "bitmaps extension present but its autoclear bit is clear (a program without bitmap support "
                "wrote the image): the bitmaps are not trustworthy; opening the image read-write drops them "
                "(their clusters become leaks): run 'qcowfs check --repair=all IMAGE' or mount it read-write once"
            )
            return
        ext = h.bitmaps_ext
        if not ext:
            return
        from .bitmaps import BitmapStore

        off, size = ext["bitmap_directory_offset"], ext["bitmap_directory_size"]
        self.ref(off, size, "bitmap directory")
        try:
            entries = BitmapStore.directory(img)
        except QcowError as e:
            self.corruption(f"bitmap directory: {e.message}")
            return
        for entry, name, _extra in entries:
            if entry.flags & fmt.BME_FLAG_IN_USE:
                self.res.warnings.append(
                    f"bitmap {name!r} is in use (inconsistent: the image was not closed cleanly while it was loaded); "
                    f"its contents cannot be trusted: remove it with 'qcowfs bitmap remove IMAGE {name}' "
                    f"(or rm MOUNTPOINT/.bitmaps/{name}) and recreate it"
                )
            toff, tsize = entry.bitmap_table_offset, entry.bitmap_table_size
            if not self.ref(toff, tsize * 8, f"bitmap {name!r} table"):
                continue
            raw = img.file.pread(tsize * 8, toff)
            for j in range(len(raw) // 8):
                te = struct.unpack_from(">Q", raw, j * 8)[0]
                doff = te & fmt.BME_TABLE_ENTRY_OFFSET_MASK
                if te & fmt.BME_TABLE_ENTRY_RESERVED_MASK:
                    self.corruption(f"bitmap {name!r}: table entry {j} has reserved bits set")
                    continue
                if not doff:
                    continue
                if te & fmt.BME_TABLE_ENTRY_FLAG_ALL_ONES:
                    self.corruption(
                        f"bitmap {name!r}: table entry {j} has both an offset and the all-ones flag"
                    )
                    continue
                if doff % self.cs:
                    self.corruption(f"bitmap {name!r}: table entry {j} is not cluster aligned")
                    continue
                self.ref(doff, self.cs, f"bitmap {name!r} data cluster")

    # ------------------------------------------------------------------ stored refcounts
    def _block(self, bi: int) -> Union[RefcountBlock, str, None]:
        """Refcount block bi as QEMU's qcow2_get_refcount() sees it: None if absent; a string saying
        why if QEMU cannot read it (an offset that is not cluster aligned or past QEMU's largest
        request: a check error for every cluster it covers); reserved bits in the table entry are
        ignored here, and a block past the end of the file reads as zeros."""
        rc = self.img.refcounts
        if bi >= len(rc.table):
            return None
        off = rc.table[bi] & _REFT_OFFSET_MASK
        if not off:
            return None
        if off % self.cs:
            return "not cluster aligned"
        if off + self.cs > _BDRV_MAX_LENGTH:
            return "beyond the largest offset QEMU can read"
        try:
            return rc.block(bi)  # the cached copy (a repair updates it)
        except QcowError:
            pass
        from .refcounts import RefcountBlock

        return RefcountBlock(rc.bits, self.img.file.pread(self.cs, off).ljust(self.cs, b"\0"))

    def _stored(self, c: int) -> Optional[int]:
        blk = self._block(c // self.img.refcounts.entries_per_block)
        if blk is None:
            return 0
        if isinstance(blk, str):
            return None
        return blk.get(c % self.img.refcounts.entries_per_block)

    def _nb_clusters(self) -> int:
        """Clusters QEMU compares: those of the file, and any counted in its partial last cluster."""
        file_clusters = div_round_up(self.file_size, self.cs)
        return max(file_clusters, (max(self.counts) + 1) if self.counts else 0)

    def _compare_refcounts(self) -> None:
        rc = self.img.refcounts
        top = self._nb_clusters()
        epb = rc.entries_per_block
        self.leaked: list = []
        self.wrong: list = []
        highest = 0
        nblocks = div_round_up(top, epb)
        for bi in range(nblocks):
            blk = self._block(bi)
            base = bi * epb
            n = min(epb, top - base)
            if isinstance(blk, str):
                # QEMU: "Can't get refcount for cluster N", a check error for each cluster
                self.res.check_errors += n
                if len(self.res.messages) < 1000:
                    self.res.messages.append(
                        f"ERROR cannot read the refcounts of clusters {base}-{base + n - 1}: "
                        f"refcount block {bi} is {blk}"
                    )
                continue
            for i in range(n):
                c = base + i
                stored = blk.get(i) if blk is not None else 0
                want = self.counts.get(c, 0)
                if stored or want:
                    highest = c
                if stored == want:
                    continue
                if stored > want:
                    self.res.leaks += 1
                    self.leaked.append((c, stored, want))
                    if len(self.res.messages) < 1000:
                        self.res.messages.append(
                            f"Leaked cluster {c} refcount={stored} reference={want}"
                        )
                else:
                    if stored == 0:
                        self.rebuild = True
                    self.wrong.append((c, stored, want))
                    self.corruption(f"cluster {c} refcount={stored} reference={want}")
            if self.progress and bi % 16 == 0:
                self.progress(0.9 + 0.1 * bi / max(1, nblocks))
        self.res.image_end_offset = (highest + 1) * self.cs

    def _check_copied(self) -> None:
        """In the active tables COPIED must be set exactly when the refcount is 1 (with an external
        data file a data cluster's refcount counts as 1)."""
        self.copied_wrong: list = []
        skip_table = False
        # copied_checks holds each active L1 entry followed by the entries of its L2 table
        for table_off, idx, e, is_l1, data_file in self.copied_checks:
            if not is_l1 and skip_table:
                continue
            stored = 1 if data_file else self._stored((e & fmt.OFFSET_MASK) >> self.cb)
            if is_l1:
                # QEMU skips the whole L2 table when it cannot read the table's own refcount
                skip_table = stored is None
            if stored is None:
                continue
            want_copied = stored == 1
            if bool(e & fmt.QCOW_OFLAG_COPIED) != want_copied:
                self.copied_wrong.append((table_off, idx, e, is_l1, data_file))
                what = "L2 table" if is_l1 else "cluster"
                self.corruption(
                    f"OFLAG_COPIED {what}: offset=0x{e & fmt.OFFSET_MASK:x} refcount={stored}"
                )
