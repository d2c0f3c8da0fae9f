"""The performance fast paths (issue 6) through FUSE, against QEMU as the oracle: the fast FUSE
request loop (qcowfs/fuse/request_loop.py) gives parallel readers each their own data, an idle
mount still answers, a stop signal under a request storm unmounts cleanly, and the daemon stays
small reading every L2 table of a 1 TiB image. The image-level fast paths: tests/unit/test_fastpaths.py.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time

import pytest
from conftest import needs_fuse
from support.images import mixed_image

from qcowfs_dev.mounts import Mount
from qcowfs_dev.oracles import assert_clean, qemu_img, qemu_io, qemu_raw
from qcowfs_dev.proc import wait_for

KiB = 1024
MiB = 1024 * KiB


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
    qemu_img(
        "create", "-q", "-f", "qcow2", "-o", "cluster_size=65536,preallocation=metadata", img, "1T"
    )
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
