"""disk.raw reads byte for byte what QEMU reads, in every qcow2 layout QEMU's own tools make.

Every image is built by qemu-img / qemu-io (never by hand), then mounted read-only and
read-write. The oracle is ``qemu-img convert -O raw IMG REF.raw`` of the very same image
(the active layer, through the whole backing chain, with the external data file):

- disk.raw read sequentially equals REF.raw (first differing offset reported), and is
  exactly the virtual size long (st_size and EOF);
- unaligned pread()s at odd offsets and lengths, crossing cluster (and subcluster) boundaries
  and the end of the disk, return what pread() on REF.raw returns;
- a read-only mount leaves every file of the image (chain, data file) byte for byte unchanged;
- a read-write mount without writes leaves the image clean for ``qemu-img check``, the guest
  content unchanged for QEMU, and the backing files unchanged.

Layouts: compat 0.10/1.1 x cluster sizes 512/4K/64K/2M; refcount_bits 1..64; lazy refcounts
(clean and with the dirty bit set); zlib/zstd compressed clusters (convert -c, qemu-io write -c,
and uncompressed writes over them); backing chains qcow2 over qcow2 over raw with relative and
absolute names and smaller backing files; extended L2 with subcluster writes over a backing
file; external data files (raw and not); preallocation metadata/falloc/full; internal snapshots;
persistent bitmaps; a virtual size that is not a multiple of the cluster size.

Every image gets normal, unallocated, zero-plain and zero-allocated clusters where the layout
allows them (``write -z`` on an allocated cluster without -u leaves a zero-alloc cluster whose
host cluster still holds the old data, so a reader that ignores the zero flag is caught).

``qcowfs info --json`` is compared with ``qemu-img info --output=json`` on the same images.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import needs_fuse, sha256
from support.images import create

from qcowfs_dev.oracles import assert_clean, qemu_img, qemu_info, qemu_io, qemu_map, run

KiB = 1 << 10
MiB = 1 << 20
CHUNK = 1 << 20


# ----------------------------------------------------------------------------- built images


@dataclass
class Built:
    name: str
    image: Path
    ref: Path  # qemu-img convert -O raw of image
    vsize: int
    cluster: int
    backing: list = field(default_factory=list)  # backing files (never written by a mount)
    data_files: list = field(default_factory=list)  # external data files

    @property
    def files(self) -> list:
        return [self.image, *self.backing, *self.data_files]


def rnd_bytes(seed: str, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def rnd_file(d: Path, name: str, n: int) -> Path:
    """A file of n deterministic random bytes (source for qemu-io write -s)."""
    p = d / name
    p.write_bytes(rnd_bytes(f"{d.name}/{name}", n))
    return p


def std_writes(d: Path, c: int, v: int) -> list:
    """qemu-io commands leaving normal, unaligned, random, zero-plain, zero-alloc, discarded and
    unallocated clusters in an image of cluster size c and virtual size v (v >= 32 * c)."""
    assert v >= 32 * c
    rnd = rnd_file(d, "std-rnd.bin", 2 * c + 8 * KiB)
    return [
        f"write -P 0x11 0 {c}",  # cluster 0: normal
        f"write -P 0x22 {c + 123} {2 * c + 7}",  # unaligned, clusters 1..3
        f"write -s {rnd} {3 * c + 1} {c + c // 2}",  # random, unaligned, clusters 3..4
        f"write -P 0x33 {5 * c} {3 * c}",  # clusters 5, 6, 7
        f"write -P 0x34 {5 * c + 17} 100",  # small overwrite inside a normal cluster
        f"write -z {6 * c} {c}",  # 6: zero-alloc (v3), old data stays in the host cluster
        f"write -z -u {7 * c} {c}",  # 7: zero-plain (v3) / deallocated
        f"write -z {5 * c + c // 2 + 3} {c // 4}",  # unaligned zeroes inside cluster 5
        f"write -z {10 * c} {2 * c}",  # zeroes on unallocated clusters 10, 11
        f"write -P 0x44 {12 * c} {2 * c}",
        f"discard {12 * c} {c}",  # 12: discarded
        f"write -s {rnd} {15 * c - 333} {c + 777}",  # random, unaligned, clusters 14..15
        f"write -P 0x55 {v // 2 + 1} {c + 4097}",  # middle, unaligned
        f"write -P 0x66 {v - c - 333} {c + 333}",  # up to the very end of the disk
    ]


def map_kinds(image: Path) -> set:
    """Kinds of clusters of the top layer, from qemu-img map."""
    kinds = set()
    for e in qemu_map(image):
        if e["depth"] != 0 or not e["present"]:
            kinds.add("unallocated")
        elif e["data"]:
            kinds.add("data")
        elif e["zero"] and "offset" in e:
            kinds.add("zero-alloc")
        elif e["zero"]:
            kinds.add("zero-plain")
    return kinds


def basic(
    d: Path, *opts: str, cluster: int = 65536, vsize: int = 8 * MiB, check_kinds: bool = True
) -> dict:
    img = create(d / "img.qcow2", vsize, f"cluster_size={cluster}", *opts)
    qemu_io(img, *std_writes(d, cluster, vsize))
    if check_kinds and "compat=0.10" not in opts:
        # The premise of the layout: every kind of cluster is there.
        assert map_kinds(img) >= {"data", "zero-alloc", "zero-plain", "unallocated"}, map_kinds(img)
    return {"image": img, "cluster": cluster}


def compressible_raw(path: Path, size: int, seed: str) -> Path:
    """Raw data with zero, text, pattern and random regions, boundaries at odd offsets."""
    r = random.Random(seed)
    out = bytearray()
    text = b"qcowfs compressed cluster test line, fairly compressible. " * 4
    while len(out) < size:
        kind = r.randrange(5)
        n = r.randrange(1, 48 * KiB)
        if kind == 0:
            out += bytes(n)
        elif kind == 1:
            out += (text * (n // len(text) + 1))[:n]
        elif kind == 2:
            out += bytes([r.randrange(256)]) * n
        elif kind == 3:
            out += r.randbytes(n)
        else:  # mostly zeros with a few random bytes
            chunk = bytearray(n)
            for _ in range(8):
                chunk[r.randrange(n)] = r.randrange(256)
            out += chunk
    path.write_bytes(bytes(out[:size]))
    return path


def compressed(
    d: Path,
    ctype: str,
    cluster: int = 65536,
    compat: str = "1.1",
    vsize: int = 8 * MiB,
    overwrite: bool = False,
) -> dict:
    src = compressible_raw(d / "src.raw.in", vsize, f"{d.name}-src")
    img = d / "img.qcow2"
    qemu_img(
        "convert",
        "-c",
        "-O",
        "qcow2",
        "-o",
        f"compression_type={ctype},cluster_size={cluster},compat={compat}",
        src,
        img,
    )
    if overwrite:
        c = cluster
        rnd = rnd_file(d, "rnd.bin", 2 * c + 8 * KiB)
        qemu_io(
            img,
            f"write -P 0xa1 {c + 100} 300",  # partial overwrite of a compressed cluster
            f"write -z {3 * c} {c}",  # zero over a compressed cluster
            f"write -z -u {4 * c} {c}",
            f"discard {5 * c} {c}",
            f"write -s {rnd} {7 * c - 1000} 2000",  # across two compressed clusters
            f"discard {9 * c} {3 * c}",  # write -c needs clusters without a host cluster
            f"write -c -s {rnd} {9 * c} {c}",  # incompressible data through write -c
            f"write -c -P 0x5a {11 * c} {c}",  # compressible data through write -c
            f"write -P 0xa2 {11 * c + 7} 9",  # then partially overwritten
            f"write -z {13 * c + 5} {c}",  # unaligned zeroes over two compressed clusters
            f"write -P 0xa3 {vsize - 4 * c - 1} {3 * c}",
        )
    return {"image": img, "cluster": cluster}


def chain_relative(d: Path) -> dict:
    """raw <- qcow2 (64K, v3) <- qcow2 (4K, v2) <- qcow2 (64K, v3), relative names across
    directories, every backing file smaller than its overlay, data in every layer."""
    (d / "base").mkdir()
    (d / "mid").mkdir()
    base = d / "base" / "base.raw"
    base.write_bytes(rnd_bytes(f"{d.name}-base", 3 * MiB + 1000))
    l1 = create(
        d / "mid" / "l1.qcow2",
        6 * MiB,
        "cluster_size=65536",
        "compat=1.1",
        backing="../base/base.raw",
        backing_fmt="raw",
    )
    qemu_io(
        l1,
        "write -P 0xa1 100000 70000",  # partial clusters: the rest comes from base
        f"write -z {1 * MiB} 64k",  # zero cluster hiding base data
        f"write -z {1 * MiB + 128 * KiB + 5} 1000",  # unaligned zeroes over base data
        f"write -P 0xa2 {3 * MiB - 500} 2000",  # across the end of base
        f"write -P 0xa3 {5 * MiB + 7} 100",  # beyond the end of base
        f"discard {2 * MiB} 64k",
    )
    l2 = create(
        d / "mid" / "l2.qcow2",
        10 * MiB,
        "cluster_size=4096",
        "compat=0.10",
        backing="l1.qcow2",
        backing_fmt="qcow2",
    )
    rnd = rnd_file(d, "rnd.bin", 64 * KiB)
    qemu_io(
        l2,
        f"write -P 0xb1 {1 * MiB + 2048} 10000",
        f"write -z {2 * MiB + 4096} 8192",
        f"write -P 0xb2 {6 * MiB - 100} 300",  # across the end of l1
        f"write -s {rnd} {8 * MiB + 3} 5000",
    )
    top = create(
        d / "top.qcow2",
        16 * MiB,
        "cluster_size=65536",
        "compat=1.1",
        backing="mid/l2.qcow2",
        backing_fmt="qcow2",
    )
    qemu_io(
        top,
        "write -P 0xc1 0 4096",  # partial cluster over three lower layers
        f"write -z -u {1 * MiB + 128 * KiB} 64k",
        f"write -z {3 * MiB} 64k",  # zero over base data
        f"write -P 0xc2 {10 * MiB - 1} 2",  # across the end of l2
        f"write -s {rnd} {15 * MiB + 999} 30000",
        f"write -P 0xc3 {2 * MiB + 100} 70000",
        f"write -z {2 * MiB + 64 * KiB} 64k",
    )  # zero-alloc over l2 data
    return {"image": top, "cluster": 65536, "backing": [l2, l1, base]}


def chain_absolute(d: Path) -> dict:
    """raw <- qcow2 (512, v2) <- qcow2 (64K, extended L2) <- qcow2 (4K, lazy refcounts),
    absolute backing names."""
    base = d / "base.raw"
    base.write_bytes(rnd_bytes(f"{d.name}-base", 2 * MiB + 512))
    a = create(
        d / "a.qcow2",
        4 * MiB,
        "cluster_size=512",
        "compat=0.10",
        backing=str(base),
        backing_fmt="raw",
    )
    qemu_io(
        a,
        "write -P 0x1a 1000 3000",
        f"write -P 0x1b {2 * MiB - 10} 700",
        f"write -z {1 * MiB} 4096",
    )
    b = create(
        d / "b.qcow2",
        6 * MiB,
        "cluster_size=65536",
        "extended_l2=on",
        backing=str(a),
        backing_fmt="qcow2",
    )
    qemu_io(
        b,
        "write -P 0x2a 2048 2048",
        "write -z 6144 2048",
        f"write -P 0x2b {4 * MiB - 1024} 4096",
        f"write -z -u {1 * MiB} 64k",
        "write -c -P 0x2c 128k 64k",
    )
    top = create(
        d / "top.qcow2",
        8 * MiB,
        "cluster_size=4096",
        "lazy_refcounts=on",
        backing=str(b),
        backing_fmt="qcow2",
    )
    qemu_io(
        top,
        "write -P 0x3a 4095 2",
        f"write -z {1 * MiB + 4096} 4096",
        f"write -P 0x3b {6 * MiB - 5} 10",
        f"write -P 0x3c {8 * MiB - 4096} 4096",
        "write -z 2048 1024",
    )
    return {"image": top, "cluster": 4096, "backing": [b, a, base]}


def extended_l2(d: Path, cluster: int, with_backing: bool = True) -> dict:
    """Subcluster-sized writes, zero subclusters, and subclusters falling through to backing."""
    c = cluster
    sc = c // 32
    v = 8 * MiB
    backing = []
    kw = {}
    if with_backing:
        base = create(d / "base.qcow2", 6 * MiB, "cluster_size=65536")
        rnd = rnd_file(d, "base-rnd.bin", 6 * MiB)
        qemu_io(base, f"write -s {rnd} 0 {6 * MiB}")
        backing = [base]
        kw = {"backing": "base.qcow2", "backing_fmt": "qcow2"}
    img = create(d / "img.qcow2", v, "extended_l2=on", f"cluster_size={c}", **kw)
    rnd = rnd_file(d, "rnd.bin", 2 * c + 8 * KiB)
    cmds = []
    for k in range(4):  # one subcluster (and 2 KiB) at odd subclusters of clusters 0..3
        for j in (0, 3, 7, 15):
            cmds.append(f"write -P {0x10 + k} {k * c + (2 * j + 1) * sc} {sc}")
        cmds.append(f"write -P {0x20 + k} {k * c + 21 * sc} 2048")
    cmds += [
        f"write -z {1 * c + 4 * sc} {2 * sc}",  # zero subclusters in an allocated cluster
        f"write -z {5 * c + 2 * sc} {sc}",  # zero subcluster in an unallocated cluster
        f"write -z -u {6 * c + 6 * sc} {3 * sc}",
        f"write -P 0x77 {7 * c + sc + 100} 300",  # part of a subcluster: the rest from backing
        f"write -s {rnd} {8 * c - 3 * sc - 7} {6 * sc + 11}",  # across a cluster boundary
        f"write -P 0x99 {10 * c} {c}",  # full cluster
        f"write -z {10 * c + 3 * sc} {sc}",  # then one subcluster zeroed
        f"write -c -P 0x31 {12 * c} {c}",  # compressed cluster
        f"write -z {13 * c} {2 * c}",  # whole clusters zeroed over backing data
        f"write -P 0x88 {16 * c} {c}",
        f"discard {16 * c} {c}",
        f"write -P 0x42 {6 * MiB - sc - 5} {2 * sc + 10}",  # across the end of the backing file
        f"write -P 0x43 {v - 2 * sc + 1} {sc}",
    ]
    qemu_io(img, *cmds)
    return {"image": img, "cluster": c, "backing": backing}


def data_file(d: Path, raw: bool) -> dict:
    ext = d / "ext.raw"  # absolute: QEMU 7.2 resolves a relative data file against its cwd
    opt = f"data_file={ext}" + (",data_file_raw=on" if raw else "")
    img = create(d / "img.qcow2", 8 * MiB, "cluster_size=65536", opt)
    qemu_io(img, *std_writes(d, 65536, 8 * MiB))
    return {"image": img, "cluster": 65536, "data_files": [ext]}


def snapshots(d: Path, *opts: str, cluster: int = 65536, resize: bool = False) -> dict:
    c = cluster
    v = 8 * MiB
    img = create(d / "img.qcow2", v, f"cluster_size={c}", *opts)
    rnd = rnd_file(d, "rnd.bin", 4 * c)
    qemu_io(
        img,
        f"write -P 0x01 0 {8 * c}",
        f"write -s {rnd} {9 * c + 5} {3 * c}",
        f"write -P 0x02 {v - c} {c}",
    )
    qemu_img("snapshot", "-c", "s1", img)
    qemu_io(
        img,
        f"write -P 0x03 {c + 99} {c}",  # COW of clusters shared with s1
        f"write -z {3 * c} {c}",
        f"discard {4 * c} {c}",
        f"write -P 0x04 {20 * c} {c}",
    )
    qemu_img("snapshot", "-c", "s2", img)
    if resize:
        qemu_img("resize", img, str(12 * MiB))
        v = 12 * MiB
    qemu_io(
        img,
        f"write -P 0x05 {2 * c - 1} 2",
        f"write -z -u {5 * c} {c}",
        f"write -z {10 * c} {c}",
        f"write -P 0x06 {20 * c + 1} 10",
        f"discard {9 * c} {c}",
        f"write -P 0x07 {v - 3 * c - 7} {2 * c}",
    )
    return {"image": img, "cluster": c}


def lazy_dirty(d: Path) -> dict:
    """Lazy refcounts, the process killed after writing: the dirty bit stays set."""
    img = create(d / "img.qcow2", 8 * MiB, "cluster_size=65536", "lazy_refcounts=on")
    qemu_io(img, *std_writes(d, 65536, 8 * MiB))
    p = qemu_io(
        img,
        "write -P 0x77 1M 200k",
        "write -z 3M 64k",
        "flush",
        f"sigraise {int(signal.SIGKILL)}",
        check=False,
    )
    assert p.returncode != 0
    assert qemu_info(img).get("dirty-flag") is True, "the image should have been left dirty"
    return {"image": img, "cluster": 65536}


def bitmaps(d: Path) -> dict:
    img = create(d / "img.qcow2", 8 * MiB, "cluster_size=65536")
    qemu_img("bitmap", "--add", img, "b0")
    qemu_img("bitmap", "--add", "-g", "128K", img, "b1")
    qemu_img("bitmap", "--disable", img, "b1")
    qemu_io(img, *std_writes(d, 65536, 8 * MiB))
    return {"image": img, "cluster": 65536}


def prealloc(d: Path, mode: str, *opts: str) -> dict:
    img = create(d / "img.qcow2", 8 * MiB, "cluster_size=65536", f"preallocation={mode}", *opts)
    qemu_io(img, *std_writes(d, 65536, 8 * MiB))
    return {"image": img, "cluster": 65536}


LAYOUTS = {}
for _compat in ("0.10", "1.1"):
    for _cl in (512, 4096, 65536, 2 * MiB):
        LAYOUTS[f"v{_compat}-c{_cl}"] = lambda d, compat=_compat, cl=_cl: basic(
            d, f"compat={compat}", cluster=cl, vsize=64 * MiB if cl == 2 * MiB else 8 * MiB
        )
for _bits in (1, 2, 4, 8, 32, 64):  # refcount_bits=16 (the default) is v1.1-c4096
    LAYOUTS[f"refcount{_bits}"] = lambda d, bits=_bits: basic(
        d, f"refcount_bits={bits}", cluster=4096
    )
LAYOUTS["refcount64-c512"] = lambda d: basic(d, "refcount_bits=64", cluster=512)
LAYOUTS["lazy"] = lambda d: basic(d, "lazy_refcounts=on")
LAYOUTS["lazy-dirty"] = lazy_dirty
LAYOUTS["odd-vsize"] = lambda d: basic(d, cluster=65536, vsize=8 * MiB + 1536)
LAYOUTS["zlib"] = lambda d: compressed(d, "zlib")
LAYOUTS["zstd"] = lambda d: compressed(d, "zstd")
LAYOUTS["zlib-v2"] = lambda d: compressed(d, "zlib", compat="0.10")
LAYOUTS["zlib-c512"] = lambda d: compressed(d, "zlib", cluster=512, vsize=2 * MiB)
LAYOUTS["zstd-c2M"] = lambda d: compressed(d, "zstd", cluster=2 * MiB, vsize=24 * MiB)
LAYOUTS["zlib-mixed"] = lambda d: compressed(d, "zlib", overwrite=True)
LAYOUTS["zstd-mixed"] = lambda d: compressed(d, "zstd", overwrite=True)
LAYOUTS["zstd-mixed-c4096"] = lambda d: compressed(d, "zstd", cluster=4096, overwrite=True)
LAYOUTS["chain-relative"] = chain_relative
LAYOUTS["chain-absolute"] = chain_absolute
LAYOUTS["extl2-c65536"] = lambda d: extended_l2(d, 65536)
LAYOUTS["extl2-c32768"] = lambda d: extended_l2(d, 32768)
LAYOUTS["extl2-nobacking"] = lambda d: extended_l2(d, 65536, with_backing=False)
LAYOUTS["data-file"] = lambda d: data_file(d, raw=False)
LAYOUTS["data-file-raw"] = lambda d: data_file(d, raw=True)
LAYOUTS["prealloc-metadata"] = lambda d: prealloc(d, "metadata")
LAYOUTS["prealloc-metadata-v2"] = lambda d: prealloc(d, "metadata", "compat=0.10")
LAYOUTS["prealloc-falloc"] = lambda d: prealloc(d, "falloc")
LAYOUTS["prealloc-full"] = lambda d: prealloc(d, "full")
LAYOUTS["snapshots-v2-c4096"] = lambda d: snapshots(d, "compat=0.10", cluster=4096)
LAYOUTS["snapshots-resized"] = lambda d: snapshots(d, resize=True)
LAYOUTS["bitmaps"] = bitmaps

#: the layouts scripts/test --quick mounts (one of each family; the whole matrix is marked slow)
QUICK_LAYOUTS = (
    "v0.10-c65536",
    "v1.1-c512",
    "refcount1",
    "lazy-dirty",
    "zstd-mixed",
    "chain-relative",
    "extl2-c32768",
    "data-file",
    "snapshots-resized",
    "bitmaps",
)
MOUNT_LAYOUTS = [
    x if x in QUICK_LAYOUTS else pytest.param(x, marks=pytest.mark.slow) for x in LAYOUTS
]


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """build(layout, copy) -> Built: the image made once per (layout, copy) in its own directory,
    with its reference raw image made by qemu-img convert."""
    cache = {}

    def get(name: str, copy: str = "ro") -> Built:
        key = (name, copy)
        if key not in cache:
            d = tmp_path_factory.mktemp(f"{name}-{copy}")
            spec = LAYOUTS[name](d)
            img = spec["image"]
            refdir = tmp_path_factory.mktemp(f"{name}-{copy}-ref")
            ref = refdir / "ref.raw"
            qemu_img("convert", "-O", "raw", img, ref)
            vsize = qemu_info(img)["virtual-size"]
            assert ref.stat().st_size == vsize
            cache[key] = Built(
                name,
                img,
                ref,
                vsize,
                spec["cluster"],
                backing=spec.get("backing", []),
                data_files=spec.get("data_files", []),
            )
        return cache[key]

    return get


# ----------------------------------------------------------------------------- comparisons


def assert_same_as_ref(disk: Path, ref: Path, vsize: int) -> None:
    """Sequential read of the whole disk equals the reference, and ends exactly at vsize."""
    assert os.stat(disk).st_size == vsize, (
        f"st_size {os.stat(disk).st_size} != virtual size {vsize}"
    )
    off = 0
    with open(disk, "rb", buffering=0) as f, open(ref, "rb") as r:
        while True:
            a = f.read(CHUNK)
            b = r.read(CHUNK)
            if a != b:
                n = min(len(a), len(b))
                first = next((i for i in range(n) if a[i] != b[i]), n)
                pos = off + first
                got = a[first : first + 16].hex()
                want = b[first : first + 16].hex()
                raise AssertionError(
                    f"disk.raw differs from qemu-img convert at byte {pos} (0x{pos:x}): "
                    f"read {len(a)} bytes at {off}, expected {len(b)}; "
                    f"disk.raw has {got!r}, QEMU has {want!r}"
                )
            if not a:
                break
            off += len(a)
    assert off == vsize, f"disk.raw read {off} bytes before EOF, virtual size is {vsize}"


def unaligned_reads(name: str, c: int, vsize: int) -> list:
    """(offset, length) pairs at odd places: across cluster/subcluster boundaries, the middle,
    the end of the disk and beyond it."""
    r = random.Random(f"preads-{name}")
    sc = max(c // 32, 512)
    reads = []
    for k in list(range(1, 18)) + [vsize // c // 2, vsize // c // 2 + 1, vsize // c - 1]:
        b = k * c
        if b >= vsize:
            continue
        back = r.randrange(1, min(c, 4096))
        reads.append((b - back, back + r.randrange(1, 5000)))  # across the boundary
        reads.append((b - 1, 2))
        reads.append((b + sc - 3, 7))  # across a subcluster boundary
    reads.append((c - 7, 3 * c + 13))  # several clusters in one read
    reads.append((c // 2 + 1, min(5 * c, 3 * MiB) + 1))
    for _ in range(40):
        off = r.randrange(vsize)
        reads.append((off, r.randrange(1, min(3 * c, 300 * KiB))))
    reads += [
        (vsize - 5, 100),
        (vsize - c - 1, c + 10),
        (vsize, 10),
        (vsize + 12345, 7),
        (0, 1),
        (1, 1),
    ]
    return reads


def assert_preads_match(disk: Path, ref: Path, reads) -> None:
    fd = os.open(disk, os.O_RDONLY)
    rfd = os.open(ref, os.O_RDONLY)
    try:
        for off, n in reads:
            got = os.pread(fd, n, off)
            want = os.pread(rfd, n, off)
            if got != want:
                first = next(
                    (i for i in range(min(len(got), len(want))) if got[i] != want[i]),
                    min(len(got), len(want)),
                )
                raise AssertionError(
                    f"pread({n}, offset {off}) returned {len(got)} bytes, QEMU {len(want)}; "
                    f"first difference at byte {off + first} (0x{off + first:x}): "
                    f"{got[first : first + 8].hex()!r} != {want[first : first + 8].hex()!r}"
                )
    finally:
        os.close(fd)
        os.close(rfd)


def hashes(files) -> dict:
    return {str(f): sha256(f) for f in files}


# ----------------------------------------------------------------------------- tests


@needs_fuse
@pytest.mark.parametrize("layout", MOUNT_LAYOUTS)
def test_read_only_mount_reads_like_qemu(build, mount, layout):
    b = build(layout, "ro")
    before = hashes(b.files)
    m = mount(b.image, read_only=True)
    assert_same_as_ref(m.disk, b.ref, b.vsize)
    assert_preads_match(m.disk, b.ref, unaligned_reads(layout, b.cluster, b.vsize))
    rc = m.unmount()
    assert rc == 0, f"daemon exited {rc}: {m.proc.stderr.read() if m.proc.stderr else ''}"
    m.assert_no_traceback()
    assert hashes(b.files) == before, "a read-only mount changed the image files"


@needs_fuse
@pytest.mark.parametrize("layout", MOUNT_LAYOUTS)
def test_read_write_mount_reads_like_qemu(build, mount, layout, tmp_path):
    b = build(layout, "rw")
    backing_before = hashes(b.backing)
    m = mount(b.image, read_only=False)
    assert_same_as_ref(m.disk, b.ref, b.vsize)
    assert_preads_match(m.disk, b.ref, unaligned_reads(layout, b.cluster, b.vsize))
    rc = m.unmount()
    assert rc == 0, f"daemon exited {rc}: {m.proc.stderr.read() if m.proc.stderr else ''}"
    m.assert_no_traceback()
    assert_clean(b.image)
    assert hashes(b.backing) == backing_before, "a read-write mount changed a backing file"
    after = tmp_path / "after.raw"
    qemu_img("convert", "-O", "raw", b.image, after)
    assert sha256(after) == sha256(b.ref), (
        "a read-write mount without writes changed the guest content"
    )


INFO_LAYOUTS = [
    "v0.10-c512",
    "v1.1-c2097152",
    "refcount1",
    "refcount64",
    "lazy",
    "lazy-dirty",
    "zlib",
    "zstd-mixed",
    "chain-relative",
    "chain-absolute",
    "extl2-c32768",
    "data-file",
    "data-file-raw",
    "snapshots-resized",
    "bitmaps",
    "odd-vsize",
]

TOP_KEYS = [
    "virtual-size",
    "cluster-size",
    "backing-filename",
    "backing-filename-format",
    "full-backing-filename",
]
DATA_KEYS = [
    "compat",
    "lazy-refcounts",
    "refcount-bits",
    "corrupt",
    "extended-l2",
    "compression-type",
    "data-file",
    "data-file-raw",
]


def _bitmaps(data: dict):
    return sorted(
        (
            {"name": x["name"], "granularity": x["granularity"], "flags": sorted(x["flags"])}
            for x in data.get("bitmaps", [])
        ),
        key=lambda x: x["name"],
    )


@pytest.mark.parametrize("layout", INFO_LAYOUTS)
def test_info_json_agrees_with_qemu_img(build, layout):
    b = build(layout, "ro")
    want = qemu_info(b.image)
    before = hashes(b.files)
    p = run([sys.executable, "-m", "qcowfs", "info", "--json", b.image])
    got = json.loads(p.stdout)
    assert hashes(b.files) == before, "qcowfs info changed the image"
    assert got.get("format") == "qcow2"
    for k in TOP_KEYS:
        if k in want:
            assert got.get(k) == want[k], f"{k}: qcowfs {got.get(k)!r}, qemu-img {want[k]!r}"
    if "backing-filename" not in want:
        assert "backing-filename" not in got, (
            f"qcowfs prints backing-filename {got['backing-filename']!r}, qemu-img none"
        )
    wd = want["format-specific"]["data"]
    gd = got["format-specific"]["data"]
    assert got["format-specific"]["type"] == "qcow2"
    for k in DATA_KEYS:
        if k in wd:
            assert gd.get(k) == wd[k], (
                f"format-specific.data.{k}: qcowfs {gd.get(k)!r}, qemu-img {wd[k]!r}"
            )
    if "bitmaps" in wd:
        assert _bitmaps(gd) == _bitmaps(wd)
