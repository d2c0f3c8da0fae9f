"""Thin provisioning through disk.raw: discard and zeroing (fallocate), holes (SEEK_DATA/SEEK_HOLE),
on real mounts with QEMU as the oracle. Needs the patched pyfuse3 scripts/setup builds."""

from __future__ import annotations

import errno
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import assert_clean, needs_fuse, qemu_img, qemu_info, qemu_io, run
from support.syscalls import FALLOC_FL_KEEP_SIZE as KEEP_SIZE
from support.syscalls import FALLOC_FL_PUNCH_HOLE as PUNCH_HOLE
from support.syscalls import FALLOC_FL_ZERO_RANGE as ZERO_RANGE
from support.syscalls import fallocate

from qcowfs_dev.oracles import qemu_bitmaps

pytestmark = needs_fuse

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


@pytest.fixture(autouse=True)
def _patched_pyfuse3():
    import pyfuse3

    assert hasattr(pyfuse3.Operations, "fallocate") and hasattr(pyfuse3.Operations, "lseek"), (
        "scripts/setup builds pyfuse3 with qcowfs' patch (scripts/build-pyfuse3): fallocate/lseek missing"
    )


def data_extents_by_seek(path: Path) -> list:
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        pos, out = 0, []
        while pos < size:
            try:
                d = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                assert e.errno == errno.ENXIO
                break
            h = os.lseek(fd, d, os.SEEK_HOLE)
            out.append((d, h - d))
            pos = h
        return out
    finally:
        os.close(fd)


def qemu_data_extents(img: Path) -> list:
    out: list = []
    for e in json.loads(run(["qemu-img", "map", "-U", "--output=json", img]).stdout):
        if e["data"]:
            if out and out[-1][0] + out[-1][1] == e["start"]:
                out[-1] = (out[-1][0], out[-1][1] + e["length"])
            else:
                out.append((e["start"], e["length"]))
    return out


