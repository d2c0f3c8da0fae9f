"""A one-file pyfuse3 file system for checking patches/pyfuse3-3.5.0-*.patch on a real mount.

    python tests/support/patched_pyfuse3_fs.py MOUNTPOINT --record CALLS.jsonl [--defaults] [--hook]

It mounts a directory holding one file, `disk` (SIZE bytes), whose allocation is a fake layout:
DATA lists the allocated extents, everything else is a hole. The handlers the patch adds are
implemented over that layout:

- fallocate(fh, mode, offset, length) records the call and applies it: mode 0 / KEEP_SIZE
  allocate the range (mode 0 grows the file past its end), PUNCH_HOLE deallocates it, ZERO_RANGE
  zeroes it (allocated); any other mode is refused with EOPNOTSUPP, and a range ending past
  NOSPACE_AT with ENOSPC (so that the caller sees the handler's own error);
- lseek(fh, offset, whence) records the call and answers SEEK_DATA / SEEK_HOLE from the layout,
  ENXIO at or past the end of the file (and for SEEK_DATA when only holes follow).

With --defaults the two handlers record the call and then defer to pyfuse3.Operations' own
(FUSEError(ENOSYS)), to see what the kernel does with that. With --hook the main loop runs with
pyfuse3.main(wait_readable=...) (patches/pyfuse3-3.5.0-wait-readable-hook.patch), whose waiter
counts its calls; the count is recorded at exit ({"op": "exit", "waits": N}).

With --lanes HOST the file's bytes live in the file HOST at offset LANE_HOST_BASE + offset (the
handlers read and write there too, recording each read), and request lanes
(patches/pyfuse3-3.5.0-request-lanes.patch) serve it from a map of 64 KiB blocks: blocks 0-7
READ|WRITE at their host offsets, 8-11 READ|ZERO, 12-15 unpublished. SIGUSR1 withdraws blocks
0-3 (recorded as {"op": "invalidated"}); the lanes' figures are recorded at exit
({"op": "lanes", ...}).

Every call is one JSON line in CALLS.jsonl, written before the reply reaches the kernel, so a
test reads it as soon as its system call returns. Needs only pyfuse3 and trio (no pytest), and
runs in the foreground until unmounted.
"""

from __future__ import annotations

import argparse
import errno
import functools
import json
import os
import stat
import sys

import pyfuse3
import trio

KiB = 1024
SIZE = 1024 * KiB
# the allocated extents [start, end) of `disk`, sorted and not touching; the rest are holes
DATA = ((0, 64 * KiB), (256 * KiB, 320 * KiB), (768 * KiB, 832 * KiB))
NOSPACE_AT = 1 << 40  # a range ending past this fails with ENOSPC

NAME = b"disk"
INODE = pyfuse3.ROOT_INODE + 1
FH = 7

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10


def merge(extents):
    """Sorted, non-overlapping, non-touching [start, end) extents covering the same bytes."""
    out: list[list[int]] = []
    for start, end in sorted(e for e in extents if e[0] < e[1]):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [tuple(e) for e in out]


def subtract(extents, start, end):
    out = []
    for s, e in extents:
        if e <= start or s >= end:
            out.append((s, e))
            continue
        if s < start:
            out.append((s, start))
        if e > end:
            out.append((end, e))
    return out


def seek_data(extents, size, offset):
    """SEEK_DATA over `extents` in a file of `size` bytes: the offset, or None for ENXIO."""
    if offset >= size:
        return None
    for s, e in extents:
        if e > offset and s < size:
            return max(s, offset)
    return None


def seek_hole(extents, size, offset):
    """SEEK_HOLE: the offset of the next hole (the end of the file is one), or None for ENXIO."""
    if offset >= size:
        return None
    for s, e in extents:
        if s <= offset < e:
            return min(e, size)
    return offset


