"""The targets: each one a mounted guest disk fio runs against (qcowfs and its variants,
qemu-storage-daemon's FUSE export, the pass-through ceiling)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from typing import Callable, Optional

from qcowfs_dev.proc import checkout_env, wait_for

from .host import (
    MOUNT_TIMEOUT,
    REPO,
    STOP_TIMEOUT,
    BenchError,
    key_file,
    log,
    make_luks_qcow2,
    make_qcow2,
    mounted,
    proc_mem,
    run,
    secret,
    tail,
    unmount,
    wait_exit,
)
from .qemu10 import Qemu10

__all__ = [
    "CEILING",
    "Target",
    "QcowfsTarget",
    "IntentTarget",
    "BaselineTarget",
    "QemuTarget",
    "Qemu10Target",
    "CeilingTarget",
    "StockCeilingTarget",
    "SerialTarget",
    "LuksTarget",
    "LuksQemu10Target",
    "TARGET_CLASSES",
]

#: the ceiling (and slow host) file system, run as `python -m CEILING` from the checkout
CEILING = "qcowfs_dev.ceiling_fs"


class Target:
    """One mounted guest disk. start() returns the file fio opens; stop() is safe to call twice."""

    name = ""
    image = ""  # the image file the daemon serves (set by prepare())
    fio_file = ""  # what start() returned: the file fio opens
    prefill_bitmap = False  # warm-up: write the whole disk once (every granule of the bitmap dirty)
    host_latency_us = 0  # --host-latency-us: the image file is served by a slow file system
    slow_host: Optional[subprocess.Popen[bytes]] = None

    def __init__(self, workdir: str, tag: str, size: int):
        self.dir = os.path.join(workdir, f"{self.name}-{tag}")
        os.makedirs(self.dir, exist_ok=True)
        self.size = size
        self.proc: subprocess.Popen[bytes] | None = None
        self.mountpoint = ""
        self.logfile = os.path.join(self.dir, "daemon.log")
        #: called right after prepare() (rss-1t: a preallocated image in place of the prepared one)
        self.after_prepare: Optional[Callable[[], None]] = None

    # subclasses: prepare(filled_raw), command(), file()
    def prepare(self, filled_raw: str | None) -> None:
        raise NotImplementedError

    def command(self) -> list[str]:
        raise NotImplementedError

    def file(self) -> str:
        raise NotImplementedError

    def cwd(self) -> str | None:
        """The daemon's working directory (None: the bench's)."""
        return None

    def start(self, filled_raw: str | None) -> str:
        self.prepare(filled_raw)
        if self.after_prepare is not None:
            self.after_prepare()
        if self.host_latency_us and self.image:
            self.start_slow_host()
        os.sync()  # the set-up's dirty pages must not be written back during the measurement
        with open(self.logfile, "ab") as logf:
            # own session: a Ctrl-C on the terminal reaches only us, and we unmount in order
            proc = self.proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=logf,
                start_new_session=True,
                env=self.env(),
                cwd=self.cwd(),
            )
        try:
            wait_for(
                lambda: os.path.ismount(self.mountpoint) or proc.poll() is not None,
                timeout=MOUNT_TIMEOUT,
                what=f"{self.name} mount",
                max_delay=0.02,
            )
        except AssertionError:
            raise BenchError(
                f"{self.name}: not mounted after {MOUNT_TIMEOUT:.0f}s:\n{tail(self.logfile)}"
            ) from None
        if not os.path.ismount(self.mountpoint):
            raise BenchError(
                f"{self.name}: daemon exited with {proc.returncode} before mounting:\n"
                f"{tail(self.logfile)}"
            )
        return self.file()

    def start_slow_host(self) -> None:
        """Serve the image through qcowfs_dev/ceiling_fs.py --latency-us (every host read, write and
        fsync waits that long, many at once: a network or spinning disk) and point the daemon
        at that copy of the path."""
        mnt = os.path.join(self.dir, "host")
        os.makedirs(mnt, exist_ok=True)
        with open(os.path.join(self.dir, "host.log"), "ab") as logf:
            slow = self.slow_host = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    CEILING,
                    f"--latency-us={self.host_latency_us}",
                    self.image,
                    mnt,
                ],
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=logf,
                start_new_session=True,
                cwd=REPO,
            )
        wait_for(
            lambda: os.path.ismount(mnt) or slow.poll() is not None,
            timeout=MOUNT_TIMEOUT,
            what="slow host file system",
            max_delay=0.02,
        )
        if not os.path.ismount(mnt):
            raise BenchError(f"{self.name}: the slow host file system did not mount")
        self.image = os.path.join(mnt, "disk.raw")

    def stop_slow_host(self) -> None:
        proc, self.slow_host = self.slow_host, None
        if proc is None:
            return
        mnt = os.path.join(self.dir, "host")
        if mounted(mnt):
            unmount(mnt)
        if not wait_exit(proc, STOP_TIMEOUT):
            proc.kill()
            proc.wait()

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    def mem(self) -> dict[str, int]:
        return proc_mem(self.proc.pid) if self.proc and self.proc.poll() is None else {}

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            if self.mountpoint and mounted(self.mountpoint):
                self.request_stop(proc)
            elif proc.poll() is None:
                proc.terminate()  # never mounted (or already detached): nothing to flush through the mount
            if not wait_exit(proc, STOP_TIMEOUT):
                log(
                    f"bench: {self.name} daemon (pid {proc.pid}) still running {STOP_TIMEOUT:.0f}s after the "
                    "unmount; sending SIGTERM"
                )
                proc.terminate()
                if not wait_exit(proc, 10):
                    proc.kill()
                    proc.wait()
            if proc.returncode != 0:
                log(
                    f"bench: {self.name} daemon exited with {proc.returncode}:\n{tail(self.logfile)}"
                )
        finally:
            if self.mountpoint and mounted(self.mountpoint):
                unmount(self.mountpoint)
            self.after_stop()
            self.stop_slow_host()

    def after_stop(self) -> None:
        pass

    def request_stop(self, proc: subprocess.Popen[bytes]) -> None:
        unmount(self.mountpoint)


class QcowfsTarget(Target):
    name = "qcowfs"
    _was_running = False

    def prepare(self, filled_raw: str | None) -> None:
        self.image = os.path.join(self.dir, "disk.qcow2")
        self.mountpoint = os.path.join(self.dir, "mnt")
        os.makedirs(self.mountpoint, exist_ok=True)
        make_qcow2(self.image, self.size, filled_raw)
        run(["qemu-img", "bitmap", "--add", self.image, "bench0"])

    def env(self) -> dict[str, str]:
        # benchmark this checkout's package, whatever the interpreter has installed
        return checkout_env()

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "qcowfs",
            "mount",
            "--foreground",
            "--log",
            self.logfile,
            self.image,
            self.mountpoint,
        ]

    def file(self) -> str:
        return os.path.join(self.mountpoint, "disk.raw")

    def stop(self) -> None:
        self._was_running = self.proc is not None
        super().stop()

    def check_args(self) -> list[str]:
        """How qemu-img check opens the image after the run."""
        return [self.image]

    def after_stop(self) -> None:
        if self._was_running and os.path.exists(self.image):
            p = subprocess.run(
                ["qemu-img", "check", "-q", *self.check_args()],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            if p.returncode != 0:
                log(
                    f"bench: WARNING: qemu-img check {self.image} (exit {p.returncode}): {p.stdout.strip()}"
                )


class IntentTarget(QcowfsTarget):
    """qcowfs with write-intent (crash-proof) bitmaps."""

    name = "intent"
    prefill_bitmap = True

    def command(self) -> list[str]:
        return super().command()[:-2] + ["--bitmap-sync=intent", self.image, self.mountpoint]


class BaselineTarget(QcowfsTarget):
    """qcowfs from another revision (--baseline REV): the same image, bitmap and mount, only the
    package on PYTHONPATH differs."""

    name = "baseline"
    source = ""  # set by main(): the exported tree of REV

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = self.source
        return env

    def cwd(self) -> str | None:
        # `python -m` puts its working directory first on sys.path, ahead of PYTHONPATH: run from
        # the bench's (a checkout) it imported that checkout's qcowfs, and "baseline" measured the
        # code under test again (caught on 2026-12-04: a baseline daemon logging request lanes)
        return self.source


class QemuTarget(Target):
    """The system's qemu-storage-daemon (Debian bookworm: QEMU 7.2), default aio (threads)."""

    name = "qemu"
    binary = "qemu-storage-daemon"
    file_opts = ""

    def prepare(self, filled_raw: str | None) -> None:
        self.image = os.path.join(self.dir, "disk.qcow2")
        self.mountpoint = os.path.join(self.dir, "export")
        make_qcow2(self.image, self.size, filled_raw)
        open(self.mountpoint, "a").close()  # the FUSE export mounts over an existing regular file

    def command(self) -> list[str]:
        return [
            self.binary,
            "--blockdev",
            f"driver=file,node-name=f0,filename={self.image}{self.file_opts}",
            "--blockdev",
            "driver=qcow2,node-name=q0,file=f0",
            "--export",
            f"type=fuse,id=e0,node-name=q0,mountpoint={self.mountpoint},writable=on",
        ]

    def file(self) -> str:
        return self.mountpoint

    def request_stop(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)


