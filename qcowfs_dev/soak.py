"""Soak test: random operations against a live qcowfs mount, checked against a raw reference file
and against QEMU's own view of the image.

    scripts/soak --seconds N [--seed S] [--workdir D] [--variant plain|backing|both]

Each variant (a fresh 64 MiB qcow2 v3 image with 64 KiB clusters; "backing" adds a backing file
with data in it) runs in epochs of a few seconds of mixed operations:

- writes of 1 B .. 2 MiB of random data at random (sometimes aligned) offsets, and writes of
  whole clusters of zeros; every write goes to a raw reference file too;
- reads of random ranges, compared with the reference;
- fsync at random points;
- bitmap commands on a few names: touch (create), rm, echo clear|enable|disable > NAME, cat
  (status compared with a model: the dirty granules of every bitmap, its recording state);

and each epoch ends with either

- a clean restart: `qcowfs umount`, daemon exit 0, `qemu-img check` exit 0, `qemu-img compare`
  with the reference identical, every bitmap's flags in `qemu-img info` and its dirty extents
  served by `qemu-nbd -B NAME` (read with `nbdinfo --map`) equal to the model; remount;
- or kill -9 of the daemon (between operations, or in the middle of a 2 MiB write):
  `qemu-img check` must find no corruption (exit 0 or 3); every region written and fsynced and not
  written since must hold the reference data (`qemu-img convert`); the reference is then taken
  from the image, leaks are repaired with `qemu-img check -r leaks`, and after the remount every
  bitmap must be listed as inconsistent, refuse commands, and be removed with rm.

Prints a summary; exits 1 on the first mismatch with a message that names the seed.
Mounts and daemons started here are always torn down.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any, Iterable, NoReturn, Optional, Sequence

from qcowfs_dev.mounts import Mount, MountFailed, detach, holders
from qcowfs_dev.oracles import dirty_extents
from qcowfs_dev.proc import REPO, checkout_env

ROOT = Path(REPO)

KiB = 1024
MiB = 1024 * KiB
SIZE = 64 * MiB
CLUSTER = 64 * KiB
MAX_WRITE = 2 * MiB
BITMAP_NAMES = ("b0", "b1", "b2", "b3")


class SoakFailure(Exception):
    pass


def qcowfs_python() -> str:
    """A Python that can run qcowfs: $QCOWFS_PYTHON, this one if it has pyfuse3, the project's .venv, python3."""
    if os.environ.get("QCOWFS_PYTHON"):
        return os.environ["QCOWFS_PYTHON"]
    if importlib.util.find_spec("pyfuse3") is not None:
        return sys.executable
    venv = ROOT / ".venv" / "bin" / "python"
    if venv.exists():
        return str(venv)
    return "python3"


PYTHON = qcowfs_python()
ENV = checkout_env()


def run(
    cmd: Iterable[object], check: bool = True, timeout: float = 300, **kw: Any
) -> subprocess.CompletedProcess[str]:
    cmd = list(cmd)
    p = subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, env=ENV, **kw
    )
    if check and p.returncode != 0:
        raise SoakFailure(
            f"{' '.join(map(str, cmd))} exited {p.returncode}\nstdout: {p.stdout}\nstderr: {p.stderr}"
        )
    return p


def qcowfs(*args: object, **kw: Any) -> subprocess.CompletedProcess[str]:
    return run([PYTHON, "-m", "qcowfs", *args], cwd=str(ROOT), **kw)


# ----------------------------------------------------------------------------- intervals


class Intervals:
    """A set of byte ranges [start, end), kept merged and sorted."""

    def __init__(self) -> None:
        self.iv: list[list[int]] = []

    def add(self, start: int, end: int) -> None:
        if end <= start:
            return
        out = []
        placed = False
        for s, e in self.iv:
            if e < start:
                out.append([s, e])
            elif end < s:
                if not placed:
                    out.append([start, end])
                    placed = True
                out.append([s, e])
            else:
                start, end = min(s, start), max(e, end)
        if not placed:
            out.append([start, end])
        out.sort()
        self.iv = out

    def clear(self) -> None:
        self.iv = []

    def complement(self, size: int) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        pos = 0
        for s, e in self.iv:
            if s > pos:
                out.append((pos, s))
            pos = max(pos, e)
        if pos < size:
            out.append((pos, size))
        return out

    def total(self) -> int:
        return sum(e - s for s, e in self.iv)


