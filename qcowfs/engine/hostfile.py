"""The one abstraction through which the image layer touches host files.

Every byte qcowfs reads or writes in an image, a backing file or an external
data file goes through a HostFile. That keeps the I/O in one place: errors
surface as OSError with their errno (ENOSPC reaches the writer as ENOSPC), and
a recording variant can log every write and flush to replay power-loss states.
"""

from __future__ import annotations

import ctypes
import os
import threading
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from typing_extensions import Buffer

#: larger than any file Linux allows (MAX_LFS_FILESIZE is 2**63 - 1)
_MAX_OFFSET = 1 << 62

# fallocate(2) with a mode (os has posix_fallocate only): FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
_PUNCH_KEEP = 0x02 | 0x01
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong)


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with a mode (the tree's one binding of it; the tests use it too)."""
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


try:
    _IOV_MAX = min(os.sysconf("SC_IOV_MAX"), 1024)
except (ValueError, OSError):  # pragma: no cover
    _IOV_MAX = 1024


class HostFile:
    """A regular file opened by path; positional I/O only (no shared file offset)."""

    #: whether reads and writes go through a sector cipher (encrypted_data.py); the request
    #: lanes, I/O threads and backups read and write the fd directly only when not
    encrypted = False

    def __init__(self, path: str, writable: bool):
        self.path = path
        self.writable = writable
        flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC
        self.fd = os.open(path, flags)
        self._size = os.fstat(self.fd).st_size
        self._grow_lock = threading.Lock()
        self._can_punch = writable

    @property
    def size(self) -> int:
        """Current file size in bytes (kept up to date for our own writes)."""
        return self._size

    def pread(self, length: int, offset: int, guest: int = -1) -> bytes:
        """Up to length bytes at offset; short (possibly empty) past the end of the file.
        Offsets no file can reach (from damaged metadata) read as past the end too. guest: the
        guest offset these bytes show, for data encrypted by it (legacy AES); ignored here."""
        if offset > _MAX_OFFSET or length > _MAX_OFFSET - offset:
            return b""
        return os.pread(self.fd, length, offset)

    def preadv_into(self, buffers: Sequence, offset: int, guest: int = -1) -> int:
        if offset > _MAX_OFFSET:
            return 0
        return os.preadv(self.fd, buffers, offset)

    def pwrite(self, data: Buffer, offset: int) -> None:
        """Write all of data at offset (loops over short writes)."""
        view = memoryview(data)
        total = len(view)
        done = 0
        while done < total:
            done += os.pwrite(self.fd, view[done:], offset + done)
        self._grew(offset + total)

    def pwritev(self, buffers: Sequence, offset: int) -> None:
        """Write buffers back to back at offset (in groups of at most IOV_MAX). Safe on any
        thread (the I/O threads copy guest data with it)."""
        for i in range(0, len(buffers), _IOV_MAX):
            group = buffers[i : i + _IOV_MAX]
            total = sum(len(b) for b in group)
            written = os.pwritev(self.fd, group, offset)
            if written < total:
                # Rare short write: finish the rest piecewise.
                joined = b"".join(bytes(b) for b in group)
                self.pwrite(memoryview(joined)[written:], offset + written)
            offset += total
            self._grew(offset)

    def _grew(self, end: int) -> None:
        """A write ended at end: the size follows. Writes run on several threads (write_path.
        WritePlan.copy): the size only grows, re-checked under a lock, so a smaller end never
        overwrites a larger one."""
        if end > self._size:
            with self._grow_lock:
                if end > self._size:
                    self._size = end

    def punch_hole(self, offset: int, length: int) -> None:
        """Deallocate host blocks (they read as zeros); silently nothing where the host file
        system cannot (only ever used on clusters whose refcount is 0 on disk)."""
        if self._can_punch:
            try:
                fallocate(self.fd, _PUNCH_KEEP, offset, length)
            except OSError:
                self._can_punch = False

    def flush(self) -> None:
        """Make every completed write durable (fdatasync: metadata that reaches the data included)."""
        os.fdatasync(self.fd)

    def truncate(self, length: int) -> None:
        os.ftruncate(self.fd, length)
        self._size = length

    def st_blocks(self) -> int:
        return os.fstat(self.fd).st_blocks

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
