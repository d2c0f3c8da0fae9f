"""`qcowfs check` against `qemu-img check` on deliberately damaged images, and `--repair`.

QEMU is the oracle: for every image built here, `qcowfs check --json` must print the same value
as `qemu-img check --output=json` for every key of qemu-img's JSON, and the same exit code.
qemu-img leaves a key out when its value is 0 (check-errors excepted); qcowfs always prints it, so
a key qemu-img omits must be 0 in qcowfs' JSON."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
from conftest import QCOWFS, qemu_check, qemu_img, qemu_io, run
from support.images import create

from qcowfs_dev.probes import first_l2_entry, header, read_u64, set_refcount, write_u64

MiB = 1 << 20


#: every key of qemu-img check's JSON (QAPI ImageCheck)
QEMU_KEYS = (
    "filename",
    "format",
    "check-errors",
    "image-end-offset",
    "corruptions",
    "leaks",
    "corruptions-fixed",
    "leaks-fixed",
    "total-clusters",
    "allocated-clusters",
    "fragmented-clusters",
    "compressed-clusters",
)


def qcowfs_check(image, *extra) -> tuple:
    p = run([*QCOWFS, "check", "--json", *extra, image], check=False)
    assert "Traceback" not in p.stderr + p.stdout, p.stderr
    return p.returncode, (json.loads(p.stdout) if p.stdout.strip() else {})


def qemu_check_repair(image, mode) -> dict:
    """qemu-img check -r MODE as JSON (empty when it prints none) plus 'rc'."""
    p = run(["qemu-img", "check", "-r", mode, "--output=json", image], check=False)
    data = json.loads(p.stdout) if p.stdout.strip() else {}
    data["rc"] = p.returncode
    data["stderr"] = p.stderr
    return data


def assert_same_as_qemu(q: dict, rc: int, res: dict, what: str, may_differ=()) -> None:
    """qcowfs' (rc, JSON) equals qemu-img's on the exit code and on every key of qemu-img's JSON."""
    assert rc == q["rc"], (
        f"{what}: qcowfs exit {rc}, qemu-img exit {q['rc']}\nqemu-img: {q}\nqcowfs: {res}"
    )
    if not res and rc == 1:
        # qemu-img check prints no JSON when the check itself fails (qcowfs: one line on stderr)
        assert "format" not in q, f"{what}: qemu-img printed JSON, qcowfs none: {q}"
        return
    missing = [k for k in QEMU_KEYS if k not in res]
    assert not missing, f"{what}: qcowfs check --json lacks {missing}: {res}"
    unknown = set(q) - set(QEMU_KEYS) - {"rc", "stderr"}
    assert not unknown, f"{what}: qemu-img printed keys this test does not know: {unknown}"
    diffs = {
        k: (q.get(k, 0), res[k]) for k in QEMU_KEYS if k not in may_differ and q.get(k, 0) != res[k]
    }
    assert not diffs, f"{what}: (qemu-img, qcowfs) differ: {diffs}\nqemu-img: {q}\nqcowfs: {res}"


def assert_check_agrees(image, what="", may_differ=()) -> dict:
    """qemu-img check and qcowfs check on image agree (exit code and every key); qcowfs' JSON."""
    q = qemu_check(image)
    rc, res = qcowfs_check(image)
    assert_same_as_qemu(q, rc, res, what or str(image), may_differ)
    return res


def base_image(tmp_path: Path) -> Path:
    """What each damage starts from: 64 KiB clusters (16-bit refcounts), 1 MiB + 64 KiB of data."""
    return create(
        tmp_path / "img.qcow2",
        "16M",
        "cluster_size=65536",
        writes=["write -P 0x11 0 1M", "write -P 0x22 4M 64k"],
    )


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


def damage_leak_only(img):
    """Two clusters past the end of the data, refcounted but referenced by nothing."""
    n = img.stat().st_size // 65536
    with open(img, "r+b") as f:
        f.truncate((n + 2) * 65536)
    set_refcount(img, n, 1)
    set_refcount(img, n + 1, 1)


def damage_reserved_high(img):
    off, e = first_l2_entry(img)
    write_u64(img, off, e | (1 << 57))  # a reserved bit among 56-61


def damage_l1_reserved(img):
    l1 = header(img)["l1_offset"]
    write_u64(img, l1, read_u64(img, l1) | 0x2)


