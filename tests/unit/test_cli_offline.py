"""The command line as a user meets it without a mount: help, info, umount of something else.
With a mount: tests/mount/test_cli.py."""

from __future__ import annotations

from support.images import create

from qcowfs_dev.mounts import QCOWFS
from qcowfs_dev.oracles import qemu_img, qemu_io, run


def test_help_texts():
    for args in ([], ["mount"], ["umount"], ["info"], ["check"], ["bitmap"], ["bitmap", "add"]):
        p = run([*QCOWFS, *args, "--help"])
        assert "usage: qcowfs" in p.stdout and p.stdout.count("\n") > 3, args
    # what the mount point holds, all of it
    top = " ".join(run([*QCOWFS, "--help"]).stdout.split())
    assert all(name in top for name in ("disk.raw", ".bitmaps/", ".snapshots/")), top


def test_info_text_is_qemu_img_info_then_qcowfs_lines(tmp_path):
    """qemu-img info's lines, in its order (the snapshot list before the format-specific section,
    bitmaps nested after lazy refcounts), then what qcowfs adds."""
    base = create(tmp_path / "base.qcow2", "16M")
    img = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", img)
    qemu_img("bitmap", "--add", img, "b0")
    qemu_img("bitmap", "--add", "--disable", "-g", "4096", img, "b1")
    qemu_img("snapshot", "-c", "s1", img)
    qemu_io(img, "write -P 1 0 64k")
    qemu_img("snapshot", "-c", "second", img)
    assert base.exists()
    theirs = run(["qemu-img", "info", img]).stdout.splitlines()
    ours = run([*QCOWFS, "info", img]).stdout.splitlines()
    assert ours[: len(theirs)] == theirs
    assert ours[len(theirs)].startswith("    incompatible features:")


def test_umount_of_something_else_is_one_line(tmp_path):
    p = run([*QCOWFS, "umount", tmp_path], check=False)
    assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1
