"""The write path through a real mount, with QEMU as the oracle.

Randomized workloads (seeded: the seed is printed and is part of every failure message; set
QCOWFS_SEED to replay another one) write disk.raw with os.pwrite and ``dd conv=notrunc``:
1 B to 4 MiB, aligned and unaligned, crossing cluster and subcluster boundaries, some all-zero
(so zero detection runs), some repeating a byte. The very same writes go to a raw reference
file. After the unmount ``qemu-img compare -f qcow2 -F raw IMG REF`` must say identical and
``qemu-img check`` must find nothing (exit 0: no corruption, no leaks); before it, disk.raw
read through the mount equals the reference too.

Layouts: v3 64 KiB; v2; 512 B and 2 MiB clusters; refcount_bits 1/8/64; lazy refcounts;
512 B clusters with 1-bit refcounts spread over 256 MiB (refcount blocks created, refcount
table grown); qcow2 over qcow2 over raw (copy-on-write from backing; backing files unchanged);
zlib/zstd compressed images (partial writes into compressed clusters); zero-plain and
zero-alloc clusters partially overwritten; extended L2 over a backing file with subcluster
writes; external data files with and without data_file_raw; internal snapshots (which must
still restore their old content).

Then: zero detection (zeroed clusters are freed and reused; v2 -> unallocated), fallocate
refused with EOPNOTSUPP, fsync durability across kill -9, read-only mounts (EROFS), ENOSPC on a
full host filesystem, and EIO for metadata pointing past the end of the image.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import struct
from pathlib import Path

import pytest
from conftest import needs_fuse, sha256
from support.images import create
from support.seeds import base_seed, seed_for
from support.syscalls import FALLOC_FL_PUNCH_HOLE, errno_of, fallocate

from qcowfs_dev.oracles import (
    assert_clean,
    assert_compare,
    qemu_check,
    qemu_img,
    qemu_info,
    qemu_io,
    qemu_map,
    run,
)
from qcowfs_dev.probes import COPIED, OFFSET_MASK, header, l1_entries

KiB = 1 << 10
MiB = 1 << 20
BASE_SEED = base_seed(20251123)


# ----------------------------------------------------------------------------- helpers


def to_raw(img: Path, out: Path) -> Path:
    qemu_img("convert", "-f", "qcow2", "-O", "raw", img, out)
    return out


def assert_same_files(a: Path, b: Path, what: str = "", length: int | None = None) -> None:
    """a and b hold the same bytes (up to length; a shorter file reads as zeros); first difference reported."""
    chunk = 4 * MiB
    with open(a, "rb", buffering=0) as fa, open(b, "rb", buffering=0) as fb:
        if length is None:
            length = max(os.fstat(fa.fileno()).st_size, os.fstat(fb.fileno()).st_size)
        off = 0
        while off < length:
            n = min(chunk, length - off)
            x = os.pread(fa.fileno(), n, off).ljust(n, b"\0")
            y = os.pread(fb.fileno(), n, off).ljust(n, b"\0")
            if x != y:
                i = next(i for i in range(n) if x[i] != y[i])
                raise AssertionError(
                    f"{what}{a} and {b} differ first at offset {off + i} "
                    f"(0x{off + i:x}): {x[i : i + 16].hex()} != {y[i : i + 16].hex()}"
                )
            off += n


def map_entries(img: Path) -> list:
    return qemu_map(img)


def map_at(entries: list, off: int) -> dict:
    for e in entries:
        if e["start"] <= off < e["start"] + e["length"]:
            return e
    raise AssertionError(f"offset {off} not in qemu-img map")


def check_json(img: Path) -> dict:
    res = qemu_check(img)
    assert res["rc"] == 0, f"qemu-img check {img}: {res}"
    return res


# ----------------------------------------------------------------------------- workloads


def gen_ops(
    rng: random.Random,
    vsize: int,
    cluster: int,
    n: int,
    *,
    max_len: int = 4 * MiB,
    sub: int | None = None,
    hot: list | None = None,
    dd_every: int = 40,
) -> list:
    """n writes (offset, data, via_dd) over [0, vsize): a mix of sizes and alignments.

    sub: a subcluster size to favour (extended L2); hot: [(start, end)] ranges that get
    about half of the offsets (zero clusters, compressed clusters, ...)."""
    ops = []
    grain = sub or cluster

    def pick_off(ln: int, align: int = 1) -> int:
        if hot and rng.random() < 0.5:
            lo, hi = rng.choice(hot)
            lo = max(0, min(lo, vsize - ln))
            hi = max(lo, min(hi, vsize - ln))
            off = rng.randint(lo, hi)
        else:
            off = rng.randint(0, vsize - ln)
        return off // align * align

    for i in range(n):
        r = rng.random()
        if r < 0.30:  # small, unaligned
            ln = rng.randint(1, 4096)
            off = pick_off(ln)
        elif r < 0.45:  # whole clusters (or subclusters), aligned
            ln = min(grain * rng.randint(1, 8), max_len, vsize)
            off = pick_off(ln, grain)
        elif r < 0.60:  # across a cluster / subcluster boundary
            b = rng.randrange(1, vsize // grain) * grain
            a = rng.randint(1, min(grain, 8 * KiB))
            c = rng.randint(1, min(grain, 8 * KiB))
            off, ln = b - a, min(a + c, vsize - (b - a))
        elif r < 0.72:  # sector aligned
            ln = 512 * rng.randint(1, 64)
            off = pick_off(ln, 512)
        elif r < 0.90:  # medium, unaligned
            ln = rng.randint(4097, 256 * KiB)
            off = pick_off(ln)
        else:  # large: up to max_len, aligned or not
            ln = rng.randint(256 * KiB, max_len)
            if rng.random() < 0.5:
                ln = max(cluster, ln // cluster * cluster)
                off = pick_off(ln, cluster)
            else:
                off = pick_off(ln)
        kind = rng.random()
        if kind < 0.12:
            data = bytes(ln)  # zeros: zero detection on the whole clusters inside
        elif kind < 0.20:
            data = bytes([rng.randrange(1, 256)]) * ln
        else:
            data = rng.randbytes(ln)
        ops.append((off, data, dd_every > 0 and i % dd_every == dd_every // 2))
    # Fixed corner cases: first byte, last byte, a full 4 MiB aligned write, aligned zeros.
    ops.append((0, b"\x5a", False))
    ops.append((vsize - 1, b"\xa5", False))
    big = min(max_len, vsize)
    ops.append((rng.randrange(0, vsize - big + 1) // cluster * cluster, rng.randbytes(big), False))
    zl = min(4 * cluster, vsize)
    ops.append((rng.randrange(0, vsize - zl + 1) // cluster * cluster, bytes(zl), True))
    rng.shuffle(ops)
    return ops


def apply_ops(disk: Path, ref: Path, ops: list, scratch: Path, what: str = "") -> None:
    """Apply the writes to disk.raw (pwrite or dd conv=notrunc) and to the reference file."""
    fd = os.open(disk, os.O_RDWR)
    rfd = os.open(ref, os.O_RDWR)
    try:
        for i, (off, data, via_dd) in enumerate(ops):
            if via_dd:
                src = scratch / "dd-src.bin"
                src.write_bytes(data)
                run(
                    [
                        "dd",
                        f"if={src}",
                        f"of={disk}",
                        f"bs={len(data)}",
                        "count=1",
                        f"seek={off}",
                        "oflag=seek_bytes",
                        "conv=notrunc",
                        "status=none",
                    ]
                )
            else:
                try:
                    n = os.pwrite(fd, data, off)
                except OSError as e:
                    raise AssertionError(
                        f"{what}write #{i} ({len(data)} bytes at {off}) failed: {e}"
                    ) from e
                assert n == len(data), f"{what}write #{i}: short write {n} of {len(data)} at {off}"
            os.pwrite(rfd, data, off)
    finally:
        os.close(fd)
        os.close(rfd)


def workload_roundtrip(
    mount,
    img: Path,
    tmp: Path,
    name: str,
    *,
    n: int = 250,
    backing_files=(),
    ref: Path | None = None,
    **gen,
) -> Path:
    """Reference from QEMU, random writes through a mount and to the reference, unmount,
    then disk content, qemu-img compare and qemu-img check. Returns the reference."""
    seed = seed_for(name, BASE_SEED)
    print(f"{name}: seed {seed} (QCOWFS_SEED={BASE_SEED})")
    what = f"[{name} seed {seed}] "
    if ref is None:
        ref = to_raw(img, tmp / "ref.raw")
    info = qemu_info(img)
    vsize = info["virtual-size"]
    cluster = info["cluster-size"]
    backing_sums = {p: sha256(p) for p in backing_files}
    ops = gen_ops(random.Random(seed), vsize, cluster, n, **gen)
    m = mount(img)
    apply_ops(m.disk, ref, ops, tmp, what)
    assert_same_files(m.disk, ref, f"{what}through the mount: ")
    rc = m.unmount()
    assert rc == 0, f"{what}daemon exited {rc}: {m.proc.stderr.read()}"
    m.assert_no_traceback()
    assert_compare(img, ref, what)
    res = qemu_check(img)
    assert res["rc"] == 0, f"{what}qemu-img check: {res}"
    for p, s in backing_sums.items():
        assert sha256(p) == s, f"{what}backing file {p} changed"
    return ref


# ----------------------------------------------------------------------------- layouts


def initial_data(img: Path, vsize: int, cluster: int) -> None:
    """Some data before the mount, so that writes also land on allocated clusters."""
    c = cluster
    qemu_io(
        img,
        f"write -P 0x11 0 {min(8 * c, vsize // 4)}",
        f"write -P 0x22 {vsize // 2 + 3 * c // 2} {3 * c}",
        f"write -P 0x33 {vsize - 2 * c} {2 * c}",
    )


SIMPLE = {
    "v3-64k": (64 * MiB, ["cluster_size=65536"]),
    "v2": (64 * MiB, ["compat=0.10"]),
    "c512": (32 * MiB, ["cluster_size=512"]),
    "c2m": (128 * MiB, ["cluster_size=2M"]),
    "rc1": (48 * MiB, ["cluster_size=4096", "refcount_bits=1"]),
    "rc8": (48 * MiB, ["cluster_size=4096", "refcount_bits=8"]),
    "rc64": (48 * MiB, ["cluster_size=4096", "refcount_bits=64"]),
    "lazy": (64 * MiB, ["cluster_size=65536", "lazy_refcounts=on"]),
    # the last cluster is partial
    "odd-size": (40 * MiB + 3584, ["cluster_size=65536"]),
}


#: the layouts scripts/test --quick writes to (the others are marked slow)
QUICK_SIMPLE = ("v3-64k", "v2", "rc1")


@needs_fuse
@pytest.mark.parametrize(
    "layout", [x if x in QUICK_SIMPLE else pytest.param(x, marks=pytest.mark.slow) for x in SIMPLE]
)
def test_random_writes(layout, mount, tmp_path):
    vsize, opts = SIMPLE[layout]
    img = create(tmp_path / "img.qcow2", vsize, *opts)
    cluster = qemu_info(img)["cluster-size"]
    initial_data(img, vsize, cluster)
    workload_roundtrip(mount, img, tmp_path, f"random-{layout}")
    h = header(img)
    assert h["incompat"] & 1 == 0, "dirty bit left set after a clean unmount (lazy refcounts)"
    if layout == "v2":
        assert h["version"] == 2


@needs_fuse
@pytest.mark.slow
def test_refcount_table_growth(mount, tmp_path):
    """512 B clusters, 1-bit refcounts: one refcount block covers 2 MiB of host space and the
    initial one-cluster refcount table 128 MiB; > 140 MiB of data must create refcount blocks
    and grow the table."""
    name = "refcount-growth"
    seed = seed_for(name, BASE_SEED)
    print(f"{name}: seed {seed}")
    what = f"[{name} seed {seed}] "
    vsize = 256 * MiB
    img = create(tmp_path / "img.qcow2", vsize, "cluster_size=512", "refcount_bits=1")
    before = header(img)
    ref = to_raw(img, tmp_path / "ref.raw")
    rng = random.Random(seed)
    slots = rng.sample(range(vsize // (4 * MiB)), 36)  # 144 MiB in distinct 4 MiB slots
    ops = [
        (
            s * 4 * MiB + (rng.randrange(512) if rng.random() < 0.3 else 0),
            rng.randbytes(4 * MiB - 512),
            False,
        )
        for s in slots
    ]
    ops += gen_ops(rng, vsize, 512, 200, max_len=256 * KiB)
    rng.shuffle(ops)
    m = mount(img)
    apply_ops(m.disk, ref, ops, tmp_path, what)
    assert_same_files(m.disk, ref, f"{what}through the mount: ")
    assert m.unmount() == 0
    after = header(img)
    assert os.path.getsize(img) > 130 * MiB
    assert after["refcount_table_clusters"] > before["refcount_table_clusters"], (before, after)
    assert_compare(img, ref, what)
    assert_clean(img)


@needs_fuse
def test_backing_chain(mount, tmp_path):
    """qcow2 (64 KiB) over qcow2 (4 KiB) over raw: partial-cluster writes copy the rest from below."""
    seed = seed_for("chain-base", BASE_SEED)
    base = tmp_path / "base.raw"
    base.write_bytes(random.Random(seed).randbytes(40 * MiB + 1000))  # smaller than the overlays
    mid = create(
        tmp_path / "mid.qcow2", 48 * MiB, "cluster_size=4096", backing=base, backing_fmt="raw"
    )
    qemu_io(
        mid,
        "write -P 0xa1 100000 70000",
        f"write -z {1 * MiB} 64k",
        f"write -P 0xa2 {40 * MiB - 500} 2000",
        f"write -P 0xa3 {44 * MiB + 7} 100000",
        f"write -z {10 * MiB + 5} 3000",
    )
    top = create(
        tmp_path / "top.qcow2", 64 * MiB, "cluster_size=65536", backing=mid, backing_fmt="qcow2"
    )
    qemu_io(
        top, "write -P 0xc1 0 4096", f"write -z {3 * MiB} 64k", f"write -P 0xc2 {48 * MiB - 1} 2"
    )
    workload_roundtrip(
        mount,
        top,
        tmp_path,
        "chain",
        backing_files=(base, mid),
        max_len=1 * MiB,
        hot=[
            (0, 2 * MiB),
            (40 * MiB - 128 * KiB, 40 * MiB + 128 * KiB),
            (48 * MiB - 128 * KiB, 48 * MiB + 128 * KiB),
        ],
    )
    assert qemu_info(top)["full-backing-filename"] == str(mid)


def compressible(rng: random.Random, size: int) -> bytes:
    text = b"qcowfs writes into compressed clusters, this line compresses well. " * 4
    out = bytearray()
    while len(out) < size:
        k = rng.randrange(4)
        n = rng.randrange(1, 48 * KiB)
        if k == 0:
            out += (text * (n // len(text) + 1))[:n]
        elif k == 1:
            out += bytes([rng.randrange(1, 256)]) * n
        elif k == 2:
            out += rng.randbytes(n)
        else:
            c = bytearray(n)
            for _ in range(8):
                c[rng.randrange(n)] = rng.randrange(1, 256)
            out += c
    return bytes(out[:size])


@needs_fuse
@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
def test_compressed(ctype, mount, tmp_path):
    vsize = 24 * MiB
    src = tmp_path / "src.raw"
    src.write_bytes(
        compressible(random.Random(seed_for(f"compressed-src-{ctype}", BASE_SEED)), vsize)
    )
    img = tmp_path / "img.qcow2"
    qemu_img(
        "convert",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        f"compression_type={ctype},cluster_size=65536",
        src,
        img,
    )
    before = check_json(img)
    assert before.get("compressed-clusters", 0) > 100, before
    workload_roundtrip(mount, img, tmp_path, f"compressed-{ctype}", ref=src, max_len=1 * MiB, n=300)
    after = check_json(img)
    assert after.get("compressed-clusters", 0) < before["compressed-clusters"], (
        "no compressed cluster was overwritten"
    )


@needs_fuse
def test_zero_clusters_overwritten(mount, tmp_path):
    c = 65536
    img = create(tmp_path / "img.qcow2", 32 * MiB, f"cluster_size={c}")
    qemu_io(
        img,
        "write -P 0x11 0 8M",
        "write -z 1M 2M",  # zero-alloc: the host clusters still hold 0x11
        "write -z -u 4M 2M",  # zero-plain
        "write -z 10M 2M",  # zero-plain over unallocated
        "write -P 0x22 20M 1M",
        "write -z 20M 512k",
    )
    entries = map_entries(img)
    za, zp = map_at(entries, 1 * MiB), map_at(entries, 4 * MiB)
    assert za["zero"] and not za["data"] and "offset" in za, za
    assert zp["zero"] and not zp["data"] and "offset" not in zp, zp
    workload_roundtrip(
        mount,
        img,
        tmp_path,
        "zero-clusters",
        max_len=256 * KiB,
        hot=[(1 * MiB, 3 * MiB), (4 * MiB, 6 * MiB), (10 * MiB, 12 * MiB), (20 * MiB, 21 * MiB)],
    )


@needs_fuse
@pytest.mark.parametrize("cluster", [65536, 16384, 2 * MiB])
def test_extended_l2(cluster, mount, tmp_path):
    sc = cluster // 32
    base = tmp_path / "base.raw"
    base.write_bytes(
        random.Random(seed_for(f"extl2-base-{cluster}", BASE_SEED)).randbytes(20 * MiB)
    )
    img = create(
        tmp_path / "img.qcow2",
        24 * MiB,
        "extended_l2=on",
        f"cluster_size={cluster}",
        backing=base,
        backing_fmt="raw",
    )
    qemu_io(
        img,
        f"write -P 0x10 {sc} {sc}",
        f"write -P 0x11 {cluster + 5 * sc} {3 * sc}",
        f"write -z {2 * cluster + sc} {sc}",
        f"write -P 0x12 {4 * cluster} {cluster}",
        f"write -c -P 0x13 {6 * cluster} {cluster}",
    )
    workload_roundtrip(
        mount,
        img,
        tmp_path,
        f"extl2-{cluster}",
        backing_files=(base,),
        sub=sc,
        max_len=512 * KiB,
        hot=[(0, 8 * cluster), (20 * MiB - 4 * cluster, 20 * MiB + 4 * cluster)],
    )


@needs_fuse
@pytest.mark.parametrize("raw", [False, True], ids=["data_file", "data_file_raw"])
def test_external_data_file(raw, mount, tmp_path):
    ext = tmp_path / "ext.raw"  # absolute: QEMU 7.2 resolves a relative name against its cwd
    opt = f"data_file={ext}" + (",data_file_raw=on" if raw else "")
    img = create(tmp_path / "img.qcow2", 32 * MiB, "cluster_size=65536", opt)
    initial_data(img, 32 * MiB, 65536)
    ref = workload_roundtrip(mount, img, tmp_path, f"datafile-{raw}", max_len=2 * MiB)
    if raw:
        assert_same_files(ext, ref, "data_file_raw: the data file is the disk: ", length=32 * MiB)


@needs_fuse
def test_internal_snapshots(mount, tmp_path):
    c = 65536
    img = create(tmp_path / "img.qcow2", 32 * MiB, f"cluster_size={c}")
    qemu_io(img, "write -P 0x01 0 4M", "write -P 0x02 20M 1M", f"write -P 0x03 {32 * MiB - c} {c}")
    qemu_img("snapshot", "-c", "s1", img)
    ref_s1 = to_raw(img, tmp_path / "ref-s1.raw")
    qemu_io(img, "write -P 0x04 100000 100000", "write -z 2M 1M", "write -P 0x05 24M 64k")
    qemu_img("snapshot", "-c", "s2", img)
    ref_s2 = to_raw(img, tmp_path / "ref-s2.raw")
    workload_roundtrip(
        mount, img, tmp_path, "snapshots", max_len=2 * MiB, hot=[(0, 5 * MiB), (20 * MiB, 25 * MiB)]
    )
    snaps = qemu_img("snapshot", "-l", img).stdout
    assert "s1" in snaps and "s2" in snaps, snaps
    for name, ref in (("s1", ref_s1), ("s2", ref_s2)):
        copy = tmp_path / f"copy-{name}.qcow2"
        shutil.copyfile(img, copy)
        qemu_img("snapshot", "-a", name, copy)
        assert_compare(copy, ref, f"snapshot {name} restored: ")
        assert_clean(copy)


# ----------------------------------------------------------------------------- zero detection


def allocated_clusters(img: Path) -> int:
    return check_json(img)["allocated-clusters"]


@needs_fuse
def test_zero_detection_frees_clusters(mount, tmp_path):
    c = 65536
    img = create(tmp_path / "img.qcow2", 48 * MiB, f"cluster_size={c}")
    qemu_io(img, "write -P 0x55 0 32M")
    ref = to_raw(img, tmp_path / "ref.raw")
    alloc0 = allocated_clusters(img)
    m = mount(img)
    run(
        [
            "dd",
            "if=/dev/zero",
            f"of={m.disk}",
            "bs=1M",
            "count=4",
            "seek=8",
            "conv=notrunc",
            "status=none",
        ]
    )
    # zeros that do not cover a whole cluster: written as data
    fd = os.open(m.disk, os.O_RDWR)
    try:
        assert os.pwrite(fd, bytes(1000), 16 * MiB + 100) == 1000
        assert os.pwrite(fd, bytes(c), 17 * MiB + c // 2) == c  # two half clusters
        assert os.pread(fd, 4 * MiB, 8 * MiB) == bytes(4 * MiB)
        assert os.pread(fd, 3000, 16 * MiB) == b"\x55" * 100 + bytes(1000) + b"\x55" * 1900
        assert os.pread(fd, 4096, 12 * MiB) == b"\x55" * 4096
    finally:
        os.close(fd)
    with open(ref, "r+b") as f:
        for off, n in ((8 * MiB, 4 * MiB), (16 * MiB + 100, 1000), (17 * MiB + c // 2, c)):
            f.seek(off)
            f.write(bytes(n))
    assert m.unmount() == 0
    entries = map_entries(img)
    for off in range(8 * MiB, 12 * MiB, c):
        e = map_at(entries, off)
        assert e["zero"] and not e["data"], f"zeroed cluster at {off} still data: {e}"
    for off in (16 * MiB, 17 * MiB, 17 * MiB + c):
        e = map_at(entries, off)
        assert e["data"], f"partially zeroed cluster at {off} should be data: {e}"
    alloc1 = allocated_clusters(img)  # check_json: exit 0, so no leaks
    assert alloc1 == alloc0 - 4 * MiB // c, (alloc0, alloc1)
    assert_compare(img, ref)
    # The freed host clusters are reused: new data elsewhere does not grow the file.
    size1 = os.path.getsize(img)
    m = mount(img)
    data = random.Random(seed_for("zero-detect-new", BASE_SEED)).randbytes(4 * MiB)
    fd = os.open(m.disk, os.O_RDWR)
    try:
        assert os.pwrite(fd, data, 40 * MiB) == len(data)
    finally:
        os.close(fd)
    assert m.unmount() == 0
    with open(ref, "r+b") as f:
        f.seek(40 * MiB)
        f.write(data)
    assert os.path.getsize(img) <= size1, (
        f"file grew from {size1} to {os.path.getsize(img)}: freed clusters not reused"
    )
    assert_compare(img, ref)
    assert allocated_clusters(img) == alloc0


@needs_fuse
def test_zero_detection_v2_unallocates(mount, tmp_path):
    c = 65536
    img = create(tmp_path / "img.qcow2", 16 * MiB, f"cluster_size={c}", "compat=0.10")
    qemu_io(img, "write -P 0x55 0 16M")
    alloc0 = allocated_clusters(img)
    m = mount(img)
    run(
        [
            "dd",
            "if=/dev/zero",
            f"of={m.disk}",
            "bs=1M",
            "count=2",
            "seek=4",
            "conv=notrunc",
            "status=none",
        ]
    )
    with open(m.disk, "rb") as f:
        f.seek(4 * MiB)
        assert f.read(2 * MiB) == bytes(2 * MiB)
    assert m.unmount() == 0
    entries = map_entries(img)
    for off in range(4 * MiB, 6 * MiB, c):
        e = map_at(entries, off)
        assert not e["data"] and e["zero"] and "offset" not in e, f"v2 zeroed cluster at {off}: {e}"
    assert map_at(entries, 6 * MiB)["data"]
    assert allocated_clusters(img) == alloc0 - 2 * MiB // c
    ref = tmp_path / "ref.raw"
    ref.write_bytes(b"\x55" * 4 * MiB + bytes(2 * MiB) + b"\x55" * 10 * MiB)
    assert_compare(img, ref)


# ----------------------------------------------------------------------------- fallocate


@needs_fuse
def test_fallocate_modes_qcowfs_does_not_support(mount, tmp_path):
    """Punching and zeroing work (tests/mount/test_thin.py); collapsing, inserting and unsharing
    ranges do not: EOPNOTSUPP, nothing changed, the mount goes on."""
    img = create(tmp_path / "img.qcow2", 16 * MiB, "cluster_size=65536")
    qemu_io(img, "write -P 0x66 0 4M")
    ref = to_raw(img, tmp_path / "ref.raw")
    m = mount(img)
    fd = os.open(m.disk, os.O_RDWR)
    try:
        for mode in (
            0x08,
            0x20,
            0x40,
            FALLOC_FL_PUNCH_HOLE,
        ):  # collapse, insert, unshare; punch without keep-size
            err = errno_of(fallocate, fd, mode, 0, MiB)
            assert err == errno.EOPNOTSUPP, (
                f"fallocate mode 0x{mode:x}: {errno.errorcode.get(err, err)}"
            )
        assert os.pread(fd, MiB, 0) == b"\x66" * MiB, "fallocate changed the data"
        # the mount keeps working
        assert os.pwrite(fd, b"after fallocate", 12345) == 15
        assert os.pread(fd, 15, 12345) == b"after fallocate"
    finally:
        os.close(fd)
    assert m.proc.poll() is None
    assert m.unmount() == 0
    with open(ref, "r+b") as f:
        f.seek(12345)
        f.write(b"after fallocate")
    assert_compare(img, ref)
    assert_clean(img)


# ----------------------------------------------------------------------------- fsync


@needs_fuse
@pytest.mark.parametrize(
    "opts",
    [
        ("cluster_size=65536",),
        ("cluster_size=512", "refcount_bits=1"),
        ("cluster_size=65536", "lazy_refcounts=on"),
    ],
    ids=["64k", "c512-rc1", "lazy"],
)
def test_fsync_survives_kill(opts, mount, tmp_path):
    seed = seed_for("fsync-" + "-".join(opts), BASE_SEED)
    print(f"seed {seed}")
    rng = random.Random(seed)
    vsize = 32 * MiB
    img = create(tmp_path / "img.qcow2", vsize, *opts)
    qemu_io(img, "write -P 0x11 0 1M", "write -P 0x12 8M 64k")
    ref = to_raw(img, tmp_path / "ref.raw")
    m = mount(img)
    fd = os.open(m.disk, os.O_RDWR)
    synced = [
        (100, rng.randbytes(1000)),  # in place
        (5 * MiB + 3, rng.randbytes(300 * KiB)),  # new clusters
        (20 * MiB, rng.randbytes(2 * MiB)),
        (31 * MiB + 511, rng.randbytes(4096)),
        (8 * MiB + 1000, bytes(200)),
    ]
    try:
        for off, data in synced:
            assert os.pwrite(fd, data, off) == len(data)
        os.fsync(fd)
        # not fsynced, elsewhere: may or may not survive
        os.pwrite(fd, rng.randbytes(64 * KiB), 12 * MiB)
    finally:
        os.close(fd)
    m.kill()
    res = qemu_check(img)
    assert res["rc"] in (0, 3), f"qemu-img check after kill -9: {res}"
    got = to_raw(img, tmp_path / "got.raw")
    with open(ref, "r+b") as f:
        for off, data in synced:
            f.seek(off)
            f.write(data)
    with open(got, "rb") as g, open(ref, "rb") as r:
        for off, data in synced:
            g.seek(off)
            assert g.read(len(data)) == data, f"fsynced write of {len(data)} bytes at {off} lost"
        # everything outside the unsynced write is exactly what was acknowledged before the fsync
        g.seek(0), r.seek(0)
        a, b = g.read(12 * MiB), r.read(12 * MiB)
        assert a == b
        g.seek(12 * MiB + 64 * KiB), r.seek(12 * MiB + 64 * KiB)
        assert g.read() == r.read()
    qemu_io(
        img,
        f"read -P 0x12 {8 * MiB} 1000",
        f"read -P 0 {8 * MiB + 1000} 200",
        f"read -P 0x12 {8 * MiB + 1200} {64 * KiB - 1200}",
    )


# ----------------------------------------------------------------------------- read-only


@needs_fuse
def test_read_only_mount_refuses_writes(mount, tmp_path):
    img = create(tmp_path / "img.qcow2", 16 * MiB, "cluster_size=65536")
    qemu_io(img, "write -P 0x77 0 1M")
    before = sha256(img)
    m = mount(img, read_only=True)
    for flags in (os.O_RDWR, os.O_WRONLY):
        with pytest.raises(OSError) as ei:
            os.close(os.open(m.disk, flags))
        assert ei.value.errno == errno.EROFS, ei.value
    p = run(
        ["dd", "if=/dev/zero", f"of={m.disk}", "bs=4k", "count=1", "conv=notrunc", "status=none"],
        check=False,
    )
    assert p.returncode != 0 and "Read-only file system" in p.stderr, p.stderr
    fd = os.open(m.disk, os.O_RDONLY)
    try:
        with pytest.raises(OSError):
            os.pwrite(fd, b"x", 0)
        assert os.pread(fd, 4096, 0) == b"\x77" * 4096
    finally:
        os.close(fd)
    assert m.unmount() == 0
    assert sha256(img) == before, "read-only mount changed the image"


# ----------------------------------------------------------------------------- ENOSPC


@pytest.fixture
def small_fs(tmp_path):
    """An 8 MiB tmpfs (or a small loop-mounted ext4) to fill up; unmounted at teardown."""
    d = tmp_path / "small"
    d.mkdir()
    p = run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", d], check=False)
    if p.returncode != 0:
        fs = tmp_path / "small.ext4"
        with open(fs, "wb") as f:
            f.truncate(16 * MiB)
        run(["mkfs.ext4", "-q", fs], check=False)
        p = run(["mount", "-o", "loop", fs, d], check=False)
        if p.returncode != 0:
            pytest.skip(f"cannot mount a small filesystem: {p.stderr.strip()}")
    try:
        yield d
    finally:
        if run(["umount", d], check=False).returncode != 0:
            run(["umount", "-l", d], check=False)


ENOSPC_CASES = {
    # name: (cluster size, virtual size, write size, sequential)
    "64k-seq-1m": (65536, 64 * MiB, MiB, True),
    # small clusters, writes all over the disk: L2 tables and refcount blocks are allocated
    # while the host filesystem fills up
    "4k-random-64k": (4096, 256 * MiB, 64 * KiB, False),
}


@needs_fuse
@pytest.mark.parametrize("case", list(ENOSPC_CASES))
def test_enospc(case, small_fs, mount, tmp_path):
    cluster, vsize, wsize, sequential = ENOSPC_CASES[case]
    seed = seed_for("enospc-" + case, BASE_SEED)
    print(f"seed {seed}")
    rng = random.Random(seed)
    img = create(small_fs / "img.qcow2", vsize, f"cluster_size={cluster}")
    qemu_io(img, "write -P 0x31 0 64k")
    m = mount(img)
    fd = os.open(m.disk, os.O_RDWR)
    acked = []
    slots = list(range(1, vsize // wsize))
    if not sequential:
        rng.shuffle(slots)
    try:
        err = None
        for s in slots[: 2 * 8 * MiB // wsize]:
            data = rng.randbytes(wsize)
            off = s * wsize
            try:
                n = os.pwrite(fd, data, off)
            except OSError as e:
                err = e
                break
            assert n == len(data), f"short write {n}"
            acked.append((off, data))
        assert err is not None, "16 MiB fit on an 8 MiB filesystem?"
        assert err.errno == errno.ENOSPC, f"expected ENOSPC, got {err!r}"
        assert acked, "not even one write fit"
        # the daemon is still up and serves reads and in-place writes
        assert m.proc.poll() is None, "daemon died on ENOSPC"
        assert os.pread(fd, 4096, 0) == b"\x31" * 4096
        assert os.pread(fd, 4096, acked[0][0]) == acked[0][1][:4096]
        assert os.pread(fd, wsize, acked[-1][0]) == acked[-1][1]
        assert os.pwrite(fd, b"in place", 10) == 8
        assert os.pread(fd, 8, 10) == b"in place"
        try:
            os.fsync(fd)
            synced = True
        except OSError as e:
            assert e.errno == errno.ENOSPC, f"fsync failed with {e!r}"
            synced = False
    finally:
        os.close(fd)
    assert m.proc.poll() is None, "daemon died on ENOSPC"
    rc = m.unmount()
    res = qemu_check(img)
    assert res["rc"] in (0, 3), f"qemu-img check after ENOSPC: {res}"
    print(
        f"unmount exit {rc}, fsync {'ok' if synced else 'ENOSPC'}, {len(acked)} writes acknowledged"
    )
    if synced:
        # fsync succeeded: every acknowledged write is on disk
        got = to_raw(img, tmp_path / "got.raw")
        with open(got, "rb") as g:
            assert g.read(64 * KiB) == b"\x31" * 10 + b"in place" + b"\x31" * (64 * KiB - 18)
            for off, data in acked:
                g.seek(off)
                assert g.read(len(data)) == data, f"acknowledged and fsynced write at {off} lost"
    # A full host filesystem is an error to report (a log line, a non-zero exit if the data
    # could not be saved), not a crash of the daemon.
    err = m.proc.stderr.read()
    m.assert_no_traceback()
    assert "Traceback" not in err, (
        f"daemon (exit {rc}) died with a traceback at unmount:\n{err[-1500:]}"
    )


# ----------------------------------------------------------------------------- corrupt at run time


@needs_fuse
def test_metadata_past_eof_gives_eio(mount, tmp_path):
    c = 4096  # one L2 table covers 2 MiB
    img = create(tmp_path / "img.qcow2", 8 * MiB, f"cluster_size={c}")
    qemu_io(img, "write -P 0x11 0 8M")
    h = header(img)
    buf = bytearray(img.read_bytes())
    eof = len(buf)
    past = (eof + 1000 * c) // c * c
    l1 = l1_entries(buf)
    # guest cluster 10: data cluster past the end of the file
    l2_0 = l1[0] & OFFSET_MASK
    struct.pack_into(">Q", buf, l2_0 + 10 * 8, past | COPIED)
    # guest [4 MiB, 6 MiB): L2 table past the end of the file
    struct.pack_into(">Q", buf, h["l1_offset"] + 2 * 8, (past + 8 * c) | COPIED)
    img.write_bytes(bytes(buf))
    m = mount(img)
    fd = os.open(m.disk, os.O_RDONLY)
    try:
        for off, n in (
            (10 * c, c),
            (10 * c + 100, 10),
            (9 * c, 2 * c),
            (4 * MiB, 4096),
            (5 * MiB + 7, 100),
        ):
            with pytest.raises(OSError) as ei:
                os.pread(fd, n, off)
            assert ei.value.errno == errno.EIO, f"read {n} at {off}: {ei.value!r}"
        for off, n in (
            (0, 10 * c),
            (11 * c, 4 * MiB - 11 * c),
            (6 * MiB, 2 * MiB),
            (3 * MiB, 4096),
        ):
            assert os.pread(fd, n, off) == b"\x11" * n, f"good range {off}+{n}"
        with pytest.raises(OSError) as ei:
            os.pread(fd, c, 10 * c)
        assert ei.value.errno == errno.EIO
        assert os.pread(fd, 100, 0) == b"\x11" * 100
    finally:
        os.close(fd)
    assert m.proc.poll() is None, "daemon died on corrupt metadata"
    assert m.unmount() == 0
    m.assert_no_traceback()
