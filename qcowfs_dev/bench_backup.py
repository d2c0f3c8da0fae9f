"""What `qcowfs backup` costs against the ways it replaces, in one run (issue 22's targets).

    .venv/bin/python scripts/bench-backup [--size 4G] [--writes 20000] [--repeat 3]
                                          [--workdir DIR] [--json FILE]

1. Full backup of a fully allocated disk, unmounted: `qcowfs backup IMAGE DIR --full` against
   `qemu-img convert -O qcow2 IMAGE OUT`, and against the same convert followed by an fsync of
   OUT (qcowfs's backup is durable before it returns; convert's output is not), in rotating
   order, --repeat times each, each from the same start (settle()).
2. The image mounted (intent mode); a full backup with `qcowfs backup MNT DIR` and the README
   recipe's full backup (checkpoint c1, cp --sparse of its snapshot); --writes random 4 KiB
   writes into disk.raw; then the README recipe's `incremental c1 c2` (one dd per dirty extent)
   against `qcowfs backup MNT DIR` (incremental). Both backups are compared with the disk.
With --encrypted the image is LUKS (QEMU's default aes-256-xts-plain64, key slots timed at
100 ms) and only part 1 runs: `qcowfs backup --key-file` (which decrypts every cluster and
encrypts it again for its place in the new file) against `qemu-img convert` to a new LUKS image
(its key slot timed at 10 ms, so that its PBKDF2 is not what is measured).
Prints the numbers and the ratios (writes them as JSON with --json).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from qcowfs_dev.bench_snapshots import parse_size
from qcowfs_dev.mounts import Mount

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
ROOT = Path(__file__).resolve().parents[1]
QCOWFS = [sys.executable, "-m", "qcowfs"]


def recipe() -> tuple[str, str]:
    """The README's backup recipe: (its full backup, the definition of `incremental`)."""
    text = (ROOT / "README.md").read_text()
    m = re.search(r"```sh\n# backup recipe\n(.*?)```", text, re.S)
    if not m:
        raise SystemExit("README.md has no ```sh block starting '# backup recipe'")
    body = m.group(1)
    full, inc = body.split("# each incremental backup", 1)
    return full, "# each incremental backup" + inc.rsplit("incremental c1 c2", 1)[0]


def settle(*warm: str) -> None:
    """The same start for every timed step: what earlier steps wrote is on disk (sync), the page
    cache holds the files read and nothing else (as root). Without it a step pays for the writeback and the cache
    evictions of the one before (measured: the same command 2.6 s or 10 s)."""
    os.sync()
    if os.geteuid() == 0:  # and only those: a page cache full of earlier steps' files makes every
        # new page cost a reclaim (measured: a 4 GiB copy 3.3 s with room, 12 s with 21 of 23 GiB
        # cached)
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1")
    buf = bytearray(8 * MiB)
    for path in warm:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def timed(cmd: list[str], **kw: Any) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, **kw)
    return time.perf_counter() - t


def timed_backup(source: str, dest: str, *args: str) -> tuple[float, dict[str, Any]]:
    """`qcowfs backup --json`: the wall time, and what it said (bytes, extents, phases)."""
    t = time.perf_counter()
    p = subprocess.run(
        [*QCOWFS, "backup", source, dest, "--json", *args],
        check=True,
        capture_output=True,
        text=True,
    )
    return time.perf_counter() - t, json.loads(p.stdout)


SECRET = "secret,id=sec0,file={key},format=raw"


def qemu_img_luks(*args: str) -> None:
    """qemu-img making a LUKS key slot: QEMU times PBKDF2 with the thread's CPU clock and gives
    up when it reads no time passed ("Unable to get accurate CPU usage"), which this VM's clock
    does now and then; tried again then."""
    for _ in range(12):
        p = subprocess.run(["qemu-img", *args], capture_output=True, text=True)
        if p.returncode == 0:
            return
        if "accurate CPU usage" not in p.stderr:
            break
    raise SystemExit(f"qemu-img {' '.join(args)}: {p.stderr.strip()}")


