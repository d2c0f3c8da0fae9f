"""disk.raw feeds VMs and block tools: the README's recipes, run for real.

Each test mounts a qcow2 image with qcowfs and points a block-level consumer at MNT/disk.raw,
then checks the result against QEMU's own view of the image:

- QEMU's block layer, as a VM with ``cache=none,aio=io_uring`` (or ``aio=native``) drives it:
  one ``qemu-io -f raw -t none -i MODE`` run submits rounds of ``aio_write -P`` / ``aio_read -P``
  (qemu-io runs no event loop between -c commands, so a round is in flight at once until its
  ``aio_flush``), seeded random offsets and lengths (4 KiB and 512 B aligned, some across
  cluster boundaries, some write-zeroes), over an image that already holds data written by QEMU
  (with and without a backing file). qemu-io verifies every read pattern itself ("Pattern
  verification failed", which it reports but does not turn into an exit code); the same writes
  go to a raw reference in Python, which ``qemu-img compare`` matches after the unmount.
- A loop device with direct I/O (``losetup --direct-io=on``) carrying ext4: mkfs, a file copied
  in, fsck clean, then read back through a fresh read-only mount and loop device.
- ``dd iflag=direct bs=1M`` and ``nbdkit file`` (read with nbdinfo/nbdcopy over a unix socket)
  against ``qemu-img convert -O raw``.

Seeded: set QCOWFS_SEED to replay another workload; the seed is part of every failure message.
Loop devices, ext4 mounts and nbdkit are always released in ``finally``; whether something is
still mounted is read from /proc/self/mounts (a dead FUSE mount fails stat, so stat cannot tell).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest
from conftest import needs_fuse, sha256
from support.images import create
from support.loops import _loop_name, loop_device, mounted_fs
from support.seeds import base_seed, seed_for

from qcowfs_dev.mounts import detach, is_mounted
from qcowfs_dev.oracles import assert_clean, assert_compare, qemu_img, qemu_io, run
from qcowfs_dev.proc import wait_for

KiB = 1 << 10
MiB = 1 << 20
CLUSTER = 64 * KiB
BASE_SEED = base_seed(20251202)


# ----------------------------------------------------------------------------- mounts, loops


@pytest.fixture
def qmount(mount):
    """The conftest `mount` factory (its teardown also detaches a mount whose daemon died: the
    shared lifecycle reads the mount table, since a dead FUSE mount fails stat)."""
    made = []

    def factory(*a, **kw):
        m = mount(*a, **kw)
        made.append(m)
        return m

    yield factory
    for m in made:
        if m.proc.poll() is not None and is_mounted(m.mnt):
            detach(m.mnt, lazy_only=True)


def loop_dio(dev: str) -> str:
    return Path(f"/sys/block/{_loop_name(dev)}/loop/dio").read_text().strip()


def assert_loop_dio(dev: str) -> None:
    dio = loop_dio(dev)
    assert dio == "1", (
        f"{dev}: /sys/block/{_loop_name(dev)}/loop/dio says {dio!r}, not '1' "
        f"(losetup --direct-io=on was not honoured):\n{run(['losetup', '-l', dev]).stdout}"
    )


def unmount_clean(m) -> None:
    rc = m.unmount()
    assert rc == 0, f"qcowfs daemon exited {rc}:\n{m.log_text()}"
    assert not is_mounted(m.mnt), f"{m.mnt} still in /proc/self/mounts after unmount"
    m.assert_no_traceback()


def first_difference(a: bytes, b: bytes) -> str:
    n = min(len(a), len(b))
    step = 1 << 16
    for base in range(0, n, step):
        if a[base : base + step] != b[base : base + step]:
            i = next(i for i in range(base, min(base + step, n)) if a[i] != b[i])
            return (
                f"first difference at {i} (0x{i:x}): {a[i : i + 16].hex()} != {b[i : i + 16].hex()}"
            )
    return f"lengths differ: {len(a)} != {len(b)}"


# ----------------------------------------------------------------------------- images


def build_image(tmp: Path, size: int, backing: bool) -> tuple[Path, list[Path]]:
    """A qcow2 image (64 KiB clusters) holding data written by QEMU: plain, zero and compressed
    clusters; with backing=True an overlay over a qcow2 backing file that holds data of its own."""
    img = tmp / "img.qcow2"
    backing_files = []
    if backing:
        base = create(
            tmp / "base.qcow2",
            size,
            f"cluster_size={CLUSTER}",
            writes=[
                "write -P 0x5a 0 4M",
                "write -P 0x3c 20M 3M",
                "write -P 0x77 36868k 1M",
                f"write -c -P 0x44 {size - 2 * MiB} 512k",
            ],
        )
        create(img, size, f"cluster_size={CLUSTER}", backing=base, backing_fmt="qcow2")
        backing_files.append(base)
    else:
        create(
            img,
            size,
            f"cluster_size={CLUSTER}",
            writes=[
                "write -P 0x5a 0 4M",
                "write -P 0x3c 20M 3M",
                f"write -c -P 0x44 {size - 2 * MiB} 512k",
            ],
        )
    # The top image's own data: plain, a zero range (over backing data when there is one),
    # a cluster-unaligned range, the last 96 KiB.
    qemu_io(
        img,
        "write -P 0xa1 1M 2M",
        "write -z 21M 512k",
        "write -P 0xa2 30M 1056k",
        "write -P 0xa3 5124k 12k",
        f"write -P 0xa4 {size - 96 * KiB} 96k",
    )
    return img, backing_files


# ----------------------------------------------------------------------------- 1. qemu-io aio


def _overlaps(a: int, b: int, used: list[tuple[int, int]]) -> bool:
    return any(a < e and s < b for s, e in used)


def _pick_write(rng: random.Random, size: int) -> tuple[int, int]:
    r = rng.random()
    if r < 0.45:  # 4 KiB aligned, up to 192 KiB
        ln = 4 * KiB * rng.choice([1, 1, 2, 4, 8, 16, 48])
        off = rng.randrange(0, (size - ln) // (4 * KiB)) * 4 * KiB
    elif r < 0.70:  # across one or more cluster boundaries, 4 KiB aligned
        b = rng.randrange(1, size // CLUSTER) * CLUSTER
        head = 4 * KiB * rng.randint(1, 16)
        ln = head + 4 * KiB * rng.randint(1, 40)
        off = b - head
    elif r < 0.90:  # 512 B aligned, not 4 KiB aligned
        ln = 512 * rng.randint(1, 24)
        off = (rng.randrange(0, (size - ln) // 4096) * 4096) + 512 * rng.randint(1, 7)
    else:  # 512 B aligned across a cluster boundary
        b = rng.randrange(1, size // CLUSTER) * CLUSTER
        head = 512 * rng.randint(1, 16)
        off, ln = b - head, head + 512 * rng.randint(1, 32)
    return off, min(ln, size - off)


def _pick_read(
    rng: random.Random, model: bytearray, size: int, used, recent
) -> tuple[int, int, int] | None:
    """A range whose content is one byte value in the model and that no write of this round touches."""
    for _ in range(40):
        if recent and rng.random() < 0.7:
            s, e = rng.choice(recent)
            a = s + (rng.randrange(0, (e - s) // 512) * 512 if e - s >= 1024 else 0)
            b = min(e, a + 512 * rng.randint(1, 128))
        else:
            a = rng.randrange(0, size // 512) * 512
            b = min(size, a + 512 * rng.randint(1, 256))
        a, b = a // 512 * 512, b // 512 * 512
        if b <= a or _overlaps(a, b, used):
            continue
        pat = model[a]
        if model.count(pat, a, b) == b - a:
            return a, b - a, pat
    return None


def gen_aio_script(
    rng: random.Random,
    model: bytearray,
    size: int,
    rounds: list[int],
    reads: int,
    base_ranges: list[tuple[int, int]],
):
    """qemu-io commands: rounds of disjoint aio writes (rounds[i] of them) and aio reads (of ranges
    the round leaves alone, each one byte value), shuffled, each round ended by aio_flush. Applies
    the writes to model. Returns (commands, number of writes, number of reads)."""
    cmds, nw, nr = [], 0, 0
    recent = list(base_ranges)
    for writes in rounds:
        used, round_cmds, round_writes = [], [], []
        while len(round_writes) < writes:
            off, ln = _pick_write(rng, size)
            if _overlaps(off, off + ln, used):
                continue
            used.append((off, off + ln))
            k = rng.random()
            if k < 0.08:
                round_cmds.append(
                    f"aio_write -z {off} {ln}"
                )  # write-zeroes: fallocate, then QEMU's fallback
                pat = 0
            else:
                pat = (
                    0 if k < 0.15 else rng.randrange(1, 256)
                )  # 0: a zero-filled write (zero detection)
                round_cmds.append(f"aio_write -P {pat} {off} {ln}")
            round_writes.append((off, ln, pat))
        for _ in range(reads):
            r = _pick_read(rng, model, size, used, recent)
            if r is not None:
                off, ln, pat = r
                round_cmds.append(f"aio_read -P {pat} {off} {ln}")
        rng.shuffle(round_cmds)
        cmds += round_cmds
        cmds.append("aio_flush")
        nw += len(round_writes)
        nr += sum(c.startswith("aio_read") for c in round_cmds)
        for off, ln, pat in round_writes:
            model[off : off + ln] = bytes([pat]) * ln
        recent = [(o, o + n) for o, n, _ in round_writes] + recent[:40]
    # A last round only reads back what the last round wrote.
    for s, e in recent[: rounds[-1]]:
        if model.count(model[s], s, e) == e - s:
            cmds.append(f"aio_read -P {model[s]} {s} {e - s}")
            nr += 1
    cmds.append("aio_flush")
    return cmds, nw, nr


@needs_fuse
@pytest.mark.parametrize("backing", [False, True], ids=["standalone", "backing"])
@pytest.mark.parametrize("aio", ["io_uring", "native"])
def test_qemu_io_aio_direct(aio, backing, qmount, tmp_path):
    """qemu-io -f raw -t none -i io_uring|native: mixed aio reads and writes at depth, patterns
    verified by qemu-io, content by qemu-img compare, image clean."""
    seed = seed_for(f"aio-{aio}-{backing}", BASE_SEED)
    what = f"[seed {seed}, aio={aio}, backing={backing}] "
    size = 48 * MiB
    img, backing_files = build_image(tmp_path, size, backing)
    ref = tmp_path / "ref.raw"
    qemu_img("convert", "-f", "qcow2", "-O", "raw", img, ref)
    model = bytearray(ref.read_bytes())
    backing_sums = [sha256(b) for b in backing_files]

    rng = random.Random(seed)
    base_ranges = [
        (0, 1 * MiB),
        (1 * MiB, 3 * MiB),
        (20 * MiB, 21 * MiB),
        (21 * MiB, 21 * MiB + 512 * KiB),
        (30 * MiB, 31 * MiB),
        (size - 2 * MiB, size - 1536 * KiB),
        (40 * MiB, 41 * MiB),
    ]
    # One round deeper than io_uring's 128-entry ring (QEMU queues the rest itself).
    cmds, nw, nr = gen_aio_script(
        rng, model, size, rounds=[32, 48, 160, 24, 64, 40], reads=24, base_ranges=base_ranges
    )
    assert nw >= 300 and nr >= 150, f"{what}workload too small: {nw} writes, {nr} reads"

    m = qmount(img)
    p = run(
        [
            "qemu-io",
            "-f",
            "raw",
            "-t",
            "none",
            "-i",
            aio,
            *sum((["-c", c] for c in cmds), []),
            m.disk,
        ],
        check=False,
    )
    out = p.stdout + p.stderr
    assert p.returncode == 0, f"{what}qemu-io exited {p.returncode}: {out[-3000:]}"
    assert "Pattern verification failed" not in out, (
        f"{what}qemu-io read back wrong data:\n"
        + "\n".join(line for line in out.splitlines() if "Pattern" in line)[:3000]
    )
    assert "failed" not in out.lower(), f"{what}qemu-io reported a failure:\n{out[-3000:]}"
    wrote = len(re.findall(r"^wrote \d+/\d+ bytes", p.stdout, re.M))
    read = len(re.findall(r"^read \d+/\d+ bytes", p.stdout, re.M))
    assert (wrote, read) == (nw, nr), (
        f"{what}qemu-io completed {wrote} writes, {read} reads; submitted {nw}, {nr}"
    )

    # The detector works on this build and mount: a wrong pattern is reported (exit code stays 0).
    s, e = base_ranges[0]
    wrong = (model[s] + 1) % 256
    neg = run(
        [
            "qemu-io",
            "-f",
            "raw",
            "-t",
            "none",
            "-i",
            aio,
            "-c",
            f"aio_read -P {wrong} {s} 4096",
            "-c",
            "aio_flush",
            m.disk,
        ],
        check=False,
    )
    assert "Pattern verification failed" in neg.stdout + neg.stderr, (
        f"{what}qemu-io did not flag a wrong pattern: {neg.stdout} {neg.stderr}"
    )

    # Through the mount (buffered reads) and, after unmount, in the image.
    got = m.disk.read_bytes()
    assert got == bytes(model), (
        f"{what}disk.raw != reference before unmount: {first_difference(got, bytes(model))}"
    )
    unmount_clean(m)
    ref.write_bytes(model)
    assert_compare(img, ref, what)
    assert_clean(img)
    assert [sha256(b) for b in backing_files] == backing_sums, f"{what}a backing file changed"


# ----------------------------------------------------------------------------- 2. loop + ext4


@needs_fuse
def test_loop_direct_io_ext4(qmount, tmp_path):
    """losetup --direct-io=on on disk.raw, ext4 made, written and fsck'd on it; the file read back
    through a fresh read-only mount and loop device."""
    if not shutil.which("mkfs.ext4") or not shutil.which("losetup"):
        pytest.fail("mkfs.ext4 / losetup missing (e2fsprogs, util-linux)")
    seed = seed_for("loop-ext4", BASE_SEED)
    what = f"[seed {seed}] "
    img = tmp_path / "img.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={CLUSTER}", img, str(128 * MiB))
    payload = random.Random(seed).randbytes(5 * MiB + 12345)
    src = tmp_path / "payload.bin"
    src.write_bytes(payload)
    want = sha256(src)

    m = qmount(img)
    # loop_device / mounted_fs release the ext4 mount and the loop device on any failure, before
    # qmount's teardown unmounts qcowfs (a bound loop device would keep disk.raw busy).
    with loop_device(m.disk, "--direct-io=on") as dev:
        assert_loop_dio(dev)
        run(["mkfs.ext4", "-q", "-F", dev])
        with mounted_fs(dev, tmp_path / "ext4") as fs:
            (fs / "dir").mkdir()
            run(["cp", src, fs / "dir" / "payload.bin"])
            run(["sync", "-f", fs / "dir" / "payload.bin"])
        fsck = run(["fsck.ext4", "-n", "-f", dev], check=False)
        assert fsck.returncode == 0, (
            f"{what}fsck.ext4 -n -f exited {fsck.returncode}:\n{fsck.stdout}{fsck.stderr}"
        )
    unmount_clean(m)
    assert_clean(img)

    m2 = qmount(img, read_only=True)
    with loop_device(m2.disk, "--direct-io=on", "--read-only") as dev:
        assert_loop_dio(dev)
        fsck = run(["fsck.ext4", "-n", "-f", dev], check=False)
        assert fsck.returncode == 0, (
            f"{what}fsck.ext4 after remount exited {fsck.returncode}:\n{fsck.stdout}{fsck.stderr}"
        )
        with mounted_fs(dev, tmp_path / "ext4ro", "-o", "ro,noload") as fs:
            got = fs / "dir" / "payload.bin"
            assert got.stat().st_size == len(payload)
            assert sha256(got) == want, f"{what}payload read back through a fresh mount differs"
    unmount_clean(m2)


# ----------------------------------------------------------------------------- 3. dd, nbdkit


@needs_fuse
def test_dd_direct_matches_convert(qmount, tmp_path):
    """dd iflag=direct bs=1M of disk.raw equals qemu-img convert -O raw of the image."""
    size = 40 * MiB + 192 * KiB  # not a whole number of 1 MiB blocks: dd's last read is short
    img, _ = build_image(tmp_path, size, backing=True)
    ref = tmp_path / "ref.raw"
    qemu_img("convert", "-f", "qcow2", "-O", "raw", img, ref)
    m = qmount(img)
    out = tmp_path / "dd.raw"
    run(["dd", f"if={m.disk}", f"of={out}", "iflag=direct", "bs=1M", "status=none"])
    assert out.stat().st_size == size
    assert sha256(out) == sha256(ref), (
        f"dd of disk.raw != qemu-img convert: {first_difference(out.read_bytes(), ref.read_bytes())}"
    )
    unmount_clean(m)
    assert_compare(img, ref)
    assert_clean(img)


@contextlib.contextmanager
def nbdkit_file(path: Path, *plugin_args: str):
    """nbdkit -r file PATH on a private unix socket; yields the NBD URI; always stopped."""
    sockdir = tempfile.mkdtemp(prefix="qcowfs-nbd-", dir="/tmp")  # short: sun_path is 108 bytes
    sock = os.path.join(sockdir, "sock")
    proc = subprocess.Popen(
        [
            "nbdkit",
            "--exit-with-parent",
            "-f",
            "-r",
            "-U",
            sock,
            "file",
            f"file={path}",
            *plugin_args,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )

    def ready() -> bool:
        if proc.poll() is not None:
            return True
        if not os.path.exists(sock):
            return False
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(sock)
                return True
            except OSError:
                return False

    try:
        wait_for(ready, timeout=20, what="nbdkit socket")
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"nbdkit exited {proc.returncode}: {err} {out}")
        yield f"nbd+unix:///?socket={sock}"
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(sockdir, ignore_errors=True)


@needs_fuse
def test_nbdkit_file_serves_disk(qmount, tmp_path):
    """nbdkit file on disk.raw (unix socket), read with nbdinfo and nbdcopy: equals qemu-img convert."""
    for tool in ("nbdkit", "nbdinfo", "nbdcopy"):
        if not shutil.which(tool):
            pytest.skip(f"{tool} missing: scripts/setup installs nbdkit and libnbd-bin")
    size = 40 * MiB + 192 * KiB
    img, _ = build_image(tmp_path, size, backing=True)
    ref = tmp_path / "ref.raw"
    qemu_img("convert", "-f", "qcow2", "-O", "raw", img, ref)
    m = qmount(img)
    out = tmp_path / "nbd.raw"
    with nbdkit_file(m.disk) as uri:
        info = json.loads(run(["nbdinfo", "--json", uri]).stdout)
        export = info["exports"][0]
        assert export["export-size"] == size, f"nbdinfo: {info}"
        assert export["is_read_only"] is True, f"nbdinfo: {info}"
        run(["nbdcopy", uri, out])
    assert out.stat().st_size == size
    assert sha256(out) == sha256(ref), (
        f"nbdcopy of nbdkit file != qemu-img convert: {first_difference(out.read_bytes(), ref.read_bytes())}"
    )
    unmount_clean(m)
    assert_compare(img, ref)
    assert_clean(img)
