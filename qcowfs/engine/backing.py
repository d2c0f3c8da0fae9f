"""Which files an image may make qcowfs open: the --backing policy.

A qcow2 header can name any path as its backing file or external data file
(`/etc/shadow`, `/dev/sda`), and whatever qcowfs opens there is served through
disk.raw. QEMU follows every name. For images from an untrusted source the
policy narrows that:

    follow    QEMU's behaviour: open what the image names; each file opened is
              logged, and a device or other non-regular file is logged as a warning
    same-dir  only regular files that resolve (after symlinks) inside the
              directory of the image that names them (or below it)
    none      no backing or external data file at all

Checked before the file is opened, level by level down the chain, so a refused
name is never opened (not even to probe its format).
"""

from __future__ import annotations

import logging
import os
import stat
from typing import Optional, Protocol

from ..errors import RefusedFile
from ..format import header as fmt
from .hostfile import HostFile

log = logging.getLogger(__name__)

POLICIES = ("follow", "same-dir", "none")


def file_kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISREG, "regular file"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISDIR, "directory"),
    ):
        if test(mode):
            return name
    return "special file"


def vet(owner: str, what: str, path: str, policy: str) -> None:
    """Refuse (RefusedFile) or log opening `path`, the `what` ("backing file", "external
    data file") named by image `owner`, under `policy`. A missing file passes: the
    caller reports it as not found."""
    if policy not in POLICIES:
        raise ValueError(f"unknown backing policy {policy!r}")
    real = os.path.realpath(path)
    if policy == "none":
        raise RefusedFile(
            f"the image needs {what} {path}, refused by --backing=none "
            "(--backing=same-dir or --backing=follow allows it)",
            owner,
        )
    try:
        kind = file_kind(os.stat(real).st_mode)
    except OSError:
        return
    if policy == "same-dir":
        base = os.path.realpath(os.path.dirname(os.path.abspath(owner)))
        if os.path.commonpath([base, real]) != base:
            raise RefusedFile(
                f"{what} {path} resolves to {real}, outside the image's directory {base}: "
                "refused by --backing=same-dir (--backing=follow allows it)",
                owner,
            )
        if kind != "regular file":
            raise RefusedFile(
                f"{what} {path} is a {kind}, not a regular file: refused by "
                "--backing=same-dir (--backing=follow allows it)",
                owner,
            )
    if kind != "regular file":
        log.warning(
            "%s: opening %s %s, a %s (%s), as --backing=follow allows",
            owner,
            what,
            path,
            kind,
            real,
        )
    else:
        log.info("%s: opening %s %s (%s)", owner, what, path, real)


class OpenImage(Protocol):
    """What chain() needs of an open image: a Qcow2Image (image.py imports this module, so it
    cannot be named here) or a RawImage; it looks for data_file, backing and header itself."""

    @property
    def path(self) -> str: ...

    @property
    def file(self) -> HostFile: ...


def chain(image: OpenImage) -> list:
    """What an open image reads besides itself: one dict per backing or external data file,
    top down (the files an image names, as opened and as resolved)."""
    out = []
    level: Optional[OpenImage] = image
    while level is not None:
        data = getattr(level, "data_file", None)
        if data is not None and data is not level.file:
            out.append(_entry("external data file", level.path, data.path, "raw"))
        below = getattr(level, "backing", None)
        if below is not None:
            out.append(
                _entry(
                    "backing file",
                    level.path,
                    below.path,
                    "raw" if not hasattr(below, "header") else "qcow2",
                )
            )
        level = below
    return out


def _entry(role: str, owner: str, path: str, fmt: str) -> dict:
    real = os.path.realpath(path)
    try:
        kind = file_kind(os.stat(real).st_mode)
    except OSError:
        kind = "missing"
    return {
        "role": role,
        "named-by": owner,
        "filename": path,
        "resolved": real,
        "format": fmt,
        "type": kind,
    }


class RawImage:
    """A raw file used as a backing file: guest offset == file offset."""

    def __init__(self, path: str):
        self.path = path
        self.file = HostFile(path, writable=False)
        self.size = self.file.size
        self.backing = None

    def read(self, offset: int, length: int) -> bytes:
        if offset >= self.size:
            return bytes(length)
        data = self.file.pread(min(length, self.size - offset), offset)
        if len(data) < length:
            data += bytes(length - len(data))
        return data

    def close(self) -> None:
        self.file.close()


def probe_format(path: str) -> str:
    """What an image names without a format: qcow2 by its magic, raw otherwise."""
    with open(path, "rb") as f:
        return "qcow2" if f.read(4) == fmt.MAGIC else "raw"
