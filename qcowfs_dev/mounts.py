"""The one lifecycle of a qcowfs daemon and its mount, for every test and script that mounts.

- Mount(...) starts `qcowfs mount --foreground` in a subprocess and waits, polling
  os.path.ismount (never a fixed sleep), until it is mounted or the daemon exits;
- Mount.unmount() / stop(): fusermount3 -u, retried while the mount is busy, then wait for the
  daemon's shutdown work (bitmaps stored, image closed); a daemon that does not exit is killed,
  and what was seen is kept in .problem (who holds the mount, where the daemon's threads wait);
- Mount.kill(): kill -9 (a crash), then the dead mount is detached lazily;
- a dead FUSE mount fails stat() and os.path.ismount() misses it: is_mounted() reads the mount
  table (/proc/self/mountinfo), and detach() lazily unmounts whatever is left;
- on any failure the message carries diagnostics(): exit status, stderr, the daemon log's tail.

No pytest here: scripts/soak, scripts/bench and scripts/fuzz use it too. Failures raise MountFailed, an
AssertionError (pytest reports it as a test failure; scripts catch it).
"""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from .proc import StrPath, wait_for

QCOWFS = [sys.executable, "-m", "qcowfs"]
FUSE_AVAILABLE = os.path.exists("/dev/fuse") and shutil.which("fusermount3") is not None

__all__ = [
    "QCOWFS",
    "FUSE_AVAILABLE",
    "Mount",
    "MountFailed",
    "mount_table",
    "is_mounted",
    "is_dead_mount",
    "detach",
    "unmount",
    "holders",
    "wchans",
    "wait_for",
]


class MountFailed(AssertionError):
    """A mount that did not come up, or a daemon that did not go down."""


# ----------------------------------------------------------------------------- the mount table
def _unescape(field: str) -> str:
    """The kernel's octal escapes in mount table fields (\\040 space, \\011 tab, \\012 newline, \\134 backslash)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mount_table() -> list[tuple[str, str, str]]:
    """[(source, mount point, fstype)] of every mount this process sees, escapes decoded."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            # ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER
            sep = fields.index("-")
            out.append((_unescape(fields[sep + 2]), _unescape(fields[4]), fields[sep + 1]))
    return out


def _canonical(path: StrPath) -> str:
    # the parent is resolved (it is alive); a dead mount point itself cannot be stat'ed
    p = os.path.abspath(path)
    return os.path.join(os.path.realpath(os.path.dirname(p)), os.path.basename(p))


def is_mounted(path: StrPath) -> bool:
    """Something is mounted on PATH, alive or dead (a dead FUSE mount fails stat: only the table tells)."""
    p = _canonical(path)
    try:
        return any(mp == p for _, mp, _ in mount_table())
    except OSError:
        return os.path.ismount(p)


def is_dead_mount(path: StrPath) -> bool:
    """stat() of PATH fails: a FUSE mount whose daemon is gone (ENOTCONN), or no such path."""
    try:
        os.stat(path)
        return False
    except OSError:
        return True


def detach(path: StrPath, lazy_only: bool = False) -> bool:
    """Unmount whatever is left on PATH: fusermount3 -u, then lazily (-u -z). True if nothing is left."""
    if not lazy_only and is_mounted(path):
        subprocess.run(["fusermount3", "-u", str(path)], capture_output=True)
    if is_mounted(path):
        subprocess.run(["fusermount3", "-u", "-z", str(path)], capture_output=True)
    return not is_mounted(path)


def unmount(
    path: StrPath, busy_retry: float = 10.0, on_busy: Optional[Callable[[str], object]] = None
) -> Optional[subprocess.CompletedProcess[str]]:
    """fusermount3 -u PATH, retried every 0.1 s while it fails (busy) for up to busy_retry seconds,
    then lazily (-u -z), after on_busy(stderr) if given. Returns the last fusermount3 -u result
    (None if nothing was mounted)."""
    deadline = time.monotonic() + busy_retry
    p = None
    while is_mounted(path):
        p = subprocess.run(["fusermount3", "-u", str(path)], capture_output=True, text=True)
        if p.returncode == 0 or not is_mounted(path):
            break
        if time.monotonic() > deadline:
            if on_busy is not None:
                on_busy(p.stderr.strip())
            subprocess.run(["fusermount3", "-u", "-z", str(path)], capture_output=True)
            break
        time.sleep(0.1)
    return p


