"""QEMU-compatible image locking (QEMU's block/file-posix.c, "locking=auto" on Linux).

QEMU guards every image file it opens with 1-byte *shared* (F_RDLCK) Open File
Description locks (fcntl F_OFD_SETLK). Two byte ranges encode its block-layer
permissions (BLK_PERM_*, bit i):

    byte 100 + i   "I hold permission i"            (RAW_LOCK_PERM_BASE)
    byte 200 + i   "I do not share permission i"    (RAW_LOCK_SHARED_BASE)

    i = 0 consistent read, 1 write, 2 write unchanged, 3 resize

A user conflicts with others when it holds a permission someone does not share
(it tests byte 200 + i for every permission i it holds) or when it does not
share a permission someone holds (it tests byte 100 + i for every permission i
it does not share). A test is F_OFD_GETLK with F_WRLCK: it reports any read lock
held by *another* open file description, never our own (raw_check_lock_bytes).

What QEMU asks of the file under a qcow2 image (bdrv_default_perms_for_storage,
BDRV_CHILD_METADATA): consistent read always; write and resize when writable;
it never shares write or resize, whatever the image's own users allow. So:

    read-write  locks 100 101 103 201 203   tests 200 201 203 (held perms), 101 103 (unshared)
    read-only   locks 100 201 203           tests 200 (held perm), 101 103 (unshared)

(checked against qemu-storage-daemon 7.2 in /proc/locks; tests/unit/test_locks.py
compares the bytes byte for byte). Consequences, exactly as between QEMU users:
readers coexist with readers; a writer conflicts with any other writer *and* with
any reader (each reader refuses to share write), so a read-only open is refused
while QEMU or qcowfs has the image open read-write (`qemu-img info` without -U
says 'Failed to get shared "write" lock' then).

Order, as raw_handle_perm_lock: first take our new bytes, then test; on a
conflict go back to the bytes held before and fail. Two users racing both back
off, neither can miss the other. Dropping permissions (downgrade, release) takes
no new bytes and so tests nothing (QEMU's RAW_PL_PREPARE returns early then).

OFD locks belong to the open file description: two descriptions of one file in
the same process conflict like two processes do, and the locks vanish when the
last descriptor of the description is closed.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from typing import Iterable

from ..errors import LockError

# Linux values; the fcntl module has them since Python 3.9.
F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)
F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)

# BLK_PERM_* bit numbers (include/block/block-common.h) and the names QEMU prints.
PERM_CONSISTENT_READ = 0
PERM_WRITE = 1
PERM_WRITE_UNCHANGED = 2
PERM_RESIZE = 3
PERM_NAMES = ("consistent read", "write", "write unchanged", "resize")
ALL_PERMS = frozenset(range(len(PERM_NAMES)))

LOCK_PERM_BASE = 100
LOCK_SHARED_BASE = 200

# struct flock { short l_type; short l_whence; off_t l_start; off_t l_len; pid_t l_pid; }
# with native alignment; "0q" pads the end to off_t's alignment (32 bytes on x86_64 and
# aarch64). OFD commands always take the 64-bit off_t layout.
_FLOCK = struct.Struct("@hhqqi0q")


def _perms(write: bool) -> tuple[frozenset, frozenset]:
    """(permissions held, permissions shared) on the file under a qcow2 image opened so."""
    held = {PERM_CONSISTENT_READ}
    if write:
        held |= {PERM_WRITE, PERM_RESIZE}
    shared = ALL_PERMS - {PERM_WRITE, PERM_RESIZE}
    return frozenset(held), shared


def lock_bytes(write: bool) -> frozenset:
    """The byte offsets a user opening the image so holds read locks on."""
    held, shared = _perms(write)
    return frozenset(
        {LOCK_PERM_BASE + i for i in held} | {LOCK_SHARED_BASE + i for i in ALL_PERMS - shared}
    )


def _tested_bytes(write: bool) -> list:
    """(offset, kind, perm) a user opening the image so must find unlocked by others, in QEMU's order."""
    held, shared = _perms(write)
    tests = [(LOCK_SHARED_BASE + i, "unshared", i) for i in sorted(held)]
    tests += [(LOCK_PERM_BASE + i, "held", i) for i in sorted(ALL_PERMS - shared)]
    return tests


def _fcntl_lock(fd: int, cmd: int, l_type: int, offset: int) -> tuple:
    """One fcntl lock call on the single byte at offset; returns the (l_type, l_pid) it answers."""
    arg = _FLOCK.pack(l_type, os.SEEK_SET, offset, 1, 0)  # l_pid must be 0 for OFD locks
    res = fcntl.fcntl(fd, cmd, arg)
    r_type, _whence, _start, _len, r_pid = _FLOCK.unpack(res)
    return r_type, r_pid


def _set(fd: int, offset: int) -> None:
    _fcntl_lock(fd, F_OFD_SETLK, fcntl.F_RDLCK, offset)


def _unset(fd: int, offset: int) -> None:
    _fcntl_lock(fd, F_OFD_SETLK, fcntl.F_UNLCK, offset)


def _locked_by_other(fd: int, offset: int) -> tuple:
    """(True, pid) if another open file description holds a lock on the byte (pid -1 for OFD locks)."""
    r_type, r_pid = _fcntl_lock(fd, F_OFD_GETLK, fcntl.F_WRLCK, offset)
    return r_type != fcntl.F_UNLCK, r_pid


