"""Raw qcow2 probes: header fields, header extensions, L1/L2 entries, refcounts and the bitmap
directory read (and, to damage images on purpose, written) with struct, straight from QEMU's
specification (docs/interop/qcow2.txt), independently of qcowfs.

Readers take the image's bytes (`data`) or a path; the u16/u32/u64 readers return 0 outside the
data, so that damaged images never make a probe raise.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, Optional, Union

from .proc import StrPath

#: what the readers take: the image's bytes, or its path
Source = Union[bytes, bytearray, memoryview, StrPath]

# ----------------------------------------------------------------------------- the format
MAGIC = b"QFI\xfb"

# Header field offsets ("Header").
OFF_VERSION = 4
OFF_BACKING_OFFSET = 8
OFF_BACKING_SIZE = 16
OFF_CLUSTER_BITS = 20
OFF_SIZE = 24
OFF_CRYPT = 32
OFF_L1_SIZE = 36
OFF_L1_OFFSET = 40
OFF_REFTABLE_OFFSET = 48
OFF_REFTABLE_CLUSTERS = 56
OFF_NB_SNAPSHOTS = 60
OFF_SNAPSHOTS_OFFSET = 64
OFF_INCOMPAT = 72
OFF_COMPAT = 80
OFF_AUTOCLEAR = 88
OFF_REFCOUNT_ORDER = 96
OFF_HEADER_LENGTH = 100
OFF_COMPRESSION_TYPE = 104

V2_HEADER_LENGTH = 72

# incompatible feature bits
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
# autoclear feature bits
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1

# header extension magics
END_MAGIC = 0
BACKING_FORMAT_MAGIC = 0xE2792ACA
FEATURE_TABLE_MAGIC = 0x6803F857
BITMAPS_MAGIC = 0x23852875
EXTERNAL_DATA_FILE_MAGIC = 0x44415441
CRYPTO_HEADER_MAGIC = 0x0537BE77  # "Full disk encryption header pointer": be64 offset, be64 length

# L1/L2/bitmap table entries: the host offset bits, and the flags around them
OFFSET_MASK = 0x00FFFFFFFFFFFE00
REFTABLE_OFFSET_MASK = ~0x1FF & ((1 << 64) - 1)
COPIED = 1 << 63
COMPRESSED = 1 << 62
ZERO = 1 << 0

# bitmap directory entry flags
BME_IN_USE = 1 << 0
BME_AUTO = 1 << 1

# the LUKS1 header (cryptsetup's on-disk format 1.2; QEMU's crypto/block-luks.c) at the start of
# the encryption area: big-endian fields at these offsets from the area's start
CRYPT_LUKS = 2  # crypt_method
LUKS_MAGIC = b"LUKS\xba\xbe"
LUKS_OFF_VERSION = 6  # u16
LUKS_OFF_CIPHER_NAME = 8  # 32-byte NUL-padded strings
LUKS_OFF_CIPHER_MODE = 40
LUKS_OFF_HASH_SPEC = 72
LUKS_STRING_SIZE = 32
LUKS_OFF_PAYLOAD_OFFSET = 104  # u32, sectors
LUKS_OFF_KEY_BYTES = 108  # u32
LUKS_OFF_MK_DIGEST = 112  # 20 bytes
LUKS_OFF_MK_DIGEST_SALT = 132  # 32 bytes
LUKS_OFF_MK_DIGEST_ITER = 164  # u32
LUKS_OFF_UUID = 168  # 40 bytes
LUKS_OFF_SLOTS = 208
LUKS_SLOT_SIZE = 48
LUKS_NUM_SLOTS = 8
LUKS_HEADER_SIZE = LUKS_OFF_SLOTS + LUKS_NUM_SLOTS * LUKS_SLOT_SIZE  # 592
# in a key slot: active u32, iterations u32, salt 32 bytes, key material offset u32 (sectors from
# the area's start), stripes u32
LUKS_SLOT_OFF_ACTIVE = 0
LUKS_SLOT_OFF_ITERATIONS = 4
LUKS_SLOT_OFF_SALT = 8
LUKS_SLOT_OFF_KEY_OFFSET = 40
LUKS_SLOT_OFF_STRIPES = 44
LUKS_SLOT_ENABLED = 0x00AC71F3
LUKS_SLOT_DISABLED = 0x0000DEAD
LUKS_STRIPES = 4000
LUKS_SECTOR = 512


# ----------------------------------------------------------------------------- bytes
def u16(b: bytes, o: int) -> int:
    return struct.unpack_from(">H", b, o)[0] if 0 <= o and o + 2 <= len(b) else 0


def u32(b: bytes, o: int) -> int:
    return struct.unpack_from(">I", b, o)[0] if 0 <= o and o + 4 <= len(b) else 0


def u64(b: bytes, o: int) -> int:
    return struct.unpack_from(">Q", b, o)[0] if 0 <= o and o + 8 <= len(b) else 0


def _bytes(src: Source, limit: int | None = None) -> bytes:
    if isinstance(src, (bytes, bytearray, memoryview)):
        return bytes(src) if limit is None else bytes(src[:limit])
    with open(src, "rb") as f:
        return f.read() if limit is None else f.read(limit)


def read_u64(path: StrPath, off: int) -> int:
    with open(path, "rb") as f:
        f.seek(off)
        return struct.unpack(">Q", f.read(8))[0]


def read_header_field(path: StrPath, offset: int, size: int) -> int:
    """A big-endian header field of `size` bytes at `offset`."""
    with open(path, "rb") as f:
        f.seek(offset)
        return int.from_bytes(f.read(size), "big")


# ----------------------------------------------------------------------------- header
def header(src: Source) -> dict[str, Any]:
    """The header fields by their specification names (version 2: no incompat/compat/autoclear
    bits, refcount_order 4, header_length 72)."""
    h = _bytes(src, 112)
    version = u32(h, OFF_VERSION)
    v3 = version >= 3
    cluster_bits = u32(h, OFF_CLUSTER_BITS)
    return {
        "magic": h[:4],
        "version": version,
        "backing_file_offset": u64(h, OFF_BACKING_OFFSET),
        "backing_file_size": u32(h, OFF_BACKING_SIZE),
        "cluster_bits": cluster_bits,
        "cluster_size": 1 << cluster_bits if cluster_bits < 64 else 0,
        "size": u64(h, OFF_SIZE),
        "crypt_method": u32(h, OFF_CRYPT),
        "l1_size": u32(h, OFF_L1_SIZE),
        "l1_offset": u64(h, OFF_L1_OFFSET),
        "refcount_table_offset": u64(h, OFF_REFTABLE_OFFSET),
        "refcount_table_clusters": u32(h, OFF_REFTABLE_CLUSTERS),
        "nb_snapshots": u32(h, OFF_NB_SNAPSHOTS),
        "snapshots_offset": u64(h, OFF_SNAPSHOTS_OFFSET),
        "incompat": u64(h, OFF_INCOMPAT) if v3 else 0,
        "compat": u64(h, OFF_COMPAT) if v3 else 0,
        "autoclear": u64(h, OFF_AUTOCLEAR) if v3 else 0,
        "refcount_order": u32(h, OFF_REFCOUNT_ORDER) if v3 else 4,
        "header_length": u32(h, OFF_HEADER_LENGTH) if v3 else V2_HEADER_LENGTH,
        "compression_type": h[OFF_COMPRESSION_TYPE]
        if v3 and u32(h, OFF_HEADER_LENGTH) > OFF_COMPRESSION_TYPE and len(h) > OFF_COMPRESSION_TYPE
        else 0,
    }


def header_length(src: Source) -> int:
    return header(src)["header_length"]


def header_dirty(path: StrPath) -> bool:
    """The dirty bit (lazy refcounts: refcounts may be stale) is set."""
    return bool(read_header_field(path, OFF_INCOMPAT, 8) & INCOMPAT_DIRTY)


def extensions(data: bytes) -> list:
    """[(magic, offset, length)] of the header extensions, in order, up to the end marker (not
    included); offset is where the extension's 8-byte (magic, length) header starts."""
    version = u32(data, OFF_VERSION)
    off = u32(data, OFF_HEADER_LENGTH) if version >= 3 else V2_HEADER_LENGTH
    cb = u32(data, OFF_CLUSTER_BITS)
    end = min(1 << cb if cb < 32 else len(data), len(data))
    out = []
    while off + 8 <= end:
        magic, length = struct.unpack_from(">II", data, off)
        if magic == END_MAGIC:
            break
        out.append((magic, off, length))
        off += 8 + (length + 7) // 8 * 8
    return out


