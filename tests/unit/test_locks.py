"""QEMU-compatible image locks, with real QEMU processes as the oracle (no mocks).

Every background process is killed in teardown; waits poll the lock state (via
probe_conflict) instead of sleeping.
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import pytest
from support.images import create

from qcowfs.engine.locks import _FLOCK, ImageLock, lock_bytes, probe_conflict
from qcowfs.errors import LockError
from qcowfs_dev import oracles
from qcowfs_dev.oracles import qemu_img
from qcowfs_dev.proc import wait_for

RW_BYTES = {100, 101, 103, 201, 203}
RO_BYTES = {100, 201, 203}


TIMEOUT = 30  # for each QEMU command
LOCK_WAIT = dict(timeout=10.0, first_delay=0.002, max_delay=0.05)


def locked_bytes(path) -> list:
    """Every OFD lock entry on path's inode in /proc/locks, as (start, end) byte ranges."""
    st = os.stat(path)
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    ranges = []
    with open("/proc/locks") as f:
        for line in f:
            fields = line.split()
            if "->" in fields:  # a waiter, not a holder
                continue
            if len(fields) >= 8 and fields[1] == "OFDLCK" and fields[5] == dev:
                ranges.append((int(fields[6]), int(fields[7])))
    return ranges


def byte_set(path) -> set:
    return {b for start, end in locked_bytes(path) for b in range(start, end + 1)}


@pytest.fixture
def image(tmp_path) -> Path:
    return create(tmp_path / "a.qcow2", "1M", timeout=TIMEOUT)


