"""The performance fast paths (issue 6) against QEMU as the oracle.

- Qcow2Image.read_view() replies from one reused buffer: it must never show bytes of an
  earlier read (zero, unallocated, backing and compressed ranges are filled explicitly).
- _write_in_place / _write_fresh_run take one pwrite for contiguous overwrites and fresh
  whole-cluster runs; everything else must still go the general way, with the same result.
- the fast FUSE request loop (qcowfs/fuse/request_loop.py): parallel readers each get their own
  data, an idle mount still answers, and a stop signal under a request storm unmounts
  cleanly.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time

import pytest

from conftest import needs_fuse
from support.mounts import Mount
from support.images import mixed_image
from support.oracles import assert_clean, qemu_img, qemu_io, qemu_raw
from support.proc import wait_for
from qcowfs.engine.hostfile import HostFile
from qcowfs.engine.image import Qcow2Image

KiB = 1024
MiB = 1024 * KiB


def test_read_view_never_shows_stale_bytes(tmp_path):
    img = mixed_image(tmp_path)
    ref = qemu_raw(img, tmp_path / "ref.raw")
    rng = random.Random(2)
    with Qcow2Image(str(img)) as im:
        for _ in range(400):
            # fill the shared buffer with data, then read anything: zeros must be zeros
            im.read_view(0, 1 * MiB)
            n = rng.choice([1, 511, 4096, 65536, 65537, 300 * KiB, 1 * MiB, 2 * MiB])
            off = rng.randrange(0, 16 * MiB)
            got = bytes(im.read_view(off, n))
            assert got == ref[off : off + n], f"read_view({off}, {n}) differs from qemu-img convert"
            assert im.read(off, n) == ref[off : off + n]


class CountingFile(HostFile):
    """A HostFile that counts data writes (instrumentation, not a stand-in: it does the I/O)."""

    writes: list = []

    def pwrite(self, data, offset):
        CountingFile.writes.append((offset, len(memoryview(data))))
        super().pwrite(data, offset)

    def pwritev(self, buffers, offset):
        CountingFile.writes.append((offset, sum(len(memoryview(b)) for b in buffers)))
        super().pwritev(buffers, offset)


def test_write_fast_paths_match_qemu(tmp_path):
    # 4 KiB clusters: an L2 table maps 2 MiB, so runs cross tables easily
    img = tmp_path / "w.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", img, "8M")
    qemu_io(img, "write -P 0x44 1536k 4k")  # one allocated cluster inside a later fresh run
    ref = bytearray(qemu_raw(img, tmp_path / "ref.raw"))
    rng = random.Random(3)

    def data(n):
        return rng.randbytes(n)

    ops = [
        (0, data(256 * KiB)),             # fresh whole-cluster run: fast path
        (0, data(256 * KiB)),             # contiguous overwrite: fast path
        (1 * MiB, data(1 * MiB)),         # fresh run over one allocated cluster: general path
        (1 * MiB + 2048, data(8 * KiB)),  # unaligned overwrite, in place
        (2 * MiB - 64 * KiB, data(128 * KiB)),  # crosses an L2 table: general path
        (5 * MiB, data(3 * KiB)),         # partial fresh cluster: general path (copy on write)
    ]
    # host-noncontiguous clusters: allocate 6M+8k, then 6M, then overwrite both at once
    ops += [(6 * MiB + 8 * KiB, data(4 * KiB)), (6 * MiB, data(4 * KiB)), (6 * MiB, data(12 * KiB))]
    CountingFile.writes = []
    im = Qcow2Image(str(img), read_only=False, file_factory=CountingFile)
    try:
        for i, (off, buf) in enumerate(ops):
            before = len(CountingFile.writes)
            im.write(off, buf)
            ref[off : off + len(buf)] = buf
            if i in (0, 1):
                assert len(CountingFile.writes) - before == 1, f"op {i}: expected one pwrite"
                assert CountingFile.writes[-1][1] == len(buf)
            assert im.read(off, len(buf)) == buf
    finally:
        im.close()
    out = tmp_path / "after.raw"
    out.write_bytes(bytes(ref))
    qemu_img("compare", "-f", "qcow2", "-F", "raw", img, out)
    assert_clean(img)


# ----------------------------------------------------------------------------- through FUSE


@needs_fuse
def test_parallel_readers_get_their_own_data(tmp_path, mount):
    img = mixed_image(tmp_path)
    ref = qemu_raw(img, tmp_path / "ref.raw")
    m = mount(img, read_only=True)
    errors = []

    def reader(seed):
        rng = random.Random(seed)
        fd = os.open(m.disk, os.O_RDONLY | os.O_DIRECT)
        try:
            import mmap
            buf = mmap.mmap(-1, 1 * MiB)
            for _ in range(300):
                n = rng.choice([4096, 65536, 1 * MiB])
                off = rng.randrange(0, 16 * MiB - n) // 4096 * 4096
                got = os.preadv(fd, [memoryview(buf)[:n]], off)
                if buf[:got] != ref[off : off + got] or got != n:
                    errors.append((seed, off, n, got))
                    return
        finally:
            os.close(fd)

    threads = [threading.Thread(target=reader, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, f"reads returned another request's bytes: {errors[:3]}"


@needs_fuse
def test_idle_mount_still_answers(tmp_path, mount):
    img = tmp_path / "i.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "4M")
    qemu_io(img, "write -P 0x77 0 64k")
    m = mount(img)
    with open(m.disk, "rb") as f:
        assert f.read(4096) == b"\x77" * 4096
    # idle for longer than the loop spins and blocks in poll (fuseloop: 50 us, 20 ms),
    # so the next request arrives while it is parked in trio: it must still be served
    time.sleep(0.2)
    with open(m.disk, "rb") as f:
        f.seek(4096)
        assert f.read(4096) == b"\x77" * 4096


@needs_fuse
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_during_request_storm(tmp_path, sig):
    """The fast loop passes through trio's scheduler every few requests, so a signal is seen
    under continuous load: the daemon unmounts, stores the bitmap and exits 0."""
    img = tmp_path / "s.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "64M")
    qemu_img("bitmap", "--add", img, "b0")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    m = Mount(img, mnt, tmp_path / "d.log")
    stop = threading.Event()
    served = [0]

    def storm():
        try:
            fd = os.open(m.disk, os.O_RDWR)
        except OSError:
            return
        block = b"q" * 4096
        try:
            i = 0
            while not stop.is_set():
                os.pwrite(fd, block, (i % 4096) * 4096)
                i += 1
                served[0] = i
        except OSError:
            pass  # the mount went away under us: expected
        finally:
            try:
                os.close(fd)  # the close's flush request may find the mount gone
            except OSError:
                pass

    t = threading.Thread(target=storm)
    t.start()
    try:
        wait_for(lambda: served[0] > 500, what="writes to be served")
        m.proc.send_signal(sig)
        assert m.proc.wait(timeout=60) == 0
        wait_for(lambda: not os.path.ismount(mnt), what="unmount after signal")
    finally:
        stop.set()
        t.join(timeout=60)
        m.kill()
    assert_clean(img)
    m.assert_no_traceback()


def vm_hwm_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM")


@needs_fuse
@pytest.mark.slow
def test_one_tib_fully_allocated_read_stays_under_150_mib(tmp_path, mount):
    """Issue 6's memory target: every one of the 2048 L2 tables of a 1 TiB image read (through
    4096 reads spread over the disk); the L2 cache is bounded, so the daemon stays small."""
    img = tmp_path / "big.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=65536,preallocation=metadata", img, "1T")
    m = mount(img, read_only=True)
    step = (1 << 40) // 4096
    fd = os.open(m.disk, os.O_RDONLY)
    try:
        for i in range(4096):
            assert os.pread(fd, 4096, i * step + (i * 7919 % 256) * 4096) == bytes(4096)
    finally:
        os.close(fd)
    hwm = vm_hwm_kib(m.proc.pid)
    assert hwm < 150 * 1024, f"daemon peak RSS {hwm} KiB reading a 1 TiB image"