def extensions_end(data: bytes) -> int:
    """Where the end-of-extensions marker is (the offset just after the last extension)."""
    exts = extensions(data)
    if not exts:
        return u32(data, OFF_HEADER_LENGTH) if u32(data, OFF_VERSION) >= 3 else V2_HEADER_LENGTH
    _, off, length = exts[-1]
    return off + 8 + (length + 7) // 8 * 8


def find_extension(data: bytes, magic: int) -> Optional[tuple[int, int]]:
    """(offset, length) of the first extension with this magic, or None."""
    return next(((off, length) for m, off, length in extensions(data) if m == magic), None)


# ----------------------------------------------------------------------------- L1 / L2
def l1_entries(data: bytes) -> list:
    h = header(data)
    return [u64(data, h["l1_offset"] + 8 * i) for i in range(h["l1_size"])]


def l2_entry_offset(data: bytes, guest_cluster: int) -> int:
    """File offset of the L2 entry that maps guest cluster `guest_cluster` (its L2 table allocated)."""
    h = header(data)
    cs = h["cluster_size"]
    entry = 16 if h["incompat"] & INCOMPAT_EXTL2 else 8
    per_table = cs // entry
    l2 = u64(data, h["l1_offset"] + 8 * (guest_cluster // per_table)) & OFFSET_MASK
    assert l2, f"no L2 table for guest cluster {guest_cluster}"
    return l2 + entry * (guest_cluster % per_table)


def first_l2_entry(path: Source) -> tuple[int, int]:
    """(file offset of L2 entry 0 of L1 entry 0, its value)."""
    data = _bytes(path)
    off = l2_entry_offset(data, 0)
    return off, u64(data, off)


# ----------------------------------------------------------------------------- refcounts
def refcount_entry_offset(path: Source, cluster: int) -> int:
    """File offset of a host cluster's refcount entry (byte-wide refcounts: 8 to 64 bits)."""
    data = _bytes(path)
    h = header(data)
    order = h["refcount_order"]
    assert order >= 3, (
        f"refcount_order {order}: refcounts narrower than a byte have no offset of their own"
    )
    width = 1 << (order - 3)
    per_block = h["cluster_size"] // width
    block = (
        u64(data, h["refcount_table_offset"] + 8 * (cluster // per_block)) & REFTABLE_OFFSET_MASK
    )
    return block + width * (cluster % per_block)


def refcount(path: StrPath, cluster: int) -> int:
    data = _bytes(path)
    order = header(data)["refcount_order"]
    off = refcount_entry_offset(data, cluster)
    return int.from_bytes(data[off : off + (1 << (order - 3))], "big")


def set_refcount(path: StrPath, cluster: int, value: int) -> None:
    data = _bytes(path)
    order = header(data)["refcount_order"]
    with open(path, "r+b") as f:
        f.seek(refcount_entry_offset(data, cluster))
        f.write(value.to_bytes(1 << (order - 3), "big"))


# ----------------------------------------------------------------------------- bitmaps
def bitmaps_extension(data: bytes) -> Optional[dict[str, int]]:
    """{"nb_bitmaps", "directory_size", "directory_offset"} of the bitmaps extension, or None."""
    found = find_extension(data, BITMAPS_MAGIC)
    if found is None or found[1] < 24:
        return None
    off = found[0] + 8
    return {
        "nb_bitmaps": u32(data, off),
        "directory_size": u64(data, off + 8),
        "directory_offset": u64(data, off + 16),
    }


def bitmap_directory(data: bytes) -> list:
    """The bitmap directory entries: [{"name", "table_offset", "table_size", "flags", "in_use",
    "auto", "type", "granularity_bits", "granularity", "entry_offset"}]."""
    ext = bitmaps_extension(data)
    if ext is None:
        return []
    out = []
    o = ext["directory_offset"]
    for _ in range(ext["nb_bitmaps"]):
        name_size, extra = u16(data, o + 18), u32(data, o + 20)
        flags = u32(data, o + 12)
        gbits = data[o + 17] if o + 17 < len(data) else 0
        name_at = o + 24 + extra
        out.append(
            {
                "name": data[name_at : name_at + name_size].decode(errors="replace"),
                "table_offset": u64(data, o),
                "table_size": u32(data, o + 8),
                "flags": flags,
                "in_use": bool(flags & BME_IN_USE),
                "auto": bool(flags & BME_AUTO),
                "type": data[o + 16] if o + 16 < len(data) else 0,
                "granularity_bits": gbits,
                "granularity": 1 << gbits,
                "entry_offset": o,
            }
        )
        o = (name_at + name_size + 7) // 8 * 8
    return out


# ----------------------------------------------------------------------------- LUKS
def luks_area(data: bytes) -> Optional[tuple[int, int]]:
    """(offset, length) of the encryption area the 0x0537be77 extension points at (whatever
    crypt_method says), or None without that extension."""
    found = find_extension(data, CRYPTO_HEADER_MAGIC)
    if found is None or found[1] < 16:
        return None
    return u64(data, found[0] + 8), u64(data, found[0] + 16)


def luks_header(data: bytes) -> Optional[dict[str, Any]]:
    """The LUKS1 header's fields, read with struct at the area's start ("area_offset",
    "area_length", "magic", "version", "cipher_name", "cipher_mode", "hash_spec",
    "payload_offset" and "key_bytes" as stored (sectors, bytes), "mk_digest_iter", and "slots":
    [{"at", "active", "iterations", "key_offset" (sectors), "stripes"}]), or None without the
    extension. Nothing is validated: a damaged header reads as what it holds."""
    area = luks_area(data)
    if area is None:
        return None
    a, length = area

    def text(off: int, size: int) -> bytes:
        return bytes(data[a + off : a + off + size]).split(b"\0", 1)[0]

    slots = []
    for i in range(LUKS_NUM_SLOTS):
        at = a + LUKS_OFF_SLOTS + LUKS_SLOT_SIZE * i
        slots.append(
            {
                "at": at,
                "active": u32(data, at + LUKS_SLOT_OFF_ACTIVE),
                "iterations": u32(data, at + LUKS_SLOT_OFF_ITERATIONS),
                "key_offset": u32(data, at + LUKS_SLOT_OFF_KEY_OFFSET),
                "stripes": u32(data, at + LUKS_SLOT_OFF_STRIPES),
            }
        )
    return {
        "area_offset": a,
        "area_length": length,
        "magic": bytes(data[a : a + 6]),
        "version": u16(data, a + LUKS_OFF_VERSION),
        "cipher_name": text(LUKS_OFF_CIPHER_NAME, LUKS_STRING_SIZE),
        "cipher_mode": text(LUKS_OFF_CIPHER_MODE, LUKS_STRING_SIZE),
        "hash_spec": text(LUKS_OFF_HASH_SPEC, LUKS_STRING_SIZE),
        "payload_offset": u32(data, a + LUKS_OFF_PAYLOAD_OFFSET),
        "key_bytes": u32(data, a + LUKS_OFF_KEY_BYTES),
        "mk_digest_iter": u32(data, a + LUKS_OFF_MK_DIGEST_ITER),
        "slots": slots,
    }


def luks_pbkdf2_iterations(data: bytes) -> list[tuple[int, int]]:
    """[(file offset, count)] of the PBKDF2 iteration counts an unlock would run: the master key
    digest's and every active key slot's (empty without a LUKS header pointer)."""
    h = luks_header(data)
    if h is None:
        return []
    out = [(h["area_offset"] + LUKS_OFF_MK_DIGEST_ITER, h["mk_digest_iter"])]
    for s in h["slots"]:
        if s["active"] == LUKS_SLOT_ENABLED:
            out.append((s["at"] + LUKS_SLOT_OFF_ITERATIONS, s["iterations"]))
    return out


# ----------------------------------------------------------------------------- writing (damage on purpose)
def write_u64(path: StrPath, off: int, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(struct.pack(">Q", value))


def patch(path: StrPath, fmt: str, offset: int, *values: Any) -> None:
    """struct.pack_into on the image bytes, written back in place."""
    p = Path(path)
    data = bytearray(p.read_bytes())
    struct.pack_into(fmt, data, offset, *values)
    p.write_bytes(bytes(data))


def set_incompat(path: StrPath, bits: int) -> None:
    """OR bits into the incompatible features."""
    p = Path(path)
    data = bytearray(p.read_bytes())
    (cur,) = struct.unpack_from(">Q", data, OFF_INCOMPAT)
    struct.pack_into(">Q", data, OFF_INCOMPAT, cur | bits)
    p.write_bytes(bytes(data))


# ----------------------------------------------------------------------------- every metadata region
def metadata_regions(data: bytes) -> dict:
    """region name -> sorted list of [start, end) byte ranges inside the file, read from the header
    of a valid image without any help from qcowfs. An encrypted image's LUKS area adds
    "luks_header" (its 592 bytes), "luks_keyslot" (one 48-byte range per slot) and
    "luks_key_material" (the active slots' anti-forensic key material)."""
    n = len(data)
    version = u32(data, 4)
    cb = u32(data, 20)
    cs = 1 << cb
    hl = u32(data, 100) if version >= 3 else 72
    l2_entry = 16 if version >= 3 and u64(data, 72) & (1 << 4) else 8
    regs: dict = {
        k: []
        for k in (
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
        )
    }
    regs["header"].append((0, hl))

    # header extensions, up to and including the end marker
    off = hl
    bitmaps_ext = None
    while off + 8 <= min(cs, n):
        magic, length = struct.unpack_from(">II", data, off)
        if magic == 0:
            off += 8
            break
        if magic == BITMAPS_MAGIC and length >= 24:
            bitmaps_ext = (u32(data, off + 8), u64(data, off + 16), u64(data, off + 24))
        off += 8 + (length + 7) // 8 * 8
    regs["extensions"].append((hl, off))

    def l1_and_l2(l1_off: int, l1_size: int, l1_name: str) -> None:
        regs[l1_name].append((l1_off, l1_off + 8 * l1_size))
        for i in range(l1_size):
            e = u64(data, l1_off + 8 * i) & OFFSET_MASK
            if e and (e, e + cs) not in regs["l2"]:
                regs["l2"].append((e, e + cs))
                for j in range(
                    0, cs, l2_entry
                ):  # the entries in use, so that mutations hit them often
                    if any(data[e + j : e + j + l2_entry]):
                        regs["l2_entries"].append((e + j, e + j + l2_entry))

    l1_and_l2(u64(data, 40), u32(data, 36), "l1")

    # refcount table (the used part) and refcount blocks (the part covering the file)
    refcount_order = u32(data, 96) if version >= 3 else 4
    rt_off, rt_clusters = u64(data, 48), u32(data, 56)
    used = 0
    per_block = cs * 8 >> refcount_order  # clusters one refcount block covers
    file_clusters = -(-n // cs)
    for i in range(rt_clusters * cs // 8):
        e = u64(data, rt_off + 8 * i) & ~0x1FF
        if e:
            used = i + 1
            covered = min(per_block, max(1, file_clusters - i * per_block))
            nbytes = -(-(covered << refcount_order) // 8)
            regs["refcount_block"].append((e, e + -(-nbytes // 8) * 8))
    regs["refcount_table"].append((rt_off, rt_off + max(64, 8 * used)))

    # snapshot table and the snapshots' L1 (and L2) tables
    nb_snap, snap_off = u32(data, 60), u64(data, 64)
    o = snap_off
    for _ in range(nb_snap):
        s_l1_off, s_l1_size = u64(data, o), u32(data, o + 8)
        id_len, name_len = u16(data, o + 12), u16(data, o + 14)
        extra = u32(data, o + 36)
        l1_and_l2(s_l1_off, s_l1_size, "snapshot_l1")
        o += 40 + extra + id_len + name_len
        o = (o + 7) // 8 * 8
    if nb_snap:
        regs["snapshot_table"].append((snap_off, o))

    # bitmap directory, tables and data clusters
    if bitmaps_ext is not None:
        nb, dsize, doff = bitmaps_ext
        regs["bitmap_directory"].append((doff, doff + dsize))
        o = doff
        for _ in range(nb):
            t_off, t_size = u64(data, o), u32(data, o + 8)
            name_size, extra = u16(data, o + 18), u32(data, o + 20)
            regs["bitmap_table"].append((t_off, t_off + 8 * t_size))
            for j in range(t_size):
                e = u64(data, t_off + 8 * j) & OFFSET_MASK
                if e > 1:
                    regs["bitmap_data"].append((e, e + cs))
            o += 24 + extra + name_size
            o = (o + 7) // 8 * 8

    # the LUKS header, its 8 key slots, and the key material of the active slots (what a
    # passphrase is tried against); offsets in the header count from the area's start
    luks = luks_header(data)
    if luks is not None:
        a = luks["area_offset"]
        regs["luks_header"].append((a, a + LUKS_HEADER_SIZE))
        material = -(-luks["key_bytes"] * LUKS_STRIPES // LUKS_SECTOR) * LUKS_SECTOR
        for s in luks["slots"]:
            regs["luks_keyslot"].append((s["at"], s["at"] + LUKS_SLOT_SIZE))
            if s["active"] == LUKS_SLOT_ENABLED and material:
                start = a + LUKS_SECTOR * s["key_offset"]
                regs["luks_key_material"].append((start, start + material))

    out = {}
    for k, rs in regs.items():
        clipped = sorted({(a, min(b, n)) for a, b in rs if 0 <= a < min(b, n)})
        if clipped:
            out[k] = clipped
    return out


def refcounts_past_eof(data: bytes) -> bool:
    """Does a refcount block give a non-zero refcount to a cluster past the end of the file? qemu-img
    check does not look there, but such a cluster becomes a leak as soon as the file grows over it."""
    version = u32(data, 4)
    cluster_bits = u32(data, 20)
    order = u32(data, 96) if version >= 3 else 4
    if not 9 <= cluster_bits <= 21 or order > 6:
        return False  # an image qcowfs refuses anyway (and 1 << 4e9 would eat the machine)
    cs = 1 << cluster_bits
    bits = 1 << order
    per_block = cs * 8 // bits
    file_clusters = -(-len(data) // cs)
    rt_off, rt_clusters = u64(data, 48), u32(data, 56)
    for i in range(min(rt_clusters * cs, max(0, len(data) - rt_off)) // 8):
        if (i + 1) * per_block <= file_clusters:
            continue  # this block only covers clusters inside the file
        blk = u64(data, rt_off + 8 * i) & ~0x1FF
        if not blk or blk + cs > len(data):
            continue
        # entries for clusters at or past the end of the file; a partly covered first byte
        # (sub-byte widths) counts too, which errs on the side of "there is one"
        k0 = max(0, file_clusters - i * per_block)
        if any(data[blk + k0 * bits // 8 : blk + cs]):
            return True
    return False


def all_metadata_offsets(regs: dict) -> list:
    """The start of every metadata region (values a damaged table entry may point at)."""
    return sorted({a for rs in regs.values() for a, _ in rs if a})
