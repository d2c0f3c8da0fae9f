"""Offline operations on an unmounted image (QEMU's `qemu-img bitmap` in our own CLI),
and the client side of the same commands on a live mount.

Offline commands take QEMU's locks, so they refuse an image that QEMU or a qcowfs
mount is using. A command that changes bitmaps opens the image read-write
exactly as a mount does (bitmaps loaded and marked in_use), applies the change,
and closes it cleanly (bitmaps stored, in_use cleared), so the result is what
QEMU itself would leave behind.
"""

from __future__ import annotations

import contextlib
import errno
import os

from . import bitmap_commands
from .disk import Disk
from .errors import BitmapError, QcowError
from .image import Qcow2Image
from .locks import ImageLock


def is_qcowfs_mount(path: str) -> bool:
    if not os.path.isdir(path) or not os.path.ismount(path):
        return False
    try:
        os.getxattr(path, bitmap_commands.PID_XATTR)
        return True
    except OSError:
        return False


@contextlib.contextmanager
def open_locked(path: str, write: bool):
    """Open an image with QEMU's locks; yields a Disk (read-write) or the Qcow2Image (read-only)."""
    img = Qcow2Image(path, read_only=not write)
    lock = ImageLock(img.file.fd, path, write=write)
    try:
        lock.acquire()
    except BaseException:
        img.close(flush=False)
        raise
    try:
        if write:
            disk = Disk(img)
            try:
                yield disk
            except BaseException:
                disk.close()
                raise
            disk.close()
        else:
            try:
                yield img
            finally:
                img.close(flush=False)
    finally:
        lock.release()


def list_bitmaps(path: str) -> list:
    from .bitmaps import BitmapStore

    with open_locked(path, write=False) as img:
        store = BitmapStore(img)
        out = []
        for bm in store.bitmaps.values():
            st = bm.status()
            flags = (["in-use"] if bm.inconsistent else []) + (["auto"] if bm.enabled else [])
            st["flags"] = flags
            out.append(st)
        return out


def bitmap_extents(path: str, name: str) -> list:
    from .bitmaps import BitmapStore

    with open_locked(path, write=False) as img:
        store = BitmapStore(img)
        bm = store.get(name)
        if bm.inconsistent:
            raise BitmapError(f"bitmap {name!r} is inconsistent (in use at the last close); its extents are unknown; remove it",
                              path, errno.EBUSY)
        return [{"start": s, "length": n, "dirty": d} for s, n, d in bm.extents()]


def offline_command(path: str, op: str, name: str, **kw) -> None:
    """A bitmap command on an unmounted image (locked, opened and closed as a mount would)."""
    cmd = bitmap_commands.decode(bitmap_commands.encode(op, name, **kw))
    with open_locked(path, write=True) as disk:
        bitmap_commands.apply(disk.bitmaps, cmd, live=False)


def live_command(mountpoint: str, op: str, name: str, **kw) -> None:
    """Send a command to a running qcowfs daemon (an xattr write on MOUNTPOINT/.bitmaps)."""
    value = bitmap_commands.encode(op, name, **kw)
    try:
        os.setxattr(os.path.join(mountpoint, ".bitmaps"), bitmap_commands.COMMAND_XATTR, value)
    except OSError as e:
        reasons: dict[int, str] = {
            errno.EEXIST: "a bitmap with that name already exists (an inconsistent one must be removed first)",
            errno.ENOENT: "no such bitmap",
            errno.EBUSY: "the bitmap is inconsistent (in use at the last close); remove it",
            errno.EROFS: "the mount is read-only",
            errno.EINVAL: "invalid argument (name or granularity)",
            errno.ENAMETOOLONG: "bitmap name too long (at most 1023 bytes)",
            errno.EOPNOTSUPP: "not supported by this image (version 2 images cannot hold persistent bitmaps)",
        }
        reason = reasons.get(e.errno or 0, e.strerror or str(e))
        raise QcowError(f"bitmap {op} {name!r} failed: {reason}", mountpoint) from None
