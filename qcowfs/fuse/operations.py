"""The FUSE layer: translate requests into Disk and BitmapStore calls, and errors into errnos.

The tree is fixed:
    /              the mount root (xattr user.qcowfs.pid: the daemon's pid)
    /disk.raw      the guest disk (size = virtual size; st_blocks = host space used)
    /.bitmaps/     one regular file per dirty bitmap: read -> JSON status,
                   write "clear" | "enable" | "disable" -> command, create -> new bitmap,
                   unlink -> remove; xattrs user.qcowfs.command (set: one JSON command,
                   bitmap_commands.py) and user.qcowfs.result (the last checkpoint) on the
                   directory, user.qcowfs.extents@START on a bitmap file
    /.snapshots/   one read-only file per internal snapshot (snapshot_files.py):
                   create -> take a snapshot, unlink -> delete it

The atomicity rule: no await inside a metadata mutation. Trio switches tasks only at an
await, so every mutation (mapping, allocation, refcounts, bitmap marks and commands,
snapshots, resize) runs to its end before another request's code runs. Handlers do await,
outside mutations, when host data I/O runs on threads (ConcurrentIo, fuse/concurrent_io.py;
without it, io_threads=0 or a pyfuse3 without qcowfs' hook, no handler ever waits): a guest
write may wait for a cluster another request is allocating; a guest read or write may wait
for its own data copy on an I/O thread, mapped and allocated before that await and
committed after it; a handler that changes metadata beyond guest writes (the @_quiesced
ones, and a command written to a bitmap file) first waits until no copy is in flight
(ConcurrentIo.quiesce, QEMU's drain), then mutates without awaiting.

Errors become errnos in exactly one place, _errno_for(): through _guard() (and _quiesced)
for most handlers, called directly by read() and write(), the hot path.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import stat
from typing import (
    TYPE_CHECKING,
    Any,
    Awaitable,
    Callable,
    Coroutine,
    NoReturn,
    Optional,
    Sequence,
    TypeVar,
    Union,
)

import pyfuse3

from ..engine import allocation, bitmap_commands
from ..engine.disk import Disk
from ..errors import BitmapError, CorruptImage, QcowError, SnapshotError
from .concurrent_io import ConcurrentIo
from .lanes import Lanes
from .options import MountOptions
from .snapshot_files import SnapshotDir

if TYPE_CHECKING:  # the handler decorators' types (ParamSpec: Python 3.10)
    from typing import Concatenate, ParamSpec

    _P = ParamSpec("_P")  # a handler's parameters after self
    _R = TypeVar("_R")  # what it returns
    _Ops = TypeVar("_Ops", bound="QcowOperations")

log = logging.getLogger(__name__)

ROOT = pyfuse3.ROOT_INODE
DISK = ROOT + 1
BITMAPS_DIR = ROOT + 2
SNAPSHOTS_DIR = ROOT + 3
FIRST_BITMAP_INODE = 16
DISK_NAME = b"disk.raw"
BITMAPS_NAME = b".bitmaps"
SNAPSHOTS_NAME = b".snapshots"
DIRS = (ROOT, BITMAPS_DIR, SNAPSHOTS_DIR)
PID_XATTR = bitmap_commands.PID_XATTR.encode()
IMAGE_XATTR = bitmap_commands.IMAGE_XATTR.encode()
COMMAND_XATTR = bitmap_commands.COMMAND_XATTR.encode()
COMMANDS = bitmap_commands.FILE_COMMANDS
FALLOC_KEEP_SIZE, FALLOC_PUNCH_HOLE, FALLOC_ZERO_RANGE = 0x01, 0x02, 0x10  # <linux/falloc.h>
FALLOC_PUNCH_KEEP = FALLOC_PUNCH_HOLE | FALLOC_KEEP_SIZE
#: whether this pyfuse3 passes fallocate and lseek requests on (qcowfs' patch, patches/)
HAS_FALLOCATE = hasattr(pyfuse3.Operations, "fallocate") and hasattr(pyfuse3.Operations, "lseek")
EXTENTS_XATTR = bitmap_commands.EXTENTS_XATTR.encode()
RESULT_XATTR = bitmap_commands.RESULT_XATTR.encode()


def _errno_for(ops: "QcowOperations", where: str, e: Exception) -> int:
    """The one place errors become errnos (an exception escaping a handler kills the mount)."""
    if isinstance(e, CorruptImage):
        return e.errno  # already logged once by the image layer
    if isinstance(e, (BitmapError, SnapshotError)):
        log.info("%s", e)
        return e.errno
    if isinstance(e, QcowError):
        log.error("%s", e)
        return e.errno
    if isinstance(e, OSError):
        log.error("%s: host I/O error in %s: %s", ops.disk.image.path, where, e)
        return e.errno or errno.EIO
    log.exception("unexpected error in %s", where)
    return errno.EIO


def _guard(
    fn: Callable[Concatenate[_Ops, _P], Awaitable[_R]],
) -> Callable[Concatenate[_Ops, _P], Coroutine[Any, Any, _R]]:
    """Map every error of a handler to an errno, through _errno_for()."""

    @functools.wraps(fn)
    async def wrapper(self: _Ops, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return await fn(self, *args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except Exception as e:
            raise pyfuse3.FUSEError(_errno_for(self, fn.__name__, e)) from None

    return wrapper


def _quiesced(
    fn: Callable[Concatenate[_Ops, _P], Awaitable[_R]],
) -> Callable[Concatenate[_Ops, _P], Coroutine[Any, Any, _R]]:
    """_guard, for a handler that changes metadata beyond guest writes (or needs them settled):
    it runs once no host data copy is in flight (concurrent_io.ConcurrentIo.quiesce, QEMU's drain)."""

    @functools.wraps(fn)
    async def after_quiesce(self: _Ops, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        if self.cio is not None:
            await self.cio.quiesce()
        return await fn(self, *args, **kwargs)

    return _guard(after_quiesce)


class BitmapHandle:
    __slots__ = ("name", "content")

    def __init__(self, name: str, content: bytes):
        self.name = name
        self.content = content


class QcowOperations(SnapshotDir, pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False
    # write data as a view of pyfuse3's request buffer, not a copy (qcowfs' pyfuse3 patch;
    # stock pyfuse3 ignores it): nothing here keeps it past the handler
    enable_write_view = True

    def __init__(self, disk: Disk, options: Optional[MountOptions] = None):
        super().__init__()
        self.disk = disk
        self._read_view = disk.read_view  # the hot path, one call deep
        # Owners and modes the kernel checks every access against (default_permissions is
        # always on): by default only the mounting user may open the guest disk.
        self.options = opts = options or MountOptions(read_only=disk.read_only)
        self.uid = os.getuid() if opts.uid is None else opts.uid
        self.gid = os.getgid() if opts.gid is None else opts.gid
        st = os.stat(disk.image.path)
        self.time_ns = st.st_mtime_ns
        self.bitmap_inodes: dict[str, int] = {}
        self.inode_names: dict[int, str] = {}
        self.next_inode = FIRST_BITMAP_INODE
        self.handles: dict[int, BitmapHandle] = {}
        self.next_fh = 16
        self._init_snapshots()
        self.last_result: Optional[dict] = None  # what the last checkpoint did (RESULT_XATTR)
        #: several guest reads and writes in flight (fuse/concurrent_io.py); None: each served inline
        self.cio: Optional[ConcurrentIo] = None
        #: request lanes (lanes.py): what this thread serves of disk.raw tells them what they
        #: may serve themselves next time
        self.lanes: Optional[Lanes] = None

    # ------------------------------------------------------------------ attributes
    def _bitmap_inode(self, name: str) -> int:
        ino = self.bitmap_inodes.get(name)
        if ino is None:
            ino = self.next_inode
            self.next_inode += 1
            self.bitmap_inodes[name] = ino
            self.inode_names[ino] = name
        return ino

    def _forget_bitmap(self, name: str) -> None:
        ino = self.bitmap_inodes.pop(name, None)
        if ino is not None:
            self.inode_names.pop(ino, None)

    def _attr(self, inode: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        a.st_uid = self.uid
        a.st_gid = self.gid
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = self.time_ns
        a.st_blksize = 4096
        ro = self.disk.read_only
        mode = self.options.mode
        if inode in DIRS:
            # the root holds fixed entries (nothing can be created there): never writable
            a.st_mode = stat.S_IFDIR | (mode(0o555, ro) if inode == ROOT else mode(0o777, ro))
            a.st_nlink = 4 if inode == ROOT else 2
            a.entry_timeout = 0 if inode == ROOT else 300
            a.attr_timeout = 1 if inode == ROOT else 0
        elif inode == DISK:
            a.st_mode = stat.S_IFREG | mode(0o666, ro)
            a.st_nlink = 1
            a.st_size = self.disk.size
            a.st_blocks = self.disk.image.allocated_host_bytes() // 512
            a.entry_timeout = 300
            a.attr_timeout = 1
        elif inode in self.inode_snaps:
            snap = self.snapshot_by_inode(inode)
            if snap is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            self.snapshot_attr(a, snap)
        else:
            name = self.inode_names.get(inode)
            if name is None or name not in self.disk.bitmaps.bitmaps:
                raise pyfuse3.FUSEError(errno.ENOENT)
            a.st_mode = stat.S_IFREG | mode(0o666, ro)
            a.st_nlink = 1
            a.st_size = len(self._status(name))
            a.entry_timeout = 0
            a.attr_timeout = 0
        return a

    def _status(self, name: str) -> bytes:
        return (json.dumps(self.disk.bitmaps.get(name).status()) + "\n").encode()

    # ------------------------------------------------------------------ lookup
    @_guard
    async def lookup(
        self,
        parent_inode: pyfuse3.InodeT,
        name: pyfuse3.FileNameT,
        ctx: Optional[pyfuse3.RequestContext] = None,
    ) -> pyfuse3.EntryAttributes:
        if parent_inode == ROOT:
            if name == DISK_NAME:
                return self._attr(DISK)
            if name == BITMAPS_NAME:
                return self._attr(BITMAPS_DIR)
            if name == SNAPSHOTS_NAME:
                return self._attr(SNAPSHOTS_DIR)
        elif parent_inode == SNAPSHOTS_DIR:
            snap = self.snapshot_files().get(name)
            if snap is not None:
                return self._attr(self.snap_inode(snap))
        elif parent_inode == BITMAPS_DIR:
            n = os.fsdecode(name)
            if n in self.disk.bitmaps.bitmaps:
                return self._attr(self._bitmap_inode(n))
        raise pyfuse3.FUSEError(errno.ENOENT)

    @_guard
    async def getattr(
        self, inode: pyfuse3.InodeT, ctx: Optional[pyfuse3.RequestContext] = None
    ) -> pyfuse3.EntryAttributes:
        return self._attr(inode)

    @_quiesced
    async def setattr(
        self,
        inode: pyfuse3.InodeT,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: Optional[pyfuse3.FileHandleT],
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        if fields.update_size:
            if inode == DISK:
                if attr.st_size != self.disk.size:
                    self.disk.grow(attr.st_size)  # a smaller size: EPERM, nothing changed
            elif inode in DIRS:
                raise pyfuse3.FUSEError(errno.EISDIR)
            elif inode in self.inode_snaps:
                raise pyfuse3.FUSEError(errno.EROFS)
            # truncating a bitmap file (echo cmd > NAME opens with O_TRUNC) is accepted and ignored
        if fields.update_mode or fields.update_uid or fields.update_gid:
            raise pyfuse3.FUSEError(errno.EPERM)
        # timestamps (touch) are accepted and ignored: they are not stored
        return self._attr(inode)

    async def forget(self, inode_list: Sequence[tuple[pyfuse3.InodeT, int]]) -> None:
        pass  # inodes are derived from names; nothing to release

    # ------------------------------------------------------------------ directories
    @_guard
    async def opendir(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileHandleT:
        if inode not in DIRS:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    @_guard
    async def readdir(
        self, fh: pyfuse3.FileHandleT, start_id: int, token: pyfuse3.ReaddirToken
    ) -> None:
        # "." and ".." first, as every file system lists them (a low-level FUSE server must
        # add them itself; `ls -a` and some tools expect them). The root is its own parent here:
        # the kernel resolves the mount point's ".." itself.
        entries = [(b".", fh), (b"..", ROOT)]
        if fh == ROOT:
            entries += [
                (DISK_NAME, DISK),
                (BITMAPS_NAME, BITMAPS_DIR),
                (SNAPSHOTS_NAME, SNAPSHOTS_DIR),
            ]
        elif fh == SNAPSHOTS_DIR:
            if start_id == 0:
                self.snapshots_changed()  # a fresh listing rereads the table
            entries += [(n, self.snap_inode(s)) for n, s in sorted(self.snapshot_files().items())]
        else:
            entries += [
                (os.fsencode(n), self._bitmap_inode(n)) for n in sorted(self.disk.bitmaps.bitmaps)
            ]
        for i in range(start_id, len(entries)):
            name, ino = entries[i]
            if not pyfuse3.readdir_reply(token, name, self._attr(ino), i + 1):
                break

    async def releasedir(self, fh: pyfuse3.FileHandleT) -> None:
        pass

    # ------------------------------------------------------------------ files
    @_guard
    async def open(
        self, inode: pyfuse3.InodeT, flags: pyfuse3.FlagT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileInfo:
        writing = flags & os.O_ACCMODE != os.O_RDONLY
        if inode == DISK:
            if writing and self.disk.read_only:
                raise pyfuse3.FUSEError(errno.EROFS)
            # direct_io, as QEMU's FUSE export does: reads and writes reach us unchanged, nothing
            # stale is served from the page cache, and the kernel skips its per-write
            # security.capability getxattr round trip (measured: 2 requests per write -> 1).
            return pyfuse3.FileInfo(fh=DISK, direct_io=True)
        if inode in DIRS:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if inode in self.inode_snaps:
            snap = self.snapshot_by_inode(inode)
            if snap is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self.open_snapshot(snap, writing)
        name = self.inode_names.get(inode)
        if name is None or name not in self.disk.bitmaps.bitmaps:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if writing and self.disk.read_only:
            raise pyfuse3.FUSEError(errno.EROFS)
        return self._open_bitmap(name)

    def _open_bitmap(self, name: str) -> pyfuse3.FileInfo:
        fh = self.next_fh
        self.next_fh += 1
        self.handles[fh] = BitmapHandle(name, self._status(name))
        # direct_io: the kernel must not serve a stale status from its cache
        return pyfuse3.FileInfo(fh=fh, direct_io=True)

    @_quiesced
    async def create(
        self,
        parent_inode: pyfuse3.InodeT,
        name: pyfuse3.FileNameT,
        mode: pyfuse3.ModeT,
        flags: pyfuse3.FlagT,
        ctx: pyfuse3.RequestContext,
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        if parent_inode not in (BITMAPS_DIR, SNAPSHOTS_DIR):
            raise pyfuse3.FUSEError(errno.EPERM)
        if self.disk.read_only:
            raise pyfuse3.FUSEError(errno.EROFS)
        if parent_inode == SNAPSHOTS_DIR:
            snap = self.take_snapshot(name)
            return self.open_snapshot(snap, False), self._attr(self.snap_inode(snap))
        n = os.fsdecode(name)
        self.disk.bitmaps.create(n)
        log.info("%s: created persistent bitmap %r", self.disk.image.path, n)
        ino = self._bitmap_inode(n)
        return self._open_bitmap(n), self._attr(ino)

    # read() and write() are the hot path: they catch errors themselves rather than pay for
    # _guard's extra coroutine on every request.
    # pyfuse3 replies from any contiguous buffer (PyObject_GetBuffer); its stub says bytes
    async def read(self, fh: pyfuse3.FileHandleT, off: int, size: int) -> Union[bytes, memoryview]:  # type: ignore[override]
        if fh == DISK:
            try:
                cio = self.cio
                if cio is not None:
                    if cio.offload_read():
                        data = await cio.read(off, size)
                    else:
                        data = cio.read_inline(off, size)
                else:
                    # a reused buffer: pyfuse3 sends the reply before it reads the next request
                    data = self._read_view(off, size)
                if self.lanes is not None:
                    self.lanes.touched(off, size)
                return data
            except Exception as e:
                raise pyfuse3.FUSEError(_errno_for(self, "read", e)) from None
        try:
            return self._read_bitmap(fh, off, size)
        except pyfuse3.FUSEError:
            raise
        except Exception as e:
            raise pyfuse3.FUSEError(_errno_for(self, "read", e)) from None

    def _read_bitmap(
        self, fh: pyfuse3.FileHandleT, off: int, size: int
    ) -> Union[bytes, memoryview]:
        h = self.handles.get(fh)
        if h is None:
            view = self.snap_handles.get(fh)
            if view is not None:
                return view.read_view(off, size)
            raise pyfuse3.FUSEError(errno.EBADF)
        if off == 0:
            # a fresh read from the start sees the current status
            try:
                h.content = self._status(h.name)
            except BitmapError:
                pass
        return h.content[off : off + size]

    async def write(self, fh: pyfuse3.FileHandleT, off: int, buf: Union[bytes, memoryview]) -> int:
        if fh == DISK:
            try:
                cio = self.cio
                if cio is not None:
                    if cio.write_must_wait():
                        n = await cio.write(off, buf)
                    else:
                        n = cio.write_inline(off, buf)
                else:
                    n = self.disk.write(off, buf)
                if self.lanes is not None:
                    self.lanes.touched(off, n)
                return n
            except Exception as e:
                raise pyfuse3.FUSEError(_errno_for(self, "write", e)) from None
        try:
            if self.cio is not None:
                await self.cio.quiesce()  # a bitmap command: no write half-recorded around it
            return self._write_bitmap(fh, off, buf)
        except pyfuse3.FUSEError:
            raise
        except Exception as e:
            raise pyfuse3.FUSEError(_errno_for(self, "write", e)) from None

    def _write_bitmap(
        self, fh: pyfuse3.FileHandleT, off: int, buf: Union[bytes, memoryview]
    ) -> int:
        h = self.handles.get(fh)
        if h is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        try:
            command = bytes(buf).decode("ascii").strip()
        except UnicodeDecodeError:
            command = None
        if command not in COMMANDS:
            log.info(
                "%s: bitmap %r: unknown command %r (use clear, enable or disable)",
                self.disk.image.path,
                h.name,
                bytes(buf[:40]),
            )
            raise pyfuse3.FUSEError(errno.EINVAL)
        getattr(self.disk.bitmaps, command)(h.name)
        log.info("%s: bitmap %r: %s", self.disk.image.path, h.name, command)
        return len(buf)

    # fallocate and lseek reach us only through a pyfuse3 with qcowfs' patch (patches/); stock
    # pyfuse3 has no handler for them and the kernel answers EOPNOTSUPP / seeks generically
    @_quiesced
    async def fallocate(self, fh: pyfuse3.FileHandleT, mode: int, offset: int, length: int) -> None:
        log.debug("fallocate fh=%s mode=%#x offset=%d length=%d", fh, mode, offset, length)
        if fh != DISK:
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        if self.disk.read_only:
            raise pyfuse3.FUSEError(errno.EROFS)
        if mode == 0:
            # preallocation: every byte of the disk is already as allocated as it will be
            if offset + length > self.disk.size:
                raise pyfuse3.FUSEError(errno.EOPNOTSUPP)  # growing goes through truncate
            return
        if mode in (FALLOC_PUNCH_KEEP, FALLOC_ZERO_RANGE, FALLOC_ZERO_RANGE | FALLOC_KEEP_SIZE):
            self.disk.zero_range(offset, length)
            return
        raise pyfuse3.FUSEError(errno.EOPNOTSUPP)

    @_guard
    async def lseek(self, fh: pyfuse3.FileHandleT, offset: int, whence: int) -> int:
        if fh != DISK or whence not in (allocation.SEEK_DATA, allocation.SEEK_HOLE):
            raise pyfuse3.FUSEError(errno.EINVAL)
        pos = self.disk.seek(offset, whence)
        if pos is None:
            raise pyfuse3.FUSEError(errno.ENXIO)
        return pos

    @_quiesced
    async def fsync(self, fh: pyfuse3.FileHandleT, datasync: bool) -> None:
        if fh == DISK:
            self.disk.flush()

    async def flush(self, fh: pyfuse3.FileHandleT) -> None:
        pass

    async def release(self, fh: pyfuse3.FileHandleT) -> None:
        self.handles.pop(fh, None)
        self.snap_handles.pop(fh, None)

    @_quiesced
    async def unlink(
        self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT, ctx: pyfuse3.RequestContext
    ) -> None:
        if parent_inode not in (BITMAPS_DIR, SNAPSHOTS_DIR):
            raise pyfuse3.FUSEError(errno.EPERM)
        if self.disk.read_only:
            raise pyfuse3.FUSEError(errno.EROFS)
        if parent_inode == SNAPSHOTS_DIR:
            self.delete_snapshot(name)
            return
        n = os.fsdecode(name)
        self.disk.bitmaps.remove(n)
        self._forget_bitmap(n)
        log.info("%s: removed bitmap %r", self.disk.image.path, n)

    # ------------------------------------------------------------------ refused
    async def mkdir(
        self,
        parent_inode: pyfuse3.InodeT,
        name: pyfuse3.FileNameT,
        mode: pyfuse3.ModeT,
        ctx: pyfuse3.RequestContext,
    ) -> NoReturn:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def mknod(
        self,
        parent_inode: pyfuse3.InodeT,
        name: pyfuse3.FileNameT,
        mode: pyfuse3.ModeT,
        rdev: int,
        ctx: pyfuse3.RequestContext,
    ) -> NoReturn:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def symlink(
        self,
        parent_inode: pyfuse3.InodeT,
        name: pyfuse3.FileNameT,
        target: pyfuse3.FileNameT,
        ctx: pyfuse3.RequestContext,
    ) -> NoReturn:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def link(
        self,
        inode: pyfuse3.InodeT,
        new_parent_inode: pyfuse3.InodeT,
        new_name: pyfuse3.FileNameT,
        ctx: pyfuse3.RequestContext,
    ) -> NoReturn:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def rename(
        self,
        parent_inode_old: pyfuse3.InodeT,
        name_old: pyfuse3.FileNameT,
        parent_inode_new: pyfuse3.InodeT,
        name_new: pyfuse3.FileNameT,
        flags: pyfuse3.FlagT,
        ctx: pyfuse3.RequestContext,
    ) -> NoReturn:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def rmdir(
        self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT, ctx: pyfuse3.RequestContext
    ) -> NoReturn:
        raise pyfuse3.FUSEError(errno.EPERM)

    # ------------------------------------------------------------------ control
    @_quiesced
    async def setxattr(
        self,
        inode: pyfuse3.InodeT,
        name: pyfuse3.XAttrNameT,
        value: bytes,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        """`qcowfs bitmap OP MOUNTPOINT ...` sends one JSON command as the value of
        user.qcowfs.command on .bitmaps/ (bitmap_commands.py: strictly parsed, EINVAL otherwise)."""
        if inode != BITMAPS_DIR or name != COMMAND_XATTR:
            raise pyfuse3.FUSEError(errno.ENOTSUP)
        cmd = bitmap_commands.decode(value)
        if self.disk.read_only:
            raise pyfuse3.FUSEError(errno.EROFS)
        if cmd["op"] == "checkpoint":
            self.last_result = self.disk.checkpoint(
                cmd["name"],
                cmd.get("disable", []),
                cmd.get("snapshot", True),
                cmd.get("granularity"),
            )
            self.snapshots_changed()
            log.info("%s: checkpoint %s", self.disk.image.path, self.last_result)
            return
        removed = bitmap_commands.apply(self.disk.bitmaps, cmd, live=True)
        if removed is not None:
            self._forget_bitmap(removed)
        log.info("%s: bitmap %r: %s", self.disk.image.path, cmd["name"], cmd)

    # ------------------------------------------------------------------ misc
    @_guard
    async def getxattr(
        self, inode: pyfuse3.InodeT, name: pyfuse3.XAttrNameT, ctx: pyfuse3.RequestContext
    ) -> bytes:
        if inode == ROOT and name == PID_XATTR:
            return str(os.getpid()).encode()
        if inode == ROOT and name == IMAGE_XATTR:
            img = self.disk.image
            st = os.fstat(img.file.fd)
            return json.dumps(
                {
                    "path": os.path.abspath(img.path),
                    "dev": st.st_dev,
                    "ino": st.st_ino,
                    "backing": img.backing_policy,
                }
            ).encode()
        if inode == BITMAPS_DIR and name == RESULT_XATTR and self.last_result is not None:
            return json.dumps(self.last_result).encode()
        if name.startswith(EXTENTS_XATTR) and inode in self.inode_names:
            try:
                start = int(name[len(EXTENTS_XATTR) :])
            except ValueError:
                raise pyfuse3.FUSEError(errno.EINVAL) from None
            bm = self.disk.bitmaps.usable(self.inode_names[inode])
            return bitmap_commands.extents_chunk(bm, start)
        raise pyfuse3.FUSEError(errno.ENODATA)

    @_guard
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        s = os.statvfs(os.path.dirname(os.path.abspath(self.disk.image.path)))
        d = pyfuse3.StatvfsData()
        d.f_bsize = s.f_bsize
        d.f_frsize = s.f_frsize
        d.f_blocks = s.f_blocks
        d.f_bfree = s.f_bfree
        d.f_bavail = s.f_bavail
        d.f_files = 2 + len(self.disk.bitmaps.bitmaps)
        d.f_ffree = 0
        d.f_favail = 0
        d.f_namemax = 1023
        return d
