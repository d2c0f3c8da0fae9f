"""Shared fixtures: real mounts in a subprocess, QEMU tools as the oracle.

The tests are in folders by layer: unit/ (no mount, no FUSE Operations), ops/ (QcowOperations
called directly), mount/ (real mounts), harness/ (power-loss crash states, fuzzing, soak, kill -9).
The helpers live in tests/support/ (oracles, mounts, probes, images, syscalls, seeds, ...); what
tests imported from here before is re-exported. Mounts are waited for by polling os.path.ismount (never fixed sleeps) and are
always unmounted in teardown; a daemon that logged a traceback fails the test.
"""

from __future__ import annotations

import contextlib
import hashlib
import sys
from pathlib import Path

import pytest
from support.repo import ROOT

from qcowfs_dev.mounts import FUSE_AVAILABLE, QCOWFS, Mount, detach, is_mounted
from qcowfs_dev.oracles import assert_clean, qemu_check, qemu_img, qemu_info, qemu_io
from qcowfs_dev.proc import run, wait_for

try:
    import qcowfs  # noqa: F401
except ImportError:  # run from a venv without the project installed: use the work tree
    sys.path.insert(0, str(ROOT))

__all__ = [
    "QCOWFS",
    "FUSE_AVAILABLE",
    "needs_fuse",
    "Mount",
    "run",
    "wait_for",
    "qemu_img",
    "qemu_io",
    "qemu_check",
    "assert_clean",
    "qemu_info",
    "sha256",
]

needs_fuse = pytest.mark.skipif(
    not FUSE_AVAILABLE, reason="/dev/fuse or fusermount3 missing: FUSE tests cannot run here"
)


@pytest.fixture
def mount(tmp_path):
    """Factory: mount(image, read_only=False) -> Mount; every mount is unmounted and checked at teardown."""
    mounts: list[Mount] = []

    def factory(image, read_only=False, extra=(), mnt=None) -> Mount:
        mp = Path(mnt) if mnt else tmp_path / f"mnt{len(mounts)}"
        mp.mkdir(exist_ok=True)
        m = Mount(
            Path(image), mp, tmp_path / f"daemon{len(mounts)}.log", read_only=read_only, extra=extra
        )
        mounts.append(m)
        return m

    yield factory
    errors = []
    for m in mounts:
        with contextlib.suppress(Exception):
            if m.proc.poll() is None:
                rc = m.unmount()
                if rc != 0:
                    errors.append(
                        f"daemon for {m.image} exited {rc}: {m.proc.stderr.read() if m.proc.stderr else ''}"
                    )
        if is_mounted(m.mnt):  # a dead mount (the daemon was killed) too
            detach(m.mnt, lazy_only=True)
        if "Traceback" in m.log_text():
            errors.append(f"daemon for {m.image} logged a traceback:\n{m.log_text()}")
    assert not errors, "\n".join(errors)


def sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