class OneFile(pyfuse3.Operations):
    def __init__(self, record_path: str, defaults: bool):
        super().__init__()
        self.record_file = open(record_path, "a", buffering=1)
        self.defaults = defaults
        self.size = SIZE
        self.extents = list(DATA)
        self.content = bytearray(SIZE)
        for s, e in DATA:
            self.content[s:e] = b"\xab" * (e - s)
        self.host_fd: int | None = None  # --lanes: the host file

    def record(self, **call) -> None:
        self.record_file.write(json.dumps(call) + "\n")

    # ------------------------------------------------------------------ the one file
    def attrs(self, inode):
        entry = pyfuse3.EntryAttributes()
        if inode == pyfuse3.ROOT_INODE:
            entry.st_mode = stat.S_IFDIR | 0o755
            entry.st_nlink = 2
        elif inode == INODE:
            entry.st_mode = stat.S_IFREG | 0o644
            entry.st_nlink = 1
            entry.st_size = self.size
            entry.st_blocks = sum(e - s for s, e in self.extents) // 512
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        entry.st_ino = inode
        entry.st_uid = os.getuid()
        entry.st_gid = os.getgid()
        entry.st_blksize = 4096
        entry.attr_timeout = 0
        entry.entry_timeout = 300
        return entry

    async def getattr(self, inode, ctx=None):
        return self.attrs(inode)

    async def lookup(self, parent_inode, name, ctx=None):
        if parent_inode != pyfuse3.ROOT_INODE or name != NAME:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self.attrs(INODE)

    async def opendir(self, inode, ctx):
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh, start_id, token):
        if start_id == 0:
            pyfuse3.readdir_reply(token, NAME, self.attrs(INODE), 1)

    async def open(self, inode, flags, ctx):
        if inode != INODE:
            raise pyfuse3.FUSEError(errno.EISDIR)
        return pyfuse3.FileInfo(fh=FH, direct_io=True)

    async def read(self, fh, off, size):
        if self.host_fd is not None:
            self.record(op="read", off=off, size=size)
            return os.pread(self.host_fd, min(size, self.size - off), LANE_HOST_BASE + off)
        return bytes(self.content[off : min(off + size, self.size)])

    async def write(self, fh, off, buf):
        # what pyfuse3 hands over: bytes (a copy), or with enable_write_view a memoryview
        self.record(op="write", type=type(buf).__name__, off=off, size=len(buf))
        if self.host_fd is not None:
            return os.pwrite(self.host_fd, buf, LANE_HOST_BASE + off)
        self.content[off : off + len(buf)] = buf
        return len(buf)

    async def release(self, fh):
        pass

    # ------------------------------------------------------------------ what the patch adds
    async def fallocate(self, fh, mode, offset, length):
        self.record(op="fallocate", fh=fh, mode=mode, offset=offset, length=length)
        if self.defaults:
            return await super().fallocate(fh, mode, offset, length)
        end = offset + length
        if end > NOSPACE_AT:
            raise pyfuse3.FUSEError(errno.ENOSPC)
        if mode in (0, FALLOC_FL_KEEP_SIZE):
            self.extents = merge(self.extents + [(offset, end)])
        elif mode == FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE:
            self.extents = subtract(self.extents, offset, end)
            self.content[offset : min(end, self.size)] = bytes(max(0, min(end, self.size) - offset))
        elif mode & ~FALLOC_FL_KEEP_SIZE == FALLOC_FL_ZERO_RANGE:
            self.extents = merge(self.extents + [(offset, end)])
            self.content[offset : min(end, self.size)] = bytes(max(0, min(end, self.size) - offset))
        else:
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        if not mode & FALLOC_FL_KEEP_SIZE and end > self.size:
            self.content.extend(bytes(end - self.size))
            self.size = end

    async def lseek(self, fh, offset, whence):
        self.record(op="lseek", fh=fh, offset=offset, whence=whence)
        if self.defaults:
            return await super().lseek(fh, offset, whence)
        if whence == os.SEEK_DATA:
            found = seek_data(self.extents, self.size, offset)
        elif whence == os.SEEK_HOLE:
            found = seek_hole(self.extents, self.size, offset)
        else:
            raise pyfuse3.FUSEError(errno.EINVAL)
        if found is None:
            raise pyfuse3.FUSEError(errno.ENXIO)
        return found


