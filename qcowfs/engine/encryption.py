"""Passphrases and unlocking: what an encrypted image needs before its data can be read.

A passphrase comes from a key file, its bytes exactly (as QEMU's `--object secret,file=FILE,
format=raw` reads it: no newline is stripped). The file must not be readable by others than its
owner unless the user says so (allow_shared_key). Keys holds the passphrases of a chain: one for
the image opened, and one per level below it where they differ (the same one unless given).
docs/encryption.md tells the user's side.
"""

from __future__ import annotations

import dataclasses
import os
import stat
import threading
from concurrent.futures import Future
from typing import TYPE_CHECKING, Optional, Sequence

from ..errors import EncryptionError, QcowError, UnsupportedFeature, with_path
from ..format import luks as luks_fmt
from ..format.header import parse_header
from ..format.luks import LuksHeader
from .hostfile import HostFile

if TYPE_CHECKING:
    from ..crypto.sector_cipher import SectorCipher
    from ..crypto.unlock import SlotKeys


#: start_unlock reads this much of the image for its header (the open reads what it needs)
HEADER_READ = 1 << 16


def read_key_file(path: str, allow_shared: bool = False) -> bytes:
    """The passphrase in key file `path`, refused (EncryptionError, one line) if it is missing,
    not a regular file, or readable by group or others without allow_shared."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise EncryptionError("key file not found", path) from None
    except OSError as e:
        raise EncryptionError(f"cannot open the key file: {e.strerror}", path) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise EncryptionError("the key file is not a regular file", path)
        if st.st_mode & (stat.S_IRGRP | stat.S_IROTH) and not allow_shared:
            raise EncryptionError(
                f"the key file is readable by others than its owner (mode "
                f"{stat.S_IMODE(st.st_mode):04o}): chmod 600 it, or pass --allow-shared-key-file",
                path,
            )
        chunks = []
        while True:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


@dataclasses.dataclass(frozen=True)
class Keys:
    """The passphrases of an image chain. The image opened uses `top`; the image N levels below
    it uses backing[N-1], the deepest one given for every level below that, or `top` when no
    backing passphrase was given. `*_source(s)` name where each came from (a key file), for
    messages; the passphrases never appear in a repr or a log."""

    top: Optional[bytes] = dataclasses.field(default=None, repr=False)
    top_source: str = ""
    backing: tuple[bytes, ...] = dataclasses.field(default=(), repr=False)
    backing_sources: tuple[str, ...] = ()
    #: master keys unlocked so far, by what identifies them in a LUKS header (cipher, key size,
    #: the master key digest and its salt): a backup chain's files all carry a copy of the
    #: source's header, and each would otherwise cost a PBKDF2 unlock (seconds) to open
    unlocked: dict[tuple, bytes] = dataclasses.field(
        default_factory=dict, repr=False, compare=False
    )
    #: slot keys being derived by start_unlock: (the passphrase used, its future slot keys)
    pending: dict[tuple, tuple[bytes, Future[SlotKeys]]] = dataclasses.field(
        default_factory=dict, repr=False, compare=False
    )

    def start_unlock(self, path: str) -> None:
        """Begin the costly part of unlocking the image at `path` with `top`: its key slot's
        PBKDF2 (seconds of C with the GIL released), in a thread of its own, so that it runs
        while this process loads the rest of itself (a mount: pyfuse3 and trio, 0.17 s).
        open_cipher finishes the unlock with it. Only for one active slot whose PBKDF2 needs no
        module loaded (crypto/unlock.py, early_slot). Only reads; anything odd (not LUKS, a
        damaged header) is left to the open, which says it properly."""
        if self.top is None:
            return
        try:
            with open(path, "rb") as f:
                h = parse_header(f.read(HEADER_READ), allow_encrypted=True)
                if h.crypt_method != 2 or h.crypto_header is None:
                    return
                off, length = h.crypto_header
                f.seek(off)
                head = f.read(4096)
            luks = luks_fmt.parse(head, length)
            from ..crypto.unlock import check_supported, early_slot, slot_key

            check_supported(luks)
        except (QcowError, OSError, ValueError):
            return
        slot = early_slot(luks)
        if slot is None:
            return
        fut: Future[SlotKeys] = Future()
        passphrase = self.top

        def run() -> None:
            try:
                fut.set_result(slot_key(luks, slot, passphrase))
            except BaseException as e:  # the open derives it again and reports it
                fut.set_exception(e)

        self.pending[master_key_identity(luks)] = (passphrase, fut)
        threading.Thread(target=run, name="luks-unlock", daemon=True).start()

    def for_depth(self, depth: int) -> tuple[Optional[bytes], str]:
        if depth > 0 and self.backing:
            i = min(depth, len(self.backing)) - 1
            return self.backing[i], self.backing_sources[i]
        return self.top, self.top_source

    @classmethod
    def from_files(
        cls, key_file: Optional[str], backing_key_files: Sequence[str], allow_shared: bool = False
    ) -> Optional[Keys]:
        if key_file is None and not backing_key_files:
            return None
        return cls(
            top=read_key_file(key_file, allow_shared) if key_file else None,
            top_source=key_file or "",
            backing=tuple(read_key_file(f, allow_shared) for f in backing_key_files),
            backing_sources=tuple(backing_key_files),
        )


def master_key_identity(luks: LuksHeader) -> tuple:
    """What names a master key in a LUKS header: the digest is PBKDF2 of the master key with its
    salt, so a header with the same digest, salt and cipher holds the same master key, whichever
    slots it has."""
    return (
        luks.cipher_name,
        luks.cipher_mode,
        luks.key_bytes,
        luks.mk_digest,
        luks.mk_digest_salt,
        luks.mk_digest_iter,
    )


def open_cipher(
    path: str,
    crypt_method: int,
    luks: Optional[LuksHeader],
    area: Optional[tuple[int, int]],
    file: HostFile,
    keys: Optional[Keys],
    depth: int,
    read_only: bool,
) -> SectorCipher:
    """The sector cipher of encrypted image `path` (its data key unlocked with the chain's
    passphrase for this depth). One-line errors: no passphrase, no slot accepts it, legacy AES
    opened for writing, a cipher qcowfs cannot run."""
    # imported here: numpy and the cryptography library cost every qcowfs process 70 ms at
    # start-up, and only an encrypted image needs them. unlock.py loads none of them before
    # PBKDF2 has started: they load while it runs
    from ..crypto.unlock import check_supported, cipher_for, unlock

    if crypt_method == 1 and not read_only:
        raise UnsupportedFeature(
            "legacy AES encryption (encrypt.format=aes) is read-only: QEMU lets only its tools "
            "read it. Mount it with --read-only, or convert it to LUKS with qemu-img convert "
            "(docs/encryption.md)",
            path,
        )
    if crypt_method == 2 and luks is not None:
        try:
            check_supported(luks)
        except QcowError as e:
            raise with_path(e, path) from None
    passphrase, source = keys.for_depth(depth) if keys is not None else (None, "")
    if passphrase is None:
        kind = "LUKS" if crypt_method == 2 else "legacy AES"
        raise EncryptionError(
            f"encrypted image ({kind}): give its passphrase with --key-file FILE "
            "(qcowfs info and qcowfs check need none)",
            path,
        )
    if crypt_method == 1:
        from ..crypto.sector_cipher import legacy_aes

        return legacy_aes(passphrase)  # the legacy format has no key check (QEMU's neither)
    assert luks is not None and area is not None  # the image checked the extension
    off = area[0]
    known = master_key_identity(luks)
    master = keys.unlocked.get(known) if keys is not None else None
    early: Optional[SlotKeys] = None
    if master is None and keys is not None and known in keys.pending:
        tried, fut = keys.pending.pop(known)
        if tried == passphrase:
            try:
                early = fut.result()
            except Exception:  # noqa: BLE001 - unlock() derives it again, and reports it
                early = None
    if master is None:
        master = unlock(luks, lambda o, n: file.pread(n, off + o), passphrase, early)
        if master is None:
            raise EncryptionError(f"no key slot of {path} accepts the passphrase in {source}")
        if keys is not None:
            keys.unlocked[known] = master
    return cipher_for(luks, master)
