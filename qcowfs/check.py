"""Consistency check and repair, in the spirit of `qemu-img check` (block/qcow2-refcount.c).

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

Exit codes follow qemu-img check: 0 clean, 2 corruptions, 3 leaks only.
It never raises on a damaged image: every problem becomes a finding.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import struct
import sys
from typing import Callable, Optional

from . import format as fmt
from .errors import QcowError
from .format import div_round_up

log = logging.getLogger(__name__)


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
            "image-end-offset": self.image_end_offset,
            "messages": self.messages,
            "warnings": self.warnings,
        }
        return d


class Checker:
    """One pass over an open Qcow2Image (read-only or writable for repair)."""

    def __init__(self, img, progress: Optional[Callable[[float], None]] = None):
        self.img = img
        self.cs = img.cluster_size
        self.cb = img.cluster_bits
        self.file_size = img.file.size
        self.counts: collections.Counter = collections.Counter()
        self.res = CheckResult(img.path)
        self.progress = progress
        #: (table offset, index, entry, is_l1) of active-table entries whose COPIED flag must match
        self.copied_checks: list = []

    # ------------------------------------------------------------------ findings
    def corruption(self, msg: str) -> None:
        self.res.corruptions += 1
        if len(self.res.messages) < 1000:
            self.res.messages.append(f"ERROR {msg}")

    def ref(self, offset: int, length: int, what: str) -> bool:
        """Count references to every cluster of [offset, offset+length); False if past EOF."""
        if length <= 0:
            return True
        if offset + length > self.file_size and offset >= self.file_size:
            self.corruption(f"{what} at offset 0x{offset:x} lies past the end of the file (0x{self.file_size:x})")
            return False
        for c in range(offset >> self.cb, ((offset + length - 1) >> self.cb) + 1):
            self.counts[c] += 1
        return True

    # ------------------------------------------------------------------ walk
    def run(self) -> CheckResult:
        img = self.img
        h = img.header
        self.ref(0, self.cs, "header")
        snaps = self._snapshots()
        l1s = [(h.l1_table_offset, h.l1_size, True)] + [(o, n, False) for o, n in snaps]
        total = sum(n for _, n, _ in l1s) or 1
        done = 0
        for l1_off, l1_size, active in l1s:
            self._check_l1(l1_off, l1_size, active, lambda k: self._tick((done + k) / total))
            done += l1_size
        self._check_refcount_structures()
        self._check_bitmaps()
        for e in h.extensions:
            if e.magic == fmt.EXT_CRYPTO and len(e.data) >= 16:
                off, length = struct.unpack(">QQ", e.data[:16])
                self.ref(off, length, "encryption header")
        self._compare_refcounts()
        self._check_copied()
        return self.res

    def _tick(self, frac: float) -> None:
        if self.progress:
            self.progress(min(frac, 1.0) * 0.9)

    def _snapshots(self) -> list:
        img = self.img
        h = img.header
        out = []
        if not h.nb_snapshots:
            return out
        pos = h.snapshots_offset
        for i in range(h.nb_snapshots):
            hdr = img.file.pread(40, pos)
            if len(hdr) < 40:
                self.corruption(f"snapshot table entry {i} lies past the end of the file")
                break
            l1_off, l1_size = struct.unpack_from(">QI", hdr, 0)
            id_len, name_len = struct.unpack_from(">HH", hdr, 12)
            extra = struct.unpack_from(">I", hdr, 36)[0]
            if l1_off % self.cs or l1_size * 8 > fmt.MAX_L1_SIZE:
                self.corruption(f"snapshot {i} has an invalid L1 table (offset 0x{l1_off:x}, {l1_size} entries)")
            else:
                out.append((l1_off, l1_size))
            pos += fmt.align_up(40 + extra + id_len + name_len, 8)
        self.ref(h.snapshots_offset, pos - h.snapshots_offset, "snapshot table")
        return out

    def _check_l1(self, l1_off: int, l1_size: int, active: bool, tick) -> None:
        img = self.img
        from .image import _be_array

        if not self.ref(l1_off, l1_size * 8, "L1 table"):
            return
        l1 = img.l1 if active else _be_array(img.file.pread(l1_size * 8, l1_off).ljust(l1_size * 8, b"\0"))
        for i, e in enumerate(l1):
            if i % 64 == 0:
                tick(i)
            if e & fmt.L1E_RESERVED_MASK:
                self.corruption(f"L1 entry {i} has reserved bits set (0x{e:x})")
                continue
            off = e & fmt.OFFSET_MASK
            if not off:
                continue
            if off % self.cs:
                self.corruption(f"L2 table offset 0x{off:x} (L1 entry {i}) is not cluster aligned")
                continue
            if not self.ref(off, self.cs, "L2 table"):
                continue
            if active:
                self.copied_checks.append((l1_off, i, e, True))
            raw = img.file.pread(self.cs, off)
            self._check_l2(_be_array(raw), off, active)

    def _check_l2(self, t, l2_off: int, active: bool) -> None:
        img = self.img
        h = img.header
        ext = img.extended
        step = 2 if ext else 1
        reserved = fmt.L2E_RESERVED_MASK | (1 if ext else 0)
        for k in range(0, len(t), step):
            e = t[k]
            if not e and (not ext or not t[k + 1]):
                continue
            idx = k // step
            if e & fmt.QCOW_OFLAG_COMPRESSED:
                if e & fmt.QCOW_OFLAG_COPIED:
                    self.corruption(f"compressed L2 entry {idx} in table 0x{l2_off:x} has COPIED set")
                if ext and t[k + 1]:
                    self.corruption(f"compressed extended L2 entry {idx} in table 0x{l2_off:x} has a subcluster bitmap")
                x = 62 - (self.cb - 8)
                off = e & ((1 << x) - 1)
                nsec = ((e >> x) & ((1 << (self.cb - 8)) - 1)) + 1
                start = off & ~511
                self.ref(start, nsec * 512, "compressed cluster")
                continue
            if e & reserved:
                self.corruption(f"L2 entry {idx} in table 0x{l2_off:x} has reserved bits set (0x{e:x})")
                continue
            off = e & fmt.OFFSET_MASK
            if ext:
                bm = t[k + 1]
                if bm & (bm >> 32) & 0xFFFFFFFF:
                    self.corruption(f"extended L2 entry {idx} in table 0x{l2_off:x} marks subclusters both allocated and zero")
                if bm & 0xFFFFFFFF and not off:
                    self.corruption(f"extended L2 entry {idx} in table 0x{l2_off:x} has allocated subclusters but no offset")
            if not off:
                continue
            if off % self.cs:
                self.corruption(f"cluster offset 0x{off:x} (L2 entry {idx} in table 0x{l2_off:x}) is not cluster aligned")
                continue
            if h.has_data_file:
                continue  # external data clusters are not refcounted
            if self.ref(off, self.cs, "data cluster") and active:
                self.copied_checks.append((l2_off, k, e, False))

    def _check_refcount_structures(self) -> None:
        img = self.img
        h = img.header
        rc = img.refcounts
        self.ref(h.refcount_table_offset, h.refcount_table_clusters * self.cs, "refcount table")
        for bi, e in enumerate(rc.table):
            if not e:
                continue
            if e & fmt.REFT_RESERVED_MASK:
                self.corruption(f"refcount table entry {bi} has reserved bits set")
                continue
            if e % self.cs:
                self.corruption(f"refcount block {bi} at 0x{e:x} is not cluster aligned")
                continue
            self.ref(e, self.cs, f"refcount block {bi}")

    def _check_bitmaps(self) -> None:
        img = self.img
        h = img.header
        if h.stale_bitmaps_ext is not None:
            self.res.warnings.append(
                "bitmaps extension present but its autoclear bit is clear (a program without bitmap support "
                "wrote the image): the bitmaps are not trustworthy; opening the image read-write drops them "
                "(their clusters become leaks): run 'qcowfs check --repair=all IMAGE' or mount it read-write once")
            return
        ext = h.bitmaps_ext
        if not ext:
            return
        from .bitmaps import BitmapStore

        off, size = ext["bitmap_directory_offset"], ext["bitmap_directory_size"]
        self.ref(off, size, "bitmap directory")
        try:
            store = BitmapStore.__new__(BitmapStore)
            store.image = img
            store.bitmaps = {}
            entries = store._read_directory()
        except QcowError as e:
            self.corruption(f"bitmap directory: {e.message}")
            return
        for e, name, _extra in entries:
            if e.flags & fmt.BME_FLAG_IN_USE:
                self.res.warnings.append(
                    f"bitmap {name!r} is in use (inconsistent: the image was not closed cleanly while it was loaded); "
                    f"its contents cannot be trusted: remove it with 'qcowfs bitmap remove IMAGE {name}' "
                    f"(or rm MOUNTPOINT/.bitmaps/{name}) and recreate it")
            toff, tsize = e.bitmap_table_offset, e.bitmap_table_size
            if not self.ref(toff, tsize * 8, f"bitmap {name!r} table"):
                continue
            raw = img.file.pread(tsize * 8, toff)
            for j in range(len(raw) // 8):
                te = struct.unpack_from(">Q", raw, j * 8)[0]
                if te & fmt.BME_TABLE_ENTRY_RESERVED_MASK:
                    self.corruption(f"bitmap {name!r}: table entry {j} has reserved bits set")
                    continue
                doff = te & fmt.BME_TABLE_ENTRY_OFFSET_MASK
                if not doff:
                    continue
                if doff % self.cs:
                    self.corruption(f"bitmap {name!r}: table entry {j} is not cluster aligned")
                    continue
                self.ref(doff, self.cs, f"bitmap {name!r} data cluster")

    def _stored(self, c: int) -> Optional[int]:
        try:
            return self.img.refcounts.get(c)
        except QcowError:
            return None

    def _compare_refcounts(self) -> None:
        img = self.img
        rc = img.refcounts
        file_clusters = div_round_up(self.file_size, self.cs)
        top = max(file_clusters, (max(self.counts) + 1) if self.counts else 0)
        self.res.total_clusters = div_round_up(img.size, self.cs)
        epb = rc.entries_per_block
        self.leaked: list = []
        self.wrong: list = []
        for bi in range(div_round_up(top, epb)):
            try:
                blk = rc.block(bi)
            except QcowError as e:
                blk = None
                self.corruption(f"refcount block {bi}: {e.message}")
            base = bi * epb
            for i in range(min(epb, top - base)):
                c = base + i
                stored = blk.get(i) if blk is not None else 0
                want = self.counts.get(c, 0)
                if stored == want:
                    continue
                if stored > want:
                    self.res.leaks += 1
                    self.leaked.append((c, stored, want))
                    if len(self.res.messages) < 1000:
                        self.res.messages.append(f"Leaked cluster {c} refcount={stored} reference={want}")
                else:
                    self.wrong.append((c, stored, want))
                    self.corruption(f"cluster {c} refcount={stored} reference={want}")
            if self.progress and bi % 16 == 0:
                self.progress(0.9 + 0.1 * bi / max(1, div_round_up(top, epb)))
        self.res.image_end_offset = max(self.file_size, top * self.cs if self.counts else 0)
        self.res.allocated_clusters = len(self.counts)

    def _check_copied(self) -> None:
        self.copied_wrong: list = []
        for table_off, idx, e, is_l1 in self.copied_checks:
            stored = self._stored((e & fmt.OFFSET_MASK) >> self.cb)
            if stored is None:
                continue
            want_copied = stored == 1
            if bool(e & fmt.QCOW_OFLAG_COPIED) != want_copied:
                self.copied_wrong.append((table_off, idx, e, is_l1, stored))
                what = "L2 table" if is_l1 else "cluster"
                self.corruption(f"OFLAG_COPIED {what}: offset=0x{e & fmt.OFFSET_MASK:x} refcount={stored}")


def check_image(path: str, repair: Optional[str] = None, progress=None) -> CheckResult:
    """Check (and with repair='leaks'|'all', repair) the image at path. Takes QEMU's locks."""
    from .image import Qcow2Image
    from .locks import ImageLock

    img = Qcow2Image(path, read_only=repair is None)
    lock = ImageLock(img.file.fd, path, write=repair is not None)
    try:
        lock.acquire()
        ck = Checker(img, progress)
        res = ck.run()
        if repair and (res.leaks or (repair == "all" and res.corruptions)):
            fixed_leaks, fixed_corr = apply_repair(img, ck, repair)
            ck2 = Checker(img)
            res = ck2.run()
            res.leaks_fixed = fixed_leaks
            res.corruptions_fixed = fixed_corr
        return res
    finally:
        lock.release()
        img.close(flush=False)