def damage_unaligned_data(img):
    off, e = first_l2_entry(img)
    write_u64(img, off, e + 512)  # still a reference, to two clusters: QEMU counts both


def damage_refblock_shared(img):
    """A data entry pointing at refcount block 0: the block is referenced twice."""
    off, _ = first_l2_entry(img)
    write_u64(img, off + 8, (1 << 63) | read_u64(img, header(img)["refcount_table_offset"]))


def damage_zero_alloc_unaligned(img):
    """A preallocated zero cluster at an unaligned offset (qemu-img -r all makes it a plain zero)."""
    qemu_io(img, "write -z 0 64k")  # keeps the host cluster: a zero-allocated entry
    off, e = first_l2_entry(img)
    assert e & 1 and e & 0x00FFFFFFFFFFFE00, hex(e)
    write_u64(img, off, e + 512)


#: name -> (damage, repairable: after `--repair=all` qemu-img check is clean)
DAMAGE = {
    # the last cluster is a data cluster: refcount 2 is a leak and makes its COPIED flag wrong
    "leak": (damage_leak, True),
    "leak-only": (damage_leak_only, True),
    "refcount-too-low": (damage_refcount_low, True),
    "copied-flag": (damage_copied, True),
    # reserved bits: a corruption that neither qemu-img -r all nor qcowfs --repair=all fixes; the
    # entry still references its cluster (counted, no leak)
    "reserved-bits": (damage_reserved, False),
    "reserved-bits-high": (damage_reserved_high, False),
    "l1-reserved-bits": (damage_l1_reserved, False),
    "past-eof": (damage_past_eof, False),
    "unaligned-data": (damage_unaligned_data, False),
    "refblock-shared": (damage_refblock_shared, False),
    "zero-alloc-unaligned": (damage_zero_alloc_unaligned, True),
}

#: keys whose value after a repair legitimately differs from qemu-img's, per damage and mode
REPAIR_MAY_DIFFER = {
    # a cluster in use with refcount 0: qemu-img -r all rebuilds the whole refcount structure
    # (new refcount table and blocks at the end of the file); qcowfs raises the one refcount
    # in place, so the image ends earlier
    ("refcount-too-low", "all"): ("image-end-offset",),
    # a refcount block referenced twice: qemu-img -r all rebuilds the refcount structure (and so
    # fixes the refcount block's own refcount); qcowfs raises the refcount in place and leaves
    # the doubly used refcount block reported as a corruption
    ("refblock-shared", "all"): ("image-end-offset", "corruptions", "corruptions-fixed", "rc"),
}


#: the damage cases scripts/test --quick runs (the whole set is marked slow)
QUICK_DAMAGE = ("leak", "reserved-bits", "copied-flag")


@pytest.mark.parametrize(
    "case",
    [c if c in QUICK_DAMAGE else pytest.param(c, marks=pytest.mark.slow) for c in sorted(DAMAGE)],
)
def test_check_agrees_with_qemu_and_repairs(tmp_path, case):
    damage, repairable = DAMAGE[case]
    img = base_image(tmp_path)
    damage(img)
    q = qemu_check(img)
    assert q["rc"] in (2, 3), f"{case}: qemu-img check did not see the damage: {q}"
    rc, res = qcowfs_check(img)
    assert_same_as_qemu(q, rc, res, case)
    assert res["corruptions"] > 0 if q["rc"] == 2 else res["leaks"] > 0
    for mode in ("leaks", "all"):
        qcopy, fcopy = tmp_path / f"qemu-{mode}.qcow2", tmp_path / f"qcowfs-{mode}.qcow2"
        shutil.copy(img, qcopy)
        shutil.copy(img, fcopy)
        qr = qemu_check_repair(qcopy, mode)
        rc2, res2 = qcowfs_check(fcopy, f"--repair={mode}")
        may_differ = REPAIR_MAY_DIFFER.get((case, mode), ())
        if "rc" in may_differ:
            assert rc2 in (0, 2, 3), f"{case}: --repair={mode} exits {rc2}: {res2}"
        else:
            assert_same_as_qemu(
                qr, rc2, res2, f"{case} --repair={mode}", may_differ + ("filename",)
            )
        if mode == "all" and repairable:
            assert rc2 == 0, f"{case}: after --repair=all qcowfs check exits {rc2}: {res2}"
        after = qemu_check(fcopy)
        if "rc" not in may_differ:
            assert after["rc"] == qemu_check(qcopy)["rc"], (
                f"{case}: qemu-img check after --repair={mode}: qcowfs' copy {after}, qemu-img's {qemu_check(qcopy)}"
            )
        if rc2 == 1:
            # refused (qemu-img -r leaks refuses too: "need to rebuild refcount structures"): untouched
            assert fcopy.read_bytes() == img.read_bytes(), (
                f"{case}: a refused --repair={mode} wrote to the image"
            )
        else:
            # what qcowfs says after its repair is what qemu-img says of the result
            assert_check_agrees(fcopy, f"{case} after qcowfs --repair={mode}")


