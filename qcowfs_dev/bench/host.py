"""The host side of the bench: commands, processes, daemon logs and images, the bench's error and log."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

from qcowfs_dev import mounts
from qcowfs_dev.proc import REPO

__all__ = [
    "REPO",
    "CLUSTER",
    "FILL_BYTE",
    "MOUNT_TIMEOUT",
    "STOP_TIMEOUT",
    "BenchError",
    "log",
    "run",
    "mounted",
    "unmount",
    "wait_exit",
    "proc_mem",
    "tail",
    "fill_raw",
    "make_qcow2",
]

FILL_BYTE = 0x5A
CLUSTER = 65536
MOUNT_TIMEOUT = 60.0
STOP_TIMEOUT = 120.0


class BenchError(Exception):
    pass


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
    if p.returncode != 0:
        raise BenchError(
            f"{' '.join(cmd)} failed (exit {p.returncode}): {(p.stderr or p.stdout).strip()[-2000:]}"
        )
    return p


def mounted(path: str) -> bool:
    """True while anything (even a dead FUSE daemon's mount, which os.path.ismount misses) is mounted on path."""
    return mounts.is_mounted(path)


def unmount(path: str) -> None:
    """fusermount3 -u, retried while busy (fio just killed), finally lazily."""
    mounts.unmount(
        path,
        busy_retry=10,
        on_busy=lambda err: log(f"bench: {path} stays busy ({err}); detaching it lazily"),
    )


def wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    try:
        proc.wait(timeout)
        return True
    except subprocess.TimeoutExpired:
        return False


def proc_mem(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmHWM", "VmRSS"):
                    out[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return out


def tail(path: str, n: int = 15) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""


def fill_raw(path: str, size: int) -> None:
    chunk = bytes([FILL_BYTE]) * (16 << 20)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        done = 0
        while done < size:
            done += os.write(fd, memoryview(chunk)[: min(len(chunk), size - done)])
    finally:
        os.close(fd)


def make_qcow2(path: str, size: int, filled_from: str | None) -> None:
    if os.path.exists(path):
        os.unlink(path)
    if filled_from:
        # every cluster allocated and holding 0x5a (qemu-img convert keeps no zero clusters of it)
        run(
            [
                "qemu-img",
                "convert",
                "-f",
                "raw",
                "-O",
                "qcow2",
                "-o",
                f"cluster_size={CLUSTER}",
                filled_from,
                path,
            ]
        )
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
                path,
                str(size),
            ]
        )


#: the bench's LUKS images: QEMU's default cipher (aes-256-xts-plain64), PBKDF2 timed at 200 ms
#: (each mount unlocks; the unlock time itself is scripts/bench-unlock's)
LUKS_OPTS = "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=200"
PASSPHRASE = b"bench passphrase"


def key_file(dirname: str) -> str:
    """The bench's passphrase in DIR/key, readable by its owner only."""
    path = os.path.join(dirname, "key")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, PASSPHRASE)
    finally:
        os.close(fd)
    return path


def secret(key: str, ident: str = "sec0") -> str:
    return f"secret,id={ident},file={key},format=raw"


def make_luks_qcow2(path: str, size: int, filled_from: str | None, key: str) -> None:
    """make_qcow2 for an encrypted image. qemu-img times PBKDF2 with the thread's CPU clock and
    gives up now and then on this VM ("Unable to get accurate CPU usage"): tried again."""
    if os.path.exists(path):
        os.unlink(path)
    opts = f"cluster_size={CLUSTER},{LUKS_OPTS}"
    if filled_from:
        cmd = ["qemu-img", "convert", "--object", secret(key), "-f", "raw", "-O", "qcow2"]
        cmd += ["-o", opts, filled_from, path]
    else:
        cmd = ["qemu-img", "create", "-q", "-f", "qcow2", "--object", secret(key), "-o", opts]
        cmd += [path, str(size)]
    for _ in range(12):
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if p.returncode == 0:
            return
        if "accurate CPU usage" not in p.stdout:
            break
    raise BenchError(f"{' '.join(cmd)}: {p.stdout.strip()}")