LANE_BLOCK_BITS = 16
LANE_HOST_BASE = 1 << 20  # the host file holds byte x of `disk` at LANE_HOST_BASE + x


def lane_map() -> list:
    """(first block, entries) to publish: blocks 0-7 READ|WRITE, 8-11 READ|ZERO."""
    from array import array

    rw = pyfuse3.LANE_READ | pyfuse3.LANE_WRITE
    data = array("Q", [LANE_HOST_BASE + (b << LANE_BLOCK_BITS) | rw for b in range(8)])
    zero = array("Q", [pyfuse3.LANE_READ | pyfuse3.LANE_ZERO] * 4)
    return [(0, data), (8, zero)]


class LaneWaiter:
    """The wait_readable hook of a main loop behind request lanes: their hand-offs, not the
    device (which the lanes read)."""

    def __init__(self, efd: int):
        self.efd = efd
        self.waits = 0

    async def __call__(self, fd: int) -> bool:
        self.waits += 1
        while True:
            if pyfuse3.lanes_pending():
                return True
            pyfuse3.lanes_clear_signal()
            if pyfuse3.lanes_pending():
                return True
            try:
                await trio.lowlevel.wait_readable(self.efd)
            except trio.ClosedResourceError:
                return False


async def serve_with_lanes(ops: "OneFile", efd: int) -> None:
    waiter = LaneWaiter(efd)

    async def on_usr1() -> None:
        import signal

        with trio.open_signal_receiver(signal.SIGUSR1) as signals:
            async for _ in signals:
                waited = pyfuse3.lanes_invalidate(0, 4)
                ops.record(op="invalidated", waited=waited)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(on_usr1)
        await pyfuse3.main(min_tasks=1, max_tasks=1, wait_readable=waiter)
        nursery.cancel_scope.cancel()


class CountingWaiter:
    """A wait_readable hook: pyfuse3's wait (trio parks until the fd is readable), counted."""

    def __init__(self):
        self.waits = 0
        self.turn = None

    async def __call__(self, fd: int) -> bool:
        self.waits += 1
        if self.turn is None:
            self.turn = trio.Lock()
        async with self.turn:  # several workers: one at a time returns True per request
            await trio.lowlevel.wait_readable(fd)
        return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mountpoint")
    parser.add_argument(
        "--record", required=True, help="append one JSON line per handler call here"
    )
    parser.add_argument(
        "--defaults", action="store_true", help="defer to pyfuse3's default handlers"
    )
    parser.add_argument(
        "--hook", action="store_true", help="serve through pyfuse3.main(wait_readable=...)"
    )
    parser.add_argument("--workers", type=int, default=1, help="max_tasks behind the hook")
    parser.add_argument(
        "--write-view", action="store_true", help="set Operations.enable_write_view"
    )
    parser.add_argument("--lanes", metavar="HOST", help="serve through request lanes over HOST")
    args = parser.parse_args(argv)

    ops = OneFile(args.record, args.defaults)
    ops.enable_write_view = args.write_view
    options = set(pyfuse3.default_options)
    options.add("fsname=patched_pyfuse3_fs")
    pyfuse3.init(ops, args.mountpoint, options)
    waiter = CountingWaiter()
    try:
        if args.lanes:
            ops.host_fd = os.open(args.lanes, os.O_RDWR)
            efd = pyfuse3.lanes_start(
                2, INODE, ops.host_fd, LANE_BLOCK_BITS, SIZE, SIZE, True, False
            )
            for first, entries in lane_map():
                pyfuse3.lanes_publish(first, entries)
            try:
                trio.run(serve_with_lanes, ops, efd)
            finally:
                pyfuse3.lanes_stop()
                ops.record(op="lanes", **pyfuse3.lanes_stats())
        elif args.hook:
            trio.run(
                functools.partial(
                    pyfuse3.main, min_tasks=1, max_tasks=args.workers, wait_readable=waiter
                )
            )
        else:
            trio.run(pyfuse3.main)
    finally:
        pyfuse3.close()
        ops.record(op="exit", waits=waiter.waits)
    return 0


if __name__ == "__main__":
    sys.exit(main())
