"""Qcow2Image: open and validate an image, read and write guest data. No FUSE here.

Reading follows qcow2.txt "Cluster mapping": L1 -> L2 -> data cluster, with
unallocated clusters falling through to the backing file (or zeros), zero
clusters, compressed clusters, extended L2 subclusters and external data files.

Writing keeps QEMU's crash-ordering rules (qcow2-facts "Write ordering"). Data
goes straight to the host file; refcount blocks and L2 tables are cached and
written by flush() in dependency order:
    refcount blocks -> fdatasync -> L2 tables -> fdatasync -> L1 entries -> fdatasync
    -> deferred refcount decrements -> refcount blocks -> fdatasync
so a reference never reaches the disk before the refcount that covers it
(rule 1), copied data and new L2 tables are durable before anything points at
them (rules 3, 4), and a reference is gone from the disk before its cluster's
refcount drops (rule 2). A crash at any point leaks clusters at worst.
"""

from __future__ import annotations

import collections
import logging
import mmap
import os
import sys
from array import array
from typing import Optional

from . import format as fmt
from .backing import vet as vet_named_file
from .compression import decompress_cluster
from .errors import CorruptImage, FormatError, QcowError, ReadOnlyImage, UnsupportedFeature
from .hostfile import HostFile
from .refcounts import Refcounts

log = logging.getLogger(__name__)

_LITTLE = sys.byteorder == "little"
UNALLOCATED, ZERO, DATA, COMPRESSED = 0, 1, 2, 3
_COPIED = fmt.QCOW_OFLAG_COPIED
_COMPRESSED = fmt.QCOW_OFLAG_COMPRESSED
_ZERO = fmt.QCOW_OFLAG_ZERO
_OFFSET = fmt.OFFSET_MASK
_L1_RESERVED = fmt.L1E_RESERVED_MASK
_SUBCLUSTERS = 32
_ALL_ALLOC = (1 << 32) - 1
_ALL_ZERO = _ALL_ALLOC << 32

MAX_BACKING_DEPTH = 64


def _be_array(raw: bytes) -> array:
    a = array("Q", raw)
    if _LITTLE:
        a.byteswap()
    return a


def _to_be(a: array) -> bytes:
    if _LITTLE:
        b = array("Q", a)
        b.byteswap()
        return b.tobytes()
    return a.tobytes()


class RawImage:
    """A raw file used as a backing file: guest offset == file offset."""

    def __init__(self, path: str):
        self.path = path
        self.file = HostFile(path, writable=False)
        self.size = self.file.size
        self.backing = None

    def read(self, offset: int, length: int) -> bytes:
        if offset >= self.size:
            return bytes(length)
        data = self.file.pread(min(length, self.size - offset), offset)
        if len(data) < length:
            data += bytes(length - len(data))
        return data

    def close(self) -> None:
        self.file.close()


def probe_format(path: str) -> str:
    with open(path, "rb") as f:
        return "qcow2" if f.read(4) == fmt.MAGIC else "raw"


def open_backing(name: str, fmt_name: Optional[str], chain: tuple, depth: int, policy: str = "follow"):
    real = os.path.realpath(name)
    if real in chain:
        raise FormatError(f"backing chain loops back to {name}")
    if depth > MAX_BACKING_DEPTH:
        raise FormatError(f"backing chain deeper than {MAX_BACKING_DEPTH}")
    if not os.path.exists(name):
        raise FormatError(f"backing file {name} not found")
    kind = fmt_name or probe_format(name)
    if kind == "raw":
        return RawImage(name)
    if kind == "qcow2":
        return Qcow2Image(name, read_only=True, _chain=chain + (real,), _depth=depth, backing_policy=policy)
    raise UnsupportedFeature(f"backing file {name} has format {kind!r}; qcowfs reads qcow2 and raw")


