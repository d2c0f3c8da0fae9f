"""Bitmap commands: one schema and one dispatcher for every way a command arrives.

`qcowfs bitmap OP TARGET ...` works on an unmounted image (offline.py opens it) and on a
live mount, where the command travels as one JSON object written as the extended
attribute `user.qcowfs.command` of MNT/.bitmaps (fuse/operations.py). Both end in apply() on the
image's BitmapStore, so the two paths cannot drift apart. The file commands of
`.bitmaps/NAME` (`echo clear > NAME`) are the FILE_COMMANDS subset.
"""

from __future__ import annotations

import errno
import json
from typing import TYPE_CHECKING, Any, Optional

from ..errors import BitmapError

if TYPE_CHECKING:
    from .bitmaps import BitmapStore
    from .dirty_bitmap import DirtyBitmap

#: the xattr on MNT/.bitmaps that carries a command to a live mount
COMMAND_XATTR = "user.qcowfs.command"
#: the xattr on MNT that tells the daemon's pid (qcowfs umount waits for it)
PID_XATTR = "user.qcowfs.pid"
#: `user.qcowfs.image` on MNT: JSON {"path", "dev", "ino", "backing"} of the mounted image, for
#: `qcowfs backup`, which reads a checkpoint's snapshot from the image file itself
IMAGE_XATTR = "user.qcowfs.image"
#: `user.qcowfs.extents@START` on MNT/.bitmaps/NAME: up to EXTENTS_PER_CALL dirty/clean runs
#: from guest offset START, as JSON {"extents": [[start, length, dirty], ...], "next": N or null}
#: (an xattr value holds at most 64 KiB: long maps come in pieces)
EXTENTS_XATTR = "user.qcowfs.extents@"
EXTENTS_PER_CALL = 1500
#: `user.qcowfs.result` on MNT/.bitmaps: JSON of what the last checkpoint did
RESULT_XATTR = "user.qcowfs.result"

FILE_COMMANDS = ("clear", "enable", "disable")
OPS = ("add", "remove", "merge", *FILE_COMMANDS)
LIVE_OPS = (*OPS, "checkpoint")  # checkpoint: live mounts only (it takes a snapshot too)


def encode(op: str, name: str, **kw: Any) -> bytes:
    """A command as the JSON the live channel carries (None values left out)."""
    cmd = {"op": op, "name": name}
    cmd.update({k: v for k, v in kw.items() if v is not None})
    return json.dumps(cmd).encode()


def decode(value: bytes) -> dict:
    """Parse and check a command strictly: anything unexpected is EINVAL."""
    try:
        cmd = json.loads(value.decode())
        ok = (
            isinstance(cmd, dict)
            and cmd.get("op") in LIVE_OPS
            and isinstance(cmd.get("name"), str)
            and (cmd.get("granularity") is None or type(cmd["granularity"]) is int)
            and (cmd["op"] != "merge" or isinstance(cmd.get("dst"), str))
            and (
                cmd["op"] != "checkpoint"
                or (
                    isinstance(cmd.get("disable", []), list)
                    and all(isinstance(b, str) for b in cmd.get("disable", []))
                    and isinstance(cmd.get("snapshot", True), bool)
                )
            )
        )
    except (ValueError, UnicodeDecodeError):
        ok = False
    if not ok:
        raise BitmapError(f"malformed bitmap command {value[:80]!r}", err=errno.EINVAL)
    return cmd


def extents_chunk(bm: DirtyBitmap, start: int) -> bytes:
    """One piece of a live extents listing (EXTENTS_XATTR)."""
    ext = bm.extents(start, EXTENTS_PER_CALL + 1)
    more = len(ext) > EXTENTS_PER_CALL
    ext = ext[:EXTENTS_PER_CALL]
    nxt = ext[-1][0] + ext[-1][1] if more else None
    return json.dumps(
        {"extents": [list(e) for e in ext], "next": nxt}, separators=(",", ":")
    ).encode()


def apply(store: BitmapStore, cmd: dict, *, live: bool) -> Optional[str]:
    """Run a decoded command on a BitmapStore. Transient bitmaps exist only on a live mount.
    Returns the name of a bitmap the command removed (the FUSE layer forgets its inode)."""
    op, name = cmd["op"], cmd["name"]
    if op == "add":
        persistent = bool(cmd.get("persistent", True)) or not live
        store.create(
            name,
            cmd.get("granularity"),
            persistent=persistent,
            enabled=bool(cmd.get("enabled", True)),
        )
    elif op == "remove":
        store.remove(name)
        return name
    elif op == "merge":
        store.merge(name, cmd["dst"])
    else:
        getattr(store, op)(name)
    return None
