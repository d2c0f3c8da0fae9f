"""patches/pyfuse3-3.5.0-*.patch on a real mount (issue 14 item 1).

The patches add Operations.fallocate and Operations.lseek to pyfuse3 (and a public
main(wait_readable=...) hook); scripts/build-pyfuse3 builds and installs the patched pyfuse3
into a venv. These tests mount tests/support/patched_pyfuse3_fs.py (one file over a fake
data/hole layout) and check, through the kernel, that

- os.posix_fallocate and fallocate(2) (through ctypes) reach the handler with the mode, offset
  and length the caller gave: 0, PUNCH_HOLE|KEEP_SIZE, KEEP_SIZE, ZERO_RANGE (with and without
  KEEP_SIZE); the handler's own error comes back to the caller; the modes the kernel refuses
  itself (COLLAPSE, INSERT, UNSHARE, PUNCH_HOLE without KEEP_SIZE) never reach it;
- os.lseek(fd, x, SEEK_DATA / SEEK_HOLE) returns what the handler said, moves the file
  position there, and fails with ENXIO past the end of the file (and for SEEK_DATA in a
  trailing hole);
- the default handlers (FUSEError(ENOSYS)) get what the kernel does with ENOSYS: fallocate
  fails with EOPNOTSUPP, lseek falls back to the generic answer, and neither is asked again;
- with the hook patch, main(wait_readable=...) serves the mount through the given waiter.

They skip only when the installed pyfuse3 lacks what the patches add (the stock pyfuse3 does):
then `scripts/build-pyfuse3 VENV/bin/python` installs the patched one.
"""

from __future__ import annotations

import errno
import inspect
import json
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyfuse3
import pytest
from support import patched_pyfuse3_fs as fs
from support.syscalls import (
    FALLOC_FL_COLLAPSE_RANGE,
    FALLOC_FL_INSERT_RANGE,
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_UNSHARE_RANGE,
    FALLOC_FL_ZERO_RANGE,
    errno_of,
    fallocate,
)

from qcowfs_dev.mounts import detach, is_mounted, unmount
from qcowfs_dev.proc import wait_for

KiB = 1024
HELPER = Path(fs.__file__)

HAS_HANDLERS = all(
    inspect.iscoroutinefunction(getattr(pyfuse3.Operations, name, None))
    for name in ("fallocate", "lseek")
)
HAS_HOOK = "wait_readable" in inspect.signature(pyfuse3.main).parameters
BUILD = "scripts/build-pyfuse3 VENV/bin/python installs the patched one"

pytestmark = pytest.mark.skipif(
    not HAS_HANDLERS, reason=f"the installed pyfuse3 has no Operations.fallocate/lseek: {BUILD}"
)


class OneFileMount:
    """A running patched_pyfuse3_fs.py: its mount, its one file and the calls it recorded."""

    def __init__(self, tmp_path: Path, *flags: str):
        self.mnt = tmp_path / "mnt"
        self.mnt.mkdir()
        self.disk = self.mnt / fs.NAME.decode()
        self.record = tmp_path / "calls.jsonl"
        self.log = tmp_path / "fs.log"
        self.record.touch()
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(HELPER), str(self.mnt), "--record", str(self.record), *flags],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_for(
            lambda: os.path.ismount(self.mnt) or self.proc.poll() is not None,
            timeout=20,
            what=f"{HELPER.name} to mount {self.mnt}",
        )
        assert self.proc.poll() is None, (
            f"{HELPER.name} exited {self.proc.returncode}:\n{self.log.read_text()}"
        )

    def calls(self, op: str) -> list:
        """The recorded calls of `op`, oldest first, without the "op" key."""
        out = []
        for line in self.record.read_text().splitlines():
            call = json.loads(line)
            if call.pop("op") == op:
                out.append(call)
        return out

    def open(self, flags: int = os.O_RDWR) -> int:
        return os.open(self.disk, flags)

    def stop(self) -> int:
        """Unmount, wait for the daemon; its exit status (it is killed after 20 s)."""
        unmount(self.mnt)
        try:
            return self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
        finally:
            if is_mounted(self.mnt):
                detach(self.mnt, lazy_only=True)


@pytest.fixture
def onefile(tmp_path):
    """Factory: onefile(*flags) mounts patched_pyfuse3_fs.py; unmounted (and checked) at teardown."""
    mounts: list[OneFileMount] = []

    def factory(*flags: str) -> OneFileMount:
        path = tmp_path / f"m{len(mounts)}"
        path.mkdir()
        m = OneFileMount(path, *flags)
        mounts.append(m)
        return m

    yield factory
    problems = []
    for m in mounts:
        rc = m.stop()
        if rc != 0 or "Traceback" in m.log.read_text():
            problems.append(f"{HELPER.name} exited {rc}:\n{m.log.read_text()}")
    assert not problems, "\n".join(problems)


