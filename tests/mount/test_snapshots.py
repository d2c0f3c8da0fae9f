"""Internal snapshots as files, atomic checkpoints, live extents and the README's backup recipe,
on real mounts with QEMU as the oracle."""

from __future__ import annotations

import errno
import json
import os
import random
import subprocess
import threading
from pathlib import Path

import pytest
from conftest import QCOWFS, assert_clean, needs_fuse, qemu_img, qemu_info, qemu_io, run, wait_for
from support.images import create
from support.repo import readme_block

from qcowfs_dev.oracles import qemu_bitmaps, qemu_check, qemu_raw

pytestmark = needs_fuse

KiB, MiB = 1 << 10, 1 << 20
BLOCK = 4 * KiB


def qemu_snapshot_raw(img: Path, snap: str, dest: Path) -> bytes:
    return qemu_raw(img, dest, snapshot=snap)


def snapshot_names(img: Path) -> list:
    return [s["name"] for s in qemu_info(img).get("snapshots", [])]


def test_qemu_snapshot_reads_like_qemu_and_never_changes(tmp_path, mount):
    img = create(tmp_path / "a.qcow2", 32 * MiB)
    qemu_io(img, "write -P 0x11 0 3M", "write -c -P 0x33 8M 1M", "write -z 12M 1M")
    qemu_img("snapshot", "-c", "q1", img)
    qemu_io(img, "write -P 0x22 1M 4M")
    want = qemu_snapshot_raw(img, "q1", tmp_path / "q1.raw")
    m = mount(img)
    snap = m.mnt / ".snapshots" / "q1"
    assert os.listdir(m.mnt / ".snapshots") == ["q1"]
    assert snap.stat().st_size == 32 * MiB
    assert snap.stat().st_mode & 0o222 == 0  # read-only modes
    assert snap.read_bytes() == want
    with open(m.disk, "r+b") as f:  # shared clusters and tables are copied, never changed in place
        for off in range(0, 16 * MiB, 192 * KiB):
            f.seek(off)
            f.write(os.urandom(70 * KiB))
        f.flush()
        os.fsync(f.fileno())
    assert snap.read_bytes() == want
    with pytest.raises(OSError) as e:
        open(snap, "r+b")
    assert e.value.errno in (errno.EROFS, errno.EACCES)
    (m.mnt / ".snapshots" / "q1").unlink()
    assert os.listdir(m.mnt / ".snapshots") == []
    assert m.unmount() == 0
    assert snapshot_names(img) == []
    assert_clean(img)  # no leaks: what only q1 held was freed


