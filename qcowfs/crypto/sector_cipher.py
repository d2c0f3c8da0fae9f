"""Sector ciphers: guest data encrypted per 512-byte sector, as QEMU's crypto/block.c does it.

QEMU encrypts every sector on its own with the header's cipher, mode and IV generator
(crypto/ivgen-*.c); the IV's sector number is the host offset >> 9 for LUKS in qcow2 and the
guest offset >> 9 for the legacy AES format (docs/encryption.md). IV generators:
    plain     the sector number's low 32 bits, little-endian, zero-padded to the IV size
    plain64   the sector number, 64 bits little-endian, zero-padded
    essiv:H   plain64 encrypted with the same cipher under the key H(master key)

The block cipher is OpenSSL's, through pyca/cryptography (AES-NI where the CPU has it). XTS
needs a new tweak per sector, and a library call per 512 bytes costs about 11 us in Python
(92 MB/s measured), so the XTS mode (IEEE 1619-2007) is composed here from the library's AES in
ECB mode over every block of a request at once: the tweaks E_K2(IV) of all sectors in one
call, each block's tweak T_j = T_0 * alpha^j in GF(2^128) with numpy, C = E_K1(P ^ T) ^ T in one
more call. The tests check it against the library's own XTS and against QEMU. CBC decryption is
parallel over blocks the same way; CBC encryption chains, so it is one library call per sector.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from .cipher_spec import check_spec

SECTOR = 512
_BLOCKS = SECTOR // 16  # AES blocks per sector
_UP = np.arange(1, _BLOCKS, dtype=np.uint64)  # j = 1..31
_DOWN = np.uint64(64) - _UP
#: sectors per numpy pass: small enough that the temporaries stay in the CPU's cache (1 MiB at
#: once measured 2.6x slower), large enough to spread numpy's per-call cost. Measured on 1 and 8
#: MiB requests (best of 5): 128 KiB passes 1.60 and 1.40 GB/s, 64 KiB ones 1.35 and 1.20;
#: 192 KiB ones 5% faster again, but 256 KiB ones ran at half speed in one run (the cliff is
#: near). docs/performance.md, "XTS in 128 KiB passes"
_CHUNK = 256
_ONE, _TWO, _SEVEN = np.uint64(1), np.uint64(2), np.uint64(7)


def _ecb(key: bytes) -> tuple:
    c = Cipher(algorithms.AES(key), modes.ECB())
    return c.encryptor(), c.decryptor()


class SectorCipher:
    """Encrypt and decrypt runs of whole sectors, given the first sector's IV number.

    Not thread-safe (the library's cipher contexts are reused): one per image, used by the
    thread that serves the image's data (encrypted images are served inline)."""

    def __init__(self, cipher_name: str, mode: str, ivgen: str, ivgen_hash: str, key: bytes):
        check_spec(cipher_name, mode, ivgen, ivgen_hash)
        self.mode = mode
        self.ivgen = ivgen
        #: what clone() needs (the key is in the library's contexts anyway)
        self._args = (cipher_name, mode, ivgen, ivgen_hash, key)
        if mode == "xts":
            half = len(key) // 2
            self._data_enc, self._data_dec = _ecb(key[:half])
            self._tweak_enc, _ = _ecb(key[half:])
        else:
            self._data_enc, self._data_dec = _ecb(key)
            self._key = key
        self._essiv_enc = None
        if ivgen == "essiv":  # check_spec checked the hash
            self._essiv_enc, _ = _ecb(hashlib.new(ivgen_hash, key).digest())
        #: (data, first sector's IV number) -> the sectors en- or decrypted (len(data) a
        #: multiple of 512)
        self.encrypt: Callable[[bytes | bytearray | memoryview, int], bytes | memoryview]
        self.decrypt: Callable[[bytes | bytearray | memoryview, int], bytes | memoryview]
        if mode == "xts":
            self.encrypt, self.decrypt = self._xts_encrypt, self._xts_decrypt
        elif mode == "cbc":
            self.encrypt, self.decrypt = self._cbc_encrypt, self._cbc_decrypt
        else:
            self.encrypt = lambda data, sector: self._data_enc.update(data)
            self.decrypt = lambda data, sector: self._data_dec.update(data)

    def __repr__(self) -> str:
        return f"SectorCipher({self._args[0]}-{self.mode}-{self.ivgen})"  # never the key

    def clone(self) -> SectorCipher:
        """A cipher with the same key and its own contexts, for another thread (this one is not
        thread-safe): a backup's copy threads each take one."""
        return SectorCipher(*self._args)

    # ------------------------------------------------------------------ IVs
    def _ivs(self, sector: int, n: int) -> np.ndarray:
        """The IVs of n sectors from `sector` on, as (n, 2) little-endian 64-bit words."""
        iv = np.zeros((n, 2), dtype="<u8")
        iv[:, 0] = np.arange(sector, sector + n, dtype=np.uint64)
        if self.ivgen == "plain":
            iv[:, 0] &= np.uint64(0xFFFFFFFF)
        elif self._essiv_enc is not None:
            iv = np.frombuffer(self._essiv_enc.update(iv.tobytes()), dtype="<u8").reshape(n, 2)
        return iv

    # ------------------------------------------------------------------ XTS
    def _tweaks(self, sector: int, n: int) -> np.ndarray:
        """Every block's XTS tweak, T_j = T_0 * x^j in GF(2^128) mod x^128 + x^7 + x^2 + x + 1
        (little-endian, IEEE 1619): (n sectors, 32 blocks, 2 words). All 32 at once: a 128-bit
        shift left by j, and the j bits shifted out (h) folded back in as h * 0x87, which for
        j < 32 is h ^ h<<1 ^ h<<2 ^ h<<7 within the low word."""
        t0 = np.frombuffer(self._tweak_enc.update(self._ivs(sector, n).tobytes()), dtype="<u8")
        lo = t0[0::2, None]
        hi = t0[1::2, None]
        t = np.empty((n, _BLOCKS, 2), dtype="<u8")
        t[:, 0, 0] = t0[0::2]
        t[:, 0, 1] = t0[1::2]
        h = hi >> _DOWN
        t[:, 1:, 0] = (lo << _UP) ^ h ^ (h << _ONE) ^ (h << _TWO) ^ (h << _SEVEN)
        t[:, 1:, 1] = (hi << _UP) | (lo >> _DOWN)
        return t

    def _xts(self, data: bytes | bytearray | memoryview, sector: int, ecb: Any) -> memoryview:
        src = np.frombuffer(data, dtype="<u8")
        # update_into wants room for a block more than it writes
        out = np.empty(len(src) + 2, dtype="<u8")
        words = 2 * _BLOCKS * _CHUNK
        for w in range(0, len(src), words):
            x = src[w : w + words]
            t = self._tweaks(sector + w // (2 * _BLOCKS), len(x) // (2 * _BLOCKS)).reshape(-1)
            x = x ^ t
            ecb.update_into(x.view(np.uint8).data, out[w:].view(np.uint8).data)
            y = out[w : w + len(x)]
            np.bitwise_xor(y, t, out=y)
        return out[: len(src)].view(np.uint8).data

    def _xts_encrypt(self, data: bytes | bytearray | memoryview, sector: int) -> memoryview:
        return self._xts(data, sector, self._data_enc)

    def _xts_decrypt(self, data: bytes | bytearray | memoryview, sector: int) -> memoryview:
        return self._xts(data, sector, self._data_dec)

    # ------------------------------------------------------------------ CBC
    def _cbc_encrypt(self, data: bytes | bytearray | memoryview, sector: int) -> bytes:
        n = len(data) // SECTOR
        ivs = self._ivs(sector, n).tobytes()
        mv = memoryview(data)
        out = bytearray(len(data))
        alg = algorithms.AES(self._key)
        for i in range(n):
            enc = Cipher(alg, modes.CBC(ivs[16 * i : 16 * i + 16])).encryptor()
            out[SECTOR * i : SECTOR * (i + 1)] = enc.update(mv[SECTOR * i : SECTOR * (i + 1)])
        return bytes(out)

    def _cbc_decrypt(self, data: bytes | bytearray | memoryview, sector: int) -> bytes:
        n = len(data) // SECTOR
        c = np.frombuffer(data, dtype="<u8").reshape(n, _BLOCKS, 2)
        prev = np.empty_like(c)
        prev[:, 0] = self._ivs(sector, n)
        prev[:, 1:] = c[:, :-1]
        p = np.frombuffer(self._data_dec.update(bytes(data)), dtype="<u8").reshape(c.shape) ^ prev
        return p.tobytes()


def legacy_aes(passphrase: bytes) -> SectorCipher:
    """The legacy qcow2 AES format (crypt_method 1; QEMU's crypto/block-qcow.c): AES-128-CBC,
    plain64 IVs, the key the passphrase's first 16 bytes (up to a NUL: QEMU takes it as a C
    string) padded with zeros."""
    key = passphrase.split(b"\0", 1)[0][:16].ljust(16, b"\0")
    return SectorCipher("aes", "cbc", "plain64", "", key)