# ----------------------------------------------------------------------------- fallocate
def test_posix_fallocate_reaches_the_handler(onefile):
    m = onefile()
    fd = m.open()
    try:
        os.posix_fallocate(fd, 100 * KiB, 8 * KiB)
        assert m.calls("fallocate") == [
            {"fh": fs.FH, "mode": 0, "offset": 100 * KiB, "length": 8 * KiB}
        ]
        assert os.fstat(fd).st_size == fs.SIZE

        # mode 0 past the end grows the file: the kernel takes the new size from the request
        os.posix_fallocate(fd, fs.SIZE - 4 * KiB, 64 * KiB)
        assert m.calls("fallocate")[-1] == {
            "fh": fs.FH,
            "mode": 0,
            "offset": fs.SIZE - 4 * KiB,
            "length": 64 * KiB,
        }
        assert os.fstat(fd).st_size == fs.SIZE + 60 * KiB
    finally:
        os.close(fd)


def test_fallocate_modes_reach_the_handler(onefile):
    m = onefile()
    fd = m.open()
    try:
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 256 * KiB, 64 * KiB)
        fallocate(fd, FALLOC_FL_KEEP_SIZE, fs.SIZE, 1024 * KiB)
        fallocate(fd, FALLOC_FL_ZERO_RANGE, 4 * KiB, 8 * KiB)
        fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, 40 * KiB, 4 * KiB)
        assert m.calls("fallocate") == [
            {
                "fh": fs.FH,
                "mode": FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                "offset": 256 * KiB,
                "length": 64 * KiB,
            },
            {"fh": fs.FH, "mode": FALLOC_FL_KEEP_SIZE, "offset": fs.SIZE, "length": 1024 * KiB},
            {"fh": fs.FH, "mode": FALLOC_FL_ZERO_RANGE, "offset": 4 * KiB, "length": 8 * KiB},
            {
                "fh": fs.FH,
                "mode": FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE,
                "offset": 40 * KiB,
                "length": 4 * KiB,
            },
        ]
        assert os.fstat(fd).st_size == fs.SIZE  # KEEP_SIZE kept it, and ZERO_RANGE stayed inside
        # the punched extent is gone from the layout (lseek) and reads back as zeroes
        assert os.lseek(fd, 64 * KiB, os.SEEK_DATA) == 768 * KiB
        assert os.pread(fd, 64 * KiB, 256 * KiB) == bytes(64 * KiB)
        assert os.pread(fd, 4 * KiB, 0) == b"\xab" * 4 * KiB
        assert os.pread(fd, 8 * KiB, 4 * KiB) == bytes(8 * KiB)  # zeroed
    finally:
        os.close(fd)


def test_fallocate_errors_of_the_handler_reach_the_caller(onefile):
    m = onefile()
    fd = m.open()
    try:
        assert errno_of(fallocate, fd, 0, fs.NOSPACE_AT, 4 * KiB) == errno.ENOSPC
        assert errno_of(os.posix_fallocate, fd, fs.NOSPACE_AT, 4 * KiB) == errno.ENOSPC
        assert len(m.calls("fallocate")) == 2
        # the handler still gets the next request: ENOSPC is not ENOSYS
        fallocate(fd, FALLOC_FL_KEEP_SIZE, 0, 4 * KiB)
        assert len(m.calls("fallocate")) == 3
    finally:
        os.close(fd)


def test_fallocate_modes_the_kernel_refuses_never_reach_the_handler(onefile):
    m = onefile()
    fd = m.open()
    try:
        for mode in (
            FALLOC_FL_COLLAPSE_RANGE,
            FALLOC_FL_INSERT_RANGE,
            FALLOC_FL_UNSHARE_RANGE,
            FALLOC_FL_PUNCH_HOLE,
            FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE,
        ):
            assert errno_of(fallocate, fd, mode, 0, 4 * KiB) == errno.EOPNOTSUPP, hex(mode)
        assert m.calls("fallocate") == []
        # and fallocate needs a file open for writing (EBADF before any request)
        ro = m.open(os.O_RDONLY)
        try:
            assert errno_of(fallocate, ro, 0, 0, 4 * KiB) == errno.EBADF
        finally:
            os.close(ro)
        assert m.calls("fallocate") == []
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- lseek
# (whence, offset, the answer or -errno) over DATA = [0, 64K) [256K, 320K) [768K, 832K) in 1 MiB
ENXIO = -errno.ENXIO
SEEKS = [
    (os.SEEK_DATA, 0, 0),
    (os.SEEK_DATA, 10 * KiB, 10 * KiB),
    (os.SEEK_DATA, 64 * KiB, 256 * KiB),
    (os.SEEK_DATA, 300 * KiB, 300 * KiB),
    (os.SEEK_DATA, 320 * KiB, 768 * KiB),
    (os.SEEK_DATA, 832 * KiB, ENXIO),  # only a hole follows
    (os.SEEK_DATA, fs.SIZE, ENXIO),  # at the end
    (os.SEEK_DATA, 4 * fs.SIZE, ENXIO),  # past it
    (os.SEEK_HOLE, 0, 64 * KiB),
    (os.SEEK_HOLE, 100 * KiB, 100 * KiB),
    (os.SEEK_HOLE, 256 * KiB, 320 * KiB),
    (os.SEEK_HOLE, 800 * KiB, 832 * KiB),
    (os.SEEK_HOLE, fs.SIZE - 1, fs.SIZE - 1),
    (os.SEEK_HOLE, fs.SIZE, ENXIO),
    (os.SEEK_HOLE, 4 * fs.SIZE, ENXIO),
]