class Qcow2Image:
    """One qcow2 image (and, below it, its backing chain)."""

    def __init__(self, path: str, read_only: bool = True, *, _chain: tuple = (), _depth: int = 0,
                 cache_bytes: int = 32 << 20, file_factory=HostFile, backing_policy: str = "follow"):
        self.path = path
        self.read_only = read_only
        #: which backing and external data files this image may open (backing.py)
        self.backing_policy = backing_policy
        #: makes the HostFile for the image and its external data file; a recording
        #: variant lets the power-loss tests log every write and flush
        self.file_factory = file_factory
        self.file = file_factory(path, writable=not read_only)
        self.backing = None
        self.data_file = self.file
        self._closed = False
        self._corrupt_logged: set = set()
        #: called when the image turns read-only after corruption (the mount drops its write lock)
        self.on_read_only = None
        try:
            self._open(_chain, _depth, cache_bytes)
        except BaseException:
            self.close(flush=False)
            raise

    # ------------------------------------------------------------------ open
    @classmethod
    def open(cls, path: str, read_only: bool = True, **kw) -> "Qcow2Image":
        return cls(path, read_only=read_only, **kw)

    def _open(self, chain: tuple, depth: int, cache_bytes: int) -> None:
        first = self.file.pread(1 << fmt.MAX_CLUSTER_BITS, 0)
        try:
            h = fmt.parse_header(first)
        except QcowError as e:
            e.path = self.path
            e.args = (f"{self.path}: {e.message}",)
            raise
        self.header = h
        if h.corrupt and not self.read_only:
            raise FormatError("image is marked corrupt; mount it with --read-only, or repair it (qemu-img check -r all)", self.path)
        self.size = h.size
        self.cluster_bits = h.cluster_bits
        self.cluster_size = cs = h.cluster_size
        self.extended = h.extended_l2
        self.l2_entries = h.l2_entries
        self.l2_bits = self.l2_entries.bit_length() - 1
        self.subcluster_bits = self.cluster_bits - 5
        self.compression_type = h.compression_type
        self.v3 = h.version >= 3
        self.has_data_file = h.has_data_file
        # L1 table
        raw = self.file.pread(h.l1_size * 8, h.l1_table_offset) if h.l1_size else b""
        if len(raw) < h.l1_size * 8:
            raise FormatError("L1 table lies past the end of the file", self.path)
        self.l1 = _be_array(raw)
        self.l1_dirty: set[int] = set()
        # L2 cache: offset -> array of native 64-bit words
        self.l2_cache: "collections.OrderedDict[int, array]" = collections.OrderedDict()
        self.l2_dirty: set[int] = set()
        self.l2_cache_max = max(16, cache_bytes // cs)
        self.pending_frees: list = []  # host clusters whose refcount drops after the next flush
        self.metadata_dirty = False
        self.refcounts = Refcounts(self.file, h, self._write_header_bytes)
        # Backing chain / external data file
        me = os.path.realpath(self.path)
        chain = chain + (me,) if me not in chain else chain
        base_dir = os.path.dirname(os.path.abspath(self.path))
        if h.backing_file:
            name = h.backing_file
            if h.backing_file.startswith("json:"):
                raise UnsupportedFeature("json: backing file names are not supported", self.path)
            if not os.path.isabs(name):
                name = os.path.join(base_dir, name)
            vet_named_file(self.path, "backing file", name, self.backing_policy)
            try:
                self.backing = open_backing(name, h.backing_format, chain, depth + 1, self.backing_policy)
            except QcowError as e:
                if e.path is None:
                    e.path = self.path
                    e.args = (f"{self.path}: {e.message}",)
                raise
        if h.has_data_file:
            name = h.data_file
            if not os.path.isabs(name):
                name = os.path.join(base_dir, name)
            vet_named_file(self.path, "external data file", name, self.backing_policy)
            if not os.path.exists(name):
                raise FormatError(f"external data file {h.data_file} not found", self.path)
            self.data_file = self.file_factory(name, writable=not self.read_only)
        self.backing_size = self.backing.size if self.backing is not None else 0
        self._zero_cluster = bytes(cs)
        self._last_compressed: tuple = (None, b"")
        self._rbuf = memoryview(bytearray(0))  # read_view()'s reply buffer

    def start_writing(self) -> None:
        """First writes of a read-write open, done only after everything has been validated
        (and the caller holds the image lock): rebuild refcounts after an unclean lazy-refcount
        close, clear unknown autoclear bits, drop a bitmaps extension that lost its autoclear bit."""
        if self.read_only:
            return
        h = self.header
        if h.dirty:
            from .check import rebuild_refcounts

            log.warning("%s: dirty bit set (lazy refcounts, not closed cleanly): rebuilding refcounts", self.path)
            rebuild_refcounts(self)
        changed = False
        unknown = h.autoclear_features & ~fmt.AUTOCLEAR_KNOWN
        if unknown:
            # qcow2.txt: a writer that does not know an autoclear bit must clear it.
            h.autoclear_features &= ~unknown
            changed = True
        if h.stale_bitmaps_ext is not None:
            # Bitmaps extension written without the autoclear bit: not trustworthy, drop it.
            h.stale_bitmaps_ext = None
            h.extensions = [e for e in h.extensions if e.magic != fmt.EXT_BITMAPS]
            changed = True
        if changed:
            self.write_header()

    # ------------------------------------------------------------------ header
    def _write_header_bytes(self, offset: int, data: bytes) -> None:
        self.file.pwrite(data, offset)

    def write_header(self) -> None:
        """Rewrite cluster 0's header, extensions and backing name (then flush)."""
        data = self.header.build()
        self.file.pwrite(data, 0)
        self.file.flush()

    # ------------------------------------------------------------------ helpers
    def corrupt(self, message: str) -> CorruptImage:
        """Build a CorruptImage for a bad entry met at run time; logged once per message."""
        if message not in self._corrupt_logged:
            self._corrupt_logged.add(message)
            log.error("%s: %s", self.path, message)
        return CorruptImage(message, self.path)

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
        t = _be_array(raw)
        self._cache_l2(offset, t)
        return t

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
        if e & fmt.L1E_RESERVED_MASK:
            raise self.corrupt(f"L1 entry {l1_index} has reserved bits set")
        off = e & _OFFSET
        if off == 0:
            return None
        return self._load_l2(off)

    # ------------------------------------------------------------------ mapping
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

    # ------------------------------------------------------------------ reading
    def read(self, offset: int, length: int) -> bytes:
        """Read guest bytes [offset, offset+length), clipped at the virtual size."""
        if offset >= self.size or length <= 0:
            return b""
        end = min(offset + length, self.size)
        length = end - offset
        # Fast path: the whole request maps to one contiguous host run.
        kind, host, n = self.map(offset, end)
        if kind == DATA:
            n = self._data_run(offset, end, host, n)
            if n == length:
                return self._pread_data(host, n)
        buf = bytearray(length)
        self._read_into(memoryview(buf), offset, end, (kind, host, n), zeroed=True)
        return buf

    def read_view(self, offset: int, length: int) -> memoryview:
        """read() into a buffer that the next read_view() call reuses: for a reply that is sent
        before the next request is served (the FUSE layer). No allocation and no page faults
        of a fresh buffer per request (measured: half the time of a 1 MiB read)."""
        if offset >= self.size or length <= 0:
            return memoryview(b"")
        end = min(offset + length, self.size)
        length = end - offset
        if len(self._rbuf) < length:
            # page aligned (anonymous mmap): the kernel's copy out of the page cache into a
            # buffer at another alignment, such as a bytearray's, measured 2x slower for 1 MiB
            self._rbuf = memoryview(mmap.mmap(-1, max(length, 2 * len(self._rbuf), mmap.PAGESIZE)))
        mv = self._rbuf[:length]
        cs = self.cluster_size
        co = offset & (cs - 1)
        if co + length <= cs and not self.extended:
            # hottest case (a request within one cluster, its L2 table cached): map() inlined
            ci = offset >> self.cluster_bits
            l1i = ci >> self.l2_bits
            if l1i < len(self.l1):
                e1 = self.l1[l1i]
                # reserved bits set: map() below reports the corruption
                l2off = 0 if e1 & _L1_RESERVED else e1 & _OFFSET
                t = self.l2_cache.get(l2off) if l2off else None
                if t is not None:
                    e = t[ci & (self.l2_entries - 1)]
                    host = e & _OFFSET
                    if host and not e & (_COMPRESSED | _ZERO) and not host & (cs - 1):
                        self.l2_cache.move_to_end(l2off)
                        if os.preadv(self.data_file.fd, (mv,), host + co) == length:
                            return mv
        first = kind, host, n = self.map(offset, end)
        if kind == DATA:
            # fast path: the whole request is one contiguous host run
            if n < length:
                n = self._data_run(offset, end, host, n)
            if n == length and self.data_file.preadv_into((mv,), host) == n:
                return mv
        self._read_into(mv, offset, end, first, zeroed=False)
        return mv

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

    def _read_into(self, mv: memoryview, offset: int, end: int, first: tuple, zeroed: bool) -> None:
        """Fill mv with guest bytes [offset, end); first is map(offset, end); zeroed: mv holds zeros."""
        pos = offset
        kind, host, n = first
        while pos < end:
            if pos != offset:
                kind, host, n = self.map(pos, end)
            a = pos - offset
            if kind == DATA:
                # a contiguous DATA run: one preadv
                n = self._data_run(pos, end, host, n)
                got = self.data_file.preadv_into([mv[a : a + n]], host)
                if got < n:
                    if self.header.has_data_file and self.header.data_file_raw:
                        mv[a + got : a + n] = self._zeros(n - got)
                    else:
                        raise self.corrupt(f"data cluster at host offset 0x{host:x} lies past the end of the file")
            elif kind == UNALLOCATED:
                # one backing read for the whole unallocated run
                while pos + n < end:
                    k2, _h2, n2 = self.map(pos + n, end)
                    if k2 != UNALLOCATED:
                        break
                    n += n2
                m = 0
                if self.backing is not None and pos < self.backing_size:
                    m = min(n, self.backing_size - pos)
                    mv[a : a + m] = self.backing.read(pos, m)
                if not zeroed and m < n:
                    mv[a + m : a + n] = self._zeros(n - m)
            elif kind == COMPRESSED:
                data = self._read_compressed(host)
                co = pos & (self.cluster_size - 1)
                mv[a : a + n] = data[co : co + n]
            elif not zeroed:  # ZERO
                mv[a : a + n] = self._zeros(n)
            pos += n

    def _pread_data(self, host: int, n: int) -> bytes:
        data = self.data_file.pread(n, host)
        if len(data) < n:
            if self.header.has_data_file and self.header.data_file_raw:
                return data + bytes(n - len(data))
            raise self.corrupt(f"data cluster at host offset 0x{host:x} lies past the end of the file")
        return data

    def _read_compressed(self, entry: int) -> bytes:
        key, data = self._last_compressed
        if key == entry:
            return data
        cb = self.cluster_bits
        x = 62 - (cb - 8)
        off = entry & ((1 << x) - 1)
        nsec = ((entry >> x) & ((1 << (cb - 8)) - 1)) + 1
        clen = nsec * 512 - (off & 511)
        fsize = self.file.size
        if off >= fsize:
            raise self.corrupt(f"compressed cluster at host offset 0x{off:x} lies past the end of the file")
        raw = self.file.pread(min(clen, fsize - off), off)
        try:
            data = decompress_cluster(raw, self.cluster_size, self.compression_type)
        except CorruptImage as e:
            raise self.corrupt(f"compressed cluster at host offset 0x{off:x}: {e.message}") from None
        self._last_compressed = (entry, data)
        return data

    @staticmethod
    def compressed_host_clusters(entry: int, cluster_bits: int) -> range:
        """Host cluster indexes a compressed descriptor touches (each holds a reference)."""
        x = 62 - (cluster_bits - 8)
        off = entry & ((1 << x) - 1)
        nsec = ((entry >> x) & ((1 << (cluster_bits - 8)) - 1)) + 1
        last = (off & ~511) + nsec * 512 - 1
        return range(off >> cluster_bits, (last >> cluster_bits) + 1)

    # ------------------------------------------------------------------ writing
    def _check_writable(self) -> None:
        if self.read_only:
            raise ReadOnlyImage("image is open read-only", self.path)

    def write(self, offset: int, data) -> None:
        """Write guest bytes at offset. Whole clusters of zeros become zero clusters (detect-zeroes=unmap)."""
        self._check_writable()
        length = len(data)
        if offset + length > self.size:
            raise QcowError(f"write beyond the end of the disk ({offset}+{length} > {self.size})", self.path)
        if length == 0:
            return
        try:
            self._write(offset, memoryview(data).cast("B"))
        except CorruptImage as e:
            self.mark_corrupt(e.message)
            raise

    def _write(self, offset: int, mv: memoryview) -> None:
        cs = self.cluster_size
        end = offset + len(mv)
        # Zero detection on the whole-cluster middle of the request (cheap: first/last byte, then memcmp).
        if self._can_zero_detect():
            first_full = -(-offset // cs) * cs
            last_full = end // cs * cs
            if last_full > first_full:
                a, b = first_full - offset, last_full - offset
                if mv[a] == 0 and mv[b - 1] == 0 and mv[a:b] == self._zeros(b - a):
                    if a:
                        self._write_data(offset, mv[:a])
                    self._zero_clusters(first_full, last_full)
                    if b < len(mv):
                        self._write_data(last_full, mv[b:])
                    return
        self._write_data(offset, mv)

    def _zeros(self, n: int) -> memoryview:
        if len(self._zero_cluster) < n:
            self._zero_cluster = bytes(max(n, 2 * len(self._zero_cluster)))
        return memoryview(self._zero_cluster)[:n]

    def _can_zero_detect(self) -> bool:
        if self.header.has_data_file:
            return False  # the external data file must keep holding the data (data_file_raw)
        if self.v3:
            return True
        return self.backing is None  # v2: unallocated reads zero only without a backing file

    # --- L2 tables for writing ------------------------------------------------
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
            self.pending_frees.extend(self.compressed_host_clusters(e, self.cluster_bits))
            return
        off = e & _OFFSET
        if off:
            self.pending_frees.append(off >> self.cluster_bits)

    # --- zero clusters -----------------------------------------------------------
    def _zero_clusters(self, start: int, end: int) -> None:
        """Make whole clusters [start, end) read as zeros and free what they held."""
        cb = self.cluster_bits
        for ci in range(start >> cb, end >> cb):
            l2 = self._l2_for_read(ci >> self.l2_bits)
            if l2 is None and self.backing is None:
                continue  # already reads zero
            if l2 is not None:
                i = ci & (self.l2_entries - 1)
                if self.extended:
                    e, bm = l2[2 * i], l2[2 * i + 1]
                    if (e & _OFFSET) == 0 and not e & _COMPRESSED and bm == _ALL_ZERO:
                        continue
                    if e == 0 and bm == 0 and self.backing is None:
                        continue
                else:
                    e = l2[i]
                    if e == _ZERO or (e == 0 and self.backing is None):
                        continue
            t, i = self._l2_location(ci)
            if self.extended:
                old = t[2 * i]
                t[2 * i] = 0
                t[2 * i + 1] = _ALL_ZERO
            else:
                old = t[i]
                t[i] = _ZERO if self.v3 else 0
            self._free_entry_clusters(old)

    # --- data ----------------------------------------------------------------
    def _write_data(self, offset: int, mv: memoryview) -> None:
        cs = self.cluster_size
        cb = self.cluster_bits
        end = offset + len(mv)
        if self.extended:
            pos = offset
            while pos < end:
                n = min(end - pos, cs - (pos & (cs - 1)))
                self._write_extended_cluster(pos, mv[pos - offset : pos - offset + n])
                pos += n
            return
        first_ci = offset >> cb
        last_ci = (end - 1) >> cb
        if self._write_in_place(offset, mv, first_ci, last_ci) or self._write_fresh_run(offset, mv, first_ci, last_ci):
            return
        # Pass 1: which clusters can be written in place, which need a new cluster.
        plan = []  # (ci, host or None, old_entry)
        need_alloc = 0
        ext = self.header.has_data_file
        for ci in range(first_ci, last_ci + 1):
            l2 = self._l2_for_read(ci >> self.l2_bits)
            e = l2[ci & (self.l2_entries - 1)] if l2 is not None else 0
            off = e & _OFFSET
            if not e & _COMPRESSED and (off or ext) and e & _COPIED and not e & _ZERO:
                self._check_data_offset(off, ci)
                plan.append((ci, off, e))
            elif ext and not e & _COMPRESSED:
                plan.append((ci, None, e))
            else:
                plan.append((ci, None, e))
                need_alloc += 1
        base = self.refcounts.allocate(need_alloc) if need_alloc else 0
        # Pass 2: write data (merged into contiguous host runs) and update L2 entries.
        run_host = -1
        run_bufs: list = []
        run_len = 0
        new_entries = []
        k = 0
        for ci, host, e in plan:
            cstart = ci << cb
            lo = max(offset, cstart)
            hi = min(end, cstart + cs)
            piece = mv[lo - offset : hi - offset]
            if host is None:
                if ext:
                    host = cstart  # external data file: host offset == guest offset
                else:
                    host = base + k * cs
                    k += 1
                if hi - lo < cs:
                    # partial cluster: copy-on-write the rest from what the guest sees now
                    old = bytearray(self.read(cstart, min(cs, self.size - cstart)))
                    old[lo - cstart : hi - cstart] = piece
                    if len(old) < cs:
                        old += bytes(cs - len(old))
                    piece = memoryview(old)
                    lo = cstart
                new_entries.append((ci, host, e))
                wr_host = host
            else:
                wr_host = host + (lo - cstart)
            if run_bufs and wr_host == run_host + run_len:
                run_bufs.append(piece)
                run_len += len(piece)
            else:
                if run_bufs:
                    self.data_file.pwritev(run_bufs, run_host)
                run_host, run_bufs, run_len = wr_host, [piece], len(piece)
        if run_bufs:
            self.data_file.pwritev(run_bufs, run_host)
        for ci, host, e in new_entries:
            t, i = self._l2_location(ci)
            t[i] = host | _COPIED
            if not ext:
                self._free_entry_clusters(e)

    def _write_in_place(self, offset: int, mv: memoryview, first_ci: int, last_ci: int) -> bool:
        """The common overwrite: every cluster of the request allocated, COPIED (not shared with
        a snapshot) and contiguous on the host, within one L2 table. Checked with one array
        comparison and written with one pwrite; False (nothing done) otherwise."""
        l2i = first_ci >> self.l2_bits
        if l2i != last_ci >> self.l2_bits:
            return False
        l2 = self._l2_for_read(l2i)
        if l2 is None:
            return False
        i = first_ci & (self.l2_entries - 1)
        e = l2[i]
        off = e & _OFFSET
        if not e & _COPIED or e & (_COMPRESSED | _ZERO) or not (off or self.has_data_file):
            return False
        count = last_ci - first_ci + 1
        cs = self.cluster_size
        if count > 1 and l2[i : i + count] != array("Q", range(e, e + count * cs, cs)):
            return False
        self._check_data_offset(off, first_ci)
        if count > 1:
            self._check_data_offset(off + (count - 1) * cs, last_ci)
        self.data_file.pwrite(mv, off + (offset & (cs - 1)))
        return True

    def _write_fresh_run(self, offset: int, mv: memoryview, first_ci: int, last_ci: int) -> bool:
        """The common first write: whole clusters, all unallocated (entry 0), within one L2
        table. Nothing to copy on write (every byte of every cluster is new) and nothing to
        free: one contiguous allocation, one pwrite, one slice of L2 entries. The entries reach
        the disk at the next flush, after the refcounts, as in _write_data (rules 1 and 3)."""
        cs = self.cluster_size
        if self.has_data_file or (offset | len(mv)) & (cs - 1):
            return False
        l2i = first_ci >> self.l2_bits
        if l2i != last_ci >> self.l2_bits:
            return False
        count = last_ci - first_ci + 1
        i = first_ci & (self.l2_entries - 1)
        l2 = self._l2_for_read(l2i)
        if l2 is not None and l2[i : i + count] != array("Q", bytes(8 * count)):
            return False
        base = self.refcounts.allocate(count)
        self.data_file.pwrite(mv, base)
        t, i = self._l2_location(first_ci)
        first = base | _COPIED
        t[i : i + count] = array("Q", range(first, first + count * cs, cs))
        return True

    def _check_data_offset(self, off: int, ci: int) -> None:
        """Refuse to write through an entry QEMU would call corrupt (unaligned, or past the end
        of the file): writing there could overwrite other clusters."""
        if off & (self.cluster_size - 1):
            raise self.corrupt(f"L2 entry for guest cluster {ci} is not cluster aligned (0x{off:x})")
        if not self.has_data_file and off >= self.file.size:
            raise self.corrupt(f"L2 entry for guest cluster {ci} points past the end of the file (0x{off:x})")

    def _write_extended_cluster(self, pos: int, piece: memoryview) -> None:
        """Write within one cluster of an extended-L2 image, at subcluster granularity."""
        cs = self.cluster_size
        scb = self.subcluster_bits
        ci = pos >> self.cluster_bits
        cstart = ci << self.cluster_bits
        co = pos - cstart
        s0 = co >> scb
        s1 = (co + len(piece) - 1) >> scb
        touched = ((1 << (s1 + 1)) - 1) & ~((1 << s0) - 1)
        t, i = self._l2_location(ci)
        e, bm = t[2 * i], t[2 * i + 1]
        off = e & _OFFSET
        ext = self.header.has_data_file
        if not e & _COMPRESSED and e & _COPIED and (off or ext):
            self._check_data_offset(off, ci)
            # In place; subclusters not allocated yet need their untouched parts copied.
            lo = s0 << scb
            hi = (s1 + 1) << scb
            if (lo != co or hi != co + len(piece)) and (bm & touched) != touched:
                buf = bytearray(self.read(cstart + lo, hi - lo))
                buf[co - lo : co - lo + len(piece)] = piece
                self.data_file.pwrite(buf, off + lo)
            else:
                self.data_file.pwrite(piece, off + co)
            t[2 * i + 1] = (bm | touched) & ~(touched << 32)
            return
        # Needs a new cluster.
        host = cstart if ext else self.refcounts.allocate(1)
        if e & _COMPRESSED or off:
            # compressed or shared: the new cluster takes over every subcluster
            buf = bytearray(self.read(cstart, cs))
            buf[co : co + len(piece)] = piece
            self.data_file.pwrite(buf, host)
            if e & _COMPRESSED:
                new_bm = _ALL_ALLOC
            else:
                new_bm = (bm | touched) & ~(touched << 32)
        else:
            lo = s0 << scb
            hi = (s1 + 1) << scb
            buf = bytearray(self.read(cstart + lo, hi - lo)) if (lo != co or hi != co + len(piece)) else None
            if buf is not None:
                buf[co - lo : co - lo + len(piece)] = piece
                self.data_file.pwrite(buf, host + lo)
            else:
                self.data_file.pwrite(piece, host + co)
            new_bm = (bm | touched) & ~(touched << 32)
        t[2 * i] = host | _COPIED
        t[2 * i + 1] = new_bm
        if not ext:
            self._free_entry_clusters(e)

    # ------------------------------------------------------------------ flushing
    def flush_metadata(self) -> None:
        """Write cached metadata in crash-safe order (see the module docstring); ends durable."""
        if not (self.metadata_dirty or self.refcounts.dirty or self.pending_frees):
            return
        f = self.file
        if self.data_file is not f:
            self.data_file.flush()
        if self.header.lazy_refcounts and not self.header.dirty and (self.l2_dirty or self.l1_dirty):
            # Lazy refcounts: the dirty bit is on disk before the first L2 update (qcow2.txt
            # "compatible features" bit 0); a crash then means "rebuild refcounts on open".
            self._set_dirty_bit(True)
        self.refcounts.write_dirty()
        f.flush()  # refcounts (and COW data) before the L2 tables that reference them
        if self.l2_dirty:
            for off in sorted(self.l2_dirty):
                t = self.l2_cache.get(off)
                if t is not None:
                    f.pwrite(_to_be(t), off)
            self.l2_dirty.clear()
            f.flush()  # new L2 tables before the L1 entries that point at them
        if self.l1_dirty:
            base = self.header.l1_table_offset
            for i in sorted(self.l1_dirty):
                f.pwrite(self.l1[i].to_bytes(8, "big"), base + 8 * i)
            self.l1_dirty.clear()
            f.flush()
        if self.pending_frees:
            # the references are gone from the disk now; drop the refcounts (rule 2)
            frees, self.pending_frees = self.pending_frees, []
            for c in frees:
                self.refcounts.update(c, -1)
            self.refcounts.write_dirty()
            f.flush()
        self.metadata_dirty = False

    def flush(self) -> None:
        """fsync semantics: every acknowledged write and the metadata reaching it is durable."""
        if self.read_only:
            return
        if self.metadata_dirty or self.refcounts.dirty or self.pending_frees:
            self.flush_metadata()
        else:
            self.data_file.flush()
            if self.data_file is not self.file:
                self.file.flush()

    def _set_dirty_bit(self, on: bool) -> None:
        h = self.header
        if on:
            h.incompatible_features |= fmt.INCOMPAT_DIRTY
        else:
            h.incompatible_features &= ~fmt.INCOMPAT_DIRTY
        self.file.pwrite(h.incompatible_features.to_bytes(8, "big"), 72)
        self.file.flush()

    def mark_corrupt(self, reason: str) -> None:
        """An inconsistency met while writing: set the corrupt bit, log once, go read-only (as QEMU does)."""
        if self.read_only:
            return
        log.error("%s: marking image corrupt and switching to read-only: %s", self.path, reason)
        try:
            self.header.incompatible_features |= fmt.INCOMPAT_CORRUPT
            self.file.pwrite(self.header.incompatible_features.to_bytes(8, "big"), 72)
            self.file.flush()
        except OSError as e:
            log.error("%s: could not set the corrupt bit: %s", self.path, e)
        self.read_only = True
        if self.on_read_only is not None:
            self.on_read_only()

    # ------------------------------------------------------------------ info
    def allocated_host_bytes(self) -> int:
        """Host space used, for st_blocks (512-byte units * 512)."""
        total = self.file.st_blocks() * 512
        if self.data_file is not self.file:
            total += self.data_file.st_blocks() * 512
        return total

    def close(self, flush: bool = True) -> None:
        if self._closed:
            return
        try:
            if flush and not self.read_only and hasattr(self, "refcounts"):
                self.flush()
                if self.header.dirty and self.header.lazy_refcounts:
                    self._set_dirty_bit(False)  # clean close: refcounts are exact again
        finally:
            self._closed = True
            if self.backing is not None:
                self.backing.close()
            if self.data_file is not self.file:
                self.data_file.close()
            self.file.close()

    def __enter__(self) -> "Qcow2Image":
        return self

    def __exit__(self, *exc) -> None:
        self.close(flush=exc[0] is None)