class Stream(threading.Thread):
    """4 KiB writes of their own sequence number at random blocks, until stopped."""

    def __init__(self, disk: Path, nblocks: int, seed: int):
        super().__init__(daemon=True)
        self.disk, self.nblocks, self.rng = disk, nblocks, random.Random(seed)
        self.log: list = []  # (seq, block) in completion order
        self.stop = threading.Event()

    def run(self) -> None:
        fd = os.open(self.disk, os.O_RDWR)
        try:
            seq = 1
            while not self.stop.is_set():
                b = self.rng.randrange(self.nblocks)
                os.pwrite(fd, seq.to_bytes(8, "little") * (BLOCK // 8), b * BLOCK)
                self.log.append((seq, b))
                seq += 1
        finally:
            os.close(fd)


def test_snapshot_taken_during_a_write_stream_is_one_instant(tmp_path, mount):
    nblocks = 2048
    img = create(tmp_path / "a.qcow2", nblocks * BLOCK)
    m = mount(img)
    s = Stream(m.disk, nblocks, 7)
    s.start()
    wait_for(lambda: len(s.log) > 3000, timeout=60, what="writes before the snapshot")
    (m.mnt / ".snapshots" / "mid").touch()
    wait_for(lambda: len(s.log) > 6000, timeout=60, what="writes after the snapshot")
    s.stop.set()
    s.join()
    data = (m.mnt / ".snapshots" / "mid").read_bytes()
    seen = [int.from_bytes(data[b * BLOCK : b * BLOCK + 8], "little") for b in range(nblocks)]
    cut = max(seen) + 1  # the snapshot fell between write cut-1 and write cut
    assert 3000 < cut < len(s.log), cut
    want = [0] * nblocks
    for seq, b in s.log:
        if seq < cut:
            want[b] = seq
    assert seen == want, "the snapshot is not disk.raw as of one instant between two requests"
    live = m.disk.read_bytes()
    assert m.unmount() == 0
    assert "mid" in snapshot_names(img)
    assert qemu_snapshot_raw(img, "mid", tmp_path / "mid.raw") == data
    assert qemu_raw(img, tmp_path / "live.raw") == live
    assert_clean(img)


def test_snapshot_names_info_and_refusals(tmp_path, mount):
    img = create(tmp_path / "a.qcow2", 32 * MiB)
    qemu_img("snapshot", "-c", "with/slash", img)
    qemu_img("snapshot", "-c", "twin", img)
    m = mount(img)
    (m.mnt / ".snapshots" / "mine").touch()
    names = sorted(os.listdir(m.mnt / ".snapshots"))
    assert names == ["1", "mine", "twin"]  # '/' cannot be in a file name: the ID stands in
    with pytest.raises(OSError) as e:  # an existing name: EEXIST
        os.open(m.mnt / ".snapshots" / "twin", os.O_CREAT | os.O_EXCL | os.O_RDONLY)
    assert e.value.errno == errno.EEXIST
    assert m.unmount() == 0
    got = json.loads(run([*QCOWFS, "info", "--json", img]).stdout)["snapshots"]
    assert got == qemu_info(img)["snapshots"]
    m = mount(img, read_only=True)
    assert sorted(os.listdir(m.mnt / ".snapshots")) == names
    for op in (
        lambda: (m.mnt / ".snapshots" / "new").touch(),
        lambda: (m.mnt / ".snapshots" / "mine").unlink(),
    ):
        with pytest.raises(OSError) as e:
            op()
        assert e.value.errno in (errno.EROFS, errno.EACCES)


def test_no_internal_snapshots_with_an_external_data_file(tmp_path, mount):
    img = create(tmp_path / "a.qcow2", 32 * MiB, f"data_file={tmp_path / 'a.data'}")
    m = mount(img)
    with pytest.raises(OSError) as e:
        (m.mnt / ".snapshots" / "s").touch()
    assert e.value.errno == errno.EOPNOTSUPP
    assert "external data file" in m.log_text()
    p = run([*QCOWFS, "checkpoint", m.mnt, "c1"], check=False)
    assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1
    assert "c1" not in os.listdir(m.bitmaps)  # all or nothing


def test_checkpoint_is_atomic_and_durable(tmp_path, mount):
    img = create(tmp_path / "a.qcow2", 32 * MiB)
    qemu_img("bitmap", "--add", img, "b0")
    m = mount(img)
    with open(m.disk, "r+b") as f:
        f.write(b"a" * 65536)
    before = qemu_bitmaps(img)
    p = run(
        [*QCOWFS, "checkpoint", m.mnt, "c1", "--disable", "b0", "--disable", "nope"], check=False
    )
    assert p.returncode == 1 and "no such bitmap" in p.stderr
    assert os.listdir(m.mnt / ".snapshots") == [] and sorted(os.listdir(m.bitmaps)) == ["b0"]
    assert qemu_bitmaps(img) == before
    done = json.loads(run([*QCOWFS, "checkpoint", m.mnt, "c1", "--disable", "b0", "--json"]).stdout)
    assert (
        done["snapshot"]["name"] == "c1" and done["bitmap"] == "c1" and done["disabled"] == ["b0"]
    )
    m.kill()  # right after it returned: everything is on disk
    assert "c1" in snapshot_names(img)
    assert set(qemu_bitmaps(img)) == {"b0", "c1"}
    assert qemu_bitmaps(img)["b0"]["flags"] == [
        "in-use"
    ]  # disabled (close mode: in use while open)
    assert qemu_check(img)["rc"] in (0, 3)


def test_live_extents_equal_the_offline_ones(tmp_path, mount):
    img = create(tmp_path / "a.qcow2", 64 * MiB)
    qemu_img("bitmap", "--add", "-g", "4096", img, "fine")
    m = mount(img)
    rng = random.Random(3)
    with open(m.disk, "r+b") as f:
        for _ in range(2500):  # many runs: the live listing comes in several pieces
            f.seek(rng.randrange(0, 64 * MiB // 4096) * 4096)
            f.write(b"x" * 100)
    live = json.loads(run([*QCOWFS, "bitmap", "extents", m.mnt, "fine", "--json"]).stdout)
    assert len(live) > 1500
    text = run([*QCOWFS, "bitmap", "extents", m.mnt, "fine"]).stdout
    assert len(text.splitlines()) == len(live)
    assert m.unmount() == 0
    assert json.loads(run([*QCOWFS, "bitmap", "extents", img, "fine", "--json"]).stdout) == live


def test_backup_recipe_from_the_readme(tmp_path, mount):
    """Three checkpoints with random writes between them; after each step the backup equals
    that checkpoint's snapshot; the disabled bitmaps hold exactly the writes between their
    checkpoints, the newest one the writes after it."""
    size = 32 * MiB
    img = create(tmp_path / "a.qcow2", size)
    qemu_io(img, "write -P 0x5a 0 8M")
    m = mount(img, extra=["--bitmap-sync=intent"])
    backup = tmp_path / "backup.raw"
    recipe = readme_block("sh", "backup recipe").replace(
        "MNT=/mnt/vm BACKUP=/backup/vm.raw", f"MNT={m.mnt} BACKUP={backup}"
    )
    full, incremental = recipe.split("# each incremental backup", 1)
    setting = f"MNT={m.mnt} BACKUP={backup}\n"
    incremental = (
        setting + "# each incremental backup" + incremental.rsplit("incremental c1 c2", 1)[0]
    )
    env = dict(os.environ, PATH=f"{Path(QCOWFS[0]).parent}:{os.environ['PATH']}")
    rng = random.Random(11)

    def writes(n) -> set:
        touched = set()
        with open(m.disk, "r+b") as f:
            for _ in range(n):
                off = rng.randrange(0, size - 70 * KiB)
                ln = rng.randrange(1, 70 * KiB)
                f.seek(off)
                f.write(os.urandom(ln) if rng.random() < 0.8 else bytes(ln))
                touched.update(range(off // 65536, (off + ln - 1) // 65536 + 1))
        return touched

    def sh(script: str) -> None:
        p = subprocess.run(["bash", "-euc", script], env=env, capture_output=True, text=True)
        assert p.returncode == 0, p.stderr

    writes(40)
    sh(full)
    # the backup is the disk as of checkpoint c1: compare with what was written, through QEMU later
    state = {"c1": (m.mnt / "disk.raw").read_bytes()}  # nothing was written since the checkpoint
    assert backup.read_bytes() == state["c1"], (
        "the full backup differs from the disk at checkpoint c1"
    )
    names = ["c1", "c2", "c3", "c4"]
    for prev, new in zip(names, names[1:]):
        touched = writes(60)
        state[new] = (m.mnt / "disk.raw").read_bytes()
        dirty = set()
        for e in json.loads(run([*QCOWFS, "bitmap", "extents", m.mnt, prev, "--json"]).stdout):
            if e["dirty"]:
                dirty.update(range(e["start"] // 65536, (e["start"] + e["length"]) // 65536))
        assert dirty == touched, (
            f"bitmap {prev} does not hold exactly the writes since checkpoint {prev}"
        )
        sh(incremental + f"\nincremental {prev} {new}\n")
        ref = tmp_path / f"{new}.raw"
        ref.write_bytes(state[new])
        c = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", backup, ref], check=False)
        assert c.returncode == 0, (
            f"backup after {new} differs from the disk at checkpoint {new}: {c.stdout}"
        )
    after = writes(10)
    st = json.loads((m.bitmaps / "c4").read_text())
    assert st["count"] == len(after) * 65536 and st["recording"]
    assert sorted(os.listdir(m.bitmaps)) == ["c4"] and os.listdir(m.mnt / ".snapshots") == []
    assert m.unmount() == 0
    assert_clean(img)


def test_snapshot_with_vm_state_from_savevm(tmp_path, mount):
    """A snapshot QEMU's savevm made (VM state stored past the disk's end in its L1) is listed,
    reads like qemu-img convert -l, and deleting it frees the VM state too."""
    img = create(tmp_path / "a.qcow2", 32 * MiB)
    qemu_io(img, "write -P 0x44 0 2M")
    p = subprocess.run(
        [
            "qemu-system-x86_64",
            "-machine",
            "none",
            "-nodefaults",
            "-display",
            "none",
            "-monitor",
            "stdio",
            "-drive",
            f"if=none,id=d0,file={img},format=qcow2",
        ],
        input="savevm vm1\nquit\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    (snap,) = qemu_info(img)["snapshots"]
    assert snap["name"] == "vm1" and snap["vm-state-size"] > 0
    want = qemu_snapshot_raw(img, "vm1", tmp_path / "vm1.raw")
    qemu_io(img, "write -P 0x55 0 1M")
    m = mount(img)
    assert (m.mnt / ".snapshots" / "vm1").read_bytes() == want
    (m.mnt / ".snapshots" / "vm1").unlink()
    assert m.unmount() == 0
    assert snapshot_names(img) == []
    assert_clean(img)  # the VM state's clusters were freed with it
