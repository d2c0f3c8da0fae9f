"""Writing guest data (QEMU's qcow2_co_pwritev_part and qcow2-cluster.c's allocation):
in-place overwrites, first writes of fresh clusters, copy-on-write of partial and shared
clusters, zero clusters for whole clusters of zeros (detect-zeroes=unmap), subclusters.

Data goes straight to the host file; the L2 entries and refcounts it needs change only in
the caches, and reach the disk at Qcow2Image.flush_metadata in crash-safe order. The
clusters old entries referenced are freed only after that (pending_frees, rule 2).
"""

from __future__ import annotations

import os
from array import array
from typing import Callable, Optional, Tuple

from ..errors import CorruptImage, ReadOnlyImage, UnsupportedFeature, WriteBeyondEnd
from ..format.entries import ALL_ALLOC as _ALL_ALLOC
from ..format.entries import ALL_ZERO as _ALL_ZERO
from ..format.entries import COMPRESSED as _COMPRESSED
from ..format.entries import COPIED as _COPIED
from ..format.entries import OFFSET_MASK as _OFFSET
from ..format.entries import ZERO_FLAG as _ZERO
from .cluster_map import UNALLOCATED, ZERO
from .read_path import ReadPath

#: plan_write's answer when a cluster of the request is being allocated by another request
BUSY = "busy"


class WritePlan:
    """One guest write decided on the trio thread, its data copy left to an I/O thread
    (io_threads.py): the host runs to write, and the L2 entries to commit after them.

    Its new clusters are reserved (refcount 1 in the cache, guest clusters in
    Qcow2Image.allocating) from plan_write() to commit_write()/abort_write(): a request for
    one of those guest clusters waits (BUSY), as QEMU's requests wait on its in-flight cluster
    allocations (qcow2-cluster.c, handle_dependencies); a read meanwhile sees the old mapping,
    never a half-written copy-on-write."""

    __slots__ = ("fd", "runs", "entries", "fresh", "end", "clusters")

    def __init__(self, fd: int, runs: list, entries: list, fresh: tuple = (), end: int = 0):
        self.fd = fd
        self.clusters = (0, -1)  # the guest clusters reserved in Qcow2Image.allocating
        self.runs = runs  # [(host offset, [buffers])], written back to back from the offset
        self.entries = entries  # [(guest cluster, new host offset, old entry)]
        self.fresh = fresh  # (first guest cluster, count, host base): a fresh run's slice of L2
        self.end = end  # host end of the furthest run (the file's size after it)

    def write_data(self) -> None:
        """The data copy: thread-safe, touches no shared state (hostfile.HostFile's size is
        updated by commit_write, on the trio thread)."""
        fd = self.fd
        for host, bufs in self.runs:
            want = sum(len(b) for b in bufs)
            done = os.pwritev(fd, bufs, host)
            if done < want:  # rare short write: the rest piecewise
                rest = memoryview(b"".join(bytes(b) for b in bufs))
                while done < want:
                    done += os.pwrite(fd, rest[done:], host + done)


