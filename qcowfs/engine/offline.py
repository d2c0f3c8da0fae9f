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
import json
import os
from typing import Any, Callable, Iterator, Optional

from ..errors import BitmapError, QcowError
from . import bitmap_commands
from .consistency import Checker, CheckResult
from .disk import Disk
from .encryption import Keys
from .image import Qcow2Image
from .locks import ImageLock
from .repair import apply_repair


def is_qcowfs_mount(path: str) -> bool:
    if not os.path.isdir(path) or not os.path.ismount(path):
        return False
    try:
        os.getxattr(path, bitmap_commands.PID_XATTR)
        return True
    except OSError:
        return False


@contextlib.contextmanager
def locked_image(
    path: str,
    write: bool,
    *,
    lock: bool = True,
    backing_policy: str = "follow",
    metadata_only: bool = False,
    keys: Optional[Keys] = None,
) -> Iterator[Qcow2Image]:
    """Open an unmounted image under QEMU's locks (a writer, or a reader sharing with readers),
    closed without writing anything on the way out. lock=False reads without taking the
    locks, as `qemu-img info -U` does (info). metadata_only: for info and check, which read no
    guest data (so an encrypted image opens without its key); keys: the passphrases of an
    encrypted image (engine/encryption.py) that is opened to read its data."""
    img = Qcow2Image(
        path,
        read_only=not write,
        backing_policy=backing_policy,
        metadata_only=metadata_only,
        keys=keys,
    )
    held = ImageLock(img.file.fd, path, write=write) if lock else None
    try:
        if held is not None:
            held.acquire()
        yield img
    finally:
        if held is not None:
            held.release()
        img.close(flush=False)


@contextlib.contextmanager
def open_locked(path: str, write: bool) -> Iterator:
    """locked_image(), and for a writer a Disk on it (bitmaps loaded and marked in_use, stored
    and cleared at the end, as a mount does); a reader gets the Qcow2Image. The bitmap
    commands it serves read and write no guest data, so an encrypted image needs no key."""
    with locked_image(path, write, metadata_only=True) as img:
        if not write:
            yield img
            return
        disk = Disk(img)
        try:
            yield disk
        finally:
            disk.close()


def check_image(
    path: str, repair: Optional[str] = None, progress: Optional[Callable[[float], None]] = None
) -> CheckResult:
    """`qcowfs check`: check (and with repair='leaks'|'all', repair) the image at path.

    Like qemu-img check -r: after a repair the image is checked again and that result is
    returned, with the numbers of leaks and corruptions fixed."""
    with locked_image(path, write=repair is not None, metadata_only=True) as img:
        ck = Checker(img, progress, repair=repair)
        res = ck.run()
        if repair and (res.leaks or res.corruptions or res.corruptions_fixed):
            fixed_leaks, fixed_corr = apply_repair(img, ck, repair)
            fixed_corr += res.corruptions_fixed
            res = Checker(img).run()
            res.leaks_fixed = fixed_leaks
            res.corruptions_fixed = fixed_corr
        return res


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
            raise BitmapError(
                f"bitmap {name!r} is inconsistent (in use at the last close); its extents are unknown; remove it",
                path,
                errno.EBUSY,
            )
        return [{"start": s, "length": n, "dirty": d} for s, n, d in bm.extents()]


def offline_command(path: str, op: str, name: str, **kw: Any) -> None:
    """A bitmap command on an unmounted image (locked, opened and closed as a mount would)."""
    cmd = bitmap_commands.decode(bitmap_commands.encode(op, name, **kw))
    with open_locked(path, write=True) as disk:
        bitmap_commands.apply(disk.bitmaps, cmd, live=False)


def live_bitmaps(mountpoint: str) -> list:
    """The status of each bitmap of a live mount (the JSON each `.bitmaps/NAME` file holds)."""
    d = os.path.join(mountpoint, ".bitmaps")
    rows = []
    for n in sorted(os.listdir(d)):
        with open(os.path.join(d, n)) as f:
            rows.append(json.load(f))
    return rows


def live_extents(mountpoint: str, name: str) -> list:
    """`bitmap extents` on a live mount: the daemon's in-memory bitmap, piece by piece."""
    path = os.path.join(mountpoint, ".bitmaps", name)
    out: list = []
    start: Optional[int] = 0
    while start is not None:
        try:
            piece = json.loads(os.getxattr(path, f"{bitmap_commands.EXTENTS_XATTR}{start}"))
        except OSError as e:
            reason = {
                errno.ENOENT: "no such bitmap",
                errno.EBUSY: "the bitmap is inconsistent (in use at the last close); its extents are unknown; "
                "remove it",
            }.get(e.errno or 0, e.strerror or str(e))
            raise QcowError(f"bitmap extents {name!r} failed: {reason}", mountpoint) from None
        out += [{"start": s, "length": n, "dirty": d} for s, n, d in piece["extents"]]
        start = piece["next"]
    return out


def live_checkpoint(
    mountpoint: str, name: str, disable: list, snapshot: bool, granularity: Optional[int] = None
) -> dict:
    """Send a checkpoint to a running daemon; what it did (its JSON)."""
    live_command(
        mountpoint,
        "checkpoint",
        name,
        disable=list(disable),
        snapshot=snapshot,
        granularity=granularity,
    )
    return json.loads(
        os.getxattr(os.path.join(mountpoint, ".bitmaps"), bitmap_commands.RESULT_XATTR)
    )


def live_command(mountpoint: str, op: str, name: str, **kw: Any) -> None:
    """Send a command to a running qcowfs daemon (an xattr write on MOUNTPOINT/.bitmaps)."""
    value = bitmap_commands.encode(op, name, **kw)
    try:
        os.setxattr(os.path.join(mountpoint, ".bitmaps"), bitmap_commands.COMMAND_XATTR, value)
    except OSError as e:
        reasons: dict[int, str] = {
            errno.EEXIST: "that name is taken (by a bitmap, or for a checkpoint by a snapshot too; "
            "an inconsistent bitmap must be removed first)",
            errno.ENOENT: "no such bitmap",
            errno.EBUSY: "the bitmap is inconsistent (in use at the last close); remove it",
            errno.EROFS: "the mount is read-only",
            errno.EINVAL: "invalid argument (name or granularity)",
            errno.ENAMETOOLONG: "bitmap name too long (at most 1023 bytes)",
            errno.EOPNOTSUPP: "not supported by this image (version 2 images cannot hold persistent bitmaps; "
            "images with an external data file cannot hold internal snapshots)",
            errno.ERANGE: "the image's refcounts cannot count another reference (narrow refcount_bits)",
        }
        reason = reasons.get(e.errno or 0, e.strerror or str(e))
        what = op if op == "checkpoint" else f"bitmap {op}"
        raise QcowError(f"{what} {name!r} failed: {reason}", mountpoint) from None
