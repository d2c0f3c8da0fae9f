"""Power-loss simulation: replay every crash state a workload can leave on the disk.

How it works
------------
1. RecordingHostFile is a HostFile that does its I/O on a working copy and appends every
   write (file, offset, bytes), flush and truncate to a shared IOLog. recording_factory()
   makes one for the image and for its external data file (Qcow2Image's file_factory).
2. A workload runs through Qcow2Image + Disk with that factory, starting from a pristine
   image whose bytes were saved first. The Driver also drops markers into the log: a
   guest write begins ("gw"), a guest flush returned ("gf"), bitmap create/remove, close.
3. Explorer walks the log and materialises crash states. Model of the disk: a write to
   file F is durable once a later flush *of F* completed; writes after F's last flush may
   each have reached the disk or not, in any combination (the disk reorders within a
   flush epoch), and optionally only some of their 512-byte sectors (torn writes;
   a sector itself is atomic). Crash points:
     a) right after every flush: every write issued before it applied (the log prefix);
     b) just before every flush: the writes of the epoch since the previous flush, as
        subsets on top of the flushed state: all subsets when there are few, else the
        in-order prefixes, "all but one", "only one", random subsets and torn sectors.
   A truncate is treated as a barrier for its file (qcowfs does not truncate today).
   Distinct states are counted by content: same base + same differing 512-byte sectors.
4. Each distinct state (file bytes hashed) is written to its own directory and checked
   in a worker process (ProcessPoolExecutor; qemu-img runs in parallel):
     - qemu-img check --output=json exits 0 or 3 (leaks allowed, never 2). With lazy
       refcounts and the dirty bit set, errors are allowed if `qemu-img check -r all` (on a
       copy) repairs them to exit 0, and qcowfs' own read-write open (start_writing()
       rebuilds refcounts) leaves qemu-img check at 0 or 3 with the guest data unchanged;
     - qcowfs opens it read-only (Qcow2Image + BitmapStore) and reads the whole guest disk:
       every byte equals the guest content at the last completed guest flush, except
       bytes written since then, which may hold any value written there since (old or new);
     - every persistent bitmap is either in_use, or clean with exactly the right contents
       (QEMU's flags from qemu-img info, contents via qcowfs' loader; the expected bits
       are computed here from the guest writes, independently of qcowfs): a version stored
       by a clean close, allowed until the next session's first guest write; after a
       completed close, all of them clean and exact. A bitmap whose creation completed is
       present; one whose removal completed is gone. Inside a read-write open the whole
       extension may be stale (autoclear bit clear, QEMU's in-place protocol): no bitmaps;
     - qcowfs logs no error while reading the state;
     - on a sample of states, qemu-img convert -O raw equals qcowfs' read of the state
       (and internal snapshots read back unchanged).
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
import random
import shutil
import subprocess
import sys
import time
import zlib
from typing import Callable, Optional

from bitarray import bitarray

try:
    import qcowfs  # noqa: F401
except ImportError:  # run from a checkout without an installed qcowfs
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qcowfs.bitmaps import BitmapStore
from qcowfs.disk import Disk
from qcowfs.hostfile import HostFile
from qcowfs.image import Qcow2Image

KiB = 1 << 10
MiB = 1 << 20
SECTOR = 512

W, F, T, M = "w", "f", "t", "m"  # log entry kinds: write, flush, truncate, marker


# ============================================================================ recording
class IOLog:
    """The shared, ordered log of every host write, flush and truncate (and driver markers)."""

    def __init__(self, record_flushes: bool = True, record_callers: bool = True):
        #: (W, file, offset, bytes, caller) | (F, file, caller) | (T, file, length, caller) | (M, kind, value)
        self.entries: list = []
        self.record_flushes = record_flushes
        self.record_callers = record_callers

    def _caller(self) -> str:
        if not self.record_callers:
            return ""
        # the qcowfs function that asked for the I/O (skip the HostFile layers)
        f = sys._getframe(2)
        while f is not None and f.f_code.co_filename.endswith(("powerloss.py", "hostfile.py")):
            f = f.f_back
        if f is None:
            return "?"
        return f"{os.path.basename(f.f_code.co_filename)}:{f.f_lineno} {f.f_code.co_name}"

    def write(self, name: str, offset: int, data: bytes) -> None:
        self.entries.append((W, name, offset, data, self._caller()))

    def flush(self, name: str) -> None:
        if self.record_flushes:
            self.entries.append((F, name, self._caller()))

    def truncate(self, name: str, length: int) -> None:
        self.entries.append((T, name, length, self._caller()))

    def marker(self, kind: str, value=None) -> None:
        self.entries.append((M, kind, value))

    def counts(self) -> dict:
        c = {"writes": 0, "flushes": 0, "truncates": 0, "bytes": 0}
        for e in self.entries:
            if e[0] == W:
                c["writes"] += 1
                c["bytes"] += len(e[3])
            elif e[0] == F:
                c["flushes"] += 1
            elif e[0] == T:
                c["truncates"] += 1
        return c


class RecordingHostFile(HostFile):
    """A HostFile that also logs every write, flush and truncate (the I/O itself happens normally,
    except that fdatasync is skipped: the working copy's own durability does not matter)."""

    def __init__(self, path: str, writable: bool, log: IOLog, name: Optional[str] = None):
        super().__init__(path, writable)
        self.log = log
        self.name = name or os.path.basename(path)

    def pwrite(self, data, offset: int) -> None:
        data = bytes(data)
        super().pwrite(data, offset)
        self.log.write(self.name, offset, data)

    def pwritev(self, buffers, offset: int) -> None:
        self.pwrite(b"".join(bytes(b) for b in buffers), offset)

    def flush(self) -> None:
        self.log.flush(self.name)

    def truncate(self, length: int) -> None:
        super().truncate(length)
        self.log.truncate(self.name, length)


def recording_factory(log: IOLog) -> Callable:
    """file_factory for Qcow2Image: writable files (the image, its external data file) are recorded
    under their base name; read-only ones are plain HostFiles."""

    def factory(path: str, writable: bool):
        if not writable:
            return HostFile(path, writable=False)
        return RecordingHostFile(path, True, log)

    return factory


# ============================================================================ tools
def run(cmd, check=True, cwd=None) -> subprocess.CompletedProcess:
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=cwd)
    if check and p.returncode != 0:
        raise AssertionError(f"{cmd} exited {p.returncode}\nstdout: {p.stdout}\nstderr: {p.stderr}")
    return p


def qemu_img(*args, check=True) -> subprocess.CompletedProcess:
    return run(["qemu-img", *args], check=check)


def qemu_check(path: str, repair: Optional[str] = None) -> tuple:
    """(exit code, parsed JSON or raw text) of qemu-img check."""
    cmd = ["qemu-img", "check", "--output=json"]
    if repair:
        cmd += ["-r", repair]
    p = run(cmd + [path], check=False, cwd=os.path.dirname(os.path.abspath(path)))
    try:
        out = json.loads(p.stdout)
    except ValueError:
        out = {"stdout": p.stdout}
    if p.stderr.strip():
        # keep the errors; count the (harmless, often numerous) leak lines
        lines = p.stderr.strip().splitlines()
        leaks = [x for x in lines if x.startswith("Leaked cluster")]
        other = [x for x in lines if not x.startswith("Leaked cluster")]
        out["stderr"] = other[:12] + ([f"... {len(other) - 12} more"] if len(other) > 12 else []) + (
            [f"({len(leaks)} 'Leaked cluster' lines)"] if leaks else [])
    return p.returncode, out


