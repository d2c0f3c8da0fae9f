"""The data clusters of an encrypted image: a HostFile seen through its sector cipher.

Reader and Writer use it as they use the plain data file (read_path.py, write_path.py): what
they read is decrypted, what they write is encrypted, at any offset and length. The cipher works
on whole 512-byte sectors (qcow2.txt, "crypt_method"; QEMU sets request_alignment 512 for an
encrypted image), so a read is widened to whole sectors and cut back, and a write that does
not cover its first or last sector whole first reads and decrypts that sector (read-modify-
write, as QEMU's block layer does for requests smaller than the alignment).

The IV's sector number is the host offset >> 9 for LUKS (QEMU: crypt_physical_offset), so a
cluster copied elsewhere (copy-on-write) is re-encrypted for its new place: the writer copies
plaintext it read through this file, and this file encrypts it for where it lands. Legacy AES
takes the guest offset >> 9 instead; it is read-only, and the reader passes the guest offset.

Only metadata bypasses it: L1/L2 tables, refcounts, snapshot and bitmap tables are never
encrypted, and compressed clusters are read from the image file unencrypted (QEMU encrypts only
the data clusters it writes through qcow2_co_encrypt).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from ..errors import EncryptionError
from .hostfile import HostFile

if TYPE_CHECKING:
    from typing_extensions import Buffer

    from ..crypto.sector_cipher import SectorCipher

SECTOR = 512  # the cipher's unit (crypto/sector_cipher.py), QEMU's BDRV_SECTOR_SIZE
_MASK = SECTOR - 1


class EncryptedDataFile(HostFile):
    """A HostFile's bytes through a sector cipher. Not thread-safe (the cipher is not): an
    encrypted image is served by one thread (fuse/mount.py starts no lanes or I/O threads)."""

    encrypted = True

    def __init__(self, inner: HostFile, cipher: SectorCipher, guest_iv: bool = False):
        # no super().__init__: the file is inner's, opened once
        self.inner = inner
        self.cipher = cipher
        #: IVs from the guest offset (legacy AES) instead of the host offset (LUKS)
        self.guest_iv = guest_iv
        self.path = inner.path
        self.writable = inner.writable
        self.fd = inner.fd

    @property
    def size(self) -> int:
        return self.inner.size

    # ------------------------------------------------------------------ reads
    def pread(self, length: int, offset: int, guest: int = -1) -> bytes:
        buf = bytearray(length)
        got = self.preadv_into((buf,), offset, guest)
        return bytes(buf[:got])

    def preadv_into(self, buffers: Sequence, offset: int, guest: int = -1) -> int:
        """Decrypted bytes at host offset into buffers; short past the end of the file (a
        partial last sector counts as missing: it cannot be decrypted)."""
        total = sum(len(b) for b in buffers)
        lo = offset & ~_MASK
        hi = (offset + total + _MASK) & ~_MASK
        raw = self.inner.pread(hi - lo, lo)
        whole = len(raw) & ~_MASK
        if whole <= offset - lo:
            return 0
        iv = (guest - (offset - lo) if self.guest_iv else lo) >> 9
        plain = self.cipher.decrypt(memoryview(raw)[:whole], iv)
        pos = offset - lo
        end = min(whole, pos + total)
        done = 0
        for b in buffers:
            n = min(len(b), end - pos)
            if n <= 0:
                break
            memoryview(b).cast("B")[:n] = plain[pos : pos + n]
            pos += n
            done += n
        return done

    # ------------------------------------------------------------------ writes
    def pwrite(self, data: Buffer, offset: int) -> None:
        self.pwritev((data,), offset)

    def pwritev(self, buffers: Sequence, offset: int) -> None:
        """Encrypt and write buffers back to back at host offset; partial first and last
        sectors are completed from what the file holds (read-modify-write)."""
        if self.guest_iv:
            raise OSError(30, "legacy AES images are written by no one (QEMU included)")
        total = sum(len(b) for b in buffers)
        lo = offset & ~_MASK
        hi = (offset + total + _MASK) & ~_MASK
        if lo == offset and hi == offset + total:
            data = buffers[0] if len(buffers) == 1 else b"".join(buffers)
        else:
            head = self.pread(SECTOR, lo) if lo != offset else b""
            tail = b""
            if (offset + total) & _MASK and (hi - SECTOR >= offset or not head):
                tail = self.pread(SECTOR, hi - SECTOR)
            buf = bytearray(hi - lo)  # sectors past the end of the file start as zeros
            buf[: len(head)] = head
            if tail:
                buf[hi - SECTOR - lo : hi - SECTOR - lo + len(tail)] = tail
            pos = offset - lo
            for b in buffers:
                buf[pos : pos + len(b)] = b
                pos += len(b)
            data = buf
        self.inner.pwrite(self.cipher.encrypt(data, lo >> 9), lo)

    # ------------------------------------------------------------------ the rest is the file's
    def flush(self) -> None:
        self.inner.flush()

    def punch_hole(self, offset: int, length: int) -> None:
        self.inner.punch_hole(offset, length)

    def truncate(self, length: int) -> None:
        self.inner.truncate(length)

    def st_blocks(self) -> int:
        return self.inner.st_blocks()

    def close(self) -> None:
        """The image closes the inner file."""


class LockedDataFile(EncryptedDataFile):
    """The data of an encrypted image opened without its key (metadata_only: info, check and
    the offline bitmap commands, which touch no guest data): any read or write of it is refused,
    so ciphertext is never served as data and plaintext never written over it."""

    def __init__(self, inner: HostFile):
        super().__init__(inner, None, False)  # type: ignore[arg-type]

    def preadv_into(self, buffers: Sequence, offset: int, guest: int = -1) -> int:
        raise EncryptionError("encrypted image opened without its key", self.path)

    def pwritev(self, buffers: Sequence, offset: int) -> None:
        raise EncryptionError("encrypted image opened without its key", self.path)