def test_lseek_returns_what_the_handler_said(onefile):
    m = onefile()
    fd = m.open(os.O_RDONLY)
    try:
        for whence, offset, want in SEEKS:
            name = "SEEK_DATA" if whence == os.SEEK_DATA else "SEEK_HOLE"
            os.lseek(fd, 12345, os.SEEK_SET)
            if want < 0:
                assert errno_of(os.lseek, fd, offset, whence) == -want, (name, offset)
                assert os.lseek(fd, 0, os.SEEK_CUR) == 12345  # a failed seek leaves the position
            else:
                assert os.lseek(fd, offset, whence) == want, (name, offset)
                assert os.lseek(fd, 0, os.SEEK_CUR) == want
        # every one of them reached the handler (past the end too: the kernel does not check)
        assert m.calls("lseek") == [
            {"fh": fs.FH, "offset": offset, "whence": whence} for whence, offset, _ in SEEKS
        ]
    finally:
        os.close(fd)


def test_lseek_follows_the_layout_fallocate_changed(onefile):
    m = onefile()
    fd = m.open()
    try:
        fallocate(fd, FALLOC_FL_KEEP_SIZE, 64 * KiB, 192 * KiB)  # fills the hole [64K, 256K)
        assert os.lseek(fd, 0, os.SEEK_HOLE) == 320 * KiB
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 768 * KiB)
        assert os.lseek(fd, 0, os.SEEK_DATA) == 768 * KiB
        assert os.lseek(fd, 0, os.SEEK_HOLE) == 0
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- the defaults
def test_default_handlers_get_the_kernels_enosys_behaviour(onefile):
    m = onefile("--defaults")
    fd = m.open()
    try:
        # fallocate: the handler's ENOSYS becomes EOPNOTSUPP, and the kernel does not ask again
        for _ in range(2):
            assert errno_of(fallocate, fd, 0, 0, 4 * KiB) == errno.EOPNOTSUPP
            assert (
                errno_of(fallocate, fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 4 * KiB)
                == errno.EOPNOTSUPP
            )
        assert m.calls("fallocate") == [{"fh": fs.FH, "mode": 0, "offset": 0, "length": 4 * KiB}]

        # lseek: the kernel answers generically (all data, a hole at the end), from the first
        # request on, and does not ask again
        for _ in range(2):
            assert os.lseek(fd, 100 * KiB, os.SEEK_DATA) == 100 * KiB
            assert os.lseek(fd, 100 * KiB, os.SEEK_HOLE) == fs.SIZE
            assert errno_of(os.lseek, fd, fs.SIZE, os.SEEK_DATA) == errno.ENXIO
            assert errno_of(os.lseek, fd, fs.SIZE, os.SEEK_HOLE) == errno.ENXIO
        assert m.calls("lseek") == [{"fh": fs.FH, "offset": 100 * KiB, "whence": os.SEEK_DATA}]
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- the hook
@pytest.mark.skipif(
    not HAS_HOOK, reason=f"the installed pyfuse3's main() has no wait_readable: {BUILD}"
)
def test_wait_readable_hook_serves_the_mount(onefile):
    m = onefile("--hook")
    fd = m.open()
    try:
        for i in range(20):
            assert os.pread(fd, 4 * KiB, i * 4 * KiB) == (b"\xab" if i < 16 else b"\0") * 4 * KiB
        assert os.lseek(fd, 64 * KiB, os.SEEK_DATA) == 256 * KiB
    finally:
        os.close(fd)
    assert m.stop() == 0  # the unmount ends the loop the hook waits in
    (exit_record,) = m.calls("exit")
    assert exit_record["waits"] >= 22, exit_record  # at least one wait per request served