LAYOUTS = {
    "plain": ("cluster_size=65536", None),
    "backing": ("cluster_size=65536", "raw"),
    "snapshot": ("cluster_size=65536", "snapshot"),
    "extended-l2": ("cluster_size=65536,extended_l2=on", None),
    "small-clusters": ("cluster_size=4096", None),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_punch_hole_and_zero_range(tmp_path, mount, layout):
    opts, extra = LAYOUTS[layout]
    size = 16 * MiB
    img = tmp_path / "a.qcow2"
    ref = tmp_path / "ref.raw"
    if extra == "raw":
        base = tmp_path / "base.raw"
        qemu_img("create", "-q", "-f", "raw", base, str(size))
        qemu_io(base, "write -P 0x77 0 16M", fmt="raw")
        qemu_img("create", "-q", "-f", "qcow2", "-o", opts, "-b", base, "-F", "raw", img)
    else:
        qemu_img("create", "-q", "-f", "qcow2", "-o", opts, img, str(size))
    qemu_io(img, "write -P 0x11 0 6M", "write -P 0x22 8M 4M")
    if extra == "snapshot":
        qemu_img("snapshot", "-c", "s1", img)
    qemu_img("bitmap", "--add", img, "b0")
    before_actual = os.stat(img).st_blocks
    run(["qemu-img", "convert", "-O", "raw", img, ref])
    m = mount(img)
    ops = [
        (PUNCH_HOLE | KEEP_SIZE, 0, 2 * MiB),  # whole clusters
        (PUNCH_HOLE | KEEP_SIZE, 3 * MiB + 1000, 70000),  # partial ones, across a boundary
        (ZERO_RANGE, 8 * MiB + 4096, 3 * MiB),  # partial head, whole middle
        (ZERO_RANGE | KEEP_SIZE, 13 * MiB, 2 * MiB + 512),
    ]  # beyond the data, with a backing file
    with open(ref, "r+b") as r:
        for mode, off, ln in ops:
            fallocate(m.disk, mode, off, ln)
            r.seek(off)
            r.write(bytes(ln))
    data = m.disk.read_bytes()
    assert data == ref.read_bytes()
    fallocate(m.disk, 0, 0, size)  # preallocation inside the disk: accepted, nothing changes
    for mode in (0x08, 0x20, PUNCH_HOLE):  # collapse, insert, punch without keep-size
        with pytest.raises(OSError) as e:
            fallocate(m.disk, mode, 0, 65536)
        assert e.value.errno == errno.EOPNOTSUPP
    st = json.loads((m.bitmaps / "b0").read_text())
    assert st["count"] >= (2 * MiB + 3 * MiB + 2 * MiB)  # discards are recorded
    assert m.unmount() == 0
    assert_clean(img)  # no leaks
    c = run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", img, ref], check=False)
    assert c.returncode == 0, c.stdout
    assert qemu_data_extents(img) == data_extents_by_seek_after(img, tmp_path, mount)
    # the punched whole clusters as QEMU's discard leaves them: zero clusters where a backing file
    # would show through, unallocated where nothing is below
    first = json.loads(run(["qemu-img", "map", "--output=json", img]).stdout)[0]
    assert (
        first["start"] == 0 and first["length"] >= 2 * MiB and first["zero"] and not first["data"]
    )
    assert first["present"] == (extra == "raw"), first
    if extra is None:
        assert os.stat(img).st_blocks < before_actual, "the freed clusters went back to the host"
    if extra == "snapshot":  # the snapshot still reads as before
        snap = tmp_path / "s1.raw"
        run(["qemu-img", "convert", "-l", "snapshot.name=s1", "-O", "raw", img, snap])
        assert snap.read_bytes()[: 6 * MiB] == b"\x11" * (6 * MiB)


def data_extents_by_seek_after(img: Path, tmp_path: Path, mount) -> list:
    m = mount(img, read_only=True, mnt=tmp_path / "ro")
    try:
        return data_extents_by_seek(m.disk)
    finally:
        m.unmount()


def test_seek_data_and_hole_follow_the_backing_chain(tmp_path, mount):
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, "64M")
    qemu_io(base, "write -P 1 1M 2M", "write -c -P 2 10M 1M", "write -z 20M 4M")
    mid = tmp_path / "mid.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", mid)
    qemu_io(mid, "write -P 3 2M 2M", "write -z 1M 512k", "write -P 4 40M 64k")
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", mid, "-F", "qcow2", top, "80M")
    qemu_io(top, "write -c -P 5 50M 128k", "write -z 2M 64k")
    m = mount(top, read_only=True)
    got = data_extents_by_seek(m.disk)
    assert got == qemu_data_extents(top)
    fd = os.open(m.disk, os.O_RDONLY)
    try:
        with pytest.raises(OSError) as e:
            os.lseek(fd, 80 * MiB, os.SEEK_DATA)
        assert e.value.errno == errno.ENXIO
        with pytest.raises(OSError) as e:  # no data after the last extent
            os.lseek(fd, 60 * MiB, os.SEEK_DATA)
        assert e.value.errno == errno.ENXIO
        assert os.lseek(fd, 70 * MiB, os.SEEK_HOLE) == 70 * MiB
    finally:
        os.close(fd)


def test_sparse_copy_of_a_mostly_empty_64g_disk_is_fast(tmp_path, mount):
    img = tmp_path / "big.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "64G")
    qemu_io(img, "write -P 9 0 1M", "write -P 8 30G 1M", "write -P 7 63G 64k")
    m = mount(img, read_only=True)
    dest = tmp_path / "copy.raw"
    t0 = time.monotonic()
    run(["cp", "--sparse=always", m.disk, dest])
    took = time.monotonic() - t0
    assert took < 20, f"cp --sparse took {took:.1f}s"
    assert dest.stat().st_size == 64 * GiB and dest.stat().st_blocks * 512 < 64 * MiB
    with open(dest, "rb") as f:
        f.seek(30 * GiB)
        assert f.read(MiB) == b"\x08" * MiB