def apply_repair(img, ck: Checker, mode: str) -> tuple:
    """Fix leaks (and with mode 'all', refcounts that are too low and COPIED flags)."""
    rc = img.refcounts
    fixed_leaks = fixed_corr = 0
    for c, stored, want in ck.leaked:
        rc.update(c, want - stored)
        fixed_leaks += 1
    if mode == "all":
        for c, stored, want in ck.wrong:
            if rc.block(c // rc.entries_per_block) is None:
                raise QcowError(f"cannot repair: the refcount block covering cluster {c} is missing; "
                                f"use 'qemu-img check -r all'", img.path)
            rc.update(c, want - stored)
            fixed_corr += 1
    rc.write_dirty()
    img.file.flush()
    if mode == "all":
        from .image import _be_array

        for table_off, idx, e, is_l1, _stored in ck.copied_wrong:
            stored = rc.get((e & fmt.OFFSET_MASK) >> img.cluster_bits)
            ne = (e | fmt.QCOW_OFLAG_COPIED) if stored == 1 else (e & ~fmt.QCOW_OFLAG_COPIED)
            img.file.pwrite(ne.to_bytes(8, "big"), table_off + 8 * idx)
            if is_l1:
                img.l1[idx] = ne
            fixed_corr += 1
        img.l2_cache.clear()
        img.file.flush()
    if img.header.dirty:
        img._set_dirty_bit(False)
    return fixed_leaks, fixed_corr


def rebuild_refcounts(img) -> int:
    """Used on open when a lazy-refcounts image has the dirty bit set: make refcounts exact."""
    ck = Checker(img)
    ck.run()
    fixed = apply_repair(img, ck, "all")
    rc = img.refcounts
    rc.free_hint = 0
    log.info("%s: refcounts rebuilt (%d leaks, %d other fixes)", img.path, fixed[0], fixed[1])
    return sum(fixed)


def format_human(res: CheckResult) -> str:
    lines = list(res.messages)
    if res.corruptions:
        lines.append(f"\n{res.corruptions} errors were found on the image.\n"
                     "Data may be corrupted, or further writes to the image may corrupt it.")
    if res.leaks:
        lines.append(f"\n{res.leaks} leaked clusters were found on the image.\n"
                     "This means waste of disk space, but no harm to data.")
    if res.leaks_fixed or res.corruptions_fixed:
        lines.append(f"The following inconsistencies were found and repaired:\n\n"
                     f"    {res.leaks_fixed} leaked clusters\n    {res.corruptions_fixed} corruptions\n")
    if not res.corruptions and not res.leaks:
        lines.append("No errors were found on the image.")
    for w in res.warnings:
        lines.append(f"Warning: {w}")
    if res.total_clusters:
        pct = 100.0 * res.allocated_clusters / res.total_clusters
        lines.append(f"{res.allocated_clusters}/{res.total_clusters} = {pct:.2f}% allocated")
    lines.append(f"Image end offset: {res.image_end_offset}")
    return "\n".join(lines)


def progress_bar(stream=sys.stderr):
    last = [-1]

    def update(frac: float) -> None:
        pct = int(frac * 100)
        if pct != last[0]:
            last[0] = pct
            stream.write(f"\r    ({pct:3d}/100%)")
            stream.flush()
            if pct >= 100:
                stream.write("\n")

    return update
