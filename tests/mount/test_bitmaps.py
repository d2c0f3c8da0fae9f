"""Persistent dirty bitmaps through the FUSE mount, with QEMU as the oracle.

Every expectation is checked against what QEMU itself reads from the image after
the mount is gone: `qemu-img info` (names, granularity, flags), `qemu-img check`
(no corruption, no leaks) and the dirty extents QEMU serves over NBD
(`qemu-nbd -B NAME` + `nbdinfo --map=qemu:dirty-bitmap:NAME`). The expected
extents are computed independently here: every written range rounded out to the
granularity, clipped to the disk size, merged.
"""

from __future__ import annotations

import errno
import json
import os
import sys
import threading
from pathlib import Path

import pytest
from conftest import needs_fuse, sha256
from support.extents import merged
from support.images import create
from support.syscalls import errno_of

from qcowfs_dev.oracles import (
    assert_clean,
    dirty_extents,
    qemu_bitmaps,
    qemu_check,
    qemu_img,
    qemu_info,
    qemu_io,
    run,
)

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB

STATUS_KEYS = {"name", "granularity", "count", "persistent", "recording", "inconsistent"}


# ---------------------------------------------------------------------------- helpers
def add_qemu_bitmap(
    image: Path, name: str, granularity: int | None = None, disabled: bool = False
) -> None:
    args = ["bitmap", "--add"]
    if granularity is not None:
        args += ["-g", str(granularity)]
    if disabled:
        args.append("--disable")
    qemu_img(*args, image, name)


