"""Property tests for the parsers: whatever the bytes, qcowfs answers with a Header/an image or a QcowError.

Never another exception (IndexError, struct.error, construct errors, ValueError, MemoryError, ...),
and a read-only open never changes the file.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import struct

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from support.images import Blobs, create

from qcowfs.engine.image import Qcow2Image
from qcowfs.errors import QcowError
from qcowfs.format.header import Header, parse_header
from qcowfs_dev.oracles import qemu_img, qemu_io
from qcowfs_dev.probes import BITMAPS_MAGIC, OFFSET_MASK, u32, u64

SETTINGS = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

MAGIC = b"QFI\xfb"
HEADER_BYTES = 64 * 1024


# ----------------------------------------------------------------------------- real images


DATA_WRITES = (
    "write -P 0x5a 0 96k",
    "write -P 0xa5 1M 8k",
    "write -c -P 0x77 2M 64k",  # compressed clusters
    "write -z 3M 64k",  # zero clusters
    "write -P 0x11 7M 4k",
)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """name -> path of QEMU-made images with data in several kinds of clusters."""
    d = tmp_path_factory.mktemp("fuzz-src")
    out = {
        "v3-4k": create(d / "v3-4k.qcow2", "8M", "cluster_size=4096", writes=DATA_WRITES),
        "v3-16k-extl2-zstd": create(
            d / "v3-extl2.qcow2",
            "8M",
            "cluster_size=16384,extended_l2=on,compression_type=zstd",
            writes=DATA_WRITES,
        ),
        "v2-512": create(
            d / "v2-512.qcow2", "8M", "compat=0.10,cluster_size=512", writes=DATA_WRITES
        ),
        "v3-refcount1": create(
            d / "v3-rc1.qcow2", "8M", "cluster_size=4096,refcount_bits=1", writes=DATA_WRITES
        ),
        "v3-64k": create(d / "v3-64k.qcow2", "8M", writes=DATA_WRITES),
    }
    base = create(d / "base.qcow2", "8M", "cluster_size=4096", writes=["write -P 0x42 0 1M"])
    overlay = create(
        d / "overlay.qcow2",
        "8M",
        "cluster_size=4096",
        backing=base.name,
        backing_fmt="qcow2",
        writes=["write -P 0x24 512k 8k"],
    )
    qemu_img("bitmap", "--add", overlay, "bm0")
    qemu_io(
        overlay, "write -P 0x99 2M 4k"
    )  # dirties bm0: bitmap tables and data on disk after close
    out["v3-4k-backing-bitmap"] = overlay
    return out


def regions(data: bytes) -> list:
    """[start, end) byte ranges of the metadata of a valid image: header and extensions, L1, refcount
    table, refcount blocks, L2 tables; plus the whole file."""
    cb = u32(data, 20)
    cs = 1 << cb
    version = u32(data, 4)
    hl = u32(data, 100) if version >= 3 else 72
    out = [(0, min(cs, len(data), 1024)), (0, hl), (0, len(data))]
    l1_size, l1_off = u32(data, 36), u64(data, 40)
    out.append((l1_off, l1_off + l1_size * 8))
    rt_off, rt_clusters = u64(data, 48), u32(data, 56)
    rt_entries = []
    for i in range(min(rt_clusters * cs, max(0, len(data) - rt_off)) // 8):
        e = u64(data, rt_off + 8 * i)
        if e:
            rt_entries.append((i, e & ~0x1FF))
    used = max((i for i, _ in rt_entries), default=0) + 1
    out.append((rt_off, rt_off + 8 * used))
    out.append((rt_off, rt_off + rt_clusters * cs))
    for _, blk in rt_entries:
        out.append((blk, blk + min(cs, 512)))
    for i in range(min(l1_size, max(0, len(data) - l1_off) // 8)):
        e = u64(data, l1_off + 8 * i) & OFFSET_MASK
        if e:
            out.append((e, e + cs))
    # the bitmap directory, if any (found from the bitmaps extension)
    off = hl
    while version >= 3 and off + 8 <= min(cs, len(data)):
        magic, length = struct.unpack_from(">II", data, off)
        if magic == 0:
            break
        if magic == BITMAPS_MAGIC and length == 24:
            dsize, doff = u64(data, off + 16), u64(data, off + 24)
            out.append((doff, doff + dsize))
        off += 8 + (length + 7) // 8 * 8
    return [(a, min(b, len(data))) for a, b in out if a < min(b, len(data))]


def mutations_for(data: bytes):
    """Byte overwrites at positions in the metadata regions, plus 8-byte big-endian word overwrites
    with values that make table entries and header fields interesting (0, flags, past EOF, unaligned)."""
    regs = regions(data)
    position = st.sampled_from(regs).flatmap(lambda r: st.integers(r[0], r[1] - 1))
    byte_mut = st.tuples(position, st.integers(0, 255)).map(lambda t: ("byte", t[0], t[1]))
    cs = 1 << u32(data, 20)
    word_value = st.one_of(
        st.sampled_from(
            [0, 1, 1 << 63, 1 << 62, (1 << 64) - 1, 0x00FFFFFFFFFFFE00, len(data), len(data) + cs]
        ),
        st.integers(0, (1 << 64) - 1),
        # a cluster-aligned offset inside the file, with the COPIED / COMPRESSED / ZERO flags in any mix
        st.tuples(
            st.integers(0, len(data) // cs),
            st.sampled_from([0, 1, 1 << 63, 1 << 62, (1 << 63) | 1]),
        ).map(lambda t: (t[0] * cs) | t[1]),
        st.integers(0, len(data)),
    )
    word_mut = st.tuples(position.map(lambda p: p & ~7), word_value).map(
        lambda t: ("word", t[0], t[1])
    )
    field_mut = (
        st.sampled_from(HEADER_FIELDS)
        .flatmap(lambda f: st.tuples(st.just(f), field_values(f[1] * 8, len(data), cs)))
        .map(lambda t: ("field", t[0][0], (t[0][1], t[1])))
    )
    return st.lists(st.one_of(byte_mut, word_mut, field_mut), min_size=1, max_size=12)


# (offset, width in bytes) of the header fields (qcow2.txt "Header")
HEADER_FIELDS = [
    (4, 4),
    (8, 8),
    (16, 4),
    (20, 4),
    (24, 8),
    (32, 4),
    (36, 4),
    (40, 8),
    (48, 8),
    (56, 4),
    (60, 4),
    (64, 8),
    (72, 8),
    (80, 8),
    (88, 8),
    (96, 4),
    (100, 4),
    (104, 1),
]


def field_values(bits: int, file_size: int, cs: int):
    top = (1 << bits) - 1
    return st.one_of(
        st.sampled_from([0, 1, 2, 3, 4, top, top - 1, 1 << (bits - 1), (1 << (bits - 1)) - 1]),
        st.sampled_from(
            [file_size, file_size + cs, file_size - cs, cs, 2 * cs, 1 << 62, (1 << 63) - cs]
        ).map(lambda v: max(0, v) & top),
        st.integers(0, 64).map(lambda b: (1 << b) & top),
        st.integers(0, top),
    )


def apply(data: bytes, muts) -> bytes:
    buf = bytearray(data)
    for kind, pos, value in muts:
        if kind == "byte":
            if pos < len(buf):
                buf[pos] = value
        elif kind == "field":
            width, v = value
            if pos + width <= len(buf):
                buf[pos : pos + width] = v.to_bytes(width, "big")
        elif pos + 8 <= len(buf):
            struct.pack_into(">Q", buf, pos, value)
    return bytes(buf)


def check_error(e: QcowError, record: bool = True) -> None:
    if record:
        event(
            type(e).__name__
        )  # pytest --hypothesis-show-statistics shows which errors the inputs reach
    assert isinstance(e, QcowError)
    assert str(e).strip(), "a QcowError with an empty message"
    assert "\n" not in str(e).strip(), f"a QcowError message of several lines: {str(e)!r}"


# ----------------------------------------------------------------------------- (a) any bytes


@SETTINGS
@given(data=st.binary(max_size=4096))
def test_parse_header_any_bytes(data):
    try:
        h = parse_header(data)
    except QcowError as e:
        check_error(e)
    else:
        event("parsed")
        assert isinstance(h, Header)


@SETTINGS
@given(version=st.sampled_from([2, 3]), rest=st.binary(max_size=4096))
def test_parse_header_magic_then_any_bytes(version, rest):
    """Past the magic and version check, so the field validation and the extension walk get random input."""
    data = MAGIC + struct.pack(">I", version) + rest
    try:
        h = parse_header(data)
    except QcowError as e:
        check_error(e)
    else:
        event("parsed")
        assert isinstance(h, Header)
        assert h.version == version


def _u(bits: int):
    return st.integers(0, (1 << bits) - 1)


EXT_MAGICS = [0xE2792ACA, 0x6803F857, 0x23852875, 0x0537BE77, 0x44415441, 0x12345678]


@st.composite
def structured_headers(draw):
    """Valid-looking headers in which some fields take values near the limits QEMU checks, followed by
    extensions that are plausible (known magics, lengths near the room left) or random bytes."""

    def pick(valid, wild):
        # each field keeps its valid value about 3 times in 4, so the later checks are reached too
        return valid if draw(st.integers(0, 3)) else draw(wild)

    cb = pick(16, st.one_of(st.integers(8, 22), _u(32)))
    csz = 1 << min(cb, 22)
    offset = st.one_of(
        st.integers(0, 64).map(lambda k: k * csz),
        st.integers(0, 64).map(lambda k: k * csz + 8),
        st.sampled_from(
            [(1 << 63) - csz, 1 << 63, (1 << 64) - csz, (1 << 56) - csz, 0x00FFFFFFFFFFFE00]
        ),
        _u(64),
    )
    small = st.one_of(
        st.integers(0, 2100), st.sampled_from([(1 << 22) + 1, 1 << 31, (1 << 32) - 1]), _u(32)
    )
    version = pick(3, st.sampled_from([2, 3]))
    backing_offset = pick(0, st.one_of(st.integers(72, 70000), _u(64)))
    fields = [
        MAGIC,
        version,
        backing_offset,
        pick(8 if backing_offset else 0, small),  # backing_file_size
        cb,
        pick(
            1 << 30,
            st.one_of(
                st.integers(0, 1 << 40), st.sampled_from([(1 << 63) - 1, 1 << 63, (1 << 64) - 1])
            ),
        ),
        pick(0, st.one_of(st.integers(0, 3), _u(32))),  # crypt_method
        pick(64, small),  # l1_size
        pick(3 * csz, offset),  # l1_table_offset
        pick(csz, offset),  # refcount_table_offset
        pick(1, small),  # refcount_table_clusters
        pick(0, small),  # nb_snapshots
        pick(0, offset),  # snapshots_offset
    ]
    head = struct.pack(">4sIQIIQIIQQIIQ", *fields)
    if version == 3:
        bits = st.one_of(st.integers(0, 31), st.integers(0, 63).map(lambda b: 1 << b), _u(64))
        hl = pick(
            112, st.one_of(st.sampled_from([0, 72, 96, 100, 104, 108, 120, 4096, 65536]), _u(32))
        )
        head += struct.pack(
            ">QQQII", pick(0, bits), pick(0, bits), pick(0, bits), pick(4, st.integers(0, 8)), hl
        )
        head += bytes([pick(0, st.integers(0, 2))]) + bytes(7)
    exts = b""
    for _ in range(draw(st.integers(0, 4))):
        magic = draw(st.sampled_from(EXT_MAGICS))
        payload = draw(st.binary(max_size=96))
        length = draw(st.one_of(st.just(len(payload)), st.sampled_from([24, 48, 0]), _u(32)))
        exts += struct.pack(">II", magic, length) + payload + bytes(-len(payload) % 8)
    exts += bytes(8) if draw(st.integers(0, 3)) else b""
    return head + exts + draw(st.binary(max_size=256))


@SETTINGS
@given(data=structured_headers())
def test_parse_header_structured(data):
    try:
        h = parse_header(data)
    except QcowError as e:
        check_error(e)
    else:
        event("parsed")
        assert isinstance(h, Header)


# ----------------------------------------------------------------------------- (b) mutated real headers


@pytest.fixture(scope="module")
def headers(images):
    out = Blobs()
    for name, path in images.items():
        with open(path, "rb") as f:
            out[name] = f.read(HEADER_BYTES)
    for data in out.values():
        parse_header(data)  # the unmutated headers parse (else the property below proves nothing)
    return out


@SETTINGS
@given(data=st.data())
def test_parse_header_mutated(headers, data):
    name = data.draw(st.sampled_from(sorted(headers)), label="image")
    original = headers[name]
    muts = data.draw(mutations_for(original), label="mutations")
    cut = data.draw(st.one_of(st.none(), st.integers(0, len(original))), label="truncate at")
    mutated = apply(original, muts)
    if cut is not None:
        mutated = mutated[:cut]
    try:
        h = parse_header(mutated)
    except QcowError as e:
        check_error(e)
    else:
        event("parsed")
        assert isinstance(h, Header)


# ----------------------------------------------------------------------------- (c) mutated image files


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


@pytest.fixture(scope="module")
def image_bytes(images):
    out = Blobs()
    for name, path in images.items():
        raw = path.read_bytes()
        with Qcow2Image.open(str(path), read_only=True) as img:  # unmutated: opens and reads
            assert img.read(0, 4096) != bytes(4096), name
        out[name] = raw
    return out


@pytest.fixture(scope="module")
def work_dir(images, tmp_path_factory):
    """A directory holding the backing file of the overlay image, where mutated copies are written."""
    d = tmp_path_factory.mktemp("fuzz-work")
    src = next(iter(images.values())).parent
    shutil.copy(src / "base.qcow2", d / "base.qcow2")
    return d


READS = [
    (0, 4096),
    (0, 96 * 1024),
    (1 << 20, 8192),
    ((1 << 20) - 100, 300),
    (2 << 20, 65536),
    (3 << 20, 4096),
    (7 << 20, 4096),
]


@SETTINGS
@given(data=st.data())
def test_open_and_read_mutated_image(image_bytes, work_dir, data):
    name = data.draw(st.sampled_from(sorted(image_bytes)), label="image")
    original = image_bytes[name]
    muts = data.draw(mutations_for(original), label="mutations")
    extra = data.draw(st.tuples(st.integers(0, 8 << 20), st.integers(1, 65536)), label="extra read")
    mutated = apply(original, muts)
    path = work_dir / f"{name}.qcow2"
    path.write_bytes(mutated)
    before = _sha(mutated)
    try:
        with Qcow2Image.open(str(path), read_only=True) as img:
            event("opened")
            for off, length in [*READS, extra, (max(0, img.size - 4096), 8192)]:
                try:
                    got = img.read(off, length)
                except QcowError as e:
                    check_error(e)
                    continue
                assert len(got) == max(0, min(length, img.size - off)), (
                    f"read({off}, {length}) returned {len(got)} bytes"
                )
    except QcowError as e:
        check_error(e)
    assert _sha(path.read_bytes()) == before, "a read-only open changed the image file"


# ----------------------------------------------------------------------------- every header field, one at a time


def boundary_values(bits: int, file_size: int, cs: int) -> list:
    top = (1 << bits) - 1
    vals = {
        0,
        1,
        2,
        3,
        4,
        7,
        8,
        9,
        16,
        21,
        22,
        31,
        32,
        63,
        64,
        top,
        top - 1,
        1 << (bits - 1),
        (1 << (bits - 1)) - 1,
    }
    vals |= {
        file_size,
        file_size + cs,
        max(0, file_size - cs),
        cs,
        2 * cs,
        cs + 8,
        1 << 62,
        (1 << 63) - cs,
        1 << 56,
    }
    vals |= {1 << b for b in range(bits)}
    return sorted(v & top for v in vals)


@pytest.mark.parametrize("name", ["v3-4k", "v2-512", "v3-16k-extl2-zstd", "v3-4k-backing-bitmap"])
def test_open_every_header_field_boundary(image_bytes, work_dir, name, caplog):
    """Each header field alone set to each boundary value (0, 1, powers of two, all ones, 2^63, file size, ...):
    open read-only and read answers or raises QcowError, never another exception. Deterministic, so a
    crash found here does not depend on a random seed."""
    caplog.set_level(
        logging.CRITICAL, logger="qcowfs"
    )  # hundreds of expected "corrupt entry" log lines
    original = image_bytes[name]
    cs = 1 << u32(original, 20)
    path = work_dir / f"fields-{name}.qcow2"
    path.write_bytes(original)
    failures = []
    with open(path, "r+b", buffering=0) as f:
        for off, width in HEADER_FIELDS:
            if name == "v2-512" and off >= 72:
                continue  # v2 has no such fields: those bytes are the extension area (covered above)
            for v in boundary_values(width * 8, len(original), cs):
                f.seek(off)
                f.write(v.to_bytes(width, "big"))
                stamp = os.stat(path)
                try:
                    with Qcow2Image.open(str(path), read_only=True) as img:
                        for roff, length in [*READS, (max(0, img.size - 4096), 8192)]:
                            try:
                                img.read(roff, length)
                            except QcowError as e:
                                check_error(e, record=False)
                except QcowError as e:
                    check_error(e, record=False)
                except Exception as e:  # noqa: BLE001 - the point of the test: collect every non-QcowError
                    failures.append(f"field at byte {off} = {v:#x}: {type(e).__name__}: {e}")
                after = os.stat(path)
                assert (after.st_mtime_ns, after.st_size) == (stamp.st_mtime_ns, stamp.st_size), (
                    f"field at byte {off} = {v:#x}: the read-only open changed the file"
                )
                f.seek(off)
                f.write(original[off : off + width])
    assert _sha(path.read_bytes()) == _sha(original), "the read-only opens changed the file"
    assert not failures, (
        f"{len(failures)} header values raised something other than QcowError:\n"
        + "\n".join(failures)
    )


def table_entry_positions(data: bytes) -> list:
    """Byte offsets of 8-byte entries worth corrupting: used L1 entries and the one after them, the first
    used entries of each L2 table, used refcount table entries, the first refcount block entries."""
    cb = u32(data, 20)
    cs = 1 << cb
    extended = u32(data, 4) >= 3 and u64(data, 72) & (1 << 4)
    step = 16 if extended else 8
    l1_size, l1_off = u32(data, 36), u64(data, 40)
    out = []
    l2_tables = []
    for i in range(l1_size):
        e = u64(data, l1_off + 8 * i)
        if e:
            out.append(l1_off + 8 * i)
            l2_tables.append(e & 0x00FFFFFFFFFFFE00)
        elif i and u64(data, l1_off + 8 * (i - 1)):
            out.append(l1_off + 8 * i)
    for t in l2_tables:
        used = [
            t + j
            for j in range(0, cs, step)
            if u64(data, t + j) or (extended and u64(data, t + j + 8))
        ]
        for pos in used[:6] + used[-2:]:
            out.append(pos)
            if extended:
                out.append(pos + 8)  # the subcluster bitmap word
    rt_off, rt_clusters = u64(data, 48), u32(data, 56)
    for i in range(rt_clusters * cs // 8):
        e = u64(data, rt_off + 8 * i)
        if e:
            out.append(rt_off + 8 * i)
            out.extend(range(e & ~0x1FF, (e & ~0x1FF) + 16, 8))
    return sorted(set(out))


def entry_values(data: bytes, original_entry: int) -> list:
    cs = 1 << u32(data, 20)
    off = original_entry & 0x00FFFFFFFFFFFE00
    size = len(data)
    return sorted(
        {
            0,
            1,
            (1 << 64) - 1,
            1 << 63,
            1 << 62,
            (1 << 63) | (1 << 62),
            0x00FFFFFFFFFFFE00,
            (1 << 63) | 0x00FFFFFFFFFFFE00,
            1 << 55,
            (1 << 63) - cs,
            original_entry | 1,
            original_entry ^ (1 << 62),
            original_entry ^ (1 << 63),
            original_entry | (1 << 56),
            off + 512 if off else 512,
            (off + 512) | (1 << 63) if off else 512 | (1 << 63),
            size & ~(cs - 1),
            (size & ~(cs - 1)) | (1 << 63),
            size + cs,
            (size + cs) | (1 << 63),
            (1 << 63) | (size & ~(cs - 1) - cs),
            0xFFFFFFFF00000000,
            0x00000000FFFFFFFF,
        }
    )


@pytest.mark.parametrize(
    "name", ["v3-4k", "v2-512", "v3-16k-extl2-zstd", "v3-refcount1", "v3-4k-backing-bitmap"]
)
def test_open_every_table_entry_boundary(image_bytes, work_dir, name, caplog):
    """Each L1 / L2 / refcount table / refcount block entry in use, alone set to each boundary value
    (0, flags only, all ones, past EOF, unaligned, its own value with a flag flipped): open read-only
    and read answers or raises QcowError, never another exception; the file is not changed."""
    caplog.set_level(logging.CRITICAL, logger="qcowfs")
    original = image_bytes[name]
    path = work_dir / f"entries-{name}.qcow2"
    path.write_bytes(original)
    positions = table_entry_positions(original)
    assert len(positions) >= 8, f"{name}: found only {len(positions)} table entries to corrupt"
    failures = []
    with open(path, "r+b", buffering=0) as f:
        for pos in positions:
            for v in entry_values(original, u64(original, pos)):
                f.seek(pos)
                f.write(v.to_bytes(8, "big"))
                stamp = os.stat(path)
                try:
                    with Qcow2Image.open(str(path), read_only=True) as img:
                        for roff, length in READS:
                            try:
                                got = img.read(roff, length)
                                assert len(got) == max(0, min(length, img.size - roff))
                            except QcowError as e:
                                check_error(e, record=False)
                except QcowError as e:
                    check_error(e, record=False)
                except AssertionError:
                    raise
                except Exception as e:  # noqa: BLE001 - the point of the test: collect every non-QcowError
                    failures.append(f"entry at byte {pos:#x} = {v:#x}: {type(e).__name__}: {e}")
                after = os.stat(path)
                assert (after.st_mtime_ns, after.st_size) == (stamp.st_mtime_ns, stamp.st_size), (
                    f"entry at byte {pos:#x} = {v:#x}: the read-only open changed the file"
                )
                f.seek(pos)
                f.write(original[pos : pos + 8])
    assert _sha(path.read_bytes()) == _sha(original), "the read-only opens changed the file"
    assert not failures, (
        f"{len(failures)} table entries raised something other than QcowError:\n"
        + "\n".join(failures)
    )