def test_fstrim_through_a_loop_device_gives_the_space_back(tmp_path, mount):
    img = tmp_path / "a.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "1G")
    m = mount(img)
    mnt = Path(tempfile.mkdtemp(prefix="qcowfs-ext4-", dir=tmp_path))
    dev = run(["losetup", "--direct-io=on", "--find", "--show", m.disk]).stdout.strip()
    mounted = False
    try:
        run(["mkfs.ext4", "-q", "-E", "nodiscard", dev])
        run(["mount", dev, mnt])
        mounted = True
        for i in range(4):
            run(
                ["dd", "if=/dev/urandom", f"of={mnt / f'f{i}'}", "bs=1M", "count=50", "status=none"]
            )
        run(["sync"])
        full = json.loads(
            run(["qemu-img", "check", "-U", "--output=json", img], check=False).stdout
        )
        for i in range(4):
            (mnt / f"f{i}").unlink()
        run(["sync"])  # ext4 frees the blocks at the journal commit
        p = run(["fstrim", "-v", mnt])
        assert "trimmed" in p.stdout
    finally:
        if mounted:
            run(["umount", mnt], check=False)
        run(["losetup", "-d", dev], check=False)
    assert m.unmount() == 0
    after = json.loads(run(["qemu-img", "check", "--output=json", img]).stdout)
    assert full["allocated-clusters"] > 3000
    assert after["allocated-clusters"] < 100, after  # 200 MiB of files gone, a few MiB of ext4 left
    assert after.get("leaks", 0) == 0 and after.get("corruptions", 0) == 0
    assert qemu_info(img)["actual-size"] < 16 * MiB
    assert qemu_bitmaps(img) == {}


@pytest.mark.parametrize("mode", ["close", "intent"])
def test_growing_with_a_recording_bitmap_and_a_snapshot(tmp_path, mount, mode):
    img = tmp_path / "a.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", img, "64M")
    qemu_io(img, "write -P 1 0 1M")
    qemu_img("snapshot", "-c", "s1", img)
    snap_before = tmp_path / "s1-before.raw"
    run(["qemu-img", "convert", "-l", "snapshot.name=s1", "-O", "raw", img, snap_before])
    qemu_img("bitmap", "--add", img, "b0")
    m = mount(img, extra=[f"--bitmap-sync={mode}"])
    run(
        ["truncate", "-s", "700M", m.disk]
    )  # past what the L1 table mapped (64 KiB clusters: 512 MiB per entry)
    assert m.disk.stat().st_size == 700 * MiB
    with open(m.disk, "r+b") as f:
        f.seek(600 * MiB)
        assert f.read(MiB) == bytes(MiB)  # the new area reads as zeros
        f.seek(600 * MiB)
        f.write(b"g" * 65536)
    p = run(["truncate", "-s", "100M", m.disk], check=False)
    assert p.returncode != 0 and "not permitted" in p.stderr  # shrinking: EPERM, nothing changed
    assert m.disk.stat().st_size == 700 * MiB
    assert (m.mnt / ".snapshots" / "s1").stat().st_size == 64 * MiB  # snapshots keep their sizes
    assert (m.mnt / ".snapshots" / "s1").read_bytes() == snap_before.read_bytes()
    assert m.unmount() == 0
    info = qemu_info(img)
    assert info["virtual-size"] == 700 * MiB
    assert (
        json.loads(run([sys.executable, "-m", "qcowfs", "info", "--json", img]).stdout)[
            "virtual-size"
        ]
        == 700 * MiB
    )
    assert_clean(img)
    assert qemu_bitmaps(img)["b0"]["flags"] == ["auto"]
    dirty = [
        e
        for e in json.loads(
            run(
                [
                    "nbdinfo",
                    "--json",
                    "--map=qemu:dirty-bitmap:b0",
                    "--",
                    "[",
                    "qemu-nbd",
                    "-r",
                    "-f",
                    "qcow2",
                    "-B",
                    "b0",
                    str(img),
                    "]",
                ]
            ).stdout
        )
        if e["type"] & 1
    ]
    assert [(e["offset"], e["length"]) for e in dirty] == [
        (600 * MiB, 65536)
    ]  # the bitmap covers the new size
    snap_after = tmp_path / "s1-after.raw"
    run(["qemu-img", "convert", "-l", "snapshot.name=s1", "-O", "raw", img, snap_after])
    assert snap_after.read_bytes()[: 64 * MiB] == snap_before.read_bytes()