def expected_extents(ranges, granularity: int, size: int) -> list:
    """Written ranges rounded out to the granularity, clipped to the disk, merged: [(offset, length)]."""
    iv = [
        (off // granularity * granularity, min(-(-(off + ln) // granularity) * granularity, size))
        for off, ln in ranges
        if ln > 0
    ]
    return [(s, e - s) for s, e in merged(iv)]


def expected_count(ranges, granularity: int, size: int) -> int:
    """Dirty bytes as the status file reports them: dirty granules * granularity (the tail granule counts whole)."""
    return (
        sum(-(-ln // granularity) for _, ln in expected_extents(ranges, granularity, size))
        * granularity
    )


def touch(path: Path) -> None:
    run(["touch", path])


def status(path: Path) -> dict:
    with open(path) as f:
        text = f.read()
    d = json.loads(text)
    assert STATUS_KEYS <= set(d), f"status of {path} lacks keys {STATUS_KEYS - set(d)}: {text!r}"
    return d


def command(path: Path, cmd: str) -> None:
    """`echo CMD > PATH` at the syscall level (open O_WRONLY|O_TRUNC, one write) so errnos are exact."""
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    try:
        n = os.write(fd, (cmd + "\n").encode())
        assert n == len(cmd) + 1
    finally:
        os.close(fd)


def pattern(off: int, ln: int) -> bytes:
    """Non-zero bytes that depend on the offset (so a misplaced write would show)."""
    base = bytes(((i * 131 + 7) % 255) + 1 for i in range(256))
    rep = base * (ln // 256 + 2)
    k = off % 256
    return rep[k : k + ln]


WRITE_TIMEOUT = 60.0


def write_ranges(m, ranges, zero=(), ref: Path | None = None, fsync: bool = True) -> None:
    """pwrite each (offset, length) to m.disk with a non-zero pattern and each range in `zero` with zeros.

    With ref, the same writes go to a raw reference file (for qemu-img compare). A daemon that does
    not answer within WRITE_TIMEOUT is killed (a runaway daemon must not fill the disk) and the test fails."""
    errors: list = []

    def work() -> None:
        try:
            _pwrite_all(m.disk, ranges, zero, fsync)
        except BaseException as e:  # reported by the caller
            errors.append(e)

    t = threading.Thread(target=work, daemon=True)
    t.start()
    t.join(WRITE_TIMEOUT)
    if t.is_alive():
        m.kill()
        t.join(10)
        raise AssertionError(
            f"writes to {m.disk} did not complete within {WRITE_TIMEOUT}s: daemon killed\n"
            f"{m.log_text()[-2000:]}"
        )
    if errors:
        raise errors[0]
    if ref is not None:
        _pwrite_all(ref, ranges, zero, fsync=False)


def _pwrite_all(path: Path, ranges, zero, fsync: bool) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        for off, ln in ranges:
            assert os.pwrite(fd, pattern(off, ln), off) == ln
        for off, ln in zero:
            assert os.pwrite(fd, bytes(ln), off) == ln
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def assert_guest_data(img: Path, ranges, scratch: Path) -> None:
    """QEMU reads back the pattern written by write_ranges at every range (the writes reached the image)."""
    raw = scratch / "guest.raw"
    qemu_img("convert", "-f", "qcow2", "-O", "raw", img, raw)
    with open(raw, "rb") as f:
        for off, ln in ranges:
            f.seek(off)
            assert f.read(ln) == pattern(off, ln), (
                f"guest data at {off}+{ln} is not what was written"
            )
    raw.unlink()


def make_ref(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def vm_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS in /proc/{pid}/status")


def assert_not_corrupt(image: Path) -> dict:
    res = qemu_check(image)
    assert res["rc"] in (0, 3), f"qemu-img check {image} reports corruption: {res}"
    assert res.get("corruptions", 0) == 0, res
    return res


@pytest.fixture
def qemu_dirty():
    """qemu_dirty(image, name) -> [(offset, length)] of dirty extents as QEMU serves them over NBD
    (qemu-nbd -B NAME read with nbdinfo --map: qcowfs_dev.oracles.dirty_extents)."""
    return dirty_extents


# ---------------------------------------------------------------------------- the written ranges
def ranges_for(size: int) -> tuple:
    """(data ranges, zero ranges): unaligned, straddling granules and clusters, the first and last byte."""
    data = [
        (0, 1),  # first byte
        (511, 2),  # straddles a 512 B boundary
        (4095, 4097),  # straddles 4 KiB boundaries
        (3 * 64 * KiB + 100, 70000),  # straddles a 64 KiB boundary
        (5 * MiB - 1, 2),  # straddles a 1 MiB boundary
        (10 * MiB + 17, MiB + 3),  # long, unaligned both ends
        (10 * MiB + 5000, 10),  # inside the previous one
        (24 * MiB + 512, 512),  # sector aligned, not granule aligned
        (size - 1, 1),  # last byte
    ]
    zero = [
        (
            20 * MiB,
            128 * KiB,
        ),  # all zeros over unallocated clusters (zero-detected, nothing to write)
        (
            10 * MiB + 64 * KiB,
            64 * KiB,
        ),  # all zeros over data (zero-detected, becomes a zero cluster)
        (30 * MiB + 3, 5),  # a small unaligned zero write
    ]
    return data, zero


# ---------------------------------------------------------------------------- 1. written by qcowfs, read by QEMU
@needs_fuse
@pytest.mark.parametrize("granularity", [512, 4 * KiB, 64 * KiB, MiB])
def test_bitmaps_written_by_qcowfs_are_read_by_qemu(tmp_path, mount, qemu_dirty, granularity):
    size = 64 * MiB + 1536  # not a multiple of any granularity: a partial last granule
    img = create(tmp_path / "a.qcow2", size)
    add_qemu_bitmap(img, "g", granularity)
    ref = make_ref(tmp_path / "ref.raw", size)
    data, zero = ranges_for(size)

    m = mount(img)
    assert sorted(os.listdir(m.bitmaps)) == ["g"]
    st = status(m.bitmaps / "g")
    assert st == {
        **st,
        "name": "g",
        "granularity": granularity,
        "count": 0,
        "persistent": True,
        "recording": True,
        "inconsistent": False,
    }
    touch(m.bitmaps / "b0")
    assert sorted(os.listdir(m.bitmaps)) == ["b0", "g"]
    st0 = status(m.bitmaps / "b0")
    assert st0 == {
        **st0,
        "name": "b0",
        "granularity": 64 * KiB,
        "count": 0,
        "persistent": True,
        "recording": True,
        "inconsistent": False,
    }

    write_ranges(m, data, zero, ref=ref)
    written = data + zero
    assert status(m.bitmaps / "g")["count"] == expected_count(written, granularity, size)
    assert status(m.bitmaps / "b0")["count"] == expected_count(written, 64 * KiB, size)
    assert m.unmount() == 0

    bms = qemu_bitmaps(img)
    assert set(bms) == {"g", "b0"}
    assert bms["g"]["granularity"] == granularity and bms["g"]["flags"] == ["auto"], bms
    assert bms["b0"]["granularity"] == 64 * KiB and bms["b0"]["flags"] == ["auto"], bms
    assert_clean(img)
    qemu_img("compare", "-q", "-f", "qcow2", "-F", "raw", img, ref)
    # the all-zero write over data really took the zero-detect path (it became a zero cluster)
    zmap = json.loads(qemu_img("map", "--output=json", "-f", "qcow2", img).stdout)
    z = [e for e in zmap if e["start"] <= 10 * MiB + 64 * KiB < e["start"] + e["length"]]
    assert z and z[0]["zero"] is True and z[0]["data"] is False, z
    assert qemu_dirty(img, "g") == expected_extents(written, granularity, size)
    assert qemu_dirty(img, "b0") == expected_extents(written, 64 * KiB, size)


@needs_fuse
@pytest.mark.parametrize(
    "cluster_size,default_gran",
    [(512, 4 * KiB), (4 * KiB, 4 * KiB), (64 * KiB, 64 * KiB), (2 * MiB, 64 * KiB)],
)
def test_touch_makes_default_granularity_bitmap(
    tmp_path, mount, qemu_dirty, cluster_size, default_gran
):
    size = 40 * MiB
    img = create(tmp_path / "a.qcow2", size, f"cluster_size={cluster_size}")
    data, zero = ranges_for(size)
    m = mount(img)
    fd = os.open(m.bitmaps / "b0", os.O_WRONLY | os.O_CREAT, 0o644)  # what touch does
    os.close(fd)
    st = status(m.bitmaps / "b0")
    assert st["granularity"] == default_gran and st["count"] == 0 and st["recording"] is True
    write_ranges(m, data, zero)
    assert status(m.bitmaps / "b0")["count"] == expected_count(data + zero, default_gran, size)
    assert m.unmount() == 0
    bms = qemu_bitmaps(img)
    assert bms == {
        "b0": {**bms.get("b0", {}), "name": "b0", "granularity": default_gran, "flags": ["auto"]}
    }
    assert_clean(img)
    assert qemu_dirty(img, "b0") == expected_extents(data + zero, default_gran, size)


# ---------------------------------------------------------------------------- 2. written by QEMU, loaded by qcowfs
@needs_fuse
def test_bitmaps_written_by_qemu_keep_recording(tmp_path, mount, qemu_dirty):
    size = 32 * MiB
    g = 64 * KiB
    img = create(tmp_path / "a.qcow2", size)
    for name in ("qb", "qd", "qd2", "qe", "qc"):
        add_qemu_bitmap(img, name, g)
    qemu_io(img, "write -P 1 0 64k", "write 1M 4k")
    for name in ("qd", "qd2"):
        qemu_img("bitmap", "--disable", img, name)
    qemu_writes = [(0, 64 * KiB), (MiB, 4 * KiB)]
    assert qemu_dirty(img, "qb") == expected_extents(qemu_writes, g, size)
    bms = qemu_bitmaps(img)
    assert bms["qd"]["flags"] == [] and bms["qb"]["flags"] == ["auto"], bms

    m = mount(img)
    assert sorted(os.listdir(m.bitmaps)) == ["qb", "qc", "qd", "qd2", "qe"]
    for name in ("qb", "qe", "qc"):
        st = status(m.bitmaps / name)
        assert st == {
            **st,
            "name": name,
            "granularity": g,
            "count": 2 * g,
            "recording": True,
            "inconsistent": False,
            "persistent": True,
        }
    for name in ("qd", "qd2"):
        st = status(m.bitmaps / name)
        assert st == {
            **st,
            "name": name,
            "granularity": g,
            "count": 2 * g,
            "recording": False,
            "inconsistent": False,
            "persistent": True,
        }

    w1 = [(100000, 10), (MiB + 100, 10), (5 * MiB + 1, 70000)]
    write_ranges(m, w1)
    assert status(m.bitmaps / "qb")["count"] == expected_count(qemu_writes + w1, g, size)
    assert status(m.bitmaps / "qd")["count"] == 2 * g  # disabled: did not record

    command(m.bitmaps / "qd", "enable")
    command(m.bitmaps / "qe", "disable")
    command(m.bitmaps / "qc", "clear")
    assert status(m.bitmaps / "qd")["recording"] is True
    assert status(m.bitmaps / "qe")["recording"] is False
    assert status(m.bitmaps / "qc")["count"] == 0
    w2 = [(9 * MiB, 1), (31 * MiB + 7, 3)]
    write_ranges(m, w2)
    assert status(m.bitmaps / "qd")["count"] == expected_count(qemu_writes + w2, g, size)
    assert status(m.bitmaps / "qe")["count"] == expected_count(qemu_writes + w1, g, size)
    assert status(m.bitmaps / "qc")["count"] == expected_count(w2, g, size)
    assert status(m.bitmaps / "qd2")["count"] == 2 * g
    assert m.unmount() == 0

    bms = qemu_bitmaps(img)
    assert {n: b["flags"] for n, b in bms.items()} == {
        "qb": ["auto"],
        "qd": ["auto"],
        "qd2": [],
        "qe": [],
        "qc": ["auto"],
    }
    assert all(b["granularity"] == g for b in bms.values())
    assert_clean(img)
    assert qemu_dirty(img, "qb") == expected_extents(qemu_writes + w1 + w2, g, size)
    assert qemu_dirty(img, "qd") == expected_extents(qemu_writes + w2, g, size)
    assert qemu_dirty(img, "qd2") == expected_extents(qemu_writes, g, size)
    assert qemu_dirty(img, "qe") == expected_extents(qemu_writes + w1, g, size)
    assert qemu_dirty(img, "qc") == expected_extents(w2, g, size)

    # A second mount without writes stores the same contents again; the disabled bitmap stays disabled.
    m2 = mount(img)
    assert status(m2.bitmaps / "qd2")["recording"] is False
    assert status(m2.bitmaps / "qb")["count"] == expected_count(qemu_writes + w1 + w2, g, size)
    assert m2.unmount() == 0
    assert_clean(img)
    assert qemu_dirty(img, "qb") == expected_extents(qemu_writes + w1 + w2, g, size)
    assert qemu_bitmaps(img)["qd2"]["flags"] == []

    # QEMU opens read-write, loads what qcowfs stored, records its own write on top and stores it again
    qemu_io(img, "write 20M 4k")
    assert qemu_dirty(img, "qb") == expected_extents(
        qemu_writes + w1 + w2 + [(20 * MiB, 4 * KiB)], g, size
    )
    assert qemu_dirty(img, "qd2") == expected_extents(qemu_writes, g, size)
    assert_clean(img)


@needs_fuse
def test_echo_through_a_shell(tmp_path, mount):
    """The literal `echo CMD > .bitmaps/NAME` of the documentation works (O_CREAT|O_TRUNC on an existing file)."""
    img = create(tmp_path / "a.qcow2", 8 * MiB)
    m = mount(img)
    touch(m.bitmaps / "b0")
    write_ranges(m, [(0, 10)])
    assert status(m.bitmaps / "b0")["count"] == 64 * KiB
    run(["bash", "-c", f"echo disable > '{m.bitmaps / 'b0'}'"])
    assert status(m.bitmaps / "b0")["recording"] is False
    run(["bash", "-c", f"echo clear > '{m.bitmaps / 'b0'}'"])
    assert status(m.bitmaps / "b0")["count"] == 0
    # bash names the errno of a failed write (dash's echo says "I/O error" whatever the errno)
    p = run(["bash", "-c", f"echo foo > '{m.bitmaps / 'b0'}'"], check=False)
    assert p.returncode != 0 and "Invalid argument" in p.stderr, p
    assert sorted(os.listdir(m.bitmaps)) == ["b0"]  # O_CREAT on an existing name created nothing
    assert m.unmount() == 0
    assert qemu_bitmaps(img)["b0"]["flags"] == []
    assert_clean(img)


# ---------------------------------------------------------------------------- 3. crash: in_use bitmaps
def _check_inconsistent_then_replace(
    img: Path,
    name: str,
    mount,
    qemu_dirty,
    size: int,
    granularity_after: int,
    scratch: Path,
    earlier=(),
):
    """img holds bitmap `name` flagged in_use (and is otherwise clean): qcowfs must list it inconsistent,
    refuse commands on it, write it back unchanged, and let it be removed and re-created."""
    bms = qemu_bitmaps(img)
    assert "in-use" in bms[name]["flags"], bms
    assert_clean(img)

    m = mount(img)
    assert os.listdir(m.bitmaps) == [name]
    st = status(m.bitmaps / name)
    assert st["inconsistent"] is True and st["recording"] is False, st
    assert st.get("hint"), f"an inconsistent bitmap's status should carry a hint: {st}"
    for cmd in ("clear", "enable", "disable"):
        e = errno_of(command, m.bitmaps / name, cmd)
        assert e in (errno.EBUSY, errno.EPERM), (
            f"echo {cmd} > inconsistent bitmap: {errno.errorcode.get(e, e)}"
        )
    e = errno_of(lambda: os.open(m.bitmaps / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    assert e == errno.EEXIST, errno.errorcode.get(e, e)
    w1 = [(MiB + 3, 5000)]
    write_ranges(m, w1)  # writes still work
    assert status(m.bitmaps / name)["inconsistent"] is True
    assert m.unmount() == 0
    # written back unchanged: still in_use, still not corrupt, nothing leaked by the clean close
    bms = qemu_bitmaps(img)
    assert set(bms) == {name} and "in-use" in bms[name]["flags"], bms
    assert_clean(img)

    m = mount(img)
    assert status(m.bitmaps / name)["inconsistent"] is True
    os.unlink(m.bitmaps / name)
    assert os.listdir(m.bitmaps) == []
    assert not os.path.exists(m.bitmaps / name)
    touch(m.bitmaps / name)
    assert os.listdir(m.bitmaps) == [name]
    st = status(m.bitmaps / name)
    assert st == {
        **st,
        "inconsistent": False,
        "recording": True,
        "count": 0,
        "granularity": granularity_after,
    }
    w2 = [(2 * MiB + 1, 1), (7 * MiB - 5, 10)]
    write_ranges(m, w2)
    assert status(m.bitmaps / name)["count"] == expected_count(w2, granularity_after, size)
    assert m.unmount() == 0

    bms = qemu_bitmaps(img)
    assert bms == {
        name: {**bms[name], "name": name, "granularity": granularity_after, "flags": ["auto"]}
    }, bms
    assert_clean(img)
    assert qemu_dirty(img, name) == expected_extents(w2, granularity_after, size)
    assert_guest_data(img, [*earlier, *w1, *w2], scratch)


@needs_fuse
def test_crash_leaves_bitmap_in_use_and_it_is_replaceable(tmp_path, mount, qemu_dirty):
    size = 16 * MiB
    img = create(tmp_path / "a.qcow2", size)
    m = mount(img)
    touch(m.bitmaps / "b0")
    w0 = [(0, 4096), (3 * MiB + 1, 100)]
    write_ranges(m, w0, fsync=True)
    m.kill()
    bms = qemu_bitmaps(img)
    assert set(bms) == {"b0"}, bms
    # everything was fsynced before the crash: no corruption, no leaks, the data is there
    assert_clean(img)
    assert_guest_data(img, w0, tmp_path)
    _check_inconsistent_then_replace(
        img, "b0", mount, qemu_dirty, size, 64 * KiB, tmp_path, earlier=w0
    )


@needs_fuse
def test_crash_without_fsync_is_not_corrupt(tmp_path, mount):
    size = 16 * MiB
    img = create(tmp_path / "a.qcow2", size)
    m = mount(img)
    touch(m.bitmaps / "b0")
    write_ranges(m, [(0, 4096), (3 * MiB + 1, 100), (9 * MiB, 2 * MiB)], fsync=False)
    m.kill()
    bms = qemu_bitmaps(img)
    assert set(bms) == {"b0"} and "in-use" in bms["b0"]["flags"], bms
    assert_not_corrupt(img)


@needs_fuse
def test_bitmap_left_in_use_by_qemu(tmp_path, mount, qemu_dirty):
    size = 16 * MiB
    img = create(tmp_path / "a.qcow2", size)
    add_qemu_bitmap(img, "qb", 4 * KiB)
    qemu_io(img, "write 0 64k", "abort", check=False)  # abort: QEMU dies with qb in_use
    bms = qemu_bitmaps(img)
    assert "in-use" in bms["qb"]["flags"], f"qemu-io abort should leave qb in use: {bms}"
    # the fresh qb made by touch has the default granularity (cluster size 64 KiB)
    _check_inconsistent_then_replace(img, "qb", mount, qemu_dirty, size, 64 * KiB, tmp_path)


# ---------------------------------------------------------------------------- 4. lifecycle and read-only
@needs_fuse
def test_in_use_while_mounted_and_clear_after(tmp_path, mount):
    img = create(tmp_path / "a.qcow2", 16 * MiB)
    add_qemu_bitmap(img, "qb")
    add_qemu_bitmap(img, "qd", disabled=True)
    assert {n: b["flags"] for n, b in qemu_bitmaps(img).items()} == {"qb": ["auto"], "qd": []}
    m = mount(img)
    touch(m.bitmaps / "b1")
    bms = qemu_bitmaps(img)
    assert set(bms) == {"qb", "qd", "b1"}, bms
    for n, b in bms.items():
        assert "in-use" in b["flags"], f"{n} should be in use while mounted read-write: {bms}"
    assert m.unmount() == 0
    assert {n: b["flags"] for n, b in qemu_bitmaps(img).items()} == {
        "qb": ["auto"],
        "qd": [],
        "b1": ["auto"],
    }
    assert_clean(img)


@needs_fuse
def test_read_only_mount(tmp_path, mount):
    img = create(tmp_path / "a.qcow2", 16 * MiB)
    add_qemu_bitmap(img, "qi")
    qemu_io(img, "write 2M 4k", "abort", check=False)  # leaves qi in use
    add_qemu_bitmap(img, "qb", 64 * KiB)
    add_qemu_bitmap(img, "qd", 4 * KiB, disabled=True)
    qemu_io(img, "write -P 1 0 64k", "write 1M 4k")
    flags = {n: b["flags"] for n, b in qemu_bitmaps(img).items()}
    assert flags == {"qi": ["in-use", "auto"], "qb": ["auto"], "qd": []}, flags
    digest = sha256(img)

    m = mount(img, read_only=True)
    assert sorted(os.listdir(m.bitmaps)) == ["qb", "qd", "qi"]
    st = status(m.bitmaps / "qi")
    assert st["inconsistent"] is True and st["recording"] is False, st
    st = status(m.bitmaps / "qb")
    assert st == {
        **st,
        "name": "qb",
        "granularity": 64 * KiB,
        "count": 2 * 64 * KiB,
        "recording": True,
        "inconsistent": False,
    }
    st = status(m.bitmaps / "qd")
    assert st == {
        **st,
        "name": "qd",
        "granularity": 4 * KiB,
        "count": 0,
        "recording": False,
        "inconsistent": False,
    }
    # nothing is marked in use by a read-only mount
    assert {n: b["flags"] for n, b in qemu_bitmaps(img).items()} == flags
    assert errno_of(lambda: touch_os(m.bitmaps / "new")) == errno.EROFS
    assert errno_of(lambda: os.unlink(m.bitmaps / "qb")) == errno.EROFS
    for cmd in ("clear", "enable", "disable"):
        assert errno_of(command, m.bitmaps / "qb", cmd) == errno.EROFS
    assert errno_of(lambda: os.open(m.disk, os.O_WRONLY)) == errno.EROFS
    assert sorted(os.listdir(m.bitmaps)) == ["qb", "qd", "qi"]
    assert m.unmount() == 0
    assert sha256(img) == digest


def touch_os(path: Path) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o644))


# ---------------------------------------------------------------------------- 5. control semantics
@needs_fuse
def test_control_semantics(tmp_path, mount, qemu_dirty):
    img = create(tmp_path / "a.qcow2", 16 * MiB)
    add_qemu_bitmap(img, "keep")
    m = mount(img)
    touch(m.bitmaps / "b0")
    touch(m.bitmaps / "gone")
    write_ranges(m, [(0, 1), (MiB, 65 * KiB)])

    for bad in ("foo", "", "clear enable", "CLEAR", "merge"):
        e = errno_of(command, m.bitmaps / "b0", bad)
        assert e == errno.EINVAL, f"echo {bad!r}: {errno.errorcode.get(e, e)}"
    assert status(m.bitmaps / "b0")["count"] == 3 * 64 * KiB  # nothing happened

    e = errno_of(lambda: touch_os(m.bitmaps / ("n" * 1024)))
    assert e == errno.ENAMETOOLONG, errno.errorcode.get(e, e)
    for p in (m.mnt / "newdir", m.bitmaps / "newdir"):
        e = errno_of(os.mkdir, p)
        assert e in (errno.EPERM, errno.EACCES), f"mkdir {p}: {errno.errorcode.get(e, e)}"
    e = errno_of(lambda: touch_os(m.mnt / "file"))
    assert e in (errno.EPERM, errno.EACCES), f"create at the root: {errno.errorcode.get(e, e)}"
    e = errno_of(lambda: os.open(m.bitmaps / "b0", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    assert e == errno.EEXIST, errno.errorcode.get(e, e)
    e = errno_of(lambda: os.unlink(m.bitmaps / "nosuch"))
    assert e == errno.ENOENT, errno.errorcode.get(e, e)
    assert sorted(os.listdir(m.mnt)) == [".bitmaps", ".snapshots", "disk.raw"]
    assert sorted(os.listdir(m.bitmaps)) == ["b0", "gone", "keep"]

    os.unlink(m.bitmaps / "gone")
    assert sorted(os.listdir(m.bitmaps)) == ["b0", "keep"]
    assert m.unmount() == 0
    bms = qemu_bitmaps(img)
    assert set(bms) == {"b0", "keep"}, bms
    assert_clean(img)
    assert qemu_dirty(img, "b0") == [(0, 64 * KiB), (MiB, 2 * 64 * KiB)]

    # removing every bitmap drops the extension; QEMU agrees and nothing leaks
    m = mount(img)
    os.unlink(m.bitmaps / "b0")
    os.unlink(m.bitmaps / "keep")
    assert os.listdir(m.bitmaps) == []
    assert m.unmount() == 0
    assert qemu_bitmaps(img) == {}
    assert_clean(img)


@needs_fuse
def test_v2_image_cannot_hold_bitmaps(tmp_path, mount):
    img = create(tmp_path / "v2.qcow2", 8 * MiB, "compat=0.10")
    m = mount(img)
    with pytest.raises(OSError):
        touch_os(m.bitmaps / "b0")
    assert os.listdir(m.bitmaps) == []
    write_ranges(m, [(0, 100)])  # the disk still works
    lines = [ln for ln in m.log_text().splitlines() if "b0" in ln]
    assert any(
        ("version 2" in ln or "compat=0.10" in ln or "v2" in ln) and "bitmap" in ln for ln in lines
    ), f"the daemon log should say a v2 image cannot hold bitmaps:\n{m.log_text()}"
    assert m.unmount() == 0
    assert qemu_info(img)["format-specific"]["data"]["compat"] == "0.10"
    assert_clean(img)


@needs_fuse
def test_many_bitmaps_with_long_names(tmp_path, mount, qemu_dirty):
    """40 bitmaps with 200-byte names (plus a 255-byte one): the directory spans several 4 KiB clusters."""
    size = 16 * MiB
    img = create(tmp_path / "a.qcow2", size, "cluster_size=4096")
    names = [f"{i:02d}-" + chr(ord("a") + i % 26) * 197 for i in range(40)]
    names.append("z" * 255)
    names.append("with space and ü")
    m = mount(img)
    for n in names:
        touch(m.bitmaps / n)
    assert sorted(os.listdir(m.bitmaps)) == sorted(names)
    w = [(5000, 3), (8 * MiB, 10000)]
    write_ranges(m, w)
    for n in (names[0], names[-1], names[-2]):
        assert status(m.bitmaps / n)["count"] == expected_count(w, 4096, size)
    # remove a few in the middle: the directory is rewritten
    for n in names[10:13]:
        os.unlink(m.bitmaps / n)
    kept = names[:10] + names[13:]
    assert sorted(os.listdir(m.bitmaps)) == sorted(kept)
    assert m.unmount() == 0

    bms = qemu_bitmaps(img)
    assert sorted(bms) == sorted(kept)
    assert all(b["granularity"] == 4096 and b["flags"] == ["auto"] for b in bms.values()), bms
    assert_clean(img)
    for n in (kept[0], kept[-1], "z" * 255):
        assert qemu_dirty(img, n) == expected_extents(w, 4096, size)


# ---------------------------------------------------------------------------- 6. no stale kernel cache
@needs_fuse
def test_listing_and_status_are_always_current(tmp_path, mount):
    img = create(tmp_path / "a.qcow2", 16 * MiB)
    m = mount(img)

    def ls() -> list:
        return sorted(
            run(["ls", "-l", m.bitmaps]).stdout.split("\n")[1:-1]
        )  # drop the "total" line

    def ls_size(name: str) -> int:
        sizes = {e.split()[-1]: int(e.split()[4]) for e in ls()}
        return sizes[name]

    assert ls() == []
    assert errno_of(lambda: os.stat(m.bitmaps / "b0")) == errno.ENOENT  # a negative lookup first
    touch(m.bitmaps / "b0")
    entries = ls()
    assert len(entries) == 1 and entries[0].endswith(" b0"), entries
    st = os.stat(m.bitmaps / "b0")
    assert st.st_size == len((m.bitmaps / "b0").read_bytes())

    # stat and ls -l alone (no read in between, which would itself invalidate cached attributes)
    size0 = os.stat(m.bitmaps / "b0").st_size
    assert ls_size("b0") == size0
    write_ranges(m, [(MiB, 1)])  # count 0 -> 65536: the status grows by 4 bytes
    assert ls_size("b0") == size0 + 4, "ls -l shows a stale size after a write"
    assert os.stat(m.bitmaps / "b0").st_size == size0 + 4
    assert status(m.bitmaps / "b0")["count"] == 64 * KiB
    command(m.bitmaps / "b0", "clear")
    assert os.stat(m.bitmaps / "b0").st_size == size0

    fd = os.open(m.bitmaps / "b0", os.O_RDONLY)  # an fd kept open across writes
    try:
        assert json.loads(os.pread(fd, 4096, 0))["count"] == 0
        write_ranges(m, [(0, 1)])
        assert status(m.bitmaps / "b0")["count"] == 64 * KiB
        assert json.loads(os.pread(fd, 4096, 0))["count"] == 64 * KiB
        write_ranges(m, [(15 * MiB, 1)])
        assert status(m.bitmaps / "b0")["count"] == 2 * 64 * KiB
        assert json.loads(os.pread(fd, 4096, 0))["count"] == 2 * 64 * KiB
    finally:
        os.close(fd)
    # the size in ls -l follows the content (a longer count makes a longer file)
    assert os.stat(m.bitmaps / "b0").st_size == len((m.bitmaps / "b0").read_bytes())

    os.unlink(m.bitmaps / "b0")
    assert ls() == []
    assert not os.path.exists(m.bitmaps / "b0")
    assert errno_of(lambda: open(m.bitmaps / "b0")) == errno.ENOENT
    touch(m.bitmaps / "b0")  # the same name again, right away
    assert [e.split()[-1] for e in ls()] == ["b0"]
    assert status(m.bitmaps / "b0")["count"] == 0
    touch(m.bitmaps / "b1")
    assert [e.split()[-1] for e in ls()] == ["b0", "b1"]
    assert m.unmount() == 0
    assert set(qemu_bitmaps(img)) == {"b0", "b1"}
    assert_clean(img)


@needs_fuse
def test_listing_current_after_cli_commands(tmp_path, mount):
    """Changes made through `qcowfs bitmap OP MOUNTPOINT` (not through the VFS) show at once: no cached
    positive or negative dentries, no cached attributes."""
    img = create(tmp_path / "a.qcow2", 16 * MiB)
    m = mount(img)
    cli = [sys.executable, "-m", "qcowfs", "bitmap"]
    assert errno_of(lambda: os.stat(m.bitmaps / "c0")) == errno.ENOENT
    run([*cli, "add", m.mnt, "c0", "-g", "4096"])
    assert os.listdir(m.bitmaps) == ["c0"]
    st = status(m.bitmaps / "c0")
    assert st["granularity"] == 4096 and st["recording"] is True, st
    size0 = os.stat(m.bitmaps / "c0").st_size
    run([*cli, "disable", m.mnt, "c0"])
    assert os.stat(m.bitmaps / "c0").st_size == size0 + 1  # "recording": true -> false
    assert status(m.bitmaps / "c0")["recording"] is False
    run([*cli, "remove", m.mnt, "c0"])
    assert errno_of(lambda: os.stat(m.bitmaps / "c0")) == errno.ENOENT, (
        "a removed bitmap is still visible"
    )
    assert os.listdir(m.bitmaps) == []
    run([*cli, "add", m.mnt, "c0"])  # the same name again: a new bitmap, default granularity
    assert status(m.bitmaps / "c0")["granularity"] == 64 * KiB
    assert m.unmount() == 0
    assert {n: (b["granularity"], b["flags"]) for n, b in qemu_bitmaps(img).items()} == {
        "c0": (64 * KiB, ["auto"])
    }
    assert_clean(img)


# ---------------------------------------------------------------------------- huge sparse disk
@needs_fuse
def test_one_tib_sparse_image_small_rss(tmp_path, mount, qemu_dirty):
    size = TiB
    g = 64 * KiB
    img = tmp_path / "big.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "1T")
    add_qemu_bitmap(img, "big", g)
    m = mount(img)
    touch(m.bitmaps / "b0")
    step = size // 61
    w = [(i * step + (i * 4099) % step, 4096 + i) for i in range(60)] + [
        (size - 3, 3),
        (size // 2 - 1, 2),
    ]
    write_ranges(m, w)
    rss = vm_rss_kib(m.proc.pid)
    assert rss < 100 * 1024, f"daemon VmRSS {rss} KiB on a 1 TiB image"
    for n in ("big", "b0"):
        assert status(m.bitmaps / n)["count"] == expected_count(w, g, size)
    assert m.unmount() == 0
    bms = qemu_bitmaps(img)
    assert {n: (b["granularity"], b["flags"]) for n, b in bms.items()} == {
        "big": (g, ["auto"]),
        "b0": (g, ["auto"]),
    }
    assert_clean(img)
    assert qemu_dirty(img, "big") == expected_extents(w, g, size)
    assert qemu_dirty(img, "b0") == expected_extents(w, g, size)