class WritePath(ReadPath):
    """The write half of Qcow2Image (a mixin over the image's state)."""

    mark_corrupt: "Callable[[str], None]"
    io_inflight: int
    allocating: "set[int]"

    def _check_writable(self) -> None:
        if self.read_only:
            raise ReadOnlyImage("image is open read-only", self.path)

    def write(self, offset: int, data) -> None:
        """Write guest bytes at offset. Whole clusters of zeros become zero clusters (detect-zeroes=unmap)."""
        self._check_writable()
        length = len(data)
        if offset + length > self.size:
            raise WriteBeyondEnd(f"write beyond the end of the disk ({offset}+{length} > {self.size})", self.path)
        if length == 0:
            return
        try:
            self._write(offset, memoryview(data).cast("B"))
        except CorruptImage as e:
            self.mark_corrupt(e.message)
            raise

    def plan_write(self, offset: int, data) -> "WritePlan | str | None":
        """Decide a guest write whose data an I/O thread will copy (WritePlan.write_data), then
        commit_write (or abort_write) it. None: this write goes through write() (zero
        detection, subclusters, external data files, ...); BUSY: a cluster of it is being
        allocated: wait for that commit and ask again. Called with data in range (Disk clips)."""
        self._check_writable()
        mv = memoryview(data).cast("B")
        length = len(mv)
        end = offset + length
        if end > self.size:
            raise WriteBeyondEnd(f"write beyond the end of the disk ({offset}+{length} > {self.size})", self.path)
        if length == 0 or self.extended or self.has_data_file:
            return None
        cb = self.cluster_bits
        first_ci = offset >> cb
        last_ci = (end - 1) >> cb
        try:
            host = self._in_place_host(offset, first_ci, last_ci)
            if host >= 0:
                self.io_inflight += 1
                return WritePlan(self.data_file.fd, [(host, [mv])], [])
            if self.allocating and not self.allocating.isdisjoint(range(first_ci, last_ci + 1)):
                return BUSY
            if self._zero_span(offset, mv) is not None:
                return None  # served inline by _write, which turns it into zero clusters
            base = self._fresh_base(offset, length, first_ci, last_ci)
            if base >= 0:
                plan = WritePlan(self.data_file.fd, [(base, [mv])], [], (first_ci, last_ci - first_ci + 1, base),
                                 base + length)
            else:
                runs, entries = self._plan_runs(offset, mv, first_ci, last_ci)
                plan = WritePlan(self.data_file.fd, runs, entries,
                                 end=max(h + sum(len(b) for b in bufs) for h, bufs in runs))
        except CorruptImage as e:
            self.mark_corrupt(e.message)
            raise
        self.allocating.update(range(first_ci, last_ci + 1))
        plan.clusters = (first_ci, last_ci)
        self.io_inflight += 1
        return plan

    def commit_write(self, plan: WritePlan) -> None:
        """After plan.write_data(): the new clusters become visible (L2 entries, in the cache;
        on disk at the next flush, after their refcounts: rules 1 and 3)."""
        self.io_inflight -= 1
        if plan.end:
            self.data_file.note_written(plan.end)
        if plan.fresh:
            self._commit_fresh(*plan.fresh)
        elif plan.entries:
            self._commit_entries(plan.entries)
        self._release(plan)

    def abort_write(self, plan: WritePlan) -> None:
        """plan.write_data() failed: give back the clusters reserved for it (referenced by no
        entry, so their refcounts drop now); the guest sees what it saw before."""
        self.io_inflight -= 1
        cb = self.cluster_bits
        if plan.fresh:
            _first, count, base = plan.fresh
            hosts = [(base >> cb) + k for k in range(count)]
        else:
            hosts = [host >> cb for _ci, host, _e in plan.entries]
        for c in hosts:
            self.refcounts.update(c, -1)
        self._release(plan)

    def _release(self, plan: WritePlan) -> None:
        first, last = plan.clusters
        self.allocating.difference_update(range(first, last + 1))

    def busy(self, offset: int, length: int) -> bool:
        """Whether a guest cluster of [offset, offset+length) is being allocated (plan_write)."""
        if not self.allocating or length <= 0:
            return False
        cb = self.cluster_bits
        first, last = offset >> cb, (offset + length - 1) >> cb
        return any(first <= ci <= last for ci in self.allocating)

    def write_zeroes(self, offset: int, length: int) -> None:
        """Make guest bytes [offset, offset+length) read as zeros (QEMU's write-zeroes with unmap,
        what its FUSE export does for FALLOC_FL_PUNCH_HOLE and FALLOC_FL_ZERO_RANGE): whole
        clusters become zero clusters (v3) or unallocated (v2 without a backing file) and what
        they held is freed after the entries are on disk (pending_frees, rule 2); partial
        clusters are written with zeros unless they already read as zeros."""
        self._check_writable()
        end = offset + length
        if end > self.size:
            raise WriteBeyondEnd(f"write-zeroes beyond the end of the disk ({offset}+{length} > {self.size})", self.path)
        if not self.has_data_file and not self._can_zero_detect():
            # v2 with a backing file: an unallocated cluster would show the backing file
            raise UnsupportedFeature("zeroing needs the zero cluster flag of version 3 images when a backing file "
                                     "is present (QEMU refuses it too)", self.path)
        try:
            cs = self.cluster_size
            first_full = -(-offset // cs) * cs
            last_full = end // cs * cs
            if self._can_zero_detect() and last_full > first_full:
                self._zero_bytes(offset, first_full)
                self._zero_clusters(first_full, last_full, unmap=True)
                self._zero_bytes(last_full, end)
            else:
                self._zero_bytes(offset, end)
        except CorruptImage as e:
            self.mark_corrupt(e.message)
            raise

    def _zero_bytes(self, pos: int, end: int) -> None:
        """Write zeros over [pos, end), skipping clusters that read as zeros already."""
        cs = self.cluster_size
        while pos < end:
            n = min(end - pos, cs - (pos & (cs - 1)), 1 << 20)
            kind, _host, m = self.map(pos, pos + n)
            if kind == ZERO or (kind == UNALLOCATED and (self.backing is None or pos >= self.backing_size)
                                and not self.has_data_file):
                pos += m
                continue
            self._write_data(pos, self._zeros(n))
            pos += n

    def _write(self, offset: int, mv: memoryview) -> None:
        span = self._zero_span(offset, mv)
        if span is None:
            self._write_data(offset, mv)
            return
        a, b = span
        if a:
            self._write_data(offset, mv[:a])
        self._zero_clusters(offset + a, offset + b)
        if b < len(mv):
            self._write_data(offset + b, mv[b:])

    def _zero_span(self, offset: int, mv: memoryview) -> Optional[Tuple[int, int]]:
        """(a, b): mv[a:b] covers whole clusters and is all zeros, so they can become zero
        clusters; None if no such middle, or zero clusters are not possible here. Cheap: the
        first and last byte, then one memcmp."""
        if not self._can_zero_detect():
            return None
        cs = self.cluster_size
        first_full = -(-offset // cs) * cs
        last_full = (offset + len(mv)) // cs * cs
        if last_full <= first_full:
            return None
        a, b = first_full - offset, last_full - offset
        if mv[a] == 0 and mv[b - 1] == 0 and mv[a:b] == self._zeros(b - a):
            return a, b
        return None

    def _can_zero_detect(self) -> bool:
        if self.header.has_data_file:
            return False  # the external data file must keep holding the data (data_file_raw)
        if self.v3:
            return True
        return self.backing is None  # v2: unallocated reads zero only without a backing file

    def _zero_clusters(self, start: int, end: int, unmap: bool = False) -> None:
        """Make whole clusters [start, end) read as zeros and free what they held. Zero clusters
        (v3), except where unmap (a discard) finds nothing below to hide: no backing file there,
        so unallocated reads zeros too and QEMU's discard leaves the entry empty."""
        cb = self.cluster_bits
        for ci in range(start >> cb, end >> cb):
            shows_backing = self.backing is not None and (ci << cb) < self.backing_size
            l2 = self._l2_for_read(ci >> self.l2_bits)
            if l2 is None and not shows_backing:
                continue  # already reads zero
            if l2 is not None:
                i = ci & (self.l2_entries - 1)
                if self.extended:
                    e, bm = l2[2 * i], l2[2 * i + 1]
                    if (e & _OFFSET) == 0 and not e & _COMPRESSED and bm == _ALL_ZERO:
                        continue
                    if e == 0 and bm == 0 and not shows_backing:
                        continue
                else:
                    e = l2[i]
                    if e == _ZERO or (e == 0 and not shows_backing):
                        continue
            t, i = self._l2_location(ci)
            empty = unmap and not shows_backing
            if self.extended:
                old = t[2 * i]
                t[2 * i] = 0
                t[2 * i + 1] = 0 if empty else _ALL_ZERO
            else:
                old = t[i]
                t[i] = _ZERO if self.v3 and not empty else 0
            self._free_entry_clusters(old)

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
        runs, entries = self._plan_runs(offset, mv, first_ci, last_ci)
        for host, bufs in runs:
            self.data_file.pwritev(bufs, host)
        self._commit_entries(entries)

    def _plan_runs(self, offset: int, mv: memoryview, first_ci: int, last_ci: int) -> tuple:
        """The general write: which clusters are written in place, which get a new cluster
        (allocated here; copy-on-write of the rest of a partial cluster from what the guest sees
        now). Returns the host runs to write (contiguous pieces merged) and the new entries."""
        cs = self.cluster_size
        cb = self.cluster_bits
        end = offset + len(mv)
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
        # Pass 2: the data for each cluster, merged into contiguous host runs.
        runs: list = []
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
                    runs.append((run_host, run_bufs))
                run_host, run_bufs, run_len = wr_host, [piece], len(piece)
        if run_bufs:
            runs.append((run_host, run_bufs))
        return runs, new_entries

    def _commit_entries(self, entries: list) -> None:
        ext = self.header.has_data_file
        for ci, host, e in entries:
            t, i = self._l2_location(ci)
            t[i] = host | _COPIED
            if not ext:
                self._free_entry_clusters(e)

    def _write_in_place(self, offset: int, mv: memoryview, first_ci: int, last_ci: int) -> bool:
        """The common overwrite (_in_place_host) with one pwrite; False (nothing done) otherwise."""
        host = self._in_place_host(offset, first_ci, last_ci)
        if host < 0:
            return False
        self.data_file.pwrite(mv, host)
        return True

    def _in_place_host(self, offset: int, first_ci: int, last_ci: int) -> int:
        """Where the common overwrite goes on the host: every cluster of the request allocated,
        COPIED (not shared with a snapshot) and contiguous on the host, within one L2 table,
        checked with one array comparison. -1 if the request is not such a write."""
        l2i = first_ci >> self.l2_bits
        if l2i != last_ci >> self.l2_bits:
            return -1
        l2 = self._l2_for_read(l2i)
        if l2 is None:
            return -1
        i = first_ci & (self.l2_entries - 1)
        e = l2[i]
        off = e & _OFFSET
        if not e & _COPIED or e & (_COMPRESSED | _ZERO) or not (off or self.has_data_file):
            return -1
        count = last_ci - first_ci + 1
        cs = self.cluster_size
        if count > 1 and l2[i : i + count] != array("Q", range(e, e + count * cs, cs)):
            return -1
        self._check_data_offset(off, first_ci)
        if count > 1:
            self._check_data_offset(off + (count - 1) * cs, last_ci)
        return off + (offset & (cs - 1))

    def _write_fresh_run(self, offset: int, mv: memoryview, first_ci: int, last_ci: int) -> bool:
        """The common first write (_fresh_base) with one pwrite; False (nothing done) otherwise."""
        base = self._fresh_base(offset, len(mv), first_ci, last_ci)
        if base < 0:
            return False
        self.data_file.pwrite(mv, base)
        self._commit_fresh(first_ci, last_ci - first_ci + 1, base)
        return True

    def _fresh_base(self, offset: int, length: int, first_ci: int, last_ci: int) -> int:
        """The common first write: whole clusters, all unallocated (entry 0), within one L2
        table. Nothing to copy on write (every byte of every cluster is new) and nothing to
        free: one contiguous allocation (made here), one pwrite, one slice of L2 entries
        (_commit_fresh). The entries reach the disk at the next flush, after the refcounts, as
        in _write_data (rules 1 and 3). -1 (nothing allocated) if the request is not such a write."""
        cs = self.cluster_size
        if self.has_data_file or (offset | length) & (cs - 1):
            return -1
        l2i = first_ci >> self.l2_bits
        if l2i != last_ci >> self.l2_bits:
            return -1
        count = last_ci - first_ci + 1
        i = first_ci & (self.l2_entries - 1)
        l2 = self._l2_for_read(l2i)
        if l2 is not None and l2[i : i + count] != array("Q", bytes(8 * count)):
            return -1
        return self.refcounts.allocate(count)

    def _commit_fresh(self, first_ci: int, count: int, base: int) -> None:
        cs = self.cluster_size
        t, i = self._l2_location(first_ci)
        first = base | _COPIED
        t[i : i + count] = array("Q", range(first, first + count * cs, cs))

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
            if lo != co or hi != co + len(piece):
                part = bytearray(self.read(cstart + lo, hi - lo))
                part[co - lo : co - lo + len(piece)] = piece
                self.data_file.pwrite(part, host + lo)
            else:
                self.data_file.pwrite(piece, host + co)
            new_bm = (bm | touched) & ~(touched << 32)
        t[2 * i] = host | _COPIED
        t[2 * i + 1] = new_bm
        if not ext:
            self._free_entry_clusters(e)