def qemu_raw(path: str, dest: str, snapshot: Optional[str] = None) -> bytes:
    cmd = ["qemu-img", "convert", "-U", "-O", "raw"]
    if snapshot:
        cmd += ["-l", f"snapshot.name={snapshot}"]
    run(cmd + [path, dest], cwd=os.path.dirname(os.path.abspath(path)))
    with open(dest, "rb") as f:
        data = f.read()
    os.unlink(dest)
    return data


def qemu_bitmaps(path: str) -> dict:
    """name -> {"granularity", "flags"} as qemu-img info -U reports them."""
    p = run(["qemu-img", "info", "-U", "--output=json", path], cwd=os.path.dirname(os.path.abspath(path)))
    data = json.loads(p.stdout).get("format-specific", {}).get("data", {})
    return {b["name"]: b for b in data.get("bitmaps", [])}


def header_dirty(path: str) -> bool:
    with open(path, "rb") as f:
        f.seek(72)
        return bool(int.from_bytes(f.read(8), "big") & 1)


def read_header_field(path: str, offset: int, size: int) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        return int.from_bytes(f.read(size), "big")


# ============================================================================ workload driver
@dataclasses.dataclass
class BitmapSpec:
    """What a bitmap must hold: bits of guest writes[start:] (plus `initial` set bits)."""

    name: str
    granularity: int
    start: int  # first guest write index it records
    pristine_clean: bool = False  # present and not in_use in the pristine image


@dataclasses.dataclass
class Model:
    """Everything a checker needs to judge a crash state of one workload."""

    name: str
    image: str  # image file name (inside a state directory)
    files: list  # every file of a state (image first, then the external data file)
    size: int  # virtual size
    initial: bytes  # guest content of the pristine image (qemu-img convert)
    writes: list  # guest writes (offset, bytes) in issue order
    lazy: bool = False
    bitmaps: dict = dataclasses.field(default_factory=dict)  # name -> BitmapSpec
    #: (name, version) -> bitarray: every content a clean (not in_use) bitmap may legitimately show:
    #: version "pristine" (QEMU-made, empty) and "s<k>" (stored by the k-th clean close)
    versions: dict = dataclasses.field(default_factory=dict)
    snapshots: dict = dataclasses.field(default_factory=dict)  # name -> guest bytes of an internal snapshot
    ops: list = dataclasses.field(default_factory=list)  # human-readable workload for reports
    pristine_bitmap_names: set = dataclasses.field(default_factory=set)
    granularities: dict = dataclasses.field(default_factory=dict)  # bitmap name -> granularity
    oracle_every: int = 10  # qemu-img convert comparison on every Nth new state


class Driver:
    """Runs a workload on Disk(Qcow2Image(..., file_factory=recording)) and keeps the guest model."""

    def __init__(self, image_path: str, log: IOLog, model: Model):
        self.log = log
        self.model = model
        self.writes = model.writes
        self.path = image_path
        self.sessions = 0
        self._open()

    def _open(self) -> None:
        self.log.marker("open")
        self.img = Qcow2Image(self.path, read_only=False, file_factory=recording_factory(self.log))
        self.disk = Disk(self.img)  # start_writing() + bitmaps in_use, durably
        self.log.marker("opened")

    def reopen(self) -> None:
        """Clean close, then a new read-write open (bitmaps loaded and marked in_use again)."""
        self.close()
        self.model.ops.append("reopen")
        self._open()

    @property
    def cluster_size(self) -> int:
        return self.img.cluster_size

    def write(self, offset: int, data: bytes) -> None:
        data = bytes(data)
        self.log.marker("gw", len(self.writes))
        self.model.ops.append(f"write {offset:#x}+{len(data):#x}" + (" zeros" if not any(data) else ""))
        self.writes.append((offset, data))
        n = self.disk.write(offset, data)
        assert n == len(data)

    def zero(self, offset: int, length: int) -> None:
        self.write(offset, bytes(length))

    def flush(self) -> None:
        self.model.ops.append("flush")
        self.disk.flush()
        self.log.marker("gf", len(self.writes))

    def create_bitmap(self, name: str, granularity: int) -> None:
        self.model.ops.append(f"bitmap create {name} g={granularity}")
        self.log.marker("bm+", name)
        self.model.bitmaps[name] = BitmapSpec(name, granularity, len(self.writes))
        self.model.granularities[name] = granularity
        self.disk.bitmaps.create(name, granularity)
        self.log.marker("bm+done", name)

    def remove_bitmap(self, name: str) -> None:
        self.model.ops.append(f"bitmap remove {name}")
        self.log.marker("bm-", name)
        self.disk.bitmaps.remove(name)
        self.model.bitmaps.pop(name, None)
        self.log.marker("bm-done", name)

    def close(self) -> None:
        """Clean close (bitmaps stored, in_use cleared); the in-memory bitmaps must equal the model."""
        self.model.ops.append("close")
        self.sessions += 1
        version = f"s{self.sessions}"
        stored = []
        for name, spec in self.model.bitmaps.items():
            want = expected_bits(self.model, spec)
            have = self.disk.bitmaps.get(name).bits
            if have != want:
                raise AssertionError(f"in-memory bitmap {name} differs from the guest writes before close")
            self.model.versions[(name, version)] = want
            stored.append(name)
        self.log.marker("close", (version, tuple(stored)))
        self.disk.close()
        self.log.marker("gf", len(self.writes))
        self.log.marker("closed")


