"""The FUSE Operations layer called directly, without a mount (the README's layer 2).

qcowfs.fuse.operations.QcowOperations(Disk(Qcow2Image(path, read_only=...)), MountOptions(...)) is built the
way qcowfs/mount.py builds it and driven with trio.run, request by request, as pyfuse3 would:
inode numbers, file handles, open flags, names as bytes. A refusal comes back as
pyfuse3.FUSEError carrying the errno the kernel would pass on. The images are made by qemu-img;
after the disk is closed (what an unmount does) QEMU judges them: qemu-img check clean, qemu-io
read patterns, the bitmaps qemu-img info lists and their dirty extents over NBD.

readdir answers through pyfuse3.readdir_reply, which needs a kernel request token: the tests put a
collector in its place.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import stat
from types import SimpleNamespace

import pyfuse3
import pytest
import trio
from conftest import sha256
from support import syscalls
from support.images import create

from qcowfs.engine.disk import Disk
from qcowfs.engine.image import Qcow2Image
from qcowfs.fuse.operations import (
    BITMAPS_DIR,
    COMMAND_XATTR,
    DISK,
    PID_XATTR,
    ROOT,
    SNAPSHOTS_DIR,
    QcowOperations,
)
from qcowfs.fuse.options import MountOptions
from qcowfs_dev.oracles import assert_clean, dirty_extents, qemu_bitmaps, qemu_img, qemu_io
from qcowfs_dev.probes import COPIED, l2_entry_offset, write_u64

KiB = 1 << 10
MiB = 1 << 20
CTX = pyfuse3.RequestContext()


# ----------------------------------------------------------------------------- helpers
@pytest.fixture
def operations():
    """Factory: operations(image, read_only=False, **mount_options) -> QcowOperations over
    Disk(Qcow2Image(image)); every disk still open is closed (bitmaps stored) at teardown."""
    disks = []

    def factory(image, read_only: bool = False, **opts) -> QcowOperations:
        disk = Disk(Qcow2Image(str(image), read_only=read_only))
        disks.append(disk)
        return QcowOperations(disk, MountOptions(read_only=read_only, **opts))

    yield factory
    for disk in disks:
        if not disk.image._closed:
            disk.close()


def call(fn, *args):
    """One request: run the handler coroutine to completion under trio."""
    return trio.run(fn, *args)


#: the errno a request (a handler coroutine, or a helper that makes requests) is refused with: always
#: as the pyfuse3.FUSEError the kernel would pass on, never as another exception
errno_of = functools.partial(syscalls.errno_of, error=pyfuse3.FUSEError)


def close(ops: QcowOperations) -> None:
    """What the unmount does after the last request: store the bitmaps, flush, close."""
    ops.disk.close()


@pytest.fixture
def listing(monkeypatch):
    """readdir(fh) -> [(name, inode, mode)] through a stand-in for pyfuse3.readdir_reply; a limit
    makes the stand-in report a full buffer after that many entries (as the kernel's would)."""

    def readdir(ops, fh, start=0, limit=None):
        got = []

        def reply(token, name, attr, next_id):
            got.append((os.fsdecode(name), attr.st_ino, attr.st_mode, next_id))
            return limit is None or len(got) < limit

        monkeypatch.setattr(pyfuse3, "readdir_reply", reply)
        call(ops.readdir, fh, start, object())
        return got

    return readdir


def status(ops: QcowOperations, ino: int) -> dict:
    fi = call(ops.open, ino, os.O_RDONLY, CTX)
    try:
        return json.loads(bytes(call(ops.read, fi.fh, 0, 4096)))
    finally:
        call(ops.release, fi.fh)


def command(ops: QcowOperations, ino: int, text: bytes) -> int:
    fi = call(ops.open, ino, os.O_WRONLY | os.O_TRUNC, CTX)
    try:
        return call(ops.write, fi.fh, 0, text)
    finally:
        call(ops.release, fi.fh)


def xattr_command(ops: QcowOperations, **cmd) -> None:
    call(ops.setxattr, BITMAPS_DIR, COMMAND_XATTR, json.dumps(cmd).encode(), CTX)


# ----------------------------------------------------------------------------- lookup, getattr
def test_lookup_and_getattr_of_disk_raw(tmp_path, operations):
    img = create(tmp_path / "a.qcow2", "16M")
    ops = operations(img)
    a = call(ops.lookup, ROOT, b"disk.raw", CTX)
    assert a.st_ino == DISK and stat.S_ISREG(a.st_mode)
    assert a.st_size == 16 * MiB
    assert stat.S_IMODE(a.st_mode) == 0o600, oct(a.st_mode)  # default umask 077: the owner only
    assert (a.st_uid, a.st_gid) == (os.getuid(), os.getgid())
    g = call(ops.getattr, DISK, CTX)
    assert (g.st_ino, g.st_size, g.st_mode, g.st_uid) == (a.st_ino, a.st_size, a.st_mode, a.st_uid)
    d = call(ops.lookup, ROOT, b".bitmaps", CTX)
    assert d.st_ino == BITMAPS_DIR and stat.S_ISDIR(d.st_mode) and stat.S_IMODE(d.st_mode) == 0o700
    r = call(ops.getattr, ROOT, CTX)
    assert (
        stat.S_ISDIR(r.st_mode) and stat.S_IMODE(r.st_mode) == 0o500
    )  # nothing is ever created at the root
    assert errno_of(ops.lookup, ROOT, b"nosuch", CTX) == errno.ENOENT
    assert errno_of(ops.lookup, BITMAPS_DIR, b"nosuch", CTX) == errno.ENOENT
    assert errno_of(ops.lookup, DISK, b"x", CTX) == errno.ENOENT
    assert errno_of(ops.getattr, 999, CTX) == errno.ENOENT


def test_modes_and_owners_follow_the_options(tmp_path, operations):
    img = create(tmp_path / "a.qcow2", "1M")
    qemu_img("bitmap", "--add", img, "b0")
    ops = operations(img, uid=1234, gid=4321, umask=0o022)
    a = call(ops.lookup, ROOT, b"disk.raw", CTX)
    assert (a.st_uid, a.st_gid, stat.S_IMODE(a.st_mode)) == (1234, 4321, 0o644)
    assert stat.S_IMODE(call(ops.getattr, BITMAPS_DIR, CTX).st_mode) == 0o755
    assert stat.S_IMODE(call(ops.getattr, ROOT, CTX).st_mode) == 0o555
    b = call(ops.lookup, BITMAPS_DIR, b"b0", CTX)
    assert stat.S_ISREG(b.st_mode) and stat.S_IMODE(b.st_mode) == 0o644 and b.st_uid == 1234
    close(ops)
    # read-only: no write bits anywhere
    ro = operations(img, read_only=True, umask=0o022)
    assert stat.S_IMODE(call(ro.getattr, DISK, CTX).st_mode) == 0o444
    assert stat.S_IMODE(call(ro.getattr, BITMAPS_DIR, CTX).st_mode) == 0o555
    ro_default = operations(img, read_only=True)
    assert stat.S_IMODE(call(ro_default.getattr, DISK, CTX).st_mode) == 0o400


# ----------------------------------------------------------------------------- readdir
def test_readdir_of_root_and_bitmaps(tmp_path, operations, listing):
    img = create(tmp_path / "a.qcow2", "4M")
    for name in ("zeta", "alpha"):
        qemu_img("bitmap", "--add", img, name)
    ops = operations(img)
    fh = call(ops.opendir, ROOT, CTX)
    root = listing(ops, fh)
    assert [(n, ino) for n, ino, _, _ in root] == [
        (".", ROOT),
        ("..", ROOT),
        ("disk.raw", DISK),
        (".bitmaps", BITMAPS_DIR),
        (".snapshots", SNAPSHOTS_DIR),
    ]
    assert all(stat.S_ISDIR(mode) for n, _, mode, _ in root if n != "disk.raw")
    assert stat.S_ISREG(root[2][2])
    assert [n for n, *_ in listing(ops, fh, start=root[2][3])] == [
        ".bitmaps",
        ".snapshots",
    ]  # resumed after disk.raw
    assert [n for n, *_ in listing(ops, fh, limit=3)] == [
        ".",
        "..",
        "disk.raw",
    ]  # a full buffer stops the listing
    call(ops.releasedir, fh)
    bfh = call(ops.opendir, BITMAPS_DIR, CTX)
    entries = listing(ops, bfh)
    assert [(n, ino) for n, ino, *_ in entries[:2]] == [(".", BITMAPS_DIR), ("..", ROOT)]
    entries = entries[2:]
    assert [n for n, *_ in entries] == ["alpha", "zeta"]
    for n, ino, mode, _ in entries:
        assert stat.S_ISREG(mode)
        assert (
            call(ops.lookup, BITMAPS_DIR, n.encode(), CTX).st_ino == ino
        )  # the same inode both ways
    assert errno_of(ops.opendir, DISK, CTX) == errno.ENOTDIR


# ----------------------------------------------------------------------------- disk.raw
def test_read_and_write_disk_raw(tmp_path, operations):
    size = 8 * MiB
    img = create(tmp_path / "a.qcow2", str(size), "cluster_size=65536")
    qemu_io(img, "write -P 0x5a 0 64k", "write -P 0x33 3M 4k")
    ops = operations(img)
    fi = call(ops.open, DISK, os.O_RDWR, CTX)
    assert fi.fh == DISK and fi.direct_io
    assert bytes(call(ops.read, fi.fh, 0, 4096)) == b"\x5a" * 4096
    assert bytes(call(ops.read, fi.fh, 3 * MiB - 2, 6)) == b"\0\0" + b"\x33" * 4
    assert bytes(call(ops.read, fi.fh, size - 10, 100)) == bytes(10)  # short at the end of the disk
    assert call(ops.write, fi.fh, 1 * MiB, b"\xa5" * 65536) == 65536
    assert call(ops.write, fi.fh, 100, b"\x11" * 1000) == 1000  # unaligned, over QEMU's data
    assert (
        call(ops.write, fi.fh, size - 2, b"\x61\x62\x63\x64") == 2
    )  # clipped at the end of the disk
    assert call(ops.write, fi.fh, size, b"x") == 0
    assert bytes(call(ops.read, fi.fh, 1 * MiB - 1, 3)) == b"\0\xa5\xa5"
    call(ops.fsync, fi.fh, False)
    call(ops.flush, fi.fh)
    call(ops.release, fi.fh)
    assert call(ops.getattr, DISK, CTX).st_blocks > 0
    close(ops)
    assert_clean(img)
    qemu_io(
        img,
        "read -P 0x5a 0 100",
        "read -P 0x11 100 1000",
        "read -P 0x5a 1100 64436",
        f"read -P 0xa5 {1 * MiB} 64k",
        "read -P 0x33 3M 4k",
        f"read -P 0x61 {size - 2} 1",
        f"read -P 0x62 {size - 1} 1",
    )
    out = qemu_io(img, f"read -P 0xa5 {1 * MiB} 64k").stdout
    assert "Pattern verification failed" not in out, out


def test_eio_for_metadata_past_the_end(tmp_path, operations):
    img = create(tmp_path / "a.qcow2", "4M", "cluster_size=65536")
    qemu_io(img, "write -P 0x77 0 128k")
    # guest cluster 1 points far past the end of the file (qcowfs_dev.probes, not qcowfs, finds the entry)
    write_u64(img, l2_entry_offset(img.read_bytes(), 1), COPIED | (1 << 40))
    ops = operations(img, read_only=True)
    fi = call(ops.open, DISK, os.O_RDONLY, CTX)
    assert errno_of(ops.read, fi.fh, 65536, 4096) == errno.EIO
    assert (
        bytes(call(ops.read, fi.fh, 0, 4096)) == b"\x77" * 4096
    )  # the healthy cluster still reads


# ----------------------------------------------------------------------------- .bitmaps entries
def test_bitmap_files_create_command_status_unlink(tmp_path, operations):
    img = create(tmp_path / "a.qcow2", "16M", "cluster_size=65536")
    qemu_img("bitmap", "--add", img, "keep")
    ops = operations(img)
    fi, attr = call(ops.create, BITMAPS_DIR, b"b0", 0o644, os.O_WRONLY | os.O_CREAT, CTX)
    call(ops.release, fi.fh)
    assert (
        stat.S_ISREG(attr.st_mode)
        and call(ops.lookup, BITMAPS_DIR, b"b0", CTX).st_ino == attr.st_ino
    )
    st = status(ops, attr.st_ino)
    assert st == {
        **st,
        "name": "b0",
        "granularity": 64 * KiB,
        "count": 0,
        "persistent": True,
        "recording": True,
        "inconsistent": False,
    }
    assert (
        call(ops.getattr, attr.st_ino, CTX).st_size == len(json.dumps(st)) + 1
    )  # the status file's length

    dfh = call(ops.open, DISK, os.O_RDWR, CTX).fh
    assert call(ops.write, dfh, 5 * MiB + 3, b"w" * 10) == 10
    assert status(ops, attr.st_ino)["count"] == 64 * KiB
    assert command(ops, attr.st_ino, b"disable\n") == 8
    assert status(ops, attr.st_ino)["recording"] is False
    call(ops.write, dfh, 9 * MiB, b"not recorded")
    assert status(ops, attr.st_ino)["count"] == 64 * KiB
    assert command(ops, attr.st_ino, b"enable") == 6
    for bad in (b"bogus\n", b"", b"clear enable", b"\xff\xfe"):
        assert errno_of(command, ops, attr.st_ino, bad) == errno.EINVAL, bad
    assert status(ops, attr.st_ino) == {**st, "count": 64 * KiB}

    assert (
        errno_of(ops.create, BITMAPS_DIR, b"b0", 0o644, os.O_WRONLY | os.O_CREAT, CTX)
        == errno.EEXIST
    )
    assert errno_of(ops.create, ROOT, b"file", 0o644, os.O_WRONLY | os.O_CREAT, CTX) == errno.EPERM
    assert (
        errno_of(ops.create, BITMAPS_DIR, b"n" * 1024, 0o644, os.O_WRONLY | os.O_CREAT, CTX)
        == errno.ENAMETOOLONG
    )
    fi, gone = call(ops.create, BITMAPS_DIR, b"gone", 0o644, os.O_WRONLY | os.O_CREAT, CTX)
    call(ops.release, fi.fh)
    call(ops.unlink, BITMAPS_DIR, b"gone", CTX)
    assert errno_of(ops.lookup, BITMAPS_DIR, b"gone", CTX) == errno.ENOENT
    assert errno_of(ops.getattr, gone.st_ino, CTX) == errno.ENOENT
    assert errno_of(ops.open, gone.st_ino, os.O_RDONLY, CTX) == errno.ENOENT
    assert errno_of(ops.unlink, BITMAPS_DIR, b"gone", CTX) == errno.ENOENT
    assert errno_of(ops.unlink, ROOT, b"disk.raw", CTX) == errno.EPERM
    assert errno_of(ops.read, 12345, 0, 10) == errno.EBADF  # a handle never opened
    call(ops.release, dfh)
    close(ops)

    bms = qemu_bitmaps(img)
    assert {n: (b["granularity"], b["flags"]) for n, b in bms.items()} == {
        "b0": (64 * KiB, ["auto"]),
        "keep": (64 * KiB, ["auto"]),
    }
    assert_clean(img)
    assert dirty_extents(img, "b0") == [(5 * MiB, 64 * KiB)]
    assert dirty_extents(img, "keep") == [(5 * MiB, 64 * KiB), (9 * MiB, 64 * KiB)]
    qemu_io(img, f"read -P 0x77 {5 * MiB + 3} 10")


# ----------------------------------------------------------------------------- the command channel
def test_setxattr_command_channel(tmp_path, operations):
    img = create(tmp_path / "a.qcow2", "8M", "cluster_size=65536")
    ops = operations(img)
    xattr_command(ops, op="add", name="x", granularity=4096)
    xattr_command(ops, op="add", name="y", enabled=False)
    xattr_command(ops, op="add", name="t", persistent=False)
    x = call(ops.lookup, BITMAPS_DIR, b"x", CTX).st_ino
    dfh = call(ops.open, DISK, os.O_RDWR, CTX).fh
    call(ops.write, dfh, 0, b"d" * 100)
    xattr_command(ops, op="disable", name="x")
    assert status(ops, x)["recording"] is False and status(ops, x)["count"] == 4096
    xattr_command(ops, op="merge", name="x", dst="y")  # at y's granularity: one 64 KiB granule
    assert status(ops, call(ops.lookup, BITMAPS_DIR, b"y", CTX).st_ino)["count"] == 64 * KiB
    xattr_command(ops, op="clear", name="y")
    xattr_command(ops, op="remove", name="t")
    assert errno_of(ops.lookup, BITMAPS_DIR, b"t", CTX) == errno.ENOENT

    malformed = [
        b"{not json",
        b"[]",
        b'{"op": "add"}',
        b'{"name": "z"}',
        b'{"op": "add", "name": 5}',
        b'{"op": "frobnicate", "name": "x"}',
        b'{"op": "add", "name": "z", "granularity": "big"}',
        b'{"op": "merge", "name": "x"}',
        b'{"op": "add", "name": "z", "granularity": 1000}',
        b"\xff\xfe",
    ]
    for value in malformed:
        assert errno_of(ops.setxattr, BITMAPS_DIR, COMMAND_XATTR, value, CTX) == errno.EINVAL, value
    assert errno_of(ops.lookup, BITMAPS_DIR, b"z", CTX) == errno.ENOENT  # nothing half-done
    assert errno_of(xattr_command, ops, op="clear", name="nosuch") == errno.ENOENT
    assert errno_of(xattr_command, ops, op="add", name="x") == errno.EEXIST
    assert (
        errno_of(ops.setxattr, ROOT, COMMAND_XATTR, b'{"op": "clear", "name": "x"}', CTX)
        == errno.ENOTSUP
    )
    assert errno_of(ops.setxattr, BITMAPS_DIR, b"user.other", b"1", CTX) == errno.ENOTSUP
    assert call(ops.getxattr, ROOT, PID_XATTR, CTX) == str(os.getpid()).encode()
    assert errno_of(ops.getxattr, DISK, PID_XATTR, CTX) == errno.ENODATA
    call(ops.release, dfh)
    close(ops)

    bms = qemu_bitmaps(img)
    assert {n: (b["granularity"], b["flags"]) for n, b in bms.items()} == {
        "x": (4096, []),
        "y": (64 * KiB, []),
    }
    assert_clean(img)
    assert dirty_extents(img, "x") == [(0, 4096)]
    assert dirty_extents(img, "y") == []


# ----------------------------------------------------------------------------- read-only, refusals
def test_read_only_image_is_erofs(tmp_path, operations):
    img = create(tmp_path / "a.qcow2", "8M")
    qemu_io(img, "write -P 0x42 0 64k")
    qemu_img("bitmap", "--add", img, "qb")
    before = sha256(img)
    ops = operations(img, read_only=True)
    assert errno_of(ops.open, DISK, os.O_RDWR, CTX) == errno.EROFS
    assert errno_of(ops.open, DISK, os.O_WRONLY, CTX) == errno.EROFS
    fh = call(ops.open, DISK, os.O_RDONLY, CTX).fh
    assert bytes(call(ops.read, fh, 0, 8)) == b"\x42" * 8
    assert errno_of(ops.write, fh, 0, b"x") == errno.EROFS
    qb = call(ops.lookup, BITMAPS_DIR, b"qb", CTX).st_ino
    assert status(ops, qb)["recording"] is True
    assert errno_of(ops.open, qb, os.O_WRONLY, CTX) == errno.EROFS
    assert (
        errno_of(ops.create, BITMAPS_DIR, b"new", 0o644, os.O_WRONLY | os.O_CREAT, CTX)
        == errno.EROFS
    )
    assert errno_of(ops.unlink, BITMAPS_DIR, b"qb", CTX) == errno.EROFS
    assert errno_of(xattr_command, ops, op="add", name="new") == errno.EROFS
    assert (
        errno_of(ops.setxattr, BITMAPS_DIR, COMMAND_XATTR, b"{bad", CTX) == errno.EINVAL
    )  # parsed first
    close(ops)
    assert sha256(img) == before, "a read-only Disk changed the image"
    assert qemu_bitmaps(img)["qb"]["flags"] == ["auto"]


def test_refused_operations(tmp_path, operations):
    img = create(tmp_path / "a.qcow2", "4M")
    qemu_img("bitmap", "--add", img, "b0")
    ops = operations(img)
    b0 = call(ops.lookup, BITMAPS_DIR, b"b0", CTX).st_ino
    for fn, args in (
        (ops.mkdir, (BITMAPS_DIR, b"d", 0o755, CTX)),
        (ops.mknod, (ROOT, b"n", 0o644, 0, CTX)),
        (ops.symlink, (BITMAPS_DIR, b"s", b"b0", CTX)),
        (ops.link, (DISK, ROOT, b"l", CTX)),
        (ops.rename, (BITMAPS_DIR, b"b0", BITMAPS_DIR, b"b1", 0, CTX)),
        (ops.rmdir, (ROOT, b".bitmaps", CTX)),
    ):
        assert errno_of(fn, *args) == errno.EPERM, fn.__name__
    assert errno_of(ops.open, ROOT, os.O_RDONLY, CTX) == errno.EISDIR
    assert errno_of(ops.open, BITMAPS_DIR, os.O_RDONLY, CTX) == errno.EISDIR

    def setattr_args(ino, size=None, **fields):
        """The arguments of a setattr request; fields: the SetattrFields flags set (update_mode, ...)."""
        attr = pyfuse3.EntryAttributes()
        if size is not None:
            attr.st_size = size
        flags = dict(
            update_size=size is not None,
            update_mode=False,
            update_uid=False,
            update_gid=False,
            update_atime=False,
            update_mtime=False,
            update_ctime=False,
        )
        flags.update(fields)
        return ino, attr, SimpleNamespace(**flags), None, CTX

    assert errno_of(ops.setattr, *setattr_args(DISK, update_mode=True)) == errno.EPERM  # chmod
    assert errno_of(ops.setattr, *setattr_args(DISK, update_uid=True)) == errno.EPERM  # chown
    assert (
        errno_of(ops.setattr, *setattr_args(DISK, size=1 * MiB)) == errno.EPERM
    )  # the disk's size is the image's
    assert (
        call(ops.setattr, *setattr_args(DISK, size=4 * MiB)).st_size == 4 * MiB
    )  # the same size: nothing to do
    assert errno_of(ops.setattr, *setattr_args(BITMAPS_DIR, size=0)) == errno.EISDIR
    assert (
        call(ops.setattr, *setattr_args(b0, size=0)).st_ino == b0
    )  # echo CMD > NAME truncates first: accepted
    assert (
        call(ops.setattr, *setattr_args(DISK, update_mtime=True)).st_ino == DISK
    )  # touch: accepted, not stored
    s = call(ops.statfs, CTX)
    assert s.f_files == 3 and s.f_namemax == 1023
    close(ops)
    assert_clean(img)
