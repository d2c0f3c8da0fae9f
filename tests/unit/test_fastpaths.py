"""The performance fast paths (issue 6) against QEMU as the oracle.

- Qcow2Image.read_view() replies from one reused buffer: it must never show bytes of an
  earlier read (zero, unallocated, backing and compressed ranges are filled explicitly).
- _write_in_place / _write_fresh_run take one pwrite for contiguous overwrites and fresh
  whole-cluster runs; everything else must still go the general way, with the same result.

Through FUSE (the fast request loop): tests/mount/test_fastpaths_fuse.py.
"""

from __future__ import annotations

import random

from support.images import mixed_image

from qcowfs.engine.hostfile import HostFile
from qcowfs.engine.image import Qcow2Image
from qcowfs_dev.oracles import assert_clean, qemu_img, qemu_io, qemu_raw

KiB = 1024
MiB = 1024 * KiB


def test_read_view_never_shows_stale_bytes(tmp_path):
    img = mixed_image(tmp_path)
    ref = qemu_raw(img, tmp_path / "ref.raw")
    rng = random.Random(2)
    with Qcow2Image(str(img)) as im:
        for _ in range(400):
            # fill the shared buffer with data, then read anything: zeros must be zeros
            im.read_view(0, 1 * MiB)
            n = rng.choice([1, 511, 4096, 65536, 65537, 300 * KiB, 1 * MiB, 2 * MiB])
            off = rng.randrange(0, 16 * MiB)
            got = bytes(im.read_view(off, n))
            assert got == ref[off : off + n], f"read_view({off}, {n}) differs from qemu-img convert"
            assert im.read(off, n) == ref[off : off + n]


class CountingFile(HostFile):
    """A HostFile that counts data writes (instrumentation, not a stand-in: it does the I/O)."""

    writes: list = []

    def pwrite(self, data, offset):
        CountingFile.writes.append((offset, len(memoryview(data))))
        super().pwrite(data, offset)

    def pwritev(self, buffers, offset):
        CountingFile.writes.append((offset, sum(len(memoryview(b)) for b in buffers)))
        super().pwritev(buffers, offset)


def test_write_fast_paths_match_qemu(tmp_path):
    # 4 KiB clusters: an L2 table maps 2 MiB, so runs cross tables easily
    img = tmp_path / "w.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", img, "8M")
    qemu_io(img, "write -P 0x44 1536k 4k")  # one allocated cluster inside a later fresh run
    ref = bytearray(qemu_raw(img, tmp_path / "ref.raw"))
    rng = random.Random(3)

    def data(n):
        return rng.randbytes(n)

    ops = [
        (0, data(256 * KiB)),  # fresh whole-cluster run: fast path
        (0, data(256 * KiB)),  # contiguous overwrite: fast path
        (1 * MiB, data(1 * MiB)),  # fresh run over one allocated cluster: general path
        (1 * MiB + 2048, data(8 * KiB)),  # unaligned overwrite, in place
        (2 * MiB - 64 * KiB, data(128 * KiB)),  # crosses an L2 table: general path
        (5 * MiB, data(3 * KiB)),  # partial fresh cluster: general path (copy on write)
    ]
    # host-noncontiguous clusters: allocate 6M+8k, then 6M, then overwrite both at once
    ops += [(6 * MiB + 8 * KiB, data(4 * KiB)), (6 * MiB, data(4 * KiB)), (6 * MiB, data(12 * KiB))]
    CountingFile.writes = []
    im = Qcow2Image(str(img), read_only=False, file_factory=CountingFile)
    try:
        for i, (off, buf) in enumerate(ops):
            before = len(CountingFile.writes)
            im.write(off, buf)
            ref[off : off + len(buf)] = buf
            if i in (0, 1):
                assert len(CountingFile.writes) - before == 1, f"op {i}: expected one pwrite"
                assert CountingFile.writes[-1][1] == len(buf)
            assert im.read(off, len(buf)) == buf
    finally:
        im.close()
    out = tmp_path / "after.raw"
    out.write_bytes(bytes(ref))
    qemu_img("compare", "-f", "qcow2", "-F", "raw", img, out)
    assert_clean(img)
