"""Which sector ciphers qcowfs runs, checked without loading them: the check runs before a key
slot is tried, and loading the cipher code (numpy, the cryptography library: 70 ms) is left to
happen while PBKDF2 runs (unlock.py)."""

from __future__ import annotations

import hashlib

from ..errors import UnsupportedFeature

#: the cipher modes and IV generators qcowfs can run (AES only: pyca/cryptography has no
#: serpent or twofish, and QEMU's own default and libvirt's are AES)
SUPPORTED_MODES = ("xts", "cbc", "ecb")
SUPPORTED_IVGENS = ("plain", "plain64", "essiv")


def check_spec(cipher_name: str, mode: str, ivgen: str, ivgen_hash: str) -> None:
    """Refuse, with one line naming it, a cipher, mode, IV generator or ESSIV hash that
    sector_cipher.SectorCipher cannot run (key sizes: format/luks.py checked them)."""
    if cipher_name != "aes" or mode not in SUPPORTED_MODES:
        raise UnsupportedFeature(
            f"cipher {cipher_name}-{mode}: qcowfs encrypts with aes in modes "
            f"{', '.join(SUPPORTED_MODES)} (QEMU's defaults)"
        )
    if mode != "ecb" and ivgen not in SUPPORTED_IVGENS:
        raise UnsupportedFeature(f"IV generator {ivgen!r} is not one qcowfs supports")
    if ivgen == "essiv":
        essiv_digest_size(ivgen_hash)


def essiv_digest_size(ivgen_hash: str) -> int:
    """The ESSIV hash's digest size, which must be an AES key's."""
    try:
        size = hashlib.new(ivgen_hash).digest_size
    except ValueError:
        raise UnsupportedFeature(f"ESSIV hash {ivgen_hash!r} is not available") from None
    if size not in (16, 24, 32):
        raise UnsupportedFeature(f"ESSIV hash {ivgen_hash!r}: a {size}-byte digest is no AES key")
    return size
