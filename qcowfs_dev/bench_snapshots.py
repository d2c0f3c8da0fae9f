"""What an internal snapshot costs on a mounted image: the pause while it is taken and deleted,
and the copy-on-write penalty of first writes after it.

    .venv/bin/python scripts/bench-snapshots [--size 10G] [--allocated 0.5] [--workdir DIR] [--json FILE]

A qcow2 image of --size (64 KiB clusters) whose first --allocated fraction is written by qemu-io
is mounted; then, with a thread doing 4 KiB O_DIRECT reads of disk.raw back to back the whole
time (it measures how long a guest request can stall):
  1. 4 KiB random writes over the allocated area for 5 s (in place: the clusters are COPIED);
  2. `touch .snapshots/s1`: how long it takes, the longest read stall around it;
  3. 4 KiB random writes again for 5 s: every first write into a cluster now copies it
     (the snapshot shares it), later ones hit the copy;
  4. `rm .snapshots/s1`: how long, the longest stall.
Prints the numbers (and writes them as JSON with --json). About a minute plus writing the image.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Optional, Sequence

from qcowfs_dev.mounts import Mount

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


def parse_size(s: str) -> int:
    units = {"K": KiB, "M": MiB, "G": GiB, "T": 1 << 40}
    return int(float(s[:-1]) * units[s[-1].upper()]) if s[-1].upper() in units else int(s)


class Stalls(threading.Thread):
    """Back-to-back 4 KiB O_DIRECT reads; records the longest gap in a time window."""

    def __init__(self, path: str, span: int):
        super().__init__(daemon=True)
        self.path, self.span = path, span
        self.stop = threading.Event()
        self.samples: list[tuple[float, float]] = []  # (start, duration)

    def run(self) -> None:
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECT)
        buf = mmap.mmap(-1, 4096)
        rng = random.Random(5)
        try:
            while not self.stop.is_set():
                t = time.monotonic()
                os.preadv(fd, [buf], rng.randrange(self.span // 4096) * 4096)
                self.samples.append((t, time.monotonic() - t))
        finally:
            os.close(fd)

    def worst(self, t0: float, t1: float) -> float:
        return max((d for s, d in self.samples if s + d >= t0 and s <= t1), default=0.0)


def random_writes(path: str, span: int, seconds: float, seed: int) -> float:
    """4 KiB O_DIRECT random writes for `seconds`; IOPS."""
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, 4096)
    buf.write(os.urandom(4096))
    rng = random.Random(seed)
    n = 0
    t0 = time.monotonic()
    try:
        while time.monotonic() - t0 < seconds:
            os.pwritev(fd, [buf], rng.randrange(span // 4096) * 4096)
            n += 1
    finally:
        os.close(fd)
    return n / (time.monotonic() - t0)


def timed(stalls: Stalls, fn: Callable[[], object]) -> dict[str, float]:
    t0 = time.monotonic()
    fn()
    t1 = time.monotonic()
    time.sleep(0.2)
    return {"seconds": round(t1 - t0, 4), "longest_read_stall_s": round(stalls.worst(t0, t1), 4)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="bench-snapshots", description=(__doc__ or "").split("\n\n")[0]
    )
    p.add_argument("--size", type=parse_size, default=10 * GiB)
    p.add_argument("--allocated", type=float, default=0.5)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--workdir")
    p.add_argument("--json")
    a = p.parse_args(argv)
    work = a.workdir or tempfile.mkdtemp(prefix="qcowfs-snapbench.", dir="/var/tmp")
    os.makedirs(work, exist_ok=True)
    img = os.path.join(work, "disk.qcow2")
    span = int(a.size * a.allocated) // GiB * GiB or a.size
    try:
        subprocess.run(
            [
                "qemu-img",
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "cluster_size=65536",
                img,
                str(a.size),
            ],
            check=True,
        )
        print(
            f"writing {span / GiB:.1f} GiB of {a.size / GiB:.1f} GiB with qemu-io ...", flush=True
        )
        cmds = []
        for off in range(0, span, GiB):  # qemu-io requests stop at 2 GiB
            cmds += ["-c", f"write -P 0x5a {off} {min(GiB, span - off)}"]
        subprocess.run(
            ["qemu-io", "-f", "qcow2", *cmds, img], check=True, stdout=subprocess.DEVNULL
        )
        mnt = os.path.join(work, "mnt")
        os.makedirs(mnt, exist_ok=True)
        m = Mount(img, mnt, os.path.join(work, "daemon.log"))
        disk = os.path.join(mnt, "disk.raw")
        stalls = Stalls(disk, span)
        stalls.start()
        res: dict[str, Any] = {"size": a.size, "allocated": span, "cluster_size": 65536}
        try:
            res["write_iops_before"] = round(random_writes(disk, span, a.seconds, 1))
            res["create"] = timed(
                stalls, lambda: open(os.path.join(mnt, ".snapshots", "s1"), "w").close()
            )
            res["write_iops_after"] = round(random_writes(disk, span, a.seconds, 2))
            res["delete"] = timed(stalls, lambda: os.unlink(os.path.join(mnt, ".snapshots", "s1")))
            res["write_iops_after_delete"] = round(random_writes(disk, span, a.seconds, 3))
            res["idle_read_latency_median_s"] = round(
                sorted(d for _, d in stalls.samples)[len(stalls.samples) // 2], 6
            )
        finally:
            stalls.stop.set()
            stalls.join()
            rc = m.unmount()
        chk = subprocess.run(["qemu-img", "check", img], capture_output=True, text=True)
        res["qemu_img_check_rc"] = chk.returncode
        res["daemon_exit"] = rc
        print(json.dumps(res, indent=4))
        if a.json:
            with open(a.json, "w") as f:
                json.dump(res, f, indent=4)
        return 0 if rc == 0 and chk.returncode == 0 else 1
    finally:
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
