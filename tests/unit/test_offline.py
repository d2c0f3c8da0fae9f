"""Offline `qcowfs bitmap` commands on unmounted images (and `qcowfs check` refusing an image in use).
Header rewrites through a mount: tests/mount/test_header_rewrite.py."""

from __future__ import annotations

import json
import subprocess

from qcowfs_dev.mounts import QCOWFS
from qcowfs_dev.oracles import assert_clean, dirty_map, qemu_bitmaps, qemu_img, qemu_io, run
from qcowfs_dev.proc import wait_for

KiB = 1 << 10
MiB = 1 << 20


def qcowfs(*args, check=True):
    p = run([*QCOWFS, *args], check=check)
    assert "Traceback" not in p.stderr, p.stderr
    return p


def qemu_dirty_extents(img, name, tmp_path) -> list:
    """Every extent of bitmap NAME as QEMU serves it over NBD: [(offset, length, dirty)]."""
    return dirty_map(img, name)


def test_offline_bitmap_commands_match_qemu(tmp_path):
    img = tmp_path / "a.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "32M")
    qcowfs("bitmap", "add", img, "g4k", "--granularity", "4096")
    qcowfs("bitmap", "add", img, "off", "--disabled")
    bms = qemu_bitmaps(img)
    assert bms["g4k"]["granularity"] == 4096 and bms["g4k"]["flags"] == ["auto"]
    assert bms["off"]["granularity"] == 64 * KiB and bms["off"]["flags"] == []
    assert_clean(img)
    qemu_io(img, "write -P 1 8k 4k", "write 1M 100k")
    listed = {b["name"]: b for b in json.loads(qcowfs("bitmap", "list", "--json", img).stdout)}
    assert listed["g4k"]["count"] == 4 * KiB + 100 * KiB and listed["g4k"]["recording"] is True
    assert listed["off"]["count"] == 0 and listed["off"]["recording"] is False
    ext = json.loads(qcowfs("bitmap", "extents", "--json", img, "g4k").stdout)
    ours = [(e["start"], e["length"], e["dirty"]) for e in ext]
    assert ours == qemu_dirty_extents(img, "g4k", tmp_path)
    # merge into the disabled one, then clear, enable, remove
    qcowfs("bitmap", "merge", img, "g4k", "off")
    assert qemu_dirty_extents(img, "off", tmp_path) == [
        (0, 64 * KiB, True),
        (64 * KiB, MiB - 64 * KiB, False),
        (MiB, 128 * KiB, True),
        (MiB + 128 * KiB, 32 * MiB - MiB - 128 * KiB, False),
    ]
    qcowfs("bitmap", "clear", img, "g4k")
    assert all(not d for _, _, d in qemu_dirty_extents(img, "g4k", tmp_path))
    qcowfs("bitmap", "enable", img, "off")
    assert qemu_bitmaps(img)["off"]["flags"] == ["auto"]
    qcowfs("bitmap", "remove", img, "g4k")
    assert "g4k" not in qemu_bitmaps(img)
    assert_clean(img)


def test_offline_errors_are_one_line_and_change_nothing(tmp_path):
    img = tmp_path / "a.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "8M")
    qcowfs("bitmap", "add", img, "b0")
    before = img.read_bytes()
    for args in (
        ["add", img, "b0"],
        ["remove", img, "nope"],
        ["add", img, "x", "--granularity", "1000"],
        ["clear", img, "nope"],
    ):
        p = qcowfs("bitmap", *args, check=False)
        assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1, (args, p.stderr)
    assert img.read_bytes() == before


def test_offline_commands_refuse_an_image_in_use(tmp_path):
    img = tmp_path / "a.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "8M")
    # qemu-storage-daemon with the image open read-write holds QEMU's write lock
    pidfile = tmp_path / "qsd.pid"
    qsd = subprocess.Popen(
        [
            "qemu-storage-daemon",
            "--blockdev",
            f"driver=file,node-name=f0,filename={img}",
            "--blockdev",
            "driver=qcow2,node-name=q0,file=f0",
            "--pidfile",
            str(pidfile),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(
            lambda: pidfile.exists() and pidfile.read_text().strip(), what="qemu-storage-daemon"
        )
        before = img.read_bytes()
        for args in (["add", img, "b0"], ["list", img]):
            p = qcowfs("bitmap", *args, check=False)
            assert (
                p.returncode == 1
                and "in use" in p.stderr
                and len(p.stderr.strip().splitlines()) == 1
            ), p.stderr
        p = qcowfs("check", img, check=False)
        assert p.returncode == 1 and "in use" in p.stderr
        assert img.read_bytes() == before
    finally:
        qsd.terminate()
        qsd.wait()
