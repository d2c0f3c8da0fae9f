"""Writing guest data (QEMU's qcow2_co_pwritev_part and qcow2-cluster.c's allocation):
in-place overwrites, first writes of fresh clusters, copy-on-write of partial and shared
clusters, zero clusters for whole clusters of zeros (detect-zeroes=unmap), subclusters.

Every guest write takes one sequence, whether it is served inline or its copies run on an
I/O thread (fuse/concurrent_io.py):

    begin()   reserve the guest clusters it may allocate (InFlight), or answer BUSY
    for each step (planned only when the step before it is committed):
        plan      decide where the data goes: allocations, copy-on-write reads (metadata thread)
        copy      WritePlan.copy(): the data writes (any thread; touches no shared state)
        commit    the new L2 entries, zero clusters, subcluster bits (metadata thread)
    end()     release the reservation

A write has one step, except where zero detection splits it (data, zero clusters, data) and on
extended-L2 images (a step per cluster). Data goes straight to the host file; the L2 entries
and refcounts it needs change only in the caches and reach the disk at Qcow2Image.
flush_metadata in crash-safe order (docs/crash-ordering.md); what old entries referenced is
freed only after that (ActiveMap.pending_frees, rule 2).
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Iterator
from typing import Optional

from ..errors import CorruptImage
from ..format.entries import ALL_ALLOC as _ALL_ALLOC
from ..format.entries import ALL_ZERO as _ALL_ZERO
from ..format.entries import COMPRESSED as _COMPRESSED
from ..format.entries import COPIED as _COPIED
from ..format.entries import OFFSET_MASK as _OFFSET
from ..format.entries import ZERO_FLAG as _ZERO
from .cluster_map import UNALLOCATED, ZERO, ActiveMap
from .hostfile import HostFile
from .inflight import BUSY, Busy, InFlight
from .read_path import Reader
from .refcounts import Refcounts


class WritePlan:
    """One step of a guest write: the host runs to write, then what its commit changes.

    Clusters it allocated hold refcount 1 in the cache from its plan on; Writer.commit makes
    them visible (L2 entries), Writer.abort gives them back if the copy failed."""

    __slots__ = ("data_file", "runs", "entries", "fresh", "zero", "ext")

    def __init__(
        self,
        data_file: HostFile,
        runs: list,
        entries: Optional[list] = None,
        fresh: tuple = (),
        zero: tuple = (),
        ext: tuple = (),
    ):
        self.data_file = data_file
        self.runs = runs  # [(host offset, [buffers])], each written back to back from its offset
        self.entries = entries or []  # [(guest cluster, new host offset, old entry)]
        self.fresh = fresh  # (first guest cluster, count, host base): a fresh run's slice of L2
        self.zero = zero  # (guest start, end): whole clusters that become zero clusters
        self.ext = ext  # (guest cluster, new entry, new subcluster bitmap, old entry): extended L2

    def copy(self) -> None:
        """The data writes: safe on any thread (HostFile keeps its size under a lock); touches no
        other state. One buffer goes by pwrite: the kernel's single-buffer path (ITER_UBUF) costs
        about 5 us less per 4 KiB write than pwritev's iovec here (measured, Linux 6.18)."""
        f = self.data_file
        for host, bufs in self.runs:
            if len(bufs) == 1:
                f.pwrite(bufs[0], host)
            else:
                f.pwritev(bufs, host)


class WriteRequest:
    """A guest write between Writer.begin() and Writer.end()."""

    __slots__ = ("steps", "clusters")

    def __init__(self, steps: Iterator[WritePlan], clusters: tuple[int, int]):
        self.steps = steps  # planned one at a time: iterate, copy and commit each
        self.clusters = clusters  # the guest clusters reserved (first, last); (0, -1): none


