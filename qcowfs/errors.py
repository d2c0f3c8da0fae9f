"""The typed error hierarchy.

Every error a user can meet is a QcowError whose str() is one clear line:
what failed, on which file, and (where there is one) what to do about it.
The CLI prints that line; it never shows a traceback for a QcowError.
"""

from __future__ import annotations

import copy
import errno


class QcowError(Exception):
    """Base of every error qcowfs reports to a user."""

    #: errno the FUSE layer answers with when this error reaches it
    errno: int = errno.EIO

    def __init__(self, message: str, path: str | None = None):
        self.message = message
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)


def with_path(e: QcowError, path: str) -> QcowError:
    """A copy of e that names the file it is about (raised in e's place; e itself, already
    raised once, is left as it was)."""
    new = copy.copy(e)
    new.path = path
    new.args = (f"{path}: {e.message}",)
    return new


class FormatError(QcowError):
    """The file is not a qcow2 image QEMU would open (bad magic, field out of range, ...)."""


class UnsupportedFeature(QcowError):
    """A valid qcow2 image using something qcowfs does not implement (encryption, ...)."""

    errno = errno.EOPNOTSUPP


class CorruptImage(QcowError):
    """Metadata met at run time contradicts the format (entry past EOF, bad compressed data)."""


class ReadOnlyImage(QcowError):
    """A write was asked of an image opened read-only (or switched to read-only after corruption)."""

    errno = errno.EROFS


class BitmapError(QcowError):
    """A dirty-bitmap operation was refused (bad name, inconsistent bitmap, ...)."""

    def __init__(self, message: str, path: str | None = None, err: int = errno.EINVAL):
        super().__init__(message, path)
        self.errno = err


class SnapshotError(QcowError):
    """An internal snapshot operation was refused (name taken, read-only, external data file, ...)."""

    def __init__(self, message: str, path: str | None = None, err: int = errno.EINVAL):
        super().__init__(message, path)
        self.errno = err


class LockError(QcowError):
    """Another process holds the image in a conflicting way (QEMU's OFD lock protocol)."""

    errno = errno.EBUSY


class MountError(QcowError):
    """The filesystem could not be mounted or unmounted."""


class OptionError(QcowError):
    """A mount option or command-line value qcowfs does not accept."""

    errno = errno.EINVAL


class RefusedFile(QcowError):
    """An image names a backing or external data file that the --backing policy does not allow."""

    errno = errno.EACCES


class RefcountOverflow(QcowError):
    """A cluster would be referenced more often than its refcount width can count
    (QEMU's update_refcount answers -ERANGE)."""

    errno = errno.ERANGE


class TableLimit(QcowError):
    """A metadata table would outgrow the limit QEMU sets for it (QEMU answers -EFBIG)."""

    errno = errno.EFBIG


class WriteBeyondEnd(QcowError):
    """A write past the guest disk's end reached the image layer (the FUSE layer clips writes,
    so this is a caller's bug)."""

    errno = errno.ENOSPC


class RepairImpossible(QcowError):
    """check --repair met damage it cannot mend (qemu-img check -r all may)."""


class EncryptionError(QcowError):
    """An encrypted image could not be opened: no passphrase given, none of its key slots accepts
    the one given, or the key file is missing or readable by others (nothing was written)."""

    errno = errno.EACCES


class BackupError(QcowError):
    """`qcowfs backup` could not make, list or verify a backup (the chain is left as it was)."""
