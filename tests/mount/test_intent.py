"""Crash-proof bitmaps (`--bitmap-sync=intent`) on real mounts, with QEMU as the oracle.

After kill -9 of the daemon, QEMU must see every intent-mode bitmap as consistent (flags
["auto"], no in-use), and every granule whose content changed must be dirty in QEMU's own
view of the bitmap (qemu-nbd -B + nbdinfo). A clean unmount stores the exact bits; commands
reach the disk before they return.
"""

from __future__ import annotations

import json
import os
import random
import threading
from pathlib import Path

import pytest
from conftest import QCOWFS, assert_clean, needs_fuse, qemu_img, qemu_io, run, wait_for
from support.images import create

from qcowfs_dev.oracles import dirty_extents, qemu_bitmaps, qemu_check, qemu_raw

pytestmark = needs_fuse

KiB, MiB = 1 << 10, 1 << 20
G = 64 * KiB  # bitmap granularity used here
INTENT = ["--bitmap-sync=intent"]


def bitmapped_image(
    tmp_path: Path, size: int = 48 * MiB, bitmaps=("b0",), data: bool = True
) -> Path:
    """a.qcow2 with persistent bitmaps of granularity G."""
    # with data, some of the disk already holds data (overwrites as well as first writes)
    img = create(
        tmp_path / "a.qcow2",
        size,
        writes=["write -P 0x11 0 4M", "write -P 0x22 20M 3M"] if data else (),
    )
    for b in bitmaps:
        qemu_img("bitmap", "--add", "-g", str(G), img, b)
    return img


