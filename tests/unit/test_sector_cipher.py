"""The sector ciphers and the LUKS key-slot arithmetic, against the library's own modes:
XTS composed over whole requests (crypto/sector_cipher.py) equals pyca/cryptography's XTS called
once per sector, CBC with each IV generator equals its CBC, the AF merge undoes an AF split.
QEMU itself is the oracle in tests/mount/test_luks.py; these pin the arithmetic at the edges
(a numpy pass boundary, sector numbers past 2^32, every key size)."""

from __future__ import annotations

import hashlib
import os
import random

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from qcowfs.crypto.sector_cipher import _CHUNK, SectorCipher, legacy_aes
from qcowfs.crypto.unlock import af_merge, diffuse
from qcowfs.errors import QcowError, UnsupportedFeature
from qcowfs.format import luks


def _per_sector(data: bytes, sector: int, make) -> bytes:
    out = b""
    for i in range(len(data) // 512):
        out += make(sector + i).update(data[512 * i : 512 * (i + 1)])
    return out


@pytest.mark.parametrize("key_bytes", [32, 64])
# around a numpy pass (_CHUNK sectors) and across two of them
@pytest.mark.parametrize("sectors", [1, 8, _CHUNK - 1, _CHUNK, _CHUNK + 1, 2 * _CHUNK + 44])
@pytest.mark.parametrize("sector", [0, 7, (1 << 32) - 3, (1 << 62) + 5])
def test_xts_equals_the_library_per_sector(key_bytes, sectors, sector):
    rng = random.Random(key_bytes * sectors + sector)
    key = rng.randbytes(key_bytes)
    data = rng.randbytes(512 * sectors)
    c = SectorCipher("aes", "xts", "plain64", "", key)
    alg = algorithms.AES(key)
    ref = _per_sector(
        data, sector, lambda s: Cipher(alg, modes.XTS(s.to_bytes(16, "little"))).encryptor()
    )
    assert bytes(c.encrypt(data, sector)) == ref
    assert bytes(c.decrypt(ref, sector)) == data


@pytest.mark.parametrize(
    "ivgen, ivhash, key_bytes",
    [("plain", "", 32), ("plain64", "", 16), ("essiv", "sha256", 32), ("essiv", "sha256", 16)],
)
def test_cbc_with_each_iv_generator_equals_the_library(ivgen, ivhash, key_bytes):
    rng = random.Random(ivgen)
    key = rng.randbytes(key_bytes)
    data = rng.randbytes(512 * 9)
    sector = (1 << 32) + 17  # plain keeps the low 32 bits only

    def iv(s: int) -> bytes:
        if ivgen == "plain":
            return (s & 0xFFFFFFFF).to_bytes(16, "little")
        if ivgen == "plain64":
            return s.to_bytes(16, "little")
        ek = Cipher(algorithms.AES(hashlib.sha256(key).digest()), modes.ECB()).encryptor()
        return ek.update(s.to_bytes(16, "little"))

    c = SectorCipher("aes", "cbc", ivgen, ivhash, key)
    ref = _per_sector(
        data, sector, lambda s: Cipher(algorithms.AES(key), modes.CBC(iv(s))).encryptor()
    )
    assert bytes(c.encrypt(data, sector)) == ref
    assert bytes(c.decrypt(ref, sector)) == data


def test_legacy_aes_key_is_the_passphrase_as_a_c_string():
    data = os.urandom(1024)
    a = legacy_aes(b"short\0ignored")
    b = SectorCipher("aes", "cbc", "plain64", "", b"short".ljust(16, b"\0"))
    assert bytes(a.encrypt(data, 3)) == bytes(b.encrypt(data, 3))
    long = legacy_aes(b"0123456789abcdefXYZ")
    assert bytes(long.encrypt(data, 3)) == bytes(
        SectorCipher("aes", "cbc", "plain64", "", b"0123456789abcdef").encrypt(data, 3)
    )


@pytest.mark.parametrize("cipher, mode", [("twofish", "xts"), ("aes", "ctr"), ("serpent", "cbc")])
def test_ciphers_qcowfs_cannot_run_are_refused_by_name(cipher, mode):
    with pytest.raises(UnsupportedFeature, match=f"{cipher}-{mode}"):
        SectorCipher(cipher, mode, "plain64", "", bytes(32))


@pytest.mark.parametrize("hash_name, key_bytes", [("sha1", 32), ("sha256", 64), ("sha512", 20)])
def test_af_merge_undoes_an_af_split(hash_name, key_bytes):
    """cryptsetup's AF split (random stripes, each diffused into the next, the last one the key
    XOR the running digest), inverted by af_merge."""
    rng = random.Random(key_bytes)
    key = rng.randbytes(key_bytes)
    stripes = 4000
    d = bytes(key_bytes)
    split = b""
    for _ in range(stripes - 1):
        s = rng.randbytes(key_bytes)
        split += s
        d = diffuse(bytes(a ^ b for a, b in zip(d, s)), hash_name)
    split += bytes(a ^ b for a, b in zip(d, key))
    assert af_merge(split, key_bytes, stripes, hash_name) == key


def _qemu_like_header() -> bytes:
    slots = b""
    for i in range(8):
        slots += (
            (0x00AC71F3 if i == 0 else 0x0000DEAD).to_bytes(4, "big")
            + (1000).to_bytes(4, "big")
            + bytes(32)
            + (8 + i * 250).to_bytes(4, "big")
            + (4000).to_bytes(4, "big")
        )
    return (
        b"LUKS\xba\xbe"
        + (1).to_bytes(2, "big")
        + b"aes".ljust(32, b"\0")
        + b"xts-plain64".ljust(32, b"\0")
        + b"sha256".ljust(32, b"\0")
        + (2048).to_bytes(4, "big")
        + (64).to_bytes(4, "big")
        + bytes(20)
        + bytes(32)
        + (1000).to_bytes(4, "big")
        + b"6f2b3c4d-1111-4222-8333-444455556666".ljust(40, b"\0")
        + slots
    )


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 591), st.integers(0, 255)), min_size=1, max_size=12))
def test_hostile_luks_headers_are_refused_never_crash(flips):
    """Random bytes anywhere in a valid header: parse() and the unlock's pre-checks either accept
    it or refuse it with a QcowError; nothing else escapes (and nothing runs PBKDF2 here)."""
    from qcowfs.crypto.unlock import check_supported

    data = bytearray(_qemu_like_header())
    assert len(data) == luks.HEADER_SIZE
    for at, value in flips:
        data[at] = value
    try:
        h = luks.parse(bytes(data), 2048 * 512)
        check_supported(h)
    except QcowError:
        pass
