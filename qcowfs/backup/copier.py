"""Copy a snapshot's clusters into a new qcow2 file (format/new_image.py lays it out).

Plan, then copy, then metadata, then fsync:
- plan() walks the snapshot's L1/L2 tables once and turns the wanted guest clusters into runs:
  COPY (data clusters contiguous on the host: one preadv), READ (compressed, subclustered or
  reached through the source's backing file: the engine's read path) and ZERO (clusters that
  read as zeros: an incremental records them as zero clusters over its backing file, a full
  backup leaves them out). Runs are at most RUN_BYTES long.
- copy() runs them on a few threads: each reads a run into its own buffer, takes a crc32 of
  every cluster (the point's table, table.py), leaves out clusters that hold only zeros, and
  writes the rest with one pwritev into the slots the layout gave the run. Large data runs are
  not copied through a buffer: their crc32s come from a mapping of the source and they are
  written from it with O_DIRECT (or copy_file_range where O_DIRECT is refused). preadv, crc32 and
  pwritev release the GIL, so two cores copy at once; a READ run goes through the engine under
  one lock (its L2 cache is not shared between threads).
- The new file's clusters may be smaller than the source's (an incremental over bitmaps of
  4 KiB granularity has 4 KiB clusters): runs, reads and the table stay in source clusters
  ("table clusters"), and only the dirty file clusters of each are written (`dirty`).
- Then the L2 tables, L1, refcounts and the header, and one fsync: the file is complete and
  durable before run.py gives it its final name.

An encrypted source (LUKS) makes an encrypted backup: the file gets a copy of the source's LUKS
header (the same key slots: the same passphrase opens it, as QEMU's `encrypt.key-secret`), and
its data clusters are decrypted where they are read and encrypted again for where they are
written, because the IV of every 512-byte sector is its host offset (docs/encryption.md). The
table's crc32s are of the plaintext, as for any backup. The kernel paths (copy_file_range,
O_DIRECT from a mapping) move bytes as they are, so an encrypted copy goes through a buffer.

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
from typing import TYPE_CHECKING, Callable, Optional

from bitarray import bitarray

from ..engine.snapshots import SnapshotView
from ..format import new_image
from ..format.entries import COMPRESSED, COPIED, OFFSET_MASK, ZERO_FLAG
from . import table as tables

if TYPE_CHECKING:
    from ..crypto.sector_cipher import SectorCipher

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
#: those runs written from the source's mapping with O_DIRECT instead of copy_file_range: no copy
#: into the new file's page cache and no writeback to wait for. Measured on a 4 GiB copy with
#: crc32s and a final fsync (2 threads, alternating): 2.3-2.5 s against 4.8 s
DIRECT_WRITES = True
MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0)


@dataclasses.dataclass
class Run:
    first: int  # guest cluster
    count: int
    kind: int
    host: int = 0  # COPY: host offset of the first cluster


@dataclasses.dataclass(frozen=True)
class Encryption:
    """An encrypted source's: its LUKS header (and key material), copied into the backup, and
    its data cipher (the master key the header's slots unlock), cloned for each copy thread."""

    header: bytes = dataclasses.field(repr=False)
    cipher: SectorCipher


@dataclasses.dataclass
class CopyResult:
    layout: new_image.Layout
    data_clusters: int  # clusters written as data
    zero_clusters: int  # clusters recorded as zeros (incremental)
    bytes_copied: int
    table: array
    #: the file is encrypted (LUKS, the source's header)
    encrypted: bool = False


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
    """What the copy threads share: the files, the geometry, the read path's lock."""

    def __init__(
        self,
        view: SnapshotView,
        out_fd: int,
        file_bits: int,
        dirty: Optional[bitarray],
        encryption: Optional[Encryption] = None,
    ):
        self.view = view
        self.encryption = encryption
        self.data_fd = view.data_file.fd
        self.out_fd = out_fd
        self.tcb = view.mapping.cluster_bits  # table (source) clusters
        self.fcb = file_bits  # the new file's clusters: tcb or finer
        self.ratio = 1 << (self.tcb - file_bits)
        self.dirty = dirty  # dirty file clusters (None: all)
        self.size = view.size
        self.zero = bytes(1 << self.tcb)
        self.zero_file = memoryview(self.zero)[: 1 << file_bits]
        self.zero_crc = tables.zero_crc(1 << self.tcb)
        self.view_lock = threading.Lock()
        self.local = threading.local()
        self.file_size = os.fstat(self.data_fd).st_size
        # the kernel moves bytes as they are: ciphertext must be decrypted and encrypted again
        self.kernel_copy = KERNEL_COPY and self.ratio == 1 and encryption is None
        #: out_fd opened again with O_DIRECT (open_direct); -1: none
        self.direct_fd = -1
        #: whether to write with it (False once an alignment was refused)
        self.direct_ok = False

    def open_direct(self) -> None:
        if not (DIRECT_WRITES and self.kernel_copy):
            return
        try:
            self.direct_fd = os.open(
                f"/proc/self/fd/{self.out_fd}", os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC
            )
        except OSError:
            return  # no /proc, or a file system without O_DIRECT
        self.direct_ok = True

    def close_direct(self) -> None:
        self.direct_ok = False
        fd, self.direct_fd = self.direct_fd, -1
        if fd >= 0:
            os.close(fd)

    def buffer(self, n: int) -> memoryview:
        buf = getattr(self.local, "buf", None)
        if buf is None or len(buf) < n:
            # page aligned (anonymous mmap): the kernel copies into and out of it faster
            buf = self.local.buf = memoryview(mmap.mmap(-1, max(n, RUN_BYTES)))
        return buf[:n]

    def cipher(self) -> SectorCipher:
        """This thread's copy of the source's cipher (they are not thread-safe)."""
        c: Optional[SectorCipher] = getattr(self.local, "cipher", None)
        if c is None:
            assert self.encryption is not None
            c = self.local.cipher = self.encryption.cipher.clone()
        return c

    def file_clusters(self, tc: int) -> list[int]:
        """The file clusters of table cluster tc to write (dirty ones), in order."""
        r = self.ratio
        first = tc * r
        if self.dirty is None:
            return list(range(first, first + r))
        d = self.dirty
        return [fc for fc in range(first, first + r) if d[fc]]

    def batch(
        self, runs: list[Run], first_slot: int, slot_offset: Callable[[int], int]
    ) -> tuple[list[int], list[bool]]:
        """Copy consecutive runs, whose file clusters take consecutive slots from first_slot.
        Large data runs are copied by the kernel (_kernel); the others are read into one buffer
        and written with one pwritev per stretch (_buffered). Returns the crc32 of each table
        cluster, and for each file cluster written in order whether it holds data (False: only
        zeros, not written, its slot left a hole)."""
        crcs: list[int] = []
        held: list[bool] = []
        slot = first_slot
        small: list[Run] = []
        small_slot = slot
        for run in runs:
            nfile = sum(
                len(self.file_clusters(tc)) for tc in range(run.first, run.first + run.count)
            )
            if self.kernel_copy and run.kind == COPY and self._in_file(run):
                if small:
                    self._buffered(small, small_slot, slot_offset, crcs, held)
                    small = []
                try:
                    self._kernel(run, slot, slot_offset, crcs, held)
                except OSError as e:
                    if e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                        raise
                    self.kernel_copy = False  # another file system, or no copy_file_range
                    self._buffered([run], slot, slot_offset, crcs, held)
            else:
                if not small:
                    small_slot = slot
                small.append(run)
            slot += nfile
        if small:
            self._buffered(small, small_slot, slot_offset, crcs, held)
        if WRITEBACK_EARLY and slot > first_slot:
            # start writing this back now (fadvise DONTNEED writes dirty pages out without
            # waiting, as sync_file_range would): the final fsync then has little left to do
            os.posix_fadvise(
                self.out_fd,
                slot_offset(first_slot),
                (slot - first_slot) << self.fcb,
                os.POSIX_FADV_DONTNEED,
            )
        return crcs, held

    def _in_file(self, run: Run) -> bool:
        """A run the kernel can copy: large, inside the host file (a cluster past its end would
        fault in a mapping; the buffered path reads it as zeros) and inside the disk."""
        n = run.count << self.tcb
        return (
            n >= KERNEL_COPY_MIN
            and run.host + n <= self.file_size
            and (run.first << self.tcb) + n <= self.size
        )

    def _kernel(
        self,
        run: Run,
        slot: int,
        slot_offset: Callable[[int], int],
        crcs: list[int],
        held: list[bool],
    ) -> None:
        """One data run (file clusters = table clusters) without copying it through this
        process: the crc32s from a read-only mapping of the source (no copy at all), the data by
        copy_file_range (one copy, in the kernel, instead of a read into a buffer and a write out
        of it; KERNEL_COPY)."""
        cb = self.tcb
        n = run.count << cb
        delta = run.host % mmap.ALLOCATIONGRANULARITY
        mm = mmap.mmap(
            self.data_fd,
            n + delta,
            flags=mmap.MAP_SHARED | MAP_POPULATE,
            prot=mmap.PROT_READ,
            offset=run.host - delta,
        )
        stretches = []
        start = -1
        try:
            mv = memoryview(mm)
            for i in range(run.count):
                c = mv[delta + (i << cb) : delta + ((i + 1) << cb)]
                crc = zlib.crc32(c)
                is_zero = crc == self.zero_crc and c == self.zero
                c.release()
                crcs.append(crc)
                held.append(not is_zero)
                if is_zero:
                    if start >= 0:
                        stretches.append((start, i))
                        start = -1
                elif start < 0:
                    start = i
            if start >= 0:
                stretches.append((start, run.count))
            if self.direct_ok:
                stretches = self._direct(mv, delta, run, slot, slot_offset, stretches)
            mv.release()
        finally:
            mm.close()
        for a, b in stretches:
            src, dst, left = run.host + (a << cb), slot_offset(slot + a), (b - a) << cb
            while left:
                k = os.copy_file_range(self.data_fd, self.out_fd, left, src, dst)
                if k <= 0:
                    raise OSError(errno.EIO, "copy_file_range copied nothing")
                src, dst, left = src + k, dst + k, left - k

    def _direct(
        self,
        mv: memoryview,
        delta: int,
        run: Run,
        slot: int,
        slot_offset: Callable[[int], int],
        stretches: list[tuple[int, int]],
    ) -> list[tuple[int, int]]:
        """Write stretches of the run from the source's mapping with O_DIRECT (DIRECT_WRITES).
        Returns the stretches left for copy_file_range: none, unless O_DIRECT refused an
        alignment (EINVAL: then it is not tried again)."""
        cb = self.tcb
        for k, (a, b) in enumerate(stretches):
            src = mv[delta + (a << cb) : delta + (b << cb)]
            dst = slot_offset(slot + a)
            done = 0
            try:
                while done < len(src):
                    done += os.pwrite(self.direct_fd, src[done:], dst + done)
            except OSError as e:
                if e.errno != errno.EINVAL or done:
                    raise
                self.direct_ok = False  # the fd stays open until copy() ends: others may use it
                return stretches[k:]
            finally:
                src.release()
        return []

    def _buffered(
        self,
        runs: list[Run],
        first_slot: int,
        slot_offset: Callable[[int], int],
        crcs: list[int],
        held: list[bool],
    ) -> None:
        """Runs read into one buffer; the dirty file clusters of each table cluster written with
        one pwritev per stretch of consecutive slots (a cluster of zeros ends a stretch)."""
        tcb, fcb = self.tcb, self.fcb
        total = sum(r.count for r in runs) << tcb
        mv = self.buffer(total)
        at = 0
        for run in runs:
            n = run.count << tcb
            part = mv[at : at + n]
            guest = run.first << tcb
            if run.kind == COPY:
                got = os.preadv(self.data_fd, [part], run.host)
                if self.encryption is not None:
                    got &= ~511  # a partial sector cannot be decrypted: it reads as zeros
                    part[:got] = self.cipher().decrypt(part[:got], run.host >> 9)
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
        iov: list[memoryview] = []
        iov_slot = first_slot
        slot = first_slot
        i = 0
        for run in runs:
            for tc in range(run.first, run.first + run.count):
                c = mv[i << tcb : (i + 1) << tcb]
                crc = zlib.crc32(c)
                whole_zero = crc == self.zero_crc and c == self.zero
                crcs.append(crc)
                for fc in self.file_clusters(tc):
                    off = (fc - tc * self.ratio) << fcb
                    piece = c[off : off + (1 << fcb)]
                    if whole_zero or (self.ratio > 1 and piece == self.zero_file):
                        held.append(False)
                        if iov:
                            self._write(iov, slot_offset(iov_slot))
                            iov = []
                    else:
                        held.append(True)
                        if not iov:
                            iov_slot = slot
                        iov.append(piece)
                    slot += 1
                i += 1
        if iov:
            self._write(iov, slot_offset(iov_slot))

    def _write(self, iov: list[memoryview], offset: int) -> None:
        """pwritev of consecutive pieces, IOV_MAX at a time, all of each written (encrypted
        first for an encrypted backup: IVs from their offsets in the new file)."""
        if self.encryption is not None:
            iov = [memoryview(self.cipher().encrypt(b"".join(iov), offset >> 9))]
        step = 1024
        for k in range(0, len(iov), step):
            part = iov[k : k + step]
            want = sum(len(p) for p in part)
            done = os.pwritev(self.out_fd, part, offset)
            if done != want:  # a short write (rare): the rest one piece at a time
                flat = b"".join(bytes(p) for p in part)[done:]
                os.pwrite(self.out_fd, flat, offset + done)
            offset += want


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
    file_bits: Optional[int] = None,
    dirty: Optional[bitarray] = None,
    progress: Optional[Callable[[int, int], None]] = None,
    workers: int = WORKERS,
    encryption: Optional[Encryption] = None,
) -> CopyResult:
    """Write the image for `runs` of `view` to out_fd (an empty file) and fsync it.

    incremental: ZERO runs become zero clusters (they hide the backing file); a full backup
    leaves them out. base_table is the previous point's table (incremental), which the result's
    table starts from. file_bits: the new file's cluster bits (default the source's); dirty:
    which of its clusters to write (None: every one of the runs'). encryption: the source's, for
    an encrypted backup (the module docstring)."""
    m = view.mapping
    tcb, tcs = m.cluster_bits, m.cluster_size
    fcb = tcb if file_bits is None else file_bits
    fcs = 1 << fcb
    if not 0 <= tcb - fcb <= fcb - 3:
        raise ValueError(f"file clusters of {fcs} bytes for table clusters of {tcs}")
    size = view.size
    nclusters = -(-size // tcs)
    per_l2 = fcs // 8
    worker = _Worker(view, out_fd, fcb, dirty, encryption)
    data_runs = [r for r in runs if r.kind != ZERO]
    # slots: one per file cluster to write, in guest order; tasks take consecutive slots
    tasks = batches(data_runs, tcb)
    first_slots = []
    slots = 0
    held_l2: set[int] = set()
    for t in tasks:
        first_slots.append(slots)
        for r in t:
            for tc in range(r.first, r.first + r.count):
                fcs_of = worker.file_clusters(tc)
                slots += len(fcs_of)
                # a table cluster's file clusters lie in one or two L2 tables (the ratio is at
                # most an L2 table's entries: file clusters are 4 KiB at the smallest)
                held_l2.update(fc // per_l2 for fc in fcs_of[:1] + fcs_of[-1:])
    zero_fcs: list[int] = []
    if incremental:
        for r in runs:
            if r.kind == ZERO:
                for tc in range(r.first, r.first + r.count):
                    zero_fcs += worker.file_clusters(tc)
        held_l2.update(fc // per_l2 for fc in zero_fcs)
    crypt_header = encryption.header if encryption is not None else None
    layout = new_image.plan(size, fcb, slots, held_l2, len(crypt_header or b""))
    os.ftruncate(out_fd, layout.file_size)
    l2: dict[int, array] = {i: array("Q", bytes(fcs)) for i in layout.l2_indexes}
    table = (
        tables.resized(base_table, nclusters, tcs)
        if base_table is not None
        else tables.new(nclusters, tcs)
    )
    zero_crc = tables.zero_crc(tcs)
    for r in runs:
        if r.kind == ZERO:
            for tc in range(r.first, r.first + r.count):
                table[tc] = zero_crc
    for fc in zero_fcs:
        l2[fc // per_l2][fc % per_l2] = new_image.ZERO_ENTRY
    zero_clusters = len(zero_fcs)
    total = slots << fcb
    done = 0
    used: list[int] = []
    worker.open_direct()
    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="backup-copy") as pool:
            pending: dict[Future[tuple[list[int], list[bool]]], int] = {}
            it = iter(range(len(tasks)))
            exhausted = False
            while pending or not exhausted:
                while not exhausted and len(pending) < 2 * workers:
                    try:
                        k = next(it)
                    except StopIteration:
                        exhausted = True
                        break
                    pending[
                        pool.submit(worker.batch, tasks[k], first_slots[k], layout.slot_offset)
                    ] = k
                if not pending:
                    break
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    k = pending.pop(fut)
                    crcs, held = fut.result()  # an I/O error ends the copy (the pool is shut down)
                    slot = first_slots[k]
                    i = j = 0
                    for r in tasks[k]:
                        for tc in range(r.first, r.first + r.count):
                            table[tc] = crcs[i] if crcs[i] >= 0 else zero_crc
                            i += 1
                            for fc in worker.file_clusters(tc):
                                entries = l2[fc // per_l2]
                                if held[j]:
                                    entries[fc % per_l2] = new_image.data_entry(layout, slot)
                                    used.append(slot)
                                elif incremental:
                                    entries[fc % per_l2] = new_image.ZERO_ENTRY
                                    zero_clusters += 1
                                j += 1
                                slot += 1
                    done += j << fcb
                    if progress is not None:
                        progress(done, total)
    finally:
        worker.close_direct()
    for off, data in new_image.metadata(layout, l2, used, backing_file, crypt_header):
        os.pwrite(out_fd, data, off)
    os.fsync(out_fd)
    return CopyResult(
        layout, len(used), zero_clusters, len(used) << fcb, table, encryption is not None
    )
