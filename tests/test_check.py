"""`qcowfs check` against `qemu-img check` on deliberately damaged images, and `--repair`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from support.mounts import QCOWFS
from support.oracles import qemu_check, qemu_img, qemu_io, run
from support.probes import (BITMAPS_MAGIC, bitmap_directory, find_extension, first_l2_entry, read_u64, set_refcount,
                            write_u64)

MiB = 1 << 20


def qcowfs_check(image, *extra) -> tuple:
    p = run([*QCOWFS, "check", "--json", *extra, image], check=False)
    assert "Traceback" not in p.stderr + p.stdout, p.stderr
    return p.returncode, (json.loads(p.stdout) if p.stdout.strip() else {})


def make(tmp_path: Path, name="img.qcow2") -> Path:
    img = tmp_path / name
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", img, "16M")
    qemu_io(img, "write -P 0x11 0 1M", "write -P 0x22 4M 64k")
    return img


def damage_leak(img):
    size = img.stat().st_size
    set_refcount(img, size // 65536 - 1, 2)  # last cluster referenced once, counted twice


def damage_refcount_low(img):
    _, e = first_l2_entry(img)
    set_refcount(img, (e & 0x00FFFFFFFFFFFE00) >> 16, 0)


def damage_copied(img):
    off, e = first_l2_entry(img)
    write_u64(img, off, e & ~(1 << 63))


def damage_reserved(img):
    off, e = first_l2_entry(img)
    write_u64(img, off, e | 0x2)


def damage_past_eof(img):
    off, e = first_l2_entry(img)
    write_u64(img, off, (1 << 63) | (1 << 40))


DAMAGE = {
    "leak": (damage_leak, True),
    "refcount-too-low": (damage_refcount_low, True),
    "copied-flag": (damage_copied, True),
    "reserved-bits": (damage_reserved, False),
    "past-eof": (damage_past_eof, False),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_check_agrees_with_qemu_and_repairs(tmp_path, case):
    damage, repairable = DAMAGE[case]
    img = make(tmp_path)
    damage(img)
    q = qemu_check(img)
    assert q["rc"] in (2, 3), f"{case}: qemu-img check did not see the damage: {q}"
    rc, res = qcowfs_check(img)
    assert rc == q["rc"], f"{case}: qcowfs check exit {rc}, qemu-img check exit {q['rc']}: {res}"
    assert res["corruptions"] > 0 if q["rc"] == 2 else res["leaks"] > 0
    if repairable:
        copy = tmp_path / "repair.qcow2"
        shutil.copy(img, copy)
        rc2, res2 = qcowfs_check(copy, "--repair=all")
        assert rc2 == 0, f"{case}: after --repair=all qcowfs check exits {rc2}: {res2}"
        assert qemu_check(copy)["rc"] == 0, f"{case}: qemu-img check after qcowfs repair: {qemu_check(copy)}"


def test_repair_leaks_only(tmp_path):
    img = make(tmp_path)
    damage_leak(img)
    rc, res = qcowfs_check(img, "--repair=leaks")
    assert rc == 0 and res["leaks-fixed"] >= 1, res
    assert qemu_check(img)["rc"] == 0


def test_clean_image_and_exit_codes(tmp_path):
    img = make(tmp_path)
    rc, res = qcowfs_check(img)
    assert rc == 0 and res["corruptions"] == 0 and res["leaks"] == 0
    p = run([*QCOWFS, "check", tmp_path / "missing.qcow2"], check=False)
    assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr


def test_in_use_bitmap_is_reported_with_the_fix(tmp_path):
    img = make(tmp_path)
    qemu_img("bitmap", "--add", img, "b0")
    qemu_io(img, "write 0 64k", "abort", check=False)  # leaves b0 in_use, like a crash
    rc, res = qcowfs_check(img)
    assert rc == qemu_check(img)["rc"]
    assert any("b0" in w and "remove" in w for w in res["warnings"]), res


def test_invalid_bitmap_table_entry_is_a_corruption(tmp_path):
    img = make(tmp_path)
    qemu_img("bitmap", "--add", img, "b0")
    qemu_io(img, "write 0 64k")
    raw = img.read_bytes()
    # find the bitmaps extension, then the directory, then the table
    assert find_extension(raw, BITMAPS_MAGIC), "no bitmaps extension"
    table_off = bitmap_directory(raw)[0]["table_offset"]
    write_u64(img, table_off, read_u64(img, table_off) | 0x2)  # reserved bit
    q = qemu_check(img)
    rc, res = qcowfs_check(img)
    assert rc == 2 and res["corruptions"] >= 1, res
    # QEMU 7.2 refuses to open such an image at all (exit 1, "Could not read bitmap_table");
    # qcowfs check still opens it and names the damage
    assert q["rc"] in (1, 2), f"qemu-img check should refuse the image too: {q}"
