"""kill -9 of the daemon in the middle of a write storm.

A writer thread writes disk.raw at random (1 B .. 1 MiB, aligned and not, some all-zero so
that zero detection frees clusters) and calls fsync every few writes, remembering which
writes were acknowledged before the last fsync that returned. At a random moment
(0.2-1.5 s in) the daemon gets SIGKILL. Then:

- ``qemu-img check`` exits 0 or 3 (leaks allowed), never 2 (corruption);
- the image, read by QEMU (``qemu-img convert -O raw``), holds exactly the fsynced content
  everywhere except where a write issued after the last fsync landed (those bytes may be
  old or new);
- qcowfs mounts it again and serves what QEMU reads;
- QEMU opens it read-write (``qemu-io -c "write 0 512"``) and the result is still sound;
- with an internal snapshot, ``qemu-img snapshot -a`` still restores the snapshot's content.

Seeds are fixed (printed; QCOWFS_SEED shifts them); the kill time comes from the seed too,
though where exactly the daemon dies depends on timing.
"""

from __future__ import annotations

import os
import random
import shutil
import threading
import time
from pathlib import Path

import pytest
from conftest import needs_fuse
from support.extents import merged
from support.images import create
from support.seeds import base_seed, seed_for

from qcowfs_dev.oracles import qemu_check, qemu_img, qemu_info, qemu_io

KiB = 1 << 10
MiB = 1 << 20
BASE_SEED = base_seed(20251123)

LAYOUTS = {
    # name: (virtual size, create options, take an internal snapshot first)
    "64k": (48 * MiB, ["cluster_size=65536"], False),
    "c512-rc1": (16 * MiB, ["cluster_size=512", "refcount_bits=1"], False),
    "4k-snapshot": (32 * MiB, ["cluster_size=4096"], True),
}
CASES = (
    [("64k", s) for s in range(4)]
    + [("c512-rc1", s) for s in range(4)]
    + [("4k-snapshot", s) for s in range(2)]
)


