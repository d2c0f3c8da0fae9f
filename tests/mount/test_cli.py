"""The command line as a user meets it with a mount: daemon mode, umount, signals, locks, run-time
corruption, ls -a. Without a mount (help, info, umount of something else): tests/unit/test_cli_offline.py."""

from __future__ import annotations

import errno
import os
import signal
import struct
import subprocess

import pytest
from conftest import needs_fuse
from support.images import create

from qcowfs_dev.mounts import QCOWFS, Mount, is_mounted
from qcowfs_dev.oracles import assert_clean, qemu_img, qemu_info, qemu_io, run
from qcowfs_dev.probes import COPIED, header, l2_entry_offset, write_u64
from qcowfs_dev.proc import wait_for

MiB = 1 << 20


@needs_fuse
def test_daemon_mode_and_umount_waits_for_shutdown(tmp_path):
    img = create(tmp_path / "a.qcow2", "16M")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    log = tmp_path / "d.log"
    p = run([*QCOWFS, "mount", "--log", log, img, mnt])
    try:
        assert p.returncode == 0 and os.path.ismount(mnt), (
            "mount returned before the mount was ready"
        )
        (mnt / ".bitmaps" / "b0").touch()
        with open(mnt / "disk.raw", "r+b") as f:
            f.write(b"y" * 65536)
        # while mounted read-write, QEMU without -U is locked out, with -U it reads
        assert run(["qemu-img", "info", img], check=False).returncode != 0
        assert qemu_info(img)["virtual-size"] == 16 * MiB
        # a second read-write mount of the same image is refused with one line
        mnt2 = tmp_path / "mnt2"
        mnt2.mkdir()
        p2 = run([*QCOWFS, "mount", img, mnt2], check=False)
        assert (
            p2.returncode == 1
            and "in use" in p2.stderr
            and len(p2.stderr.strip().splitlines()) == 1
        )
        assert not os.path.ismount(mnt2)
    finally:
        u = run([*QCOWFS, "umount", mnt], check=False)
    assert u.returncode == 0, u.stderr
    # umount returned only after the daemon stored the bitmap and closed the image
    bms = qemu_info(img)["format-specific"]["data"]["bitmaps"]
    assert bms == [{"name": "b0", "granularity": 65536, "flags": ["auto"]}]
    assert_clean(img)
    assert "Traceback" not in log.read_text()


@needs_fuse
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_unmounts_cleanly(tmp_path, sig):
    img = create(tmp_path / "a.qcow2", "16M")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    m = Mount(img, mnt, tmp_path / "d.log")
    try:
        (m.bitmaps / "b0").touch()
        with open(m.disk, "r+b") as f:
            f.write(b"z" * 4096)
        m.proc.send_signal(sig)
        assert m.proc.wait(timeout=60) == 0
        wait_for(lambda: not os.path.ismount(mnt), what="unmount after signal")
    finally:
        m.kill()
    assert qemu_info(img)["format-specific"]["data"]["bitmaps"][0]["flags"] == ["auto"]
    assert_clean(img)
    m.assert_no_traceback()


@needs_fuse
def test_signal_during_the_last_requests_always_ends_the_daemon(tmp_path):
    """A stop signal that trio delivers while the worker at /dev/fuse passes a checkpoint
    between requests (the release of a just-closed file is still being served) must end the
    daemon like any other. That worker used to go on to wait for /dev/fuse after exit() had
    already woken every waiter: the daemon never exited (about 1 run in 16 of the test above).
    Many short mounts, each signalled at once after closing a written file, so the window is
    met; each must exit within 10 s (it takes well under one)."""
    img = create(tmp_path / "a.qcow2", "16M")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    for i in range(16):
        m = Mount(img, mnt, tmp_path / f"d{i}.log")
        try:
            with open(m.disk, "r+b") as f:
                f.write(bytes([i]) * 4096)
            m.proc.send_signal(signal.SIGTERM if i % 2 else signal.SIGINT)
            try:
                rc = m.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pytest.fail(
                    f"cycle {i}: the daemon did not exit within 10 s of its stop signal\n"
                    + m.diagnostics()
                )
            assert rc == 0, m.diagnostics()
            wait_for(lambda: not is_mounted(mnt), what="unmount after signal")
        finally:
            m.kill()
        m.assert_no_traceback()
    assert_clean(img)


