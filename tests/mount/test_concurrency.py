"""Concurrent requests (issue 15): fio storms at iodepth 32 through a real mount.

Many writers and readers in flight at once, all landing in the same 64 KiB clusters, over a fresh
image (allocation), an image with a backing file (COW from backing), an image with an internal
snapshot (COW of shared clusters, refcount 2) and a compressed image, with all-zero writes
(zero detection) mixed in. Judged by QEMU: ``qemu-img check`` clean, ``qemu-img compare``
against a raw reference written by the very same fio jobs on a plain file, the snapshot still
restoring its old content, and the recording dirty bitmap covering every cluster written.

The layout (``plan()``): every cluster of area A [0, 8 MiB) is cut into eight 8 KiB slots

  slot 0-2  three replayed-log writers (fio read_iolog), each owning its slot, cut into
            512 B..8 KiB pieces issued in shuffled order: position-stamped pattern data (%o)
  slot 3    the zero writer (zero_buffers), same shape: zero detection inside shared clusters
  slot 4    crc32c writer, bs=8k, rw=write:56k, verify_backlog: fio reads back and checks its
            own blocks while the others still write the same clusters
  slot 5    crc32c writer, bs=4k (first half of the slot)
  slot 6    a reader at iodepth 32 (verify=pattern) of the base content, looping while the
            clusters around it are allocated or copied: it must never see a half-done COW
  slot 7    never touched: what COW must carry over from backing/snapshot/compressed data

Area B [8, 16 MiB): a big-block writer (64 KiB..1 MiB at 4 KiB-aligned offsets, straddling
clusters) and a gap writer filling the 512 B..12 KiB holes it leaves, in the same clusters.
Area C [16, 24 MiB): the zero writer zeroes every 4th cluster whole (8 KiB requests) while a
writer puts 512 B pieces into the next cluster. The rest of the 64 MiB disk stays untouched.

Why not fio's own placement with --verify=crc32c everywhere: crc32c blocks carry a header with a
timestamp and thread number, so their bytes differ between runs, and overlapping concurrent
writes (which fio's bssplit random placement and zonemode=strided produce) end in an undefined
order. So the compared content comes from the replayed logs (each byte written by exactly one
request, stamped with its offset; two runs on raw files are byte-identical, see
test_plan_is_deterministic), while the crc32c jobs verify themselves through the mount during the
storm and their blocks are then checked by header (magic, length, own offset) in the image and
copied into the reference.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import needs_fuse
from support.images import create
from support.seeds import base_seed

from qcowfs_dev.fio import fio_header_ok, job_file, run_fio, write_iolog
from qcowfs_dev.oracles import (
    assert_clean,
    assert_compare,
    dirty_extents,
    qemu_check,
    qemu_img,
    qemu_io,
)
from qcowfs_dev.proc import wait_for

KiB = 1 << 10
MiB = 1 << 20
CLUSTER = 64 * KiB
SLOT = 8 * KiB
VSIZE = 64 * MiB
A = (0, 8 * MiB)
B = (8 * MiB, 16 * MiB)
C = (16 * MiB, 24 * MiB)
SEED = base_seed(20251207)
BASE = {A: 0x11, B: 0x22, C: 0x33}  # base content of each area (all zero for a fresh image)
CRC_JOBS = {"crc8k": (4, 8 * KiB), "crc4k": (5, 4 * KiB)}  # name -> (slot, block size)

pytestmark = pytest.mark.skipif(
    shutil.which("fio") is None, reason="fio is installed by scripts/setup"
)


# ----------------------------------------------------------------------------- the plan
def _cut(rng: random.Random, start: int, length: int, sizes) -> list:
    out, pos = [], 0
    while pos < length:
        n = min(rng.choice(sizes), length - pos)
        out.append((start + pos, n))
        pos += n
    return out


def plan(seed: int) -> dict:
    """Replayed jobs: name -> list of (offset, length), each list shuffled; no two requests overlap."""
    rng = random.Random(seed)
    small = [512, 1 * KiB, 4 * KiB, 8 * KiB, 3 * KiB]
    jobs: dict = {f"p{k}": [] for k in range(3)}
    jobs["zero"] = []
    jobs["big"], jobs["gaps"] = [], []
    for c in range(A[0], A[1], CLUSTER):
        for k in range(3):
            jobs[f"p{k}"] += _cut(rng, c + k * SLOT, SLOT, small)
        jobs["zero"] += _cut(rng, c + 3 * SLOT, SLOT, small)
    pos = B[0] + 4 * KiB
    while True:
        n = rng.choice([64 * KiB, 128 * KiB, 1 * MiB, 192 * KiB + 512, 60 * KiB])
        gap = rng.choice([512, 4 * KiB, 12 * KiB])
        if pos + n + gap > B[1]:
            break
        jobs["big"].append((pos, n))
        jobs["gaps"] += _cut(rng, pos + n, gap, [512, 1 * KiB, 4 * KiB])
        pos += n + gap
    for i, c in enumerate(range(C[0], C[1], CLUSTER)):
        if i % 4 == 0:
            jobs["zero"] += _cut(rng, c, CLUSTER, [8 * KiB])
        elif i % 4 == 1:
            jobs["p0"] += [(c + o, 512) for o in range(0, CLUSTER, 4 * KiB)]
    for ops in jobs.values():
        rng.shuffle(ops)
    return jobs


def crc_blocks(name: str) -> list:
    slot, bs = CRC_JOBS[name]
    return [(c + slot * SLOT, bs) for c in range(A[0], A[1], CLUSTER)]


def storm_jobfile(
    d: Path,
    target: Path,
    jobs: dict,
    *,
    base_a: int,
    crc: bool = True,
    reader: bool = True,
    replay: tuple = ("p0", "p1", "p2", "zero", "big", "gaps"),
    end_fsync: bool = False,
    tag: str = "storm",
) -> Path:
    """The fio job file of (part of) the storm on TARGET, every job at iodepth 32, O_DIRECT, libaio."""
    d.mkdir(exist_ok=True)
    sections: dict = {}
    for i, name in enumerate(replay):
        log = write_iolog(d / f"{tag}-{name}.iolog", target, jobs[name])
        opts = {"read_iolog": log, "replay_no_stall": 1, "rw": "randwrite"}
        if name == "zero":
            opts["zero_buffers"] = 1
        else:
            opts["verify"] = "pattern"  # with a replayed log: fills the buffers, no verify pass
            opts["verify_pattern"] = f"0x{0xA0 + i:02x}%o"  # the request's offset stamped in it
        if end_fsync:
            opts["end_fsync"] = 1
        sections[name] = opts
    if crc:
        for name, (slot, bs) in CRC_JOBS.items():
            sections[name] = {
                "rw": f"write:{CLUSTER - bs}",
                "bs": bs,
                "offset": A[0] + slot * SLOT,
                "size": A[1] - A[0] - slot * SLOT,
                "verify": "crc32c",
                "verify_backlog": 8,
                "verify_fatal": 1,
            }
    if reader:
        sections["reader"] = {
            "rw": f"read:{CLUSTER - SLOT}",
            "bs": SLOT,
            "offset": A[0] + 6 * SLOT,
            "size": A[1] - A[0] - 6 * SLOT,
            "loops": 4,
            "verify": "pattern",
            "verify_pattern": f"0x{base_a:02x}",
            "verify_fatal": 1,
        }
    return job_file(
        d / f"{tag}.fio",
        {"filename": target, "ioengine": "libaio", "direct": 1, "iodepth": 32},
        sections,
    )


# ----------------------------------------------------------------------------- images
def fill_base(target: Path, fmt: str) -> None:
    qemu_io(target, *[f"write -P 0x{v:02x} {a} {b - a}" for (a, b), v in BASE.items()], fmt=fmt)


def build(kind: str, tmp: Path) -> tuple:
    """(image, raw file of its content before the storm, base byte of area A)."""
    img = tmp / "img.qcow2"
    if kind == "fresh":
        create(img, VSIZE)
    elif kind == "backing":
        base = create(tmp / "base.qcow2", VSIZE)
        fill_base(base, "qcow2")
        create(img, backing=base, backing_fmt="qcow2")
    elif kind == "snapshot":
        create(img, VSIZE)
        fill_base(img, "qcow2")
        qemu_img("snapshot", "-c", "s1", img)
    elif kind == "compressed":
        src = create(tmp / "src.qcow2", VSIZE)
        fill_base(src, "qcow2")
        qemu_img("convert", "-c", "-O", "qcow2", src, img)
        src.unlink()
    else:
        raise ValueError(kind)
    before = tmp / "before.raw"
    qemu_img("convert", "-O", "raw", img, before)
    return img, before, (0 if kind == "fresh" else BASE[A])


def check_crc_blocks(got: Path, ref: Path) -> None:
    """Each crc32c block in GOT (the image's content) carries fio's header for its own offset and
    length, and is then copied into REF (whose crc32c bytes differ: timestamps in the header)."""
    with open(got, "rb") as g, open(ref, "r+b") as r:
        for name in CRC_JOBS:
            for off, bs in crc_blocks(name):
                data = os.pread(g.fileno(), bs, off)
                assert fio_header_ok(data, off, bs), (
                    f"{name}: the block at {off} (0x{off:x}, {bs} bytes) is not the one fio wrote there: "
                    f"{data[:32].hex()}"
                )
                os.pwrite(r.fileno(), data, off)


def written_clusters(jobs: dict) -> set:
    ranges = [r for ops in jobs.values() for r in ops] + [
        r for n in CRC_JOBS for r in crc_blocks(n)
    ]
    return {c for off, n in ranges for c in range(off // CLUSTER, (off + n - 1) // CLUSTER + 1)}


# ----------------------------------------------------------------------------- tests
def test_plan_is_deterministic(tmp_path):
    """Two runs of the storm on raw files give the same bytes outside the crc32c blocks; the
    pieces cover their slots exactly once, zero slots read zero, untouched slots keep the base."""
    jobs = plan(SEED)
    allops = sorted(
        r for ops in jobs.values() for r in ops
    )  # no two requests overlap: order-free result
    for (o1, n1), (o2, _) in zip(allops, allops[1:]):
        assert o1 + n1 <= o2, f"overlapping requests at {o1}+{n1} and {o2}"
    runs = []
    for i in range(2):
        raw = tmp_path / f"r{i}.raw"
        with open(raw, "wb") as f:
            f.truncate(VSIZE)
        fill_base(raw, "raw")
        run_fio(storm_jobfile(tmp_path / f"fio{i}", raw, jobs, base_a=BASE[A]))
        check_crc_blocks(raw, tmp_path / "r0.raw")  # r1's crc blocks into r0: then all must match
        runs.append(raw)
    assert_same(runs[0], runs[1])
    data = runs[0].read_bytes()
    for c in range(A[0], A[1], CLUSTER):
        assert data[c + 3 * SLOT : c + 4 * SLOT] == bytes(SLOT), f"zero slot at {c + 3 * SLOT}"
        assert data[c + 6 * SLOT : c + 8 * SLOT] == bytes([BASE[A]]) * 2 * SLOT, (
            f"untouched slots at {c}"
        )
        for k in range(3):
            assert bytes(SLOT) not in data[c + k * SLOT : c + (k + 1) * SLOT], (
                f"pattern slot {k} at {c}"
            )


def assert_same(a: Path, b: Path) -> None:
    x, y = a.read_bytes(), b.read_bytes()
    if x != y:
        i = next(i for i in range(min(len(x), len(y))) if x[i] != y[i])
        raise AssertionError(
            f"{a} and {b} differ first at {i} (0x{i:x}): {x[i : i + 16].hex()} != {y[i : i + 16].hex()}"
        )


# Every request that finds another waiting or running goes to the host I/O threads, however
# fast the host (by default only a slow host sends them there: qcowfs/fuse/concurrent_io.py), so the storms
# run the concurrent paths: plans, copies on threads, commits, waits for allocations, drains.
OFFLOAD = ("-o", "offload=always")
#: the request lanes' summary at unmount (qcowfs/fuse/lanes.py)
LANES_SUMMARY = re.compile(
    r"request lanes: (?P<lanes>\d+) lanes served (?P<reads>\d+) reads and (?P<writes>\d+) writes "
    r"themselves, handed (?P<handed>\d+) requests to the metadata thread; (?P<overlapped>\d+) "
    r"requests began while another lane was serving one \(at most (?P<max_active>\d+) lanes at "
    r"once\); lanes added (?P<grown>\d+) times"
)


def overlapped(log: str) -> None:
    """The storm went through the host I/O threads, several requests at once (qcowfs/fuse/concurrent_io.py),
    and some waited for another's cluster allocation: the concurrent paths were exercised."""
    m = re.search(r"host I/O threads: (\d+) jobs, up to (\d+) at once", log)
    assert m, f"no host I/O thread summary in the daemon's log (io_threads off?):\n{log[-2000:]}"
    assert int(m[1]) > 100 and int(m[2]) > 1, m[0]
    w = re.search(r"concurrent requests: (\d+) waited", log)
    assert w and int(w[1]) > 0, w[0] if w else "no concurrent request summary"


@needs_fuse
@pytest.mark.parametrize("kind", ["fresh", "backing", "snapshot", "compressed"])
def test_storm(kind, mount, tmp_path):
    img, before, base_a = build(kind, tmp_path)
    qemu_img("bitmap", "--add", img, "rec")
    jobs = plan(SEED)

    m = mount(img, extra=OFFLOAD)
    run_fio(storm_jobfile(tmp_path / "mnt-fio", m.disk, jobs, base_a=base_a))
    assert m.unmount() == 0
    assert_clean(img)
    overlapped(m.log_text())
    # the request lanes (on by default) served part of the storm themselves: the storm is what
    # they share the image with (reads, overwrites of clusters allocated and dirty already)
    lanes = LANES_SUMMARY.search(m.log_text())
    assert lanes and int(lanes["reads"]) + int(lanes["writes"]) > 0, m.log_text()[-2000:]

    ref = tmp_path / "ref.raw"
    shutil.copyfile(before, ref)
    run_fio(storm_jobfile(tmp_path / "ref-fio", ref, jobs, base_a=base_a))
    got = tmp_path / "got.raw"
    qemu_img("convert", "-O", "raw", img, got)
    check_crc_blocks(got, ref)
    assert_compare(img, ref, f"[{kind}] ")

    # the recording bitmap covers every cluster written, and not the untouched end of the disk
    dirty = dirty_extents(img, "rec")
    missing = sorted(
        c
        for c in written_clusters(jobs)
        if not any(o <= c * CLUSTER and c * CLUSTER + CLUSTER <= o + n for o, n in dirty)
    )
    assert not missing, (
        f"bitmap rec misses {len(missing)} written clusters, first at {missing[0] * CLUSTER}"
    )
    assert not any(o + n > C[1] for o, n in dirty), (
        f"bitmap rec dirty past the written areas: {dirty[-3:]}"
    )
    if kind == "snapshot":  # the shared clusters were copied, never written in place
        copy = tmp_path / "copy.qcow2"
        shutil.copyfile(img, copy)
        qemu_img("bitmap", "--remove", copy, "rec")  # QEMU applies no snapshot under active bitmaps
        qemu_img("snapshot", "-a", "s1", copy)
        assert_compare(copy, before, "[snapshot s1 after the storm] ")


@needs_fuse
def test_kill_during_storm_keeps_fsynced_data(mount, tmp_path):
    """Phase 1 (fio, iodepth 32, end_fsync) writes slots 0-3 of area A and returns: acknowledged and
    fsynced. Phase 2 (crc32c jobs in the same clusters, big blocks and gaps in area B, all COW from
    the backing file) is running when the daemon gets SIGKILL. Then qemu-img check finds at worst
    leaks, every byte outside phase 2's requests is what phase 1 left (a raw reference), and the
    image mounts again and serves what QEMU reads."""
    img, before, base_a = build("backing", tmp_path)
    jobs = plan(SEED)
    m = mount(img, extra=OFFLOAD)
    phase1 = ("p0", "p1", "p2", "zero")
    run_fio(
        storm_jobfile(
            tmp_path / "p1",
            m.disk,
            jobs,
            base_a=base_a,
            crc=False,
            reader=False,
            replay=phase1,
            end_fsync=True,
            tag="phase1",
        )
    )
    ref = tmp_path / "ref.raw"
    shutil.copyfile(before, ref)
    run_fio(
        storm_jobfile(
            tmp_path / "r1",
            ref,
            jobs,
            base_a=base_a,
            crc=False,
            reader=False,
            replay=phase1,
            tag="phase1",
        )
    )

    size1 = img.stat().st_size
    p2 = storm_jobfile(
        tmp_path / "p2", m.disk, jobs, base_a=base_a, replay=("big", "gaps"), tag="phase2"
    )
    fio = subprocess.Popen(
        ["fio", "--output-format=json", str(p2)],
        cwd=p2.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # phase 2 has allocated (copied from backing) a few MiB: kill it in the middle
        wait_for(
            lambda: img.stat().st_size > size1 + 2 * MiB or fio.poll() is not None,
            timeout=60,
            what="phase 2 allocating",
        )
        still_running = fio.poll() is None
        m.kill()
        fio.communicate(timeout=60)
    finally:
        if fio.poll() is None:
            fio.kill()
            fio.wait()
    print(f"fio phase 2 still running at the kill: {still_running}")

    res = qemu_check(img)
    assert res["rc"] in (0, 3), f"qemu-img check after kill -9 (2 = corruption): {res}"
    got = tmp_path / "got.raw"
    qemu_img("convert", "-O", "raw", img, got)
    g, r = bytearray(got.read_bytes()), bytearray(ref.read_bytes())
    for off, n in jobs["big"] + jobs["gaps"] + crc_blocks("crc8k") + crc_blocks("crc4k"):
        g[off : off + n] = r[off : off + n] = bytes(
            n
        )  # phase 2's requests: old or new, either is fine
    if g != r:
        i = next(i for i in range(len(r)) if g[i] != r[i])
        raise AssertionError(
            f"after kill -9 byte {i} (0x{i:x}) reads {bytes(g[i : i + 16]).hex()}, "
            f"phase 1 (fsynced) or the backing file made it {bytes(r[i : i + 16]).hex()}"
        )

    m2 = mount(img)
    with open(m2.disk, "rb") as f:
        assert f.read() == got.read_bytes(), "remount: disk.raw differs from qemu-img convert"
    assert m2.unmount() == 0
    res = qemu_check(img)
    assert res["rc"] in (0, 3), f"qemu-img check after the remount: {res}"
    qemu_io(img, "write -P 0x5a 0 512", "read -P 0x5a 0 512")


HOST_LATENCY_US = 2000


@needs_fuse
@pytest.mark.parametrize("lanes", ["0", "auto"])
def test_slow_host_goes_to_threads(mount, tmp_path, lanes):
    """Every read of the image file waits 2 ms (qcowfs_dev/ceiling_fs.py --latency-us, many at
    once, like a disk or network storage). One request at a time that is at most 500 reads a
    second; at queue depth 16 qcowfs must do clearly better, and the image stays clean. Without
    request lanes (lanes=0), by default (offload=auto) requests go to the host I/O threads only
    once the host keeps them waiting: the daemon must say the host turned slow, and the threads
    ran jobs at once. With lanes (one per CPU), a lane waiting for a slow host makes another one
    read the device (pyfuse3's lanes.h): the summary must say lanes were added, and more lanes
    than CPUs served at once."""
    img = tmp_path / "img.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, str(16 * MiB))
    qemu_io(img, f"write -P 0x11 0 {16 * MiB}")
    host = tmp_path / "host"
    host.mkdir()
    slow = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "qcowfs_dev.ceiling_fs",
            f"--latency-us={HOST_LATENCY_US}",
            str(img),
            str(host),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(
            lambda: os.path.ismount(host) or slow.poll() is not None, what="slow host file system"
        )
        assert os.path.ismount(host), (
            f"ceiling_fs did not mount: {slow.stderr.read() if slow.stderr else ''}"
        )
        m = mount(host / "disk.raw", extra=("-o", f"lanes={lanes}"))
        out = subprocess.run(
            [
                "fio",
                "--name=qd16",
                f"--filename={m.disk}",
                "--direct=1",
                "--ioengine=libaio",
                "--iodepth=16",
                "--rw=randread",
                "--bs=4k",
                f"--size={16 * MiB}",
                "--runtime=3",
                "--time_based",
                "--output-format=json",
            ],
            stdout=subprocess.PIPE,
            text=True,
            check=True,
            timeout=120,
        )
        iops = json.loads(out.stdout)["jobs"][0]["read"]["iops"]
        assert m.unmount() == 0
        log = m.log_text()
        serial_max = 1e6 / HOST_LATENCY_US
        assert iops > 2 * serial_max, (
            f"{iops:.0f} IOPS at queue depth 16 over a 2 ms host: no overlap"
        )
        if lanes == "0":
            assert "host I/O slow" in log, log[-2000:]
            overlapped_jobs = re.search(r"host I/O threads: (\d+) jobs, up to (\d+) at once", log)
            assert overlapped_jobs and int(overlapped_jobs[2]) > 1, log[-2000:]
        else:
            summary = LANES_SUMMARY.search(log)
            assert summary, f"no request lanes summary:\n{log[-2000:]}"
            cpus = len(os.sched_getaffinity(0))
            assert int(summary["grown"]) > 0 and int(summary["max_active"]) > cpus, summary[0]
    finally:
        subprocess.run(["fusermount3", "-u", str(host)], check=False)
        slow.wait(timeout=30)
    assert_clean(img)