def test_reserved_bits_are_a_corruption_and_still_a_reference(tmp_path):
    """Issue 11 item 11: an L2 entry with reserved bits set is one corruption, no leak (its cluster
    is still referenced), and no repair clears the bits (qemu-img -r all does not either)."""
    img = base_image(tmp_path)
    damage_reserved(img)
    res = assert_check_agrees(img)
    assert (res["corruptions"], res["leaks"]) == (1, 0), res
    copy = tmp_path / "copy.qcow2"
    shutil.copy(img, copy)
    q = qemu_check_repair(copy, "all")
    assert q["rc"] == 2 and q.get("corruptions") == 1 and not q.get("corruptions-fixed"), q
    rc, res = qcowfs_check(img, "--repair=all")
    assert rc == 2 and (res["corruptions"], res["leaks"], res["corruptions-fixed"]) == (1, 0, 0), (
        res
    )
    assert copy.read_bytes() == img.read_bytes(), (
        "qemu-img -r all and qcowfs --repair=all left different images"
    )


def test_allocated_clusters_counts_guest_clusters(tmp_path):
    """Issue 11 item 11: 256 KiB written in 64 KiB clusters is 4 allocated clusters (qemu-img counts
    guest clusters with a host cluster, not metadata)."""
    img = create(
        tmp_path / "img.qcow2", "16M", "cluster_size=65536", writes=["write -P 0x11 0 256k"]
    )
    res = assert_check_agrees(img)
    assert res["allocated-clusters"] == 4, res
    p = run([*QCOWFS, "check", img], check=False)
    assert p.returncode == 0 and "4/256 = 1.56% allocated" in p.stdout, p.stdout


def test_unreadable_refcount_block_is_a_check_error(tmp_path):
    """A refcount block at an unaligned offset cannot be read: qemu-img counts a check error for every
    cluster it covers and exits 1 (its JSON still printed); qcowfs the same, plus one stderr line."""
    img = base_image(tmp_path)
    rt = header(img)["refcount_table_offset"]
    write_u64(img, rt, read_u64(img, rt) + 4096)
    res = assert_check_agrees(img)
    assert res["check-errors"] > 0 and res["corruptions"] == 1, res
    p = run([*QCOWFS, "check", "--json", img], check=False)
    assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1, p.stderr


def _layout_simple(img):
    create(img, "16M", "cluster_size=65536")


def _layout_fragmented(img):
    create(
        img,
        "16M",
        "cluster_size=65536",
        writes=[
            "write -P 1 1M 64k",
            "write -P 2 0 64k",
            "write -P 3 3M 128k",
            "write -P 4 2M 64k",
            "write -z 5M 64k",
            "write -z -u 1M 64k",
        ],
    )


def _layout_compressed(img):
    create(
        img,
        "16M",
        "cluster_size=65536",
        writes=[
            "write -c -P 1 0 64k",
            "write -c -P 2 64k 64k",
            "write -P 3 128k 64k",
            "write -c -P 4 1M 64k",
        ],
    )


def _layout_snapshot(img):
    create(img, "16M", "cluster_size=65536", writes=["write -P 1 0 1M", "write -P 2 4M 64k"])
    qemu_img("snapshot", "-c", "s1", img)
    qemu_io(img, "write -P 3 0 128k")


def _layout_v2(img):
    create(
        img,
        "16M",
        "cluster_size=65536,compat=0.10",
        writes=["write -P 1 0 1M", "write -P 2 4M 64k"],
    )


def _layout_small_clusters(img):
    create(
        img,
        "8M",
        "cluster_size=512",
        writes=[
            "write -P 1 0 100k",
            "write -P 2 1M 3k",
            "write -c -P 3 2M 4k",
            "write -P 4 300k 1k",
        ],
    )