class Qemu10Target(QemuTarget):
    """qemu-storage-daemon 10.0 (see Qemu10), exported exactly like qemu but with aio=io_uring on
    the file node. start() checks that the daemon really holds an io_uring instance."""

    name = "qemu10"
    file_opts = ",aio=io_uring"
    install: Qemu10 | None = None  # set by main()

    def _install(self) -> Qemu10:
        if self.install is None:
            raise BenchError("qemu10: QEMU 10 is not set up")
        return self.install

    def command(self) -> list[str]:
        cmd = super().command()
        cmd[0] = self._install().binary
        return cmd

    def env(self) -> dict[str, str]:
        return dict(self._install().env)

    def start(self, filled_raw: str | None) -> str:
        f = super().start(filled_raw)
        assert self.proc is not None
        rings = 0
        for fd in os.listdir(f"/proc/{self.proc.pid}/fd"):
            try:
                rings += os.readlink(f"/proc/{self.proc.pid}/fd/{fd}") == "anon_inode:[io_uring]"
            except OSError:
                pass
        if not rings:
            raise BenchError(
                f"{self.name}: the daemon holds no io_uring instance: aio=io_uring is not in use"
            )
        return f


class CeilingTarget(Target):
    name = "ceiling"

    def prepare(self, filled_raw: str | None) -> None:
        self.image = os.path.join(self.dir, "disk.img")
        self.mountpoint = os.path.join(self.dir, "mnt")
        os.makedirs(self.mountpoint, exist_ok=True)
        if os.path.exists(self.image):
            os.unlink(self.image)
        if filled_raw:
            # the filled raw file itself (fresh data, allocated); qcow2 copies were converted from it already
            os.rename(filled_raw, self.image)
        else:
            with open(self.image, "wb") as f:
                f.truncate(self.size)  # sparse: the first write allocates in the host filesystem

    def command(self) -> list[str]:
        return [sys.executable, "-m", CEILING, self.image, self.mountpoint]

    def cwd(self) -> str | None:
        return (
            REPO  # `-m` finds this checkout's qcowfs_dev (and the ceiling this checkout's qcowfs)
        )

    def file(self) -> str:
        return os.path.join(self.mountpoint, "disk.raw")


