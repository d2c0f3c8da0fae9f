"""Persistent dirty bitmaps: the qcow2 Bitmaps extension, loaded, tracked and stored as QEMU does.

qcow2.txt "Bitmaps": a directory of entries, each with a bitmap table whose
entries point at data clusters (or say all-zeros / all-ones). Bit k covers guest
bytes [k*g, (k+1)*g) and is stored at byte k/8, bit k%8 (LSB first), which is
bitarray's endian="little".

Lifecycle (QEMU's block/qcow2-bitmap.c, plus the in_use rule of commit
"block/dirty-bitmaps: implement inconsistent bit"):
- read-write open: bitmaps not in_use are loaded and marked in_use on disk
  (autoclear bit cleared, directory rewritten in place, bit set again, flushing
  between); bitmaps found in_use are *inconsistent*: listed, never loaded,
  refuse every command, written back unchanged, removable;
- a bitmap created at run time is written to the directory at once, in_use, so a
  crash leaves an inconsistent record instead of nothing (Launchpad 1814418);
- clean close: data to new clusters, new tables, new directory (in_use cleared),
  flush, header, then the old clusters are freed.
With bitmap_sync=intent (bitmap_intent.py) a recording persistent bitmap is marked in_use
only while the disk grows (resize()): at a read-write open and at creation it is stored
with every data cluster allocated, and each write's granules are durable in its on-disk
data before the write is issued.
"""

from __future__ import annotations

import errno
import logging
from array import array
from typing import TYPE_CHECKING, Callable, Collection, Iterable, Optional, Protocol

from bitarray import bitarray

from ..errors import BitmapError, CorruptImage, FormatError
from ..format import header as fmt
from ..format.entries import be_array, to_be
from ..format.header import align_up, div_round_up
from .bitmap_intent import intent_range, write_bytes
from .dirty_bitmap import DirtyBitmap, default_granularity, table_size_for, validate_name

if TYPE_CHECKING:
    from construct import Container

    from .geometry import Geometry
    from .hostfile import HostFile
    from .refcounts import Refcounts

__all__ = ["BitmapStore", "DirtyBitmap", "default_granularity", "table_size_for", "validate_name"]

log = logging.getLogger(__name__)


class BitmapImage(Protocol):
    """What a BitmapStore uses of its image: a Qcow2Image, which cannot be named here (image.py
    imports repair.py, which imports consistency.py, which imports this module)."""

    @property
    def path(self) -> str: ...

    @property
    def read_only(self) -> bool: ...

    @property
    def header(self) -> fmt.Header: ...

    @property
    def file(self) -> HostFile: ...

    @property
    def size(self) -> int: ...

    @property
    def geo(self) -> Geometry: ...

    @property
    def refcounts(self) -> Refcounts: ...

    def write_header(self) -> None: ...

    def flush_metadata(self) -> None: ...

    def flush(self) -> None: ...