# ----------------------------------------------------------------------------- bitmap model


class BitmapModel:
    def __init__(self, name: str, granularity: int):
        self.name = name
        self.granularity = granularity
        self.recording = True
        self.dirty: set[int] = set()

    def mark(self, offset: int, length: int) -> None:
        if self.recording and length > 0:
            g = self.granularity
            self.dirty.update(range(offset // g, (offset + length - 1) // g + 1))

    def count(self) -> int:
        return len(self.dirty) * self.granularity

    def extents(self, size: int) -> list:
        """[(offset, length)] of dirty ranges, merged, clipped to the disk."""
        out: list = []
        g = self.granularity
        for k in sorted(self.dirty):
            s, e = k * g, min((k + 1) * g, size)
            if out and out[-1][1] == s:
                out[-1][1] = e
            else:
                out.append([s, e])
        return [(s, e - s) for s, e in out]


# ----------------------------------------------------------------------------- the soak


class Soak:
    def __init__(self, args: argparse.Namespace, workdir: Path):
        self.seed = args.seed
        self.rnd = random.Random(args.seed)
        self.workdir = workdir
        self.verbose = args.verbose
        self.stats = {
            "writes": 0,
            "zero writes": 0,
            "bytes written": 0,
            "reads": 0,
            "fsyncs": 0,
            "bitmap ops": 0,
            "kills": 0,
            "kills mid-write": 0,
            "writes cut by a kill": 0,
            "clean restarts": 0,
            "leak repairs": 0,
            "verified bytes": 0,
            "bitmap maps checked": 0,
        }
        # per variant
        self.m: Optional[Mount] = None  # the current Mount (qcowfs_dev.mounts)
        self.proc: Optional[subprocess.Popen[Any]] = None
        self.fd: Optional[int] = None  # disk.raw, open
        self.mnt: Optional[Path] = None
        self.dir = workdir
        self.variant = "-"
        self.mount_no = 0

    def say(self, msg: str) -> None:
        if self.verbose:
            print(f"soak: {msg}", flush=True)

    def fail(self, msg: str) -> NoReturn:
        raise SoakFailure(msg)

    # ------------------------------------------------------------------ set-up
    def make_variant(self, variant: str) -> None:
        d = self.workdir / variant
        d.mkdir(parents=True, exist_ok=True)
        self.dir = d
        self.image = d / "image.qcow2"
        self.ref = d / "reference.raw"
        self.mnt = mnt = d / "mnt"
        mnt.mkdir(exist_ok=True)
        self.variant = variant
        if variant == "backing":
            base = d / "base.qcow2"
            run(
                [
                    "qemu-img",
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-o",
                    "cluster_size=4096",
                    base,
                    str(SIZE),
                ]
            )
            cmds = []
            for _ in range(24):
                off = self.rnd.randrange(0, SIZE // 512 - 4096) * 512
                ln = self.rnd.randrange(1, 4096) * 512
                cmds += ["-c", f"write -P 0x{self.rnd.randrange(1, 256):02x} {off} {ln}"]
            run(["qemu-io", "-f", "qcow2", *cmds, base])
            run(
                [
                    "qemu-img",
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-o",
                    f"cluster_size={CLUSTER}",
                    "-b",
                    base.name,
                    "-F",
                    "qcow2",
                    self.image,
                    str(SIZE),
                ],
                cwd=str(d),
            )
            run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", self.image, self.ref])
        else:
            run(
                [
                    "qemu-img",
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-o",
                    f"cluster_size={CLUSTER}",
                    self.image,
                    str(SIZE),
                ]
            )
            with open(self.ref, "wb") as f:
                f.truncate(SIZE)
        self.ref_fd = os.open(self.ref, os.O_RDWR)
        self.unsynced = Intervals()
        self.bitmaps: dict = {}

    # ------------------------------------------------------------------ mount
    def mount(self) -> None:
        self.mount_no += 1
        self.log = self.dir / f"daemon{self.mount_no}.log"
        try:
            self.m = Mount(
                self.image,
                self._mnt(),
                self.log,
                timeout=60,
                python=PYTHON,
                env=ENV,
                cwd=ROOT,
                stderr_file=self.dir / f"daemon{self.mount_no}.stderr",
            )
        except MountFailed as e:
            self.fail(f"mount #{self.mount_no}: {e}")
        self.proc = self.m.proc
        self.fd = fd = os.open(self._mnt() / "disk.raw", os.O_RDWR)
        st = os.fstat(fd)
        if st.st_size != SIZE:
            self.fail(f"disk.raw has size {st.st_size}, expected {SIZE}")

    # what exists while a variant runs: its mount point, the daemon, disk.raw open
    def _mnt(self) -> Path:
        assert self.mnt is not None, "no variant set up"
        return self.mnt

    def _daemon(self) -> subprocess.Popen[Any]:
        assert self.proc is not None, "no daemon started"
        return self.proc

    def _disk(self) -> int:
        assert self.fd is not None, "disk.raw is not open"
        return self.fd

    def stderr_text(self) -> str:
        return self.m.stderr.strip() if self.m is not None else ""

    def log_text(self) -> str:
        return self.m.log_text() if self.m is not None else ""

    def check_log(self) -> None:
        text = self.log_text() + self.stderr_text()
        if "Traceback" in text:
            self.fail(f"daemon #{self.mount_no} logged a traceback:\n{text}")

    def close_fd(self) -> None:
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = None

    def teardown(self) -> None:
        """Whatever state we are in: no daemon, no mount left behind."""
        self.close_fd()
        if self.m is not None and self.m.alive():
            # unmount (retrying a while if busy); a daemon still starting up, or one whose mount
            # stays busy, gets SIGTERM (it unmounts and stores its bitmaps itself); then kill -9
            self.m.stop(timeout=30, busy_retry=5, sigterm_grace=30)
            if self.m.problem:
                print(
                    f"soak: daemon #{self.mount_no}: {self.m.problem}; killed it", file=sys.stderr
                )
        if self.mnt is not None:
            detach(self.mnt, lazy_only=True)

    def alive(self) -> None:
        if self._daemon().poll() is not None:
            self.fail(
                f"daemon #{self.mount_no} died (exit {self._daemon().returncode}): {self.stderr_text()}\n"
                f"{self.log_text()[-4000:]}"
            )

    # ------------------------------------------------------------------ operations
    def _mark(self, off: int, length: int) -> None:
        for bm in self.bitmaps.values():
            bm.mark(off, length)

    def op_write(self, zero: bool = False) -> None:
        r = self.rnd
        if zero:
            n = CLUSTER * r.randint(1, 32)
            off = r.randrange(0, (SIZE - n) // CLUSTER + 1) * CLUSTER
            data = bytes(n)
        else:
            n = min(MAX_WRITE, max(1, int(2 ** r.uniform(0, 21))))
            align = r.choice([1, 1, 512, 4096, CLUSTER])
            off = r.randrange(0, (SIZE - n) // align + 1) * align
            data = r.randbytes(n)
        try:
            got = os.pwrite(self._disk(), data, off)
        except OSError as e:
            self.fail(f"write of {n} bytes at {off}: {e}")
        if got != n:
            self.fail(f"short write at {off}: {got} of {n}")
        os.pwrite(self.ref_fd, data, off)
        self.unsynced.add(off, off + n)
        self._mark(off, n)
        self.stats["zero writes" if zero else "writes"] += 1
        self.stats["bytes written"] += n

    def op_read(self) -> None:
        r = self.rnd
        n = min(MAX_WRITE, max(1, int(2 ** r.uniform(0, 21))))
        off = r.randrange(0, SIZE - n + 1)
        self.verify_range(off, n, "read")

    def verify_range(self, off: int, n: int, what: str) -> None:
        try:
            got = os.pread(self._disk(), n, off)
        except OSError as e:
            self.fail(f"{what} of {n} bytes at {off}: {e}")
        want = os.pread(self.ref_fd, n, off)
        if got != want:
            self.fail(
                f"{what} at {off} ({n} bytes): disk.raw differs from the reference {_first_diff(got, want, off)}"
            )
        self.stats["reads"] += 1
        self.stats["verified bytes"] += n

    def op_fsync(self) -> None:
        try:
            os.fsync(self._disk())
        except OSError as e:
            self.fail(f"fsync: {e}")
        self.unsynced.clear()
        self.stats["fsyncs"] += 1

    def bitmap_path(self, name: str) -> Path:
        return self._mnt() / ".bitmaps" / name

    def status(self, name: str) -> dict:
        try:
            with open(self.bitmap_path(name)) as f:
                return json.load(f)
        except (OSError, ValueError) as e:
            self.fail(f"cat .bitmaps/{name}: {e}")

    def check_status(self, name: str) -> None:
        bm = self.bitmaps[name]
        st = self.status(name)
        want = {
            "name": name,
            "granularity": bm.granularity,
            "count": bm.count(),
            "recording": bm.recording,
            "inconsistent": False,
            "persistent": True,
        }
        got = {k: st.get(k) for k in want}
        if got != want:
            self.fail(f"status of bitmap {name}: {got}, model says {want}")

    def check_listing(self) -> None:
        names = sorted(os.listdir(self._mnt() / ".bitmaps"))
        if names != sorted(self.bitmaps):
            self.fail(f".bitmaps lists {names}, model has {sorted(self.bitmaps)}")

    def op_bitmap(self) -> None:
        r = self.rnd
        name = r.choice(BITMAP_NAMES)
        exists = name in self.bitmaps
        op = (
            r.choice(["touch", "touch", "rm", "clear", "enable", "disable", "cat", "cat"])
            if exists
            else r.choice(["touch", "touch", "rm"])
        )
        self.stats["bitmap ops"] += 1
        self.say(f"bitmap {op} {name}")
        if op == "touch":
            p = run(["touch", self.bitmap_path(name)], check=False)
            if p.returncode != 0:
                self.fail(
                    f"touch .bitmaps/{name} ({'existing' if exists else 'new'}): {p.stderr.strip()}"
                )
            if not exists:
                st = self.status(name)
                if st.get("granularity") != CLUSTER:
                    self.fail(
                        f"new bitmap {name} has granularity {st.get('granularity')}, expected {CLUSTER}"
                    )
                self.bitmaps[name] = BitmapModel(name, st["granularity"])
            self.check_status(name)
        elif op == "rm":
            p = run(["rm", "--", self.bitmap_path(name)], check=False)
            if exists and p.returncode != 0:
                self.fail(f"rm .bitmaps/{name}: {p.stderr.strip()}")
            if not exists and p.returncode == 0:
                self.fail(f"rm .bitmaps/{name} of a bitmap that does not exist succeeded")
            self.bitmaps.pop(name, None)
            if os.path.exists(self.bitmap_path(name)):
                self.fail(f".bitmaps/{name} still exists after rm")
        elif op == "cat":
            self.check_status(name)
        else:
            try:
                with open(self.bitmap_path(name), "w") as f:
                    f.write(op + "\n")
            except OSError as e:
                self.fail(f"echo {op} > .bitmaps/{name}: {e}")
            bm = self.bitmaps[name]
            if op == "clear":
                bm.dirty.clear()
            else:
                bm.recording = op == "enable"
            self.check_status(name)
        self.check_listing()

    # ------------------------------------------------------------------ epoch ends
    def clean_restart(self, final: bool = False) -> None:
        self.say("clean restart")
        self.alive()
        self.close_fd()
        p = qcowfs("umount", self._mnt(), check=False)
        if p.returncode != 0 and "busy" in p.stderr:
            # a program outside the soak looking into the mount? try for a while
            using = holders(self._mnt())
            deadline = time.monotonic() + 20
            while p.returncode != 0 and "busy" in p.stderr and time.monotonic() < deadline:
                time.sleep(0.2)
                p = qcowfs("umount", self._mnt(), check=False)
            if p.returncode != 0:
                self.fail(
                    f"qcowfs umount exited {p.returncode}: {p.stderr.strip()}; processes using the mount: {using}"
                )
        if p.returncode != 0:
            self.fail(f"qcowfs umount exited {p.returncode}: {p.stderr.strip()}")
        try:
            rc = self._daemon().wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.fail("the daemon did not exit after qcowfs umount returned")
        if rc != 0:
            self.fail(
                f"daemon #{self.mount_no} exited {rc} after a clean unmount: {self.stderr_text()}\n"
                f"{self.log_text()[-4000:]}"
            )
        self.check_log()
        if os.path.ismount(self._mnt()):
            self.fail("still mounted after qcowfs umount")
        c = run(["qemu-img", "check", self.image], check=False)
        if c.returncode != 0:
            self.fail(
                f"qemu-img check after a clean unmount exited {c.returncode} (expected 0):\n{c.stdout}{c.stderr}"
            )
        cmp = run(
            ["qemu-img", "compare", "-f", "qcow2", "-F", "raw", self.image, self.ref], check=False
        )
        if cmp.returncode != 0:
            self.fail(
                f"qemu-img compare image vs reference exited {cmp.returncode}: {cmp.stdout.strip()} {cmp.stderr.strip()}"
            )
        self.stats["verified bytes"] += SIZE
        self.unsynced.clear()
        self.check_qemu_bitmaps()
        self.stats["clean restarts"] += 1
        if not final:
            self.mount()
            self.check_listing()
            for name in self.bitmaps:
                self.check_status(name)

    def check_qemu_bitmaps(self) -> None:
        info = json.loads(run(["qemu-img", "info", "--output=json", self.image]).stdout)
        qb = {
            b["name"]: b for b in info.get("format-specific", {}).get("data", {}).get("bitmaps", [])
        }
        if sorted(qb) != sorted(self.bitmaps):
            self.fail(f"qemu-img info lists bitmaps {sorted(qb)}, model has {sorted(self.bitmaps)}")
        for name, bm in self.bitmaps.items():
            flags = set(qb[name]["flags"])
            want = {"auto"} if bm.recording else set()
            if flags != want or qb[name]["granularity"] != bm.granularity:
                self.fail(
                    f"qemu-img info: bitmap {name} flags {sorted(flags)} granularity {qb[name]['granularity']}, "
                    f"model: flags {sorted(want)} granularity {bm.granularity}"
                )
            got = qemu_dirty_extents(self.image, name)
            want_ext = bm.extents(SIZE)
            if got != want_ext:
                self.fail(
                    f"QEMU's dirty extents of bitmap {name} differ from the model:\n"
                    f"  qemu:  {_short(got)}\n  model: {_short(want_ext)}"
                )
            self.stats["bitmap maps checked"] += 1

    def kill(self) -> None:
        r = self.rnd
        self.alive()
        mid_write = r.random() < 0.5
        self.say(f"kill -9{' during a write' if mid_write else ''}")
        if mid_write:
            n = MAX_WRITE
            off = r.randrange(0, (SIZE - n) // 512 + 1) * 512
            data = r.randbytes(n)
            delay = r.uniform(0, 0.004)  # a 2 MiB write takes a few ms: mostly lands inside it
            os.pwrite(
                self.ref_fd, data, off
            )  # maybe written, maybe not: the range is unknown after the kill
            self.unsynced.add(off, off + n)
            result: dict[str, Any] = {}

            def writer() -> None:
                try:
                    result["n"] = os.pwrite(self._disk(), data, off)
                except OSError as e:
                    result["error"] = e

            t = threading.Thread(target=writer, daemon=True)
            t.start()
            time.sleep(delay)
            self._daemon().send_signal(signal.SIGKILL)
            t.join(30)
            if t.is_alive():
                self.fail("a write in flight did not return after the daemon was killed")
            self.stats["kills mid-write"] += 1
            if "error" in result:
                self.stats["writes cut by a kill"] += 1
        else:
            self._daemon().send_signal(signal.SIGKILL)
        self._daemon().wait()
        self.close_fd()
        detach(self._mnt(), lazy_only=True)
        self.check_log()
        self.stats["kills"] += 1

        c = run(["qemu-img", "check", "--output=json", self.image], check=False)
        if c.returncode not in (0, 3):
            self.fail(
                f"qemu-img check after kill -9 exited {c.returncode} (corruption):\n{c.stdout}{c.stderr}"
            )
        conv = self.dir / "after-kill.raw"
        run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", self.image, conv])
        # every byte not written since the last fsync must be there
        with open(conv, "rb") as f:
            cfd = f.fileno()
            for s, e in self.unsynced.complement(SIZE):
                pos = s
                while pos < e:
                    n = min(4 * MiB, e - pos)
                    got, want = os.pread(cfd, n, pos), os.pread(self.ref_fd, n, pos)
                    if got != want:
                        self.fail(
                            f"after kill -9: fsynced data lost {_first_diff(got, want, pos)} "
                            f"(unsynced ranges: {_short(self.unsynced.iv)})"
                        )
                    pos += n
                    self.stats["verified bytes"] += n
        # the reference becomes what the image holds now
        os.close(self.ref_fd)
        shutil.move(conv, self.ref)
        self.ref_fd = os.open(self.ref, os.O_RDWR)
        self.unsynced.clear()
        if c.returncode == 3:
            rep = run(["qemu-img", "check", "-r", "leaks", self.image], check=False)
            if rep.returncode != 0:
                self.fail(
                    f"qemu-img check -r leaks exited {rep.returncode}:\n{rep.stdout}{rep.stderr}"
                )
            self.stats["leak repairs"] += 1
        c2 = run(["qemu-img", "check", self.image], check=False)
        if c2.returncode != 0:
            self.fail(
                f"qemu-img check after kill -9 (and leak repair) exited {c2.returncode}:\n{c2.stdout}{c2.stderr}"
            )
        # every bitmap was in use: now inconsistent, refusing commands, removable
        self.mount()
        self.check_listing()
        for name in sorted(self.bitmaps):
            st = self.status(name)
            if st.get("inconsistent") is not True or st.get("recording") is not False:
                self.fail(
                    f"after kill -9 bitmap {name} should be inconsistent and not recording: {st}"
                )
            if r.random() < 0.5:
                cmd = r.choice(["clear", "enable", "disable"])
                try:
                    with open(self.bitmap_path(name), "w") as cmdf:
                        cmdf.write(cmd + "\n")
                except OSError:
                    pass
                else:
                    self.fail(f"echo {cmd} > .bitmaps/{name} succeeded on an inconsistent bitmap")
            p = run(["rm", "--", self.bitmap_path(name)], check=False)
            if p.returncode != 0:
                self.fail(f"rm of inconsistent bitmap {name}: {p.stderr.strip()}")
        self.bitmaps.clear()
        self.check_listing()
        # what the image holds is served
        for _ in range(8):
            self.op_read()

    # ------------------------------------------------------------------ main loop
    def run_variant(self, variant: str, seconds: float) -> None:
        start = time.monotonic()
        deadline = start + seconds
        self.make_variant(variant)
        self.say(f"variant {variant}: {self.image}")
        try:
            self.mount()
            r = self.rnd
            ops = [
                (self.op_write, 30),
                (lambda: self.op_write(zero=True), 6),
                (self.op_read, 25),
                (self.op_fsync, 8),
                (self.op_bitmap, 12),
            ]
            funcs = [f for f, _ in ops]
            weights = [w for _, w in ops]
            while time.monotonic() < deadline:
                epoch_end = min(deadline, time.monotonic() + r.uniform(1.0, 6.0))
                while time.monotonic() < epoch_end:
                    r.choices(funcs, weights)[0]()
                    self.alive()
                if time.monotonic() >= deadline:
                    break
                if r.random() < 0.45:
                    self.kill()
                else:
                    self.clean_restart()
            # the end: a full verification through the mount, then a clean unmount with QEMU's checks
            for off in range(0, SIZE, 4 * MiB):
                self.verify_range(off, 4 * MiB, "final read")
            self.clean_restart(final=True)
        finally:
            self.teardown()
            os.close(self.ref_fd)


def _first_diff(got: bytes, want: bytes, base: int) -> str:
    if len(got) != len(want):
        return f"(got {len(got)} bytes, expected {len(want)})"
    for i in range(0, len(got), 4096):
        if got[i : i + 4096] != want[i : i + 4096]:
            for j in range(i, min(i + 4096, len(got))):
                if got[j] != want[j]:
                    return f"first at byte {base + j}: 0x{got[j]:02x} instead of 0x{want[j]:02x}"
    return "(no difference?)"


def _short(seq: Iterable[Sequence[int]], limit: int = 12) -> str:
    seq = list(seq)
    s = ", ".join(str(tuple(x)) for x in seq[:limit])
    return f"[{s}{', ...' if len(seq) > limit else ''}] ({len(seq)} ranges)"


def qemu_dirty_extents(image: Path, name: str) -> list[tuple[int, int]]:
    """Dirty ranges of bitmap NAME as QEMU serves them: qemu-nbd -B NAME, read with nbdinfo --map."""
    try:
        return dirty_extents(image, name)
    except AssertionError as e:
        raise SoakFailure(str(e)) from None


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="soak", description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument(
        "--seconds", type=float, required=True, help="how long to run (split between the variants)"
    )
    ap.add_argument("--seed", type=int, help="random seed (default: random, printed)")
    ap.add_argument(
        "--workdir",
        help="directory for images and logs (default: a temporary one, removed on success)",
    )
    ap.add_argument("--variant", choices=("plain", "backing", "both"), default="both")
    ap.add_argument(
        "--verbose", "-v", action="store_true", help="print every bitmap command, kill and restart"
    )
    args = ap.parse_args(argv)
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1 << 32)
    for tool in ("qemu-img", "qemu-io", "qemu-nbd", "nbdinfo", "fusermount3"):
        if shutil.which(tool) is None:
            print(f"soak: {tool} not found", file=sys.stderr)
            return 1
    if args.workdir:
        workdir = Path(args.workdir).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        own_dir = False
    else:
        workdir = Path(tempfile.mkdtemp(prefix="qcowfs-soak."))
        own_dir = True
    print(
        f"soak: seed {args.seed}, {args.seconds:g} s, workdir {workdir}, python {PYTHON}",
        flush=True,
    )
    variants = ["plain", "backing"] if args.variant == "both" else [args.variant]
    soak = Soak(args, workdir)

    def on_term(signum: int, frame: Optional[FrameType]) -> None:
        raise KeyboardInterrupt

    # tear down mounts and daemons on Ctrl-C and kill (also when started with SIGINT ignored, as by `&`)
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    t0 = time.monotonic()
    ok = False
    try:
        for i, v in enumerate(variants):
            remaining = args.seconds - (time.monotonic() - t0)
            soak.run_variant(v, max(1.0, remaining / (len(variants) - i)))
        ok = True
    except SoakFailure as e:
        print(f"soak: FAILED (seed {args.seed}, variant {soak.variant}): {e}", file=sys.stderr)
        print(f"soak: images and daemon logs kept in {soak.dir}", file=sys.stderr)
    except KeyboardInterrupt:
        print(f"soak: interrupted (seed {args.seed})", file=sys.stderr)
    finally:
        soak.teardown()
    elapsed = time.monotonic() - t0
    summary = ", ".join(f"{k} {v}" for k, v in soak.stats.items())
    print(
        f"soak: {'OK' if ok else 'FAILED'} after {elapsed:.1f} s (seed {args.seed}): {summary}",
        flush=True,
    )
    if ok and own_dir and not any(os.path.ismount(workdir / v / "mnt") for v in variants):
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