def _conflicts(fd: int, write: bool) -> list:
    """Every conflicting byte as (offset, kind, perm, pid), in the order QEMU tests them."""
    found = []
    for offset, kind, perm in _tested_bytes(write):
        busy, pid = _locked_by_other(fd, offset)
        if busy:
            found.append((offset, kind, perm, pid))
    return found


def _describe(conflicts: list, write: bool) -> str:
    """One line for the user: who is in the way and what to do about it."""
    first = conflicts[0]
    writers = [c for c in conflicts if c[1] == "held" and c[2] in (PERM_WRITE, PERM_RESIZE)]
    pids = sorted({c[3] for c in conflicts if c[3] > 0})
    who = "another process" + (f" (pid {', '.join(map(str, pids))})" if pids else "")
    offset, kind, perm, _pid = writers[0] if writers else first
    if kind == "held":
        lock = f'QEMU lock byte {offset}: it holds the "{PERM_NAMES[perm]}" permission'
    else:
        lock = f'QEMU lock byte {offset}: it does not share the "{PERM_NAMES[perm]}" permission'
    if writers:
        what = "has it open read-write"
        hint = "stop that process first"
    elif any(c[2] == PERM_CONSISTENT_READ for c in conflicts):
        what = "does not let others read it (e.g. a running QEMU block job)"
        hint = "stop that process first"
    else:
        what = "has it open"
        hint = (
            "stop it, or open the image read-only (qcowfs mount --read-only)"
            if write
            else "stop it first"
        )
    return f"image is in use by {who}: QEMU or qcowfs {what} ({lock}); {hint}"


def _classify_set_error(e: OSError) -> bool:
    """True if a failed F_RDLCK means someone holds an exclusive lock on the byte (a conflict)."""
    return e.errno in (errno.EAGAIN, errno.EACCES)


class ImageLock:
    """QEMU's lock bytes on one open image file; the caller owns fd and keeps it open while locked."""

    def __init__(self, fd: int, path: str, *, write: bool):
        self.fd = fd
        self.path = path
        self.write = write
        self._held: set = set()  # byte offsets we hold a read lock on
        st = os.fstat(fd)
        self._ident = (st.st_dev, st.st_ino)

    @property
    def held_bytes(self) -> frozenset:
        return frozenset(self._held)

    def acquire(self) -> None:
        """Take the lock bytes for our mode, then test for others; LockError (and nothing held) on conflict."""
        self._change(lock_bytes(self.write), self.write)

    def release(self) -> None:
        """Drop all our lock bytes. Idempotent; a no-op once the fd is closed (the locks went with it)."""
        if not self._held:
            return
        if not self._fd_is_ours():
            self._held.clear()
            return
        self._unlock(sorted(self._held))

    def downgrade_to_read_only(self) -> None:
        """Become a read-only user: drop write and resize, keep reading and refusing to share writes."""
        self.write = False
        if self._held and self._fd_is_ours():
            # The read-only bytes are a subset of the read-write ones: nothing new is taken,
            # so (like QEMU when permissions only shrink) nothing is tested and this cannot fail
            # on a conflict.
            self._unlock(sorted(self._held - lock_bytes(False)))

    # --- internals ---

    def _change(self, wanted: frozenset, write: bool) -> None:
        before = set(self._held)
        new = sorted(wanted - before)
        if not new:
            self._unlock(sorted(before - wanted))
            return
        conflicts: list = []
        try:
            for offset in new:
                try:
                    _set(self.fd, offset)
                except OSError as e:
                    if not _classify_set_error(e):
                        raise
                    # An exclusive lock on a QEMU byte: not QEMU's protocol, but certainly in use.
                    busy, pid = _locked_by_other(self.fd, offset)
                    conflicts = [(offset, "exclusive", 0, pid if busy else -1)]
                    break
                self._held.add(offset)
            else:
                conflicts = _conflicts(self.fd, write)
        except BaseException:
            self._restore(before)
            raise
        if conflicts:
            self._restore(before)
            if conflicts[0][1] == "exclusive":
                offset, _k, _p, pid = conflicts[0]
                who = f"another process (pid {pid})" if pid > 0 else "another process"
                raise LockError(
                    f"image is in use by {who}: it holds an exclusive lock on QEMU lock byte "
                    f"{offset}; stop that process first",
                    self.path,
                )
            raise LockError(_describe(conflicts, write), self.path)
        self._unlock(sorted(before - wanted))

    def _restore(self, before: set) -> None:
        """Back to the bytes held before a failed change (RAW_PL_ABORT); best effort."""
        try:
            self._unlock(sorted(self._held - before))
        except OSError:
            pass

    def _unlock(self, offsets: Iterable) -> None:
        for offset in offsets:
            _unset(self.fd, offset)
            self._held.discard(offset)

    def _fd_is_ours(self) -> bool:
        """The fd still refers to our file (not closed, not reused for another one)."""
        try:
            st = os.fstat(self.fd)
        except OSError as e:
            if e.errno == errno.EBADF:
                return False
            raise
        return (st.st_dev, st.st_ino) == self._ident


def probe_conflict(path: str, *, write: bool) -> str | None:
    """Would opening path (read-write if write) conflict with QEMU's locks? Takes no lock.

    Returns the same one-line description an ImageLock.acquire() would raise (without the
    path), or None. Locks held through other open file descriptions of this process count.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        conflicts = _conflicts(fd, write)
    finally:
        os.close(fd)
    return _describe(conflicts, write) if conflicts else None
