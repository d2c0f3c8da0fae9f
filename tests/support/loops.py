"""Loop devices and file system mounts for tests, always released: a test that fails leaves no
loop device bound to a file (it would keep a mount's disk.raw busy) and nothing mounted."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from qcowfs_dev.mounts import is_mounted, mount_table
from qcowfs_dev.oracles import run
from qcowfs_dev.proc import wait_for


def _loop_name(dev: str) -> str:
    return os.path.basename(dev)


def _loop_bound(dev: str) -> bool:
    return os.path.exists(f"/sys/block/{_loop_name(dev)}/loop/backing_file")


@contextlib.contextmanager
def loop_device(backing: Path, *opts: str):
    """losetup OPTS --find --show BACKING; always detached at exit (mounts of it first)."""
    dev = run(["losetup", *opts, "--find", "--show", backing]).stdout.strip()
    assert dev.startswith("/dev/loop"), f"losetup printed {dev!r}"
    try:
        yield dev
    finally:
        for src, mp, _ in mount_table():
            if src == dev:
                if run(["umount", mp], check=False).returncode != 0:
                    run(["umount", "-l", mp], check=False)
        run(["losetup", "-d", dev], check=False)
        wait_for(lambda: not _loop_bound(dev), timeout=30, what=f"{dev} detached")


@contextlib.contextmanager
def mounted_fs(dev: str, where: Path, *opts: str):
    where.mkdir(exist_ok=True)
    run(["mount", *opts, dev, where])
    try:
        yield where
    finally:
        if is_mounted(where) and run(["umount", where], check=False).returncode != 0:
            run(["umount", "-l", where], check=False)