class Writer:
    """The active disk's writes, over its mapping, the refcounts and the reader (copy-on-write
    reads what the guest sees now)."""

    def __init__(
        self,
        active: ActiveMap,
        reader: Reader,
        refcounts: Refcounts,
        file: HostFile,
        data_file: HostFile,
        inflight: InFlight,
        on_corrupt: Callable[[str], None],
    ):
        self.m = active
        self.geo = active.geo
        self.reader = reader
        self.refcounts = refcounts
        self.file = file
        self.data_file = data_file
        self.inflight = inflight
        #: the image's answer to a damaged entry met while writing (corrupt bit, read-only)
        self.on_corrupt = on_corrupt
        self.backing = reader.backing
        self.backing_size = reader.backing_size

    # ------------------------------------------------------------------ the write sequence
    def begin(self, offset: int, mv: memoryview) -> WriteRequest | Busy:
        """Start a guest write of mv at offset (in range: the caller clips). BUSY: a guest
        cluster it needs is being allocated by another request; plan again after that one's
        commit. A plain overwrite of allocated clusters reserves nothing (it changes no
        metadata) and is planned here, so it never waits."""
        cb = self.geo.cluster_bits
        first, last = offset >> cb, (offset + len(mv) - 1) >> cb
        try:
            if not self.geo.extended and self._zero_span(offset, mv) is None:
                host = self._in_place_host(offset, first, last)
                if host >= 0:
                    return WriteRequest(iter((WritePlan(self.data_file, [(host, [mv])]),)), (0, -1))
            if self.inflight.busy(first, last):
                return BUSY
        except CorruptImage as e:
            self.on_corrupt(e.message)
            raise
        self.inflight.reserve(first, last)
        return WriteRequest(self._steps(offset, mv), (first, last))

    def commit(self, plan: WritePlan) -> None:
        """After plan.copy(): what it wrote becomes visible (in the caches; on disk at the next
        flush, after the refcounts: docs/crash-ordering.md rules 1 and 3)."""
        if plan.fresh:
            self._commit_fresh(*plan.fresh)
        if plan.entries:
            self._commit_entries(plan.entries)
        if plan.zero:
            self._zero_clusters(*plan.zero)
        if plan.ext:
            ci, e, bm, old = plan.ext
            t, i = self.m.l2_location(ci)
            t[2 * i] = e
            t[2 * i + 1] = bm
            if e != old:
                self.m.free_entry_clusters(old)

    def abort(self, plan: WritePlan) -> None:
        """plan.copy() failed: give back the clusters allocated for it (no entry references
        them, so their refcounts drop now); the guest sees what it saw before."""
        cb = self.geo.cluster_bits
        if plan.fresh:
            _first, count, base = plan.fresh
            hosts = [(base >> cb) + k for k in range(count)]
        else:
            hosts = [host >> cb for _ci, host, _e in plan.entries]
            if plan.ext and plan.ext[1] != plan.ext[3] and not self.geo.has_data_file:
                hosts.append((plan.ext[1] & _OFFSET) >> cb)
        for c in hosts:
            self.refcounts.update(c, -1)

    def end(self, req: WriteRequest) -> None:
        first, last = req.clusters
        if last >= first:
            self.inflight.release(first, last)

    def run(self, plan: WritePlan) -> None:
        """Copy and commit a step on this thread."""
        try:
            plan.copy()
        except BaseException:
            self.abort(plan)
            raise
        self.commit(plan)

    def write(self, offset: int, mv: memoryview) -> None:
        """A whole guest write on this thread (nothing else may be writing: never BUSY)."""
        req = self.begin(offset, mv)
        assert not isinstance(req, Busy), (
            "an inline write met a reservation: a request is still in flight"
        )
        try:
            for plan in req.steps:
                self.run(plan)
        finally:
            self.end(req)

    def busy(self, offset: int, length: int) -> bool:
        """Whether a guest cluster of [offset, offset+length) is reserved by a write in flight."""
        if length <= 0:
            return False
        cb = self.geo.cluster_bits
        return self.inflight.busy(offset >> cb, (offset + length - 1) >> cb)

    def _steps(self, offset: int, mv: memoryview) -> Iterator[WritePlan]:
        """The steps of a write, each planned once the previous one is committed (so the host
        offsets allocated are those of a write served step by step)."""
        try:
            span = self._zero_span(offset, mv)
            if span is None:
                yield from self._data_steps(offset, mv)
                return
            a, b = span
            if a:
                yield from self._data_steps(offset, mv[:a])
            yield WritePlan(self.data_file, [], zero=(offset + a, offset + b))
            if b < len(mv):
                yield from self._data_steps(offset + b, mv[b:])
        except CorruptImage as e:
            self.on_corrupt(e.message)
            raise

    def _data_steps(self, offset: int, mv: memoryview) -> Iterator[WritePlan]:
        geo = self.geo
        cs, cb = geo.cluster_size, geo.cluster_bits
        end = offset + len(mv)
        if geo.extended:
            pos = offset
            while pos < end:
                n = min(end - pos, cs - (pos & (cs - 1)))
                yield self._plan_extended_cluster(pos, mv[pos - offset : pos - offset + n])
                pos += n
            return
        first_ci, last_ci = offset >> cb, (end - 1) >> cb
        host = self._in_place_host(offset, first_ci, last_ci)
        if host >= 0:
            yield WritePlan(self.data_file, [(host, [mv])])
            return
        base = self._fresh_base(offset, len(mv), first_ci, last_ci)
        if base >= 0:
            yield WritePlan(
                self.data_file, [(base, [mv])], fresh=(first_ci, last_ci - first_ci + 1, base)
            )
            return
        runs, entries = self._plan_runs(offset, mv, first_ci, last_ci)
        yield WritePlan(self.data_file, runs, entries)

    # ------------------------------------------------------------------ zeroing
    def write_zeroes(self, offset: int, length: int) -> None:
        """Make guest bytes [offset, offset+length) read as zeros (QEMU's write-zeroes with unmap,
        what its FUSE export does for FALLOC_FL_PUNCH_HOLE and FALLOC_FL_ZERO_RANGE): whole
        clusters become zero clusters (v3) or unallocated (v2 without a backing file) and what
        they held is freed after the entries are on disk (pending frees, rule 2); partial
        clusters are written with zeros unless they already read as zeros. The caller checked
        that zeroing is possible (can_zero_detect or an external data file)."""
        end = offset + length
        try:
            cs = self.geo.cluster_size
            first_full = -(-offset // cs) * cs
            last_full = end // cs * cs
            if self.can_zero_detect() and last_full > first_full:
                self._zero_bytes(offset, first_full)
                self._zero_clusters(first_full, last_full, unmap=True)
                self._zero_bytes(last_full, end)
            else:
                self._zero_bytes(offset, end)
        except CorruptImage as e:
            self.on_corrupt(e.message)
            raise

    def _zero_bytes(self, pos: int, end: int) -> None:
        """Write zeros over [pos, end), skipping clusters that read as zeros already."""
        cs = self.geo.cluster_size
        while pos < end:
            n = min(end - pos, cs - (pos & (cs - 1)), 1 << 20)
            kind, _host, m = self.m.map(pos, pos + n)
            if kind == ZERO or (
                kind == UNALLOCATED
                and (self.backing is None or pos >= self.backing_size)
                and not self.geo.has_data_file
            ):
                pos += m
                continue
            for plan in self._data_steps(pos, self.reader.zeros(n)):
                self.run(plan)
            pos += n

    def _zero_span(self, offset: int, mv: memoryview) -> Optional[tuple[int, int]]:
        """(a, b): mv[a:b] covers whole clusters and is all zeros, so they can become zero
        clusters; None if no such middle, or zero clusters are not possible here. Cheap: the
        first and last byte, then one memcmp."""
        cs = self.geo.cluster_size
        first_full = -(-offset // cs) * cs
        last_full = (offset + len(mv)) // cs * cs
        if last_full <= first_full or not self.can_zero_detect():
            return None
        a, b = first_full - offset, last_full - offset
        if mv[a] == 0 and mv[b - 1] == 0 and mv[a:b] == self.reader.zeros(b - a):
            return a, b
        return None

    def can_zero_detect(self) -> bool:
        if self.geo.has_data_file:
            return False  # the external data file must keep holding the data (data_file_raw)
        if self.geo.v3:
            return True
        return self.backing is None  # v2: unallocated reads zero only without a backing file

    def _zero_clusters(self, start: int, end: int, unmap: bool = False) -> None:
        """Make whole clusters [start, end) read as zeros and free what they held. Zero clusters
        (v3), except where unmap (a discard) finds nothing below to hide: no backing file there,
        so unallocated reads zeros too and QEMU's discard leaves the entry empty."""
        m = self.m
        cb = self.geo.cluster_bits
        extended = self.geo.extended
        # one withdrawal (and at most one wait for the request lanes) for the whole range,
        # rather than one per cluster in l2_location below
        if end - start >= 1 << cb:
            m.changing(start >> cb, (end - start) >> cb)
        for ci in range(start >> cb, end >> cb):
            shows_backing = self.backing is not None and (ci << cb) < self.backing_size
            l2 = m.l2_for_read(ci >> m.l2_bits)
            if l2 is None and not shows_backing:
                continue  # already reads zero
            if l2 is not None:
                i = ci & (m.l2_entries - 1)
                if extended:
                    e, bm = l2[2 * i], l2[2 * i + 1]
                    if (e & _OFFSET) == 0 and not e & _COMPRESSED and bm == _ALL_ZERO:
                        continue
                    if e == 0 and bm == 0 and not shows_backing:
                        continue
                else:
                    e = l2[i]
                    if e == _ZERO or (e == 0 and not shows_backing):
                        continue
            t, i = m.l2_location(ci)
            empty = unmap and not shows_backing
            if extended:
                old = t[2 * i]
                t[2 * i] = 0
                t[2 * i + 1] = 0 if empty else _ALL_ZERO
            else:
                old = t[i]
                t[i] = _ZERO if self.geo.v3 and not empty else 0
            m.free_entry_clusters(old)

    # ------------------------------------------------------------------ planning
    def _plan_runs(
        self, offset: int, mv: memoryview, first_ci: int, last_ci: int
    ) -> tuple[list, list]:
        """The general write: which clusters are written in place, which get a new cluster
        (allocated here; copy-on-write of the rest of a partial cluster from what the guest sees
        now). Returns the host runs to write (contiguous pieces merged) and the new entries."""
        m = self.m
        cs = self.geo.cluster_size
        cb = self.geo.cluster_bits
        end = offset + len(mv)
        # Pass 1: which clusters can be written in place, which need a new cluster.
        plan = []  # (ci, host or None, old_entry)
        need_alloc = 0
        ext = self.geo.has_data_file
        for ci in range(first_ci, last_ci + 1):
            l2 = m.l2_for_read(ci >> m.l2_bits)
            e = l2[ci & (m.l2_entries - 1)] if l2 is not None else 0
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
        size = m.size
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
                    old = bytearray(self.reader.read(cstart, min(cs, size - cstart)))
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
        ext = self.geo.has_data_file
        for ci, host, e in entries:
            t, i = self.m.l2_location(ci)
            t[i] = host | _COPIED
            if not ext:
                self.m.free_entry_clusters(e)

    def _in_place_host(self, offset: int, first_ci: int, last_ci: int) -> int:
        """Where the common overwrite goes on the host: every cluster of the request allocated,
        COPIED (not shared with a snapshot) and contiguous on the host, within one L2 table,
        checked with one array comparison. -1 if the request is not such a write."""
        m = self.m
        l2i = first_ci >> m.l2_bits
        if l2i != last_ci >> m.l2_bits:
            return -1
        l2 = m.l2_for_read(l2i)
        if l2 is None:
            return -1
        i = first_ci & (m.l2_entries - 1)
        e = l2[i]
        off = e & _OFFSET
        if not e & _COPIED or e & (_COMPRESSED | _ZERO) or not (off or self.geo.has_data_file):
            return -1
        count = last_ci - first_ci + 1
        cs = m.cluster_size
        if count > 1 and l2[i : i + count] != array("Q", range(e, e + count * cs, cs)):
            return -1
        self._check_data_offset(off, first_ci)
        if count > 1:
            self._check_data_offset(off + (count - 1) * cs, last_ci)
        return off + (offset & (cs - 1))

    def _fresh_base(self, offset: int, length: int, first_ci: int, last_ci: int) -> int:
        """The common first write: whole clusters, all unallocated (entry 0), within one L2
        table. Nothing to copy on write (every byte of every cluster is new) and nothing to
        free: one contiguous allocation (made here), one write, one slice of L2 entries
        (_commit_fresh). -1 (nothing allocated) if the request is not such a write."""
        m = self.m
        cs = m.cluster_size
        if self.geo.has_data_file or (offset | length) & (cs - 1):
            return -1
        l2i = first_ci >> m.l2_bits
        if l2i != last_ci >> m.l2_bits:
            return -1
        count = last_ci - first_ci + 1
        i = first_ci & (m.l2_entries - 1)
        l2 = m.l2_for_read(l2i)
        if l2 is not None and l2[i : i + count] != array("Q", bytes(8 * count)):
            return -1
        return self.refcounts.allocate(count)

    def _commit_fresh(self, first_ci: int, count: int, base: int) -> None:
        cs = self.geo.cluster_size
        t, i = self.m.l2_location(first_ci, count)
        first = base | _COPIED
        t[i : i + count] = array("Q", range(first, first + count * cs, cs))

    def _check_data_offset(self, off: int, ci: int) -> None:
        """Refuse to write through an entry QEMU would call corrupt (unaligned, or past the end
        of the file): writing there could overwrite other clusters."""
        if off & (self.geo.cluster_size - 1):
            raise self.m.corrupt(
                f"L2 entry for guest cluster {ci} is not cluster aligned (0x{off:x})"
            )
        if not self.geo.has_data_file and off >= self.file.size:
            raise self.m.corrupt(
                f"L2 entry for guest cluster {ci} points past the end of the file (0x{off:x})"
            )

    def _plan_extended_cluster(self, pos: int, piece: memoryview) -> WritePlan:
        """A write within one cluster of an extended-L2 image, at subcluster granularity."""
        geo = self.geo
        cs = geo.cluster_size
        scb = geo.subcluster_bits
        ci = pos >> geo.cluster_bits
        cstart = ci << geo.cluster_bits
        co = pos - cstart
        s0 = co >> scb
        s1 = (co + len(piece) - 1) >> scb
        touched = ((1 << (s1 + 1)) - 1) & ~((1 << s0) - 1)
        # the writable table first (allocated or copied now, before a data cluster is), as the
        # entry's commit needs it
        t, i = self.m.l2_location(ci)
        e, bm = t[2 * i], t[2 * i + 1]
        off = e & _OFFSET
        ext = geo.has_data_file
        new_bm = (bm | touched) & ~(touched << 32)
        read = self.reader.read
        if not e & _COMPRESSED and e & _COPIED and (off or ext):
            self._check_data_offset(off, ci)
            # In place; subclusters not allocated yet need their untouched parts copied.
            lo = s0 << scb
            hi = (s1 + 1) << scb
            if (lo != co or hi != co + len(piece)) and (bm & touched) != touched:
                buf = bytearray(read(cstart + lo, hi - lo))
                buf[co - lo : co - lo + len(piece)] = piece
                run: tuple[int, list] = (off + lo, [buf])
            else:
                run = (off + co, [piece])
            return WritePlan(self.data_file, [run], ext=(ci, e, new_bm, e))
        # Needs a new cluster.
        host = cstart if ext else self.refcounts.allocate(1)
        if e & _COMPRESSED or off:
            # compressed or shared: the new cluster takes over every subcluster
            buf = bytearray(read(cstart, cs))
            buf[co : co + len(piece)] = piece
            run = (host, [buf])
            if e & _COMPRESSED:
                new_bm = _ALL_ALLOC
        else:
            lo = s0 << scb
            hi = (s1 + 1) << scb
            if lo != co or hi != co + len(piece):
                part = bytearray(read(cstart + lo, hi - lo))
                part[co - lo : co - lo + len(piece)] = piece
                run = (host + lo, [part])
            else:
                run = (host + co, [piece])
        return WritePlan(self.data_file, [run], ext=(ci, host | _COPIED, new_bm, e))
