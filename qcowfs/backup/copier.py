"""Copy a snapshot's clusters into a new qcow2 file (format/new_image.py lays it out).

Plan, then copy, then metadata, then fsync:
- plan() walks the snapshot's L1/L2 tables once and turns the wanted guest clusters into runs:
  COPY (data clusters contiguous on the host: one preadv), READ (compressed, subclustered or
  reached through the source's backing file: the engine's read path) and ZERO (clusters that
  read as zeros: an incremental records them as zero clusters over its backing file, a full
  backup leaves them out). Runs are at most RUN_BYTES long.
- copy() runs them on a few threads: each reads a run into its own buffer, takes a crc32 of
  every cluster (the point's table, table.py), leaves out clusters that hold only zeros, and
  writes the rest with one pwritev into the slots the layout gave the run. preadv, crc32 and
  pwritev release the GIL, so two cores copy at once; a READ run goes through the engine under
  one lock (its L2 cache is not shared between threads).
- Then the L2 tables, L1, refcounts and the header, and one fsync: the file is complete and
  durable before run.py gives it its final name.

The snapshot's clusters do not change while they are read: a snapshot's L2 tables and data
clusters have refcount > 1 or belong to the snapshot alone, and the engine (ours and QEMU's)
copies a cluster before writing to it unless its refcount is 1 (qcow2.txt, "COPIED").
"""

from __future__ import annotations

import dataclasses
import errno
import mmap
import os
import threading
import zlib
from array import array
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Callable, Optional

from bitarray import bitarray

from ..engine.snapshots import SnapshotView
from ..format import new_image
from ..format.entries import COMPRESSED, COPIED, OFFSET_MASK, ZERO_FLAG
from . import table as tables

COPY, READ, ZERO = 0, 1, 2
RUN_BYTES = 8 << 20
#: copy threads: measured on 2 cores, a 4 GiB full backup took 3.1-3.4 s with 2, 3.6-3.7 s with 4
WORKERS = max(2, os.cpu_count() or 2)
#: measured: the final fsync of a 4 GiB backup went from 0.9-1.2 s to 0.001 s, 3.9 -> 3.1 s in all
WRITEBACK_EARLY = True
#: large data runs copied with copy_file_range, their crc32s taken from a mapping of the source:
#: measured on a 4 GiB full backup, 3.3-3.4 s against 4.3-4.4 s reading and writing through a buffer
KERNEL_COPY = True
#: runs at least this long go through copy_file_range
KERNEL_COPY_MIN = 1 << 20
MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0)


@dataclasses.dataclass
class Run:
    first: int  # guest cluster
    count: int
    kind: int
    host: int = 0  # COPY: host offset of the first cluster


@dataclasses.dataclass
class CopyResult:
    layout: new_image.Layout
    data_clusters: int  # clusters written as data
    zero_clusters: int  # clusters recorded as zeros (incremental)
    bytes_copied: int
    table: array