def granules(extents: list, size: int) -> set:
    out = set()
    for off, length in extents:
        out.update(range(off // G, min((off + length + G - 1) // G, (size + G - 1) // G)))
    return out


def changed_granules(before: bytes, after: bytes) -> set:
    mv_b, mv_a = memoryview(before), memoryview(after)
    return {
        g
        for g in range((len(before) + G - 1) // G)
        if mv_b[g * G : (g + 1) * G] != mv_a[g * G : (g + 1) * G]
    }


def status(m, name: str) -> dict:
    return json.loads((m.bitmaps / name).read_text())


def crash(m) -> None:
    """kill -9 the daemon and detach its dead mount."""
    m.kill()
    assert not m.alive()


def assert_consistent_after_crash(img: Path, names) -> None:
    bms = qemu_bitmaps(img)
    for n in names:
        assert bms[n]["flags"] == ["auto"], f"{n}: {bms[n]} (expected consistent, recording)"
    c = qemu_check(img)
    assert c["rc"] in (0, 3), f"qemu-img check after the crash: {c}"


class Storm(threading.Thread):
    """Random writes (4 KiB .. 1 MiB, some unaligned) until the mount dies."""

    def __init__(self, disk: Path, seed: int, size: int):
        super().__init__(daemon=True)
        self.disk, self.rng, self.size = disk, random.Random(seed), size
        self.writes = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            fd = os.open(self.disk, os.O_RDWR)
        except OSError as e:
            self.error = e
            return
        try:
            while True:
                n = self.rng.choice([4 * KiB, 4 * KiB, 64 * KiB, 300 * KiB, MiB])
                off = self.rng.randrange(0, self.size - n)
                if self.rng.random() < 0.7:
                    off &= ~4095
                os.pwrite(fd, self.rng.randbytes(n), off)
                self.writes += 1
                if self.rng.random() < 0.1:
                    os.fsync(fd)
        except OSError as e:  # the mount died under us
            self.error = e
        finally:
            try:
                os.close(fd)
            except OSError:  # ENOTCONN: the daemon is gone
                pass


@pytest.mark.parametrize("k", [0] + [pytest.param(k, marks=pytest.mark.slow) for k in range(1, 4)])
def test_kill9_during_a_write_storm_leaves_valid_bitmaps(tmp_path, mount, k):
    size = 96 * MiB
    img = bitmapped_image(tmp_path, size)
    before = qemu_raw(img, tmp_path / "before.raw")
    m = mount(img, extra=INTENT)
    assert status(m, "b0")["crash-safe"] is True
    storm = Storm(
        m.disk, 1000 + k, size // 2
    )  # the upper half stays clean: QEMU writes there below
    storm.start()
    target = 20 + 60 * k  # different timing each run
    wait_for(
        lambda: storm.writes >= target or not storm.is_alive(), timeout=60, what=f"{target} writes"
    )
    crash(m)
    storm.join(30)
    assert storm.writes >= target, storm.error
    assert_consistent_after_crash(img, ["b0"])
    after = qemu_raw(img, tmp_path / "after.raw")
    changed = changed_granules(before, after)
    assert changed, "the storm changed nothing that reached the disk"
    dirty = granules(dirty_extents(img, "b0"), size)
    missing = sorted(changed - dirty)
    assert not missing, (
        f"granules changed but not dirty in QEMU's view: {missing[:10]} ({len(missing)})"
    )
    # QEMU opens it read-write and goes on recording into it
    clean_g = next(g for g in range(size // G - 1, 0, -1) if g not in dirty)
    qemu_io(img, f"write -P 0x77 {clean_g * G} 4k")
    assert clean_g in granules(dirty_extents(img, "b0"), size)
    assert qemu_bitmaps(img)["b0"]["flags"] == ["auto"]
    # and the next qcowfs mount, in either mode, loads it consistent and recording
    m2 = mount(img, extra=INTENT if k % 2 else ())
    st = status(m2, "b0")
    assert st["inconsistent"] is False and st["recording"] is True
    assert m2.unmount() == 0
    assert qemu_check(img)["rc"] in (0, 3)  # the crash may have leaked clusters, nothing worse


def test_clean_unmount_stores_the_exact_bits(tmp_path, mount):
    size = 48 * MiB
    img = bitmapped_image(tmp_path, size)
    m = mount(img, extra=INTENT)
    writes = [(5 * MiB + 123, 1000), (30 * MiB, 4 * KiB), (47 * MiB, 200 * KiB)]
    with open(m.disk, "r+b") as f:
        for off, n in writes:
            f.seek(off)
            f.write(b"x" * n)
    want = granules([(o, n) for o, n in writes], size)
    assert status(m, "b0")["count"] == len(want) * G  # in memory: exact, not the coarse intents
    assert m.unmount() == 0
    assert granules(dirty_extents(img, "b0"), size) == want
    assert qemu_bitmaps(img)["b0"]["flags"] == ["auto"]
    assert_clean(img)


def test_bitmap_created_during_the_mount_survives_a_crash(tmp_path, mount):
    size = 48 * MiB
    img = bitmapped_image(tmp_path, size, bitmaps=())
    m = mount(img, extra=["-o", "bitmap_sync=intent"])
    (m.bitmaps / "new").touch()
    assert status(m, "new")["crash-safe"] is True
    run([*QCOWFS, "bitmap", "add", m.mnt, "added", "--granularity", str(G)])
    with open(m.disk, "r+b") as f:
        f.seek(33 * MiB)
        f.write(b"y" * 4096)
    crash(m)
    assert_consistent_after_crash(img, ["new", "added"])
    for n in ("new", "added"):
        ext = dirty_extents(img, n)
        assert 33 * MiB // G in granules(ext, size), f"{n}: {ext}"


def test_commands_reach_the_disk_before_they_return(tmp_path, mount):
    size = 48 * MiB
    img = bitmapped_image(tmp_path, size, bitmaps=("c", "d", "src", "dst", "gone"))
    m = mount(img, extra=INTENT)
    with open(m.disk, "r+b") as f:
        f.seek(10 * MiB)
        f.write(b"z" * 4096)
    (m.bitmaps / "c").write_text("clear\n")
    (m.bitmaps / "d").write_text("disable\n")
    run([*QCOWFS, "bitmap", "disable", m.mnt, "dst"])
    run([*QCOWFS, "bitmap", "clear", m.mnt, "dst"])
    run([*QCOWFS, "bitmap", "merge", m.mnt, "src", "dst"])
    (m.bitmaps / "gone").unlink()
    crash(m)
    bms = qemu_bitmaps(img)
    assert set(bms) == {"c", "d", "src", "dst"}
    assert bms["c"]["flags"] == ["auto"] and bms["src"]["flags"] == ["auto"]
    assert bms["d"]["flags"] == [] and bms["dst"]["flags"] == []
    assert dirty_extents(img, "c") == []
    assert 10 * MiB // G in granules(dirty_extents(img, "src"), size)
    # dst holds src's bits (the exact ones: src's on-disk copy may be coarser)
    assert 10 * MiB // G in granules(dirty_extents(img, "dst"), size)
    assert qemu_check(img)["rc"] in (0, 3)


def test_enable_is_durable_and_records_again(tmp_path, mount):
    size = 48 * MiB
    img = bitmapped_image(tmp_path, size, bitmaps=("e",))
    qemu_img("bitmap", "--disable", img, "e")
    m = mount(img, extra=INTENT)
    assert status(m, "e")["recording"] is False and status(m, "e")["crash-safe"] is True
    (m.bitmaps / "e").write_text("enable\n")
    with open(m.disk, "r+b") as f:
        f.seek(40 * MiB)
        f.write(b"e" * 4096)
    crash(m)
    assert qemu_bitmaps(img)["e"]["flags"] == ["auto"]
    assert 40 * MiB // G in granules(dirty_extents(img, "e"), size)


def test_status_and_list_show_crash_safety(tmp_path, mount):
    img = bitmapped_image(tmp_path, bitmaps=("b0",))
    m = mount(img)
    assert status(m, "b0")["crash-safe"] is False
    out = run([*QCOWFS, "bitmap", "list", m.mnt]).stdout
    assert "in-use-while-open" in out
    assert m.unmount() == 0
    m = mount(img, extra=INTENT)
    rows = json.loads(run([*QCOWFS, "bitmap", "list", m.mnt, "--json"]).stdout)
    assert rows[0]["crash-safe"] is True
    assert "crash-safe" in run([*QCOWFS, "bitmap", "list", m.mnt]).stdout
    (m.bitmaps / "t").touch()  # persistent: crash-safe; a transient one never is
    run([*QCOWFS, "bitmap", "add", m.mnt, "tr", "--transient"])
    assert status(m, "t")["crash-safe"] is True and status(m, "tr")["crash-safe"] is False


def test_bitmaps_qemu_left_in_use_stay_inconsistent(tmp_path, mount):
    img = bitmapped_image(tmp_path, bitmaps=("old",))
    m = mount(img)  # close mode: in_use while mounted
    crash(m)
    assert qemu_bitmaps(img)["old"]["flags"] == ["in-use", "auto"]
    m2 = mount(img, extra=INTENT)
    st = status(m2, "old")
    assert st["inconsistent"] is True and st["crash-safe"] is False
    with open(m2.disk, "r+b") as f:
        f.write(b"q" * 4096)
    assert m2.unmount() == 0
    assert qemu_bitmaps(img)["old"]["flags"] == ["in-use", "auto"]
    assert qemu_check(img)["rc"] in (0, 3)


def test_bad_bitmap_sync_value_is_refused(tmp_path):
    img = bitmapped_image(tmp_path)
    (tmp_path / "m").mkdir()
    p = run([*QCOWFS, "mount", "-o", "bitmap_sync=sometimes", img, tmp_path / "m"], check=False)
    assert (
        p.returncode == 2
        and "bitmap_sync=sometimes" in p.stderr
        and len(p.stderr.strip().splitlines()) == 1
    )
