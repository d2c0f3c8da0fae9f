"""Fuzzing real mounts with damaged QEMU-made images.

A few small images are made once by QEMU (v3 with data, zero and compressed clusters, an
internal snapshot and a dirty persistent bitmap; v2; extended L2; LUKS-encrypted, with data,
a snapshot and a bitmap). Their metadata is located by qcowfs_dev.probes, independently of
qcowfs: header and extensions, L1, L2 tables (active and snapshot), refcount table and blocks,
snapshot table, bitmap directory, bitmap tables and bitmap data, and the LUKS header, its key
slots and the active slots' key material. Hypothesis picks a region and overwrites bytes, flips
bits, or replaces 8-byte big-endian entries with interesting values (0, 1<<63, past EOF,
unaligned, reserved bits, flags, offsets of other metadata). LUKS regions (the header and key
slots chosen twice as often) mostly get field-aware damage: one field set to a hostile value
(key slot offsets inside the header, on another slot, past the end of the area or the file;
iteration counts 0, 1, 2^32-1 or just above qcowfs's limit; stripes; payload offsets inside the
header and key material; key sizes; unsupported or garbage cipher, mode, hash and UUID strings;
slot states; the header pointer extension's offset and length), or a garbage key material sector.

The encrypted base is mounted with --key-file (a 0600 file in the example's directory) and
checked by qemu-img with the key. PBKDF2 iteration counts an example leaves between 2^20 and
qcowfs's limit (MAX_ITERATIONS, 2^26: some 16 s) are moved above the limit (tame_pbkdf2), so
that every example stays fast; qemu-img, which has no limit, is not run on a header asking for
more than 2^20. For every damaged image:

(a) `qcowfs mount --read-only` refuses with one stderr line and no traceback, or mounts; a
    mount serves all of disk.raw in 64 KiB chunks as data or EIO (no other errno, no hang),
    .bitmaps lists and each status file reads (or fails with an OSError), the daemon stays
    alive, logs no traceback, exits 0 at unmount, and the image is unchanged to the byte;
(b) `qcowfs check --json` exits 0, 2 or 3 with JSON on stdout, or 1 with one stderr line,
    never with a traceback, and does not change the image;
(c) sometimes a read-write mount with a few writes: no traceback, the daemon survives; and
    when qemu-img check found the damaged image consistent, written data reads back and the
    image is still consistent for qemu-img check after a clean unmount.

Examples per base image: QCOWFS_FUZZ_EXAMPLES (default 20). QCOWFS_FUZZ_SECONDS stops each
base image's run (as skipped) after that many seconds; scripts/fuzz uses both for long runs.
QCOWFS_FUZZ_SAVE=DIR keeps every failing damaged image there.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import needs_fuse, sha256
from hypothesis import HealthCheck, Phase, event, given, note, settings
from hypothesis import strategies as st
from support.images import Blobs, create
from support.luks import SECRET, key_file, luks_image, qemu_spec
from support.repo import ROOT

from qcowfs.crypto.unlock import MAX_ITERATIONS
from qcowfs_dev.mounts import Mount, detach
from qcowfs_dev.oracles import qemu_img, qemu_io
from qcowfs_dev.probes import (
    CRYPTO_HEADER_MAGIC,
    LUKS_HEADER_SIZE,
    LUKS_MAGIC,
    LUKS_OFF_CIPHER_MODE,
    LUKS_OFF_CIPHER_NAME,
    LUKS_OFF_HASH_SPEC,
    LUKS_OFF_KEY_BYTES,
    LUKS_OFF_MK_DIGEST,
    LUKS_OFF_MK_DIGEST_ITER,
    LUKS_OFF_MK_DIGEST_SALT,
    LUKS_OFF_PAYLOAD_OFFSET,
    LUKS_OFF_UUID,
    LUKS_OFF_VERSION,
    LUKS_SECTOR,
    LUKS_SLOT_DISABLED,
    LUKS_SLOT_ENABLED,
    LUKS_SLOT_OFF_ACTIVE,
    LUKS_SLOT_OFF_ITERATIONS,
    LUKS_SLOT_OFF_KEY_OFFSET,
    LUKS_SLOT_OFF_SALT,
    LUKS_SLOT_OFF_STRIPES,
    LUKS_STRING_SIZE,
    LUKS_STRIPES,
    OFF_CRYPT,
    OFFSET_MASK,
    all_metadata_offsets,
    find_extension,
    luks_header,
    luks_pbkdf2_iterations,
    metadata_regions,
    refcounts_past_eof,
    u32,
    u64,
)
from qcowfs_dev.proc import run

QCOWFS = [sys.executable, "-m", "qcowfs"]
ENV = dict(
    os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
)

EXAMPLES = int(os.environ.get("QCOWFS_FUZZ_EXAMPLES", "20"))
TIME_BUDGET = float(os.environ.get("QCOWFS_FUZZ_SECONDS", "0") or 0)
SAVE_DIR = os.environ.get("QCOWFS_FUZZ_SAVE")

CHUNK = 64 * 1024
FULL_READ_LIMIT = 64 << 20  # read every chunk of disks up to this size, sample bigger ones
MOUNT_TIMEOUT = 30.0
IO_TIMEOUT = 60.0
CHECK_TIMEOUT = 120.0

pytestmark = needs_fuse

SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=False,
    print_blob=True,
    phases=[
        Phase.explicit,
        Phase.reuse,
        Phase.generate,
        Phase.target,
        Phase.shrink,
    ],  # no slow explain phase
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)


# ----------------------------------------------------------------------------- base images


def _build_v3(d: Path) -> Path:
    img = create(d / "v3.qcow2", "4M", "cluster_size=4096")
    qemu_io(
        img,
        "write -P 0x5a 0 64k",
        "write -c -P 0x77 1M 4k",
        "write -c -P 0x78 1028k 8k",
        "write -z 2M 16k",
        "write -P 0x11 3M 4k",
        "write -P 0x12 4092k 4k",
    )
    qemu_img("snapshot", "-c", "snap1", img)
    qemu_io(img, "write -P 0x33 8k 8k", "write -z 3M 4k")  # COW away from the snapshot's clusters
    qemu_img("bitmap", "--add", img, "bm0")
    qemu_img("bitmap", "--add", "-g", "65536", "--disable", img, "bm1")
    qemu_io(img, "write -P 0x99 512k 12k", "write -P 0x98 3M 4k", "write -z 2M 4k")  # dirties bm0
    return img


def _build_v2(d: Path) -> Path:
    img = create(d / "v2.qcow2", "4M", "compat=0.10,cluster_size=4096")
    qemu_io(img, "write -P 0x5a 0 64k", "write -c -P 0x77 1M 8k", "write -P 0x11 3M 4k")
    qemu_img("snapshot", "-c", "snap1", img)
    qemu_io(img, "write -P 0x33 8k 8k", "write -z 16k 8k")
    return img


def _build_extl2(d: Path) -> Path:
    # extended L2 entries need clusters of at least 16 KiB
    img = create(d / "extl2.qcow2", "4M", "cluster_size=16384,extended_l2=on")
    qemu_io(
        img,
        "write -P 0x01 0 4k",
        "write -P 0x02 20k 1k",
        "write -z 64k 16k",
        "write -z 96k 2k",
        "write -c -P 0x03 1M 16k",
        "write -P 0x04 3M 48k",
    )
    qemu_img("bitmap", "--add", img, "bm0")
    qemu_io(img, "write -P 0x05 2M 2k", "write -P 0x06 100k 1k")
    return img


def with_key(key: Path) -> list[str]:
    """QEMU's options for an encrypted image: the secret sec0 (the passphrase in key), and the
    image named by a qemu_spec."""
    return ["--object", SECRET.format(key=key), "--image-opts"]


def _build_luks(d: Path) -> Path:
    # QEMU's default cipher (aes-256 xts-plain64, sha256); PBKDF2 timed at 10 ms (some 10^4
    # iterations) so that unlocking costs next to nothing
    key = key_file(d, name="luks.key")
    img = luks_image(d, "luks.qcow2", "cluster_size=4096", size=4 << 20, key=key, iter_time=10)
    spec = qemu_spec(img)

    def io(*commands: str) -> None:
        run(["qemu-io", *with_key(key), *[a for c in commands for a in ("-c", c)], spec])

    io("write -P 0x5a 0 64k", "write -z 2M 16k", "write -P 0x11 3M 4k", "write -P 0x12 4092k 4k")
    run(["qemu-img", "snapshot", *with_key(key), "-c", "snap1", spec])
    io("write -P 0x33 8k 8k", "write -z 3M 4k")  # COW away from the snapshot's clusters
    run(["qemu-img", "bitmap", *with_key(key), "--add", spec, "bm0"])
    io("write -P 0x99 512k 12k")  # dirties bm0
    return img


BUILDERS = {"v3": _build_v3, "v2": _build_v2, "extl2": _build_extl2, "luks": _build_luks}
#: bases opened with a key (the passphrase support.luks.PASSPHRASE, as key_file writes it)
ENCRYPTED = {"luks"}


def qemu_img_check(image: Path, key: Path | None = None) -> subprocess.CompletedProcess:
    """qemu-img check IMAGE, with the secret when it is encrypted (QEMU opens it only so). Its
    errors quote damaged LUKS cipher names byte for byte: not always UTF-8."""
    cmd = ["qemu-img", "check", *([*with_key(key), qemu_spec(image)] if key else [str(image)])]
    return subprocess.run(
        cmd, capture_output=True, text=True, errors="replace", timeout=CHECK_TIMEOUT
    )


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz-bases")
    out = Blobs()
    for name, build in BUILDERS.items():
        img = build(d)
        res = qemu_img_check(img, key_file(d, name="check.key") if name in ENCRYPTED else None)
        assert res.returncode == 0, f"base image {name} is not clean: {res.stdout} {res.stderr}"
        out[name] = img.read_bytes()
    return out


# ----------------------------------------------------------------------------- metadata map
# qcowfs_dev.probes.metadata_regions(data) locates every kind of metadata from the header alone;
# refcounts_past_eof(data) tells whether a refcount block counts clusters past the end of the file.


# ----------------------------------------------------------------------------- mutations

ENTRY_KINDS = (
    "zero",
    "top_bit",
    "copied_toggle",
    "compressed_flag",
    "zero_flag",
    "one",
    "all_ones",
    "past_eof",
    "far_past_eof",
    "beyond_mask",
    "unaligned",
    "reserved_low",
    "reserved_high",
    "other_metadata",
    "in_file",
    "int64_max",
    "random",
)
U32_VALUES = (
    0,
    1,
    2,
    3,
    7,
    8,
    9,
    12,
    16,
    21,
    22,
    31,
    32,
    63,
    64,
    0x7FFFFFFF,
    0x80000000,
    0xFFFFFFFE,
    0xFFFFFFFF,
)


# ----- the LUKS header: hostile values field by field (offsets are from the area's start)
LUKS_REGIONS = ("luks_header", "luks_keyslot", "luks_key_material")

#: PBKDF2 iteration counts are either small (cheap to run) or above qcowfs's limit (refused
#: before any is run): 1 << 26 SHA-256 iterations take some 16 s, 1 << 20 a quarter second
FAST_PBKDF2 = 1 << 20
ITERATION_VALUES = (0, 1, 2, 1000, MAX_ITERATIONS + 1, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF)
SLOT_STATES = (LUKS_SLOT_ENABLED, LUKS_SLOT_DISABLED, 0, 1, LUKS_SLOT_ENABLED ^ 1, 0xFFFFFFFF)
STRIPES_VALUES = (0, 1, 2, LUKS_STRIPES - 1, LUKS_STRIPES + 1, 2 * LUKS_STRIPES, 0xFFFFFFFF)
KEY_BYTES_VALUES = (0, 1, 16, 24, 32, 33, 48, 63, 65, 128, 0x80000000, 0xFFFFFFFF)
STRINGS = {
    "cipher_name": (
        b"aes",
        b"AES",
        b"serpent",
        b"twofish",
        b"cast5",
        b"sm4",
        b"des",
        b"des3_ede",
        b"chacha20",
        b"aes-256",
        b"",
        b"aes\xff",
        b"\xff" * 32,
        b"A" * 32,
    ),
    "cipher_mode": (
        b"xts-plain",
        b"xts-essiv:sha256",
        b"cbc-plain64",
        b"cbc-essiv:sha256",
        b"cbc-essiv:md5",
        b"cbc-essiv",
        b"cbc-essiv:nohash",
        b"ecb",
        b"ecb-plain64",
        b"ctr-plain64",
        b"gcm-plain64",
        b"xts",
        b"xts-",
        b"-plain64",
        b"xts-benbi",
        b"XTS-PLAIN64",
        b"",
        b"\xff" * 32,
        b"x" * 32,
    ),
    "hash_spec": (
        b"sha1",
        b"sha224",
        b"sha384",
        b"sha512",
        b"md5",
        b"ripemd160",
        b"whirlpool",
        b"sha3-256",
        b"SHA256",
        b"",
        b"\x80",
        b"sha256\xff",
        b"s" * 32,
    ),
    "uuid": (
        b"",
        b"not-a-uuid",
        b"\xff" * 40,
        b"0" * 40,
        b"{12345678-1234-1234-1234-1234567890ab}",
    ),
    "magic": (b"LUKS\xba\xbf", bytes(6), b"LUKS\x00\x00", b"SKUL\xba\xbe"),
}


def _luks_string(field: str, value: bytes) -> bytes:
    size = 40 if field == "uuid" else 6 if field == "magic" else LUKS_STRING_SIZE
    return value.ljust(size, b"\0")[:size]


@st.composite
def luks_mutation(draw, data: bytes, regs: dict, name: str):
    """One field of the LUKS header, key slots or header pointer set to a hostile value, or a
    sector of an active slot's key material replaced."""
    h = luks_header(data)
    assert h is not None
    a = h["area_offset"]
    area = h["area_length"] // LUKS_SECTOR  # sectors, as the header counts
    split = -(-h["key_bytes"] * LUKS_STRIPES // LUKS_SECTOR)  # one slot's key material
    file_end = -(-len(data) // LUKS_SECTOR) - a // LUKS_SECTOR  # the end of the file, from a
    if name == "luks_key_material":
        start, end = draw(st.sampled_from(regs[name]))
        pos = start + LUKS_SECTOR * draw(st.integers(0, (end - start) // LUKS_SECTOR - 1))
        fill = draw(st.sampled_from(("zeros", "ones", "random")))
        sector = (
            bytes(LUKS_SECTOR)
            if fill == "zeros"
            else b"\xff" * LUKS_SECTOR
            if fill == "ones"
            else random.Random(draw(st.integers(0, 1 << 32))).randbytes(LUKS_SECTOR)
        )
        return (name, "bytes", pos, sector)
    if name == "luks_keyslot":
        active = [r for r in regs[name] if u32(data, r[0]) == LUKS_SLOT_ENABLED]
        at = draw(st.sampled_from(active or regs[name]) | st.sampled_from(regs[name]))[0]
        field = draw(st.sampled_from(("active", "iterations", "key_offset", "stripes", "salt")))
        if field == "active":
            return (name, "u32", at + LUKS_SLOT_OFF_ACTIVE, draw(st.sampled_from(SLOT_STATES)))
        if field == "iterations":
            orig = u32(data, at + LUKS_SLOT_OFF_ITERATIONS)
            v = draw(st.sampled_from((*ITERATION_VALUES, (orig - 1) & 0xFFFFFFFF, orig + 1)))
            return (name, "u32", at + LUKS_SLOT_OFF_ITERATIONS, v)
        if field == "stripes":
            return (name, "u32", at + LUKS_SLOT_OFF_STRIPES, draw(st.sampled_from(STRIPES_VALUES)))
        if field == "salt":
            return (
                name,
                "bit",
                at + LUKS_SLOT_OFF_SALT + draw(st.integers(0, 31)),
                draw(st.integers(0, 7)),
            )
        own = u32(data, at + LUKS_SLOT_OFF_KEY_OFFSET)
        offsets = (
            0,  # on the LUKS header
            1,
            2,  # just after the header
            own + 1,
            *(s["key_offset"] for s in h["slots"]),  # on another slot's key material
            area - split,  # the last place that fits
            area - split + 1,  # one sector past the end of the area
            area,
            h["payload_offset"],
            file_end,  # past the end of the file
            file_end + 1,
            0x7FFFFFFF,
            0xFFFFFFFF,
        )
        v = draw(st.sampled_from(offsets)) & 0xFFFFFFFF
        return (name, "u32", at + LUKS_SLOT_OFF_KEY_OFFSET, v)
    field = draw(
        st.sampled_from(
            (
                "magic",
                "version",
                "cipher_name",
                "cipher_mode",
                "hash_spec",
                "payload_offset",
                "key_bytes",
                "mk_digest",
                "mk_digest_iter",
                "uuid",
                "area_offset",
                "area_length",
                "crypt_method",
            )
        )
    )
    if field in STRINGS:
        at = {
            "magic": 0,
            "cipher_name": LUKS_OFF_CIPHER_NAME,
            "cipher_mode": LUKS_OFF_CIPHER_MODE,
            "hash_spec": LUKS_OFF_HASH_SPEC,
            "uuid": LUKS_OFF_UUID,
        }[field]
        return (name, "bytes", a + at, _luks_string(field, draw(st.sampled_from(STRINGS[field]))))
    if field == "version":
        return (name, "u16", a + LUKS_OFF_VERSION, draw(st.sampled_from((0, 2, 0x100, 0xFFFF))))
    if field == "payload_offset":
        slot0 = h["slots"][0]["key_offset"]
        v = draw(
            st.sampled_from((0, 1, 2, slot0, slot0 + split - 1, area - 1, area + 1, 0xFFFFFFFF))
        )
        return (name, "u32", a + LUKS_OFF_PAYLOAD_OFFSET, v)
    if field == "key_bytes":
        return (name, "u32", a + LUKS_OFF_KEY_BYTES, draw(st.sampled_from(KEY_BYTES_VALUES)))
    if field == "mk_digest":
        at = draw(st.sampled_from((LUKS_OFF_MK_DIGEST, LUKS_OFF_MK_DIGEST_SALT)))
        return (name, "bit", a + at + draw(st.integers(0, 19)), draw(st.integers(0, 7)))
    if field == "mk_digest_iter":
        orig = u32(data, a + LUKS_OFF_MK_DIGEST_ITER)
        v = draw(st.sampled_from((*ITERATION_VALUES, (orig - 1) & 0xFFFFFFFF, orig + 1)))
        return (name, "u32", a + LUKS_OFF_MK_DIGEST_ITER, v)
    if field == "crypt_method":  # 0 none, 1 legacy AES, 2 LUKS
        return ("header", "u32", OFF_CRYPT, draw(st.sampled_from((0, 1, 3, 0xFFFFFFFF))))
    ext = find_extension(data, CRYPTO_HEADER_MAGIC)
    assert ext is not None
    cs = 1 << u32(data, 20)
    eof = -(-len(data) // cs) * cs
    if field == "area_offset":
        v = draw(
            st.sampled_from(
                (
                    0,  # the qcow2 header
                    a + LUKS_SECTOR,  # unaligned, no LUKS header there
                    a + cs,
                    eof,
                    eof - cs,
                    1 << 40,
                    1 << 63,
                    *all_metadata_offsets(regs),
                )
            )
        )
        return ("luks_extension", "u64", ext[0] + 8, v)
    length = h["area_length"]
    v = draw(
        st.sampled_from(
            (
                0,
                LUKS_HEADER_SIZE - 1,
                LUKS_HEADER_SIZE,
                LUKS_SECTOR * (split + 8) - 1,  # slot 0's material cut short
                length - LUKS_SECTOR,
                length + cs,
                eof - a + cs,  # past the end of the file
                1 << 40,
                (1 << 64) - 1,
            )
        )
    )
    return ("luks_extension", "u64", ext[0] + 16, v)


def tame_pbkdf2(data: bytes) -> bytes:
    """The damaged image with every PBKDF2 iteration count an unlock would run that is neither
    small nor above qcowfs's limit moved above the limit (by adding MAX_ITERATIONS): such counts
    (a flipped high bit, a random u32) cost up to 16 s of PBKDF2 in each mount."""
    h = luks_header(data)
    if h is None or h["magic"] != LUKS_MAGIC:  # refused before any PBKDF2 is run
        return data
    buf = bytearray(data)
    for at, count in luks_pbkdf2_iterations(data):
        if FAST_PBKDF2 < count <= MAX_ITERATIONS:
            struct.pack_into(">I", buf, at, count + MAX_ITERATIONS)
    return bytes(buf)


@st.composite
def mutation(draw, data: bytes, regs: dict):
    # the LUKS header and key slots count twice: their damage is what an encrypted base adds (a
    # damaged key material sector, like a flipped salt bit, only makes the passphrase wrong)
    name = draw(st.sampled_from(sorted(regs) + [r for r in LUKS_REGIONS[:2] if r in regs]))
    if name in LUKS_REGIONS and draw(st.integers(0, 3)):  # 3 of 4: field-aware damage
        return draw(luks_mutation(data, regs, name))
    start, end = draw(st.sampled_from(regs[name]))
    n = len(data)
    cs = 1 << u32(data, 20)
    kind = draw(st.sampled_from(("byte", "bit", "u32", "entry", "entry", "entry")))
    if kind == "byte":
        pos = draw(st.integers(start, end - 1))
        return (name, "byte", pos, draw(st.integers(0, 255)))
    if kind == "bit":
        pos = draw(st.integers(start, end - 1))
        return (name, "bit", pos, draw(st.integers(0, 7)))
    if kind == "u32" and end - start >= 4:
        pos = start + 4 * draw(st.integers(0, (end - start) // 4 - 1))
        orig = u32(data, pos)
        value = draw(
            st.one_of(
                st.sampled_from(U32_VALUES),
                st.sampled_from([orig + 1, orig - 1, orig * 2, orig ^ 0x80000000]).map(
                    lambda v: v & 0xFFFFFFFF
                ),
                st.integers(0, 0xFFFFFFFF),
            )
        )
        return (name, "u32", pos, value)
    if end - start < 8:
        pos = draw(st.integers(start, end - 1))
        return (name, "byte", pos, draw(st.integers(0, 255)))
    pos = start + 8 * draw(st.integers(0, (end - start) // 8 - 1))
    orig = u64(data, pos)
    flags = orig & 0xFF00000000000000
    base = orig & OFFSET_MASK
    ek = draw(st.sampled_from(ENTRY_KINDS))
    eof = -(-n // cs) * cs
    if ek == "zero":
        v = 0
    elif ek == "top_bit":
        v = 1 << 63
    elif ek == "copied_toggle":
        v = orig ^ (1 << 63)
    elif ek == "compressed_flag":
        v = orig | (1 << 62)
    elif ek == "zero_flag":
        v = orig | 1
    elif ek == "one":
        v = 1
    elif ek == "all_ones":
        v = (1 << 64) - 1
    elif ek == "past_eof":
        v = flags | (eof + cs * draw(st.integers(0, 4)))
    elif ek == "far_past_eof":
        v = flags | draw(
            st.sampled_from([1 << 40, (1 << 55) - cs, 1 << 55, OFFSET_MASK & ~(cs - 1)])
        )
    elif ek == "beyond_mask":
        v = orig | draw(st.sampled_from([1 << 56, 1 << 57, 1 << 60, 1 << 61]))
    elif ek == "unaligned":
        v = flags | (base + draw(st.sampled_from([1, 8, 512, cs // 2, cs - 512])))
    elif ek == "reserved_low":
        v = orig | (1 << draw(st.integers(1, 8)))
    elif ek == "reserved_high":
        v = orig | (1 << draw(st.integers(56, 61)))
    elif ek == "other_metadata":
        v = flags | draw(st.sampled_from(all_metadata_offsets(regs) or [0]))
    elif ek == "in_file":
        v = flags | (cs * draw(st.integers(0, max(0, n // cs - 1))))
    elif ek == "int64_max":
        v = (1 << 63) - 1
    else:
        v = draw(st.integers(0, (1 << 64) - 1))
    return (name, "u64", pos, v & ((1 << 64) - 1))


def apply_mutations(data: bytes, muts) -> bytes:
    buf = bytearray(data)
    for _region, kind, pos, value in muts:
        if kind == "byte":
            buf[pos] = value
        elif kind == "bit":
            buf[pos] ^= 1 << value
        elif kind == "u16":
            struct.pack_into(">H", buf, pos, value)
        elif kind == "u32":
            struct.pack_into(">I", buf, pos, value)
        elif kind == "bytes":
            buf[pos : pos + len(value)] = value
        else:
            struct.pack_into(">Q", buf, pos, value)
    return bytes(buf)


def describe(muts) -> str:
    parts = []
    for region, kind, pos, value in muts:
        if kind == "bytes":
            v = repr(value[:40]) + (f"... ({len(value)} bytes)" if len(value) > 40 else "")
        elif kind in ("u16", "u32", "u64"):
            v = f"0x{value:x}"
        else:
            v = f"bit {value}" if kind == "bit" else f"0x{value:02x}"
        parts.append(f"{region}: {kind} @ 0x{pos:x} = {v}")
    return "; ".join(parts)


# ----------------------------------------------------------------------------- processes


def start_daemon(
    image: Path, mnt: Path, log: Path, read_only: bool, key: Path | None = None
) -> Mount:
    """`qcowfs mount --foreground [--key-file KEY]` in a subprocess (qcowfs_dev.mounts.Mount,
    refusals allowed: .mounted says); always torn down by stop() (unmount retried while busy,
    then kill, then lazy detach)."""
    return Mount(
        image,
        mnt,
        log,
        read_only=read_only,
        extra=["--key-file", key] if key else [],
        must_mount=False,
        timeout=MOUNT_TIMEOUT,
        env=ENV,
        cwd=ROOT,
    )


def run_qcowfs(*args, timeout=CHECK_TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*QCOWFS, *map(str, args)],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=str(ROOT),
        timeout=timeout,
    )


def in_thread(fn, timeout: float, on_timeout):
    """Run fn() in a thread; if it has not returned after `timeout`, call on_timeout() (which must unblock
    it, e.g. by killing the FUSE daemon) and fail. Returns fn's result or re-raises its exception."""
    box: dict = {}

    def target():
        try:
            box["result"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        on_timeout()
        t.join(30)
        raise AssertionError(
            f"file system operations hung for more than {timeout}s (daemon killed)"
        )
    if "error" in box:
        raise box["error"]
    return box["result"]


def assert_one_line_refusal(d: Mount, what: str) -> None:
    assert d.proc.returncode != 0, f"{what}: mount exited 0 without mounting"
    text = d.stderr + d.stdout
    assert "Traceback" not in text, f"{what}: traceback on refusal:\n{text}"
    assert "Traceback" not in d.log_text(), (
        f"{what}: traceback in the log on refusal:\n{d.log_text()}"
    )
    lines = d.stderr.strip().splitlines()
    assert len(lines) == 1, (
        f"{what}: refusal must be exactly one stderr line, got {len(lines)}:\n{d.stderr}"
    )


# ----------------------------------------------------------------------------- the checks


def read_everything(mnt: Path) -> dict:
    """Read all of disk.raw in 64 KiB chunks and every bitmap status; returns counters.
    Disk reads must give data of the full length or EIO; bitmap files data or any OSError."""
    stats = {"chunks": 0, "eio": 0, "bitmaps": 0, "bitmap_errors": 0}
    disk = mnt / "disk.raw"
    size = os.stat(disk).st_size
    if size <= FULL_READ_LIMIT:
        offsets = range(0, size, CHUNK)
    else:  # a damaged header can claim a huge disk: the start, the end and samples in between
        rnd = random.Random(size)
        offsets = sorted(
            set(
                list(range(0, FULL_READ_LIMIT // 2, CHUNK))
                + [(size - 1) // CHUNK * CHUNK]
                + [rnd.randrange(0, size) // CHUNK * CHUNK for _ in range(256)]
            )
        )
    fd = os.open(disk, os.O_RDONLY)
    try:
        for off in offsets:
            want = min(CHUNK, size - off)
            try:
                got = os.pread(fd, CHUNK, off)
            except OSError as e:
                assert e.errno == errno.EIO, (
                    f"read of disk.raw at {off}: {errno.errorcode.get(e.errno, e.errno)} ({e}), expected data or EIO"
                )
                stats["eio"] += 1
                continue
            assert len(got) == want, (
                f"short read of disk.raw at {off}: {len(got)} bytes instead of {want}"
            )
            stats["chunks"] += 1
    finally:
        os.close(fd)
    try:
        names = os.listdir(mnt / ".bitmaps")
    except OSError:
        stats["bitmap_errors"] += 1
        names = []
    for name in names:
        try:
            text = (mnt / ".bitmaps" / name).read_text()
        except OSError:
            stats["bitmap_errors"] += 1
            continue
        status = json.loads(text)
        assert status.get("name") == name, f"status of bitmap {name!r} names {status.get('name')!r}"
        stats["bitmaps"] += 1
    return stats


def check_read_only_mount(image: Path, work: Path, key: Path | None = None) -> list:
    """(a); returns Hypothesis event labels (event() works only in the test's own thread)."""
    events = []
    before = sha256(image)
    mnt = work / "mnt-ro"
    mnt.mkdir()
    d = start_daemon(image, mnt, work / "ro.log", read_only=True, key=key)
    try:
        if not d.mounted:
            assert_one_line_refusal(d, "read-only mount")
            events.append("ro mount refused")
        else:
            stats = in_thread(lambda: read_everything(mnt), IO_TIMEOUT, lambda: d.stop(force=True))
            events.append("ro mount: some EIO" if stats["eio"] else "ro mount: all data")
            assert d.proc.poll() is None, (
                f"daemon died after the reads (exit {d.proc.returncode}): {d.stderr}\n{d.log_text()}"
            )
            rc = d.stop()
            assert rc == 0, (
                f"read-only daemon exited {rc} at unmount: {d.problem}\n{d.stderr}\n{d.log_text()}"
            )
        log = d.log_text()
        assert "Traceback" not in log and "Traceback" not in d.stderr, (
            f"daemon traceback:\n{d.stderr}\n{log}"
        )
    finally:
        d.stop()
    assert sha256(image) == before, "a read-only mount changed the image"
    return events


def check_check(image: Path) -> list:
    """(b); returns event labels."""
    before = sha256(image)
    p = run_qcowfs("check", "--json", image)
    assert "Traceback" not in p.stdout + p.stderr, (
        f"qcowfs check traceback:\n{p.stdout}\n{p.stderr}"
    )
    assert p.returncode in (0, 1, 2, 3), (
        f"qcowfs check exited {p.returncode}:\n{p.stdout}\n{p.stderr}"
    )
    if p.returncode == 1:
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1, (
            f"qcowfs check exit 1 must print exactly one stderr line:\n{p.stderr}"
        )
        label = "check: cannot open"
    else:
        try:
            json.loads(p.stdout)
        except ValueError:
            raise AssertionError(
                f"qcowfs check --json exited {p.returncode} without JSON:\n{p.stdout}\n{p.stderr}"
            ) from None
        label = f"check: exit {p.returncode}"
    assert sha256(image) == before, "qcowfs check without --repair changed the image"
    return [label]


def do_writes(mnt: Path, writes, verify: bool) -> dict:
    stats = {"ok": 0, "errors": 0}
    disk = mnt / "disk.raw"
    size = os.stat(disk).st_size
    if size == 0:
        return stats
    fd = os.open(disk, os.O_RDWR)
    try:
        done = []
        for frac, length, seed in writes:
            off = min(int(frac * size), max(0, size - length)) if size >= length else 0
            buf = random.Random(seed).randbytes(min(length, size - off))
            try:
                n = os.pwrite(fd, buf, off)
            except OSError as e:
                assert e.errno not in (errno.ENOTCONN, errno.ECONNABORTED), (
                    f"write at {off}: daemon gone ({e})"
                )
                stats["errors"] += 1
                continue
            assert n == len(buf), f"short write at {off}: {n} of {len(buf)}"
            stats["ok"] += 1
            done.append((off, buf))
        try:
            os.fsync(fd)
        except OSError as e:
            assert e.errno not in (errno.ENOTCONN, errno.ECONNABORTED), f"fsync: daemon gone ({e})"
        if verify:
            # later writes win: check each byte range against the last write covering it
            for i, (off, buf) in enumerate(done):
                got = os.pread(fd, len(buf), off)
                expect = bytearray(buf)
                for off2, buf2 in done[i + 1 :]:
                    lo, hi = max(off, off2), min(off + len(buf), off2 + len(buf2))
                    if lo < hi:
                        expect[lo - off : hi - off] = buf2[lo - off2 : hi - off2]
                assert got == bytes(expect), (
                    f"data written at {off} ({len(buf)} bytes) does not read back"
                )
    finally:
        os.close(fd)
    try:
        (mnt / ".bitmaps" / "fuzz").touch()
    except OSError:
        pass
    return stats


def check_read_write_mount(image: Path, work: Path, writes, key: Path | None = None) -> list:
    """(c); returns event labels. An encrypted image's header asking more PBKDF2 iterations
    than a quick unlock is not given to qemu-img (which would run them all: hours for 2^32-1):
    it counts as inconsistent (qcowfs refuses such a header anyway, see tame_pbkdf2)."""
    data = image.read_bytes()
    if key and any(c > FAST_PBKDF2 for _, c in luks_pbkdf2_iterations(data)):
        q = None
    else:
        q = qemu_img_check(image, key)
    hidden_refcounts = refcounts_past_eof(data)
    qemu_consistent = q is not None and q.returncode in (0, 3)
    mnt = work / "mnt-rw"
    mnt.mkdir()
    d = start_daemon(image, mnt, work / "rw.log", read_only=False, key=key)
    try:
        if not d.mounted:
            assert_one_line_refusal(d, "read-write mount")
            return ["rw mount refused"]
        in_thread(
            lambda: do_writes(mnt, writes, verify=qemu_consistent),
            IO_TIMEOUT,
            lambda: d.stop(force=True),
        )
        assert d.proc.poll() is None, (
            f"daemon died after writes (exit {d.proc.returncode}): {d.stderr}\n{d.log_text()}"
        )
        rc = d.stop()
        log = d.log_text()
        assert "Traceback" not in log and "Traceback" not in d.stderr, (
            f"daemon traceback:\n{d.stderr}\n{log}"
        )
        assert not d.problem, f"read-write daemon: {d.problem}\n{log}"
        if q is not None and q.returncode == 0:
            assert rc == 0, (
                f"daemon for an image qemu-img check finds clean exited {rc}: {d.problem}\n{d.stderr}\n{log}"
            )
            after = qemu_img_check(image, key)
            # refcounts of clusters past the end of the file (unseen by qemu-img check) become leaks
            # when the file grows over them, as they would with QEMU; anything else must stay clean
            allowed = (0, 3) if hidden_refcounts else (0,)
            assert after.returncode in allowed, (
                f"qemu-img check found the image clean before a read-write mount and exit {after.returncode} "
                f"after it:\n{after.stdout}{after.stderr}"
            )
    finally:
        d.stop()
    return ["rw mount: writes done", *check_check(image)]


# ----------------------------------------------------------------------------- the test

_started: dict = {}
_runs: dict = {}


# room for shrinking a failure (Hypothesis gives up after 5 minutes), at up to a few seconds per try
@pytest.mark.slow
@pytest.mark.timeout(int(TIME_BUDGET) + 900 if TIME_BUDGET else max(900, 20 * EXAMPLES))
@pytest.mark.parametrize("base", sorted(BUILDERS))
@SETTINGS
@given(data=st.data())
def test_damaged_image(bases, base, data):
    original = bases[base]
    regs = metadata_regions(original)
    muts = data.draw(st.lists(mutation(original, regs), min_size=1, max_size=4), label="mutations")
    rw = data.draw(st.booleans(), label="read-write pass")
    writes = (
        data.draw(
            st.lists(
                st.tuples(
                    st.floats(0, 1),
                    st.sampled_from([1, 512, 4096, 65536, 200_000]),
                    st.integers(0, 1 << 32),
                ),
                min_size=1,
                max_size=4,
            ),
            label="writes",
        )
        if rw
        else []
    )
    if TIME_BUDGET:
        # after the draws: an example that stops drawing early makes Hypothesis report flaky generation
        start = _started.setdefault(base, time.monotonic())
        if time.monotonic() - start > TIME_BUDGET:
            pytest.skip(
                f"{base}: QCOWFS_FUZZ_SECONDS={TIME_BUDGET:g} used up after {_runs.get(base, 0)} examples, "
                f"no failure"
            )
        _runs[base] = _runs.get(base, 0) + 1
    mutated = apply_mutations(original, muts)
    note(f"base {base}: {describe(muts)}")
    if base in ENCRYPTED:
        tamed = tame_pbkdf2(mutated)
        if tamed != mutated:
            note("PBKDF2 iteration counts between 2^20 and qcowfs's limit moved above the limit")
            event("luks: iteration count moved above the limit")
            mutated = tamed
    for region, *_ in muts:
        event(f"region {region}")
    work = Path(tempfile.mkdtemp(prefix=f"fuzz-{base}-"))
    try:
        key = key_file(work) if base in ENCRYPTED else None  # 0600, in the example's directory
        # (a), (b) and (c) each on its own copy, in parallel: the daemons' start-up dominates the time
        jobs = {
            "ro": lambda img, w: check_read_only_mount(img, w, key),
            "check": lambda img, _work: check_check(img),
        }
        if rw:
            jobs["rw"] = lambda img, w: check_read_write_mount(img, w, writes, key)
        for name in jobs:
            (work / f"{name}.qcow2").write_bytes(mutated)
        try:
            with ThreadPoolExecutor(len(jobs)) as pool:
                futures = {
                    name: pool.submit(fn, work / f"{name}.qcow2", work) for name, fn in jobs.items()
                }
            errors = []
            for fut in futures.values():
                if fut.exception() is not None:
                    errors.append(fut.exception())
                else:
                    for label in fut.result():
                        event(label)
            for e in errors[1:]:
                note(f"also failed: {type(e).__name__}: {e}")
            if errors:
                raise errors[0]
        except BaseException:
            if SAVE_DIR:
                os.makedirs(SAVE_DIR, exist_ok=True)
                tag = hashlib.sha256(mutated).hexdigest()[:12]
                dest = Path(SAVE_DIR) / f"{base}-{tag}.qcow2"
                dest.write_bytes(mutated)
                dest.with_suffix(".txt").write_text(
                    f"base {base}: {describe(muts)}\nwrites: {writes}\n"
                )
                note(f"damaged image saved as {dest}")
            raise
    finally:
        for sub in ("mnt-ro", "mnt-rw"):
            detach(work / sub)
        # never rm -r through a live mount (it would remove bitmaps inside the image)
        if not any(os.path.ismount(work / sub) for sub in ("mnt-ro", "mnt-rw")):
            shutil.rmtree(work, ignore_errors=True)


def test_metadata_map_finds_every_region(bases):
    """The fuzzer reaches every kind of metadata the base images hold (a guard for the map above)."""
    want = {
        "v3": {
            "header",
            "extensions",
            "l1",
            "l2",
            "l2_entries",
            "refcount_table",
            "refcount_block",
            "snapshot_table",
            "snapshot_l1",
            "bitmap_directory",
            "bitmap_table",
            "bitmap_data",
        },
        "v2": {
            "header",
            "extensions",
            "l1",
            "l2",
            "l2_entries",
            "refcount_table",
            "refcount_block",
            "snapshot_table",
            "snapshot_l1",
        },
        "extl2": {
            "header",
            "extensions",
            "l1",
            "l2",
            "l2_entries",
            "refcount_table",
            "refcount_block",
            "bitmap_directory",
            "bitmap_table",
            "bitmap_data",
        },
        "luks": {
            "header",
            "extensions",
            "l1",
            "l2",
            "l2_entries",
            "refcount_table",
            "refcount_block",
            "snapshot_table",
            "snapshot_l1",
            "bitmap_directory",
            "bitmap_table",
            "bitmap_data",
            "luks_header",
            "luks_keyslot",
            "luks_key_material",
        },
    }
    for name, data in bases.items():
        regs = metadata_regions(data)
        assert want[name] <= set(regs), f"{name}: missing {want[name] - set(regs)}"
        cs = 1 << u32(data, 20)
        for rs in regs.values():
            for a, b in rs:
                assert 0 <= a < b <= len(data)
        # every L2 table the map found is cluster aligned and inside the file
        assert all(a % cs == 0 and b - a == cs for a, b in regs["l2"])
        if name not in ENCRYPTED:
            assert not set(LUKS_REGIONS) & set(regs), f"{name}: LUKS regions in a plain image"
            continue
        # the LUKS header at the cluster-aligned start of the encryption area, its 8 slots, and
        # QEMU's one active slot (slot 0) with 4000 stripes of a 64-byte key after the header
        ((a, b),) = regs["luks_header"]
        assert a % cs == 0 and b - a == LUKS_HEADER_SIZE and data[a : a + 6] == LUKS_MAGIC
        assert regs["luks_keyslot"] == [(a + 208 + 48 * i, a + 256 + 48 * i) for i in range(8)]
        ((m0, m1),) = regs["luks_key_material"]
        assert m0 == a + LUKS_SECTOR * u32(data, regs["luks_keyslot"][0][0] + 40)
        assert b <= m0 and m1 - m0 == -(-64 * LUKS_STRIPES // LUKS_SECTOR) * LUKS_SECTOR
        area = luks_header(data)
        assert area is not None and m1 <= a + area["area_length"]
        # the base's counts are small: an unlock of an undamaged copy costs milliseconds
        assert all(0 < c <= FAST_PBKDF2 for _, c in luks_pbkdf2_iterations(data))


def test_pbkdf2_counts_stay_small_or_above_the_limit(bases):
    """tame_pbkdf2 (a guard for the run time): counts an unlock would run between 2^20 and the
    limit move above it; small ones, counts above the limit and inactive slots' stay."""
    data = bases["luks"]
    (digest_at, _), (slot_at, _) = luks_pbkdf2_iterations(data)
    inactive_at = metadata_regions(data)["luks_keyslot"][1][0] + LUKS_SLOT_OFF_ITERATIONS
    for digest, slot, moved in (
        (1 << 25, MAX_ITERATIONS, True),
        (FAST_PBKDF2 + 1, 5, True),
        (FAST_PBKDF2, MAX_ITERATIONS + 1, False),
        (0, 0xFFFFFFFF, False),
    ):
        muts = [
            ("luks_header", "u32", digest_at, digest),
            ("luks_keyslot", "u32", slot_at, slot),
            ("luks_keyslot", "u32", inactive_at, 1 << 25),
        ]
        tamed = tame_pbkdf2(apply_mutations(data, muts))
        counts = [c for _, c in luks_pbkdf2_iterations(tamed)]
        assert all(c <= FAST_PBKDF2 or c > MAX_ITERATIONS for c in counts), counts
        assert (counts != [digest, slot]) == moved
        assert u32(tamed, inactive_at) == 1 << 25
    assert all(tame_pbkdf2(bases[name]) == bases[name] for name in bases)
