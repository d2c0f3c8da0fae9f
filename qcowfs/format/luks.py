"""The LUKS1 header QEMU keeps inside an encrypted qcow2 image: parsing and validation, no I/O.

qcow2.txt, "Full disk encryption header pointer": with crypt_method 2 the header extension
0x0537be77 gives the offset and length of a cluster-aligned area holding a LUKS1 header
(cryptsetup's on-disk format, as QEMU's crypto/block-luks.c writes and checks it) and its key
material; the payload offset in that header is not used (the data lives in qcow2 clusters).

All fields are big-endian:
    magic "LUKS\\xba\\xbe", version 1, cipher name, cipher mode, hash spec (32-byte NUL-padded
    strings), payload offset (sectors), key bytes, master key digest (20), its salt (32) and
    iterations, UUID (40), then 8 key slots: active (0x00ac71f3 or 0x0000dead), iterations,
    salt (32), key material offset (sectors), stripes.

Validation follows QEMU's (qcrypto_block_luks_check_header) so that qcowfs refuses what QEMU
refuses, with the slot and the field named: every slot's state is one of the two values, its
stripes 4000, its key material after the header, before the payload offset, inside the area and
not overlapping another slot's; an active slot has iterations; the master key digest has iterations; the cipher and mode
are ones QEMU knows. What `qemu-img info` shows of it is LuksHeader.info().
"""

from __future__ import annotations

import dataclasses
import uuid as uuid_mod

import construct as cs

from ..errors import FormatError, UnsupportedFeature

MAGIC = b"LUKS\xba\xbe"
SECTOR = 512
SLOT_ENABLED = 0x00AC71F3
SLOT_DISABLED = 0x0000DEAD
STRIPES = 4000  # QEMU and cryptsetup: the anti-forensic split's stripes
NUM_SLOTS = 8

KeySlot = cs.Struct(
    "active" / cs.Int32ub,
    "iterations" / cs.Int32ub,
    "salt" / cs.Bytes(32),
    "key_offset" / cs.Int32ub,
    "stripes" / cs.Int32ub,
)
LuksHeaderStruct = cs.Struct(
    "magic" / cs.Bytes(6),
    "version" / cs.Int16ub,
    "cipher_name" / cs.Bytes(32),
    "cipher_mode" / cs.Bytes(32),
    "hash_spec" / cs.Bytes(32),
    "payload_offset" / cs.Int32ub,
    "key_bytes" / cs.Int32ub,
    "mk_digest" / cs.Bytes(20),
    "mk_digest_salt" / cs.Bytes(32),
    "mk_digest_iter" / cs.Int32ub,
    "uuid" / cs.Bytes(40),
    "slots" / cs.Array(NUM_SLOTS, KeySlot),
)
HEADER_SIZE = LuksHeaderStruct.sizeof()  # 592

#: cipher names QEMU's LUKS driver knows, and the key sizes (bytes) each takes
CIPHER_KEY_SIZES = {
    "aes": (16, 24, 32),
    "serpent": (16, 24, 32),
    "twofish": (16, 24, 32),
    "cast5": (16,),
    "sm4": (16,),
}
MODES = ("ecb", "cbc", "xts", "ctr")
IVGENS = ("plain", "plain64", "essiv")
HASHES = ("md5", "sha1", "sha224", "sha256", "sha384", "sha512", "ripemd160")


@dataclasses.dataclass(frozen=True)
class Slot:
    index: int
    active: bool
    iterations: int
    salt: bytes
    key_offset: int  # bytes from the start of the LUKS area
    stripes: int