class BitmapStore:
    """All dirty bitmaps of one open image, and their on-disk directory."""

    def __init__(self, image: BitmapImage, sync: str = "close"):
        self.image = image
        #: "close": QEMU's protocol (in_use while open, stored at close); "intent": every
        #: recording persistent bitmap valid on disk at every instant (bitmap_intent.py)
        self.intent = sync == "intent"
        self.bitmaps: dict[str, DirtyBitmap] = {}
        self.recording: list[DirtyBitmap] = []
        #: the recording bitmaps whose on-disk data must cover a write before it is issued
        self.intents: list[DirtyBitmap] = []
        self.dir_offset = 0
        self.dir_size = 0
        #: called before a change that can leave a written granule clean in a recording bitmap
        #: (a new or re-enabled bitmap, a clear, a resize): what writes without marking because
        #: the bits were set (fuse/lanes.py, engine/host_map.py) must stop and drain first
        self.on_change: Optional[Callable[[], None]] = None
        self._load()

    # ------------------------------------------------------------------ loading
    @classmethod
    def directory(cls, img: BitmapImage) -> list:
        """The validated bitmap directory of an open image, [(entry, name, extra data)], without
        loading any bitmap (the consistency check walks it)."""
        store = cls.__new__(cls)
        store.image = img
        store.bitmaps = {}
        return store._read_directory()

    def _read_directory(self) -> list:
        img = self.image
        ext = img.header.bitmaps_ext
        if ext is None:
            return []
        off, size, nb = (
            ext["bitmap_directory_offset"],
            ext["bitmap_directory_size"],
            ext["nb_bitmaps"],
        )
        raw = img.file.pread(size, off)
        if len(raw) < size:
            raise FormatError("bitmap directory lies past the end of the file", img.path)
        entries = []
        pos = 0
        names = set()
        for _ in range(nb):
            if pos + fmt.BITMAP_DIR_ENTRY_HEADER_SIZE > size:
                raise FormatError("bitmap directory is truncated", img.path)
            e = fmt.BitmapDirEntryHeader.parse(raw[pos : pos + fmt.BITMAP_DIR_ENTRY_HEADER_SIZE])
            esize = align_up(fmt.BITMAP_DIR_ENTRY_HEADER_SIZE + e.extra_data_size + e.name_size, 8)
            if pos + esize > size:
                raise FormatError("bitmap directory entry runs past the directory", img.path)
            nstart = pos + fmt.BITMAP_DIR_ENTRY_HEADER_SIZE + e.extra_data_size
            name_raw = bytes(raw[nstart : nstart + e.name_size])
            extra = bytes(raw[pos + fmt.BITMAP_DIR_ENTRY_HEADER_SIZE : nstart])
            self._check_entry(e, name_raw)
            if name_raw in names:
                raise FormatError(
                    f"duplicate bitmap name {name_raw!r} in the bitmap directory", img.path
                )
            names.add(name_raw)
            entries.append((e, name_raw.decode("utf-8", "surrogateescape"), extra))
            pos += esize
        if pos != size:
            raise FormatError("bitmap directory size does not match its entries", img.path)
        self.dir_offset, self.dir_size = off, size
        return entries

    def _check_entry(self, e: Container, name_raw: bytes) -> None:
        """QEMU's check_dir_entry(): an entry QEMU refuses makes the whole image unusable."""
        img = self.image
        cs = img.geo.cluster_size
        bad = (
            e.bitmap_table_size == 0
            or e.bitmap_table_offset == 0
            or e.bitmap_table_offset % cs
            or e.bitmap_table_size > fmt.BME_MAX_TABLE_SIZE
            or not fmt.MIN_BITMAP_GRANULARITY_BITS
            <= e.granularity_bits
            <= fmt.MAX_BITMAP_GRANULARITY_BITS
            or e.flags & fmt.BME_RESERVED_FLAGS
            or e.name_size == 0
            or e.name_size > fmt.MAX_BITMAP_NAME
            or e.type != fmt.BITMAP_TYPE_DIRTY_TRACKING
            or (e.extra_data_size and not e.flags & fmt.BME_FLAG_EXTRA_DATA_COMPATIBLE)
            or b"\0" in name_raw
        )
        if not bad:
            phys = e.bitmap_table_size * cs
            if phys > fmt.BME_MAX_PHYS_SIZE:
                bad = True
            elif not e.flags & fmt.BME_FLAG_IN_USE and img.size > (phys * 8) << e.granularity_bits:
                bad = True
        if bad:
            raise FormatError(f"invalid bitmap directory entry for bitmap {name_raw!r}", img.path)

    def _load(self) -> None:
        img = self.image
        entries = self._read_directory()
        for e, name, extra in entries:
            in_use = bool(e.flags & fmt.BME_FLAG_IN_USE)
            bm = DirtyBitmap(
                name,
                1 << e.granularity_bits,
                img.size,
                enabled=bool(e.flags & fmt.BME_FLAG_AUTO),
                inconsistent=in_use,
            )
            bm.disk_entry = (e.bitmap_table_offset, e.bitmap_table_size, e.flags, extra)
            if not in_use:
                self._load_data(bm)
            self.bitmaps[name] = bm
        self._refresh_recording()

    def activate(self) -> None:
        """Read-write open: mark every loaded bitmap in_use on disk, durably; in intent mode store
        them instead, every data cluster allocated, and never mark them in_use."""
        if self.image.read_only or not any(not b.inconsistent for b in self._on_disk()):
            return
        if self.intent:
            self.store(all_clusters=True)
        else:
            self._mark_in_use_on_disk()

    def _read_table(self, offset: int, size: int) -> array:
        raw = self.image.file.pread(size * 8, offset)
        if len(raw) < size * 8:
            raise CorruptImage("bitmap table lies past the end of the file", self.image.path)
        return be_array(raw)

    def _load_data(self, bm: DirtyBitmap) -> None:
        img = self.image
        cs = img.geo.cluster_size
        assert bm.disk_entry is not None  # only bitmaps read from the directory have data to load
        toff, tsize = bm.disk_entry[0], bm.disk_entry[1]
        table = self._read_table(toff, tsize)
        nbytes = div_round_up(bm.nbits, 8)
        data = bytearray(tsize * cs)
        for j, e in enumerate(table):
            if e & fmt.BME_TABLE_ENTRY_RESERVED_MASK:
                raise FormatError(
                    f"bitmap {bm.name!r}: table entry {j} has reserved bits set", img.path
                )
            off = e & fmt.BME_TABLE_ENTRY_OFFSET_MASK
            if off == 0:
                if e & fmt.BME_TABLE_ENTRY_FLAG_ALL_ONES:
                    data[j * cs : (j + 1) * cs] = b"\xff" * cs
                continue
            if off % cs:
                raise FormatError(
                    f"bitmap {bm.name!r}: table entry {j} is not cluster aligned", img.path
                )
            chunk = img.file.pread(cs, off)
            if len(chunk) < cs:
                raise FormatError(
                    f"bitmap {bm.name!r}: data cluster lies past the end of the file", img.path
                )
            data[j * cs : (j + 1) * cs] = chunk
        bits = bitarray(endian="little")
        bits.frombytes(bytes(data[:nbytes]))
        del bits[bm.nbits :]
        bm.bits = bits

    def _refresh_recording(self) -> None:
        self.recording = [b for b in self.bitmaps.values() if b.recording]
        self.intents = [b for b in self.recording if b.durable is not None]

    # ------------------------------------------------------------------ directory writing
    def _entries_bytes(self, flags_for: Callable[[DirtyBitmap, int], int]) -> bytes:
        out = bytearray()
        for bm in self.bitmaps.values():
            if not bm.persistent or bm.disk_entry is None:
                continue
            toff, tsize, flags, extra = bm.disk_entry
            flags = flags_for(bm, flags)
            name = bm.name.encode("utf-8", "surrogateescape")
            out += fmt.BitmapDirEntryHeader.build(
                dict(
                    bitmap_table_offset=toff,
                    bitmap_table_size=tsize,
                    flags=flags,
                    type=fmt.BITMAP_TYPE_DIRTY_TRACKING,
                    granularity_bits=bm.granularity_bits,
                    name_size=len(name),
                    extra_data_size=len(extra),
                )
            )
            out += extra + name
            out += b"\0" * (align_up(len(out), 8) - len(out))
        return bytes(out)

    def _on_disk(self) -> list:
        return [b for b in self.bitmaps.values() if b.persistent and b.disk_entry is not None]

    def _mark_in_use_on_disk(self) -> None:
        """QEMU's update_ext_header_and_dir_in_place(): in_use set durably before any guest write."""
        img = self.image
        h = img.header
        for bm in self._on_disk():
            toff, tsize, flags, extra = bm.disk_entry
            if not bm.inconsistent:
                bm.disk_entry = (toff, tsize, flags | fmt.BME_FLAG_IN_USE, extra)
        data = self._entries_bytes(lambda bm, f: f)
        assert len(data) == self.dir_size
        h.autoclear_features &= ~fmt.AUTOCLEAR_BITMAPS
        img.write_header()  # flushes
        img.file.pwrite(data, self.dir_offset)
        img.file.flush()
        h.autoclear_features |= fmt.AUTOCLEAR_BITMAPS
        img.write_header()

    def _write_directory(self, *, clear_in_use_for: Collection[DirtyBitmap] = ()) -> list:
        """Write a new directory for the on-disk bitmaps to new clusters and switch the header to it.

        Returns the host clusters of the old directory, for the caller to free after the switch."""
        img = self.image
        h = img.header
        cs = img.geo.cluster_size
        old = []
        if self.dir_offset:
            old = list(
                range(self.dir_offset // cs, div_round_up(self.dir_offset + self.dir_size, cs))
            )
        entries = self._on_disk()
        if len(entries) > fmt.MAX_BITMAPS:
            raise BitmapError(
                f"an image holds at most {fmt.MAX_BITMAPS} bitmaps", img.path, errno.ENOSPC
            )

        def flags_for(bm: DirtyBitmap, f: int) -> int:
            if bm in clear_in_use_for:
                f &= ~fmt.BME_FLAG_IN_USE
            return f

        data = self._entries_bytes(flags_for)
        if len(data) > fmt.MAX_BITMAP_DIRECTORY_SIZE:
            raise BitmapError(
                "bitmap directory would exceed QEMU's size limit", img.path, errno.ENOSPC
            )
        if entries:
            nclusters = div_round_up(len(data), cs)
            off = img.refcounts.allocate(nclusters)
            img.file.pwrite(data + bytes(nclusters * cs - len(data)), off)
            img.flush_metadata()  # refcounts for the new directory, and the directory itself
            img.file.flush()
            h.bitmaps_ext = dict(
                nb_bitmaps=len(entries),
                bitmap_directory_size=len(data),
                bitmap_directory_offset=off,
            )
            h.autoclear_features |= fmt.AUTOCLEAR_BITMAPS
            self.dir_offset, self.dir_size = off, len(data)
        else:
            h.bitmaps_ext = None
            h.autoclear_features &= ~fmt.AUTOCLEAR_BITMAPS
            self.dir_offset, self.dir_size = 0, 0
        img.write_header()
        return old

    def _free_clusters(self, clusters: Iterable[int]) -> None:
        img = self.image
        for c in clusters:
            img.refcounts.update(c, -1)
        img.refcounts.write_dirty()
        img.file.flush()

    def _table_clusters(self, bm: DirtyBitmap) -> list:
        """Host clusters held by a bitmap's on-disk table and data."""
        if bm.disk_entry is None:
            return []
        img = self.image
        cs = img.geo.cluster_size
        toff, tsize = bm.disk_entry[0], bm.disk_entry[1]
        out = list(range(toff // cs, div_round_up(toff + tsize * 8, cs)))
        try:
            table = self._read_table(toff, tsize)
        except CorruptImage:
            return out
        for e in table:
            off = e & fmt.BME_TABLE_ENTRY_OFFSET_MASK
            if off:
                out.append(off // cs)
        return out

    # ------------------------------------------------------------------ commands
    def _writable(self) -> None:
        if self.image.read_only:
            raise BitmapError(
                "image is mounted read-only: bitmap commands are refused",
                self.image.path,
                errno.EROFS,
            )

    def get(self, name: str) -> DirtyBitmap:
        bm = self.bitmaps.get(name)
        if bm is None:
            raise BitmapError(f"no bitmap named {name!r}", self.image.path, errno.ENOENT)
        return bm

    def _usable(self, name: str) -> DirtyBitmap:
        bm = self.get(name)
        if bm.inconsistent:
            log.error(
                "%s: bitmap %r is inconsistent (in use at the last close: crash?); "
                "it refuses every command: remove it (rm .bitmaps/%s) and create a new one",
                self.image.path,
                name,
                name,
            )
            raise BitmapError(
                f"bitmap {name!r} is inconsistent; remove it", self.image.path, errno.EBUSY
            )
        return bm

    def create(
        self,
        name: str,
        granularity: Optional[int] = None,
        *,
        persistent: bool = True,
        enabled: bool = True,
    ) -> DirtyBitmap:
        self._writable()
        img = self.image
        validate_name(name)
        if name in self.bitmaps:
            raise BitmapError(f"a bitmap named {name!r} already exists", img.path, errno.EEXIST)
        if granularity is None:
            granularity = default_granularity(img.geo.cluster_size)
        lo, hi = 1 << fmt.MIN_BITMAP_GRANULARITY_BITS, 1 << fmt.MAX_BITMAP_GRANULARITY_BITS
        if granularity & (granularity - 1) or not lo <= granularity <= hi:
            raise BitmapError(
                f"granularity {granularity} is not a power of two between 512 B and 2 GiB",
                img.path,
                errno.EINVAL,
            )
        if persistent and not img.geo.v3:
            log.error(
                "%s: cannot create persistent bitmap %r: a version 2 (compat=0.10) image cannot hold "
                "bitmaps; upgrade it with qemu-img amend -o compat=1.1",
                img.path,
                name,
            )
            raise BitmapError(
                "version 2 images cannot hold persistent bitmaps", img.path, errno.EOPNOTSUPP
            )
        if persistent and len(self._on_disk()) >= fmt.MAX_BITMAPS:
            raise BitmapError(
                f"an image holds at most {fmt.MAX_BITMAPS} bitmaps", img.path, errno.ENOSPC
            )
        self._changing()
        bm = DirtyBitmap(name, granularity, img.size, persistent=persistent, enabled=enabled)
        if persistent:
            # Write the entry now, with an all-zero table of the right size: a crash leaves a
            # visible record instead of nothing (Launchpad 1814418). In close mode it is in_use
            # (inconsistent after a crash); in intent mode an empty bitmap is already valid, so it
            # is written consistent, and stored with all its data clusters just after.
            tsize = table_size_for(img.size, granularity, img.geo.cluster_size)
            tclusters = div_round_up(tsize * 8, img.geo.cluster_size)
            toff = img.refcounts.allocate(tclusters)
            img.file.pwrite(bytes(tclusters * img.geo.cluster_size), toff)
            flags = (0 if self.intent else fmt.BME_FLAG_IN_USE) | (
                fmt.BME_FLAG_AUTO if enabled else 0
            )
            bm.disk_entry = (toff, tsize, flags, b"")
            self.bitmaps[name] = bm
            try:
                old = self._write_directory()
            except BaseException:
                del self.bitmaps[name]
                raise
            self._free_clusters(old)
            if self.intent:
                self.store(only=[bm], all_clusters=True)  # crash-proof from its creation on
        else:
            self.bitmaps[name] = bm
        self._refresh_recording()
        return bm

    def remove(self, name: str) -> None:
        self._writable()
        bm = self.get(name)
        if bm.disk_entry is not None:
            held = self._table_clusters(bm)
            del self.bitmaps[name]
            try:
                old = self._write_directory()
            except BaseException:
                self.bitmaps[name] = bm
                raise
            self._free_clusters(old + held)
        else:
            del self.bitmaps[name]
        self._refresh_recording()

    def clear(self, name: str) -> None:
        self._writable()
        self._changing()
        bm = self._usable(name)
        bm.data().setall(0)
        if bm.durable is not None:
            bm.durable.setall(0)
            self._rewrite_data(bm)

    def enable(self, name: str) -> None:
        self._writable()
        self._changing()
        bm = self._usable(name)
        bm.enabled = True
        self._set_auto_flag(bm)
        self._refresh_recording()

    def disable(self, name: str) -> None:
        self._writable()
        bm = self._usable(name)
        bm.enabled = False
        self._set_auto_flag(bm)
        self._refresh_recording()

    def resize(self, new_size: int, grow: Callable[[], None]) -> None:
        """The disk grows to new_size through grow() (resize.py). Intent-mode bitmaps cannot stay
        valid on disk while their tables change size, so for the duration they follow QEMU's
        protocol (in_use), and are stored for the new size, valid again, right after."""
        self._changing()
        intents = [b for b in self._on_disk() if b.durable is not None and not b.inconsistent]
        if intents:
            self._mark_in_use_on_disk()
        grow()
        for bm in self.bitmaps.values():
            bm.resize(new_size)
        if intents:
            self.store(only=intents, all_clusters=True)

    def sync_directory(self) -> None:
        """Make every on-disk entry's flags durable now (a close-mode mount otherwise writes
        them at close): a new directory, the header switched, the old one freed."""
        self._writable()
        self._free_clusters(self._write_directory())

    def usable(self, name: str) -> DirtyBitmap:
        """The bitmap, refused (EBUSY, logged) when it is inconsistent."""
        return self._usable(name)

    def _set_auto_flag(self, bm: DirtyBitmap) -> None:
        if bm.disk_entry is not None:
            toff, tsize, flags, extra = bm.disk_entry
            flags = (flags | fmt.BME_FLAG_AUTO) if bm.enabled else (flags & ~fmt.BME_FLAG_AUTO)
            bm.disk_entry = (toff, tsize, flags, extra)
            if bm.durable is not None:
                # intent mode: the flag is on disk before the command returns
                self._free_clusters(self._write_directory())

    def merge(self, src: str, dst: str) -> None:
        self._writable()
        s = self._usable(src)
        d = self._usable(dst)
        if s.granularity == d.granularity:
            bits = d.data()
            bits |= s.data()
        else:
            for start, length, dirty in s.extents():
                if dirty:
                    d.mark(start, length)
        if d.durable is not None:
            d.durable |= d.data()  # on disk: still a superset of the merged bits
            self._rewrite_data(d)

    def _changing(self) -> None:
        if self.on_change is not None:
            self.on_change()

    def all_marked(self, offset: int, length: int) -> bool:
        """Whether every recording bitmap has every granule of [offset, offset+length) dirty
        already (in intent mode durably too: mark() makes `durable` a superset before it
        returns): a write there changes no bitmap."""
        for bm in self.recording:
            gb = bm.granularity_bits
            g0, g1 = offset >> gb, ((offset + length - 1) >> gb) + 1
            for bits in (bm.bits, bm.durable) if bm.durable is not None else (bm.bits,):
                if bits is None or bits.find(0, g0, g1) >= 0:
                    return False
        return True

    def mark(self, offset: int, length: int) -> None:
        """Record a write / write-zeroes / discard in every recording bitmap."""
        if length <= 0:
            return
        for bm in self.recording:
            bm.mark(offset, length)
        if self.intents:
            self._write_intents(offset, length)

    def _write_intents(self, offset: int, length: int) -> None:
        """Intent mode: make the granules of a write durably dirty in every recording bitmap's
        on-disk data before the write is issued (one fdatasync for all of them); nothing to do
        when they all are already (bitmap_intent.py)."""
        img = self.image
        synced = False
        for bm in self.intents:
            gb = bm.granularity_bits
            g0 = offset >> gb
            g1 = ((offset + length - 1) >> gb) + 1
            durable = bm.durable
            assert durable is not None  # every bitmap in self.intents has its durable copy
            if durable.find(0, g0, g1) < 0:
                continue
            r0, r1 = intent_range(g0, g1, gb, bm.nbits)
            durable[r0:r1] = 1
            b0, b1 = r0 >> 3, (r1 + 7) >> 3
            write_bytes(
                img.file,
                bm.data_offsets,
                img.geo.cluster_size,
                durable[b0 << 3 : b1 << 3].tobytes(),
                b0,
            )
            synced = True
        if synced:
            img.file.flush()

    def _rewrite_data(self, bm: DirtyBitmap) -> None:
        """Intent mode, after clear or merge: the on-disk data becomes `durable`, before the
        command returns."""
        img = self.image
        write_bytes(img.file, bm.data_offsets, img.geo.cluster_size, bm.durable.tobytes(), 0)  # type: ignore[union-attr]
        img.file.flush()

    # ------------------------------------------------------------------ storing
    def store(self, *, only: Optional[list] = None, all_clusters: bool = False) -> None:
        """Clean close: store every consistent persistent bitmap (or `only` these) and clear
        in_use (QEMU's order). all_clusters (intent mode): allocate every data cluster, zero or
        not, and keep where they are, so later intents are writes in place."""
        img = self.image
        if img.read_only:
            return
        cs = img.geo.cluster_size
        to_store = only if only is not None else [b for b in self._on_disk() if not b.inconsistent]
        if not to_store and not self._on_disk():
            return
        img.flush()
        old_clusters = []
        for bm in to_store:
            old_clusters += self._table_clusters(bm)
            data = bm.bits.tobytes()
            tsize = table_size_for(img.size, bm.granularity, cs)
            data = data + bytes(tsize * cs - len(data))
            mv = memoryview(data)
            if all_clusters:
                dirty_idx = list(range(tsize))
            else:
                dirty_idx = [
                    j for j in range(tsize) if bm.bits[j * cs * 8 : (j + 1) * cs * 8].any()
                ]
            table = array("Q", bytes(tsize * 8))
            if dirty_idx:
                base = img.refcounts.allocate(len(dirty_idx))
                for k, j in enumerate(dirty_idx):
                    off = base + k * cs
                    img.file.pwrite(mv[j * cs : (j + 1) * cs], off)
                    table[j] = off
            tclusters = div_round_up(tsize * 8, cs)
            toff = img.refcounts.allocate(tclusters)
            tb = to_be(table)
            img.file.pwrite(tb + bytes(tclusters * cs - len(tb)), toff)
            flags = bm.disk_entry[2] & ~fmt.BME_FLAG_IN_USE
            flags = (flags | fmt.BME_FLAG_AUTO) if bm.enabled else (flags & ~fmt.BME_FLAG_AUTO)
            bm.disk_entry = (toff, tsize, flags, bm.disk_entry[3])
            if all_clusters:
                bm.data_offsets = [base + j * cs for j in range(tsize)]
                bm.durable = bm.bits.copy()
            else:
                bm.data_offsets, bm.durable = [], None
        img.flush_metadata()
        img.file.flush()
        old_dir = self._write_directory()
        self._free_clusters(old_dir + old_clusters)
        self._refresh_recording()
