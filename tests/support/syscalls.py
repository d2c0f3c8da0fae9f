"""System calls the tests make themselves, and the errno a call fails with.

fallocate(2) with a mode: the os module has only posix_fallocate, which takes no mode and falls
back to writing zeros; the tree's one ctypes binding is qcowfs.engine.hostfile.fallocate.
"""

from __future__ import annotations

import inspect
import os

from qcowfs.engine.hostfile import fallocate as _fallocate_fd

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_COLLAPSE_RANGE = 0x08
FALLOC_FL_ZERO_RANGE = 0x10
FALLOC_FL_INSERT_RANGE = 0x20
FALLOC_FL_UNSHARE_RANGE = 0x40


def fallocate(file, mode: int, offset: int, length: int) -> None:
    """fallocate(2) itself on file, an open fd or a path (opened read-write for this one call);
    OSError with its errno when it fails."""
    if not isinstance(file, int):
        fd = os.open(file, os.O_RDWR)
        try:
            fallocate(fd, mode, offset, length)
        finally:
            os.close(fd)
        return
    _fallocate_fd(file, mode, offset, length)


def errno_of(fn, *args, error: type = OSError, **kw) -> int:
    """The errno fn(*args, **kw) fails with, as an `error` (an OSError by default); AssertionError
    when it returns, any other exception goes through. A coroutine function (a FUSE Operations
    handler, whose refusal is a pyfuse3.FUSEError) is run to completion under trio, as one request."""
    try:
        if inspect.iscoroutinefunction(fn):
            import trio

            trio.run(fn, *args)
        else:
            fn(*args, **kw)
    except error as e:
        assert e.errno is not None, f"{getattr(fn, '__name__', fn)} failed without an errno: {e!r}"
        return e.errno
    raise AssertionError(f"{getattr(fn, '__name__', fn)}{args} did not fail with {error.__name__}")