@dataclasses.dataclass(frozen=True)
class LuksHeader:
    cipher_name: str
    cipher_mode: str  # as written, e.g. "xts-plain64", "cbc-essiv:sha256"
    hash_spec: str
    payload_offset: int  # bytes
    key_bytes: int
    mk_digest: bytes
    mk_digest_salt: bytes
    mk_digest_iter: int
    uuid: str
    slots: tuple[Slot, ...]

    @property
    def mode(self) -> str:
        return self.cipher_mode.split("-", 1)[0]

    @property
    def ivgen(self) -> str:
        rest = self.cipher_mode.split("-", 1)[1] if "-" in self.cipher_mode else ""
        return rest.split(":", 1)[0]

    @property
    def ivgen_hash(self) -> str:
        rest = self.cipher_mode.split("-", 1)[1] if "-" in self.cipher_mode else ""
        return rest.split(":", 1)[1] if ":" in rest else ""

    @property
    def cipher_key_bytes(self) -> int:
        """The cipher's own key size: XTS keys are two keys of that size."""
        return self.key_bytes // 2 if self.mode == "xts" else self.key_bytes

    @property
    def cipher_alg(self) -> str:
        """QEMU's QCryptoCipherAlgorithm name: aes-256, cast5-128, sm4, ..."""
        if self.cipher_name == "sm4":
            return "sm4"
        return f"{self.cipher_name}-{8 * self.cipher_key_bytes}"

    def split_key_sectors(self) -> int:
        """Sectors of one slot's anti-forensic key material."""
        return -(-self.key_bytes * STRIPES // SECTOR)

    def info(self) -> dict:
        """The `encrypt` object of `qemu-img info --output=json` (QCryptoBlockInfoLUKS)."""
        d: dict = {
            "format": "luks",
            "cipher-alg": self.cipher_alg,
            "cipher-mode": self.mode,
            "ivgen-alg": self.ivgen,
        }
        if self.ivgen_hash:
            d["ivgen-hash-alg"] = self.ivgen_hash
        d.update(
            {
                "hash-alg": self.hash_spec,
                "payload-offset": self.payload_offset,
                "master-key-iters": self.mk_digest_iter,
                "uuid": self.uuid,
                "slots": [
                    (
                        {
                            "active": True,
                            "iters": s.iterations,
                            "key-offset": s.key_offset,
                            "stripes": s.stripes,
                        }
                        if s.active
                        else {"active": False, "key-offset": s.key_offset}
                    )
                    for s in self.slots
                ],
            }
        )
        return d


def _text(raw: bytes, what: str) -> str:
    s = raw.split(b"\0", 1)[0]
    try:
        return s.decode("ascii")
    except UnicodeDecodeError:
        raise FormatError(f"LUKS header: {what} is not ASCII text") from None


def parse(data: bytes, area_length: int) -> LuksHeader:
    """Parse and check the LUKS1 header at the start of `data` (the encryption area, which is
    area_length bytes long in the image). FormatError names what is wrong; UnsupportedFeature a
    cipher, mode or hash QEMU would not use either."""
    if len(data) < HEADER_SIZE or area_length < HEADER_SIZE:
        raise FormatError(
            f"LUKS header: the encryption area ({area_length} bytes) is shorter than a LUKS header"
        )
    f = LuksHeaderStruct.parse(data[:HEADER_SIZE])
    if f.magic != MAGIC:
        raise FormatError("LUKS header: bad magic (the encryption area holds no LUKS header)")
    if f.version != 1:
        raise UnsupportedFeature(f"LUKS header version {f.version}: QEMU's qcow2 uses LUKS1")
    name = _text(f.cipher_name, "the cipher name").lower()
    mode = _text(f.cipher_mode, "the cipher mode").lower()
    hash_spec = _text(f.hash_spec, "the hash").lower()
    uuid = _text(f.uuid, "the UUID")
    try:
        uuid = str(uuid_mod.UUID(uuid))
    except ValueError:
        raise FormatError(f"LUKS header: UUID {uuid!r} is not a UUID") from None
    if name not in CIPHER_KEY_SIZES:
        raise UnsupportedFeature(f"LUKS cipher {name!r} is not one QEMU supports")
    mode_name = mode.split("-", 1)[0]
    rest = mode.split("-", 1)[1] if "-" in mode else ""
    ivgen, _, ivhash = rest.partition(":")
    if mode_name not in MODES or (mode_name != "ecb" and ivgen not in IVGENS):
        raise UnsupportedFeature(f"LUKS cipher mode {mode!r} is not one QEMU supports")
    if (ivgen == "essiv") != bool(ivhash) or (ivhash and ivhash not in HASHES):
        raise UnsupportedFeature(f"LUKS IV generator {rest!r} is not one QEMU supports")
    if hash_spec not in HASHES:
        raise UnsupportedFeature(f"LUKS hash {hash_spec!r} is not one QEMU supports")
    key_bytes = f.key_bytes
    per_cipher = key_bytes // 2 if mode_name == "xts" else key_bytes
    if (mode_name == "xts" and key_bytes % 2) or per_cipher not in CIPHER_KEY_SIZES[name]:
        raise FormatError(
            f"LUKS header: a {key_bytes}-byte key does not fit cipher {name!r} in mode {mode_name!r}"
        )
    if f.mk_digest_iter == 0:
        raise FormatError("LUKS header: the master key digest has 0 iterations")
    hdr = LuksHeader(
        cipher_name=name,
        cipher_mode=mode,
        hash_spec=hash_spec,
        payload_offset=f.payload_offset * SECTOR,
        key_bytes=key_bytes,
        mk_digest=bytes(f.mk_digest),
        mk_digest_salt=bytes(f.mk_digest_salt),
        mk_digest_iter=f.mk_digest_iter,
        uuid=uuid,
        slots=tuple(
            Slot(
                i,
                s.active == SLOT_ENABLED,
                s.iterations,
                bytes(s.salt),
                s.key_offset * SECTOR,
                s.stripes,
            )
            for i, s in enumerate(f.slots)
        ),
    )
    header_sectors = -(-HEADER_SIZE // SECTOR)
    split = hdr.split_key_sectors()
    spans = []
    for i, s in enumerate(f.slots):
        if s.active not in (SLOT_ENABLED, SLOT_DISABLED):
            raise FormatError(f"LUKS header: key slot {i} has an invalid state 0x{s.active:08x}")
        if s.stripes != STRIPES:
            raise FormatError(f"LUKS header: key slot {i} has {s.stripes} stripes, not {STRIPES}")
        if s.key_offset < header_sectors:
            raise FormatError(f"LUKS header: key slot {i} overlaps the LUKS header")
        end = (s.key_offset + split) * SECTOR
        if end > area_length:
            raise FormatError(
                f"LUKS header: key slot {i}'s key material ends at byte {end}, past the "
                f"encryption area ({area_length} bytes)"
            )
        if end > hdr.payload_offset:
            raise FormatError(
                f"LUKS header: key slot {i}'s key material overlaps the payload (offset "
                f"{hdr.payload_offset})"
            )
        if s.active == SLOT_ENABLED and s.iterations == 0:
            raise FormatError(f"LUKS header: key slot {i} is active with 0 iterations")
        spans.append((s.key_offset, s.key_offset + split, i))
    spans.sort()
    for (_, a_end, a), (b_start, _, b) in zip(spans, spans[1:]):
        if b_start < a_end:
            raise FormatError(f"LUKS header: key slots {a} and {b} overlap")
    return hdr  # with no active slot it can still be described; no passphrase will open it