def plan(view: SnapshotView, wanted: Optional[bitarray], zeros: bool) -> list[Run]:
    """The runs that cover the wanted guest clusters (None: all of them) of the snapshot;
    zeros: include ZERO runs (an incremental needs them, a full backup leaves them out)."""
    m = view.mapping
    cb = m.cluster_bits
    cs = m.cluster_size
    size = view.size
    nclusters = -(-size // cs)
    backing_clusters = -(-view.backing_size // cs) if view.backing is not None else 0
    per_l2 = m.l2_entries
    max_run = max(1, RUN_BYTES // cs)
    runs: list[Run] = []
    cur: Optional[Run] = None

    def add(ci: int, kind: int, host: int) -> None:
        nonlocal cur
        if kind == ZERO and not zeros:
            return
        if (
            cur is not None
            and cur.kind == kind
            and cur.first + cur.count == ci
            and cur.count < max_run
            and (kind != COPY or cur.host + (cur.count << cb) == host)
        ):
            cur.count += 1
            return
        cur = Run(ci, 1, kind, host)
        runs.append(cur)

    def unallocated(ci: int) -> int:
        return READ if ci < backing_clusters else ZERO

    data_file_copied = m.geo.has_data_file
    for l1i in range(-(-nclusters // per_l2)):
        a = l1i * per_l2
        b = min(a + per_l2, nclusters)
        if wanted is not None and not wanted[a:b].any():
            continue
        l2 = m.l2_for_read(l1i)
        if l2 is None and a >= backing_clusters and not zeros:
            continue  # nothing but zeros here
        for ci in range(a, b):
            if wanted is not None and not wanted[ci]:
                continue
            if l2 is None:
                add(ci, unallocated(ci), 0)
                continue
            if m.extended:
                pos = ci << cb
                want = min(cs, size - pos)
                kind, host, n = m.map(pos, pos + want)
                if n < want or kind == 3:  # mixed subclusters, or compressed
                    add(ci, READ, 0)
                elif kind == 2:
                    add(ci, COPY, host)
                elif kind == 1:
                    add(ci, ZERO, 0)
                else:
                    add(ci, unallocated(ci), 0)
                continue
            e = l2[ci - a]
            if e & COMPRESSED:
                add(ci, READ, 0)
            elif e & ZERO_FLAG:
                add(ci, ZERO, 0)
            else:
                off = e & OFFSET_MASK
                if off == 0 and not (data_file_copied and e & COPIED):
                    add(ci, unallocated(ci), 0)
                elif off & (cs - 1):
                    raise m.corrupt(f"L2 entry for guest cluster {ci} is not cluster aligned")
                else:
                    add(ci, COPY, off)
    return runs


class _Worker:
    """What the copy threads share: the files, the layout, the read path's lock."""

    def __init__(self, view: SnapshotView, out_fd: int, cluster_bits: int):
        self.view = view
        self.data_fd = view.data_file.fd
        self.out_fd = out_fd
        self.cb = cluster_bits
        self.cs = 1 << cluster_bits
        self.size = view.size
        self.zero = bytes(self.cs)
        self.zero_crc = tables.zero_crc(self.cs)
        self.view_lock = threading.Lock()
        self.local = threading.local()
        self.file_size = os.fstat(self.data_fd).st_size
        self.kernel_copy = KERNEL_COPY

    def buffer(self, n: int) -> memoryview:
        buf = getattr(self.local, "buf", None)
        if buf is None or len(buf) < n:
            # page aligned (anonymous mmap): the kernel copies into and out of it faster
            buf = self.local.buf = memoryview(mmap.mmap(-1, max(n, RUN_BYTES)))
        return buf[:n]

    def batch(
        self, runs: list[Run], first_slot: int, slot_offset: Callable[[int], int]
    ) -> list[int]:
        """Copy consecutive runs, whose slots follow each other from first_slot. Large data runs
        are copied by the kernel (kernel_copy); the others are read into one buffer and written
        with one pwritev per stretch (split only around clusters that hold only zeros, which are
        not written). The crc32 of each cluster in order, -1 for a zero one."""
        cb = self.cb
        crcs: list[int] = []
        slot = first_slot
        small: list[Run] = []
        small_slot = slot
        for run in runs:
            if self.kernel_copy and run.kind == COPY and self._in_file(run):
                if small:
                    crcs += self._buffered(small, small_slot, slot_offset)
                    small = []
                try:
                    crcs += self._kernel(run, slot, slot_offset)
                except OSError as e:
                    if e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                        raise
                    self.kernel_copy = False  # another file system, or no copy_file_range
                    crcs += self._buffered([run], slot, slot_offset)
            else:
                if not small:
                    small_slot = slot
                small.append(run)
            slot += run.count
        if small:
            crcs += self._buffered(small, small_slot, slot_offset)
        if WRITEBACK_EARLY:
            # start writing this back now (fadvise DONTNEED writes dirty pages out without
            # waiting, as sync_file_range would): the final fsync then has little left to do
            os.posix_fadvise(
                self.out_fd,
                slot_offset(first_slot),
                (slot - first_slot) << cb,
                os.POSIX_FADV_DONTNEED,
            )
        return crcs

    def _in_file(self, run: Run) -> bool:
        """A run the kernel can copy: large, inside the host file (a cluster past its end would
        fault in a mapping; the buffered path reads it as zeros) and inside the disk."""
        n = run.count << self.cb
        return (
            n >= KERNEL_COPY_MIN
            and run.host + n <= self.file_size
            and (run.first << self.cb) + n <= self.size
        )

    def _kernel(self, run: Run, slot: int, slot_offset: Callable[[int], int]) -> list[int]:
        """One data run without copying it through this process: the crc32s from a read-only
        mapping of the source (no copy at all), the data by copy_file_range (one copy, in the
        kernel, instead of a read into a buffer and a write out of it; KERNEL_COPY)."""
        cb = self.cb
        n = run.count << cb
        delta = run.host % mmap.ALLOCATIONGRANULARITY
        mm = mmap.mmap(
            self.data_fd,
            n + delta,
            flags=mmap.MAP_SHARED | MAP_POPULATE,
            prot=mmap.PROT_READ,
            offset=run.host - delta,
        )
        crcs = []
        stretches = []
        start = -1
        try:
            mv = memoryview(mm)
            for i in range(run.count):
                c = mv[delta + (i << cb) : delta + ((i + 1) << cb)]
                crc = zlib.crc32(c)
                if crc == self.zero_crc and c == self.zero:
                    crc = -1
                    if start >= 0:
                        stretches.append((start, i))
                        start = -1
                elif start < 0:
                    start = i
                c.release()
                crcs.append(crc)
            mv.release()
        finally:
            mm.close()
        if start >= 0:
            stretches.append((start, run.count))
        for a, b in stretches:
            src, dst, left = run.host + (a << cb), slot_offset(slot + a), (b - a) << cb
            while left:
                k = os.copy_file_range(self.data_fd, self.out_fd, left, src, dst)
                if k <= 0:
                    raise OSError(errno.EIO, "copy_file_range copied nothing")
                src, dst, left = src + k, dst + k, left - k
        return crcs

    def _buffered(
        self, runs: list[Run], first_slot: int, slot_offset: Callable[[int], int]
    ) -> list[int]:
        """Runs read into one buffer, written with one pwritev per stretch of data clusters."""
        cb = self.cb
        total = sum(r.count for r in runs) << cb
        mv = self.buffer(total)
        at = 0
        for run in runs:
            n = run.count << cb
            part = mv[at : at + n]
            guest = run.first << cb
            if run.kind == COPY:
                got = os.preadv(self.data_fd, [part], run.host)
                if got < n:  # the file ends inside the last cluster: the rest reads as zeros
                    part[got:] = bytes(n - got)
            else:
                with self.view_lock:
                    data = self.view.read(guest, n)
                part[: len(data)] = data
                if len(data) < n:
                    part[len(data) :] = bytes(n - len(data))
            visible = self.size - guest
            if visible < n:  # bytes past the end of the disk count as zeros (table.py)
                part[visible:] = bytes(n - visible)
            at += n
        crcs = []
        start = -1  # first cluster of the current stretch of data clusters to write
        count = total >> cb
        for i in range(count):
            c = mv[i << cb : (i + 1) << cb]
            crc = zlib.crc32(c)
            if crc == self.zero_crc and c == self.zero:
                crc = -1
                if start >= 0:
                    os.pwritev(
                        self.out_fd, [mv[start << cb : i << cb]], slot_offset(first_slot + start)
                    )
                    start = -1
            elif start < 0:
                start = i
            crcs.append(crc)
        if start >= 0:
            os.pwritev(self.out_fd, [mv[start << cb : total]], slot_offset(first_slot + start))
        return crcs


def batches(runs: list[Run], cluster_bits: int) -> list[list[Run]]:
    """Consecutive runs grouped into pieces of about RUN_BYTES (one task of a copy thread)."""
    out: list[list[Run]] = []
    cur: list[Run] = []
    size = 0
    for r in runs:
        cur.append(r)
        size += r.count << cluster_bits
        if size >= RUN_BYTES:
            out.append(cur)
            cur, size = [], 0
    if cur:
        out.append(cur)
    return out


def copy(
    view: SnapshotView,
    runs: list[Run],
    out_fd: int,
    *,
    incremental: bool,
    base_table: Optional[array],
    backing_file: Optional[str],
    progress: Optional[Callable[[int, int], None]] = None,
    workers: int = WORKERS,
) -> CopyResult:
    """Write the image for `runs` of `view` to out_fd (an empty file) and fsync it.

    incremental: ZERO runs become zero clusters (they hide the backing file); a full backup
    leaves them out. base_table is the previous point's table (incremental), which the result's
    table starts from."""
    m = view.mapping
    cb, cs = m.cluster_bits, m.cluster_size
    size = view.size
    nclusters = -(-size // cs)
    per_l2 = cs // 8
    data_runs = [r for r in runs if r.kind != ZERO]
    slots = sum(r.count for r in data_runs)
    held_l2 = {
        c // per_l2 for r in runs if r.kind != ZERO or incremental for c in _l2_span(r, per_l2)
    }
    layout = new_image.plan(size, cb, slots, held_l2)
    os.ftruncate(out_fd, layout.file_size)
    l2: dict[int, array] = {i: array("Q", bytes(cs)) for i in layout.l2_indexes}
    table = (
        tables.resized(base_table, nclusters, cs)
        if base_table is not None
        else tables.new(nclusters, cs)
    )
    zero_crc = tables.zero_crc(cs)
    zero_clusters = 0
    for r in runs:
        if r.kind == ZERO:
            for ci in range(r.first, r.first + r.count):
                table[ci] = zero_crc
                if incremental:
                    l2[ci // per_l2][ci % per_l2] = new_image.ZERO_ENTRY
                    zero_clusters += 1
    total = slots << cb
    done = 0
    used: list[int] = []
    worker = _Worker(view, out_fd, cb)
    tasks = batches(data_runs, cb)
    first_slots = []
    s = 0
    for t in tasks:
        first_slots.append(s)
        s += sum(r.count for r in t)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="backup-copy") as pool:
        pending: dict[Future[list[int]], int] = {}
        it = iter(range(len(tasks)))
        exhausted = False
        while pending or not exhausted:
            while not exhausted and len(pending) < 2 * workers:
                try:
                    k = next(it)
                except StopIteration:
                    exhausted = True
                    break
                pending[pool.submit(worker.batch, tasks[k], first_slots[k], layout.slot_offset)] = k
            if not pending:
                break
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                k = pending.pop(fut)
                crcs = fut.result()  # an I/O error ends the copy (the pool is shut down)
                slot = first_slots[k]
                i = 0
                for r in tasks[k]:
                    for ci in range(r.first, r.first + r.count):
                        crc = crcs[i]
                        if crc < 0:
                            table[ci] = zero_crc
                            if incremental:
                                l2[ci // per_l2][ci % per_l2] = new_image.ZERO_ENTRY
                                zero_clusters += 1
                        else:
                            table[ci] = crc
                            l2[ci // per_l2][ci % per_l2] = new_image.data_entry(layout, slot + i)
                            used.append(slot + i)
                        i += 1
                done += i << cb
                if progress is not None:
                    progress(done, total)
    for off, data in new_image.metadata(layout, l2, used, backing_file):
        os.pwrite(out_fd, data, off)
    os.fsync(out_fd)
    return CopyResult(layout, len(used), zero_clusters, len(used) << cb, table)


def _l2_span(r: Run, per_l2: int) -> range:
    """Guest clusters of a run, one per L2 table it touches (for the set of tables needed)."""
    first = r.first - r.first % per_l2
    return range(first, r.first + r.count, per_l2)
