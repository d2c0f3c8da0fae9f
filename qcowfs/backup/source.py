"""The disk a backup is taken of: a running qcowfs mount, or an unmounted image.

Both answer the same questions (which bitmaps and snapshots exist, take a checkpoint, the
dirty clusters of some bitmaps, a reader of a checkpoint's snapshot, drop bitmaps and
snapshots). The snapshot is always read from the image file itself, not through FUSE: its
clusters cannot change while it exists (copier.py), and reading the file directly is what makes
a full backup as fast as qemu-img convert.

- LiveSource: commands go to the daemon as `qcowfs bitmap`/`checkpoint` send them; the image's
  path comes from the mount (IMAGE_XATTR) and must still be the same file (device, inode).
  The image is opened read-only without locks, as `qemu-img -U` does: the daemon owns it.
- OfflineSource: QEMU's locks are taken as `qcowfs bitmap` takes them. Each change (the
  checkpoint, the drops) opens the image as a writer for just that step, in intent mode
  (docs/crash-ordering.md: bitmaps valid on disk at every instant), so a kill -9 of the command
  never leaves bitmaps inconsistent; the copy holds a reader's lock (writers wait, as for
  qemu-img convert).

An encrypted (LUKS) source needs its passphrase (keys, as for mount): it is checked when the
source is opened, before anything changes in it, and only the reader of the snapshot uses it;
the other steps touch no guest data and open the image for its metadata only. The backup is
encrypted with the source's own LUKS header (copier.py).
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Iterator, Optional

from bitarray import bitarray

from ..engine import offline
from ..engine import snapshots as snapshot_ops
from ..engine.bitmap_commands import IMAGE_XATTR
from ..engine.bitmaps import BitmapStore
from ..engine.disk import Disk
from ..engine.encrypted_data import EncryptedDataFile
from ..engine.encryption import Keys
from ..engine.image import Qcow2Image
from ..engine.snapshots import SnapshotView
from ..errors import BackupError, QcowError
from .copier import Encryption

#: the largest LUKS area a backup copies into each of its files (QEMU's are about 2 MiB: 8 slots
#: of 4000 stripes of a key of up to 64 bytes)
MAX_AREA = 16 << 20


def add_extents(dirty: bitarray, extents: list[tuple[int, int, bool]], cluster_bits: int) -> None:
    """Mark the clusters that the dirty ones of [(start, length, dirty)] touch."""
    cs = 1 << cluster_bits
    n = len(dirty)
    for start, length, is_dirty in extents:
        if not is_dirty:
            continue
        a = start >> cluster_bits
        b = min(n, -(-(start + length) // cs))
        if a < b:
            dirty[a:b] = 1


class Source:
    """What run.py needs of a disk (see the module docstring)."""

    live = False
    label = ""
    image_path = ""
    backing_policy = "follow"
    #: passphrases of an encrypted source (open_source checked them)
    keys: Optional[Keys] = None

    def bitmaps(self) -> dict[str, dict[str, Any]]:
        raise NotImplementedError

    def snapshot_names(self) -> set[str]:
        raise NotImplementedError

    def disk_size(self) -> int:
        raise NotImplementedError

    def checkpoint(self, name: str, disable: list[str], granularity: int) -> None:
        raise NotImplementedError

    def dirty(self, names: list[str], cluster_bits: int, clusters: int) -> tuple[bitarray, int]:
        """The union of the bitmaps' dirty clusters, and how many dirty extents they listed."""
        raise NotImplementedError

    def reader(self, snapshot: str) -> contextlib.AbstractContextManager[SnapshotView]:
        raise NotImplementedError

    def drop(self, bitmaps: list[str], snapshots: list[str]) -> list[str]:
        """Remove what exists of these bitmaps and snapshots; what could not be removed."""
        raise NotImplementedError


def encryption_of(view: SnapshotView) -> Optional[Encryption]:
    """What an encrypted backup of this view needs (copier.Encryption); None for a plain source
    (an encrypted backing file below a plain image is read through the chain, as plaintext)."""
    data = view.data_file
    if not isinstance(data, EncryptedDataFile):
        return None
    h = view.image.header
    assert h.crypto_header is not None  # crypt_method 2 (legacy AES was refused at open)
    off, length = h.crypto_header
    if length > MAX_AREA:  # open_source refused it; the image changed since
        raise BackupError("its LUKS header area grew during the backup", view.path)
    raw = view.file.pread(length, off)
    if len(raw) != length:
        raise BackupError("the LUKS header lies past the end of the file", view.path)
    return Encryption(raw, data.cipher)