def _layout_extended_l2(img):
    create(
        img,
        "16M",
        "cluster_size=65536,extended_l2=on",
        writes=["write -P 1 0 4k", "write -P 2 1M 64k", "write -z 2M 64k"],
    )


def _layout_refcount_bits_1(img):
    create(img, "16M", "cluster_size=65536,refcount_bits=1", writes=["write -P 1 0 1M"])


def _layout_bitmap(img):
    create(img, "16M", "cluster_size=65536")
    qemu_img("bitmap", "--add", img, "b0")
    qemu_io(img, "write 0 64k", "write 8M 1M")


def _layout_data_file(img):
    create(
        img,
        "16M",
        f"cluster_size=65536,data_file={img}.data",
        writes=["write -P 1 0 1M", "write -P 2 8M 64k"],
    )


def _layout_file_tail(img):
    """Unreferenced, unrefcounted space after the last cluster: not a leak, not in image-end-offset."""
    create(img, "16M", "cluster_size=65536", writes=["write -P 1 0 1M"])
    with open(img, "r+b") as f:
        f.truncate(img.stat().st_size + 3 * 65536)


def _layout_lazy_dirty(img):
    """Lazy refcounts, crashed: refcounts not written (qemu-img: corruptions, without -r)."""
    create(img, "16M", "cluster_size=65536,lazy_refcounts=on")
    qemu_io(img, "write -P 1 0 1M", "abort", check=False)


LAYOUTS = {
    name[len("_layout_") :]: fn
    for name, fn in sorted(globals().items())
    if name.startswith("_layout_")
}


@pytest.mark.parametrize(
    "layout",
    [
        x
        if x in ("compressed", "snapshot", "data_file")
        else pytest.param(x, marks=pytest.mark.slow)
        for x in sorted(LAYOUTS)
    ],
)
def test_check_agrees_with_qemu_on_layouts(tmp_path, layout):
    img = tmp_path / "img.qcow2"
    LAYOUTS[layout](img)
    res = assert_check_agrees(img, layout)
    if layout == "compressed":
        assert (
            res["allocated-clusters"],
            res["compressed-clusters"],
            res["fragmented-clusters"],
        ) == (4, 3, 3), res


def test_repair_leaks_only(tmp_path):
    img = base_image(tmp_path)
    damage_leak(img)
    rc, res = qcowfs_check(img, "--repair=leaks")
    assert rc == 0 and res["leaks-fixed"] >= 1, res
    assert qemu_check(img)["rc"] == 0


def test_clean_image_and_exit_codes(tmp_path):
    img = base_image(tmp_path)
    res = assert_check_agrees(img)
    assert res["corruptions"] == 0 and res["leaks"] == 0
    p = run([*QCOWFS, "check", tmp_path / "missing.qcow2"], check=False)
    assert (
        p.returncode == 1
        and len(p.stderr.strip().splitlines()) == 1
        and "Traceback" not in p.stderr
    )


def test_in_use_bitmap_is_reported_with_the_fix(tmp_path):
    img = base_image(tmp_path)
    qemu_img("bitmap", "--add", img, "b0")
    qemu_io(img, "write 0 64k", "abort", check=False)  # leaves b0 in_use, like a crash
    res = assert_check_agrees(img)
    assert any("b0" in w and "remove" in w for w in res["warnings"]), res


def test_invalid_bitmap_table_entry_is_a_corruption(tmp_path):
    img = base_image(tmp_path)
    qemu_img("bitmap", "--add", img, "b0")
    qemu_io(img, "write 0 64k")
    raw = img.read_bytes()
    # find the bitmaps extension, then the directory, then the table
    pos = 112
    while True:
        magic, length = struct.unpack_from(">II", raw, pos)
        if magic == 0x23852875:
            dir_off = struct.unpack_from(">Q", raw, pos + 8 + 16)[0]
            break
        assert magic != 0, "no bitmaps extension"
        pos += 8 + (length + 7) // 8 * 8
    table_off = struct.unpack_from(">Q", raw, dir_off)[0]
    write_u64(img, table_off, read_u64(img, table_off) | 0x2)  # reserved bit
    q = qemu_check(img)
    rc, res = qcowfs_check(img)
    assert rc == 2 and res["corruptions"] >= 1, res
    # QEMU 7.2 refuses to open such an image at all (exit 1, "Could not read bitmap_table");
    # qcowfs check still opens it and names the damage
    assert q["rc"] in (1, 2), f"qemu-img check should refuse the image too: {q}"
