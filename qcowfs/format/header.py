"""The qcow2 on-disk format: declared structures, constants and validation. No I/O.

The authority is QEMU's docs/interop/qcow2.txt ("Header", "Header extensions",
"Cluster mapping", "Bitmaps"); the validation rules follow qcow2_do_open() in
QEMU's block/qcow2.c so that qcowfs refuses exactly the images QEMU refuses.
Table bodies (L1, L2, refcount blocks, bitmap tables) are decoded elsewhere with
array + byteswap, which is hundreds of times faster than a construct Array.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import construct as cs

from ..errors import FormatError, UnsupportedFeature

MAGIC = b"QFI\xfb"

# --- incompatible / compatible / autoclear feature bits (qcow2.txt "Header") ---
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = (
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2
)
INCOMPAT_NAMES = {
    0: "dirty bit",
    1: "corrupt bit",
    2: "external data file",
    3: "compression type",
    4: "extended L2 entries",
}

COMPAT_LAZY_REFCOUNTS = 1 << 0
COMPAT_NAMES = {0: "lazy refcounts"}

AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1
AUTOCLEAR_KNOWN = AUTOCLEAR_BITMAPS | AUTOCLEAR_DATA_FILE_RAW
AUTOCLEAR_NAMES = {0: "bitmaps", 1: "raw external data"}

COMPRESSION_ZLIB = 0
COMPRESSION_ZSTD = 1
COMPRESSION_NAMES = {COMPRESSION_ZLIB: "zlib", COMPRESSION_ZSTD: "zstd"}

# --- header extension magics (qcow2.txt "Header extensions") ---
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

# --- table entry masks (qcow2.txt "Cluster mapping") ---
OFFSET_MASK = 0x00FFFFFFFFFFFE00
L1E_RESERVED_MASK = 0x7F000000000001FF
L2E_RESERVED_MASK = 0x3F000000000001FE
REFT_RESERVED_MASK = 0x1FF
QCOW_OFLAG_COPIED = 1 << 63
QCOW_OFLAG_COMPRESSED = 1 << 62
QCOW_OFLAG_ZERO = 1 << 0

# --- limits QEMU enforces (block/qcow2.h) ---
MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
MAX_L1_SIZE = 32 * 1024 * 1024  # bytes
MAX_REFTABLE_SIZE = 8 * 1024 * 1024  # bytes
MAX_BACKING_NAME = 1023
INT64_MAX = (1 << 63) - 1
MAX_SNAPSHOTS = 65536
V2_HEADER_LENGTH = 72
V3_MIN_HEADER_LENGTH = 104
V3_HEADER_LENGTH = 112  # what QEMU writes: 104 + compression_type byte + 7 padding

# --- bitmaps (qcow2.txt "Bitmaps") ---
BITMAPS_EXT_SIZE = 24
MAX_BITMAPS = 65535
MAX_BITMAP_NAME = 1023
MAX_BITMAP_DIRECTORY_SIZE = 1024 * MAX_BITMAPS
BME_FLAG_IN_USE = 1 << 0
BME_FLAG_AUTO = 1 << 1
BME_FLAG_EXTRA_DATA_COMPATIBLE = 1 << 2
BME_RESERVED_FLAGS = (
    ~(BME_FLAG_IN_USE | BME_FLAG_AUTO | BME_FLAG_EXTRA_DATA_COMPATIBLE) & 0xFFFFFFFF
)
BME_TABLE_ENTRY_OFFSET_MASK = 0x00FFFFFFFFFFFE00
BME_TABLE_ENTRY_FLAG_ALL_ONES = 1
BME_TABLE_ENTRY_RESERVED_MASK = 0xFF000000000001FE
BITMAP_TYPE_DIRTY_TRACKING = 1
MIN_BITMAP_GRANULARITY_BITS = 9
MAX_BITMAP_GRANULARITY_BITS = 31
# QEMU caps a bitmap's table at 64 MiB worth of 8-byte entries (BME_MAX_TABLE_SIZE)
BME_MAX_TABLE_SIZE = 0x8000000
BME_MAX_PHYS_SIZE = 0x20000000  # 512 MiB of bitmap data


# The fixed part of the header, declared per qcow2.txt "Header" (all big-endian).
HeaderV2 = cs.Struct(
    "magic" / cs.Bytes(4),
    "version" / cs.Int32ub,
    "backing_file_offset" / cs.Int64ub,
    "backing_file_size" / cs.Int32ub,
    "cluster_bits" / cs.Int32ub,
    "size" / cs.Int64ub,
    "crypt_method" / cs.Int32ub,
    "l1_size" / cs.Int32ub,
    "l1_table_offset" / cs.Int64ub,
    "refcount_table_offset" / cs.Int64ub,
    "refcount_table_clusters" / cs.Int32ub,
    "nb_snapshots" / cs.Int32ub,
    "snapshots_offset" / cs.Int64ub,
)
# Version 3 adds these fields at byte 72 (qcow2.txt "Header", bytes 72-103).
HeaderV3Tail = cs.Struct(
    "incompatible_features" / cs.Int64ub,
    "compatible_features" / cs.Int64ub,
    "autoclear_features" / cs.Int64ub,
    "refcount_order" / cs.Int32ub,
    "header_length" / cs.Int32ub,
)


def _field_offsets(struct: cs.Struct, base: int = 0) -> dict:
    """Byte offset of every field of a fixed-size construct Struct."""
    out, pos = {}, base
    for sc in struct.subcons:
        out[sc.name] = pos
        pos += sc.sizeof()
    return out


#: byte offset of each header field, for updating one field in place (named, never bare numbers)
HEADER_FIELD_OFFSETS = {
    **_field_offsets(HeaderV2),
    **_field_offsets(HeaderV3Tail, V2_HEADER_LENGTH),
}

ExtensionHeader = cs.Struct("magic" / cs.Int32ub, "length" / cs.Int32ub)
# Feature name table entry (qcow2.txt "Feature name table"): 48 bytes.
FeatureNameEntry = cs.Struct("type" / cs.Int8ub, "bit" / cs.Int8ub, "name" / cs.Bytes(46))
# Bitmaps extension data (qcow2.txt "Bitmaps extension"): exactly 24 bytes.
BitmapsExtension = cs.Struct(
    "nb_bitmaps" / cs.Int32ub,
    "reserved32" / cs.Int32ub,
    "bitmap_directory_size" / cs.Int64ub,
    "bitmap_directory_offset" / cs.Int64ub,
)
# Bitmap directory entry header (qcow2.txt "Bitmap directory"), followed by
# extra data, the name and zero padding to a multiple of 8.
BitmapDirEntryHeader = cs.Struct(
    "bitmap_table_offset" / cs.Int64ub,
    "bitmap_table_size" / cs.Int32ub,
    "flags" / cs.Int32ub,
    "type" / cs.Int8ub,
    "granularity_bits" / cs.Int8ub,
    "name_size" / cs.Int16ub,
    "extra_data_size" / cs.Int32ub,
)
BITMAP_DIR_ENTRY_HEADER_SIZE = 24


def align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


def div_round_up(a: int, b: int) -> int:
    return -(-a // b)


@dataclasses.dataclass
class Extension:
    magic: int
    data: bytes


@dataclasses.dataclass
class Header:
    """A parsed, validated qcow2 header with its extensions and backing name."""

    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = V2_HEADER_LENGTH
    compression_type: int = COMPRESSION_ZLIB
    #: header bytes between the known fields and header_length, kept verbatim
    unknown_tail: bytes = b""
    #: every extension in file order (unknown ones are rewritten verbatim)
    extensions: list = dataclasses.field(default_factory=list)
    backing_file: Optional[str] = None
    backing_format: Optional[str] = None
    data_file: Optional[str] = None
    feature_names: dict = dataclasses.field(default_factory=dict)
    bitmaps_ext: Optional[dict] = None
    #: (offset, length) of the full disk encryption header (qcow2.txt, crypt_method 2)
    crypto_header: Optional[tuple[int, int]] = None
    #: a bitmaps extension found with the autoclear bit clear (to be dropped on a read-write open)
    stale_bitmaps_ext: Optional[dict] = None

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_EXTL2)

    @property
    def l2_entry_size(self) -> int:
        return 16 if self.extended_l2 else 8

    @property
    def l2_entries(self) -> int:
        """Guest clusters mapped by one L2 table."""
        return self.cluster_size // self.l2_entry_size

    @property
    def has_data_file(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_DATA_FILE)

    @property
    def data_file_raw(self) -> bool:
        return bool(self.autoclear_features & AUTOCLEAR_DATA_FILE_RAW)

    @property
    def lazy_refcounts(self) -> bool:
        return bool(self.compatible_features & COMPAT_LAZY_REFCOUNTS)

    @property
    def corrupt(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_CORRUPT)

    @property
    def dirty(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_DIRTY)

    def feature_name(self, kind: int, bit: int) -> str:
        """A feature's name from the image's own table, else from ours (kind 0 incompat, 1 compat, 2 autoclear)."""
        name = self.feature_names.get((kind, bit))
        if name:
            return name
        known = (INCOMPAT_NAMES, COMPAT_NAMES, AUTOCLEAR_NAMES)[kind]
        return known.get(bit, f"unknown feature bit {bit}")

    # ------------------------------------------------------------------ building
    def build(self) -> bytes:
        """Serialise header + extensions + backing name, as QEMU's qcow2_update_header lays them out.

        Known extensions are regenerated from the fields; unknown ones are kept
        verbatim (qcow2.txt: unknown extensions must be preserved on rewrite).
        Raises FormatError if it would not fit in cluster 0.
        """
        out = bytearray()
        if self.version >= 3:
            fixed_len = self.header_length
        else:
            fixed_len = V2_HEADER_LENGTH
        out += b"\0" * fixed_len
        # extensions
        ext_bytes = bytearray()

        def add_ext(magic: int, data: bytes) -> None:
            ext_bytes.extend(ExtensionHeader.build(dict(magic=magic, length=len(data))))
            ext_bytes.extend(data)
            ext_bytes.extend(b"\0" * (align_up(len(data), 8) - len(data)))

        if self.data_file is not None:
            add_ext(EXT_DATA_FILE, self.data_file.encode())
        if self.backing_format is not None and self.backing_file is not None:
            add_ext(EXT_BACKING_FORMAT, self.backing_format.encode())
        for ext in self.extensions:
            if ext.magic in (EXT_DATA_FILE, EXT_BACKING_FORMAT, EXT_BITMAPS, EXT_END):
                continue
            add_ext(ext.magic, ext.data)
        if self.bitmaps_ext is not None and self.version >= 3:
            add_ext(EXT_BITMAPS, BitmapsExtension.build(dict(self.bitmaps_ext, reserved32=0)))
        ext_bytes += b"\0" * 8  # end of extensions
        out += ext_bytes
        if self.backing_file is not None:
            name = self.backing_file.encode()
            self.backing_file_offset = len(out)
            self.backing_file_size = len(name)
            out += name
        else:
            self.backing_file_offset = 0
            self.backing_file_size = 0
        if len(out) > self.cluster_size:
            raise FormatError(
                "header, extensions and backing file name do not fit in the first cluster"
            )
        fixed = HeaderV2.build(
            dict(
                magic=MAGIC,
                version=self.version,
                backing_file_offset=self.backing_file_offset,
                backing_file_size=self.backing_file_size,
                cluster_bits=self.cluster_bits,
                size=self.size,
                crypt_method=self.crypt_method,
                l1_size=self.l1_size,
                l1_table_offset=self.l1_table_offset,
                refcount_table_offset=self.refcount_table_offset,
                refcount_table_clusters=self.refcount_table_clusters,
                nb_snapshots=self.nb_snapshots,
                snapshots_offset=self.snapshots_offset,
            )
        )
        out[0:V2_HEADER_LENGTH] = fixed
        if self.version >= 3:
            out[72:104] = HeaderV3Tail.build(
                dict(
                    incompatible_features=self.incompatible_features,
                    compatible_features=self.compatible_features,
                    autoclear_features=self.autoclear_features,
                    refcount_order=self.refcount_order,
                    header_length=self.header_length,
                )
            )
            if self.header_length > 104:
                tail = bytearray(self.unknown_tail.ljust(self.header_length - 104, b"\0"))
                tail[0] = self.compression_type
                out[104 : self.header_length] = tail
        return bytes(out)


def _fail(msg: str) -> None:
    raise FormatError(msg)


def l1_entries_needed(size: int, cluster_bits: int, l2_entry_size: int) -> int:
    l2_bits = cluster_bits - (3 if l2_entry_size == 8 else 4)
    return div_round_up(size, 1 << (cluster_bits + l2_bits))


def parse_header(data: bytes, allow_encrypted: bool = False) -> Header:
    """Parse and validate a qcow2 header from the first bytes of an image (at least its first cluster,
    or the whole file if shorter). Raises FormatError or UnsupportedFeature with a one-line reason."""
    if len(data) < 4 or data[:4] != MAGIC:
        if len(data) >= 4 and data[:3] == b"QFI":
            _fail("bad qcow2 magic number")
        _fail("not a qcow2 image (no qcow2 magic number)")
    if len(data) < V2_HEADER_LENGTH:
        _fail(
            f"header too short: the file has {len(data)} bytes, a qcow2 header needs at least {V2_HEADER_LENGTH}"
        )
    f = HeaderV2.parse(data[:V2_HEADER_LENGTH])
    version = f.version
    if version not in (2, 3):
        _fail(f"unsupported qcow2 version {version} (only 2 and 3 exist)")
    h = Header(
        version=version,
        backing_file_offset=f.backing_file_offset,
        backing_file_size=f.backing_file_size,
        cluster_bits=f.cluster_bits,
        size=f.size,
        crypt_method=f.crypt_method,
        l1_size=f.l1_size,
        l1_table_offset=f.l1_table_offset,
        refcount_table_offset=f.refcount_table_offset,
        refcount_table_clusters=f.refcount_table_clusters,
        nb_snapshots=f.nb_snapshots,
        snapshots_offset=f.snapshots_offset,
    )
    if not MIN_CLUSTER_BITS <= h.cluster_bits <= MAX_CLUSTER_BITS:
        _fail(
            f"unsupported cluster size: cluster_bits is {h.cluster_bits}, QEMU accepts {MIN_CLUSTER_BITS}..{MAX_CLUSTER_BITS}"
        )
    cluster_size = h.cluster_size
    if version == 3:
        if len(data) < V3_MIN_HEADER_LENGTH:
            _fail(
                f"header too short: a version 3 header needs {V3_MIN_HEADER_LENGTH} bytes, the file has {len(data)}"
            )
        t = HeaderV3Tail.parse(data[72:104])
        h.incompatible_features = t.incompatible_features
        h.compatible_features = t.compatible_features
        h.autoclear_features = t.autoclear_features
        h.refcount_order = t.refcount_order
        h.header_length = t.header_length
        if h.header_length < V3_MIN_HEADER_LENGTH:
            _fail(
                f"header too short: header_length is {h.header_length}, version 3 needs at least {V3_MIN_HEADER_LENGTH}"
            )
        if h.header_length > cluster_size:
            _fail(f"header_length {h.header_length} is larger than the cluster size {cluster_size}")
        if h.header_length > len(data):
            _fail(
                f"header too short: header_length is {h.header_length} but the file has {len(data)} bytes"
            )
        h.unknown_tail = bytes(data[104 : h.header_length])
        if h.header_length > 104:
            h.compression_type = data[104]
    else:
        h.header_length = V2_HEADER_LENGTH
        h.refcount_order = 4

    # Extensions live between the header and the backing file name (or the cluster end).
    ext_end = cluster_size
    if h.backing_file_offset:
        ext_end = min(ext_end, h.backing_file_offset)
    _parse_extensions(h, data, h.header_length, min(ext_end, len(data)))

    # Feature checks come after the extensions so that the error can name the feature.
    unknown_incompat = h.incompatible_features & ~INCOMPAT_KNOWN
    if unknown_incompat:
        bits = [b for b in range(64) if unknown_incompat >> b & 1]
        names = ", ".join(
            repr(h.feature_name(0, b)) if (0, b) in h.feature_names else f"bit {b}" for b in bits
        )
        raise UnsupportedFeature(
            f"unsupported incompatible feature(s): {names}; qcowfs (like this QEMU) cannot open it"
        )
    if h.refcount_order > 6:
        _fail(
            f"invalid refcount_order {h.refcount_order}: refcount width must be at most 64 bits (order <= 6)"
        )
    if h.crypt_method:
        kind = {1: "AES", 2: "LUKS"}.get(h.crypt_method, f"method {h.crypt_method}")
        if h.crypt_method not in (1, 2):
            _fail(f"invalid encryption method {h.crypt_method}")
        if not allow_encrypted:
            raise UnsupportedFeature(
                f"encrypted image ({kind}): qcowfs does not read or write encrypted data yet "
                "(qcowfs info and qcowfs check work without the key)"
            )
        if h.crypt_method == 2 and h.crypto_header is None:
            _fail("LUKS encryption without a full disk encryption header extension")
    if h.size > (1 << 63) - 1:
        _fail("virtual size too large")
    if h.extended_l2 and h.cluster_bits < 14:
        _fail("extended L2 entries need a cluster size of at least 16 KiB")
    if h.header_length > 104:
        if h.compression_type not in COMPRESSION_NAMES:
            _fail(f"unknown compression type {h.compression_type}")
    if (
        h.compression_type != COMPRESSION_ZLIB
        and not h.incompatible_features & INCOMPAT_COMPRESSION
    ):
        _fail("compression type is not zlib but the compression-type incompatible bit is clear")
    if h.incompatible_features & INCOMPAT_COMPRESSION and h.compression_type == COMPRESSION_ZLIB:
        _fail("the compression-type incompatible bit is set but the compression type is zlib")
    if h.has_data_file and h.data_file is None:
        _fail("the image needs an external data file but names none")
    if h.data_file_raw and not h.has_data_file:
        _fail("the raw-external-data bit is set but the image has no external data file")

    # Tables: QEMU's validate_table_offset() -- aligned, and the end fits in int64.
    for what, off, length in (
        ("L1 table", h.l1_table_offset, h.l1_size * 8),
        ("refcount table", h.refcount_table_offset, h.refcount_table_clusters * cluster_size),
        ("snapshot table", h.snapshots_offset, h.nb_snapshots * 40),
    ):
        if off + length > INT64_MAX or off % cluster_size:
            _fail(f"invalid {what} offset 0x{off:x}")
    l1_bytes = h.l1_size * 8
    if l1_bytes > MAX_L1_SIZE:
        _fail(f"L1 table too large ({h.l1_size} entries)")
    needed = l1_entries_needed(h.size, h.cluster_bits, h.l2_entry_size)
    if h.l1_size < needed:
        _fail(
            f"L1 table too small: {h.l1_size} entries cannot map a virtual size of {h.size} bytes (need {needed})"
        )
    if h.l1_size and h.l1_table_offset % cluster_size:
        _fail("L1 table offset is not cluster aligned")
    if h.l1_size and h.l1_table_offset == 0:
        _fail("L1 table offset is 0")
    if h.refcount_table_clusters == 0:
        _fail("image has no refcount table")
    if h.refcount_table_clusters * cluster_size > MAX_REFTABLE_SIZE:
        _fail("refcount table too large")
    if h.refcount_table_offset % cluster_size or h.refcount_table_offset == 0:
        _fail("refcount table offset is invalid (zero or not cluster aligned)")
    if h.nb_snapshots > MAX_SNAPSHOTS:
        _fail("too many snapshots")
    if h.nb_snapshots and h.snapshots_offset % cluster_size:
        _fail("snapshot table offset is not cluster aligned")

    # Backing file name.
    if h.backing_file_offset:
        name_end = h.backing_file_offset + h.backing_file_size
        if (
            h.backing_file_size > MAX_BACKING_NAME
            or h.backing_file_offset > cluster_size
            or name_end > cluster_size
        ):
            _fail("backing file name too long or outside the first cluster")
        end = h.backing_file_offset + h.backing_file_size
        if end > len(data):
            _fail("header too short: the backing file name lies past the end of the file")
        raw = bytes(data[h.backing_file_offset : end])
        if b"\0" in raw:
            _fail("backing file name contains a NUL byte")
        h.backing_file = raw.decode("utf-8", "surrogateescape")
    return h


def _parse_extensions(h: Header, data: bytes, start: int, end: int) -> None:
    offset = start
    while True:
        if offset + 8 > end:
            # QEMU stops at the end marker; running out of room without one is an error.
            if offset >= end and h.version == 2:
                return
            if offset + 8 > len(data) and h.version == 3:
                _fail("header extensions run past the end of the file")
            _fail("header extensions are not terminated inside the first cluster")
        ext = ExtensionHeader.parse(data[offset : offset + 8])
        offset += 8
        # QEMU (qcow2_read_extensions) checks the length before looking at the magic,
        # even for the end marker.
        if ext.length > end - offset:
            _fail(
                f"header extension 0x{ext.magic:08x} is larger than the space left in the first cluster"
            )
        if ext.magic == EXT_END:
            return
        payload = bytes(data[offset : offset + ext.length])
        offset += align_up(ext.length, 8)
        h.extensions.append(Extension(ext.magic, payload))
        if ext.magic == EXT_BACKING_FORMAT:
            h.backing_format = payload.split(b"\0", 1)[0].decode("utf-8", "replace")
        elif ext.magic == EXT_DATA_FILE:
            h.data_file = payload.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        elif ext.magic == EXT_FEATURE_TABLE:
            for i in range(len(payload) // 48):
                e = FeatureNameEntry.parse(payload[i * 48 : i * 48 + 48])
                h.feature_names[(e.type, e.bit)] = e.name.split(b"\0", 1)[0].decode(
                    "utf-8", "replace"
                )
        elif ext.magic == EXT_CRYPTO:
            # qcow2.txt "Full disk encryption header pointer": offset and length, both u64
            if ext.length != 16:
                _fail(f"encryption header extension has invalid length {ext.length} (must be 16)")
            off, length = int.from_bytes(payload[:8], "big"), int.from_bytes(payload[8:], "big")
            if off % h.cluster_size or off == 0:
                _fail(f"encryption header offset {off} is not a cluster boundary past the header")
            if length == 0 or length > (1 << 40):
                _fail(f"encryption header length {length} is invalid")
            h.crypto_header = (off, length)
        elif ext.magic == EXT_BITMAPS:
            if h.version < 3:
                continue  # QEMU ignores it on v2
            if ext.length != BITMAPS_EXT_SIZE:
                _fail(
                    f"bitmaps extension has invalid length {ext.length} (must be {BITMAPS_EXT_SIZE})"
                )
            b = BitmapsExtension.parse(payload)
            if not h.autoclear_features & AUTOCLEAR_BITMAPS:
                # Written by a program without bitmap support: the bitmaps are not to be
                # trusted; QEMU drops the extension (its clusters become leaks).
                h.bitmaps_ext = None
                h.stale_bitmaps_ext = dict(b)
                continue
            if b.reserved32 != 0:
                _fail("bitmaps extension: reserved field is not zero")
            if b.nb_bitmaps == 0 or b.nb_bitmaps > MAX_BITMAPS:
                _fail(f"bitmaps extension: invalid number of bitmaps {b.nb_bitmaps}")
            if b.bitmap_directory_size > MAX_BITMAP_DIRECTORY_SIZE:
                _fail("bitmaps extension: bitmap directory too large")
            if b.bitmap_directory_offset % h.cluster_size or b.bitmap_directory_offset == 0:
                _fail("bitmaps extension: invalid bitmap directory offset")
            h.bitmaps_ext = dict(
                nb_bitmaps=b.nb_bitmaps,
                bitmap_directory_size=b.bitmap_directory_size,
                bitmap_directory_offset=b.bitmap_directory_offset,
            )