class StockCeilingTarget(CeilingTarget):
    """The ceiling served by pyfuse3's own request loop (not in the default run): what the
    fast loop in qcowfs/fuse/request_loop.py is worth."""

    name = "stock"

    def prepare(self, filled_raw: str | None) -> None:
        if filled_raw:
            # a copy: the plain ceiling, set up after this one, takes the filled file over
            self.image = os.path.join(self.dir, "disk.img")
            self.mountpoint = os.path.join(self.dir, "mnt")
            os.makedirs(self.mountpoint, exist_ok=True)
            shutil.copyfile(filled_raw, self.image)
        else:
            super().prepare(None)

    def command(self) -> list[str]:
        return [sys.executable, "-m", CEILING, "--stock-loop", self.image, self.mountpoint]


class SerialTarget(QcowfsTarget):
    """qcowfs serving one request at a time (-o io_threads=0): what the I/O threads add."""

    name = "serial"

    def command(self) -> list[str]:
        return super().command()[:-2] + ["-o", "io_threads=0", self.image, self.mountpoint]


class LuksTarget(QcowfsTarget):
    """qcowfs on a LUKS-encrypted image (issue 23), its passphrase in a key file."""

    name = "luks"
    key = ""

    def prepare(self, filled_raw: str | None) -> None:
        self.image = os.path.join(self.dir, "disk.qcow2")
        self.mountpoint = os.path.join(self.dir, "mnt")
        os.makedirs(self.mountpoint, exist_ok=True)
        self.key = key_file(self.dir)
        make_luks_qcow2(self.image, self.size, filled_raw, self.key)
        # the bitmap commands need no key (metadata only)
        run([sys.executable, "-m", "qcowfs", "bitmap", "add", self.image, "bench0"], env=self.env())

    def command(self) -> list[str]:
        return super().command()[:-2] + ["--key-file", self.key, self.image, self.mountpoint]

    def check_args(self) -> list[str]:
        spec = f"driver=qcow2,file.filename={self.image},encrypt.key-secret=sec0"
        return ["--object", secret(self.key), "--image-opts", spec]


class LuksQemu10Target(Qemu10Target):
    """qemu-storage-daemon 10.0 (aio=io_uring) on the same kind of LUKS image, the passphrase
    from a secret object."""

    name = "luks-qemu10"
    key = ""

    def prepare(self, filled_raw: str | None) -> None:
        self.image = os.path.join(self.dir, "disk.qcow2")
        self.mountpoint = os.path.join(self.dir, "export")
        self.key = key_file(self.dir)
        make_luks_qcow2(self.image, self.size, filled_raw, self.key)
        open(self.mountpoint, "a").close()

    def command(self) -> list[str]:
        cmd = super().command()
        i = cmd.index("driver=qcow2,node-name=q0,file=f0")
        cmd[i] += ",encrypt.format=luks,encrypt.key-secret=sec0"
        return [cmd[0], "--object", secret(self.key), *cmd[1:]]


TARGET_CLASSES: dict[str, type[Target]] = {
    "serial": SerialTarget,
    "qcowfs": QcowfsTarget,
    "intent": IntentTarget,
    "baseline": BaselineTarget,
    "qemu": QemuTarget,
    "qemu10": Qemu10Target,
    "ceiling": CeilingTarget,
    "stock": StockCeilingTarget,
    "luks": LuksTarget,
    "luks-qemu10": LuksQemu10Target,
}