def make_image(path: str, size: int, key: Optional[str] = None) -> None:
    """A fully allocated qcow2 image: a 64 MiB random block over and over, via qemu-img;
    with key, a LUKS image with that passphrase file."""
    raw = path + ".raw"
    block = os.urandom(64 * MiB)
    with open(raw, "wb") as f:
        for i in range(size // len(block)):
            f.write(i.to_bytes(8, "little") + block[8:])
    if key is None:
        subprocess.run(["qemu-img", "convert", "-O", "qcow2", raw, path], check=True)
    else:
        qemu_img_luks("create", "-q", "-f", "qcow2", "--object", SECRET.format(key=key), "-o",
                      "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=100",
                      path, str(size))  # fmt: skip
        subprocess.run(
            ["qemu-img", "convert", "-n", "--object", SECRET.format(key=key), "-f", "raw", raw,
             "--target-image-opts", f"driver=qcow2,file.filename={path},encrypt.key-secret=sec0"],
            check=True,
        )  # fmt: skip
    os.unlink(raw)


def convert(img: str, out: str, key: Optional[str]) -> None:
    """qemu-img convert -O qcow2 (to a new LUKS image with the same passphrase, with key)."""
    if key is None:
        subprocess.run(["qemu-img", "convert", "-O", "qcow2", img, out], check=True)
        return
    qemu_img_luks("convert", "--object", SECRET.format(key=key), "--image-opts",
                  f"driver=qcow2,file.filename={img},encrypt.key-secret=sec0", "-O", "qcow2",
                  "-o", "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
                  out)  # fmt: skip


def _ratios(what: str, full: dict[str, list[float]], json_path: Optional[str], out: Any) -> None:
    """The full backup's ratios against convert (medians), printed; everything to json_path."""
    ours = statistics.median(full["qcowfs"])
    ratio = statistics.median(full["qemu_img_convert"]) / ours
    ratio_synced = statistics.median(full["qemu_img_convert_fsync"]) / ours
    print(
        f"{what}: {ratio:.2f}x, vs convert + fsync: {ratio_synced:.2f}x "
        "(>= 1: qcowfs as fast or faster)"
    )
    if json_path:
        Path(json_path).write_text(json.dumps(out, indent=2))


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="bench-backup", description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--size", type=parse_size, default=4 * GiB)
    p.add_argument("--writes", type=int, default=20000)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--workdir")
    p.add_argument("--json")
    p.add_argument("--encrypted", action="store_true", help="a LUKS image; the full backup only")
    a = p.parse_args(argv)
    work = Path(a.workdir or tempfile.mkdtemp(prefix="qcowfs-backupbench.", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    img = str(work / "disk.qcow2")
    out: dict[str, Any] = {"size": a.size, "writes": a.writes, "encrypted": a.encrypted}
    key: Optional[str] = None
    key_args: list[str] = []
    if a.encrypted:
        key = str(work / "key")
        with open(os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as kf:
            kf.write(b"bench-backup")
        key_args = ["--key-file", key]
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    try:
        print(f"writing a fully allocated {a.size / GiB:.1f} GiB image ...", flush=True)
        make_image(img, a.size, key)
        # 1. full, unmounted: qcowfs backup against qemu-img convert
        ours, theirs, theirs_synced = [], [], []
        order = ["qcowfs", "qemu", "qemu+fsync"]
        for i in range(a.repeat):
            for who in order[i % 3 :] + order[: i % 3]:
                dest = work / f"full-{who}"
                shutil.rmtree(dest, ignore_errors=True)
                dest.mkdir()
                settle(img)
                if who == "qcowfs":
                    ours.append(timed([*QCOWFS, "backup", img, str(dest), "--full", *key_args]))
                else:
                    o = str(dest / "o.qcow2")
                    t = time.perf_counter()
                    convert(img, o, key)
                    if who == "qemu+fsync":  # made as durable as qcowfs's backup before it ends
                        fd = os.open(o, os.O_RDONLY)
                        os.fsync(fd)
                        os.close(fd)
                        theirs_synced.append(time.perf_counter() - t)
                    else:
                        theirs.append(time.perf_counter() - t)
                shutil.rmtree(dest)
        out["full"] = {
            "qcowfs": ours,
            "qemu_img_convert": theirs,
            "qemu_img_convert_fsync": theirs_synced,
        }
        print(
            f"full backup, unmounted: qcowfs backup {statistics.median(ours):.2f} s, qemu-img "
            f"convert -O qcow2 {statistics.median(theirs):.2f} s, the same and an fsync of its "
            f"output {statistics.median(theirs_synced):.2f} s (medians of {a.repeat}; "
            f"every run: {', '.join(f'{x:.2f}' for x in ours)} / "
            f"{', '.join(f'{x:.2f}' for x in theirs)} / "
            f"{', '.join(f'{x:.2f}' for x in theirs_synced)})",
            flush=True,
        )
        if a.encrypted:
            _ratios("encrypted full backup vs qemu-img convert to LUKS", out["full"], a.json, out)
            return 0
        # the offline runs left their bitmaps: start the live part from a clean slate
        for n in json.loads(
            subprocess.run(
                [*QCOWFS, "bitmap", "list", img, "--json"], capture_output=True, text=True
            ).stdout
            or "[]"
        ):
            subprocess.run([*QCOWFS, "bitmap", "remove", img, n["name"]], check=True)
        # 2. live: full both ways, random writes, incremental both ways
        mnt = work / "mnt"
        mnt.mkdir(exist_ok=True)
        m = Mount(
            img, mnt, work / "qcowfs.log", extra=["--bitmap-sync=intent"], python=sys.executable
        )
        try:
            rfull, rinc = recipe()
            setting = f"MNT={mnt} BACKUP={work / 'recipe.raw'}\n"
            settle(img)
            t = time.perf_counter()
            subprocess.run(["bash", "-euc", setting + rfull.split("\n", 1)[1]], check=True, env=env)
            recipe_full = time.perf_counter() - t
            bdir = work / "chain"
            shutil.rmtree(bdir, ignore_errors=True)
            settle(img)
            ours_full, full_json = timed_backup(str(mnt), str(bdir), "--name", "b1")
            rng = random.Random(22)
            fd = os.open(mnt / "disk.raw", os.O_WRONLY)
            try:
                for _ in range(a.writes):
                    os.pwrite(fd, os.urandom(4 * KiB), rng.randrange(a.size // (4 * KiB)) * 4 * KiB)
                os.fsync(fd)
            finally:
                os.close(fd)
            ext = json.loads(
                subprocess.run(
                    [*QCOWFS, "bitmap", "extents", str(mnt), "c1", "--json"],
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout
            )
            extents = sum(1 for e in ext if e["dirty"])
            settle(img)
            t = time.perf_counter()
            subprocess.run(
                ["bash", "-euc", setting + rinc + "\nincremental c1 c2\n"], check=True, env=env
            )
            recipe_inc = time.perf_counter() - t
            settle(img)
            ours_inc, inc_json = timed_backup(str(mnt), str(bdir), "--name", "b2")
            same = subprocess.run(
                ["qemu-img", "compare", "-q", str(bdir / "b2.qcow2"), str(work / "recipe.raw")]
            ).returncode
        finally:
            m.stop()
        out["live"] = {
            "dirty_extents": extents,
            "recipe_full": recipe_full,
            "qcowfs_full": ours_full,
            "recipe_incremental": recipe_inc,
            "qcowfs_incremental": ours_inc,
            "backups_identical": same == 0,
            "qcowfs_full_phases": full_json["phases"],
            "qcowfs_incremental_phases": inc_json["phases"],
            "qcowfs_incremental_bytes": inc_json["bytes"],
        }
        print(
            f"live full backup: README recipe {recipe_full:.2f} s, qcowfs backup {ours_full:.2f} s\n"
            f"live incremental after {a.writes} random 4 KiB writes ({extents} dirty extents): "
            f"README recipe {recipe_inc:.2f} s, qcowfs backup {ours_inc:.2f} s "
            f"({recipe_inc / ours_inc:.1f}x faster); the two backups "
            + ("are identical" if same == 0 else "DIFFER")
            + f"\nqcowfs backup's phases (s): full {full_json['phases']}, incremental "
            f"{inc_json['phases']} ({inc_json['bytes'] / MiB:.0f} MiB copied)",
            flush=True,
        )
        _ratios("full backup vs qemu-img convert", out["full"], a.json, out)
    finally:
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0
