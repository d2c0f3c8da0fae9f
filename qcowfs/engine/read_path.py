"""Reading guest data (QEMU's qcow2_co_preadv_part): one preadv per contiguous host run,
unallocated runs from the backing file (or zeros), zero clusters, compressed clusters.

A Reader reads through one mapping: the active disk's (Qcow2Image.reader) or a snapshot's
(snapshots.SnapshotView), both over the image's shared L2 cache, host files and backing file.
read_view() is the FUSE hot path: it replies from one reused page-aligned buffer and
inlines ClusterMap.map() for a request within one cached cluster.
"""

from __future__ import annotations

import mmap
import os
from typing import Any, Optional

from ..errors import CorruptImage
from ..format.compression import decompress_cluster
from ..format.entries import COMPRESSED as _COMPRESSED
from ..format.entries import L1E_RESERVED_MASK as _L1_RESERVED
from ..format.entries import OFFSET_MASK as _OFFSET
from ..format.entries import ZERO_FLAG as _ZERO
from ..format.entries import compressed_descriptor
from .cluster_map import COMPRESSED, DATA, UNALLOCATED, ClusterMap
from .hostfile import HostFile


class Reader:
    """Guest reads through one mapping."""

    def __init__(
        self, mapping: ClusterMap, file: HostFile, data_file: HostFile, backing: Optional[Any]
    ):
        self.mapping = mapping
        self.geo = mapping.geo
        #: compressed clusters live in the image file, data clusters in data_file
        self.file = file
        self.data_file = data_file
        self.backing = backing  # Qcow2Image or RawImage
        self.backing_size = backing.size if backing is not None else 0
        self._zero_cluster = bytes(self.geo.cluster_size)
        self._last_compressed: tuple = (None, b"")
        self._rbuf = memoryview(bytearray(0))  # read_view()'s reply buffer
        #: data clusters read straight from the file's fd (not through a cipher)
        self._direct = not data_file.encrypted

    @property
    def size(self) -> int:
        return self.mapping.size

    def zeros(self, n: int) -> memoryview:
        if len(self._zero_cluster) < n:
            self._zero_cluster = bytes(max(n, 2 * len(self._zero_cluster)))
        return memoryview(self._zero_cluster)[:n]

    def read(self, offset: int, length: int) -> bytes | bytearray:
        """Read guest bytes [offset, offset+length), clipped at the virtual size."""
        if offset >= self.size or length <= 0:
            return b""
        end = min(offset + length, self.size)
        length = end - offset
        # Fast path: the whole request maps to one contiguous host run.
        kind, host, n = self.mapping.map(offset, end)
        if kind == DATA:
            n = self.mapping.data_run(offset, end, host, n)
            if n == length:
                return self._pread_data(host, n, offset)
        buf = bytearray(length)
        self._read_into(memoryview(buf), offset, end, (kind, host, n), zeroed=True)
        return buf

    def read_view(self, offset: int, length: int) -> memoryview:
        """read() into a buffer that the next read_view() call reuses: for a reply that is sent
        before the next request is served (the FUSE layer). No allocation and no page faults
        of a fresh buffer per request (measured: half the time of a 1 MiB read)."""
        m = self.mapping
        size = m.size
        if offset >= size or length <= 0:
            return memoryview(b"")
        end = min(offset + length, size)
        length = end - offset
        if len(self._rbuf) < length:
            # page aligned (anonymous mmap): the kernel's copy out of the page cache into a
            # buffer at another alignment, such as a bytearray's, measured 2x slower for 1 MiB
            self._rbuf = memoryview(mmap.mmap(-1, max(length, 2 * len(self._rbuf), mmap.PAGESIZE)))
        mv = self._rbuf[:length]
        cs = m.cluster_size
        co = offset & (cs - 1)
        if co + length <= cs and not m.extended and self._direct:
            # hottest case (a request within one cluster, its L2 table cached): map() inlined
            ci = offset >> m.cluster_bits
            l1i = ci >> m.l2_bits
            l1 = m.l1
            if l1i < len(l1):
                e1 = l1[l1i]
                # reserved bits set: map() below reports the corruption
                l2off = 0 if e1 & _L1_RESERVED else e1 & _OFFSET
                tables = m.cache.tables
                t = tables.get(l2off) if l2off else None
                if t is not None:
                    e = t[ci & (m.l2_entries - 1)]
                    host = e & _OFFSET
                    if host and not e & (_COMPRESSED | _ZERO) and not host & (cs - 1):
                        tables.move_to_end(l2off)
                        if os.preadv(self.data_file.fd, (mv,), host + co) == length:
                            return mv
        first = kind, host, n = self.mapping.map(offset, end)
        if kind == DATA:
            # fast path: the whole request is one contiguous host run
            if n < length:
                n = self.mapping.data_run(offset, end, host, n)
            if n == length and self.data_file.preadv_into((mv,), host, offset) == n:
                return mv
        self._read_into(mv, offset, end, first, zeroed=False)
        return mv

    def data_host(self, offset: int, length: int) -> int:
        """Where guest [offset, offset+length) lies on the host when it is one contiguous run of
        data clusters, so that an I/O thread can read it with one preadv (fuse/concurrent_io.py); -1 when it
        is not (holes, zeros, compressed, backing, the end of the disk: read_view() then)."""
        end = offset + length
        if end > self.size or length <= 0 or not self._direct:
            return -1
        kind, host, n = self.mapping.map(offset, end)
        if kind != DATA:
            return -1
        if n < length:
            n = self.mapping.data_run(offset, end, host, n)
        return host if n == length else -1

    def _read_into(self, mv: memoryview, offset: int, end: int, first: tuple, zeroed: bool) -> None:
        """Fill mv with guest bytes [offset, end); first is map(offset, end); zeroed: mv holds zeros."""
        pos = offset
        kind, host, n = first
        while pos < end:
            if pos != offset:
                kind, host, n = self.mapping.map(pos, end)
            a = pos - offset
            if kind == DATA:
                # a contiguous DATA run: one preadv
                n = self.mapping.data_run(pos, end, host, n)
                got = self.data_file.preadv_into([mv[a : a + n]], host, pos)
                if got < n:
                    if self.geo.data_file_raw:
                        mv[a + got : a + n] = self.zeros(n - got)
                    else:
                        raise self.mapping.corrupt(
                            f"data cluster at host offset 0x{host:x} lies past the end of the file"
                        )
            elif kind == UNALLOCATED:
                # one backing read for the whole unallocated run
                while pos + n < end:
                    k2, _h2, n2 = self.mapping.map(pos + n, end)
                    if k2 != UNALLOCATED:
                        break
                    n += n2
                m = 0
                if self.backing is not None and pos < self.backing_size:
                    m = min(n, self.backing_size - pos)
                    mv[a : a + m] = self.backing.read(pos, m)
                if not zeroed and m < n:
                    mv[a + m : a + n] = self.zeros(n - m)
            elif kind == COMPRESSED:
                data = self._read_compressed(host)
                co = pos & (self.geo.cluster_size - 1)
                mv[a : a + n] = data[co : co + n]
            elif not zeroed:  # ZERO
                mv[a : a + n] = self.zeros(n)
            pos += n

    def _pread_data(self, host: int, n: int, guest: int) -> bytes:
        data = self.data_file.pread(n, host, guest)
        if len(data) < n:
            if self.geo.data_file_raw:
                return data + bytes(n - len(data))
            raise self.mapping.corrupt(
                f"data cluster at host offset 0x{host:x} lies past the end of the file"
            )
        return data

    def _read_compressed(self, entry: int) -> bytes:
        key, data = self._last_compressed
        if key == entry:
            return data
        off, nsec = compressed_descriptor(entry, self.geo.cluster_bits)
        clen = nsec * 512 - (off & 511)
        fsize = self.file.size
        if off >= fsize:
            raise self.mapping.corrupt(
                f"compressed cluster at host offset 0x{off:x} lies past the end of the file"
            )
        raw = self.file.pread(min(clen, fsize - off), off)
        try:
            data = decompress_cluster(raw, self.geo.cluster_size, self.geo.compression_type)
        except CorruptImage as e:
            raise self.mapping.corrupt(
                f"compressed cluster at host offset 0x{off:x}: {e.message}"
            ) from None
        self._last_compressed = (entry, data)
        return data