@needs_fuse
def test_corruption_met_while_writing_turns_the_mount_read_only(tmp_path, mount):
    img = create(tmp_path / "a.qcow2", "16M")
    qemu_io(img, "write -P 7 0 64k")
    # point the L2 table's entry for guest cluster 1 at an unaligned offset: corrupt metadata
    write_u64(img, l2_entry_offset(img.read_bytes(), 1), COPIED | 0x30200)
    m = mount(img)
    fd = os.open(m.disk, os.O_RDWR)
    try:
        with pytest.raises(OSError) as e:
            os.pwrite(fd, b"a" * 512, 65536 + 512)
        assert e.value.errno == errno.EIO
        with pytest.raises(OSError) as e:
            os.pwrite(
                fd, b"b" * 512, 4 * MiB
            )  # a healthy range: refused now, the mount is read-only
        assert e.value.errno == errno.EROFS
        assert os.pread(fd, 4, 0) == b"\x07" * 4  # reads go on
    finally:
        os.close(fd)
    assert m.unmount() == 0
    assert "marking image corrupt" in m.log_text()
    incompat = header(img)["incompat"]
    assert incompat & 2, "corrupt bit not set"
    assert (
        run(["qemu-io", "-c", "read 0 512", img], check=False).returncode != 0
    )  # QEMU refuses rw too


@needs_fuse
def test_corruption_met_during_fsync_is_handled_like_one_met_while_writing(tmp_path, mount):
    """The refcount of a data cluster is 0 on disk: overwriting that cluster with zeros frees
    it at the next fsync, where its refcount would drop below zero. That fsync fails with EIO,
    sets the corrupt bit, logs it and turns the mount read-only, exactly like a write does."""
    img = create(tmp_path / "a.qcow2", "16M")
    qemu_io(img, "write -P 7 0 64k")
    raw = img.read_bytes()
    l1 = struct.unpack_from(">Q", raw, 40)[0]
    l2 = struct.unpack_from(">Q", raw, l1)[0] & 0x00FFFFFFFFFFFE00
    data = struct.unpack_from(">Q", raw, l2)[0] & 0x00FFFFFFFFFFFE00
    reftable = struct.unpack_from(">Q", raw, 48)[0]
    block = struct.unpack_from(">Q", raw, reftable)[0]
    with open(img, "r+b") as f:  # 16-bit refcounts, 64 KiB clusters: the first block covers it
        f.seek(block + 2 * (data // 65536))
        f.write(b"\0\0")
    m = mount(img)
    fd = os.open(m.disk, os.O_RDWR)
    try:
        os.pwrite(
            fd, bytes(65536), 0
        )  # a whole cluster of zeros: becomes a zero cluster, frees data
        with pytest.raises(OSError) as e:
            os.fsync(fd)
        assert e.value.errno == errno.EIO
        with pytest.raises(OSError) as e:
            os.pwrite(fd, b"b" * 512, 4 * MiB)
        assert e.value.errno == errno.EROFS
    finally:
        os.close(fd)
    assert m.unmount() == 0
    log = m.log_text()
    assert "marking image corrupt and switching to read-only" in log and "drop below zero" in log, (
        log
    )
    assert struct.unpack_from(">Q", img.read_bytes(), 72)[0] & 2, "corrupt bit not set"


@needs_fuse
def test_ls_a_lists_dot_and_dot_dot(tmp_path, mount):
    img = create(tmp_path / "a.qcow2", "16M")
    qemu_img("bitmap", "--add", img, "b0")
    qemu_img("snapshot", "-c", "s1", img)
    m = mount(img)
    env = {**os.environ, "LC_ALL": "C"}
    for d, names in (
        (m.mnt, [".bitmaps", ".snapshots", "disk.raw"]),
        (m.mnt / ".bitmaps", ["b0"]),
        (m.mnt / ".snapshots", sorted(os.listdir(m.mnt / ".snapshots"))),
    ):
        assert run(["ls", "-a1", d], env=env).stdout.split() == [".", "..", *names]
        long = run(["ls", "-la", d], env=env).stdout.splitlines()[1:]  # after "total N"
        assert [line.split()[-1] for line in long[:2]] == [".", ".."] and long[0].startswith("d")
    assert os.listdir(m.mnt / ".snapshots") != []
