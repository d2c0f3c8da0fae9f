"""The workloads (each: a pristine image made by QEMU, then guest writes, flushes, bitmap
commands and closes through the Driver), the per-crash-point sampling bounds, and record(): run
one workload through the recording factory and keep its log, model and pristine bytes."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import zlib
from typing import Any, Callable, Iterable, Optional

from qcowfs.engine.cluster_map import DATA
from qcowfs.engine.image import Qcow2Image
from qcowfs_dev.oracles import qemu_img, qemu_io, qemu_raw, run
from qcowfs_dev.probes import read_header_field

from . import keyed
from .driver import BitmapSpec, BmState, Driver, Model, state_bits
from .iolog import IOLog, replay_all
from .verify import nbd_dirty_map

KiB = 1 << 10
MiB = 1 << 20


@dataclasses.dataclass
class Bounds:
    """How many crash states to draw per crash point."""

    exhaustive: int = 16  # enumerate all subsets when 2**n <= this
    prefixes: int = 6  # in-order prefixes of the epoch (evenly spaced when more)
    drop_one: int = 3  # "every write but one"
    singles: int = 3  # "only this one write"
    random: int = 8  # random subsets
    torn: int = 3  # random subsets with some multi-sector writes torn
    max_states: int = 0  # stop after this many distinct states (0 = no limit)

    def scaled(self, k: float) -> "Bounds":
        return Bounds(
            self.exhaustive if k <= 1 else int(self.exhaustive * 4),
            max(1, int(self.prefixes * k)),
            max(1, int(self.drop_one * k)),
            max(1, int(self.singles * k)),
            max(1, int(self.random * k)),
            max(0, int(self.torn * k)),
            int(self.max_states * k) if self.max_states else 0,
        )


@dataclasses.dataclass
class Workload:
    name: str
    #: create(dir) -> dict(image=..., files=[...], snapshots={...}, pristine_bitmaps=[BitmapSpec])
    create: Callable[[str], dict[str, Any]]
    run: Callable[[Driver, random.Random], None]  # run(driver, rng)
    lazy: bool = False
    bounds: Bounds = dataclasses.field(default_factory=Bounds)
    verify: Optional[Callable[[str, str, Model], None]] = (
        None  # verify(dir, image_path_after_run, model) (e.g. table growth)
    )
    oracle_every: int = 10
    bitmap_sync: str = "close"  # the Driver's Disk(bitmap_sync=...) (reopen may switch it)
    nbd_every: int = 4  # intent mode: QEMU's NBD view of the bitmaps on every Nth new state
    #: an encrypted (LUKS) image's passphrase, None for a plain one. create() writes it to the key file
    #: keyed.KEY_FILE in its directory (keyed.write_key_file, mode 0600); the Driver and every check of
    #: a crash state open the image with it (qcowfs: Keys; QEMU's tools: the secret object, keyed.py)
    passphrase: Optional[bytes] = dataclasses.field(default=None, repr=False)


def _create(path: str, size: int, **opts: object) -> None:
    o = ",".join(f"{k}={v}" for k, v in opts.items())
    args = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if o:
        args += ["-o", o]
    run(args + [path, str(size)], cwd=os.path.dirname(os.path.abspath(path)))


def random_writes(
    d: Driver,
    rng: random.Random,
    count: int,
    flush_every: tuple[int, int] = (1, 4),
    zero_share: float = 0.1,
) -> None:
    """Allocation-heavy random writes: aligned runs of clusters, odd sizes at odd offsets, some zeros."""
    size = d.model.size
    cs = d.cluster_size
    since = 0
    next_flush = rng.randint(*flush_every)
    for _ in range(count):
        r = rng.random()
        if r < 0.35:
            n = rng.randint(1, 4)
            off = rng.randrange(0, size // cs - n + 1) * cs
            length = n * cs
        elif r < 0.65:
            length = rng.choice([512, 4096, 65536, 3 * 512])
            length = min(length, size // 4)
            off = rng.randrange(0, (size - length) // 512 + 1) * 512
        else:
            length = rng.randint(1, min(3 * cs, size // 4))
            off = rng.randrange(0, size - length + 1)
        data = bytes(length) if rng.random() < zero_share else rng.randbytes(length)
        d.write(off, data)
        since += 1
        if since >= next_flush:
            d.flush()
            since = 0
            next_flush = rng.randint(*flush_every)
    d.flush()


def wl_alloc(cluster: int, refbits: int, size: int, count: int) -> Workload:
    def create(dirname: str) -> dict[str, Any]:
        img = os.path.join(dirname, "disk.qcow2")
        _create(img, size, cluster_size=cluster, refcount_bits=refbits)
        return dict(image="disk.qcow2")

    def body(d: Driver, rng: random.Random) -> None:
        random_writes(d, rng, count)
        d.close()

    return Workload(f"alloc-c{cluster}-r{refbits}", create, body)


def wl_reftable_growth() -> Workload:
    """512 B clusters, 64-bit refcounts: a block covers 64 clusters (32 KiB), one refcount table cluster
    64 blocks (2 MiB of host file). qemu-img create makes a one-cluster table, so 4+ MiB of data must grow
    it (twice: 1 -> 2 -> 4 clusters, at least)."""
    size = 6 * MiB

    def create(dirname: str) -> dict[str, Any]:
        img = os.path.join(dirname, "disk.qcow2")
        _create(img, size, cluster_size=512, refcount_bits=64)
        assert read_header_field(img, 56, 4) == 1
        return dict(image="disk.qcow2")

    def body(d: Driver, rng: random.Random) -> None:
        # 4.5 MiB in 96 KiB..192 KiB pieces at shuffled offsets, a flush after each pair
        chunk = 192 * KiB
        offs = list(range(0, 4 * MiB + 512 * KiB, chunk))
        rng.shuffle(offs)
        for i, off in enumerate(offs):
            d.write(off, rng.randbytes(chunk - rng.choice([0, 512, 96 * KiB])))
            if i % 2:
                d.flush()
        d.flush()
        d.close()

    def verify(dirname: str, image_path: str, model: Model) -> None:
        n = read_header_field(image_path, 56, 4)
        assert n >= 3, f"refcount table did not grow (refcount_table_clusters={n})"

    return Workload(
        "reftable-growth-c512-r64",
        create,
        body,
        verify=verify,
        bounds=Bounds(exhaustive=8, prefixes=3, drop_one=1, random=2, torn=1),
    )


def wl_cow_backing(extended: bool = False) -> Workload:
    size = 4 * MiB
    cluster = 64 * KiB if extended else 4 * KiB

    def create(dirname: str) -> dict[str, Any]:
        base = os.path.join(dirname, "base.qcow2")
        _create(base, size, cluster_size=cluster)
        qemu_io(
            base,
            f"write -P 0x5a 0 {size}",
            f"write -P 0x33 {1 * MiB} {64 * KiB}",
            f"write -z {2 * MiB} {256 * KiB}",
        )
        img = os.path.join(dirname, "disk.qcow2")
        opts = dict(cluster_size=cluster, backing_file=os.path.abspath(base), backing_fmt="qcow2")
        if extended:
            opts["extended_l2"] = "on"
        _create(img, size, **opts)
        return dict(image="disk.qcow2")

    def body(d: Driver, rng: random.Random) -> None:
        # partial writes (sub-cluster, unaligned, straddling clusters) over the backing file
        cs = d.cluster_size
        for _ in range(36):
            ci = rng.randrange(0, size // cs - 2)
            off = ci * cs + rng.randrange(0, cs)
            length = rng.choice([1, 100, 512, 3000, cs // 2, cs + 777])
            length = min(length, size - off)
            if rng.random() < 0.15 and length >= cs:
                d.zero(off, length)
            else:
                d.write(off, rng.randbytes(length))
            if rng.random() < 0.45:
                d.flush()
        d.flush()
        d.close()

    return Workload("cow-backing" + ("-extl2" if extended else "-c4k"), create, body)


def wl_zero_free(compat: str = "1.1") -> Workload:
    size = 4 * MiB
    cluster = 4 * KiB

    def create(dirname: str) -> dict[str, Any]:
        img = os.path.join(dirname, "disk.qcow2")
        _create(img, size, cluster_size=cluster, compat=compat)
        return dict(image="disk.qcow2")

    def body(d: Driver, rng: random.Random) -> None:
        cs = d.cluster_size
        for _ in range(4):
            base = rng.randrange(0, size // cs - 64) * cs
            d.write(base, rng.randbytes(48 * cs))
            d.write(base + 3 * cs + 17, rng.randbytes(cs))
            d.flush()
            # zeros over whole clusters free them (zero clusters / deallocation), partial ones stay data
            for _ in range(5):
                a = base + rng.randrange(0, 40) * cs
                n = rng.randint(1, 8) * cs
                d.zero(a, n)
                if rng.random() < 0.3:
                    d.flush()
            d.zero(base + 5 * cs + 100, cs)  # straddles: partial data + nothing whole
            d.flush()
            # reallocate some of the freed clusters
            d.write(base + rng.randrange(0, 40) * cs, rng.randbytes(6 * cs))
            d.flush()
        d.close()

    return Workload(f"zero-free-c4k-compat{compat}", create, body)


def wl_snapshot() -> Workload:
    size = 4 * MiB
    cluster = 4 * KiB

    def create(dirname: str) -> dict[str, Any]:
        img = os.path.join(dirname, "disk.qcow2")
        _create(img, size, cluster_size=cluster)
        qemu_io(img, f"write -P 0x11 0 {3 * MiB}", f"write -c -P 0x22 {3 * MiB} {256 * KiB}")
        qemu_img("snapshot", "-c", "s1", img)
        qemu_io(img, f"write -P 0x44 {512 * KiB} {256 * KiB}")
        snap = qemu_raw(img, os.path.join(dirname, "s1.raw"), snapshot="s1")
        return dict(image="disk.qcow2", snapshots={"s1": snap})

    def body(d: Driver, rng: random.Random) -> None:
        cs = d.cluster_size
        for _ in range(40):
            r = rng.random()
            off = rng.randrange(0, (size - 8 * cs) // 512) * 512
            if r < 0.2:
                d.zero(off // cs * cs, rng.randint(1, 6) * cs)  # frees: drops snapshot refcounts
            elif r < 0.5:
                d.write(
                    off, rng.randbytes(rng.randint(1, 3 * cs))
                )  # partial: COW of shared clusters
            else:
                d.write(off // cs * cs, rng.randbytes(rng.randint(1, 6) * cs))
            if rng.random() < 0.45:
                d.flush()
        d.flush()
        d.close()

    return Workload("internal-snapshot-c4k", create, body, oracle_every=6)


def wl_bitmaps() -> Workload:
    """Two sessions. QEMU-made clean bitmaps q0 and gone; session 1 creates b0, writes, removes gone,
    creates b1, writes, closes (stores q0, b0, b1); session 2 reopens (in_use set again), writes,
    removes b0, writes, closes. Crash states inside the stores must show the old version in_use or
    the new one clean and exact."""
    size = 8 * MiB
    cluster = 64 * KiB

    def create(dirname: str) -> dict[str, Any]:
        img = os.path.join(dirname, "disk.qcow2")
        _create(img, size, cluster_size=cluster)
        qemu_io(img, f"write -P 0x77 0 {1 * MiB}")
        qemu_img("bitmap", "--add", "-g", "65536", img, "q0")
        qemu_img("bitmap", "--add", "-g", "16384", img, "gone")
        return dict(
            image="disk.qcow2",
            pristine_bitmaps=[BitmapSpec("q0", 65536, 0, True), BitmapSpec("gone", 16384, 0, True)],
        )

    def writes(d: Driver, rng: random.Random, n: int) -> None:
        cs = d.cluster_size
        for i in range(n):
            off = rng.randrange(0, size - 3 * cs)
            d.write(off, rng.randbytes(rng.randint(1, 2 * cs)))
            if i % 3 == 2:
                d.flush()

    def body(d: Driver, rng: random.Random) -> None:
        d.create_bitmap("b0", 4096)
        writes(d, rng, 8)
        d.flush()
        d.remove_bitmap("gone")
        d.create_bitmap("b1", 65536)
        writes(d, rng, 5)
        d.zero(4 * MiB, 2 * d.cluster_size)
        d.flush()
        d.reopen()  # stores q0, b0, b1; then marks them in_use again
        writes(d, rng, 4)
        d.remove_bitmap("b0")
        writes(d, rng, 3)
        d.close()  # stores q0, b1 over their previous versions

    return Workload(
        "bitmaps-create-remove-store",
        create,
        body,
        bounds=Bounds(exhaustive=32, prefixes=8, drop_one=4, singles=4, random=10, torn=3),
    )


def wl_lazy() -> Workload:
    size = 4 * MiB

    def create(dirname: str) -> dict[str, Any]:
        img = os.path.join(dirname, "disk.qcow2")
        _create(img, size, cluster_size=4096, lazy_refcounts="on")
        qemu_io(img, f"write -P 0x66 0 {1 * MiB}")
        return dict(image="disk.qcow2")

    def body(d: Driver, rng: random.Random) -> None:
        random_writes(d, rng, 50, zero_share=0.25)
        d.close()

    return Workload("lazy-refcounts-c4k", create, body, lazy=True)


def wl_data_file() -> Workload:
    size = 4 * MiB

    def create(dirname: str) -> dict[str, Any]:
        img = os.path.join(dirname, "disk.qcow2")
        _create(img, size, cluster_size=4096, data_file="disk.data")
        return dict(image="disk.qcow2", files=["disk.qcow2", "disk.data"])

    def body(d: Driver, rng: random.Random) -> None:
        random_writes(d, rng, 30, zero_share=0.0)
        d.close()

    return Workload("external-data-file-c4k", create, body)


def wl_refblock_siblings() -> Workload:
    """The smallest workload that makes one allocation create several refcount blocks at once, some
    of them placed where only a sibling new block covers them (512 B clusters, 64-bit refcounts: a
    block covers 64 clusters). 58 clusters at 0 leave the first free cluster at 63; the 64 KiB write
    then needs blocks 1-3, placed at clusters 63-65: blocks 2 and 3 are refcounted by block 1."""

    def create(dirname: str) -> dict[str, Any]:
        _create(os.path.join(dirname, "disk.qcow2"), 1 * MiB, cluster_size=512, refcount_bits=64)
        return dict(image="disk.qcow2")

    def body(d: Driver, rng: random.Random) -> None:
        d.write(0, rng.randbytes(58 * 512))
        d.flush()
        d.write(512 * KiB, rng.randbytes(64 * KiB))
        d.flush()
        d.close()

    return Workload("refblock-siblings-c512-r64", create, body, bounds=Bounds(exhaustive=64))


def _pristine_bitmap(
    img: str, name: str, granularity: int, enabled: bool = True, key_file: str = ""
) -> BitmapSpec:
    """A bitmap of the pristine image, its dirty ranges as QEMU serves them (qemu-nbd -B; an encrypted
    image opened with the key in key_file)."""
    initial = tuple((off, n) for off, n, dirty in nbd_dirty_map(img, name, key_file) if dirty)
    return BitmapSpec(name, granularity, 0, True, enabled, initial)


def _write_or_zero(
    d: Driver, rng: random.Random, off: int, length: int, k: int, flush_every: int
) -> None:
    """One guest write (one in eight or so of zeros), then a guest flush after every flush_every."""
    if rng.random() < 0.12:
        d.zero(off, length)
    else:
        d.write(off, rng.randbytes(length))
    if k % flush_every == flush_every - 1:
        d.flush()


def _intent_writes(
    d: Driver, rng: random.Random, n: int, spots: list, flush_every: int = 3
) -> None:
    """n guest writes near the given offsets (sub-granule, unaligned, multi-granule, some zeros), a
    guest flush after every flush_every of them."""
    size = d.model.size
    for k in range(n):
        base = rng.choice(spots)
        length = rng.choice([1, 700, 4096, 9000, 65536 + 123, 200 * KiB])
        off = min(max(0, base + rng.randrange(-64 * KiB, 64 * KiB)), size - length)
        _write_or_zero(d, rng, off, length, k, flush_every)


def wl_intent_bitmaps() -> Workload:
    """Intent mode (bitmap_sync="intent"), 24 MiB disk (three 8 MiB intent regions), 64 KiB clusters.
    Pristine (QEMU-made): q0 (64 KiB granules) and gone (16 KiB) holding the bits of QEMU's own writes,
    qd (4 KiB) disabled. Session 1: activation stores them all with every data cluster allocated;
    create b0 during the mount; first writes into clean granules of every region, a write straddling
    a region boundary, writes over dirty granules; remove gone; disable q0, write, enable q0, write over
    the same places; clear b0, write over its old dirty granules; enable qd; create b1 (16 MiB granules,
    larger than a region, the last one partial); merge q0 into b0; close (exact bits). Session 2 (intent
    again): writes over granules dirty from session 1 and next to them, clear q0, remove b0, disable b1,
    writes, close. Session 3: create b2 (512 B granules), writes, merge b1 (disabled, 16 MiB granules)
    into it, enable b1, writes, clear b2, writes, remove q0, writes, close."""
    size = 24 * MiB

    def create(dirname: str) -> dict[str, Any]:
        img = os.path.join(dirname, "disk.qcow2")
        _create(img, size, cluster_size=65536)
        qemu_img("bitmap", "--add", "-g", "65536", img, "q0")
        qemu_img("bitmap", "--add", "-g", "16384", img, "gone")
        qemu_img("bitmap", "--add", "--disable", "-g", "4096", img, "qd")
        # QEMU records these in q0 and gone (persistent, enabled), not in qd
        qemu_io(img, f"write -P 0x77 0 {1 * MiB}", f"write -P 0x78 {20 * MiB} {192 * KiB}")
        return dict(
            image="disk.qcow2",
            pristine_bitmaps=[
                _pristine_bitmap(img, "q0", 65536),
                _pristine_bitmap(img, "gone", 16384),
                _pristine_bitmap(img, "qd", 4096, enabled=False),
            ],
        )

    def body(d: Driver, rng: random.Random) -> None:
        R = 8 * MiB
        d.create_bitmap("b0", 4096)
        # first writes into clean granules of every region (one intent each), one straddling regions 0|1
        for r in range(3):
            d.write(
                r * R + rng.randrange(0, R - 64 * KiB),
                rng.randbytes(rng.choice([512, 5000, 64 * KiB])),
            )
        d.write(R - 3000, rng.randbytes(6000))
        d.flush()
        spots = [off for off, _ in d.writes]
        _intent_writes(d, rng, 6, spots)  # over dirty granules (same regions: no new intent)
        d.remove_bitmap("gone")
        d.disable_bitmap("q0")
        _intent_writes(d, rng, 4, [2 * R + 1 * MiB, 2 * R + 5 * MiB])
        d.enable_bitmap("q0")
        _intent_writes(d, rng, 4, [2 * R + 1 * MiB, 2 * R + 5 * MiB, 0])
        d.clear_bitmap("b0")
        _intent_writes(d, rng, 5, spots)  # over b0's old dirty granules: first writes again for b0
        d.enable_bitmap("qd")
        _intent_writes(d, rng, 3, [R + 2 * MiB, 20 * MiB])
        d.create_bitmap("b1", 16 * MiB)
        d.merge_bitmap("q0", "b0")
        _intent_writes(d, rng, 4, spots + [R + 2 * MiB])
        d.flush()
        d.reopen()  # clean close stores exact bits; the new open stores them with every cluster allocated
        _intent_writes(d, rng, 5, [off for off, _ in d.writes[-12:]] + [3 * R - 100 * KiB])
        d.clear_bitmap("q0")
        d.remove_bitmap("b0")
        d.disable_bitmap("b1")
        _intent_writes(d, rng, 4, spots)
        d.reopen()
        d.create_bitmap("b2", 512)
        _intent_writes(d, rng, 5, spots + [2 * R + 3 * MiB], flush_every=2)
        d.merge_bitmap("b1", "b2")
        d.enable_bitmap("b1")
        _intent_writes(d, rng, 5, spots + [R + 7 * MiB])
        d.clear_bitmap("b2")
        _intent_writes(d, rng, 4, spots)
        d.remove_bitmap("q0")
        _intent_writes(d, rng, 3, spots, flush_every=2)
        d.close()

    return Workload(
        "intent-bitmaps-c64k",
        create,
        body,
        bitmap_sync="intent",
        nbd_every=8,
        bounds=Bounds(exhaustive=16, prefixes=5, drop_one=3, singles=3, random=6, torn=3),
    )


def wl_intent_data_file() -> Workload:
    """Intent mode with 1 KiB clusters (an intent region of p's bitmap data, 2 KiB, spans two clusters:
    written piecewise, torn) and an external data file (the intent's fdatasync is of the image, the data goes
    to the data file). 9 MiB + 3.5 KiB disk: the second intent region is partial, c's last granule too
    (and qcowfs reads small clusters slowly: a small disk). Pristine: p (512 B granules) holding QEMU's writes. Session 1
    (intent): create c (64 KiB) and writes, clear p, disable c, writes, enable c, writes, close.
    Session 2 switches to close mode (bitmaps marked in_use in place over intent-stored ones, then
    stored exactly), session 3 back to intent mode (writes, clear c, writes); each closes."""
    size = 9 * MiB + 3584

    def create(dirname: str) -> dict[str, Any]:
        img = os.path.join(dirname, "disk.qcow2")
        _create(img, size, cluster_size=1024, data_file="disk.data")
        run(["qemu-img", "bitmap", "--add", "-g", "512", img, "p"], cwd=dirname)
        run(
            [
                "qemu-io",
                "-f",
                "qcow2",
                "-c",
                f"write -P 0x55 {3 * MiB} {64 * KiB}",
                "-c",
                f"write -P 0x56 {9 * MiB + 512} 1000",
                img,
            ],
            cwd=dirname,
        )
        return dict(
            image="disk.qcow2",
            files=["disk.qcow2", "disk.data"],
            pristine_bitmaps=[_pristine_bitmap(img, "p", 512)],
        )

    def body(d: Driver, rng: random.Random) -> None:
        R = 8 * MiB
        spots = [0, 3 * MiB, R - 40 * KiB, R + 512 * KiB, size - 5000]
        d.create_bitmap("c", 65536)
        _intent_writes(d, rng, 10, spots, flush_every=2)
        d.clear_bitmap("p")
        _intent_writes(d, rng, 6, spots)
        d.disable_bitmap("c")
        _intent_writes(d, rng, 4, spots)
        d.enable_bitmap("c")
        _intent_writes(d, rng, 6, spots)
        d.flush()
        d.reopen(bitmap_sync="close")
        _intent_writes(d, rng, 4, spots)
        d.flush()
        d.reopen(bitmap_sync="intent")
        _intent_writes(d, rng, 6, spots, flush_every=2)
        d.clear_bitmap("c")
        _intent_writes(d, rng, 4, spots)
        d.close()

    return Workload(
        "intent-data-file-c1k",
        create,
        body,
        bitmap_sync="intent",
        bounds=Bounds(exhaustive=16, prefixes=5, drop_one=3, singles=3, random=6, torn=3),
    )


def wl_intent_lazy() -> Workload:
    """Intent mode with lazy refcounts (the dirty bit is set while open, refcounts are written late):
    the bitmap clusters allocated by activation, creation and every store must survive both repairs
    of a dirty crash state (qemu-img check -r all, and qcowfs' refcount rebuild at its next read-write
    open), and the bitmaps must stay valid supersets. 16 MiB, 4 KiB clusters. Pristine: l (64 KiB
    granules) with QEMU's writes; create n (4 KiB), writes, clear l, writes, close; reopen, disable l,
    writes, remove n, enable l, writes, close."""
    size = 16 * MiB

    def create(dirname: str) -> dict[str, Any]:
        img = os.path.join(dirname, "disk.qcow2")
        _create(img, size, cluster_size=4096, lazy_refcounts="on")
        qemu_img("bitmap", "--add", "-g", "65536", img, "l")
        qemu_io(img, f"write -P 0x66 0 {1 * MiB}")
        return dict(image="disk.qcow2", pristine_bitmaps=[_pristine_bitmap(img, "l", 65536)])

    def body(d: Driver, rng: random.Random) -> None:
        spots = [512 * KiB, 5 * MiB, 8 * MiB - 30 * KiB, 13 * MiB]
        d.create_bitmap("n", 4096)
        _intent_writes(d, rng, 8, spots, flush_every=2)
        d.clear_bitmap("l")
        _intent_writes(d, rng, 6, spots)
        d.flush()
        d.reopen()
        d.disable_bitmap("l")
        _intent_writes(d, rng, 4, spots, flush_every=2)
        d.remove_bitmap("n")
        d.enable_bitmap("l")
        _intent_writes(d, rng, 5, spots, flush_every=2)
        d.close()

    return Workload(
        "intent-lazy-refcounts-c4k", create, body, lazy=True, bitmap_sync="intent", nbd_every=6
    )


def wl_intent_minimal() -> Workload:
    """The smallest intent-mode workload where the order of intent and data matters: QEMU wrote data
    first and added bitmap q afterwards (clean); one guest write over allocated clusters (no allocation,
    so nothing but the intent's own fdatasync separates intent and data), a second write into the
    first one's granule (its bit durable already: served as a request lane serves it, Driver._lane_write),
    a flush, close. Every subset of each flush epoch is enumerated. Not in workloads(): the negative
    controls of test_powerloss run it against a qcowfs broken on purpose (and once unbroken)."""

    def create(dirname: str) -> dict[str, Any]:
        img = os.path.join(dirname, "disk.qcow2")
        _create(img, 16 * MiB, cluster_size=65536)
        qemu_io(img, f"write -P 0x77 0 {1 * MiB}", f"write -P 0x78 {9 * MiB} {1 * MiB}")
        qemu_img("bitmap", "--add", "-g", "65536", img, "q")
        return dict(image="disk.qcow2", pristine_bitmaps=[_pristine_bitmap(img, "q", 65536)])

    def body(d: Driver, rng: random.Random) -> None:
        d.write(64 * KiB + 512, rng.randbytes(4096))
        d.write(9 * MiB + 3000, rng.randbytes(700))
        d.write(64 * KiB + 8192, rng.randbytes(1024))
        d.flush()
        d.close()

    return Workload(
        "intent-minimal",
        create,
        body,
        bitmap_sync="intent",
        nbd_every=1,
        bounds=Bounds(exhaustive=256, torn=4),
    )


def _savevm(img: str, name: str) -> None:
    """An internal snapshot with VM state, made by QEMU's savevm (a machine without devices: a few
    hundred bytes of VM state, stored past the disk's end through the snapshot's L1)."""
    p = run(
        [
            "qemu-system-x86_64",
            "-machine",
            "none",
            "-nodefaults",
            "-display",
            "none",
            "-monitor",
            "stdio",
            "-drive",
            f"if=none,id=d0,file={os.path.abspath(img)},format=qcow2",
        ],
        input=f"savevm {name}\nquit\n",
        timeout=120,
        cwd=os.path.dirname(os.path.abspath(img)),
    )
    snaps = json.loads(qemu_img("info", "--output=json", img).stdout).get("snapshots", [])
    vm = [s for s in snaps if s["name"] == name]
    assert vm and vm[0]["vm-state-size"] > 0, (
        f"savevm made no snapshot with VM state: {p.stdout} {p.stderr}"
    )


def _snapshot_image(
    dirname: str, size: int, cluster: int, bitmaps: Iterable[tuple[str, int]] = ()
) -> tuple[str, dict[str, bytes]]:
    """QEMU-made pristine image for the snapshot workloads: bitmaps (name, granularity) that record what
    follows, data, compressed clusters (some sharing a host cluster: a cluster of one byte compresses to
    a few dozen bytes), snapshot q1 (qemu-img), more data, snapshot vm1 with VM state (savevm), more data.
    Returns (image path, {name: guest bytes})."""
    img = os.path.join(dirname, "disk.qcow2")
    _create(img, size, cluster_size=cluster)
    for name, g in bitmaps:
        qemu_img("bitmap", "--add", "-g", str(g), img, name)
    qemu_io(
        img,
        f"write -P 0x11 0 {1 * MiB + 512 * KiB}",
        f"write -c -P 0x22 {3 * MiB} {256 * KiB}",
        f"write -c -P 0x23 {3 * MiB + 512 * KiB} {cluster}",
        f"write -c -P 0x24 {3 * MiB + 512 * KiB + cluster} {cluster}",
    )
    qemu_img("snapshot", "-c", "q1", img)
    qemu_io(img, f"write -P 0x44 {512 * KiB} {256 * KiB}", f"write -c -P 0x45 {2 * MiB} {64 * KiB}")
    _savevm(img, "vm1")
    qemu_io(img, f"write -P 0x55 {1 * MiB} {128 * KiB}")
    snaps = {n: qemu_raw(img, os.path.join(dirname, f"{n}.raw"), snapshot=n) for n in ("q1", "vm1")}
    return img, snaps


def _snap_writes(d: Driver, rng: random.Random, n: int, spots: list, flush_every: int = 3) -> None:
    """n guest writes at or next to `spots` (guest offsets): partial clusters (copy-on-write of a shared or
    compressed cluster), whole clusters, a run across clusters, some zeros; a flush after every flush_every."""
    cs = d.cluster_size
    size = d.model.size
    for k in range(n):
        base = rng.choice(spots)
        r = rng.random()
        if r < 0.4:
            off = base + rng.randrange(0, 4 * cs)
            length = rng.choice([1, 512, 1000, cs // 2])
        elif r < 0.75:
            off = (base + rng.randrange(0, 4 * cs)) // cs * cs
            length = rng.randint(1, 3) * cs
        else:
            off = base + rng.randrange(0, 2 * cs)
            length = rng.randint(cs, 3 * cs)
        length = min(length, size - off)
        _write_or_zero(d, rng, off, length, k, flush_every)


def wl_snapshot_ops() -> Workload:
    """Snapshots taken and deleted through the Driver (Disk.take_snapshot / delete_snapshot / checkpoint,
    close mode), 4 MiB, 4 KiB clusters, 16-bit refcounts. Pristine (QEMU): q1 (qemu-img snapshot) and
    vm1 (savevm, with VM state) sharing data and compressed clusters with the active disk, bitmap q0
    (clean, empty). Writes over clusters shared with q1/vm1 and over compressed ones (copy-on-write);
    take s1; writes over clusters and L2 tables now shared three and four ways, new allocations
    inside shared L2 tables; take s2 right after (L2 tables shared by s1, s2 and the active disk);
    delete q1 (the oldest, newer ones exist); writes; delete vm1 (VM state); reopen (the table read
    back from disk); writes; take s3; delete s1 (a middle one); checkpoint c1 disabling q0; writes;
    delete s2; writes; close."""
    size = 4 * MiB
    cluster = 4 * KiB

    def create(dirname: str) -> dict[str, Any]:
        img, snaps = _snapshot_image(dirname, size, cluster)
        qemu_img("bitmap", "--add", "-g", "65536", img, "q0")
        return dict(
            image="disk.qcow2", snapshots=snaps, pristine_bitmaps=[BitmapSpec("q0", 65536, 0, True)]
        )

    def body(d: Driver, rng: random.Random) -> None:
        shared = [0, 512 * KiB, 1 * MiB, 1 * MiB + 448 * KiB]  # data shared with q1 and vm1
        compressed = [3 * MiB, 3 * MiB + 128 * KiB, 3 * MiB + 512 * KiB, 2 * MiB]
        fresh = [
            2 * MiB + 256 * KiB,
            3 * MiB + 768 * KiB,
        ]  # unallocated: allocations into (shared) L2 tables
        _snap_writes(d, rng, 6, shared + compressed)
        d.flush()
        d.take_snapshot("s1")
        _snap_writes(d, rng, 6, shared + compressed + fresh)
        d.flush()
        d.take_snapshot("s2")
        _snap_writes(d, rng, 5, shared + fresh)
        d.delete_snapshot("q1")
        _snap_writes(d, rng, 4, shared + compressed, flush_every=2)
        d.delete_snapshot("vm1")
        d.reopen()
        _snap_writes(d, rng, 3, shared + fresh)
        d.take_snapshot("s3")
        d.delete_snapshot("s1")
        _snap_writes(d, rng, 3, shared + compressed)
        d.checkpoint("c1", disable=["q0"])
        _snap_writes(d, rng, 4, shared + fresh, flush_every=2)
        d.delete_snapshot("s2")
        _snap_writes(d, rng, 3, shared + compressed)
        d.close()

    return Workload(
        "snapshot-ops-c4k",
        create,
        body,
        oracle_every=8,
        bounds=Bounds(exhaustive=16, prefixes=4, drop_one=2, singles=2, random=4, torn=2),
    )


def wl_intent_checkpoint() -> Workload:
    """Intent mode (Disk(bitmap_sync="intent")) with snapshots and a checkpoint, 4 MiB, 4 KiB clusters.
    Pristine (QEMU): q1 and vm1 as in snapshot-ops-c4k; bitmaps qi (recording, holding QEMU's
    writes) and qd (recording, empty). Writes over shared and compressed clusters; take s1; writes;
    checkpoint c1 disabling qd (its auto flag cleared on disk before it returns); writes over clusters
    shared with s1 and c1 (copy-on-write; qd no longer records); delete q1 (the oldest); writes;
    delete s1; writes; close (exact bits)."""
    size = 4 * MiB
    cluster = 4 * KiB

    def create(dirname: str) -> dict[str, Any]:
        img, snaps = _snapshot_image(dirname, size, cluster, bitmaps=[("qi", 16384)])
        qemu_img("bitmap", "--add", "-g", "4096", img, "qd")
        return dict(
            image="disk.qcow2",
            snapshots=snaps,
            pristine_bitmaps=[
                _pristine_bitmap(img, "qi", 16384),
                _pristine_bitmap(img, "qd", 4096),
            ],
        )

    def body(d: Driver, rng: random.Random) -> None:
        shared = [0, 512 * KiB, 1 * MiB + 448 * KiB]
        compressed = [3 * MiB, 3 * MiB + 512 * KiB, 2 * MiB]
        fresh = [2 * MiB + 256 * KiB]
        _snap_writes(d, rng, 4, shared + compressed)
        d.take_snapshot("s1")
        _snap_writes(d, rng, 4, shared + fresh)
        d.checkpoint("c1", disable=["qd"])
        _snap_writes(d, rng, 5, shared + compressed + fresh)
        d.delete_snapshot("q1")
        _snap_writes(d, rng, 3, shared)
        d.delete_snapshot("s1")
        _snap_writes(d, rng, 3, shared + compressed)
        d.close()

    return Workload(
        "intent-checkpoint-c4k",
        create,
        body,
        bitmap_sync="intent",
        nbd_every=10,
        oracle_every=8,
        bounds=Bounds(exhaustive=16, prefixes=4, drop_one=2, singles=2, random=4, torn=2),
    )


def wl_backup_source() -> Workload:
    """What `qcowfs backup` does to its source, twice (backup/run.py steps 4 and 7), intent mode,
    16 MiB, 64 KiB clusters. Pristine (QEMU): data, and bitmap b0 recording (the previous backup's).
    Writes; checkpoint b1 disabling b0 (the backup's step 4); writes while it copies (they COW out of
    snapshot b1); delete snapshot b1, remove bitmap b0 (step 7); writes; checkpoint b2 disabling b1;
    writes; delete snapshot b2, remove b1; writes; close."""
    size = 16 * MiB

    def create(dirname: str) -> dict[str, Any]:
        img = os.path.join(dirname, "disk.qcow2")
        _create(img, size, cluster_size=65536)
        qemu_io(img, f"write -P 0x21 0 {4 * MiB}", f"write -P 0x22 {10 * MiB} {2 * MiB}")
        qemu_img("bitmap", "--add", "-g", "65536", img, "b0")
        return dict(image="disk.qcow2", pristine_bitmaps=[_pristine_bitmap(img, "b0", 65536)])

    def body(d: Driver, rng: random.Random) -> None:
        spots = [0, 1 * MiB, 3 * MiB + 900 * KiB, 10 * MiB + 64 * KiB, 14 * MiB]
        _intent_writes(d, rng, 4, spots)
        for prev, new in (("b0", "b1"), ("b1", "b2")):
            d.checkpoint(new, disable=[prev])
            _intent_writes(d, rng, 4, spots)
            d.delete_snapshot(new)
            d.remove_bitmap(prev)
            _intent_writes(d, rng, 3, spots)
        d.close()

    return Workload(
        "backup-source-intent",
        create,
        body,
        bitmap_sync="intent",
        nbd_every=10,
        oracle_every=8,
        bounds=Bounds(exhaustive=16, prefixes=4, drop_one=2, singles=2, random=4, torn=2),
    )


def wl_snapshot_minimal() -> Workload:
    """The smallest snapshot workload: 1 MiB, 4 KiB clusters, QEMU-made data and snapshot q1; one write over
    a shared cluster (copy-on-write), take s1, one write over a cluster s1 shares, delete q1 (its clusters
    shared with s1 and the active disk), close. Not in workloads(): test_powerloss runs it unchanged
    (positive control) and with the snapshot steps' flushes deferred to their end (negative control)."""

    def create(dirname: str) -> dict[str, Any]:
        img = os.path.join(dirname, "disk.qcow2")
        _create(img, 1 * MiB, cluster_size=4096)
        qemu_io(img, f"write -P 0x11 0 {64 * KiB}", f"write -c -P 0x22 {256 * KiB} {16 * KiB}")
        qemu_img("snapshot", "-c", "q1", img)
        return dict(
            image="disk.qcow2",
            snapshots={"q1": qemu_raw(img, os.path.join(dirname, "q1.raw"), snapshot="q1")},
        )

    def body(d: Driver, rng: random.Random) -> None:
        d.write(4096 + 100, rng.randbytes(3000))
        d.take_snapshot("s1")
        d.write(8192, rng.randbytes(4096))
        d.delete_snapshot("q1")
        d.close()

    return Workload(
        "snapshot-minimal",
        create,
        body,
        oracle_every=3,
        bounds=Bounds(exhaustive=64, prefixes=6, drop_one=4, singles=4, random=12, torn=3),
    )


def wl_zero_grow(bitmap_sync: str = "close") -> Workload:
    """Disk.zero_range and Disk.grow, 4 MiB, 4 KiB clusters (an L1 entry maps 2 MiB: the 4 MiB disk's L1
    has 2 entries, growing to 10 MiB needs 5, a new L1 table). Pristine (QEMU): data, compressed clusters
    (some sharing a host cluster), snapshot q1 sharing them, more data over part of it, bitmap q0 (64 KiB
    granules; close mode: clean and empty, intent mode: holding QEMU's writes after it). Writes; zero_range
    over whole clusters shared with q1, partial clusters, a run straddling clusters, compressed clusters
    (whole and partial), over clusters written in the same epoch; flushes; create bitmap b0 (4 KiB); grow to
    10 MiB (intent mode: q0 and b0 in_use while it runs, valid again after); writes and zero_range past the
    old end and across it; zero_range over a whole L2 table's worth; close."""
    size = 4 * MiB
    cluster = 4 * KiB

    def create(dirname: str) -> dict[str, Any]:
        img = os.path.join(dirname, "disk.qcow2")
        _create(img, size, cluster_size=cluster)
        if bitmap_sync == "intent":
            qemu_img("bitmap", "--add", "-g", "65536", img, "q0")
        qemu_io(
            img,
            f"write -P 0x11 0 {1 * MiB + 512 * KiB}",
            f"write -c -P 0x22 {3 * MiB} {256 * KiB}",
            f"write -c -P 0x23 {3 * MiB + 512 * KiB} {cluster}",
            f"write -c -P 0x24 {3 * MiB + 512 * KiB + cluster} {cluster}",
        )
        qemu_img("snapshot", "-c", "q1", img)
        qemu_io(
            img, f"write -P 0x44 {512 * KiB} {256 * KiB}", f"write -P 0x55 {2 * MiB} {64 * KiB}"
        )
        snaps = {"q1": qemu_raw(img, os.path.join(dirname, "q1.raw"), snapshot="q1")}
        if bitmap_sync == "intent":
            specs = [_pristine_bitmap(img, "q0", 65536)]
        else:
            qemu_img("bitmap", "--add", "-g", "65536", img, "q0")
            specs = [BitmapSpec("q0", 65536, 0, True)]
        return dict(image="disk.qcow2", snapshots=snaps, pristine_bitmaps=specs)

    def body(d: Driver, rng: random.Random) -> None:
        cs = d.cluster_size
        d.write(64 * KiB + 100, rng.randbytes(3 * cs))  # COW of clusters shared with q1
        d.write(2 * MiB + 8 * cs, rng.randbytes(4 * cs))
        d.flush()
        d.zero_range(
            16 * cs, 8 * cs
        )  # whole clusters shared with q1 (refcount 2 -> 1: nothing freed)
        d.zero_range(64 * KiB, cs)  # a whole cluster the write above copied (refcount 1: freed)
        d.zero_range(5 * cs + 300, 1000)  # inside one cluster: written with zeros
        d.flush()
        d.zero_range(3 * MiB + 4 * cs, 6 * cs)  # whole compressed clusters
        d.zero_range(
            3 * MiB + 512 * KiB + 100, cs
        )  # partial, over two compressed clusters sharing a host cluster
        d.zero_range(
            512 * KiB + cs // 2, 5 * cs
        )  # straddling: partial, whole, partial (over q1's 0x44 data)
        d.write(2 * MiB + 9 * cs, rng.randbytes(2 * cs))
        d.zero_range(2 * MiB + 8 * cs, 3 * cs + 512)  # over clusters written in the same epoch
        d.flush()
        d.create_bitmap("b0", 4096)
        d.write(1 * MiB + 100 * KiB, rng.randbytes(9000))
        d.zero_range(
            1 * MiB + 96 * KiB, 2 * cs
        )  # unflushed when the grow starts (the grow flushes first)
        d.grow(10 * MiB)
        d.write(8 * MiB + 3 * cs, rng.randbytes(5 * cs))  # a new L2 table under a new L1 entry
        d.write(4 * MiB - 2 * cs, rng.randbytes(4 * cs))  # across the old end
        d.flush()
        d.zero_range(8 * MiB + 4 * cs, 2 * cs)
        d.zero_range(4 * MiB - 6 * KiB, 12 * KiB)  # across the old end, partial both sides
        d.zero_range(0, 2 * MiB)  # a whole L2 table's worth over q1's clusters
        d.flush()
        d.write(3 * cs, rng.randbytes(2 * cs))
        d.close()

    def verify(dirname: str, image_path: str, model: Model) -> None:
        info = json.loads(qemu_img("info", "--output=json", image_path).stdout)
        assert info["virtual-size"] == 10 * MiB, info["virtual-size"]
        assert read_header_field(image_path, 36, 4) == 5, "the grow did not make a 5-entry L1 table"

    return Workload(
        f"zero-grow-{bitmap_sync}-c4k",
        create,
        body,
        bitmap_sync=bitmap_sync,
        verify=verify,
        oracle_every=6,
        nbd_every=6,
        bounds=Bounds(exhaustive=16, prefixes=4, drop_one=2, singles=2, random=4, torn=2),
    )


def wl_luks_cow(lazy: bool = False) -> Workload:
    """Allocation and copy-on-write on a LUKS image (aes-xts-plain64, QEMU's default; 16 MiB, 64 KiB
    clusters). qcowfs encrypts each 512-byte sector with the IV of its host offset
    (engine/encrypted_data.py), so every copy-on-write re-encrypts the data for its new place and
    every write not covering whole sectors reads, decrypts and re-encrypts its first and last sector.
    Pristine (QEMU, with the key): data, a partial write into an unallocated cluster, snapshot q1,
    writes over clusters q1 shares (QEMU's own copy-on-write). Fresh allocations (whole clusters, a
    run); partial writes into unallocated clusters (the rest written as encrypted zeros), one
    straddling two; sub-sector writes into allocated clusters of refcount 1 (read-modify-write of a
    sector in place), across a cluster boundary; writes over clusters q1 shares (QEMU-encrypted data
    copied to new host offsets); a whole cluster of zeros; random writes of all these kinds, fewer
    flushes; take s1; writes over clusters s1 shares (partial: copied and re-encrypted; sub-sector:
    copied, then a sector rewritten; whole: no copy); random writes; delete q1; writes; delete s1
    (refcounts back to 1); writes in place over formerly shared clusters; close. Every check of a
    crash state opens it with the key (keyed.py, Model.keys).
    lazy=True (not in workloads(): scripts or a test may run it) makes the image with lazy refcounts,
    so crash states with the dirty bit get both repairs (qemu-img check -r all, qcowfs' refcount
    rebuild at a read-write open), keyed."""
    size = 16 * MiB
    cluster = 64 * KiB
    passphrase = b"powerloss luks-cow"

    def create(dirname: str) -> dict[str, Any]:
        key = keyed.write_key_file(dirname, passphrase)
        img = os.path.join(dirname, "disk.qcow2")
        keyed.create_luks(
            img, size, key, cluster_size=cluster, lazy_refcounts="on" if lazy else "off"
        )
        keyed.qemu_io(
            img,
            key,
            f"write -P 0x21 0 {1 * MiB}",
            f"write -P 0x22 {4 * MiB} {256 * KiB}",
            f"write -P 0x23 {6 * MiB + 4 * KiB + 100} 3000",
        )
        keyed.qemu_img(key, "snapshot", img, "-c", "q1")
        keyed.qemu_io(
            img,
            key,
            f"write -P 0x24 {512 * KiB} {128 * KiB}",
            f"write -P 0x25 {4 * MiB + 70000} 50",
        )
        q1 = keyed.raw(img, os.path.join(dirname, "q1.raw"), key, snapshot="q1")
        return dict(image="disk.qcow2", snapshots={"q1": q1})

    def body(d: Driver, rng: random.Random) -> None:
        cs = d.cluster_size
        # fresh allocations: a run of whole clusters, one cluster
        d.write(8 * MiB, rng.randbytes(3 * cs))
        d.write(10 * MiB + cs, rng.randbytes(cs))
        d.flush()
        # partial writes into unallocated clusters: unaligned head and tail, straddling two clusters,
        # one whole sector
        d.write(12 * MiB + 1000, rng.randbytes(5000))
        d.write(13 * MiB - 700, rng.randbytes(1400))
        d.write(9 * MiB + 3 * 512, rng.randbytes(512))
        d.flush()
        # sub-sector writes into allocated clusters of refcount 1: a sector read, decrypted and
        # re-encrypted in place; one across a cluster boundary, one over QEMU's copy of a q1 cluster,
        # one next to the end of the partial write above
        d.write(8 * MiB + 300, rng.randbytes(20))
        d.write(8 * MiB + cs - 10, rng.randbytes(20))
        d.write(512 * KiB + 511, rng.randbytes(2))
        d.write(12 * MiB + 5998, rng.randbytes(3))
        d.flush()
        # over clusters q1 shares (QEMU-encrypted): copied to new host offsets, re-encrypted there
        d.write(256 * KiB + 123, rng.randbytes(4000))
        d.write(4 * MiB + 2 * cs + 7, rng.randbytes(100))
        d.zero(10 * MiB + cs, cs)  # a whole cluster of zeros: its host cluster freed
        d.flush()
        # a mix, fewer flushes (bigger epochs: reordered and torn encrypted writes): allocated
        # clusters, clusters q1 shares, unallocated ones (the freed one among them)
        _snap_writes(d, rng, 8, [8 * MiB, 12 * MiB, 768 * KiB, 10 * MiB, 14 * MiB], flush_every=4)
        d.flush()
        d.take_snapshot("s1")
        d.write(8 * MiB + cs + 4096, rng.randbytes(8192))  # partial over a cluster s1 shares
        d.write(12 * MiB + 200, rng.randbytes(33))  # sub-sector over one: copy, then a sector
        d.write(9 * MiB, rng.randbytes(cs))  # a whole cluster s1 shares: no copy needed
        d.flush()
        _snap_writes(d, rng, 8, [0, 8 * MiB, 4 * MiB, 12 * MiB, 15 * MiB], flush_every=4)
        d.flush()
        d.write(700 * KiB + 5, rng.randbytes(3000))  # q1's and s1's: copied
        d.delete_snapshot("q1")
        d.write(8 * MiB + 2 * cs + 100, rng.randbytes(200))
        d.write(4 * MiB + 3 * cs - 256, rng.randbytes(512))  # across clusters 66-67, shared with s1
        d.flush()
        d.delete_snapshot("s1")
        d.write(5000, rng.randbytes(1500))  # shared with q1 and s1 before: refcount 1 now, in place
        d.write(9 * MiB + 77, rng.randbytes(300))
        d.write(12 * MiB + 64, rng.randbytes(64))
        d.close()

    def verify(dirname: str, image_path: str, model: Model) -> None:
        assert read_header_field(image_path, 32, 4) == 2, "the image is not LUKS-encrypted"
        with open(image_path, "rb") as f:
            host = f.read()
        # no plaintext on the host: not QEMU's patterns, not a piece of any guest write
        assert bytes([0x21]) * 512 not in host, "plaintext of QEMU's data in the image file"
        for i, (_off, data) in enumerate(model.writes):
            if len(data) >= 16 and any(data):
                assert data[:16] not in host, f"plaintext of guest write #{i} in the image file"
        # copy-on-write re-encrypted: guest cluster 4 (QEMU's, shared with q1 in the pristine image)
        # moved to another host cluster; a sector the guest never wrote there reads the same through
        # both, its ciphertext differs (the IV is the host offset)
        pristine = os.path.join(dirname, "pristine", model.image)
        imgs = [Qcow2Image(p, read_only=True, keys=model.keys()) for p in (pristine, image_path)]
        try:
            guest = 256 * KiB + 32 * KiB
            hosts = [im.map(guest, guest + 512) for im in imgs]
            assert [h[0] for h in hosts] == [DATA, DATA], hosts
            assert hosts[0][1] != hosts[1][1], f"guest cluster 4 was not copied: {hosts}"
            plain = [im.read(guest, 512) for im in imgs]
            assert plain[0] == plain[1] == bytes([0x21]) * 512, (
                "the copied sector reads differently"
            )
            cipher = [im.file.pread(512, h[1]) for im, h in zip(imgs, hosts)]
            assert cipher[0] != cipher[1], "a copied sector kept its ciphertext (not re-encrypted)"
        finally:
            for im in imgs:
                im.close(flush=False)

    return Workload(
        "luks-cow-c64k" + ("-lazy" if lazy else ""),
        create,
        body,
        verify=verify,
        lazy=lazy,
        passphrase=passphrase,
        oracle_every=5,
        bounds=Bounds(exhaustive=16, prefixes=4, drop_one=2, singles=2, random=4, torn=2),
    )


def workloads() -> list:
    out = []
    for cluster, size, count in ((512, 2 * MiB, 50), (4096, 4 * MiB, 50), (65536, 16 * MiB, 45)):
        for refbits in (1, 16):
            out.append(wl_alloc(cluster, refbits, size, count))
    out += [
        wl_refblock_siblings(),
        wl_reftable_growth(),
        wl_cow_backing(),
        wl_cow_backing(extended=True),
        wl_zero_free(),
        wl_zero_free("0.10"),
        wl_snapshot(),
        wl_bitmaps(),
        wl_lazy(),
        wl_data_file(),
        wl_intent_bitmaps(),
        wl_intent_data_file(),
        wl_intent_lazy(),
        wl_snapshot_ops(),
        wl_intent_checkpoint(),
        wl_backup_source(),
        wl_zero_grow(),
        wl_zero_grow("intent"),
        wl_luks_cow(),
    ]
    return out


@dataclasses.dataclass
class Recorded:
    workload: Workload
    model: Model
    log: IOLog
    pristine: dict[str, bytes]  # file name -> bytes
    workdir: str


def record(
    wl: Workload, workdir: str, seed: Optional[int] = None, record_flushes: bool = True
) -> Recorded:
    """Create the pristine image, save its bytes, run the workload through the recording factory."""
    os.makedirs(workdir, exist_ok=True)
    pdir = os.path.join(workdir, "pristine")
    os.makedirs(pdir, exist_ok=True)
    info = wl.create(pdir)
    image = info["image"]
    files = info.get("files", [image])
    key_file = ""
    if wl.passphrase is not None:
        key_file = os.path.abspath(os.path.join(pdir, keyed.KEY_FILE))
        with open(key_file, "rb") as f:
            assert f.read() == wl.passphrase, f"{key_file} does not hold the workload's passphrase"
        assert os.stat(key_file).st_mode & 0o077 == 0, f"{key_file} is readable by others"
    pristine = {}
    for name in files:
        with open(os.path.join(pdir, name), "rb") as f:
            pristine[name] = f.read()
    initial = keyed.raw(os.path.join(pdir, image), os.path.join(workdir, "initial.raw"), key_file)
    size = len(initial)
    specs = tuple(info.get("pristine_bitmaps", []))
    model = Model(
        wl.name,
        image,
        files,
        size,
        initial,
        [],
        lazy=wl.lazy,
        snapshots=info.get("snapshots", {}),
        oracle_every=wl.oracle_every,
        bitmap_sync=wl.bitmap_sync,
        pristine_specs=specs,
        nbd_every=wl.nbd_every,
        passphrase=wl.passphrase,
        key_file=key_file,
    )
    for spec in specs:
        model.bitmaps[spec.name] = spec
    model.pristine_bitmap_names = {s.name for s in specs}
    for spec in specs:
        model.granularities[spec.name] = spec.granularity
        model.versions[(spec.name, "pristine")] = state_bits(
            model, BmState(spec.granularity, extra=spec.initial)
        )
    # the working copy the workload writes to (pristine stays untouched for the backing file etc.)
    wdir = os.path.join(workdir, "run")
    os.makedirs(wdir, exist_ok=True)
    for name in files:
        shutil.copyfile(os.path.join(pdir, name), os.path.join(wdir, name))
    log = IOLog(record_flushes=record_flushes)
    rng = random.Random(seed if seed is not None else zlib.crc32(wl.name.encode()))
    drv = Driver(os.path.join(wdir, image), log, model)
    try:
        wl.run(drv, rng)
    finally:
        if not drv.img._closed:
            drv.img.close(flush=False)
    if wl.verify:
        wl.verify(workdir, os.path.join(wdir, image), model)
    # the replayed log must reproduce the working copy exactly
    final = replay_all(pristine, log)
    for name in files:
        with open(os.path.join(wdir, name), "rb") as f:
            if f.read() != bytes(final[name]):
                raise AssertionError(
                    f"replaying the log does not reproduce {name}: the recording missed I/O"
                )
    return Recorded(wl, model, log, pristine, workdir)
