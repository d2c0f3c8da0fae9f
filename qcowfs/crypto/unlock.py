"""Opening a LUKS1 key slot with a passphrase (cryptsetup's on-disk format 1.2, section 4; QEMU's
crypto/block-luks.c qcrypto_block_luks_load_key), and the master key's check.

For each active slot (all of them at once, one per CPU: unlock()):
    1. slot key = PBKDF2(hash, passphrase, slot salt, slot iterations, key bytes)
    2. the slot's key material (key bytes * 4000 stripes, whole sectors) decrypted with the
       header's cipher, mode and IV generator under the slot key, IV sector numbers from 0
    3. candidate = AF-merge(material): d = 0; for each stripe but the last d = H(d ^ stripe);
       candidate = d ^ last stripe, where H is the header hash's "diffuse" (below)
    4. accepted when PBKDF2(hash, candidate, digest salt, digest iterations, 20) equals the
       header's master key digest
PBKDF2 runs in a library's C code: nettle's (what QEMU's own runs) where it can be loaded, else
OpenSSL's through pyca/cryptography (twice as fast here as hashlib.pbkdf2_hmac's: 0.26 s against
0.51 s for a million SHA-256 iterations); a wrong passphrase costs every active slot's
iterations, as in QEMU and cryptsetup, spread over the CPUs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import hmac
import importlib
import os
import queue
import threading
from typing import TYPE_CHECKING, Any, Callable

from ..errors import FormatError, UnsupportedFeature
from ..format.luks import SECTOR, LuksHeader, Slot
from .cipher_spec import check_spec

if TYPE_CHECKING:
    from .sector_cipher import SectorCipher

#: the most PBKDF2 iterations qcowfs runs for one slot or the digest. QEMU's default 2 s makes
#: about 9 million here (sha256); a header asking billions is hostile (QEMU would spend hours
#: in it), and is refused before any is run
MAX_ITERATIONS = 1 << 26


#: hash names pyca/cryptography's PBKDF2HMAC takes (its classes, looked up when used)
_PBKDF2_HASHES = {
    "sha1": "SHA1",
    "sha224": "SHA224",
    "sha256": "SHA256",
    "sha384": "SHA384",
    "sha512": "SHA512",
    "md5": "MD5",
}


def _nettle() -> Any:
    """GnuTLS's crypto library, whose PBKDF2 QEMU itself runs (its gnutls backend calls
    nettle_pbkdf2_hmac_*): 0.247 s per million SHA-256 iterations here against OpenSSL's
    0.262 s, which made qcowfs's unlock 5% slower than QEMU's open of the same image. Every
    Debian with apt has it (apt -> libgnutls30 -> libnettle8); None where it cannot be loaded."""
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("nettle") or "libnettle.so.8")
    except OSError:
        return None
    funcs = {}
    for name in ("sha1", "sha256", "sha384", "sha512"):
        f = getattr(lib, f"nettle_pbkdf2_hmac_{name}", None)
        if f is None:
            continue
        # (key length, key, iterations, salt length, salt, length, dst); ctypes releases the GIL
        f.argtypes = (
            ctypes.c_size_t,
            ctypes.c_char_p,
            ctypes.c_uint,
            ctypes.c_size_t,
            ctypes.c_char_p,
            ctypes.c_size_t,
            ctypes.c_char_p,
        )
        f.restype = None
        funcs[name] = f
    return funcs


_NETTLE = _nettle()


def pbkdf2(hash_name: str, secret: bytes, salt: bytes, iterations: int, length: int) -> bytes:
    """PBKDF2-HMAC (RFC 8018) in a library's C code: nettle's where it is there, else OpenSSL's."""
    f = _NETTLE.get(hash_name) if _NETTLE else None
    if f is not None and 0 < iterations < 1 << 32:
        out = ctypes.create_string_buffer(length)
        f(len(secret), secret, iterations, len(salt), salt, length, out)
        return out.raw
    alg = _PBKDF2_HASHES.get(hash_name)
    if alg is None:  # ripemd160: only hashlib has it (where OpenSSL's legacy provider does)
        return hashlib.pbkdf2_hmac(hash_name, secret, salt, iterations, length)
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

    return PBKDF2HMAC(getattr(hashes, alg)(), length, salt, iterations).derive(secret)


