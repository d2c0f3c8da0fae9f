"""Request lanes (issue 21): threads on clones of the FUSE device that serve reads and in-place
writes of disk.raw themselves (qcowfs/fuse/lanes.py, pyfuse3's lanes.h), with every metadata
decision left to the trio thread.

What is proven here, through real mounts and QEMU's tools:
- the lanes serve requests concurrently (the daemon's summary: reads and writes served by
  lanes, requests begun while another lane was serving one), under fio at iodepth 32 with
  crc32c verification, and the image stays clean with every written cluster in the bitmap;
- a checkpoint taken in the middle of a storm of lane writes is one instant: every block of
  its snapshot holds a version no older than the last one acknowledged before the checkpoint
  began and no newer than the last one issued before it returned;
- discards, zero ranges and a truncate that grows the disk, while lanes write: no lane write
  lands in a cluster that was freed (every block holds its own stamp or zeros), the image is
  clean, and the grown area reads zeros and takes writes;
- fsync: after kill -9, every block holds at least the version acknowledged before an fsync
  returned.

Blocks are stamped: 4 KiB of (block number, version) pairs, so a block read back says which
block and which write it came from.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import struct
import threading
import time
from pathlib import Path
from typing import Optional

import pytest
from conftest import needs_fuse
from support.images import create

from qcowfs_dev.mounts import QCOWFS
from qcowfs_dev.oracles import assert_clean, dirty_extents, qemu_check, qemu_img, qemu_io
from qcowfs_dev.proc import run

pytestmark = needs_fuse

MiB = 1 << 20
BLOCK = 4096
CLUSTER = 65536
SUMMARY = re.compile(
    r"request lanes: (?P<lanes>\d+) lanes served (?P<reads>\d+) reads and (?P<writes>\d+) writes "
    r"themselves, handed (?P<handed>\d+) requests to the metadata thread; (?P<overlapped>\d+) "
    r"requests began while another lane was serving one \(at most (?P<max_active>\d+) lanes at "
    r"once\)"
)
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10


def stamp(block: int, version: int) -> bytes:
    return struct.pack("<QQ", block, version) * (BLOCK // 16)


def read_stamp(data: bytes, block: int) -> Optional[int]:
    """The version a block holds (0: zeros, None: not a stamp of this block)."""
    if data == bytes(BLOCK):
        return 0
    b, v = struct.unpack_from("<QQ", data)
    if b != block or data != stamp(b, v):
        return None
    return v


def summary(log: str) -> re.Match:
    m = SUMMARY.search(log)
    assert m, f"no request lanes summary in the daemon's log:\n{log[-2000:]}"
    return m


class Storm:
    """Writer threads, each owning the blocks i with i % writers == its number in [first,
    first + blocks), writing stamped versions at random; every write's (block, version, start,
    end) is recorded (monotonic clock)."""

    def __init__(self, path: Path, first: int, blocks: int, writers: int, seed: int):
        self.path = path
        self.first = first
        self.blocks = blocks
        self.writers = writers
        self.seed = seed
        self.stop = threading.Event()
        self.log: list[list[tuple[int, int, float, float]]] = [[] for _ in range(writers)]
        self.version = [0] * blocks
        self.errors: list[BaseException] = []
        self.threads = [threading.Thread(target=self._run, args=(w,)) for w in range(writers)]

    def _run(self, w: int) -> None:
        rng = random.Random(self.seed * 100 + w)
        own = list(range(w, self.blocks, self.writers))
        fd = os.open(self.path, os.O_WRONLY)
        try:
            while not self.stop.is_set():
                i = rng.choice(own)
                v = self.version[i] + 1
                self.version[i] = v
                b = self.first + i
                t0 = time.monotonic()
                assert os.pwrite(fd, stamp(b, v), b * BLOCK) == BLOCK
                self.log[w].append((i, v, t0, time.monotonic()))
        except BaseException as e:  # reported by join()
            self.errors.append(e)
        finally:
            with contextlib.suppress(OSError):  # the daemon may be gone (the signal test)
                os.close(fd)

    def start(self) -> "Storm":
        for t in self.threads:
            t.start()
        return self

    def join(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)
        assert not self.errors, self.errors

    def writes(self) -> list[tuple[int, int, float, float]]:
        return [x for w in self.log for x in w]

    def count(self) -> int:
        return sum(len(w) for w in self.log)


def wait_writes(storm: Storm, n: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while storm.count() < n:
        assert time.monotonic() < deadline, f"only {storm.count()} writes in {timeout} s"
        assert not storm.errors, storm.errors
        time.sleep(0.01)


def allocated_and_dirty(tmp_path: Path, size: int, sync: str = "close") -> Path:
    """An image QEMU filled (every cluster allocated) with a recording bitmap whose bits are all
    set (a first pass wrote every cluster through qcowfs), so every later overwrite is one a
    lane serves alone."""
    img = create(tmp_path / "a.qcow2", size)
    qemu_io(img, f"write -P 0x11 0 {size}")
    qemu_img("bitmap", "--add", img, "rec")
    return img


def dirty_everything(disk: Path, size: int) -> None:
    with open(disk, "r+b", buffering=0) as f:
        for off in range(0, size, CLUSTER):
            f.seek(off)
            f.write(b"\x22" * 512)


def test_lanes_serve_requests_concurrently(tmp_path, mount):
    """fio at iodepth 32 (random writes with crc32c verification, and a reader of another area):
    the lanes serve most of it, more than one at a time; the image is clean and the bitmap covers
    every written cluster."""
    size = 64 * MiB
    img = create(tmp_path / "a.qcow2", size)
    qemu_io(img, f"write -P 0x11 0 {size}")
    qemu_img("bitmap", "--add", img, "rec")
    m = mount(img, extra=("-o", "lanes=2"))
    run(
        [
            "fio",
            "--name=w",
            f"--filename={m.disk}",
            "--direct=1",
            "--ioengine=libaio",
            "--iodepth=32",
            "--rw=randwrite",
            "--bs=4k",
            f"--size={16 * MiB}",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_backlog=256",
            "--loops=3",
            "--name=r",
            f"--filename={m.disk}",
            "--direct=1",
            "--ioengine=libaio",
            "--iodepth=32",
            "--rw=randread",
            "--bs=4k",
            f"--offset={32 * MiB}",
            f"--size={32 * MiB}",
            "--runtime=3",
            "--time_based",
        ],
        cwd=tmp_path,  # fio leaves its verify state files in its working directory
    )
    assert m.unmount() == 0
    s = summary(m.log_text())
    assert int(s["reads"]) > 1000 and int(s["writes"]) > 1000, s[0]
    assert int(s["overlapped"]) > 100 and int(s["max_active"]) >= 2, s[0]
    assert_clean(img)
    dirty = dirty_extents(img, "rec")
    assert dirty and dirty[0][0] == 0 and dirty[0][1] >= 16 * MiB, dirty[:3]


@pytest.mark.slow  # storms: in the full run, not in --quick
@pytest.mark.parametrize("how", ["checkpoint", "snapshot"])
def test_checkpoint_in_a_storm_is_one_instant(tmp_path, mount, how):
    """Four writers overwrite 4 KiB blocks through the lanes while `qcowfs checkpoint` (an
    internal snapshot and a new bitmap) or a file created in .snapshots (the snapshot alone)
    takes an internal snapshot: each block of the snapshot holds a version written no earlier
    than the last one acknowledged before it began, and issued before it returned."""
    size = 32 * MiB
    img = allocated_and_dirty(tmp_path, size)
    m = mount(img, extra=("-o", "lanes=2"))
    dirty_everything(m.disk, size)
    blocks = 4096  # the first 16 MiB
    storm = Storm(m.disk, 0, blocks, writers=4, seed=1).start()
    try:
        wait_writes(storm, 5000)
        t0 = time.monotonic()
        if how == "checkpoint":
            run([*QCOWFS, "checkpoint", m.mnt, "c1"])
        else:
            (m.mnt / ".snapshots" / "c1").touch()
        t1 = time.monotonic()
        wait_writes(storm, storm.count() + 3000)
    finally:
        storm.join()
    assert m.unmount() == 0
    s = summary(m.log_text())
    assert int(s["writes"]) > 2000, s[0]
    assert_clean(img)

    acked_before = [0] * blocks
    issued_before = [0] * blocks
    last = [0] * blocks
    for i, v, start, end in storm.writes():
        if end < t0:
            acked_before[i] = max(acked_before[i], v)
        if start < t1:
            issued_before[i] = max(issued_before[i], v)
        last[i] = max(last[i], v)
    snap = tmp_path / "c1.raw"
    qemu_img("convert", "-O", "raw", "-l", "snapshot.name=c1", img, snap)
    now = tmp_path / "now.raw"
    qemu_img("convert", "-O", "raw", img, now)
    with open(snap, "rb") as fs, open(now, "rb") as fn:
        for i in range(blocks):
            fs.seek(i * BLOCK)
            fn.seek(i * BLOCK)
            got, cur = fs.read(BLOCK), fn.read(BLOCK)
            v = read_stamp(got, i)
            if v is None and (got[:512] == b"\x22" * 512 or got == b"\x11" * BLOCK):
                v = 0  # the content before the storm
            assert v is not None, f"snapshot block {i} holds something no write put there"
            assert acked_before[i] <= v <= issued_before[i], (
                f"snapshot block {i} holds version {v}: acknowledged before the checkpoint "
                f"{acked_before[i]}, issued before it returned {issued_before[i]}"
            )
            if last[i]:
                assert read_stamp(cur, i) == last[i], f"block {i} lost its last write"


@pytest.mark.slow  # storms: in the full run, not in --quick
def test_discard_zero_and_grow_while_lanes_write(tmp_path, mount):
    """Writers overwrite area A and area B through the lanes while B's clusters are discarded
    and zeroed at random and the disk grows: no lane write ever lands in a cluster that was
    freed (every block holds its own stamp or zeros), the image is clean, and the grown area
    reads zeros and takes writes."""
    size = 32 * MiB
    img = allocated_and_dirty(tmp_path, size)
    m = mount(img, extra=("-o", "lanes=2"))
    dirty_everything(m.disk, size)
    blocks = 8192  # A: the first 16 MiB (blocks 0..4095), B: the next 16 MiB
    storm = Storm(m.disk, 0, blocks, writers=4, seed=2).start()
    rng = random.Random(5)
    grown = size + 16 * MiB
    try:
        wait_writes(storm, 2000)
        fd = os.open(m.disk, os.O_RDWR)
        try:
            for k in range(300):
                c = rng.randrange(16 * MiB, size, CLUSTER)
                mode = rng.choice(
                    (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, FALLOC_FL_ZERO_RANGE)
                )
                _fallocate(fd, mode, c, CLUSTER * rng.choice((1, 2)))
                if k == 150:
                    os.ftruncate(fd, grown)
        finally:
            os.close(fd)
        wait_writes(storm, storm.count() + 2000)
    finally:
        storm.join()
    assert os.path.getsize(m.disk) == grown
    with open(m.disk, "r+b", buffering=0) as f:
        f.seek(size)
        assert f.read(16 * MiB) == bytes(16 * MiB), "the grown area does not read zeros"
        f.seek(size + 5 * CLUSTER)
        f.write(stamp(99, 1))
        f.seek(size + 5 * CLUSTER)
        assert f.read(BLOCK) == stamp(99, 1)
        f.seek(0)
        served = f.read(grown)  # what the mount serves (lanes and the metadata thread)
    assert m.unmount() == 0
    assert_clean(img)
    now = tmp_path / "now.raw"
    qemu_img("convert", "-O", "raw", img, now)
    qemu_view = now.read_bytes()
    if qemu_view != served:
        i = next(
            i for i in range(0, grown, BLOCK) if qemu_view[i : i + BLOCK] != served[i : i + BLOCK]
        )
        raise AssertionError(f"the mount served byte {i} (block {i // BLOCK}) unlike QEMU reads it")
    with open(now, "rb") as f:
        for i in range(blocks):
            f.seek(i * BLOCK)
            data = f.read(BLOCK)
            v = read_stamp(data, i)
            if v is None and (data[:512] == b"\x22" * 512 or data == b"\x11" * BLOCK):
                v = 0
            assert v is not None, f"block {i} holds data no write to it put there"
            if i < 4096:
                assert v == storm.version[i], f"area A block {i}: {v}, last {storm.version[i]}"


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if libc.fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


@pytest.mark.slow  # storms: in the full run, not in --quick
def test_fsync_holds_after_kill(tmp_path, mount):
    """Lane writes, an fsync, more lane writes, kill -9: every block holds at least the version
    acknowledged before the fsync returned; qemu-img check finds leaks at worst."""
    size = 16 * MiB
    img = allocated_and_dirty(tmp_path, size)
    m = mount(img, extra=("-o", "lanes=2"))
    dirty_everything(m.disk, size)
    blocks = 4096
    storm = Storm(m.disk, 0, blocks, writers=4, seed=3).start()
    try:
        wait_writes(storm, 4000)
        t_sync = time.monotonic()
        fd = os.open(m.disk, os.O_RDWR)
        os.fsync(fd)
        os.close(fd)
        wait_writes(storm, storm.count() + 2000)
        m.kill()
    finally:
        storm.stop.set()
        for t in storm.threads:
            t.join(timeout=60)
    floor = [0] * blocks
    for i, v, _start, end in storm.writes():
        if end < t_sync:
            floor[i] = max(floor[i], v)
    assert qemu_check(img)["rc"] in (0, 3)
    now = tmp_path / "now.raw"
    qemu_img("convert", "-O", "raw", img, now)
    with open(now, "rb") as f:
        for i in range(blocks):
            f.seek(i * BLOCK)
            data = f.read(BLOCK)
            v = read_stamp(data, i)
            if v is None and (data[:512] == b"\x22" * 512 or data == b"\x11" * BLOCK):
                v = 0
            assert v is not None and v >= floor[i], (
                f"block {i} holds version {v} after kill -9; {floor[i]} was acknowledged "
                "before an fsync returned"
            )


@pytest.mark.slow  # storms: in the full run, not in --quick
@pytest.mark.parametrize("sig", ["TERM", "INT"])
def test_stop_signal_during_a_lane_storm(tmp_path, mount, sig):
    """SIGTERM/SIGINT while every lane is busy: the daemon unmounts, stores the bitmaps and exits
    0; the image is clean."""
    size = 16 * MiB
    img = allocated_and_dirty(tmp_path, size)
    m = mount(img, extra=("-o", "lanes=2"))
    dirty_everything(m.disk, size)
    storm = Storm(m.disk, 0, 4096, writers=4, seed=4).start()
    try:
        wait_writes(storm, 3000)
        m.proc.send_signal(getattr(__import__("signal"), f"SIG{sig}"))
        m.proc.wait(timeout=60)
    finally:
        storm.stop.set()
        for t in storm.threads:
            t.join(timeout=60)
    assert m.proc.returncode == 0, m.log_text()[-2000:]
    assert not os.path.ismount(m.mnt)
    assert_clean(img)