def expected_bits(model: Model, spec: BitmapSpec) -> bitarray:
    """The dirty bits a bitmap must hold: every granule touched by guest writes[spec.start:]."""
    g = spec.granularity
    nbits = -(-model.size // g)
    bits = bitarray(nbits, endian="little")
    bits.setall(0)
    for off, data in model.writes[spec.start :]:
        if data:
            bits[off // g : (off + len(data) - 1) // g + 1] = 1
    return bits


# ============================================================================ workloads
@dataclasses.dataclass
class Bounds:
    """How many crash states to draw per crash point."""

    exhaustive: int = 16  # enumerate all subsets when 2**n <= this
    prefixes: int = 6  # in-order prefixes of the epoch (evenly spaced when more)
    drop_one: int = 3  # "every write but one"
    singles: int = 3  # "only this one write"
    random: int = 8  # random subsets
    torn: int = 3  # random subsets with some multi-sector writes torn
    max_states: int = 0  # stop after this many distinct states (0 = no limit)

    def scaled(self, k: float) -> "Bounds":
        return Bounds(self.exhaustive if k <= 1 else int(self.exhaustive * 4), max(1, int(self.prefixes * k)),
                      max(1, int(self.drop_one * k)), max(1, int(self.singles * k)), max(1, int(self.random * k)),
                      max(0, int(self.torn * k)), int(self.max_states * k) if self.max_states else 0)


@dataclasses.dataclass
class Workload:
    name: str
    create: Callable  # create(dir) -> dict(image=..., files=[...], snapshots={...}, pristine_bitmaps=[BitmapSpec])
    run: Callable  # run(driver, rng)
    lazy: bool = False
    bounds: Bounds = dataclasses.field(default_factory=Bounds)
    verify: Optional[Callable] = None  # verify(dir, image_path_after_run, model) -> None (e.g. table growth)
    oracle_every: int = 10


def _create(path: str, size: int, **opts) -> None:
    o = ",".join(f"{k}={v}" for k, v in opts.items())
    args = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if o:
        args += ["-o", o]
    run(args + [path, str(size)], cwd=os.path.dirname(os.path.abspath(path)))


def _qemu_io(path: str, *cmds) -> None:
    args = ["qemu-io", "-f", "qcow2"]
    for c in cmds:
        args += ["-c", c]
    run(args + [path])


def random_writes(d: Driver, rng: random.Random, count: int, flush_every=(1, 4), zero_share: float = 0.1) -> None:
    """Allocation-heavy random writes: aligned runs of clusters, odd sizes at odd offsets, some zeros."""
    size = d.model.size
    cs = d.cluster_size
    since = 0
    next_flush = rng.randint(*flush_every)
    for _ in range(count):
        r = rng.random()
        if r < 0.35:
            n = rng.randint(1, 4)
            off = rng.randrange(0, size // cs - n + 1) * cs
            length = n * cs
        elif r < 0.65:
            length = rng.choice([512, 4096, 65536, 3 * 512])
            length = min(length, size // 4)
            off = rng.randrange(0, (size - length) // 512 + 1) * 512
        else:
            length = rng.randint(1, min(3 * cs, size // 4))
            off = rng.randrange(0, size - length + 1)
        data = bytes(length) if rng.random() < zero_share else rng.randbytes(length)
        d.write(off, data)
        since += 1
        if since >= next_flush:
            d.flush()
            since = 0
            next_flush = rng.randint(*flush_every)
    d.flush()


def wl_alloc(cluster: int, refbits: int, size: int, count: int) -> Workload:
    def create(dirname):
        img = os.path.join(dirname, "disk.qcow2")
        _create(img, size, cluster_size=cluster, refcount_bits=refbits)
        return dict(image="disk.qcow2")

    def body(d, rng):
        random_writes(d, rng, count)
        d.close()

    return Workload(f"alloc-c{cluster}-r{refbits}", create, body)


def wl_reftable_growth() -> Workload:
    """512 B clusters, 64-bit refcounts: a block covers 64 clusters (32 KiB), one refcount table cluster
    64 blocks (2 MiB of host file). qemu-img create makes a one-cluster table, so 4+ MiB of data must grow
    it (twice: 1 -> 2 -> 4 clusters, at least)."""
    size = 6 * MiB

    def create(dirname):
        img = os.path.join(dirname, "disk.qcow2")
        _create(img, size, cluster_size=512, refcount_bits=64)
        assert read_header_field(img, 56, 4) == 1
        return dict(image="disk.qcow2")

    def body(d, rng):
        # 4.5 MiB in 96 KiB..192 KiB pieces at shuffled offsets, a flush after each pair
        chunk = 192 * KiB
        offs = list(range(0, 4 * MiB + 512 * KiB, chunk))
        rng.shuffle(offs)
        for i, off in enumerate(offs):
            d.write(off, rng.randbytes(chunk - rng.choice([0, 512, 96 * KiB])))
            if i % 2:
                d.flush()
        d.flush()
        d.close()

    def verify(dirname, image_path, model):
        n = read_header_field(image_path, 56, 4)
        assert n >= 3, f"refcount table did not grow (refcount_table_clusters={n})"

    return Workload("reftable-growth-c512-r64", create, body, verify=verify,
                    bounds=Bounds(exhaustive=8, prefixes=3, drop_one=1, random=2, torn=1))


def wl_cow_backing(extended: bool = False) -> Workload:
    size = 4 * MiB
    cluster = 64 * KiB if extended else 4 * KiB

    def create(dirname):
        base = os.path.join(dirname, "base.qcow2")
        _create(base, size, cluster_size=cluster)
        _qemu_io(base, f"write -P 0x5a 0 {size}", f"write -P 0x33 {1 * MiB} {64 * KiB}", f"write -z {2 * MiB} {256 * KiB}")
        img = os.path.join(dirname, "disk.qcow2")
        opts = dict(cluster_size=cluster, backing_file=os.path.abspath(base), backing_fmt="qcow2")
        if extended:
            opts["extended_l2"] = "on"
        _create(img, size, **opts)
        return dict(image="disk.qcow2")

    def body(d, rng):
        # partial writes (sub-cluster, unaligned, straddling clusters) over the backing file
        cs = d.cluster_size
        for i in range(36):
            ci = rng.randrange(0, size // cs - 2)
            off = ci * cs + rng.randrange(0, cs)
            length = rng.choice([1, 100, 512, 3000, cs // 2, cs + 777])
            length = min(length, size - off)
            if rng.random() < 0.15 and length >= cs:
                d.zero(off, length)
            else:
                d.write(off, rng.randbytes(length))
            if rng.random() < 0.45:
                d.flush()
        d.flush()
        d.close()

    return Workload("cow-backing" + ("-extl2" if extended else "-c4k"), create, body)


def wl_zero_free(compat: str = "1.1") -> Workload:
    size = 4 * MiB
    cluster = 4 * KiB

    def create(dirname):
        img = os.path.join(dirname, "disk.qcow2")
        _create(img, size, cluster_size=cluster, compat=compat)
        return dict(image="disk.qcow2")

    def body(d, rng):
        cs = d.cluster_size
        for rnd in range(4):
            base = rng.randrange(0, size // cs - 64) * cs
            d.write(base, rng.randbytes(48 * cs))
            d.write(base + 3 * cs + 17, rng.randbytes(cs))
            d.flush()
            # zeros over whole clusters free them (zero clusters / deallocation), partial ones stay data
            for _ in range(5):
                a = base + rng.randrange(0, 40) * cs
                n = rng.randint(1, 8) * cs
                d.zero(a, n)
                if rng.random() < 0.3:
                    d.flush()
            d.zero(base + 5 * cs + 100, cs)  # straddles: partial data + nothing whole
            d.flush()
            # reallocate some of the freed clusters
            d.write(base + rng.randrange(0, 40) * cs, rng.randbytes(6 * cs))
            d.flush()
        d.close()

    return Workload(f"zero-free-c4k-compat{compat}", create, body)


def wl_snapshot() -> Workload:
    size = 4 * MiB
    cluster = 4 * KiB

    def create(dirname):
        img = os.path.join(dirname, "disk.qcow2")
        _create(img, size, cluster_size=cluster)
        _qemu_io(img, f"write -P 0x11 0 {3 * MiB}", f"write -c -P 0x22 {3 * MiB} {256 * KiB}")
        qemu_img("snapshot", "-c", "s1", img)
        _qemu_io(img, f"write -P 0x44 {512 * KiB} {256 * KiB}")
        snap = qemu_raw(img, os.path.join(dirname, "s1.raw"), snapshot="s1")
        return dict(image="disk.qcow2", snapshots={"s1": snap})

    def body(d, rng):
        cs = d.cluster_size
        for i in range(40):
            r = rng.random()
            off = rng.randrange(0, (size - 8 * cs) // 512) * 512
            if r < 0.2:
                d.zero(off // cs * cs, rng.randint(1, 6) * cs)  # frees: drops snapshot refcounts
            elif r < 0.5:
                d.write(off, rng.randbytes(rng.randint(1, 3 * cs)))  # partial: COW of shared clusters
            else:
                d.write(off // cs * cs, rng.randbytes(rng.randint(1, 6) * cs))
            if rng.random() < 0.45:
                d.flush()
        d.flush()
        d.close()

    return Workload("internal-snapshot-c4k", create, body, oracle_every=6)


def wl_bitmaps() -> Workload:
    """Two sessions. QEMU-made clean bitmaps q0 and gone; session 1 creates b0, writes, removes gone,
    creates b1, writes, closes (stores q0, b0, b1); session 2 reopens (in_use set again), writes,
    removes b0, writes, closes. Crash states inside the stores must show the old version in_use or
    the new one clean and exact."""
    size = 8 * MiB
    cluster = 64 * KiB

    def create(dirname):
        img = os.path.join(dirname, "disk.qcow2")
        _create(img, size, cluster_size=cluster)
        _qemu_io(img, f"write -P 0x77 0 {1 * MiB}")
        qemu_img("bitmap", "--add", "-g", "65536", img, "q0")
        qemu_img("bitmap", "--add", "-g", "16384", img, "gone")
        return dict(image="disk.qcow2", pristine_bitmaps=[BitmapSpec("q0", 65536, 0, True),
                                                          BitmapSpec("gone", 16384, 0, True)])

    def writes(d, rng, n):
        cs = d.cluster_size
        for i in range(n):
            off = rng.randrange(0, size - 3 * cs)
            d.write(off, rng.randbytes(rng.randint(1, 2 * cs)))
            if i % 3 == 2:
                d.flush()

    def body(d, rng):
        d.create_bitmap("b0", 4096)
        writes(d, rng, 8)
        d.flush()
        d.remove_bitmap("gone")
        d.create_bitmap("b1", 65536)
        writes(d, rng, 5)
        d.zero(4 * MiB, 2 * d.cluster_size)
        d.flush()
        d.reopen()  # stores q0, b0, b1; then marks them in_use again
        writes(d, rng, 4)
        d.remove_bitmap("b0")
        writes(d, rng, 3)
        d.close()  # stores q0, b1 over their previous versions

    return Workload("bitmaps-create-remove-store", create, body,
                    bounds=Bounds(exhaustive=32, prefixes=8, drop_one=4, singles=4, random=10, torn=3))


def wl_lazy() -> Workload:
    size = 4 * MiB

    def create(dirname):
        img = os.path.join(dirname, "disk.qcow2")
        _create(img, size, cluster_size=4096, lazy_refcounts="on")
        _qemu_io(img, f"write -P 0x66 0 {1 * MiB}")
        return dict(image="disk.qcow2")

    def body(d, rng):
        random_writes(d, rng, 50, zero_share=0.25)
        d.close()

    return Workload("lazy-refcounts-c4k", create, body, lazy=True)


def wl_data_file() -> Workload:
    size = 4 * MiB

    def create(dirname):
        img = os.path.join(dirname, "disk.qcow2")
        _create(img, size, cluster_size=4096, data_file="disk.data")
        return dict(image="disk.qcow2", files=["disk.qcow2", "disk.data"])

    def body(d, rng):
        random_writes(d, rng, 30, zero_share=0.0)
        d.close()

    return Workload("external-data-file-c4k", create, body)


def wl_refblock_siblings() -> Workload:
    """The smallest workload that makes one allocation create several refcount blocks at once, some
    of them placed where only a sibling new block covers them (512 B clusters, 64-bit refcounts: a
    block covers 64 clusters). 58 clusters at 0 leave the first free cluster at 63; the 64 KiB write
    then needs blocks 1-3, placed at clusters 63-65: blocks 2 and 3 are refcounted by block 1."""

    def create(dirname):
        _create(os.path.join(dirname, "disk.qcow2"), 1 * MiB, cluster_size=512, refcount_bits=64)
        return dict(image="disk.qcow2")

    def body(d, rng):
        d.write(0, rng.randbytes(58 * 512))
        d.flush()
        d.write(512 * KiB, rng.randbytes(64 * KiB))
        d.flush()
        d.close()

    return Workload("refblock-siblings-c512-r64", create, body, bounds=Bounds(exhaustive=64))


def workloads() -> list:
    out = []
    for cluster, size, count in ((512, 2 * MiB, 50), (4096, 4 * MiB, 50), (65536, 16 * MiB, 45)):
        for refbits in (1, 16):
            out.append(wl_alloc(cluster, refbits, size, count))
    out += [wl_refblock_siblings(), wl_reftable_growth(), wl_cow_backing(), wl_cow_backing(extended=True),
            wl_zero_free(), wl_zero_free("0.10"), wl_snapshot(), wl_bitmaps(), wl_lazy(), wl_data_file()]
    return out


# ============================================================================ recording a run
@dataclasses.dataclass
class Recorded:
    workload: Workload
    model: Model
    log: IOLog
    pristine: dict  # file name -> bytes
    workdir: str


def record(wl: Workload, workdir: str, seed: Optional[int] = None, record_flushes: bool = True) -> Recorded:
    """Create the pristine image, save its bytes, run the workload through the recording factory."""
    os.makedirs(workdir, exist_ok=True)
    pdir = os.path.join(workdir, "pristine")
    os.makedirs(pdir, exist_ok=True)
    info = wl.create(pdir)
    image = info["image"]
    files = info.get("files", [image])
    pristine = {}
    for name in files:
        with open(os.path.join(pdir, name), "rb") as f:
            pristine[name] = f.read()
    initial = qemu_raw(os.path.join(pdir, image), os.path.join(workdir, "initial.raw"))
    size = len(initial)
    model = Model(wl.name, image, files, size, initial, [], lazy=wl.lazy, snapshots=info.get("snapshots", {}),
                  oracle_every=wl.oracle_every)
    for spec in info.get("pristine_bitmaps", []):
        model.bitmaps[spec.name] = spec
    model.pristine_bitmap_names = {s.name for s in info.get("pristine_bitmaps", [])}
    for spec in info.get("pristine_bitmaps", []):
        model.granularities[spec.name] = spec.granularity
        empty = bitarray(-(-size // spec.granularity), endian="little")
        empty.setall(0)
        model.versions[(spec.name, "pristine")] = empty
    # the working copy the workload writes to (pristine stays untouched for the backing file etc.)
    wdir = os.path.join(workdir, "run")
    os.makedirs(wdir, exist_ok=True)
    for name in files:
        shutil.copyfile(os.path.join(pdir, name), os.path.join(wdir, name))
    log = IOLog(record_flushes=record_flushes)
    rng = random.Random(seed if seed is not None else zlib.crc32(wl.name.encode()))
    drv = Driver(os.path.join(wdir, image), log, model)
    try:
        wl.run(drv, rng)
    finally:
        if not drv.img._closed:
            drv.img.close(flush=False)
    if wl.verify:
        wl.verify(workdir, os.path.join(wdir, image), model)
    # the replayed log must reproduce the working copy exactly
    final = replay_all(pristine, log)
    for name in files:
        with open(os.path.join(wdir, name), "rb") as f:
            if f.read() != bytes(final[name]):
                raise AssertionError(f"replaying the log does not reproduce {name}: the recording missed I/O")
    return Recorded(wl, model, log, pristine, workdir)


def replay_all(pristine: dict, log: IOLog) -> dict:
    files = {n: bytearray(b) for n, b in pristine.items()}
    for e in log.entries:
        if e[0] == W:
            _apply(files[e[1]], e[2], e[3])
        elif e[0] == T:
            _truncate(files[e[1]], e[2])
    return files


def _apply(buf: bytearray, offset: int, data: bytes) -> None:
    end = offset + len(data)
    if end > len(buf):
        buf.extend(bytes(end - len(buf)))
    buf[offset:end] = data


def _truncate(buf: bytearray, length: int) -> None:
    if length < len(buf):
        del buf[length:]
    else:
        buf.extend(bytes(length - len(buf)))


# ============================================================================ crash states
@dataclasses.dataclass
class Expect:
    """What must hold in a crash state, from the markers the driver logged before the crash point."""

    durable: int = 0  # guest writes[:durable] were flushed
    pending: tuple = ()  # guest writes issued since (may or may not be there)
    #: (name, version) a clean bitmap may show: the last stored versions until a guest write starts
    #: (a read-write open marks them in_use first), plus the versions a clean close is storing
    clean_ok: frozenset = frozenset()
    closed: bool = False  # a clean close completed (and no new open since): bitmaps stored, exactly right
    must: frozenset = frozenset()  # after a clean close: exactly these (name, version), clean
    opening: bool = False  # inside a read-write open: activation may leave the extension stale
    created: frozenset = frozenset()  # bitmaps whose creation completed (present from then on)
    creating: frozenset = frozenset()  # bitmaps whose creation had started
    removed: frozenset = frozenset()  # bitmaps whose removal completed (absent from then on)

    def key(self) -> tuple:
        return dataclasses.astuple(self)


@dataclasses.dataclass
class Task:
    sid: int
    dir: str
    expect: Expect
    content_new: bool  # first time these bytes are checked: run the content-only checks
    oracle: bool  # compare qemu-img convert with qcowfs' read
    where: str  # crash point and kept writes, for reports
    failed_dir: str = ""  # where a failing state is kept


@dataclasses.dataclass
class Stats:
    workload: str = ""
    crash_points: int = 0
    generated: int = 0  # candidate states drawn
    distinct: int = 0  # distinct file contents checked
    checks: int = 0  # distinct (contents, expectation) pairs checked
    qemu_checks: int = 0
    dirty_states: int = 0
    dirty_repaired: int = 0  # dirty states qemu-img check called corrupt (repaired, then clean)
    leaks: int = 0  # states where qemu-img check reported leaks (exit 3)
    in_use_bitmaps: int = 0
    clean_bitmaps: int = 0
    stale_bitmaps: int = 0
    oracle_reads: int = 0
    log_writes: int = 0
    log_flushes: int = 0
    seconds: float = 0.0
    failures: list = dataclasses.field(default_factory=list)

    def line(self) -> str:
        extra = [f"{self.checks} state/expectation pairs", f"{self.crash_points} crash points",
                 f"log {self.log_writes} writes / {self.log_flushes} flushes", f"{self.leaks} with leaks"]
        if self.dirty_states:
            extra.append(f"{self.dirty_states} with the dirty bit ({self.dirty_repaired} corrupt until repaired)")
        if self.in_use_bitmaps or self.clean_bitmaps:
            extra.append(f"{self.in_use_bitmaps} in_use + {self.clean_bitmaps} clean bitmaps seen")
        if self.stale_bitmaps:
            extra.append(f"{self.stale_bitmaps} with the bitmaps extension stale")
        extra.append(f"{self.oracle_reads} qemu-img convert cross-checks")
        return (f"power-loss {self.workload}: {self.distinct} distinct crash states checked ({', '.join(extra)}) "
                f"in {self.seconds:.1f}s" + (f", {len(self.failures)} FAILING" if self.failures else ""))


def _choices(rng: random.Random, opt: list, entries: list, bounds: Bounds, want_full: bool) -> list:
    """Subsets of the optional writes `opt` (log indices) to apply: lists of (index, sector set or None)."""
    n = len(opt)
    out = []
    if n == 0:
        return [[]] if want_full else []
    if (1 << n) <= bounds.exhaustive:
        for mask in range(1 << n):
            if mask == (1 << n) - 1 and not want_full:
                continue
            out.append([(opt[j], None) for j in range(n) if mask >> j & 1])
    else:
        if want_full:
            out.append([(i, None) for i in opt])
        # in-order prefixes (the disk wrote in issue order and stopped)
        ks = range(n) if n <= bounds.prefixes else sorted({round(j * (n - 1) / (bounds.prefixes - 1)) for j in range(bounds.prefixes)}) if bounds.prefixes > 1 else [0]
        for k in ks:
            out.append([(i, None) for i in opt[:k]])
        for j in rng.sample(range(n), min(n, bounds.drop_one)):
            out.append([(i, None) for i in opt if i != opt[j]])
        for j in rng.sample(range(n), min(n, bounds.singles)):
            out.append([(opt[j], None)])
        for _ in range(bounds.random):
            q = rng.choice((0.15, 0.5, 0.85))
            out.append([(i, None) for i in opt if rng.random() < q])
    # torn writes: some multi-sector writes keep only some of their sectors
    tearable = [i for i in opt if _nsectors(entries[i]) > 1]
    for _ in range(bounds.torn if tearable else 0):
        torn = set(rng.sample(tearable, rng.randint(1, min(3, len(tearable)))))
        pick = []
        for i in opt:
            if i in torn:
                secs = _sectors(entries[i])
                keep = frozenset(s for s in secs if rng.random() < 0.5)
                if 0 < len(keep) < len(secs):
                    pick.append((i, keep))
                    continue
            if rng.random() < 0.5:
                pick.append((i, None))
        out.append(pick)
    return out


def _sectors(e) -> range:
    off, data = e[2], e[3]
    return range(off // SECTOR, (off + len(data) - 1) // SECTOR + 1)


def _nsectors(e) -> int:
    return len(_sectors(e)) if e[0] == W and e[3] else 0


def _merge(intervals) -> list:
    out = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def _diff_digest(base: bytearray, regs: list, bufs: list, size: int) -> bytes:
    """A canonical digest of how a state differs from its base: the 512-byte sectors (fixed grid)
    whose bytes differ, with their offsets. Same base + same digest + same size = same bytes, and
    the other way round, whatever writes produced them."""
    sectors: dict = {}
    for (a, bb), buf in zip(regs, bufs):
        old = base[a:bb]
        if len(old) < bb - a:
            old = old + bytes(bb - a - len(old))
        if buf == old:
            continue
        for s0 in range(a - a % SECTOR, bb, SECTOR):
            sec = sectors.get(s0)
            if sec is None:
                sec = base[s0 : s0 + SECTOR]
                if len(sec) < SECTOR:
                    sec = sec + bytes(SECTOR - len(sec))
                sectors[s0] = sec
            lo, hi = max(a, s0), min(bb, s0 + SECTOR)
            sec[lo - s0 : hi - s0] = buf[lo - a : hi - a]
    h = hashlib.blake2b(digest_size=16)
    for s0 in sorted(sectors):
        sec = sectors[s0]
        old = base[s0 : s0 + SECTOR]
        if len(old) < SECTOR:
            old = old + bytes(SECTOR - len(old))
        if sec != old:
            h.update(s0.to_bytes(8, "little"))
            h.update(sec)
    return h.digest()


class Explorer:
    """Walks a recorded log, materialises crash states and feeds them to the checkers."""

    def __init__(self, rec: Recorded, bounds: Bounds, jobs: int, seed: int = 0):
        self.rec = rec
        self.bounds = bounds
        self.jobs = jobs
        self.rng = random.Random(seed ^ zlib.crc32(rec.model.name.encode()))
        self.stats = Stats(workload=rec.model.name)
        c = rec.log.counts()
        self.stats.log_writes, self.stats.log_flushes = c["writes"], c["flushes"]
        self.seen_content: set = set()
        self.seen_pairs: set = set()
        # crash states live briefly (written, checked, deleted): tmpfs when there is one
        shm = "/dev/shm"
        if os.path.isdir(shm) and os.access(shm, os.W_OK):
            import tempfile

            self.states_dir = tempfile.mkdtemp(prefix=f"qcowfs-powerloss-{rec.model.name}-", dir=shm)
        else:
            self.states_dir = os.path.join(rec.workdir, "states")
            os.makedirs(self.states_dir, exist_ok=True)
        self.failed_dir = os.path.join(rec.workdir, "failed")
        self.sid = 0

    def crash_points(self) -> list:
        """[(p, want_full, want_subsets)]: right after every flush (p past the markers that follow
        it, everything before applied) and just before every flush (the epoch's subsets)."""
        ents = self.rec.log.entries
        n = len(ents)
        pts: dict = {0: [True, False]}
        for i, e in enumerate(ents):
            if e[0] in (F, T):
                pts.setdefault(i, [False, False])[1] = True
                j = i + 1
                while j < n and ents[j][0] == M:
                    j += 1
                pts.setdefault(j, [False, False])[0] = True
        pts.setdefault(n, [False, False])
        pts[n] = [True, True]
        return sorted((p, full, sub) for p, (full, sub) in pts.items())

    def run(self) -> Stats:
        t0 = time.monotonic()
        global _MODEL
        _MODEL = self.rec.model
        ctx = multiprocessing.get_context("fork")
        try:
            with cf.ProcessPoolExecutor(max_workers=self.jobs, mp_context=ctx) as pool:
                self.pool = pool
                self.inflight: set = set()
                try:
                    self._walk()
                    self._drain(0)
                finally:
                    for fut in self.inflight:
                        fut.cancel()
        finally:
            shutil.rmtree(self.states_dir, ignore_errors=True)
        self.stats.seconds = time.monotonic() - t0
        return self.stats

    def _walk(self) -> None:
        rec = self.rec
        ents = rec.log.entries
        points = self.crash_points()
        self.stats.crash_points = len(points)
        base = {n: bytearray(b) for n, b in rec.pristine.items()}
        base_hash = {n: hashlib.blake2b(b, digest_size=16).digest() for n, b in base.items()}
        unflushed: dict = {n: [] for n in base}
        ex = Expect()
        created, creating, removed = set(), set(), set()
        clean_ok = {k for k in rec.model.versions if k[1] == "pristine"}
        must: set = set()
        gw_started = 0
        i = 0
        for p, want_full, want_sub in points:
            while i < p:
                e = ents[i]
                if e[0] == W:
                    unflushed[e[1]].append(i)
                elif e[0] in (F, T):
                    name = e[1]
                    for j in unflushed[name]:
                        _apply(base[name], ents[j][2], ents[j][3])
                    if e[0] == T:
                        _truncate(base[name], e[2])
                    if unflushed[name] or e[0] == T:
                        base_hash[name] = hashlib.blake2b(base[name], digest_size=16).digest()
                    unflushed[name] = []
                else:
                    kind, val = e[1], e[2]
                    if kind == "gw":
                        gw_started = val + 1
                        clean_ok = set()
                    elif kind == "gf":
                        ex.durable = val
                    elif kind == "close":
                        version, names = val
                        must = {(n, version) for n in names}
                        clean_ok |= must
                    elif kind == "closed":
                        ex.closed = True
                    elif kind == "open":
                        ex.closed = False
                        ex.opening = True
                        must = set()
                    elif kind == "opened":
                        ex.opening = False
                    elif kind == "bm+":
                        creating.add(val)
                        removed.discard(val)
                    elif kind == "bm-":
                        created.discard(val)  # removal under way: it may be gone already
                    elif kind == "bm+done":
                        created.add(val)
                    elif kind == "bm-done":
                        removed.add(val)
                        created.discard(val)
                i += 1
            ex.pending = tuple(range(ex.durable, gw_started))
            ex.created, ex.creating, ex.removed = frozenset(created), frozenset(creating), frozenset(removed)
            ex.clean_ok, ex.must = frozenset(clean_ok), frozenset(must if ex.closed else ())
            opt = sorted(j for lst in unflushed.values() for j in lst)
            if not want_sub:
                choices = [[(j, None) for j in opt]] if want_full else []
            else:
                choices = _choices(self.rng, opt, ents, self.bounds, want_full)
            for choice in choices:
                self._emit(p, base, base_hash, unflushed, choice, dataclasses.replace(ex))
                if self.bounds.max_states and self.stats.distinct >= self.bounds.max_states:
                    return

    def _emit(self, p, base, base_hash, unflushed, choice, ex: Expect) -> None:
        ents = self.rec.log.entries
        self.stats.generated += 1
        # per file: the regions the optional writes touch, rebuilt with the chosen pieces
        layout = {}
        key = []
        by_file: dict = {}
        for j, secs in choice:
            by_file.setdefault(ents[j][1], []).append((j, secs))
        for name in self.rec.model.files:
            regs = _merge((ents[j][2], ents[j][2] + len(ents[j][3])) for j in unflushed[name])
            b = base[name]
            bufs = [bytearray(b[a:bb]) + bytes(max(0, bb - max(a, len(b)))) for a, bb in regs]
            size = len(b)
            for j, secs in by_file.get(name, []):
                off, data = ents[j][2], ents[j][3]
                pieces = [(off, data)] if secs is None else [
                    (max(off, s * SECTOR), data[max(off, s * SECTOR) - off : min(off + len(data), (s + 1) * SECTOR) - off])
                    for s in sorted(secs)]
                for po, pd in pieces:
                    if not pd:
                        continue
                    size = max(size, po + len(pd))
                    for (a, bb), buf in zip(regs, bufs):
                        if a <= po and po + len(pd) <= bb:
                            buf[po - a : po - a + len(pd)] = pd
                            break
                    else:  # pragma: no cover
                        raise AssertionError("write outside its region")
            key.append((name, base_hash[name], size, _diff_digest(b, regs, bufs, size)))
            layout[name] = (regs, bufs, size)
        ckey = tuple(key)
        pkey = (ckey, ex.key())
        if pkey in self.seen_pairs:
            return
        self.seen_pairs.add(pkey)
        content_new = ckey not in self.seen_content
        if content_new:
            self.seen_content.add(ckey)
            self.stats.distinct += 1
        self.stats.checks += 1
        self.sid += 1
        sdir = os.path.join(self.states_dir, str(self.sid))
        os.makedirs(sdir)
        for name, (regs, bufs, size) in layout.items():
            with open(os.path.join(sdir, name), "wb") as f:
                b = base[name]
                f.write(b)
                for (a, bb), buf in zip(regs, bufs):
                    end = min(bb, size)
                    if end > a:
                        f.seek(a)
                        f.write(buf[: end - a])
                f.truncate(size)
        kept = ", ".join(f"#{j}" + ("" if s is None else f"[sectors {sorted(s)}]") for j, s in choice)
        opt = sorted(j for lst in unflushed.values() for j in lst)
        where = (f"crash point: log position {p} of {len(ents)}; writes since the last flush of their file "
                 f"(optional): {opt}; applied: [{kept}]")
        oracle = content_new and (self.stats.distinct % max(1, self.rec.model.oracle_every) == 1 or ex.closed)
        task = Task(self.sid, sdir, ex, content_new, oracle, where, self.failed_dir)
        self._drain(3 * self.jobs)
        fut = self.pool.submit(check_state, task)
        self.inflight.add(fut)

    def _drain(self, limit: int) -> None:
        while len(self.inflight) > limit:
            done, _ = cf.wait(self.inflight, return_when=cf.FIRST_COMPLETED)
            for fut in done:
                self.inflight.discard(fut)
                res = fut.result()
                self._collect(res)

    def _collect(self, res: dict) -> None:
        s = self.stats
        for k in ("qemu_checks", "dirty_states", "dirty_repaired", "leaks", "in_use_bitmaps", "clean_bitmaps", "stale_bitmaps",
                  "oracle_reads"):
            setattr(s, k, getattr(s, k) + res.get(k, 0))
        if res["failures"]:
            s.failures.append(res)

    # ------------------------------------------------------------------ reporting
    def describe_entries(self, indices) -> str:
        ents = self.rec.log.entries
        out = []
        for j in indices:
            e = ents[j]
            if e[0] == W:
                out.append(f"  #{j} write {e[1]} {e[2]:#x}+{len(e[3]):#x} by {e[4]}")
            elif e[0] == F:
                out.append(f"  #{j} flush {e[1]} by {e[2]}")
            elif e[0] == T:
                out.append(f"  #{j} truncate {e[1]} to {e[2]:#x} by {e[3]}")
            else:
                out.append(f"  #{j} marker {e[1]} {e[2]!r}")
        return "\n".join(out)


def failure_report(ex: Explorer, max_failures: int = 3) -> str:
    s = ex.stats
    if not s.failures:
        return ""
    lines = [f"{len(s.failures)} failing crash states in workload {s.workload} (states kept under {ex.failed_dir}; "
             f"rerun: scripts/crash-states -w {s.workload} --workdir DIR)"]
    lines.append("workload ops: " + "; ".join(ex.rec.model.ops))
    for res in s.failures[:max_failures]:
        lines.append(f"--- state {res['sid']} ({res['dir']}): {res['where']}")
        lines.extend("  FAIL: " + f for f in res["failures"])
        # the log around the crash point
        p = int(res["where"].split("log position ")[1].split(" ")[0])
        lo = max(0, p - 30)
        lines.append(f"log entries {lo}..{p - 1} (before the crash point):")
        lines.append(ex.describe_entries(range(lo, p)))
    return "\n".join(lines)


# ============================================================================ checking (worker side)
_MODEL: Optional[Model] = None
_GUEST_CACHE: list = [None, None]  # [durable count, bytearray]


def _guest_at(m: Model, n: int) -> bytearray:
    c_n, c_buf = _GUEST_CACHE
    if c_buf is None or c_n > n or _GUEST_CACHE[0] is None:
        c_n, c_buf = 0, bytearray(m.initial)
    for off, data in m.writes[c_n:n]:
        c_buf[off : off + len(data)] = data
    _GUEST_CACHE[0], _GUEST_CACHE[1] = n, c_buf
    return c_buf


def compare_guest(actual: bytes, m: Model, ex: Expect) -> Optional[str]:
    """None if every byte is the flushed guest content or a value written there since."""
    expected = _guest_at(m, ex.durable)
    if actual == expected:
        return None
    if len(actual) != len(expected):
        return f"guest disk reads {len(actual)} bytes, expected {len(expected)}"
    pend = [(i, m.writes[i][0], m.writes[i][1]) for i in ex.pending if m.writes[i][1]]
    regions = _merge((o, o + len(d)) for _, o, d in pend)

    def bad(pos: int) -> str:
        last = next((i for i in range(ex.durable - 1, -1, -1)
                     if m.writes[i][0] <= pos < m.writes[i][0] + len(m.writes[i][1])), None)
        src = f"guest write #{last}" if last is not None else "the pristine image"
        return (f"guest byte {pos:#x} reads {actual[pos]:#04x}, expected {expected[pos]:#04x} (from {src}, "
                f"made durable by a guest flush after {ex.durable} writes; pending writes {list(ex.pending)})")

    pos = 0
    for a, b in regions + [(len(actual), len(actual))]:
        if actual[pos:a] != expected[pos:a]:
            k = next(k for k in range(pos, a) if actual[k] != expected[k])
            return bad(k)
        pos = b
    for a, b in regions:
        cuts = sorted({a, b} | {x for _, o, d in pend for x in (o, o + len(d)) if a < x < b})
        for x, y in zip(cuts, cuts[1:]):
            seg = actual[x:y]
            cands = [expected[x:y]] + [d[x - o : y - o] for _, o, d in pend if o <= x and y <= o + len(d)]
            if any(seg == c for c in cands):
                continue
            # mixed: sector by sector (guest sectors map to host sectors), then byte by byte
            s0 = x
            while s0 < y:
                s1 = min(y, (s0 // SECTOR + 1) * SECTOR)
                blk = seg[s0 - x : s1 - x]
                if not any(blk == c[s0 - x : s1 - x] for c in cands):
                    for k in range(s0, s1):
                        v = actual[k]
                        if v != expected[k] and all(v != c[k - x] for c in cands[1:]):
                            return bad(k) + " (and no pending write wrote that value there)"
                s0 = s1
    return None


def _copy_state(src: str, dst: str, files: list) -> None:
    os.makedirs(dst, exist_ok=True)
    for n in files:
        shutil.copyfile(os.path.join(src, n), os.path.join(dst, n))


class _ErrorLog(logging.Handler):
    """Collects what qcowfs logs at ERROR level while it reads a crash state: it found damage."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.messages: list = []

    def emit(self, record) -> None:
        self.messages.append(record.getMessage())


_ERRORS: Optional[_ErrorLog] = None


def _worker_logging() -> _ErrorLog:
    global _ERRORS
    if _ERRORS is None:
        lg = logging.getLogger("qcowfs")
        lg.handlers[:] = []
        lg.propagate = False  # expected warnings (refcount rebuilds) stay quiet
        lg.setLevel(logging.WARNING)
        _ERRORS = _ErrorLog()
        lg.addHandler(_ERRORS)
    _ERRORS.messages.clear()
    return _ERRORS


def check_state(task: Task) -> dict:
    m = _MODEL
    errors = _worker_logging()
    img_path = os.path.join(task.dir, m.image)
    res = {"sid": task.sid, "dir": task.dir, "where": task.where, "failures": []}
    fails = res["failures"]
    try:
        _check_state(m, task, img_path, res, fails)
    except Exception as e:  # a checker crash is a failure too, with its traceback
        import traceback

        fails.append("checker raised: " + "".join(traceback.format_exception(e)))
    if errors.messages:
        fails.append("qcowfs logged errors reading the state: " + "; ".join(errors.messages[:5]))
    if fails:
        failed = os.path.join(task.failed_dir, str(task.sid))
        os.makedirs(os.path.dirname(failed), exist_ok=True)
        shutil.move(task.dir, failed)
        res["dir"] = failed
        with open(os.path.join(failed, "REPORT.txt"), "w") as f:
            f.write(task.where + "\n" + "\n".join(fails) + "\n")
    else:
        shutil.rmtree(task.dir, ignore_errors=True)
    return res


def _check_state(m: Model, task: Task, img_path: str, res: dict, fails: list) -> None:
    ex = task.expect
    dirty = header_dirty(img_path)
    if task.content_new:
        res["qemu_checks"] = 1
        rc, out = qemu_check(img_path)
        if rc == 3:
            res["leaks"] = 1
        if dirty:
            res["dirty_states"] = 1
            res["dirty_repaired"] = int(rc == 2)
            if not m.lazy:
                fails.append("dirty bit set on an image without lazy refcounts")
            _check_dirty_repairs(m, task, fails)
        elif rc not in (0, 3):
            fails.append(f"qemu-img check exit {rc} (want 0 or 3): {json.dumps(out)}")
    # qcowfs opens it read-only and reads the guest disk
    try:
        img = Qcow2Image(img_path, read_only=True)
    except Exception as e:
        fails.append(f"qcowfs cannot open the state read-only: {e!r}")
        return
    try:
        actual = img.read(0, m.size)
        store = BitmapStore(img)
        bms = {n: (b.inconsistent, b.bits, b.granularity) for n, b in store.bitmaps.items()}
        stale = img.header.stale_bitmaps_ext is not None
    finally:
        img.close(flush=False)
    why = compare_guest(actual, m, ex)
    if why:
        fails.append("durable data lost: " + why)
    if task.oracle:
        res["oracle_reads"] = 1
        ref = qemu_raw(img_path, os.path.join(task.dir, "ref.raw"))
        if ref != actual:
            k = next((k for k in range(min(len(ref), len(actual))) if ref[k] != actual[k]), min(len(ref), len(actual)))
            fails.append(f"qemu-img convert and qcowfs read the state differently (first at guest byte {k:#x})")
        for snap, want in m.snapshots.items():
            got = qemu_raw(img_path, os.path.join(task.dir, "snap.raw"), snapshot=snap)
            if got != want:
                fails.append(f"internal snapshot {snap} changed")
    if m.granularities or bms:
        _check_bitmaps(m, ex, img_path, bms, stale, res, fails)


def _check_dirty_repairs(m: Model, task: Task, fails: list) -> None:
    """Lazy refcounts, dirty bit set: qemu-img check -r all must repair it fully, and qcowfs' own
    read-write open must rebuild the refcounts (qemu-img check 0 or 3 after, guest data unchanged)."""
    qdir = task.dir + ".qrepair"
    _copy_state(task.dir, qdir, m.files)
    q = os.path.join(qdir, m.image)
    rc, out = qemu_check(q, repair="all")
    rc2, out2 = qemu_check(q)
    if rc2 != 0:
        fails.append(f"after qemu-img check -r all (exit {rc}: {json.dumps(out)}), qemu-img check exits {rc2}: "
                     f"{json.dumps(out2)}")
    shutil.rmtree(qdir, ignore_errors=True)
    fdir = task.dir + ".frepair"
    _copy_state(task.dir, fdir, m.files)
    f = os.path.join(fdir, m.image)
    try:
        before = Qcow2Image(os.path.join(task.dir, m.image), read_only=True)
        try:
            want = before.read(0, m.size)
        finally:
            before.close(flush=False)
        img = Qcow2Image(f, read_only=False)
        try:
            img.start_writing()
        finally:
            img.close()
        rc3, out3 = qemu_check(f)
        if rc3 not in (0, 3):
            fails.append(f"after qcowfs' read-write open (refcount rebuild), qemu-img check exits {rc3}: {json.dumps(out3)}")
        if header_dirty(f):
            fails.append("dirty bit still set after qcowfs' read-write open and close")
        after = Qcow2Image(f, read_only=True)
        try:
            if after.read(0, m.size) != want:
                fails.append("qcowfs' refcount rebuild changed the guest data")
        finally:
            after.close(flush=False)
    except Exception as e:
        fails.append(f"qcowfs' read-write open of the dirty state failed: {e!r}")
    shutil.rmtree(fdir, ignore_errors=True)


def _check_bitmaps(m: Model, ex: Expect, img_path: str, bms: dict, stale: bool, res: dict, fails: list) -> None:
    """Every bitmap is in_use (inconsistent), or clean with exactly a stored version's contents."""
    q = qemu_bitmaps(img_path)
    if set(q) != set(bms):
        fails.append(f"bitmaps: qemu-img info lists {sorted(q)}, qcowfs {sorted(bms)}")
        return
    if stale:
        # bitmaps extension present, autoclear bit clear: every bitmap is dropped (QEMU's protocol
        # while a read-write open marks them in_use: autoclear off, directory, autoclear on)
        res["stale_bitmaps"] = 1
        if not ex.opening:
            fails.append("bitmaps extension without its autoclear bit outside a read-write open")
        if bms:
            fails.append(f"bitmaps listed although the extension is stale: {sorted(bms)}")
        return
    allowed_names = set(m.pristine_bitmap_names) | set(ex.creating)
    for name, (inconsistent, bits, gran) in bms.items():
        qin = "in-use" in q[name]["flags"]
        if qin != inconsistent:
            fails.append(f"bitmap {name}: QEMU says in-use={qin}, qcowfs inconsistent={inconsistent}")
        if q[name]["granularity"] != gran or gran != m.granularities.get(name, gran):
            fails.append(f"bitmap {name}: granularity {q[name]['granularity']} (QEMU) / {gran} (qcowfs), "
                         f"expected {m.granularities.get(name)}")
        if name not in allowed_names:
            fails.append(f"bitmap {name} appeared from nowhere")
            continue
        if name in ex.removed:
            fails.append(f"bitmap {name} is still there after its removal completed")
            continue
        if inconsistent:
            res["in_use_bitmaps"] = res.get("in_use_bitmaps", 0) + 1
            if ex.closed:
                fails.append(f"bitmap {name} still in_use after a clean close")
            continue
        res["clean_bitmaps"] = res.get("clean_bitmaps", 0) + 1
        ok = sorted(v for n, v in ex.clean_ok if n == name)
        if ex.closed:
            ok = sorted(v for n, v in ex.must if n == name)
        if not any(bits == m.versions[(name, v)] for v in ok):
            match = [v for (n, v), want in m.versions.items() if n == name and bits == want]
            fails.append(f"bitmap {name} is clean (not in_use) but holds "
                         + (f"version {match} (allowed here: {ok or 'none: it must be in_use'})" if match else
                            f"no stored version ({bits.count()} bits set; allowed here: {ok or 'none: it must be in_use'})"))
    for name in ex.created:
        if name not in bms:
            fails.append(f"bitmap {name} is missing although its creation completed")
    if ex.closed:
        want = {n for n, _ in ex.must}
        if set(bms) != want:
            fails.append(f"after a clean close the bitmaps are {sorted(bms)}, expected {sorted(want)}")


# ============================================================================ entry point
def explore_workload(wl: Workload, workdir: str, jobs: Optional[int] = None, scale: float = 1.0,
                     seed: int = 0, bounds: Optional[Bounds] = None, record_flushes: bool = True) -> Explorer:
    rec = record(wl, workdir, seed=None if seed == 0 else seed, record_flushes=record_flushes)
    b = bounds or wl.bounds
    if scale != 1.0:
        b = b.scaled(scale)
    ex = Explorer(rec, b, jobs or os.cpu_count() or 2, seed=seed)
    ex.run()
    return ex
