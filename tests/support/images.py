"""Test images made by QEMU's own tools: the one qemu-img create the tests build their images
with, the images more than one test file starts from, and image bytes as a fuzzer's input."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Optional

from qcowfs_dev.oracles import qemu_img, qemu_io

MiB = 1 << 20


def create(
    path,
    size=None,
    *opts: str,
    backing=None,
    backing_fmt: Optional[str] = None,
    writes=(),
    timeout: Optional[float] = None,
) -> Path:
    """qemu-img create -q -f qcow2 [-o OPT]... [-b BACKING -F BACKING_FMT] PATH [SIZE], then qemu-io
    runs `writes` on it ("write -P 0x5a 0 64k", ...). Each of opts is one -o value
    ("cluster_size=4096,compat=0.10"; an empty one is left out); without a size an image with a
    backing file takes the backing file's. Returns path."""
    args = ["create", "-q", "-f", "qcow2"]
    for o in opts:
        if o:
            args += ["-o", o]
    if backing is not None:
        args += ["-b", str(backing), "-F", backing_fmt]
    args.append(path)
    if size is not None:
        args.append(str(size))
    qemu_img(*args, timeout=timeout)
    if writes:
        qemu_io(path, *writes, timeout=timeout)
    return Path(path)


def mixed_image(tmp: Path) -> Path:
    """16 MiB in 64 KiB clusters over an 8 MiB raw backing file of random bytes: data, zero
    clusters, unallocated clusters (the backing file's data shows), a compressed cluster."""
    base = tmp / "base.raw"
    base.write_bytes(random.Random(1).randbytes(8 * MiB))
    return create(
        tmp / "mixed.qcow2",
        "16M",
        "cluster_size=65536",
        backing=base,
        backing_fmt="raw",
        writes=(
            "write -P 0x5a 0 1M",
            "write -z 1M 256k",
            "write -P 0x11 3M 64k",
            "write -c -P 0x22 4M 64k",
            "write -z 9M 1M",
            "write -P 0x33 15M 1M",
        ),
    )


class Blobs(dict):
    """name -> image bytes, with a short repr (Hypothesis prints the test's arguments and fixture
    values on failure)."""

    def __repr__(self) -> str:
        return f"<{', '.join(f'{k}: {len(v)} bytes' for k, v in self.items())}>"