# ----------------------------------------------------------------------------- diagnostics
def holders(mnt: StrPath) -> str:
    """Processes with a file, cwd or root inside mnt (what makes an unmount fail with EBUSY)."""
    prefix = str(mnt) + "/"
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        paths = []
        try:
            for name in ("cwd", "root"):
                paths.append(os.readlink(f"/proc/{pid}/{name}"))
            for fd in os.listdir(f"/proc/{pid}/fd"):
                paths.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass
        hits = sorted({p for p in paths if p == str(mnt) or p.startswith(prefix)})
        if hits:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            except OSError:
                cmd = "?"
            found.append(f"pid {pid} ({cmd[:120]}): {', '.join(hits)}")
    return "; ".join(found) or "none found"


def wchans(pid: int) -> str:
    """Where each thread of pid waits in the kernel (/proc/PID/task/*/wchan)."""
    out = []
    try:
        for task in sorted(os.listdir(f"/proc/{pid}/task")):
            with open(f"/proc/{pid}/task/{task}/wchan") as f:
                out.append(f.read().strip() or "?")
    except OSError:
        pass
    return ", ".join(out)


def _tail(text: str, lines: int) -> str:
    parts = text.rstrip("\n").splitlines()
    return "\n".join(parts[-lines:]) if parts else ""


