"""Fuzzing real mounts with damaged QEMU-made images.

A few small images are made once by QEMU (v3 with data, zero and compressed clusters, an
internal snapshot and a dirty persistent bitmap; v2; extended L2). Their metadata is located
here, independently of qcowfs: header and extensions, L1, L2 tables (active and snapshot),
refcount table and blocks, snapshot table, bitmap directory, bitmap tables and bitmap data.
Hypothesis picks a region and overwrites bytes, flips bits, or replaces 8-byte big-endian
entries with interesting values (0, 1<<63, past EOF, unaligned, reserved bits, flags, offsets
of other metadata). For every damaged image:

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
from support.repo import ROOT

from qcowfs_dev.mounts import Mount, detach
from qcowfs_dev.oracles import qemu_img, qemu_io
from qcowfs_dev.probes import (
    OFFSET_MASK,
    all_metadata_offsets,
    metadata_regions,
    refcounts_past_eof,
    u32,
    u64,
)

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


BUILDERS = {"v3": _build_v3, "v2": _build_v2, "extl2": _build_extl2}


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz-bases")
    out = Blobs()
    for name, build in BUILDERS.items():
        img = build(d)
        res = subprocess.run(["qemu-img", "check", str(img)], capture_output=True, text=True)
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


@st.composite
def mutation(draw, data: bytes, regs: dict):
    name = draw(st.sampled_from(sorted(regs)))
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
        elif kind == "u32":
            struct.pack_into(">I", buf, pos, value)
        else:
            struct.pack_into(">Q", buf, pos, value)
    return bytes(buf)


def describe(muts) -> str:
    parts = []
    for region, kind, pos, value in muts:
        v = (
            f"0x{value:x}"
            if kind in ("u32", "u64")
            else (f"bit {value}" if kind == "bit" else f"0x{value:02x}")
        )
        parts.append(f"{region}: {kind} @ 0x{pos:x} = {v}")
    return "; ".join(parts)


# ----------------------------------------------------------------------------- processes


def start_daemon(image: Path, mnt: Path, log: Path, read_only: bool) -> Mount:
    """`qcowfs mount --foreground` in a subprocess (qcowfs_dev.mounts.Mount, refusals allowed: .mounted
    says); always torn down by stop() (unmount retried while busy, then kill, then lazy detach)."""
    return Mount(
        image,
        mnt,
        log,
        read_only=read_only,
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


def check_read_only_mount(image: Path, work: Path) -> list:
    """(a); returns Hypothesis event labels (event() works only in the test's own thread)."""
    events = []
    before = sha256(image)
    mnt = work / "mnt-ro"
    mnt.mkdir()
    d = start_daemon(image, mnt, work / "ro.log", read_only=True)
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


def check_read_write_mount(image: Path, work: Path, writes) -> list:
    """(c); returns event labels."""
    q = subprocess.run(["qemu-img", "check", str(image)], capture_output=True, text=True)
    hidden_refcounts = refcounts_past_eof(image.read_bytes())
    qemu_consistent = q.returncode in (0, 3)
    mnt = work / "mnt-rw"
    mnt.mkdir()
    d = start_daemon(image, mnt, work / "rw.log", read_only=False)
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
        if q.returncode == 0:
            assert rc == 0, (
                f"daemon for an image qemu-img check finds clean exited {rc}: {d.problem}\n{d.stderr}\n{log}"
            )
            after = subprocess.run(
                ["qemu-img", "check", str(image)], capture_output=True, text=True
            )
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
    for region, *_ in muts:
        event(f"region {region}")
    work = Path(tempfile.mkdtemp(prefix=f"fuzz-{base}-"))
    try:
        # (a), (b) and (c) each on its own copy, in parallel: the daemons' start-up dominates the time
        jobs = {"ro": check_read_only_mount, "check": lambda img, _work: check_check(img)}
        if rw:
            jobs["rw"] = lambda img, w: check_read_write_mount(img, w, writes)
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
