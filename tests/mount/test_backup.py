"""`qcowfs backup`: chains of a full and incremental backups, made live (while a writer runs)
and offline, checked point by point with qemu-img compare/check; restore and pruning with QEMU's
tools; verify; the reasons for a full backup; kill -9 of the command and of the daemon at random
points; ENOSPC in the backup directory."""

from __future__ import annotations

import fcntl
import json
import os
import random
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Optional

import pytest
from conftest import QCOWFS, needs_fuse, qemu_img, qemu_io, run, wait_for
from support.images import create
from support.loops import loop_device, mounted_fs
from support.syscalls import fallocate

from qcowfs_dev.mounts import detach, is_mounted
from qcowfs_dev.oracles import assert_clean, qemu_bitmaps, qemu_check, qemu_info, qemu_raw

pytestmark = needs_fuse

KiB, MiB = 1 << 10, 1 << 20
FALLOC_PUNCH = 0x02 | 0x01  # PUNCH_HOLE | KEEP_SIZE


def backup(source, directory, *args: str, check: bool = True) -> dict[str, Any]:
    p = subprocess.run(
        [*QCOWFS, "backup", str(source), str(directory), "--json", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if check:
        assert p.returncode == 0, p.stderr
        return json.loads(p.stdout)
    return {"rc": p.returncode, "stderr": p.stderr}


def assert_point(directory: Path, name: str, state: bytes, tmp: Path) -> None:
    """DIR/NAME.qcow2 with its chain reads as `state`, and every file of it is a clean image."""
    raw = tmp / f"{name}.want.raw"
    raw.write_bytes(state)
    p = subprocess.run(
        [
            "qemu-img",
            "compare",
            "-f",
            "qcow2",
            "-F",
            "raw",
            str(directory / f"{name}.qcow2"),
            str(raw),
        ],
        capture_output=True,
        text=True,
    )
    raw.unlink()
    assert p.returncode == 0, (
        f"backup {name} does not read as the disk at its checkpoint: {p.stdout}"
    )
    assert_clean(directory / f"{name}.qcow2")


def random_changes(path: Path, rng: random.Random, size: int, n: int = 30) -> None:
    """Writes of random data and of zeros, and discards, anywhere in the disk."""
    with open(path, "r+b") as f:
        for _ in range(n):
            off = rng.randrange(0, size - 300 * KiB)
            ln = rng.choice([512, 4 * KiB, 65 * KiB, 200 * KiB])
            what = rng.random()
            if what < 0.15:
                f.flush()
                fallocate(f.fileno(), FALLOC_PUNCH, off // 4096 * 4096, 128 * KiB)
            else:
                f.seek(off)
                f.write(bytes(ln) if what < 0.3 else rng.randbytes(ln))
        f.flush()
        os.fsync(f.fileno())


class Writer(threading.Thread):
    """Random writes into disk.raw until stopped; the test holds `gate` to have none in flight."""

    def __init__(self, disk: Path, size: int, seed: int):
        super().__init__(daemon=True)
        self.disk, self.size = disk, size
        self.rng = random.Random(seed)
        self.gate = threading.Lock()
        self.done = threading.Event()
        self.writes = 0
        self.error: Optional[BaseException] = None

    def run(self) -> None:
        try:
            fd = os.open(self.disk, os.O_WRONLY)
            try:
                while not self.done.is_set():
                    with self.gate:
                        off = self.rng.randrange(0, self.size // 4096 - 16) * 4096
                        os.pwrite(fd, self.rng.randbytes(self.rng.choice([4096, 65536])), off)
                        self.writes += 1
            finally:
                os.close(fd)
        except BaseException as e:  # reported by the test
            self.error = e


def live_backup(m, directory: Path, writer: Writer, name: str, *args: str) -> tuple[dict, bytes]:
    """A backup of a running mount while `writer` writes: the disk is read with the writer held
    back, the backup started, and the writer let go as soon as the checkpoint exists (snapshot
    NAME appears) or the command is done. Returns (its JSON, the disk at the checkpoint)."""
    with writer.gate:
        state = m.disk.read_bytes()
        before = writer.writes
        p = subprocess.Popen(
            [*QCOWFS, "backup", str(m.mnt), str(directory), "--json", "--name", name, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        wait_for(
            lambda: (m.mnt / ".snapshots" / name).exists() or p.poll() is not None,
            timeout=60,
            what=f"checkpoint {name}",
        )
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    assert writer.writes >= before
    return json.loads(out), state


@pytest.mark.slow  # in the full run, not in --quick (test_restore_and_pruning covers a chain)
def test_chain_live_with_a_writer_then_offline(tmp_path, mount):
    """A full and 4 incremental backups of a running disk while a writer writes (random writes,
    zeros, discards, a grow between them), then 2 offline: every point reads as the disk at its
    checkpoint in QEMU, every file is clean, verify passes, a backup mounts read-only and reads
    the same; verify finds a flipped byte."""
    size = 96 * MiB
    img = create(
        tmp_path / "src.qcow2",
        size,
        writes=["write -P 0x11 0 20M", "write -c -P 0x22 40M 1M", "write -z 50M 2M"],
    )
    d = tmp_path / "backups"
    m = mount(img, extra=["--bitmap-sync=intent"])
    rng = random.Random(22)
    writer = Writer(m.disk, size, 5)
    writer.start()
    states: dict[str, bytes] = {}
    results: dict[str, dict] = {}
    try:
        for i, name in enumerate(["p0", "p1", "p2", "p3", "p4"]):
            if i:
                with writer.gate:
                    random_changes(m.disk, rng, size)
                    if i == 2:  # grow the disk by 16 MiB, then write into the new part
                        os.truncate(m.disk, size + 16 * MiB)
                        with open(m.disk, "r+b") as f:
                            f.seek(size + 3 * MiB)
                            f.write(rng.randbytes(300 * KiB))
                if i == 2:
                    size += 16 * MiB
                    writer.size = size
            results[name], states[name] = live_backup(m, d, writer, name)
    finally:
        writer.done.set()
        writer.join()
    assert writer.error is None, writer.error
    assert writer.writes > 0
    assert m.unmount() == 0
    assert [results[n]["kind"] for n in states] == ["full"] + ["incremental"] * 4
    assert results["p0"]["why_full"] == "no earlier backup in this directory"
    assert results["p3"]["backing"] == "p2.qcow2" and results["p3"]["why_full"] is None
    assert set(results["p1"]) >= {"name", "file", "kind", "backing", "bytes", "extents", "seconds"}
    assert results["p1"]["file"] == str(d / "p1.qcow2")
    # offline: QEMU writes, qcowfs backs the image up with no mount
    for name in ["q5", "q6"]:
        qemu_io(img, f"write -P 0x{rng.randrange(256):02x} {rng.randrange(size // MiB - 2)}M 1M")
        qemu_io(img, f"write -z {rng.randrange(size // MiB - 2)}M 512k")
        results[name] = backup(img, d, "--name", name)
        states[name] = qemu_raw(img, tmp_path / "now.raw")
        assert results[name]["kind"] == "incremental", results[name]
    for name, state in states.items():
        assert_point(d, name, state, tmp_path)
        assert run([*QCOWFS, "check", str(d / f"{name}.qcow2")]).returncode == 0
    assert_clean(img)
    assert run([*QCOWFS, "check", str(img)]).returncode == 0
    # the source keeps exactly the newest backup's bitmap, and no snapshot
    assert set(qemu_bitmaps(img)) == {"q6"}
    assert not qemu_info(img).get("snapshots")
    listing = json.loads(run([*QCOWFS, "backup", "list", str(d), "--json"]).stdout)
    assert [(r["name"], r["kind"], r["state"]) for r in listing] == [
        (n, "full" if n == "p0" else "incremental", "complete") for n in states
    ]
    v = run([*QCOWFS, "backup", "verify", str(d)])
    assert v.returncode == 0, v.stdout + v.stderr
    assert v.stdout.count(": ok") == len(states)
    # file-level restore: a backup mounted read-only reads as the disk at its checkpoint
    r = mount(d / "p3.qcow2", read_only=True)
    assert r.disk.read_bytes() == states["p3"]
    assert r.unmount() == 0
    # bit rot: one byte of a data cluster of p2 flipped
    data = [
        e
        for e in json.loads(qemu_img("map", "--output=json", str(d / "p2.qcow2")).stdout)
        if e["data"] and e["depth"] == 0 and "offset" in e
    ]
    assert data
    with open(d / "p2.qcow2", "r+b") as f:
        f.seek(data[0]["offset"] + 100)
        b = f.read(1)
        f.seek(data[0]["offset"] + 100)
        f.write(bytes([b[0] ^ 0x40]))
    v = run([*QCOWFS, "backup", "verify", str(d)], check=False)
    assert v.returncode == 2, v.stdout + v.stderr
    damaged = [line for line in v.stdout.splitlines() if "DAMAGED" in line]
    # p2 is damaged; a later point is too when it still reads that cluster through its backing
    # chain (whether a later backup rewrote the cluster depends on the live writer's timing)
    assert damaged and damaged[0].startswith("p2: DAMAGED"), v.stdout
    assert v.stdout.startswith("p0: ok") and "\np1: ok" in v.stdout, v.stdout
    # the table has one crc32 per source cluster (64 KiB): verify names the one that holds it
    where = f"offset {data[0]['start'] // (64 * KiB) * 64 * KiB})"
    assert all(where in line for line in damaged), damaged
    one = run([*QCOWFS, "backup", "verify", str(d), "p1"])
    assert one.returncode == 0 and one.stdout.count(": ok") == 2, one.stdout  # p0, p1


def test_restore_and_pruning_with_qemu_tools(tmp_path):
    """Restore: qemu-img convert of a chain gives the disk; qemu-img commit of a copied chain
    into its full gives the disk. Pruning: a safe qemu-img rebase takes a middle backup and the
    oldest full out of the chain; every remaining point still reads right, verify passes and the
    next backup is still incremental."""
    size = 32 * MiB
    img = create(tmp_path / "src.qcow2", size, writes=["write -P 0x31 0 8M"])
    d = tmp_path / "b"
    rng = random.Random(7)
    states = {}
    for i in range(5):
        if i:
            for _ in range(6):
                qemu_io(
                    img,
                    f"write -P 0x{rng.randrange(1, 256):02x} {rng.randrange(size // KiB - 256)}k 192k",
                )
            qemu_io(img, f"discard {rng.randrange(size // MiB - 1)}M 1M")
        name = f"n{i}"
        backup(img, d, "--name", name)
        states[name] = qemu_raw(img, tmp_path / "now.raw")
    # restore the newest point with qemu-img convert
    qemu_img("convert", "-O", "raw", str(d / "n4.qcow2"), str(tmp_path / "restored.raw"))
    assert (tmp_path / "restored.raw").read_bytes() == states["n4"]
    # restore by merging a copy of the chain down into its full backup
    scratch = tmp_path / "scratch"
    shutil.copytree(d, scratch)
    for name in ["n4", "n3", "n2", "n1"]:
        qemu_img("commit", "-q", str(scratch / f"{name}.qcow2"))
    assert qemu_raw(scratch / "n0.qcow2", tmp_path / "c.raw") == states["n4"]
    # prune n2 (a middle one): n3 takes what it needs of n2, then n2 goes
    qemu_img("rebase", "-b", "n1.qcow2", "-F", "qcow2", str(d / "n3.qcow2"))
    (d / "n2.qcow2").unlink()
    (d / "n2.json").unlink()
    # prune n0 (the full one): n1 becomes a full backup, then n0 goes
    qemu_img("rebase", "-b", "", str(d / "n1.qcow2"))
    (d / "n0.qcow2").unlink()
    (d / "n0.json").unlink()
    for name in ["n1", "n3", "n4"]:
        assert_point(d, name, states[name], tmp_path)
    v = run([*QCOWFS, "backup", "verify", str(d)])
    assert v.returncode == 0, v.stdout + v.stderr
    qemu_io(img, "write -P 0x99 20M 1M")
    out = backup(img, d, "--name", "n5")
    assert out["kind"] == "incremental" and out["backing"] == "n4.qcow2"
    assert_point(d, "n5", qemu_raw(img, tmp_path / "now.raw"), tmp_path)
    # pruned away: list shows what is there
    listing = json.loads(run([*QCOWFS, "backup", "list", str(d), "--json"]).stdout)
    assert [r["name"] for r in listing] == ["n1", "n3", "n4", "n5"]


def test_full_backup_when_the_chain_cannot_continue(tmp_path, mount):
    """Each reason an incremental is impossible gives a full backup that says why, and the
    result is still right: --full, a bitmap removed, a bitmap inconsistent after kill -9 of a
    close-mode mount, a backup file missing from the chain."""
    size = 16 * MiB
    img = create(tmp_path / "src.qcow2", size, writes=["write -P 0x41 0 4M"])
    d = tmp_path / "b"
    assert backup(img, d, "--name", "a")["kind"] == "full"
    out = backup(img, d, "--name", "b", "--full")
    assert (out["kind"], out["why_full"]) == ("full", "--full was given")
    assert set(qemu_bitmaps(img)) == {"b"}
    run([*QCOWFS, "bitmap", "remove", str(img), "b"], check=True)
    out = backup(img, d, "--name", "c")
    assert out["kind"] == "full" and "bitmap b of the last backup is gone" in out["why_full"]
    # kill -9 of a close-mode mount leaves bitmap c inconsistent
    m = mount(img)
    with open(m.disk, "r+b") as f:
        f.seek(5 * MiB)
        f.write(b"\x55" * 65536)
    m.proc.send_signal(signal.SIGKILL)
    m.proc.wait()
    detach(m.mnt, lazy_only=True)
    assert "in-use" in qemu_bitmaps(img)["c"]["flags"]
    out = backup(img, d, "--name", "d")
    assert out["kind"] == "full" and "inconsistent" in out["why_full"], out
    assert set(qemu_bitmaps(img)) == {"d"}  # the inconsistent one is gone too
    assert_point(d, "d", qemu_raw(img, tmp_path / "now.raw"), tmp_path)
    qemu_io(img, "write -P 0x42 1M 1M")
    assert backup(img, d, "--name", "e")["kind"] == "incremental"
    (d / "d.qcow2").unlink()
    qemu_io(img, "write -P 0x43 2M 1M")
    out = backup(img, d, "--name", "f")
    assert out["kind"] == "full" and "d.qcow2" in out["why_full"] and "missing" in out["why_full"]
    assert_point(d, "f", qemu_raw(img, tmp_path / "now.raw"), tmp_path)
    # errors are one line and change nothing
    bad = backup(img, d, "--name", "f", check=False)
    assert bad["rc"] == 1 and bad["stderr"].count("\n") == 1 and "exists already" in bad["stderr"]
    bad = backup(tmp_path / "nope.qcow2", d, check=False)
    assert bad["rc"] == 1 and "no such file" in bad["stderr"]
    r = mount(img, read_only=True)  # a refused checkpoint leaves nothing behind
    bad = backup(r.mnt, d, check=False)
    assert bad["rc"] == 1 and "read-only" in bad["stderr"] and bad["stderr"].count("\n") == 1, bad
    assert r.unmount() == 0
    assert not list(d.glob(".*"))
    held = os.open(d, os.O_RDONLY | os.O_DIRECTORY)  # another run holds DIR
    try:
        fcntl.flock(held, fcntl.LOCK_EX)
        bad = backup(img, d, check=False)
        assert bad["rc"] == 1 and "another qcowfs backup is writing" in bad["stderr"], bad
    finally:
        os.close(held)
    assert _complete(d) == ["a", "b", "c", "e", "f"]


def _complete(d: Path) -> list[str]:
    return sorted(p.name[: -len(".qcow2")] for p in d.glob("*.qcow2"))


@pytest.mark.slow  # kill -9 storms: in the full run, not in --quick
@pytest.mark.parametrize("where", ["offline", "live"])
def test_kill_9_of_the_command_at_random_points(tmp_path, mount, where):
    """The backup command killed at random points, again and again: the backups that completed
    are right, nothing half-written has a final name, and the next completed backup is an
    incremental that holds every change since the last completed one."""
    size = 64 * MiB
    img = create(tmp_path / "src.qcow2", size, writes=["write -P 0x51 0 40M"])
    d = tmp_path / "b"
    m = mount(img, extra=["--bitmap-sync=intent"]) if where == "live" else None
    source = m.mnt if m else img
    disk = m.disk if m else None
    rng = random.Random(61 if m else 62)
    states: dict[str, bytes] = {}

    def change() -> bytes:
        if disk is not None:
            random_changes(disk, rng, size, 10)
            return disk.read_bytes()
        qemu_io(img, f"write -P 0x{rng.randrange(256):02x} {rng.randrange(size // MiB - 1)}M 1M")
        return qemu_raw(img, tmp_path / "now.raw")

    states["k0"] = change()
    backup(source, d, "--name", "k0")
    states["k1"] = change()
    t = time.monotonic()
    backup(source, d, "--name", "k1")
    span = (time.monotonic() - t) * 1.1  # how long an incremental takes here, and a bit
    interrupted = 0
    for i in range(2, 14):
        name = f"k{i}"
        states[name] = change()
        p = subprocess.Popen(
            [*QCOWFS, "backup", str(source), str(d), "--name", name],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(rng.uniform(0, span))  # a random point of the run, not a wait for something
        p.send_signal(signal.SIGKILL)
        p.wait()
        interrupted += name not in _complete(d)
        for n in _complete(d):
            assert_point(d, n, states[n], tmp_path)
        for f in d.iterdir():  # nothing but complete files under final names
            assert f.name.startswith(".") or f.suffix in (".qcow2", ".json"), f
            if f.suffix == ".json":
                assert (d / f"{f.stem}.qcow2").exists() or (d / f".{f.stem}.pending").exists()
    assert interrupted >= 4, f"only {interrupted} of 12 runs were killed before they completed"
    states["last"] = change()
    out = backup(source, d, "--name", "last")
    assert out["kind"] == "incremental", out
    assert_point(d, "last", states["last"], tmp_path)
    v = run([*QCOWFS, "backup", "verify", str(d)])
    assert v.returncode == 0, v.stdout
    if m is not None:
        assert m.unmount() == 0
    assert set(qemu_bitmaps(img)) == {"last"}
    assert not qemu_info(img).get("snapshots")
    assert not list(d.glob(".*"))  # no pending markers, no parts
    if m is not None:
        assert_clean(img)  # the daemon did every change to the image, and closed it cleanly
    else:
        # the command itself changed the image (checkpoint, drops) and was killed: leaks at most
        res = qemu_check(img)
        assert res["rc"] in (0, 3) and not res.get("corruptions"), res


@pytest.mark.slow  # kill -9 storms: in the full run, not in --quick
def test_kill_9_of_the_daemon_during_backups(tmp_path, mount):
    """Intent mode: the daemon killed at random points of backups; after each, the image is
    mounted again and the completed backups checked; the last backup is still incremental and
    holds every change."""
    size = 64 * MiB
    img = create(tmp_path / "src.qcow2", size, writes=["write -P 0x61 0 40M"])
    d = tmp_path / "b"
    rng = random.Random(71)
    states: dict[str, bytes] = {}
    m = mount(img, extra=["--bitmap-sync=intent"])
    random_changes(m.disk, rng, size, 10)
    states["d0"] = m.disk.read_bytes()
    t = time.monotonic()
    backup(m.mnt, d, "--name", "d0")
    span = time.monotonic() - t + 0.2
    interrupted = 0
    for i in range(1, 7):
        name = f"d{i}"
        random_changes(m.disk, rng, size, 10)
        states[name] = m.disk.read_bytes()
        p = subprocess.Popen(
            [*QCOWFS, "backup", str(m.mnt), str(d), "--name", name],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(rng.uniform(0, span))  # a random point of the run
        m.proc.send_signal(signal.SIGKILL)
        m.proc.wait()
        p.wait(timeout=60)
        interrupted += name not in _complete(d)
        if is_mounted(m.mnt):
            detach(m.mnt, lazy_only=True)
        for n in _complete(d):
            assert_point(d, n, states[n], tmp_path)
        assert all(not b["flags"] or b["flags"] == ["auto"] for b in qemu_bitmaps(img).values())
        m = mount(img, extra=["--bitmap-sync=intent"])
    assert interrupted >= 2, f"only {interrupted} of 6 runs were cut short by the daemon's death"
    random_changes(m.disk, rng, size, 10)
    states["end"] = m.disk.read_bytes()
    out = backup(m.mnt, d, "--name", "end")
    assert out["kind"] == "incremental", out
    assert_point(d, "end", states["end"], tmp_path)
    assert m.unmount() == 0
    assert set(qemu_bitmaps(img)) == {"end"}
    assert not qemu_info(img).get("snapshots")


@pytest.mark.slow
def test_enospc_in_the_backup_directory(tmp_path):
    """A backup that runs out of space fails with one line, leaves the chain and the source as
    they were (but for its bitmap, which the next run merges), and the next backup, with room
    again, holds every change."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    size = 32 * MiB
    img = create(tmp_path / "src.qcow2", size, writes=["write -P 0x71 0 6M"])
    d = tmp_path / "small"
    d.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(d)], check=True)
    try:
        backup(img, d, "--name", "e0")
        qemu_io(img, "write -P 0x72 8M 12M")
        bad = backup(img, d, "--name", "e1", check=False)
        assert bad["rc"] == 1 and bad["stderr"].count("\n") == 1, bad
        assert "No space left on device" in bad["stderr"]
        assert _complete(d) == ["e0"] and not list(d.glob(".*.part"))
        assert not qemu_info(img).get("snapshots")
        assert run([*QCOWFS, "backup", "verify", str(d)]).returncode == 0
        subprocess.run(["mount", "-o", "remount,size=64m", str(d)], check=True)
        qemu_io(img, "write -P 0x73 30M 1M")
        out = backup(img, d, "--name", "e2")
        assert out["kind"] == "incremental", out
        assert_point(d, "e2", qemu_raw(img, tmp_path / "now.raw"), tmp_path)
        assert set(qemu_bitmaps(img)) == {"e2"}
    finally:
        subprocess.run(["umount", str(d)], check=False)


def test_progress_line_on_a_terminal(tmp_path):
    """On a terminal the backup shows done/total bytes, rate and time left, as convert -p."""
    import pty

    img = create(tmp_path / "src.qcow2", 64 * MiB, writes=["write -P 0x81 0 48M"])
    primary, secondary = pty.openpty()
    try:
        p = subprocess.run(
            [*QCOWFS, "backup", str(img), str(tmp_path / "b")],
            stdout=subprocess.PIPE,
            stderr=secondary,
            text=True,
            timeout=60,
        )
        os.close(secondary)
        secondary = -1
        seen = b""
        while True:
            try:
                chunk = os.read(primary, 4096)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
    finally:
        if secondary >= 0:
            os.close(secondary)
        os.close(primary)
    assert p.returncode == 0
    text = seen.decode()
    assert "48 MiB of 48 MiB (100.0%)" in text and "/s" in text and "left" in text, text
    assert p.stdout.startswith("backup backup-") and "full (no earlier backup" in p.stdout


@pytest.mark.slow  # in the full run, not in --quick
@pytest.mark.parametrize(
    "opts, writes",
    [
        # 512-byte clusters: many refcount blocks, a refcount table of more than one cluster
        ("cluster_size=512", ["write -P 0x12 0 6M", "write -z 1M 100k", "write -c -P 0x13 7M 64k"]),
        # 2 MiB clusters with subclusters: partly written and zeroed clusters, compressed ones
        (
            "cluster_size=2M,extended_l2=on",
            [
                "write -P 0x14 0 5M",
                "write -P 0x15 9M 100k",
                "write -z 2M 64k",
                "write -c -P 0x16 12M 2M",
            ],
        ),
    ],
    ids=["c512", "c2m-extl2"],
)
def test_unusual_layouts(tmp_path, opts, writes):
    """Small and large clusters, subclusters and compressed clusters in the source: a full and an
    incremental backup read as the disk, and are clean images."""
    size = 16 * MiB
    img = create(tmp_path / "src.qcow2", size, opts, writes=writes)
    d = tmp_path / "b"
    backup(img, d, "--name", "u0")
    assert_point(d, "u0", qemu_raw(img, tmp_path / "now.raw"), tmp_path)
    qemu_io(img, "write -P 0x17 3M 700k", "write -z 9M 64k", "discard 4M 1M")
    assert backup(img, d, "--name", "u1")["kind"] == "incremental"
    assert_point(d, "u1", qemu_raw(img, tmp_path / "now.raw"), tmp_path)
    assert run([*QCOWFS, "backup", "verify", str(d)]).returncode == 0


@pytest.mark.parametrize(
    "where",
    ["offline", pytest.param("live", marks=pytest.mark.slow)],  # live: full run only
)
def test_source_with_a_backing_file(tmp_path, mount, where):
    """What the disk reads through its backing file is in the full backup (which has none).
    Live, the backup re-reads the snapshot table through the image's chain (it once named a
    backing policy that does not exist, and every live backup of an overlay failed)."""
    base = tmp_path / "base.raw"
    base.write_bytes(random.Random(3).randbytes(8 * MiB))
    img = create(
        tmp_path / "top.qcow2",
        8 * MiB,
        backing=base,
        backing_fmt="raw",
        writes=["write -P 0x21 1M 1M", "write -z 3M 1M"],
    )
    d = tmp_path / "b"
    if where == "live":
        m = mount(img)
        now = m.disk.read_bytes()
        out = backup(m.mnt, d, "--name", "w0")
    else:
        now = qemu_raw(img, tmp_path / "now.raw")
        out = backup(img, d, "--name", "w0")
    assert out["kind"] == "full" and out["backing"] is None
    assert "backing-filename" not in qemu_info(d / "w0.qcow2")
    assert_point(d, "w0", now, tmp_path)
    if where == "live":
        with open(m.disk, "r+b") as f:
            f.seek(6 * MiB)
            f.write(b"\x22" * (64 << 10))
        now = m.disk.read_bytes()
        assert backup(m.mnt, d, "--name", "w1")["kind"] == "incremental"
        assert m.unmount() == 0
    else:
        qemu_io(img, "write -P 0x22 6M 64k")
        now = qemu_raw(img, tmp_path / "now.raw")
        assert backup(img, d, "--name", "w1")["kind"] == "incremental"
    assert_point(d, "w1", now, tmp_path)


def _one_partition_mbr(start_lba: int, sectors: int) -> bytes:
    """An MBR partition table with one Linux partition (type 0x83) at LBA start_lba."""
    mbr = bytearray(512)
    mbr[446:462] = (
        bytes([0, 0, 0, 0, 0x83, 0, 0, 0])
        + start_lba.to_bytes(4, "little")
        + sectors.to_bytes(4, "little")
    )
    mbr[510:512] = b"\x55\xaa"
    return bytes(mbr)


def _read_partition_file(disk: Path, where: Path, name: str) -> bytes:
    """The README's file-level restore: partx says where partition 1 starts; mount -o
    ro,noload,offset= mounts it read-only (a loop device the kernel detaches at umount)."""
    start = int(run(["partx", "-g", "-o", "START", "-n", "1", disk]).stdout)
    with mounted_fs(disk, where, "-o", f"ro,noload,offset={start * 512}") as fs:
        return (fs / name).read_bytes()


@pytest.mark.slow  # in the full run, not in --quick
def test_file_level_restore_from_a_backup(tmp_path, mount):
    """A partitioned disk with ext4 on it, backed up twice while mounted; each backup mounted
    read-only with qcowfs, its partition loop-mounted (the README's restore recipe): the files
    read as they were at each checkpoint."""
    if not shutil.which("mkfs.ext4") or not shutil.which("partx"):
        pytest.fail("mkfs.ext4 / partx missing (scripts/setup installs e2fsprogs and util-linux)")
    size = 64 * MiB
    img = create(tmp_path / "src.qcow2", size)
    m = mount(img, extra=["--bitmap-sync=intent"])
    with open(m.disk, "r+b") as f:
        f.write(_one_partition_mbr(2048, size // 512 - 2048))
    rng = random.Random(9)
    first, second = rng.randbytes(3 * MiB + 17), rng.randbytes(2 * MiB + 5)
    d = tmp_path / "b"
    # the partition through a loop device at its offset (this kernel may not read partition
    # tables: no /dev/loopNp1)
    with loop_device(m.disk, "-o", str(2048 * 512)) as dev:
        run(["mkfs.ext4", "-q", "-F", dev])
        with mounted_fs(dev, tmp_path / "fs") as fs:
            (fs / "data.bin").write_bytes(first)
    backup(m.mnt, d, "--name", "f0")
    with loop_device(m.disk, "-o", str(2048 * 512)) as dev:
        with mounted_fs(dev, tmp_path / "fs") as fs:
            (fs / "data.bin").write_bytes(second)
    assert backup(m.mnt, d, "--name", "f1")["kind"] == "incremental"
    assert m.unmount() == 0
    for name, want in (("f0", first), ("f1", second)):
        r = mount(d / f"{name}.qcow2", read_only=True)
        assert _read_partition_file(r.disk, tmp_path / f"ro-{name}", "data.bin") == want
        assert r.unmount() == 0