# ----------------------------------------------------------------------------- the daemon
class Mount:
    """A qcowfs daemon serving IMAGE at MNT: `qcowfs mount --foreground --log LOG` in a subprocess.

    must_mount: a daemon that exits instead of mounting raises MountFailed (False: .mounted tells,
    and .stdout/.stderr hold what it printed). stderr_file: the daemon's stdout and stderr go to that
    file (readable while it runs) instead of pipes. python/env/cwd: how to run `-m qcowfs`.
    """

    proc: subprocess.Popen[Any]  # text pipes, or bytes into stderr_file

    def __init__(
        self,
        image: StrPath,
        mnt: StrPath,
        log: StrPath,
        read_only: bool = False,
        extra: Iterable[object] = (),
        *,
        timeout: float = 20.0,
        must_mount: bool = True,
        python: Optional[str] = None,
        env: Optional[dict[str, str]] = None,
        cwd: Optional[StrPath] = None,
        stderr_file: Optional[StrPath] = None,
    ):
        self.image = Path(image)
        self.mnt = Path(mnt)
        self.log = Path(log)
        self.disk = self.mnt / "disk.raw"
        self.bitmaps = self.mnt / ".bitmaps"
        self.stderr_file = Path(stderr_file) if stderr_file else None
        self.problem = ""  # what stop() saw when the daemon did not go down by itself
        self._out: Optional[tuple[str, str]] = None
        py = [python, "-m", "qcowfs"] if python else QCOWFS
        self.cmd = [*py, "mount", "--foreground", "--log", str(log)]
        if read_only:
            self.cmd.append("--read-only")
        self.cmd += [*map(str, extra), str(image), str(mnt)]
        if self.stderr_file:
            with open(self.stderr_file, "w") as errf:
                self.proc = subprocess.Popen(
                    self.cmd, stdout=errf, stderr=errf, env=env, cwd=str(cwd) if cwd else None
                )
        else:
            self.proc = subprocess.Popen(
                self.cmd,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
                cwd=str(cwd) if cwd else None,
            )
        try:
            wait_for(
                lambda: os.path.ismount(self.mnt) or self.proc.poll() is not None,
                timeout=timeout,
                what=f"mount of {mnt}",
                max_delay=0.05,
            )
        except AssertionError:
            self.stop(force=True)
            raise MountFailed(
                f"qcowfs mount of {image} neither mounted nor exited in {timeout:g}s\n"
                f"{self.diagnostics()}"
            ) from None
        self.mounted = os.path.ismount(self.mnt)
        if not self.mounted:
            self._collect()
            if must_mount:
                raise MountFailed(
                    f"qcowfs mount exited {self.proc.returncode}: {self.stderr.strip()} "
                    f"{self.stdout.strip()}"
                )

    # ------------------------------------------------------------------ output
    def _collect(self, timeout: Optional[float] = None) -> None:
        """Read what an exited daemon printed (once); the pipes are then replaced by StringIO copies,
        so that proc.stderr.read() still gives it."""
        if self._out is not None:
            return
        if self.stderr_file:
            self.proc.wait(timeout=timeout)
            self._out = (
                "",
                self.stderr_file.read_text(errors="replace") if self.stderr_file.exists() else "",
            )
            return
        out, err = self.proc.communicate(timeout=timeout)
        self._out = (out or "", err or "")
        self.proc.stdout, self.proc.stderr = io.StringIO(self._out[0]), io.StringIO(self._out[1])

    @property
    def stdout(self) -> str:
        return self._out[0] if self._out else ""

    @property
    def stderr(self) -> str:
        """What the daemon printed on stderr: all of it once it exited, so far with stderr_file."""
        if self._out:
            return self._out[1]
        if self.stderr_file and self.stderr_file.exists():
            return self.stderr_file.read_text(errors="replace")
        return ""

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def diagnostics(self, log_lines: int = 60) -> str:
        """Exit status, stderr and the daemon log's tail (and who holds the mount, if it still is one)."""
        rc = self.proc.poll()
        lines = [
            f"daemon: {' '.join(self.cmd)} (pid {self.proc.pid}, "
            + ("running" if rc is None else f"exit {rc}")
            + ")"
        ]
        if self.problem:
            lines.append(f"problem: {self.problem}")
        if is_mounted(self.mnt):
            lines.append(
                f"{self.mnt} is mounted{' (dead)' if is_dead_mount(self.mnt) else ''}; "
                f"processes using it: {holders(self.mnt)}"
            )
        if rc is None:
            lines.append(f"daemon threads wait in: {wchans(self.proc.pid)}")
        lines.append(f"stderr: {self.stderr.strip() or '(none)'}")
        lines.append(
            f"log {self.log} (last {log_lines} lines):\n{_tail(self.log_text(), log_lines) or '(empty)'}"
        )
        return "\n".join(lines)

    def assert_no_traceback(self) -> None:
        text = self.log_text()
        assert "Traceback" not in text, f"daemon logged a traceback:\n{text}"

    # ------------------------------------------------------------------ going down
    def stop(
        self,
        force: bool = False,
        timeout: float = 60.0,
        busy_retry: float = 20.0,
        sigterm_grace: float = 0.0,
    ) -> Optional[int]:
        """Unmount and wait for the daemon; returns its exit code. Never raises.

        fusermount3 -u, retried for busy_retry seconds while the mount is busy; then up to `timeout`
        for the daemon's shutdown work (5 s if the mount stayed busy or was not there). A daemon still running gets
        SIGTERM (with sigterm_grace > 0: it unmounts and stores its bitmaps itself) and finally
        SIGKILL, with what was seen recorded in .problem. force: SIGKILL at once (a hung mount).
        Whatever is left on the mount point is detached lazily."""
        umount = None
        seen_holders = ""
        if not force and self.proc.poll() is None and os.path.ismount(self.mnt):
            deadline = time.monotonic() + busy_retry
            umount = subprocess.run(
                ["fusermount3", "-u", str(self.mnt)], capture_output=True, text=True
            )
            if umount.returncode != 0 and os.path.ismount(self.mnt):
                seen_holders = holders(self.mnt)
                # busy: perhaps a program outside the test looking into the mount; try for a while
                while (
                    umount.returncode != 0
                    and os.path.ismount(self.mnt)
                    and time.monotonic() < deadline
                ):
                    time.sleep(0.2)
                    umount = subprocess.run(
                        ["fusermount3", "-u", str(self.mnt)], capture_output=True, text=True
                    )
        if self.proc.poll() is None:
            # the shutdown work only runs after an unmount; a daemon not asked to go down gets 5 s
            going_down = umount is not None and (
                umount.returncode == 0 or not os.path.ismount(self.mnt)
            )
            wait = 0.1 if force else (timeout if going_down else min(timeout, 5.0))
            try:
                self.proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                if not force and sigterm_grace > 0:
                    self.proc.terminate()
                    try:
                        self.proc.wait(timeout=sigterm_grace)
                    except subprocess.TimeoutExpired:
                        pass
                if self.proc.poll() is None:
                    if not force:
                        self.problem = (
                            f"daemon still running {wait:g}s after fusermount3 -u "
                            f"(exit {umount.returncode if umount else '-'}: "
                            f"{umount.stderr.strip() if umount else 'not run'})"
                            + (
                                f" and {sigterm_grace:g}s after SIGTERM"
                                if sigterm_grace > 0
                                else ""
                            )
                            + f"; still mounted: {os.path.ismount(self.mnt)}; daemon threads waiting "
                            f"in: {wchans(self.proc.pid)}; processes using the mount: "
                            f"{seen_holders or holders(self.mnt)}"
                        )
                    self.proc.kill()
        try:
            self._collect(timeout=30)
        except subprocess.TimeoutExpired:  # pragma: no cover - a daemon that survives SIGKILL
            pass
        detach(self.mnt)
        return self.proc.returncode

    def unmount(self, timeout: float = 60.0) -> Optional[int]:
        """Unmount cleanly (fusermount3 -u, retried while busy) and wait for the daemon's shutdown
        work; returns its exit code. A daemon that does not exit is killed: MountFailed."""
        rc = self.stop(timeout=timeout)
        if self.problem:
            raise MountFailed(f"daemon did not exit after unmount\n{self.diagnostics()}")
        return rc

    def kill(self) -> None:
        """kill -9 the daemon (a crash) and lazily detach the dead mount."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        if is_mounted(self.mnt):
            detach(self.mnt, lazy_only=True)

    def alive(self) -> bool:
        return self.proc.poll() is None