class Writer(threading.Thread):
    """Random writes with periodic fsync until the mount dies (or stop is set)."""

    def __init__(self, disk: Path, seed: int, vsize: int, cluster: int):
        super().__init__(daemon=True)
        self.disk = disk
        self.rng = random.Random(seed)
        self.vsize = vsize
        self.cluster = cluster
        self.ops: list = []  # (offset, data), in issue order
        self.durable = 0  # ops[:durable] were acknowledged before an fsync that returned
        self.fsyncs = 0
        self.error: BaseException | None = None
        self.stop = threading.Event()

    def next_op(self) -> tuple:
        r, v, c = self.rng, self.vsize, self.cluster
        x = r.random()
        if x < 0.5:
            n = r.randint(1, 8 * KiB)
            off = r.randrange(0, v - n)
        elif x < 0.8:
            n = c * r.randint(1, max(1, min(16, MiB // c)))
            off = r.randrange(0, (v - n) // c + 1) * c
        else:
            n = r.randint(8 * KiB, MiB)
            off = r.randrange(0, v - n)
        data = bytes(n) if r.random() < 0.1 else r.randbytes(n)
        return off, data

    def run(self) -> None:
        try:
            fd = os.open(self.disk, os.O_RDWR)
        except OSError as e:
            self.error = e
            return
        try:
            until_sync = self.rng.randint(1, 12)
            while not self.stop.is_set():
                off, data = self.next_op()
                self.ops.append((off, data))
                done = 0
                while done < len(data):
                    # a write cut by the kill returns the bytes done so far: finish it as any
                    # writer would (on a dead mount the rest fails with ENOTCONN/ECONNABORTED)
                    done += os.pwrite(fd, memoryview(data)[done:], off + done)
                until_sync -= 1
                if until_sync == 0:
                    issued = len(self.ops)
                    os.fsync(fd)
                    self.durable = issued
                    self.fsyncs += 1
                    until_sync = self.rng.randint(1, 12)
        except BaseException as e:  # the mount dying ends the storm with an OSError
            self.error = e
        finally:
            try:
                os.close(fd)
            except OSError:
                pass


def assert_durable(
    got: bytes, expected: bytearray, uncertain: list, ops: list, durable: int, what: str
) -> None:
    """got == expected outside the uncertain intervals; on a mismatch name the write that put it there."""
    mv_g, mv_e = memoryview(got), memoryview(expected)
    pos = 0
    for a, b in merged(uncertain) + [[len(expected), len(expected)]]:
        if pos < a and mv_g[pos:a] != mv_e[pos:a]:
            i = next(i for i in range(pos, a) if got[i] != expected[i])
            last = next(
                (
                    k
                    for k in range(durable - 1, -1, -1)
                    if ops[k][0] <= i < ops[k][0] + len(ops[k][1])
                ),
                None,
            )
            src = (
                f"fsynced write #{last} ({len(ops[last][1])} bytes at {ops[last][0]})"
                if last is not None
                else "the content before the mount"
            )
            raise AssertionError(
                f"{what}byte {i} (0x{i:x}) reads {got[i : i + 8].hex()} but {src} made it "
                f"{bytes(expected[i : i + 8]).hex()}"
            )
        pos = max(pos, b)


@needs_fuse
@pytest.mark.slow
@pytest.mark.parametrize("layout,k", CASES, ids=[f"{layout}-{k}" for layout, k in CASES])
def test_kill_during_write_storm(layout, k, mount, tmp_path):
    vsize, opts, snapshot = LAYOUTS[layout]
    seed = seed_for(f"crash-{layout}-{k}", BASE_SEED)
    rng = random.Random(seed)
    kill_after = rng.uniform(0.2, 1.5)
    what = f"[{layout} seed {seed} kill after {kill_after:.3f}s] "
    print(what)
    img = create(tmp_path / "img.qcow2", vsize, *opts)
    cluster = qemu_info(img)["cluster-size"]
    qemu_io(
        img,
        f"write -P 0x11 0 {vsize // 4}",
        f"write -P 0x22 {vsize // 2} {vsize // 8}",
        f"write -z {vsize // 8} {vsize // 16}",
    )
    snap_ref = None
    if snapshot:
        qemu_img("snapshot", "-c", "s1", img)
        snap_ref = tmp_path / "s1.raw"
        qemu_img("convert", "-O", "raw", img, snap_ref)
    before = tmp_path / "before.raw"
    qemu_img("convert", "-O", "raw", img, before)
    expected = bytearray(before.read_bytes())

    m = mount(img)
    w = Writer(m.disk, rng.getrandbits(64), vsize, cluster)
    w.start()
    time.sleep(kill_after)
    m.kill()
    w.stop.set()
    w.join(30)
    assert not w.is_alive(), f"{what}writer still blocked after the kill"
    assert w.error is None or isinstance(w.error, OSError), f"{what}writer failed: {w.error!r}"
    ops, durable = w.ops, w.durable
    print(
        f"{what}{len(ops)} writes issued, {w.fsyncs} fsyncs, {durable} durable; writer ended with {w.error!r}"
    )

    res = qemu_check(img)
    assert res["rc"] in (0, 3), f"{what}qemu-img check after kill -9 (exit 2 = corruption): {res}"

    for off, data in ops[:durable]:
        expected[off : off + len(data)] = data
    uncertain = [(off, off + len(data)) for off, data in ops[durable:]]
    got_path = tmp_path / "got.raw"
    qemu_img("convert", "-O", "raw", img, got_path)
    got = got_path.read_bytes()
    assert len(got) == vsize
    assert_durable(got, expected, uncertain, ops, durable, what)

    # qcowfs mounts the crashed image again and serves what QEMU reads
    m2 = mount(img)
    with open(m2.disk, "rb") as f:
        again = f.read()
    assert again == got, (
        f"{what}remount: disk.raw differs from qemu-img convert at "
        f"{next(i for i in range(vsize) if again[i : i + 1] != got[i : i + 1])}"
    )
    assert m2.unmount() == 0, f"{what}remount daemon exit"
    res = qemu_check(img)
    assert res["rc"] in (0, 3), f"{what}qemu-img check after remount: {res}"

    # QEMU opens it read-write
    qemu_io(img, "write -P 0x5a 0 512", "read -P 0x5a 0 512")
    res = qemu_check(img)
    assert res["rc"] in (0, 3), f"{what}qemu-img check after qemu-io write: {res}"

    if snap_ref is not None:
        copy = tmp_path / "copy.qcow2"
        shutil.copyfile(img, copy)
        qemu_img("snapshot", "-a", "s1", copy)
        p = qemu_img("compare", "-f", "qcow2", "-F", "raw", copy, snap_ref, check=False)
        assert p.returncode == 0, f"{what}snapshot s1 after the crash: {p.stdout} {p.stderr}"