def _check_hash(name: str) -> None:
    try:
        hashlib.new(name)
    except ValueError:
        raise UnsupportedFeature(f"LUKS hash {name!r} is not available in this OpenSSL") from None


def diffuse(block: bytes, hash_name: str) -> bytes:
    """LUKS's diffusion of one AF stripe: the block cut into digest-sized pieces, piece i
    replaced by H(be32(i) || piece), the last (short) piece by as many bytes of its hash."""
    new = _hash_constructor(hash_name)
    size = new().digest_size
    out = b""
    for i in range(0, len(block), size):
        piece = block[i : i + size]
        out += new((i // size).to_bytes(4, "big") + piece).digest()[: len(piece)]
    return out


def _hash_constructor(hash_name: str) -> Callable[..., Any]:
    """hashlib's own constructor (hashlib.sha256) where it has one: hashlib.new looks the name
    up on every call, which the AF merge's 8000 hashes felt (20 ms against 9 ms)."""
    f = getattr(hashlib, hash_name, None)
    return f if f is not None else lambda data=b"": hashlib.new(hash_name, data)


def af_merge(material: bytes, key_bytes: int, stripes: int, hash_name: str) -> bytes:
    """The key the anti-forensic split `material` (stripes * key_bytes) holds."""
    new = _hash_constructor(hash_name)
    size = new().digest_size
    prefixes = [i.to_bytes(4, "big") for i in range(-(-key_bytes // size))]
    d = 0
    for i in range(stripes - 1):
        x = (d ^ int.from_bytes(material[i * key_bytes : (i + 1) * key_bytes], "big")).to_bytes(
            key_bytes, "big"
        )
        out = b""
        for k, p in enumerate(prefixes):
            piece = x[k * size : (k + 1) * size]
            out += new(p + piece).digest()[: len(piece)]
        d = int.from_bytes(out, "big")
    last = int.from_bytes(material[(stripes - 1) * key_bytes : stripes * key_bytes], "big")
    return (d ^ last).to_bytes(key_bytes, "big")


def cipher_for(header: LuksHeader, key: bytes) -> SectorCipher:
    from .sector_cipher import SectorCipher

    return SectorCipher(header.cipher_name, header.mode, header.ivgen, header.ivgen_hash, key)


def check_supported(header: LuksHeader) -> None:
    """Refuse, before any passphrase is tried, a header whose cipher or hash qcowfs cannot run,
    or whose iteration counts would keep it busy for hours. Loads no cipher code (cipher_spec)."""
    _check_hash(header.hash_spec)
    check_spec(header.cipher_name, header.mode, header.ivgen, header.ivgen_hash)
    if header.mk_digest_iter > MAX_ITERATIONS:
        raise FormatError(
            f"LUKS header: the master key digest asks {header.mk_digest_iter} PBKDF2 iterations, "
            f"more than qcowfs runs ({MAX_ITERATIONS})"
        )
    for slot in header.slots:
        if slot.active and slot.iterations > MAX_ITERATIONS:
            raise FormatError(
                f"LUKS header: key slot {slot.index} asks {slot.iterations} PBKDF2 iterations, "
                f"more than qcowfs runs ({MAX_ITERATIONS})"
            )


#: a slot's identity for a slot key derived ahead of time: index, salt, iterations
SlotKeys = dict[tuple[int, bytes, int], bytes]


def early_slot(header: LuksHeader) -> Slot | None:
    """The slot whose key may be derived ahead of time in a thread of its own (the mount's
    early unlock): the one active slot, when its PBKDF2 runs in nettle, which needs no module
    loaded (two threads loading modules at once can deadlock in Python's import locks). None
    for several slots: unlock() tries those at once anyway."""
    active = [s for s in header.slots if s.active]
    if len(active) != 1 or not _NETTLE or header.hash_spec not in _NETTLE:
        return None
    return active[0]


def slot_key(header: LuksHeader, slot: Slot, passphrase: bytes) -> SlotKeys:
    """Step 1 for one slot, as unlock(slot_keys=) takes it: only PBKDF2, in C."""
    key = pbkdf2(header.hash_spec, passphrase, slot.salt, slot.iterations, header.key_bytes)
    return {(slot.index, slot.salt, slot.iterations): key}


def unlock(
    header: LuksHeader,
    read_area: Callable[[int, int], bytes],
    passphrase: bytes,
    slot_keys: SlotKeys | None = None,
) -> bytes | None:
    """The master key, or None if no active key slot accepts the passphrase. read_area(offset,
    length) reads the encryption area (offsets from its start); slot_keys: step 1 done ahead of
    time for some slots (slot_key) with this passphrase.

    QEMU tries the active slots one after the other. Here they are tried at once, one per CPU
    (PBKDF2 runs in C with the GIL released): the same time as QEMU for one slot, and for a
    passphrase in slot k, or a wrong one, the time of ceil(slots / CPUs) slots instead of
    k + 1 or all of them. The first slot whose candidate passes the digest check wins (every
    slot that passes holds the same master key: the digest is its)."""
    check_supported(header)
    nsec = header.split_key_sectors()
    jobs = []
    for slot in header.slots:
        if not slot.active:
            continue
        raw = read_area(slot.key_offset, nsec * SECTOR)
        if len(raw) < nsec * SECTOR:
            continue  # checked at open: the area holds every slot's material
        jobs.append((slot, raw))
    if not jobs:
        return None
    todo: queue.SimpleQueue[tuple[Slot, bytes]] = queue.SimpleQueue()
    for job in jobs:
        todo.put(job)
    done: queue.SimpleQueue[bytes | None | BaseException] = queue.SimpleQueue()

    def worker() -> None:
        while True:
            try:
                slot, raw = todo.get_nowait()
            except queue.Empty:
                return
            try:
                early = (slot_keys or {}).get((slot.index, slot.salt, slot.iterations))
                done.put(_try_slot(header, slot, raw, passphrase, early))
            except BaseException as e:  # handed to the caller
                done.put(e)

    # the cipher code (numpy, the cryptography library: 70 ms) loads while the slots' PBKDF2
    # runs in nettle, which loads nothing (measured: the open 0.03 s shorter). Without nettle,
    # PBKDF2 loads the cryptography library in the workers: the cipher code loads first then,
    # since two threads loading modules at once can deadlock in Python's import locks
    overlap = bool(_NETTLE) and header.hash_spec in _NETTLE
    if not overlap:
        importlib.import_module(".sector_cipher", __package__)
        importlib.import_module("cryptography.hazmat.primitives.kdf.pbkdf2")
    # daemon threads: a slot still running when another has answered finishes on its own (a C
    # call cannot be interrupted) without keeping the process from exiting
    for _ in range(min(len(jobs), os.cpu_count() or 1)):
        threading.Thread(target=worker, name="luks-slot", daemon=True).start()
    if overlap:
        importlib.import_module(".sector_cipher", __package__)
    for _ in jobs:
        answer = done.get()
        if isinstance(answer, BaseException):
            raise answer
        if answer is not None:
            while not todo.empty():  # the workers take no further slot
                try:
                    todo.get_nowait()
                except queue.Empty:
                    break
            return answer
    return None


def _try_slot(
    header: LuksHeader, slot: Slot, raw: bytes, passphrase: bytes, key: bytes | None = None
) -> bytes | None:
    """Steps 1-4 of the module docstring for one slot (step 1 skipped when its key is given):
    the master key, or None."""
    h = header.hash_spec
    kb = header.key_bytes
    if key is None:
        key = pbkdf2(h, passphrase, slot.salt, slot.iterations, kb)
    material = bytes(cipher_for(header, key).decrypt(raw, 0))
    candidate = af_merge(material, kb, slot.stripes, h)
    digest = pbkdf2(
        h, candidate, header.mk_digest_salt, header.mk_digest_iter, len(header.mk_digest)
    )
    return candidate if hmac.compare_digest(digest, header.mk_digest) else None