# ----------------------------------------------------------------------------- workers, write views
HAS_WRITE_VIEW = hasattr(pyfuse3.Operations, "enable_write_view")


@pytest.mark.skipif(
    not HAS_HOOK, reason=f"the installed pyfuse3's main() has no wait_readable: {BUILD}"
)
def test_wait_readable_hook_with_several_workers(onefile):
    """pyfuse3-3.5.0-workers-write-view.patch: main(wait_readable=..., max_tasks=4) serves (the
    unpatched hook refused max_tasks > 1 with ValueError), requests from 4 threads at once."""
    m = onefile("--hook", "--workers", "4")
    fd = m.open()
    try:
        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(lambda i: os.pread(fd, 4 * KiB, i * 4 * KiB), range(64)))
        assert got == [(b"\xab" if i < 16 else b"\0") * 4 * KiB for i in range(64)]
    finally:
        os.close(fd)
    assert m.stop() == 0


@pytest.mark.skipif(
    not HAS_WRITE_VIEW, reason=f"the installed pyfuse3 has no Operations.enable_write_view: {BUILD}"
)
@pytest.mark.parametrize("view", [True, False])
def test_write_view(onefile, view):
    """With enable_write_view the write handler gets a memoryview of the request (no copy),
    without it bytes, as before; the data is the same either way."""
    m = onefile(*(["--write-view"] if view else []))
    fd = m.open()
    try:
        data = bytes(range(256)) * 64
        assert os.pwrite(fd, data, 8 * KiB) == len(data)
        assert os.pread(fd, len(data), 8 * KiB) == data
    finally:
        os.close(fd)
    assert m.stop() == 0
    writes = m.calls("write")
    assert writes and {w["type"] for w in writes} == {"memoryview" if view else "bytes"}, writes


# ----------------------------------------------------------------------------- request lanes
HAS_LANES = hasattr(pyfuse3, "lanes_start")


@pytest.mark.skipif(not HAS_LANES, reason=f"the installed pyfuse3 has no request lanes: {BUILD}")
def test_request_lanes_serve_the_published_blocks(onefile, tmp_path):
    """pyfuse3-3.5.0-request-lanes.patch: reads and writes of published blocks never reach the
    Python handlers and land at the host offsets the map gave; zero blocks read zeros; the rest
    goes to the handlers (through the main loop, replies back on the lane's descriptor); a
    withdrawn block goes to the handlers again."""
    block = 1 << fs.LANE_BLOCK_BITS
    host = tmp_path / "host"
    host_bytes = bytearray(fs.LANE_HOST_BASE + fs.SIZE)
    for b in range(16):
        off = fs.LANE_HOST_BASE + b * block
        host_bytes[off : off + block] = bytes([0x40 + b]) * block
    host.write_bytes(bytes(host_bytes))
    m = onefile("--lanes", str(host))
    fd = m.open()
    try:
        for b in range(8):  # READ|WRITE blocks: served by the lanes
            assert os.pread(fd, 4 * KiB, b * block + 512) == bytes([0x40 + b]) * 4 * KiB
        assert os.pread(fd, 8 * KiB, 9 * block) == bytes(8 * KiB)  # READ|ZERO
        assert m.calls("read") == []
        assert os.pwrite(fd, b"lane" * 1024, 3 * block + 4 * KiB) == 4 * KiB
        assert m.calls("write") == []
        with open(host, "rb") as h:
            h.seek(fs.LANE_HOST_BASE + 3 * block + 4 * KiB)
            assert h.read(4 * KiB) == b"lane" * 1024
        # unpublished: the handlers, and their reply reaches the caller
        assert os.pread(fd, 4 * KiB, 13 * block) == bytes([0x40 + 13]) * 4 * KiB
        assert os.pwrite(fd, b"py" * 2048, 14 * block) == 4 * KiB
        assert [c["off"] for c in m.calls("read")] == [13 * block]
        assert [c["off"] for c in m.calls("write")] == [14 * block]
        # withdrawn (SIGUSR1: blocks 0-3): the handlers again
        m.proc.send_signal(signal.SIGUSR1)
        wait_for(lambda: m.calls("invalidated"), timeout=10, what="the withdrawal")
        assert os.pread(fd, 4 * KiB, 3 * block + 4 * KiB) == b"lane" * 1024
        assert [c["off"] for c in m.calls("read")] == [13 * block, 3 * block + 4 * KiB]
    finally:
        os.close(fd)
    assert m.stop() == 0
    (lanes,) = m.calls("lanes")
    assert lanes["lanes"] == 2 and lanes["reads"] >= 9 and lanes["writes"] >= 1, lanes
    assert lanes["handed"] >= 4 and lanes["ended"], lanes
