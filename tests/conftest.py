"""Shared fixtures: real mounts in a subprocess, QEMU tools as the oracle.

Mounts are waited for by polling os.path.ismount (never fixed sleeps) and are
always unmounted in teardown; a daemon that logged a traceback fails the test.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

QCOWFS = [sys.executable, "-m", "qcowfs"]
FUSE_AVAILABLE = os.path.exists("/dev/fuse") and shutil.which("fusermount3") is not None

needs_fuse = pytest.mark.skipif(not FUSE_AVAILABLE, reason="/dev/fuse or fusermount3 missing: FUSE tests cannot run here")


def run(cmd, check=True, **kw) -> subprocess.CompletedProcess:
    """Run a command, capture text output; on failure show what it printed."""
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    p = subprocess.run([str(c) for c in cmd], **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"{cmd} exited {p.returncode}\nstdout: {p.stdout}\nstderr: {p.stderr}")
    return p


def qemu_img(*args, check=True) -> subprocess.CompletedProcess:
    return run(["qemu-img", *args], check=check)


def qemu_io(image, *commands, fmt="qcow2", check=True) -> subprocess.CompletedProcess:
    cmd = ["qemu-io", "-f", fmt]
    for c in commands:
        cmd += ["-c", c]
    cmd.append(str(image))
    return run(cmd, check=check)


def qemu_check(image) -> dict:
    """qemu-img check as JSON plus its exit code under key 'rc' (0 clean, 2 corrupt, 3 leaks)."""
    p = run(["qemu-img", "check", "--output=json", image], check=False)
    try:
        data = json.loads(p.stdout)
    except json.JSONDecodeError:
        data = {"stdout": p.stdout}
    data["rc"] = p.returncode
    data["stderr"] = p.stderr
    return data


def assert_clean(image) -> None:
    """The image passes qemu-img check with no errors and no leaks."""
    res = qemu_check(image)
    assert res["rc"] == 0, f"qemu-img check {image}: {res}"


def qemu_info(image) -> dict:
    return json.loads(run(["qemu-img", "info", "-U", "--output=json", image]).stdout)


def wait_for(predicate, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    delay = 0.005
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


class Mount:
    """A qcowfs daemon serving IMAGE at MNT, run with --foreground in a subprocess."""

    def __init__(self, image: Path, mnt: Path, log: Path, read_only: bool = False, extra=()):
        self.image = Path(image)
        self.mnt = Path(mnt)
        self.log = Path(log)
        self.disk = self.mnt / "disk.raw"
        self.bitmaps = self.mnt / ".bitmaps"
        cmd = [*QCOWFS, "mount", "--foreground", "--log", str(log)]
        if read_only:
            cmd.append("--read-only")
        cmd += [*extra, str(image), str(mnt)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_for(lambda: os.path.ismount(self.mnt) or self.proc.poll() is not None, what=f"mount of {mnt}")
        except AssertionError:
            self.kill()
            raise
        if self.proc.poll() is not None:
            out, err = self.proc.communicate()
            raise AssertionError(f"qcowfs mount exited {self.proc.returncode}: {err.strip()} {out.strip()}")

    def log_text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def unmount(self, timeout=60.0) -> int:
        """Unmount cleanly (fusermount3 -u) and wait for the daemon's shutdown work; returns its exit code."""
        if self.proc.poll() is None and os.path.ismount(self.mnt):
            run(["fusermount3", "-u", self.mnt], check=False)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError("daemon did not exit after unmount")
        return self.proc.returncode

    def kill(self) -> None:
        """kill -9 the daemon (a crash) and lazily detach the dead mount."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if os.path.ismount(self.mnt) or _is_dead_mount(self.mnt):
            run(["fusermount3", "-u", "-z", self.mnt], check=False)

    def assert_no_traceback(self) -> None:
        text = self.log_text()
        assert "Traceback" not in text, f"daemon logged a traceback:\n{text}"


def _is_dead_mount(path: Path) -> bool:
    try:
        os.stat(path)
        return False
    except OSError:
        return True


@pytest.fixture
def mount(tmp_path):
    """Factory: mount(image, read_only=False) -> Mount; every mount is unmounted and checked at teardown."""
    mounts: list[Mount] = []

    def factory(image, read_only=False, extra=(), mnt=None) -> Mount:
        mp = Path(mnt) if mnt else tmp_path / f"mnt{len(mounts)}"
        mp.mkdir(exist_ok=True)
        m = Mount(Path(image), mp, tmp_path / f"daemon{len(mounts)}.log", read_only=read_only, extra=extra)
        mounts.append(m)
        return m

    yield factory
    errors = []
    for m in mounts:
        with contextlib.suppress(Exception):
            if m.proc.poll() is None:
                rc = m.unmount()
                if rc != 0:
                    errors.append(f"daemon for {m.image} exited {rc}: {m.proc.stderr.read() if m.proc.stderr else ''}")
        if os.path.ismount(m.mnt):
            run(["fusermount3", "-u", "-z", m.mnt], check=False)
        if "Traceback" in m.log_text():
            errors.append(f"daemon for {m.image} logged a traceback:\n{m.log_text()}")
    assert not errors, "\n".join(errors)


def sha256(path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
