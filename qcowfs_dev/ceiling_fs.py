"""The performance ceiling for qcowfs: the thinnest pyfuse3 + trio filesystem.

    python -m qcowfs_dev.ceiling_fs [--stock-loop] [--latency-us=N] RAWFILE MOUNTPOINT

Serves one file, MOUNTPOINT/disk.raw, whose reads and writes go straight to
RAWFILE with os.pread/os.pwrite: no mapping, no metadata, no bitmaps. Whatever
qcowfs measures below this is the price of its own work; whatever this measures
below the kernel is the price of FUSE plus Python plus pyfuse3.

It mounts with the options qcowfs uses (pyfuse3.default_options, fsname=RAWFILE,
subtype, allow_other when run as root) and opens disk.raw with direct_io like
qcowfs, so `fio --direct=1` works and every request reaches the handler
unchanged. Runs in the foreground; SIGTERM, SIGINT, SIGHUP or `fusermount3 -u`
unmount it cleanly (exit code 0).
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import sys
from typing import Optional, Protocol, Sequence

import pyfuse3
import trio

ROOT = pyfuse3.ROOT_INODE
DISK = ROOT + 1
DISK_NAME = b"disk.raw"


class CeilingOperations(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, path: str, latency_us: int = 0):
        super().__init__()
        self.latency = latency_us / 1e6
        self.path = path
        self.fd = os.open(path, os.O_RDWR)
        self.size = os.fstat(self.fd).st_size
        self.uid = os.getuid()
        self.gid = os.getgid()
        self.time_ns = os.fstat(self.fd).st_mtime_ns

    def _attr(self, inode: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        a.st_uid = self.uid
        a.st_gid = self.gid
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = self.time_ns
        a.st_blksize = 4096
        if inode == ROOT:
            a.st_mode = stat.S_IFDIR | 0o755
            a.st_nlink = 2
            a.attr_timeout = 1
        elif inode == DISK:
            a.st_mode = stat.S_IFREG | 0o644
            a.st_nlink = 1
            a.st_size = self.size
            a.st_blocks = os.fstat(self.fd).st_blocks
            a.entry_timeout = 300
            a.attr_timeout = 1
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return a

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: Optional[pyfuse3.RequestContext] = None
    ) -> pyfuse3.EntryAttributes:
        if parent_inode == ROOT and name == DISK_NAME:
            return self._attr(DISK)
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def getattr(
        self, inode: int, ctx: Optional[pyfuse3.RequestContext] = None
    ) -> pyfuse3.EntryAttributes:
        return self._attr(inode)

    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: Optional[int],
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        if fields.update_size and (inode != DISK or attr.st_size != self.size):
            raise pyfuse3.FUSEError(errno.EPERM)
        if fields.update_mode or fields.update_uid or fields.update_gid:
            raise pyfuse3.FUSEError(errno.EPERM)
        return self._attr(inode)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        pass

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if inode != ROOT:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        if start_id == 0:
            pyfuse3.readdir_reply(token, DISK_NAME, self._attr(DISK), 1)

    async def releasedir(self, fh: int) -> None:
        pass

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if inode != DISK:
            raise pyfuse3.FUSEError(errno.EISDIR if inode == ROOT else errno.ENOENT)
        return pyfuse3.FileInfo(fh=DISK, direct_io=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        if self.latency:
            await trio.sleep(self.latency)
        if off >= self.size:
            return b""
        return os.pread(self.fd, min(size, self.size - off), off)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        if self.latency:
            # a slow host file system under a qcow2 image: the image may grow
            await trio.sleep(self.latency)
            self.size = max(self.size, off + len(buf))
        elif off + len(buf) > self.size:
            raise pyfuse3.FUSEError(errno.ENOSPC)
        return os.pwrite(self.fd, buf, off)

    async def fsync(self, fh: int, datasync: bool) -> None:
        if self.latency:
            await trio.sleep(self.latency)
        os.fdatasync(self.fd) if datasync else os.fsync(self.fd)

    async def flush(self, fh: int) -> None:
        pass

    async def release(self, fh: int) -> None:
        pass

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        s = os.statvfs(os.path.dirname(os.path.abspath(self.path)))
        d = pyfuse3.StatvfsData()
        d.f_bsize = s.f_bsize
        d.f_frsize = s.f_frsize
        d.f_blocks = s.f_blocks
        d.f_bfree = s.f_bfree
        d.f_bavail = s.f_bavail
        d.f_files = 2
        d.f_namemax = 255
        return d


_signalled = False


class _Loop(Protocol):
    """A request loop: pyfuse3's own, or qcowfs's FastLoop."""

    async def run(self) -> None: ...

    def exit(self) -> None: ...


class _StockLoop:
    """pyfuse3's own request loop."""

    async def run(self) -> None:
        await pyfuse3.main()

    def exit(self) -> None:
        pyfuse3.terminate()


async def _watch_signals(loop: _Loop) -> None:
    global _signalled
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for _ in signals:
            _signalled = True
            loop.exit()
            return


async def _serve(loop: _Loop) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_watch_signals, loop)
        await loop.run()
        nursery.cancel_scope.cancel()


def main(argv: list[str]) -> int:
    stock = "--stock-loop" in argv
    argv = [a for a in argv if a != "--stock-loop"]
    latency_us = 0
    if len(argv) == 3 and argv[0].startswith("--latency-us="):
        # a slow host device (scripts/bench --host-latency-us): every read, write and fsync
        # waits this long first, many at once (pyfuse3's own loop, up to 99 workers); writes may
        # extend the file
        latency_us = int(argv.pop(0).split("=", 1)[1])
        stock = True
    if len(argv) != 2 or argv[0] in ("-h", "--help"):
        print(
            "usage: python -m qcowfs_dev.ceiling_fs [--stock-loop] [--latency-us=N] RAWFILE MOUNTPOINT  "
            "(serves RAWFILE as MOUNTPOINT/disk.raw)",
            file=sys.stderr,
        )
        return 2
    raw, mnt = argv
    if not os.path.isfile(raw):
        print(f"ceiling_fs: {raw}: not a regular file", file=sys.stderr)
        return 1
    if not os.path.isdir(mnt) or os.path.ismount(mnt):
        print(f"ceiling_fs: {mnt}: not a directory, or already a mount point", file=sys.stderr)
        return 1
    ops = CeilingOperations(raw, latency_us)
    options = set(pyfuse3.default_options)
    options.add(f"fsname={os.path.abspath(raw)}")
    options.add("subtype=ceilingfs")
    if os.getuid() == 0:
        options.add("allow_other")
    pyfuse3.init(ops, mnt, options)
    loop: _Loop
    if stock:
        loop = _StockLoop()
    else:
        # the request loop qcowfs runs (qcowfs/fuse/request_loop.py), so the ceiling stays a ceiling
        from qcowfs.fuse.request_loop import FastLoop

        loop = FastLoop()
    try:
        trio.run(_serve, loop)
    finally:
        # after fusermount3 -u the mount is gone already; after a signal we detach it ourselves
        pyfuse3.close(unmount=_signalled)
        os.close(ops.fd)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