def _find(view_image: Qcow2Image, name: str) -> Any:
    for s in snapshot_ops.read_all(view_image):
        if s.name == name:
            return s
    raise BackupError(f"snapshot {name!r} is gone (deleted during the backup?)", view_image.path)


class LiveSource(Source):
    live = True

    def __init__(self, mountpoint: str, keys: Optional[Keys] = None):
        self.mnt = mountpoint
        self.keys = keys
        self.label = mountpoint
        try:
            info = json.loads(os.getxattr(mountpoint, IMAGE_XATTR))
        except OSError:
            raise BackupError(
                "this qcowfs daemon does not say which image it serves (an older version?): "
                "unmount it and back up the image",
                mountpoint,
            ) from None
        self.image_path = str(info["path"])
        self.backing_policy = str(info.get("backing", "follow"))
        try:
            st = os.stat(self.image_path)
        except OSError as e:
            raise BackupError(
                f"the mounted image {self.image_path} cannot be opened: {e.strerror}", mountpoint
            ) from None
        if (st.st_dev, st.st_ino) != (info["dev"], info["ino"]):
            raise BackupError(
                f"the mounted image was moved or replaced since the mount ({self.image_path} is "
                "another file now)",
                mountpoint,
            )

    def bitmaps(self) -> dict[str, dict[str, Any]]:
        return {b["name"]: b for b in offline.live_bitmaps(self.mnt)}

    def snapshot_names(self) -> set[str]:
        return set(os.listdir(os.path.join(self.mnt, ".snapshots")))

    def disk_size(self) -> int:
        return os.stat(os.path.join(self.mnt, "disk.raw")).st_size

    def checkpoint(self, name: str, disable: list[str], granularity: int) -> None:
        offline.live_checkpoint(self.mnt, name, disable, True, granularity)

    def dirty(self, names: list[str], cluster_bits: int, clusters: int) -> tuple[bitarray, int]:
        bits = bitarray(clusters)
        bits.setall(0)
        count = 0
        for n in names:
            ext = [(e["start"], e["length"], e["dirty"]) for e in offline.live_extents(self.mnt, n)]
            count += sum(1 for e in ext if e[2])
            add_extents(bits, ext, cluster_bits)
        return bits, count

    @contextlib.contextmanager
    def reader(self, snapshot: str) -> Iterator[SnapshotView]:
        img = Qcow2Image(
            self.image_path, read_only=True, backing_policy=self.backing_policy, keys=self.keys
        )
        try:
            snap = _find(img, snapshot)
            yield SnapshotView(img, snap)
            # the daemon may have deleted it meanwhile (rm .snapshots/NAME): then what was read
            # may be clusters reused for other data; a fresh look at the snapshot table says
            # (its metadata only, the chain as the mount opened it: "deny" was no policy, and
            # failed every live backup of an image with a backing file)
            check = Qcow2Image(
                self.image_path,
                read_only=True,
                backing_policy=self.backing_policy,
                metadata_only=True,
            )
            try:
                again = _find(check, snapshot)
            finally:
                check.close(flush=False)
            if (again.id, again.l1_table_offset) != (snap.id, snap.l1_table_offset):
                raise BackupError(
                    f"snapshot {snapshot!r} was replaced during the backup", self.image_path
                )
        finally:
            img.close(flush=False)

    def drop(self, bitmaps: list[str], snapshots: list[str]) -> list[str]:
        try:
            return self._drop(bitmaps, snapshots)
        except OSError as e:  # the mount died (the daemon was killed)
            return [f"the mount answers {e.strerror}"]

    def _drop(self, bitmaps: list[str], snapshots: list[str]) -> list[str]:
        failed = []
        have = self.bitmaps()
        for b in bitmaps:
            if b in have:
                try:
                    offline.live_command(self.mnt, "remove", b)
                except QcowError as e:
                    failed.append(f"bitmap {b}: {e.message}")
        names = self.snapshot_names()
        for s in snapshots:
            if s in names:
                try:
                    os.unlink(os.path.join(self.mnt, ".snapshots", s))
                except OSError as e:
                    failed.append(f"snapshot {s}: {e.strerror}")
        return failed


