"""The backup directory: what is in it and how it changes without ever being half-written.

    DIR/NAME.qcow2     a backup: the disk at checkpoint NAME (a full one, or the clusters that
                       changed since the previous backup over that one as its backing file)
    DIR/NAME.json      its manifest: kind, backing, sizes, times, the point's table (table.py)
    DIR/.NAME.pending  a backup that was started (its checkpoint may exist in the source) and
                       has not completed; its bitmap still counts for the next incremental
    DIR/.NAME.*.part   files being written (removed by the next run)

Every file reaches its final name the same way: written under a temporary name, fsynced,
renamed, and the directory fsynced (atomic_write, publish). A backup is complete when
NAME.qcow2 exists: its manifest is published just before it, so a complete backup always has
one; a manifest without its image is a backup that was pruned (or a run that died between the
two renames, which the run's pending marker tells apart).
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import re
from typing import Any, Optional

from ..errors import BackupError
from ..format.header import parse_header

MANIFEST_VERSION = 1
PENDING_SUFFIX = ".pending"
PART_SUFFIX = ".part"
#: names are used for files in DIR and as bitmap and snapshot names in the source
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,200}$")


def check_name(name: str) -> None:
    if not NAME_RE.match(name) or name.endswith((".json", ".qcow2", PENDING_SUFFIX, PART_SUFFIX)):
        raise BackupError(
            f"invalid backup name {name!r}: use letters, digits and . _ + - "
            "(at most 201, starting with a letter or digit)"
        )


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp: str, final: str) -> None:
    """Rename a written and fsynced file to its final name, durably."""
    os.rename(tmp, final)
    fsync_dir(os.path.dirname(final) or ".")


def atomic_write(path: str, data: bytes) -> None:
    d, base = os.path.split(path)
    tmp = os.path.join(d, f".{base}{PART_SUFFIX}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    publish(tmp, path)


def header_backing(path: str) -> Optional[str]:
    """The backing file name in a qcow2 file's header (FormatError, OSError)."""
    with open(path, "rb") as f:
        return parse_header(f.read(64 << 10), allow_encrypted=True).backing_file


@dataclasses.dataclass
class Backup:
    """One manifest (NAME.json) and whether its image is there."""

    name: str
    manifest: dict[str, Any]
    has_image: bool

    @property
    def seq(self) -> int:
        return int(self.manifest["seq"])

    @property
    def kind(self) -> str:
        return str(self.manifest["kind"])

    @property
    def backing(self) -> Optional[str]:
        b = self.manifest.get("backing")
        return str(b) if b else None


class BackupDir:
    """DIR: its backups (by manifest), pending runs, and the files of one backup."""

    def __init__(self, path: str, create: bool = False):
        self.path = path
        if create:
            os.makedirs(path, mode=0o700, exist_ok=True)
        if not os.path.isdir(path):
            raise BackupError("not a directory (no backups here)", path)

    def image(self, name: str) -> str:
        return os.path.join(self.path, f"{name}.qcow2")

    def manifest_path(self, name: str) -> str:
        return os.path.join(self.path, f"{name}.json")

    def part(self, name: str, what: str) -> str:
        return os.path.join(self.path, f".{name}.{what}{PART_SUFFIX}")

    def pending_path(self, name: str) -> str:
        return os.path.join(self.path, f".{name}{PENDING_SUFFIX}")

    # ------------------------------------------------------------------ reading
    def backups(self) -> list[Backup]:
        """Every backup with a manifest, oldest first (by sequence number)."""
        out = []
        for f in os.listdir(self.path):
            if not f.endswith(".json") or f.startswith("."):
                continue
            name = f[: -len(".json")]
            try:
                with open(os.path.join(self.path, f)) as fh:
                    m = json.load(fh)
                if not isinstance(m, dict) or m.get("qcowfs-backup") != MANIFEST_VERSION:
                    continue
            except (OSError, ValueError):
                continue  # not ours, or damaged: verify reports it through the image
            out.append(Backup(name, m, os.path.exists(self.image(name))))
        return sorted(out, key=lambda b: b.seq)

    def get(self, name: str) -> Backup:
        for b in self.backups():
            if b.name == name:
                return b
        raise BackupError(f"no backup named {name!r} here", self.path)

    def pending(self) -> list[tuple[str, int]]:
        """(name, seq) of started runs that have not completed, in the order they were started."""
        out = []
        for f in os.listdir(self.path):
            if f.startswith(".") and f.endswith(PENDING_SUFFIX):
                path = os.path.join(self.path, f)
                try:
                    with open(path) as fh:
                        seq = int(json.load(fh)["seq"])
                except (OSError, ValueError, KeyError, TypeError):
                    seq = 1 << 62
                out.append((seq, f[1 : -len(PENDING_SUFFIX)]))
        return [(n, seq) for seq, n in sorted(out)]

    def next_seq(self) -> int:
        seqs = [b.seq for b in self.backups()] + [s for _, s in self.pending() if s < 1 << 62]
        return max(seqs, default=0) + 1

    def load_manifest(self, name: str) -> dict[str, Any]:
        try:
            with open(self.manifest_path(name)) as fh:
                m = json.load(fh)
        except (OSError, ValueError) as e:
            raise BackupError(
                f"manifest of backup {name!r} cannot be read: {e}", self.path
            ) from None
        if not isinstance(m, dict):
            raise BackupError(f"manifest of backup {name!r} is damaged", self.path)
        return m

    # ------------------------------------------------------------------ changing
    def lock(self) -> None:
        """Hold DIR for this process (flock on the directory, released at exit): two runs into one
        DIR would delete each other's files being written."""
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise BackupError(
                "another qcowfs backup is writing to this directory; wait for it", self.path
            ) from None
        self._lock_fd = fd

    def mark_pending(self, name: str, seq: int) -> None:
        atomic_write(self.pending_path(name), json.dumps({"seq": seq}).encode())

    def clear_pending(self, names: list[str]) -> None:
        for n in names:
            try:
                os.unlink(self.pending_path(n))
            except FileNotFoundError:
                pass
        fsync_dir(self.path)

    def remove_parts(self) -> list[str]:
        """Delete what killed runs left half-written; their names."""
        gone = []
        for f in os.listdir(self.path):
            if f.startswith(".") and f.endswith(PART_SUFFIX):
                os.unlink(os.path.join(self.path, f))
                gone.append(f)
        if gone:
            fsync_dir(self.path)
        return gone