@pytest.fixture
def open_fd():
    """Factory: open_fd(path, writable) -> fd; all closed at teardown."""
    fds = []

    def factory(path, writable=True):
        fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
        fds.append(fd)
        return fd

    yield factory
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def start_daemon(cmd, pidfile: Path) -> subprocess.Popen:
    """Start a QEMU daemon that writes pidfile once its block devices are open (locks taken)."""
    p = subprocess.Popen(
        [str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )

    def ready():
        try:
            return pidfile.read_text().endswith("\n")
        except FileNotFoundError:
            return False

    try:
        wait_for(lambda: p.poll() is not None or ready(), what=f"{cmd[0]} to start", **LOCK_WAIT)
    except AssertionError:
        p.kill()
        p.communicate()
        raise
    if p.poll() is not None:
        out, err = p.communicate()
        raise AssertionError(f"{cmd[0]} exited {p.returncode}: {err.strip()} {out.strip()}")
    return p


@pytest.fixture
def daemons():
    """Background QEMU processes, always killed at teardown."""
    procs = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.communicate()


@pytest.fixture
def qsd(daemons, tmp_path):
    """Factory: qsd(image, read_only) -> qemu-storage-daemon holding the image (blockdevs only)."""

    def start(img, read_only=False):
        ro = "on" if read_only else "off"
        pidfile = tmp_path / f"qsd{len(daemons)}.pid"
        p = start_daemon(
            [
                "qemu-storage-daemon",
                "--blockdev",
                f"driver=file,node-name=f0,filename={img},read-only={ro}",
                "--blockdev",
                f"driver=qcow2,node-name=q0,file=f0,read-only={ro}",
                "--pidfile",
                pidfile,
            ],
            pidfile,
        )
        daemons.append(p)
        return p

    return start


@pytest.fixture
def qemu_nbd_ro(daemons, tmp_path):
    """Factory: qemu_nbd_ro(image) -> `qemu-nbd -r` serving the image (a read-only QEMU user)."""

    def start(img):
        n = len(daemons)
        pidfile = tmp_path / f"nbd{n}.pid"
        p = start_daemon(
            [
                "qemu-nbd",
                "-r",
                "-f",
                "qcow2",
                "-k",
                tmp_path / f"nbd{n}.sock",
                "--pid-file",
                pidfile,
                img,
            ],
            pidfile,
        )
        daemons.append(p)
        return p

    return start


def stop(proc, img):
    proc.kill()
    proc.communicate()
    wait_for(
        lambda: probe_conflict(str(img), write=True) is None,
        what="the killed process's locks to go",
        **LOCK_WAIT,
    )


def qemu_img_info(img, force_share=False):
    return qemu_img("info", *(["-U"] if force_share else []), img, check=False, timeout=TIMEOUT)


def qemu_io(img, *cmds, read_only=False):
    return oracles.qemu_io(img, *cmds, read_only=read_only, check=False, timeout=TIMEOUT)


def assert_lock_failure(p, text):
    assert p.returncode != 0, f"QEMU got in: {p.stdout} {p.stderr}"
    assert text in p.stderr, p.stderr


# --- the protocol itself ---


def test_flock_struct_layout():
    if platform.machine() in ("x86_64", "aarch64"):
        assert _FLOCK.size == 32
    assert lock_bytes(True) == RW_BYTES
    assert lock_bytes(False) == RO_BYTES


@pytest.mark.parametrize("read_only", [False, True], ids=["rw", "ro"])
def test_our_lock_bytes_are_qemus(image, qsd, open_fd, read_only):
    """The bytes qemu-storage-daemon locks for a qcow2 image are exactly the ones we lock."""
    p = qsd(image, read_only=read_only)
    theirs = byte_set(image)
    stop(p, image)
    lk = ImageLock(open_fd(image, not read_only), str(image), write=not read_only)
    lk.acquire()
    assert byte_set(image) == theirs == (RO_BYTES if read_only else RW_BYTES)
    assert lk.held_bytes == theirs


# --- we hold the image read-write ---


def test_rw_lock_keeps_qemu_out(image, open_fd):
    lk = ImageLock(open_fd(image), str(image), write=True)
    lk.acquire()
    assert_lock_failure(qemu_img_info(image), 'Failed to get shared "write" lock')
    assert qemu_img_info(image, force_share=True).returncode == 0
    assert_lock_failure(qemu_io(image, "write 0 512"), 'Failed to get "write" lock')
    # QEMU's own read-only open refuses a writer too
    assert_lock_failure(
        qemu_io(image, "read 0 512", read_only=True), 'Failed to get shared "write" lock'
    )
    assert_lock_failure(qemu_img("check", image, check=False, timeout=TIMEOUT), "lock")


def test_release_lets_qemu_in(image, open_fd):
    lk = ImageLock(open_fd(image), str(image), write=True)
    lk.acquire()
    assert qemu_img_info(image).returncode != 0
    lk.release()
    assert locked_bytes(image) == []
    lk.release()  # idempotent
    assert qemu_img_info(image).returncode == 0
    p = qemu_io(image, "write -P 0xab 0 512")
    assert p.returncode == 0, p.stderr
    lk.acquire()  # and again after QEMU is done
    assert byte_set(image) == RW_BYTES


def test_release_after_fd_closed(image):
    fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
    lk = ImageLock(fd, str(image), write=True)
    lk.acquire()
    os.close(fd)  # the locks go with the last descriptor of the description
    assert locked_bytes(image) == []
    lk.release()
    lk.release()


def test_downgrade(image, open_fd):
    lk = ImageLock(open_fd(image), str(image), write=True)
    lk.acquire()
    assert qemu_img_info(image).returncode != 0
    lk.downgrade_to_read_only()
    assert lk.write is False
    assert byte_set(image) == RO_BYTES
    assert qemu_img_info(image).returncode == 0
    assert qemu_io(image, "read 0 512", read_only=True).returncode == 0
    # still a user that does not share writing
    assert_lock_failure(qemu_io(image, "write 0 512"), 'Failed to get "write" lock')
    other = ImageLock(open_fd(image, False), str(image), write=False)
    other.acquire()
    with pytest.raises(LockError):
        ImageLock(open_fd(image), str(image), write=True).acquire()
    lk.downgrade_to_read_only()  # twice is fine
    lk.release()
    other.release()
    assert locked_bytes(image) == []


def test_downgrade_before_acquire(image, open_fd):
    lk = ImageLock(open_fd(image), str(image), write=True)
    lk.downgrade_to_read_only()
    assert locked_bytes(image) == []
    lk.acquire()
    assert byte_set(image) == RO_BYTES


# --- QEMU holds the image ---


def test_qemu_writer_refuses_us(image, qsd, open_fd):
    p = qsd(image, read_only=False)
    qsd_entries = sorted(locked_bytes(image))
    rw = ImageLock(open_fd(image), str(image), write=True)
    with pytest.raises(LockError) as exc:
        rw.acquire()
    msg = str(exc.value)
    assert "\n" not in msg
    assert msg.startswith(f"{image}: ")
    assert "in use by another process" in msg
    assert exc.value.path == str(image)
    # QEMU's own read-only users are refused alongside a writer; so are we
    assert_lock_failure(qemu_img_info(image), 'Failed to get shared "write" lock')
    ro = ImageLock(open_fd(image, False), str(image), write=False)
    with pytest.raises(LockError, match="read-write"):
        ro.acquire()
    # a failed acquire leaves nothing behind
    assert rw.held_bytes == ro.held_bytes == frozenset()
    assert sorted(locked_bytes(image)) == qsd_entries
    stop(p, image)
    assert locked_bytes(image) == []
    rw.acquire()


def test_qemu_reader_coexists_with_our_reader(image, qsd, open_fd):
    p = qsd(image, read_only=True)
    ro = ImageLock(open_fd(image, False), str(image), write=False)
    ro.acquire()
    ImageLock(open_fd(image, False), str(image), write=False).acquire()
    assert qemu_img_info(image).returncode == 0
    rw = ImageLock(open_fd(image), str(image), write=True)
    with pytest.raises(LockError, match="--read-only"):
        rw.acquire()
    assert p.poll() is None


def test_qemu_nbd_reader_coexists(image, qemu_nbd_ro, open_fd):
    ro = ImageLock(open_fd(image, False), str(image), write=False)
    ro.acquire()
    qemu_nbd_ro(image)  # starts despite our read-only lock
    assert len(locked_bytes(image)) == 6 and byte_set(image) == RO_BYTES  # 3 entries each
    ImageLock(open_fd(image, False), str(image), write=False).acquire()  # and we start despite it
    ro.release()
    assert "read-only" in probe_conflict(str(image), write=True)  # qemu-nbd alone keeps writers out


# --- qcowfs against qcowfs (two open file descriptions in one process) ---


def test_readers_coexist(image, open_fd):
    a = ImageLock(open_fd(image, False), str(image), write=False)
    b = ImageLock(open_fd(image, False), str(image), write=False)
    a.acquire()
    b.acquire()
    assert qemu_img_info(image).returncode == 0  # no -U
    assert qemu_io(image, "read 0 512", read_only=True).returncode == 0
    assert_lock_failure(qemu_io(image, "write 0 512"), 'Failed to get "write" lock')
    assert probe_conflict(str(image), write=False) is None
    assert "read-only" in probe_conflict(str(image), write=True)


def test_writers_conflict(image, open_fd):
    a = ImageLock(open_fd(image), str(image), write=True)
    b = ImageLock(open_fd(image), str(image), write=True)
    a.acquire()
    with pytest.raises(LockError, match="read-write"):
        b.acquire()
    with pytest.raises(LockError):
        ImageLock(open_fd(image, False), str(image), write=False).acquire()
    assert byte_set(image) == RW_BYTES and len(locked_bytes(image)) == 4  # only a's entries
    a.release()
    b.acquire()
    with pytest.raises(LockError):
        a.acquire()


def test_reader_blocks_writer(image, open_fd):
    r = ImageLock(open_fd(image, False), str(image), write=False)
    r.acquire()
    w = ImageLock(open_fd(image), str(image), write=True)
    with pytest.raises(LockError, match="--read-only"):
        w.acquire()
    assert w.held_bytes == frozenset()
    r.release()
    w.acquire()


def test_probe_conflict_takes_no_lock(image, open_fd):
    assert probe_conflict(str(image), write=True) is None
    assert probe_conflict(str(image), write=False) is None
    assert locked_bytes(image) == []
    lk = ImageLock(open_fd(image), str(image), write=True)
    lk.acquire()
    for write in (True, False):
        desc = probe_conflict(str(image), write=write)
        assert desc and "\n" not in desc and "in use by another process" in desc
    lk.release()
    assert probe_conflict(str(image), write=True) is None