class OfflineSource(Source):
    def __init__(self, path: str, backing_policy: str = "follow", keys: Optional[Keys] = None):
        self.image_path = os.path.abspath(path)
        self.label = path
        self.backing_policy = backing_policy
        self.keys = keys

    def _metadata(self, write: bool) -> contextlib.AbstractContextManager[Qcow2Image]:
        """The image opened for a step that reads or writes no guest data (no key needed)."""
        return offline.locked_image(
            self.image_path, write=write, backing_policy=self.backing_policy, metadata_only=True
        )

    @contextlib.contextmanager
    def _writer(self) -> Iterator[Disk]:
        with self._metadata(write=True) as img:
            disk = Disk(img, bitmap_sync="intent")
            try:
                yield disk
            finally:
                disk.close()

    def bitmaps(self) -> dict[str, dict[str, Any]]:
        with self._metadata(write=False) as img:
            return {n: bm.status() for n, bm in BitmapStore(img).bitmaps.items()}

    def snapshot_names(self) -> set[str]:
        with self._metadata(write=False) as img:
            return {s.name for s in snapshot_ops.read_all(img)}

    def disk_size(self) -> int:
        with self._metadata(write=False) as img:
            return img.size

    def checkpoint(self, name: str, disable: list[str], granularity: int) -> None:
        with self._writer() as disk:
            disk.checkpoint(name, disable, True, granularity)

    def dirty(self, names: list[str], cluster_bits: int, clusters: int) -> tuple[bitarray, int]:
        bits = bitarray(clusters)
        bits.setall(0)
        count = 0
        with self._metadata(write=False) as img:
            store = BitmapStore(img)
            for n in names:
                ext = store.get(n).extents()
                count += sum(1 for e in ext if e[2])
                add_extents(bits, ext, cluster_bits)
        return bits, count

    @contextlib.contextmanager
    def reader(self, snapshot: str) -> Iterator[SnapshotView]:
        with offline.locked_image(
            self.image_path, write=False, backing_policy=self.backing_policy, keys=self.keys
        ) as img:
            yield SnapshotView(img, _find(img, snapshot))

    def drop(self, bitmaps: list[str], snapshots: list[str]) -> list[str]:
        failed: list[str] = []
        try:
            with self._writer() as disk:
                for b in bitmaps:
                    if b in disk.bitmaps.bitmaps:
                        disk.bitmaps.remove(b)
                for s in disk.snapshots():
                    if s.name in snapshots:
                        disk.delete_snapshot(s.id)
        except QcowError as e:
            failed.append(e.message)
        return failed


def open_source(path: str, backing_policy: str = "follow", keys: Optional[Keys] = None) -> Source:
    source: Source
    if offline.is_qcowfs_mount(path):
        source = LiveSource(path, keys)
    elif os.path.isdir(path):
        raise BackupError(
            "a directory that is not a qcowfs mount: give a mount point or an image", path
        )
    elif not os.path.exists(path):
        raise BackupError("no such file or mount point", path)
    else:
        source = OfflineSource(path, backing_policy, keys)
    _check_keys(source)
    return source


def _check_keys(source: Source) -> None:
    """An encrypted source: refuse legacy AES (QEMU writes no such image, and a backup is one),
    and unlock it now with the passphrases given, so that a missing or wrong key fails the run
    before the checkpoint changes anything (the master key is kept in the Keys: the reader's
    open later costs no second PBKDF2)."""
    with open(source.image_path, "rb") as f:
        head = f.read(36)
    method = int.from_bytes(head[32:36], "big") if len(head) == 36 else 0
    if method == 1:
        raise BackupError(
            "legacy AES encryption (encrypt.format=aes): qcowfs backup writes LUKS images only; "
            "convert the image to LUKS first (qemu-img convert, docs/encryption.md)",
            source.image_path,
        )
    # a plain image is opened too: an encrypted backing file needs its key (the open says so)
    img = Qcow2Image(
        source.image_path, read_only=True, backing_policy=source.backing_policy, keys=source.keys
    )
    img.close(flush=False)
    area = img.header.crypto_header
    if area is not None and area[1] > MAX_AREA:
        # QEMU's are about 2 MiB; this one would be copied into every backup file
        raise BackupError(
            f"its LUKS header area is {area[1]} bytes, more than qcowfs copies into a backup "
            f"({MAX_AREA})",
            source.image_path,
        )
